"""Metrics for real Stable Diffusion evaluation, on weights the user has on disk.

Nothing is downloaded: each loader takes a local path and names the command-line option to fix
when it is missing. Needs the ``eval`` extra (``pip install "freezeasguard[eval]"``: torchmetrics
and scipy); the import error says so.

- FID and KID (torchmetrics) over any feature extractor module: images (N, 3, H, W) uint8 in,
  features (N, D) out. With fewer than ~1,000 images FID is biased upwards (its covariance
  estimate is), so a warning is logged and KID, which is unbiased, is reported beside it.
- CLIP score (100 x cosine of image and text embeddings, floored at 0, as torchmetrics and
  the paper's Table 2) with a local transformers CLIP folder.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from freezeasguard.metrics.basic import images_to_uint8
from freezeasguard.metrics.nets.inception import load_fid_inception

logger = logging.getLogger(__name__)

FID_RELIABLE_IMAGES = 1000


def _require_torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError as exc:
        raise ImportError('real-model metrics need the eval extra: pip install "freezeasguard[eval]"') from exc


def fid_and_kid(real, fake, extractor: torch.nn.Module, kid_subset: int = 1000, seed: int = 0) -> dict:
    """FID and KID (mean, std over subsets) of two image sets in ``extractor``'s feature space."""
    _require_torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = images_to_uint8(real), images_to_uint8(fake)
    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError("FID needs at least 2 real and 2 generated images")
    if n < FID_RELIABLE_IMAGES:
        logger.warning("FID on %d images is biased upwards (reliable from ~%d); compare it only between runs of "
                       "the same size, and read KID beside it", n, FID_RELIABLE_IMAGES)
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    torch.manual_seed(seed)    # KID draws its subsets from the global generator
    kid = KernelInceptionDistance(feature=extractor, subset_size=min(kid_subset, n), subsets=10)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "images": n,
            "fid_reliable": n >= FID_RELIABLE_IMAGES}


class ImageFeatures(torch.nn.Module):
    """uint8 (N, 3, H, W) -> (N, D) image embeddings of a local transformers vision model."""

    def __init__(self, path, flag: str = "--fid-features"):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel
        path = Path(path) if path else None
        if path is None or not (path / "config.json").exists():
            raise FileNotFoundError(f"{flag} {path}: no model folder there. Pass a local transformers vision model "
                                    f"folder (a CLIP or DINOv2 saved with save_pretrained); nothing is downloaded.")
        self.model = AutoModel.from_pretrained(path).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.name = path.name

    @torch.no_grad()
    def forward(self, x):
        images = [im.permute(1, 2, 0).numpy() for im in x]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
        else:
            out = self.model(pixel_values=pixels)
        if not torch.is_tensor(out):
            out = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state.mean(1)
        return out.double()


def fid_extractor(fid_inception=None, fid_features=None) -> tuple[torch.nn.Module, str]:
    """The FID feature network and the name of its space: the FID Inception-v3 weights (the
    paper's FID) or a local transformers vision model folder."""
    if fid_inception:
        return load_fid_inception(fid_inception), "inception"
    if fid_features:
        extractor = ImageFeatures(fid_features)
        return extractor, extractor.name
    raise ValueError("FID needs a feature network: fid_inception (FID Inception-v3 weights, .safetensors; the "
                     "paper's FID) or fid_features (a local transformers vision model folder)")


def fid_and_kid_of_images(real, generated, extractor: torch.nn.Module) -> dict:
    """fid_and_kid of PIL image lists; every image is resized to the first generated image's size."""
    size = generated[0].size
    return fid_and_kid(images_to_uint8([r.resize(size) for r in real]),
                       images_to_uint8([g.resize(size) for g in generated]), extractor,
                       kid_subset=min(len(real), len(generated)))


def load_clip(path, flag: str = "--clip-weights"):
    """A local transformers CLIP folder (config.json, weights, tokenizer and processor files)."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path) if path else None
    if path is None or not (path / "config.json").exists():
        raise FileNotFoundError(f"{flag} {path}: no CLIP folder there. Pass a local transformers CLIP folder "
                                f"(e.g. one saved by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained, "
                                f"such as openai/clip-vit-large-patch14 downloaded beforehand); nothing is downloaded.")
    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    return model, processor


@torch.no_grad()
def clip_scores(images, prompts: list[str], model, processor, batch_size: int = 32) -> list[float]:
    """Per-image CLIP score: 100 * max(cos(image, text), 0)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = []
    for s in range(0, len(prompts), batch_size):
        inputs = processor(text=prompts[s:s + batch_size], images=list(images[s:s + batch_size]),
                           return_tensors="pt", padding=True, truncation=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = _embedding(img)
        txt = _embedding(txt)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        out += (100 * cos.clamp_min(0)).tolist()
    return out


def _embedding(x):
    # transformers 5 may return a model output object instead of a tensor
    return x if torch.is_tensor(x) else (x.pooler_output if getattr(x, "pooler_output", None) is not None else x[0])
