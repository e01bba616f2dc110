"""The held-out loss: a model's diffusion loss on renders of the subject it never trained on."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from freezeasguard.models.generate import load_pipeline
from freezeasguard.models.pipelines import Components, load_model
from freezeasguard.training.batches import Domain, DomainMix, weighted_loss
from freezeasguard.training.data import EncodedData, load_image_captions
from freezeasguard.training.diffusion import NoiseSchedule
from freezeasguard.training.lora import lora_base


HELDOUT_IMAGES = 16


def heldout_data(world, subject, data_root, n: int = HELDOUT_IMAGES) -> Path:
    path = Path(data_root) / (f"heldout-{subject}" + (f"-n{n}" if n != HELDOUT_IMAGES else "")).replace(" ", "_")
    if not (path / "metadata.jsonl").exists():
        world.export(path, "people", n, "eval", [subject])
    return path


def heldout_loss(model_dir, world, subject, seed, data_root, draws: int = 4, pipe=None,
                 images: int = HELDOUT_IMAGES) -> float:
    """Mean diffusion loss of a model on ``images`` held-out renders of the subject, each drawn
    ``draws`` times (fixed noise). ``pipe``: the folder's pipeline when the caller has it loaded
    (a LoRA output's: its base with the adapter); the noise schedule is always the folder's file,
    as training reads it."""
    path = heldout_data(world, subject, data_root, images)
    if pipe is None and lora_base(model_dir) is None:
        comps = load_model(model_dir)
    else:
        comps = Components.from_pipeline(pipe if pipe is not None else load_pipeline(model_dir), model_dir)
        folder = lora_base(model_dir) or Path(model_dir)
        comps.scheduler_config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.for_components(comps)
    data = load_image_captions(path)
    mix = DomainMix([Domain("heldout", EncodedData(data, comps), len(data), 1.0)], schedule, seed=12345)
    comps.denoiser.eval()
    with torch.no_grad():
        return sum(float(weighted_loss(comps.denoiser, mix.draw("cpu"), schedule)[0]) for _ in range(draws)) / draws
