"""Model presets: what SD v1.4 / v1.5 / v2.1 are, and the paper's settings for them (Appendix F).

``--preset sd15`` checks that the --model folder is that model (resolution, prediction type,
text width) before hours of work start, and supplies the paper's settings for every flag the
user did not type: mask learning (batch 16, user lr 1e-5, T 0.2), illegal-user fine-tuning
(Adam lr 1e-5, batch 4, 2,000 steps), generation (PNDM, 50 steps).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .models import require_pipeline_dir

# The paper's settings (Appendix F), the same for every SD model it used; keyed by each command's
# settings-dataclass field, so that a preset's value is what the command runs with.
PAPER_SETTINGS = {
    "learn": {"mask_batch": 16, "user_lr": 1e-5, "temperature": 0.2},        # LearnConfig
    "finetune": {"lr": 1e-5, "batch_size": 4, "steps": 2000},                # FinetuneConfig (the illegal user)
    "generate": {"steps": 50},                                               # PNDM steps
}


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int               # image side the UNet was trained at
    prediction_type: str          # the scheduler's target: epsilon | v_prediction
    cross_attention_dim: int      # text encoder width: 768 (CLIP ViT-L, v1) or 1024 (OpenCLIP ViT-H, v2)
    settings: dict = field(default_factory=lambda: PAPER_SETTINGS)   # command -> {field: value}


PRESETS = {
    "sd14": Preset("sd14", 512, "epsilon", 768),
    "sd15": Preset("sd15", 512, "epsilon", 768),
    "sd21": Preset("sd21", 768, "v_prediction", 1024),
    "sd21-base": Preset("sd21-base", 512, "epsilon", 1024),
}


def apply_preset(preset: "Preset", command: str, args, defaults: dict) -> None:
    """The preset's settings for ``command`` replace every flag the user left at its default
    (``defaults``: flag dest -> the parser's default); a flag the user typed wins."""
    for name, value in preset.settings.get(command, {}).items():
        if getattr(args, name) == defaults[name]:
            setattr(args, name, value)


class PresetError(ValueError):
    """The model folder is not the model the preset describes."""


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PresetError(f"--preset {name!r}: unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def check_model(preset: Preset, model_dir) -> None:
    """Compare the folder's configs with the preset; raise PresetError naming each mismatch."""

    path = require_pipeline_dir(model_dir)
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    found = {
        "resolution": int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "cross_attention_dim": int(unet["cross_attention_dim"]),
    }
    wrong = [f"{k} {v} (preset {preset.name}: {getattr(preset, k)})" for k, v in found.items()
             if v != getattr(preset, k)]
    if wrong:
        fits = [p.name for p in PRESETS.values() if all(getattr(p, k) == v for k, v in found.items())]
        hint = f"it looks like {' or '.join(fits)}" if fits else "no preset fits; drop --preset"
        raise PresetError(f"--model {Path(model_dir)} is not {preset.name}: " + "; ".join(wrong) + f". {hint}.")
