"""FLUX.1: a rectified-flow transformer on packed latents (2x2 latent patches as tokens),
conditioned on T5 tokens and CLIP's pooled output; dev also embeds a guidance value. The call
follows diffusers' FluxPipeline and its DreamBooth/LoRA training script: timesteps divided by
1000, position ids per latent patch (row, column) and zeros for text, guidance 3.5 for dev."""
from __future__ import annotations

import torch

from freezeasguard.models.families.base import Family, tokenize

TRAIN_GUIDANCE = 3.5      # train_dreambooth_lora_flux.py's --guidance_scale default


def encode(components, captions):
    (clip, t5), (tok_clip, tok_t5) = components.text_encoders, components.tokenizers
    pooled = clip(tokenize(tok_clip, captions, clip.device)).pooler_output
    return {"encoder_hidden_states": t5(tokenize(tok_t5, captions, t5.device))[0], "pooled_projections": pooled}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 patch one token, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def predict(denoiser, noisy, timesteps, cond):
    b, _, h, w = noisy.shape
    text = cond["encoder_hidden_states"]
    guidance = (torch.full((b,), TRAIN_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
                if denoiser.config.guidance_embeds else None)
    out = denoiser(hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
                   pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                   txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                   img_ids=image_ids(h, w, noisy.device).to(noisy.dtype)).sample
    return unpack(out, h, w)


FLUX = Family("flux", ("FluxPipeline",), "transformer", (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
              encode, predict, "FLUX.1 dev/schnell: packed-latent flow transformer, CLIP + T5 encoders", patch=2,
              text_width_key="joint_attention_dim", depth_key="num_layers", guidance_key="guidance_embeds")
