"""The Family record (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def vae_posterior(vae, pixels):
    """(mean, std) of the VAE's posterior for a batch of images, (B, C, h, w)."""
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.std


def vae_normalization(vae):
    """(shift, scale): the denoiser sees (latents - shift) * scale (SD: scale 0.18215, no shift)."""
    config = vae.config
    return float(getattr(config, "shift_factor", None) or 0.0), float(getattr(config, "scaling_factor", 0.18215))


def vae_geometry(vae_config: dict) -> tuple[int, int]:
    """(channels, downscale) of the latents: the VAE halves the side once per block but the last."""
    return int(vae_config.get("latent_channels", 4)), 2 ** (len(vae_config["block_out_channels"]) - 1)


@dataclass(frozen=True)
class Latents:
    """How images become the denoiser's latents, as the family's training script makes them."""
    posterior: Callable = vae_posterior           # (vae, pixels) -> (mean, std), in the denoiser's layout
    normalization: Callable = vae_normalization   # vae -> (shift, scale): floats or per-channel (C, 1, 1)
    geometry: Callable = vae_geometry             # vae config -> (channels, downscale)
    sample: bool = True                           # draw from the posterior (False: its mode, the mean)


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]     # model_index.json _class_name values of this family
    denoiser_folder: str                  # unet | transformer
    encoders: tuple[tuple[str, str], ...]  # (text encoder subfolder, its tokenizer subfolder), in order
    encode: Callable                      # (components, captions) -> conditioning (a tensor or a dict of tensors)
    predict: Callable                     # (denoiser, noisy latents, model timesteps, conditioning) -> prediction
    summary: str = ""
    latents: Latents = Latents()
    patch: int | None = None              # the denoiser's own downscale (None: its config's patch_size, or 1)
    default_side: int | None = None       # image side when neither the denoiser nor the VAE config says
    text_width_key: str = "cross_attention_dim"   # the config keys a preset checks
    depth_key: str | None = None
    guidance_key: str | None = None


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def penultimate_and_pooled(encoder, ids):
    """CLIP's penultimate hidden states (what SDXL and SD3 condition on) and its pooled output
    (the projected text embedding of a CLIPTextModelWithProjection, else the pooler output)."""
    out = encoder(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states[-2], pooled


# Conditioning is a tensor (SD's text embeddings) or a dict of tensors (the other families), each
# with the batch first; these apply a function to it, or join several, whatever its form.
def cond_apply(cond, fn):
    return {k: fn(v) for k, v in cond.items()} if isinstance(cond, dict) else fn(cond)


def cond_join(parts: list, join=torch.stack):
    """``parts``: per-sample conditionings (join=torch.stack) or batches (join=torch.cat). Token
    sequences of different lengths (Qwen-Image and Z-Image encode each caption at its own length,
    with a mask) are zero-padded to the longest first, as diffusers' scripts pad them."""
    if isinstance(parts[0], dict):
        return {k: cond_join([p[k] for p in parts], join) for k in parts[0]}
    axis = 0 if join is torch.stack else 1
    if parts[0].dim() > axis and len({p.shape[axis] for p in parts}) > 1:
        longest = max(p.shape[axis] for p in parts)
        parts = [pad_tokens(p, longest, axis) for p in parts]
    return join(parts)


def pad_tokens(t: torch.Tensor, length: int, axis: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = length - t.shape[axis]
    return torch.cat([t, t.new_zeros(shape)], dim=axis)
