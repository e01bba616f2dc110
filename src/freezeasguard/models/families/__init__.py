"""Denoiser families: what differs between SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2, Qwen-Image and
Z-Image for training.

Everything else (the mask, mask learning, guarded fine-tuning, LoRA, verify, exports) works over
"the model's trainable module", the denoiser, by parameter name. A family says only:
- which folder holds the denoiser (``unet/`` or ``transformer/``) and which text encoders and
  tokenizers the pipeline has;
- how a batch of captions becomes the denoiser's conditioning (``encode``);
- how images become its latents (``latents``: the VAE posterior, its normalisation, the shape);
- how the denoiser is called on noisy latents (``predict``); the objective (epsilon,
  v-prediction, flow matching) comes from the scheduler config (diffusion.NoiseSchedule).

A folder's family is read from its model_index.json (the pipeline class diffusers saved).
"""
from __future__ import annotations

from freezeasguard.models.families.base import Family
from freezeasguard.models.families.flux import FLUX
from freezeasguard.models.families.flux2 import FLUX2
from freezeasguard.models.families.qwenimage import QWENIMAGE
from freezeasguard.models.families.sd import SD
from freezeasguard.models.families.sd3 import SD3
from freezeasguard.models.families.sdxl import SDXL
from freezeasguard.models.families.zimage import ZIMAGE

FAMILIES = {f.name: f for f in (SD, SDXL, SD3, FLUX, FLUX2, QWENIMAGE, ZIMAGE)}
_BY_PIPELINE = {cls: f for f in FAMILIES.values() for cls in f.pipeline_classes}


def family_of_pipeline_class(class_name: str | None) -> Family:
    """The family of a diffusers pipeline class name (model_index.json's _class_name)."""
    if class_name in _BY_PIPELINE:
        return _BY_PIPELINE[class_name]
    known = ", ".join(sorted(_BY_PIPELINE))
    raise ValueError(f"pipeline class {class_name!r} is not a family freezeasguard trains (known: {known})")


def family_from_names(names) -> str | None:
    """The family whose denoiser has these parameter names (a mask holds names, not classes)."""
    names = list(names)
    has = lambda prefix: any(n.startswith(prefix) for n in names)   # noqa: E731
    if has("double_stream_modulation_img."):
        return "flux2"
    if has("context_refiner.") or has("cap_pad_token"):
        return "zimage"
    if has("txt_norm.") and has("img_in."):
        return "qwenimage"
    if has("single_transformer_blocks."):
        return "flux"
    if has("transformer_blocks.") and has("pos_embed."):
        return "sd3"
    if has("add_embedding."):
        return "sdxl"
    if has("down_blocks."):
        return "sd"
    return None


__all__ = ["FAMILIES", "Family", "family_from_names", "family_of_pipeline_class"]
