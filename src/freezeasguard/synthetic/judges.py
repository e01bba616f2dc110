"""Getting the judges: shipped for the default cast, trained (about a minute) and cached otherwise."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from . import JUDGES
from .classifiers import Judge, train_attribute_classifier, train_recogniser

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("FREEZEASGUARD_CACHE", Path.home() / ".cache" / "freezeasguard")) / "judges"


def _get(filename: str, train) -> Judge:
    for folder in (JUDGES, cache_dir()):
        if (folder / filename).exists():
            return Judge.load(folder / filename)
    logger.info("training %s (cached in %s)", filename, cache_dir())
    judge = train()
    judge.save(cache_dir() / filename)
    return judge


def recogniser(cast_seed: int = 0, cast_size: int = 8) -> Judge:
    """Trained on sharp renders, blurred copies and copies passed through the shipped pipeline's
    VAE (what generated images can look like); "v2" in the name keeps older caches out."""
    def train():
        from ..models import load_sd
        from . import TINY_SD
        return train_recogniser(cast_seed, cast_size, vae=load_sd(TINY_SD).vae)
    return _get(f"recogniser-v2-cast{cast_seed}-{cast_size}.safetensors", train)


def attribute_judge(domain: str) -> Judge:
    return _get(f"attributes-{domain}.safetensors", lambda: train_attribute_classifier(domain))
