"""Score a folder of generated images with the real-model metrics (``freezeasguard score``).

For results that did not come from the experiment runner: images from ``freezeasguard
generate`` (prompts.json says each file's prompt), an image folder with metadata, or plain
images. FID/KID compare them with a folder of real images (searched recursively, so an FF25
person folder works); the CLIP score needs each image's prompt; face identity compares faces
with the real images; TOPIQ-FR scores generated image k against real image k (both sorted by file
name, the real ones reused in turn when fewer). Every weight is a local path; nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from freezeasguard.training.data import load_image_captions
from freezeasguard.metrics.faces import face_identity
from freezeasguard.metrics.nets.topiq import load_topiq_fr, topiq_fr_scores
from freezeasguard.metrics.real import clip_scores, fid_and_kid_of_images, fid_extractor, load_clip

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _open(path: Path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc}); remove or replace it") from exc


def read_generated(folder) -> tuple[list, list[str] | None]:
    """Images of a folder and their prompts, when the folder says them (prompts.json from
    ``freezeasguard generate``, or metadata.jsonl/csv with file_name and text)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of generated images")
    if (folder / "prompts.json").exists():
        index = json.loads((folder / "prompts.json").read_text())
        return [_open(folder / e["file"]) for e in index], [e["prompt"] for e in index]
    if any((folder / f"metadata.{ext}").exists() for ext in ("jsonl", "csv")):
        data = load_image_captions(folder, check_images=False)
        return [r.load() for r in data.records], [r.caption for r in data.records]
    return read_images(folder), None


def read_images(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png")
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [_open(p) for p in files]


def score_folder(generated, real=None, fid_inception=None, fid_features=None, clip_weights=None,
                 faces: bool = False, topiq_fr=None) -> dict:
    """The metrics that the given weights allow; each needs what it names (real images, prompts)."""
    images, prompts = read_generated(generated)
    out: dict = {"generated": str(generated), "images": len(images)}
    wants_real = bool(fid_inception or fid_features or faces or topiq_fr)
    if wants_real and real is None:
        raise ValueError("FID/KID, TOPIQ-FR and face identity compare with real images: pass --real DIR")
    if real is not None and not wants_real:
        raise ValueError("--real given but no metric uses it: add --fid-inception-weights, --fid-features, "
                         "--topiq-fr-weights or --faces")
    reference = read_images(real) if wants_real else []
    if fid_inception or fid_features:
        extractor, space = fid_extractor(fid_inception, fid_features)
        m = fid_and_kid_of_images(reference, images, extractor)
        out.update(fid=m["fid"], kid=m["kid"], kid_std=m["kid_std"], fid_images=m["images"],
                   fid_reliable=m["fid_reliable"], fid_feature_space=space)
    if clip_weights:
        if prompts is None:
            raise ValueError(f"{generated}: the CLIP score needs each image's prompt (prompts.json from freezeasguard "
                             "generate, or metadata.jsonl with file_name and text)")
        scores = clip_scores(images, prompts, *load_clip(clip_weights))
        out.update(clip_score=sum(scores) / len(scores))
    if faces:
        out.update(face_identity(images, reference))
    if topiq_fr:
        scores = topiq_fr_scores(images, [reference[k % len(reference)] for k in range(len(images))],
                                 load_topiq_fr(topiq_fr))
        out.update(topiq_fr=sum(scores) / len(scores))
    if len(out) == 2:
        raise ValueError("no metric asked for: pass --fid-inception-weights, --fid-features, --clip-weights, "
                         "--topiq-fr-weights or --faces")
    return out
