"""Qwen-Image: a 60-block MMDiT on 2x2-packed latents of a video VAE (one frame), conditioned on
the last hidden states of Qwen2.5-VL with a mask. Following diffusers' QwenImagePipeline and
examples/dreambooth/train_dreambooth_lora_qwen_image.py, calling the pipeline's own code:
- captions: QwenImagePipeline._get_qwen_prompt_embeds (its template; the 34 template tokens
  dropped; each caption at its own length, zero-padded with a mask);
- latents: a sample of the VAE posterior of the image as one frame, standardised per channel
  by the VAE config's latents_mean / latents_std; the frame axis is kept only inside the call;
- the call: _pack_latents, img_shapes (1, h/2, w/2), timestep / 1000, no guidance embedding.
"""
from __future__ import annotations

import torch

from freezeasguard.models.families.base import Family, Latents


def _text_pipeline(components):
    from diffusers import QwenImagePipeline

    # what the training script builds to encode prompts: the pipeline without VAE and transformer
    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=components.text_encoder,
                             tokenizer=components.tokenizer, transformer=None)


def encode(components, captions):
    encoder = components.text_encoder
    embeds, mask = _text_pipeline(components)._get_qwen_prompt_embeds(list(captions), device=encoder.device,
                                                                       dtype=torch.float32)
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask.float()}


def posterior(vae, pixels):
    dist = vae.encode(pixels.unsqueeze(2)).latent_dist      # (B, C, frames=1, h, w)
    return dist.mean.squeeze(2), dist.std.squeeze(2)


def normalization(vae):
    config = vae.config
    mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(-1, 1, 1)
    return mean, 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(-1, 1, 1)


def geometry(vae_config) -> tuple[int, int]:
    # QwenImagePipeline: vae_scale_factor = 2 ** len(vae.temperal_downsample)
    return int(vae_config["z_dim"]), 2 ** len(vae_config["temperal_downsample"])


def predict(denoiser, noisy, timesteps, cond):
    from diffusers import QwenImagePipeline

    b, c, h, w = noisy.shape
    # the script packs (B, frames=1, C, h, w); with one frame that is the same memory as (B, C, h, w)
    tokens = QwenImagePipeline._pack_latents(noisy, b, c, h, w)
    out = denoiser(hidden_states=tokens, encoder_hidden_states=cond["encoder_hidden_states"],
                   encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                   timestep=timesteps.to(noisy.dtype) / 1000, img_shapes=[(1, h // 2, w // 2)] * b).sample
    return QwenImagePipeline._unpack_latents(out, h, w, 1).squeeze(2)


QWENIMAGE = Family("qwenimage", ("QwenImagePipeline",), "transformer", (("text_encoder", "tokenizer"),), encode,
                   predict, "Qwen-Image: MMDiT on packed latents, Qwen2.5-VL encoder",
                   latents=Latents(posterior, normalization, geometry, sample=True),
                   default_side=1024,      # QwenImagePipeline.default_sample_size 128 x vae_scale_factor 8
                   text_width_key="joint_attention_dim", depth_key="num_layers")
