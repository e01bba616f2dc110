"""Z-Image: a single-stream transformer over the caption's and the image's tokens (refiner blocks
for each first), conditioned on the second-to-last hidden states of Qwen3 at each caption's own
length. Following diffusers' ZImagePipeline and examples/dreambooth/train_dreambooth_lora_z_image.py:
- captions: ZImagePipeline._encode_prompt (Qwen3's chat template, thinking on; 512 tokens; the
  masked positions dropped), kept here zero-padded with a mask and unpadded for the call;
- latents: the VAE posterior's mode (the script's .mode()), shifted and scaled by the VAE config;
- the call: lists of (C, 1, h, w) latents and of caption states, time (1000 - t) / 1000, and the
  prediction negated (Z-Image predicts x0 - noise; the loss compares with noise - x0).
"""
from __future__ import annotations

import torch

from freezeasguard.models.families.base import Family, Latents, pad_tokens


def encode(components, captions):
    from diffusers import ZImagePipeline

    encoder = components.text_encoder
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=components.tokenizer,
                          transformer=None)
    states = pipe._encode_prompt(list(captions), device=encoder.device)
    longest = max(s.shape[0] for s in states)
    embeds = torch.stack([pad_tokens(s.float(), longest, 0) for s in states])
    mask = torch.stack([pad_tokens(torch.ones(s.shape[0], device=s.device), longest, 0) for s in states])
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}


def predict(denoiser, noisy, timesteps, cond):
    mask = cond["encoder_hidden_states_mask"].bool()
    captions = [states[keep] for states, keep in zip(cond["encoder_hidden_states"], mask)]
    frames = list(noisy.unsqueeze(2).unbind(0))
    out = denoiser(frames, (1000 - timesteps.to(noisy.dtype)) / 1000, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


ZIMAGE = Family("zimage", ("ZImagePipeline",), "transformer", (("text_encoder", "tokenizer"),), encode, predict,
                "Z-Image: single-stream transformer, Qwen3 encoder",
                latents=Latents(sample=False), patch=2, text_width_key="cap_feat_dim", depth_key="n_layers")
