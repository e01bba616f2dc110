"""The layouts people share checkpoints in, mapped to the denoiser's own parameter names.

A fine-tuned model is shared as a diffusers folder or, more often, as one file in the original
layout that AUTOMATIC1111, ComfyUI, Forge and kohya's scripts save: the UNet under
``model.diffusion_model.`` with LDM names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``),
often in fp16, often with the VAE (``first_stage_model.``) and text encoders
(``cond_stage_model.``, ``conditioner.``) beside it. The map from those names to the UNet's is
diffusers' own (``convert_ldm_unet_checkpoint``, what ``from_single_file`` runs); we run it on
placeholder values, so that it says which file key each parameter comes from without reading a
weight. A layout that cannot be told is an error naming what was found, never a guess.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .models import ModelError, denoiser_weight_files
from .tensorfile import TensorFile, TensorFileError

LDM_UNET_PREFIX = "model.diffusion_model."
# other parts of a single-file checkpoint: not the denoiser, never audited as part of it
LDM_OTHER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "text_encoders.",
                      "vae.")


class LayoutError(ValueError):
    """A checkpoint whose layout cannot be told or does not fit the base model."""


def detect_layout(keys) -> str:
    """'ldm-unet' (an SD 1.x/2.x or SDXL single file) or 'diffusers' (the denoiser's own names);
    anything else is a LayoutError naming the keys found."""
    keys = list(keys)
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return "ldm-unet"
    if any(k.startswith(("down_blocks.", "transformer_blocks.", "single_transformer_blocks.", "conv_in."))
           for k in keys):
        return "diffusers"
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise LayoutError(f"cannot tell this checkpoint's layout (keys such as {shown}): neither a diffusers denoiser "
                      f"nor a single-file SD/SDXL checkpoint ({LDM_UNET_PREFIX}...)")


def ldm_unet_names(file_keys, unet_config: dict) -> dict[str, str]:
    """The denoiser parameter name -> the single-file key it is stored under, as diffusers'
    single-file loader maps them. Only the UNet's keys are looked at."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = [k for k in file_keys if k.startswith(LDM_UNET_PREFIX)]
    # the converter only renames: a scalar index per key says where each parameter came from
    placeholders = {k: torch.tensor(i) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(placeholders, dict(unet_config))
    return {name: keys[int(index)] for name, index in converted.items()}


class Checkpoint:
    """A shared checkpoint's denoiser tensors under the denoiser's own names, each read when asked
    for: a diffusers pipeline or denoiser folder, a denoiser state file, or a single-file SD/SDXL
    checkpoint (``denoiser_config`` maps its LDM names)."""

    def __init__(self, path, denoiser_config: dict | None = None):
        self.path = Path(path)
        try:
            files = [TensorFile(f) for f in denoiser_weight_files(self.path)]
        except TensorFileError as exc:
            raise ModelError(str(exc)) from exc
        keys = {k: f for f in files for k in f.keys()}
        self.files = files
        self.layout = detect_layout(keys)
        if self.layout == "diffusers":
            self.where = {k: (f, k) for k, f in keys.items()}
            self.unmapped, self.others = [], 0
        else:
            if denoiser_config is None:
                raise LayoutError(f"{self.path} is a single-file SD/SDXL checkpoint; mapping its names needs the "
                                  f"UNet's config: pass --model BASE, or a mask that records it "
                                  f"(`freezeasguard mask record`)")
            names = ldm_unet_names(keys, denoiser_config)
            self.where = {n: (keys[k], k) for n, k in names.items()}
            mapped = set(names.values())
            self.unmapped = [k for k in keys if k.startswith(LDM_UNET_PREFIX) and k not in mapped]
            self.others = sum(1 for k in keys if not k.startswith(LDM_UNET_PREFIX))

    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        f, k = self.where[name]
        return f.shape(k)

    def dtype(self, name: str) -> torch.dtype:
        f, k = self.where[name]
        return f.dtype(k)

    def read(self, name: str) -> torch.Tensor:
        f, k = self.where[name]
        try:
            return f.read(k)
        except TensorFileError as exc:
            raise ModelError(str(exc)) from exc

    def read_bytes(self, name: str) -> bytearray:
        f, k = self.where[name]
        return f.read_bytes(k)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read + f.header_bytes for f in self.files)

    def fingerprint(self) -> dict:
        """models.fingerprint of the denoiser's tensors, one tensor in memory at a time."""
        names = sorted(self.where)
        weights = hashlib.blake2b(digest_size=16)
        for name in names:
            weights.update(str(self.dtype(name)).encode())
            weights.update(bytes(self.read_bytes(name)))
        shapes = [list(self.shape(n)) for n in names]
        return {"num_tensors": len(names),
                "names_hash": hashlib.blake2b("\n".join(names).encode(), digest_size=16).hexdigest(),
                "shapes_hash": hashlib.blake2b(json.dumps(shapes).encode(), digest_size=16).hexdigest(),
                "weights_hash": weights.hexdigest()}
