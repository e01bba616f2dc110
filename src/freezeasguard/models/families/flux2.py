"""FLUX.2 [dev]: a flow transformer on packed latents, conditioned on three hidden layers of one
language model (Mistral Small 3.1) stacked side by side, with guidance embedded (dev is
guidance-distilled). Everything follows diffusers' Flux2Pipeline and
examples/dreambooth/train_dreambooth_lora_flux2.py, calling the pipeline's own static helpers:
- captions: Flux2Pipeline._get_mistral_3_small_prompt_embeds (its chat template and system
  message, padded to 512 tokens, hidden states 10, 20, 30: the script's defaults);
- latents: the VAE posterior's mode (the script's .mode()), 2x2 patches folded into channels
  (_patchify_latents), then standardised by the VAE's batch-norm statistics;
- the call: patches as tokens (_pack_latents), 4-axis position ids (_prepare_latent_ids,
  _prepare_text_ids), timestep / 1000, guidance 3.5 (the script's --guidance_scale default).
"""
from __future__ import annotations

import torch

from freezeasguard.models.families.base import Family, Latents

TRAIN_GUIDANCE = 3.5            # train_dreambooth_lora_flux2.py --guidance_scale default
MAX_SEQUENCE_LENGTH = 512       # its --max_sequence_length default (= the pipeline's)
TEXT_LAYERS = (10, 20, 30)      # its --text_encoder_out_layers default (= the pipeline's)


def encode(components, captions):
    from diffusers import Flux2Pipeline

    encoder = components.text_encoder
    embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        encoder, components.tokenizer, list(captions), dtype=torch.float32, device=encoder.device,
        max_sequence_length=MAX_SEQUENCE_LENGTH, hidden_states_layers=TEXT_LAYERS)
    return {"encoder_hidden_states": embeds}


def posterior(vae, pixels):
    from diffusers import Flux2Pipeline

    dist = vae.encode(pixels).latent_dist       # a 2x2 fold is a permutation: mean and std fold alike
    return Flux2Pipeline._patchify_latents(dist.mean), Flux2Pipeline._patchify_latents(dist.std)


def normalization(vae):
    """(shift, scale) per patched channel: (x - running_mean) / sqrt(running_var + eps)."""
    mean, var = vae.bn.running_mean.detach().float(), vae.bn.running_var.detach().float()
    return mean.view(-1, 1, 1), (var + vae.config.batch_norm_eps).rsqrt().view(-1, 1, 1)


def geometry(vae_config) -> tuple[int, int]:
    """(channels, downscale) of the denoiser's latents: 4x the VAE's channels at half its side."""
    return 4 * int(vae_config["latent_channels"]), 2 ** len(vae_config["block_out_channels"])


def predict(denoiser, noisy, timesteps, cond):
    from diffusers import Flux2Pipeline

    text = cond["encoder_hidden_states"]
    ids = Flux2Pipeline._prepare_latent_ids(noisy).to(noisy.device)
    tokens = Flux2Pipeline._pack_latents(noisy)
    guidance = (torch.full((noisy.shape[0],), TRAIN_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
                if denoiser.config.guidance_embeds else None)
    out = denoiser(hidden_states=tokens, timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
                   encoder_hidden_states=text, txt_ids=Flux2Pipeline._prepare_text_ids(text).to(noisy.device),
                   img_ids=ids).sample
    return Flux2Pipeline._unpack_latents_with_ids(out[:, :tokens.shape[1]], ids)


FLUX2 = Family("flux2", ("Flux2Pipeline",), "transformer", (("text_encoder", "tokenizer"),), encode, predict,
               "FLUX.2 [dev]: packed-latent flow transformer, Mistral Small 3.1 encoder",
               latents=Latents(posterior, normalization, geometry, sample=False), patch=1,
               text_width_key="joint_attention_dim", depth_key="num_layers",
               guidance_key="guidance_embeds")
