"""Getting the judges: shipped for the default cast, trained (about a minute) and cached otherwise."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from freezeasguard.models.pipelines import load_model
from freezeasguard.synthetic import JUDGES, TINY_SD
from freezeasguard.synthetic.classifiers import Judge, train_attribute_classifier, train_recogniser, train_trait_judge
from freezeasguard.synthetic.world import WORLD_VERSION

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


def _shipped_vae():
    return load_model(TINY_SD).vae


# The world's version is in every judge's file name: a judge of another world's renders is never reused.
def recogniser_file(cast_seed: int = 0, cast_size: int = 8) -> str:
    return f"recogniser-w{WORLD_VERSION}-cast{cast_seed}-{cast_size}.safetensors"


def trait_judge_file() -> str:
    return f"traits-w{WORLD_VERSION}.safetensors"


def attribute_judge_file(domain: str) -> str:
    return f"attributes-w{WORLD_VERSION}-{domain}.safetensors"


def recogniser(cast_seed: int = 0, cast_size: int = 8) -> Judge:
    """Trained on sharp renders, blurred copies and copies passed through the shipped pipeline's
    VAE (what generated images can look like)."""
    return _get(recogniser_file(cast_seed, cast_size), lambda: train_recogniser(cast_seed, cast_size, vae=_shipped_vae()))


def trait_judge() -> Judge:
    """Reads face shape, skin, hair style, hair colour and mark of any person."""
    return _get(trait_judge_file(), lambda: train_trait_judge(vae=_shipped_vae()))


def attribute_judge(domain: str) -> Judge:
    return _get(attribute_judge_file(domain), lambda: train_attribute_classifier(domain, vae=_shipped_vae()))
