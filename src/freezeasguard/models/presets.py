"""Model presets: what SD v1.4 / v1.5 / v2.1, SDXL, SD3.5, FLUX.1, FLUX.2 [dev], Qwen-Image and Z-Image
are, and the settings to train them.

``--preset sd15`` checks that the --model folder is that model (family, resolution, objective,
text width, latent channels, depth, guidance embedding) before hours of work start, and supplies
the preset's settings for every flag the user did not type. SD 1.x/2.x: the paper's (Appendix F):
mask learning (batch 16, user lr 1e-5, T 0.2), illegal-user fine-tuning (Adam lr 1e-5, batch 4,
2,000 steps), generation (PNDM, 50 steps). The other families: the published settings of the
diffusers training example each family's users start from (cited at each table).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from freezeasguard.training.diffusion import objective
from freezeasguard.models.pipelines import image_side, model_family, require_pipeline_dir

# The paper's settings (Appendix F), the same for every SD model it used; keyed by each command's
# settings-dataclass field, so that a preset's value is what the command runs with.
PAPER_SETTINGS = {
    "learn": {"mask_batch": 16, "user_lr": 1e-5, "temperature": 0.2},        # LearnConfig
    "finetune": {"lr": 1e-5, "batch_size": 4, "steps": 2000},                # FinetuneConfig (the illegal user)
    "generate": {"steps": 50},                                               # sampler steps
}


# The published training settings of the newer families, from the diffusers example each family's
# users start from (batch_size counts samples per optimizer step: train_batch_size 1 x 4 accumulated).
SDXL_SETTINGS = {   # examples/text_to_image/README_sdxl.md (train_text_to_image_sdxl.py)
    "finetune": {"lr": 1e-6, "batch_size": 4, "grad_accum": 4, "steps": 10000, "mixed_precision": "fp16",
                 "gradient_checkpointing": True},
    "learn": {"user_lr": 1e-6, "mixed_precision": "fp16", "gradient_checkpointing": True},
}
SD35_SETTINGS = {   # examples/dreambooth/README_sd3.md (train_dreambooth_sd3.py)
    "finetune": {"lr": 1e-4, "batch_size": 4, "grad_accum": 4, "steps": 500, "mixed_precision": "fp16"},
    "learn": {"user_lr": 1e-4, "mixed_precision": "fp16"},
}
FLUX_SETTINGS = {   # examples/dreambooth/README_flux.md (train_dreambooth_flux.py: Prodigy at lr 1.0)
    "finetune": {"optimizer": "prodigy", "lr": 1.0, "batch_size": 4, "grad_accum": 4, "steps": 500,
                 "mixed_precision": "bf16"},
    # not published: mask learning's simulated user takes plain steps, at the lr of diffusers' FLUX LoRA scripts
    "learn": {"user_lr": 1e-4, "mixed_precision": "bf16"},
}

# The families with a language model as text encoder: the commands of diffusers' DreamBooth LoRA
# READMEs for each (train_batch_size 1 x gradient_accumulation_steps 4; 500 steps). FLUX.2's runs
# --do_fp8_training, which has no CPU/fp32 counterpart here: bf16 autocast is the nearest.
FLUX2_SETTINGS = {  # examples/dreambooth/README_flux2.md (train_dreambooth_lora_flux2.py, FLUX.2 [dev])
    "finetune": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 4, "grad_accum": 4, "steps": 500,
                 "mixed_precision": "bf16", "gradient_checkpointing": True},
    "learn": {"user_lr": 1e-4, "mixed_precision": "bf16", "gradient_checkpointing": True},
}
QWEN_IMAGE_SETTINGS = {  # examples/dreambooth/README_qwen.md (train_dreambooth_lora_qwen_image.py)
    "finetune": {"lr": 2e-4, "batch_size": 4, "grad_accum": 4, "steps": 500, "mixed_precision": "bf16"},
    "learn": {"user_lr": 2e-4, "mixed_precision": "bf16"},
}
Z_IMAGE_SETTINGS = {  # examples/dreambooth/README_z_image.md (train_dreambooth_lora_z_image.py, Z-Image)
    "finetune": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 4, "grad_accum": 4, "steps": 500,
                 "mixed_precision": "bf16", "gradient_checkpointing": True},
    "learn": {"user_lr": 1e-4, "mixed_precision": "bf16", "gradient_checkpointing": True},
}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str                   # sd | sdxl | sd3 | flux | flux2 | qwenimage | zimage (families/)
    resolution: int               # image side the denoiser was trained at
    prediction_type: str          # the objective: epsilon | v_prediction | flow
    text_width: int               # the denoiser's text width: cross_attention_dim (UNets) or joint_attention_dim
    latent_channels: int = 4      # the VAE's latent channels (16 for SD3, FLUX.1, Qwen-Image, Z-Image; 32 FLUX.2)
    depth: int | None = None      # transformer blocks (num_layers): tells SD3.5 medium from large
    guidance_embeds: bool | None = None   # FLUX.1/2: dev embeds guidance, schnell does not
    settings: dict = field(default_factory=lambda: PAPER_SETTINGS)   # command -> {field: value}


PRESETS = {
    "sd14": Preset("sd14", "sd", 512, "epsilon", 768),
    "sd15": Preset("sd15", "sd", 512, "epsilon", 768),
    "sd21": Preset("sd21", "sd", 768, "v_prediction", 1024),
    "sd21-base": Preset("sd21-base", "sd", 512, "epsilon", 1024),
    "sdxl": Preset("sdxl", "sdxl", 1024, "epsilon", 2048, settings=SDXL_SETTINGS),
    "sd35-medium": Preset("sd35-medium", "sd3", 1024, "flow", 4096, 16, depth=24, settings=SD35_SETTINGS),
    "sd35-large": Preset("sd35-large", "sd3", 1024, "flow", 4096, 16, depth=38, settings=SD35_SETTINGS),
    "flux1-dev": Preset("flux1-dev", "flux", 1024, "flow", 4096, 16, depth=19, guidance_embeds=True,
                        settings=FLUX_SETTINGS),
    "flux1-schnell": Preset("flux1-schnell", "flux", 1024, "flow", 4096, 16, depth=19, guidance_embeds=False,
                            settings=FLUX_SETTINGS),
    # text width: Mistral Small 3.1's 5120 x the 3 layers FLUX.2 stacks; Qwen2.5-VL-7B's 3584; Qwen3-4B's 2560
    "flux2-dev": Preset("flux2-dev", "flux2", 1024, "flow", 15360, 32, depth=8, guidance_embeds=True,
                        settings=FLUX2_SETTINGS),
    "qwen-image": Preset("qwen-image", "qwenimage", 1024, "flow", 3584, 16, depth=60, settings=QWEN_IMAGE_SETTINGS),
    "z-image": Preset("z-image", "zimage", 1024, "flow", 2560, 16, depth=30, settings=Z_IMAGE_SETTINGS),
}
CHECKED = ("family", "resolution", "prediction_type", "text_width", "latent_channels", "depth", "guidance_embeds")


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


def describe_folder(model_dir) -> dict:
    """What a pipeline folder is, in the preset's terms, read from its configs (nothing is loaded)."""
    path = require_pipeline_dir(model_dir)
    family = model_family(path)
    den = json.loads((path / family.denoiser_folder / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return {
        "family": family.name,
        "resolution": image_side(den, vae, family.name),
        "prediction_type": objective(sched),
        "text_width": int(den[family.text_width_key]),
        "latent_channels": int(vae.get("latent_channels") or vae.get("z_dim") or 4),   # the VAE's own
        "depth": den.get(family.depth_key) if family.depth_key else None,
        "guidance_embeds": den.get(family.guidance_key) if family.guidance_key else None,
    }


def check_model(preset: Preset, model_dir) -> None:
    """Compare the folder's configs with the preset; raise PresetError naming each mismatch."""
    found = describe_folder(model_dir)
    wrong = [f"{k} {found[k]} (preset {preset.name}: {getattr(preset, k)})" for k in CHECKED
             if found[k] != getattr(preset, k)]
    if wrong:
        fits = [p.name for p in PRESETS.values() if all(getattr(p, k) == found[k] for k in CHECKED)]
        hint = f"it looks like {' or '.join(fits)}" if fits else "no preset fits; drop --preset"
        raise PresetError(f"--model {Path(model_dir)} is not {preset.name}: " + "; ".join(wrong) + f". {hint}.")
