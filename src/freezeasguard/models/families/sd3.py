"""SD3 / SD3.5: an MMDiT (SD3Transformer2DModel) trained by rectified flow. Conditioning as the
SD3 pipeline builds it: the two CLIP encoders' penultimate states side by side, zero-padded to
the T5 width and followed by T5's tokens along the sequence; the pooled projection is both
CLIP encoders' projected embeddings side by side."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from freezeasguard.models.families.base import Family, penultimate_and_pooled, tokenize


def encode(components, captions):
    (clip_l, clip_g, t5), (tok_l, tok_g, tok_t5) = components.text_encoders, components.tokenizers
    hidden_l, pooled_l = penultimate_and_pooled(clip_l, tokenize(tok_l, captions, clip_l.device))
    hidden_g, pooled_g = penultimate_and_pooled(clip_g, tokenize(tok_g, captions, clip_g.device))
    t5_states = t5(tokenize(tok_t5, captions, t5.device))[0]
    clip = torch.cat([hidden_l, hidden_g], dim=-1)
    clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5_states], dim=-2),
            "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1)}


def predict(denoiser, noisy, timesteps, cond):
    return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"]).sample


SD3 = Family("sd3", ("StableDiffusion3Pipeline",), "transformer",
             (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")),
             encode, predict, "SD3/SD3.5: MMDiT, two CLIP + T5 encoders, rectified flow",
             text_width_key="joint_attention_dim", depth_key="num_layers")
