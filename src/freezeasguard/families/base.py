"""The Family record (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]     # model_index.json _class_name values of this family
    denoiser_folder: str                  # unet | transformer
    encoders: tuple[tuple[str, str], ...]  # (text encoder subfolder, its tokenizer subfolder), in order
    encode: Callable                      # (components, captions) -> conditioning (a tensor or a dict of tensors)
    predict: Callable                     # (denoiser, noisy latents, model timesteps, conditioning) -> prediction
    summary: str = ""


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
    if isinstance(parts[0], dict):
        return {k: join([p[k] for p in parts]) for k in parts[0]}
    return join(parts)
