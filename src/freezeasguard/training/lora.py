"""LoRA under a freezing mask: guarded LoRA fine-tuning and saving adapters.

Guarded LoRA (``freezeasguard finetune --lora-rank R``) puts adapters only on modules whose
parameters are all trainable under the mask; a requested target that the mask freezes is an
error naming it, never silently dropped. The base weights stay untouched (checked after
training), and the adapter is saved in the diffusers/peft format that
``pipeline.load_lora_weights`` reads.

Freezing a tensor does not stop an adapter trained elsewhere from being placed on its module;
the audit of adapter files is verify.verify_adapter.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from freezeasguard.models.families import FAMILIES
from freezeasguard.guard.mask import Mask
from freezeasguard.settings import setting

LORA_FILE = "pytorch_lora_weights.safetensors"      # the name diffusers' save/load_lora_weights use
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # attention projections, as diffusers' LoRA scripts


def is_default_target(module: str) -> bool:
    """Whether a module (by its dotted name) is one a LoRA recipe adapts when it names none."""
    return any(module == t or module.endswith(f".{t}") for t in DEFAULT_TARGETS)


@dataclass
class LoraSettings:
    """A guarded LoRA fine-tune (rank 0: no adapter, full fine-tuning under the mask)."""
    rank: int = setting(0, "train a LoRA of this rank instead of the denoiser's weights (0: no LoRA)", flag="--lora-rank")
    alpha: float | None = setting(None, "LoRA alpha (none: the rank, i.e. scale 1)", flag="--lora-alpha")
    targets: str | None = setting(None, "modules to adapt, by peft's rules: a regex that must match the whole module "
                                        "name, or comma-separated names (a name matches itself and any module ending "
                                        "in .name); none: every attention projection (to_q, to_k, to_v, to_out.0) "
                                        "the mask allows", flag="--lora-targets")


def _peft_matches(spec: str, name: str) -> bool:
    if "," in spec or re.fullmatch(r"[\w.]+", spec):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        return any(name == p or name.endswith(f".{p}") for p in parts)
    return re.fullmatch(spec, name) is not None


def choose_targets(denoiser, mask: Mask, settings: LoraSettings) -> list[str]:
    """The modules to put adapters on: requested (or default) Linear/Conv2d modules, every one
    of them trainable under the mask; a frozen request is an error naming it."""
    frozen = set(mask.frozen_names)
    able = {n: m for n, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    blocked = {n for n, m in able.items() if any(f"{n}.{k}" in frozen for k, _ in m.named_parameters())}
    if settings.targets:
        chosen = [n for n in able if _peft_matches(settings.targets, n)]
        if not chosen:
            raise ValueError(f"--lora-targets {settings.targets!r} matches no Linear/Conv2d module of the UNet "
                             f"(module names look like {next(iter(able))}).")
        refused = [n for n in chosen if n in blocked]
        if refused:
            raise ValueError(f"--lora-targets asks for {len(refused)} modules the mask freezes (first: {refused[0]}); "
                             f"an adapter there would change frozen weights. Leave them out.")
    else:
        chosen = [n for n in able if n not in blocked and is_default_target(n)]
        if not chosen:
            raise ValueError("the mask freezes every attention projection; name other modules with --lora-targets")
    for n in chosen:
        w = able[n].weight
        if settings.rank > min(w.shape[0], w.shape[1]):
            raise ValueError(f"--lora-rank {settings.rank} is larger than module {n} ({w.shape[1]} -> {w.shape[0]}); "
                             f"a rank above min(in, out) adds nothing. Use at most {min(w.shape[0], w.shape[1])}.")
    return chosen


class NoAllowedModules(ValueError):
    """An attacker's LoRA recipe finds no module the mask leaves trainable."""


def attacker_targets(denoiser, mask: Mask, settings: LoraSettings) -> tuple[list[str], LoraSettings]:
    """What an illegal user gets from a LoRA recipe under the mask: the requested (or default)
    modules the mask leaves fully trainable, frozen ones left out rather than refused, and the
    rank capped at the smallest chosen module (a rank-128 recipe on a model whose projections
    are 32 wide is a rank-32 LoRA). NoAllowedModules when nothing is left."""
    frozen = set(mask.frozen_names)
    able = {n: m for n, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    allowed = [n for n, m in able.items() if not any(f"{n}.{k}" in frozen for k, _ in m.named_parameters())]
    if settings.targets:
        chosen = [n for n in allowed if _peft_matches(settings.targets, n)]
    else:
        chosen = [n for n in allowed if is_default_target(n)]
    if not chosen:
        raise NoAllowedModules(f"no module the recipe asks for ({settings.targets or 'attention projections'}) is "
                               f"trainable under the mask")
    cap = min(min(able[n].weight.shape[0], able[n].weight.shape[1]) for n in chosen)
    return chosen, LoraSettings(rank=min(settings.rank, cap), alpha=settings.alpha, targets=settings.targets)


def add_lora(denoiser, targets: list[str], settings: LoraSettings, seed: int = 0) -> None:
    """Freeze every UNet weight and put a fresh LoRA (peft) on exactly ``targets``, its random
    init drawn from ``seed``: peft draws from the global generator, whose state depends on
    whatever ran before in the process, so the same run would otherwise differ by job order."""
    from peft import LoraConfig  # imports transformers (seconds): only guarded LoRA pays for it

    denoiser.requires_grad_(False)
    device = next(denoiser.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        denoiser.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                                    target_modules=list(targets), init_lora_weights=True))
    for name, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in name)


def base_weights_moved(denoiser, base: dict[str, torch.Tensor]) -> list[str]:
    """UNet weights (under their plain names) that differ from the base model's: none, after a LoRA."""
    moved = []
    for name, p in denoiser.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        if not torch.equal(p.detach().cpu(), base[plain].to(p.dtype)):
            moved.append(plain)
    return moved


def lora_base(folder) -> Path | None:
    """The base model of a guarded-LoRA output folder (its manifest says), or None for any other folder."""
    folder = Path(folder)
    manifest = folder / "freezeasguard_manifest.json"
    if not (folder / LORA_FILE).is_file() or not manifest.is_file():
        return None
    return Path(json.loads(manifest.read_text())["base_model"])


def save_lora(denoiser, folder: Path, family: str = "sd") -> Path:
    """The adapter in the diffusers/peft format that the family's pipeline.load_lora_weights reads
    (unet.<module>.lora_A.weight ..., transformer.<module>... for the transformer families), written
    by that pipeline class's own save_lora_weights."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    fam = FAMILIES[family]
    getattr(diffusers, fam.pipeline_classes[0]).save_lora_weights(
        folder, **{f"{fam.denoiser_folder}_lora_layers": get_peft_model_state_dict(denoiser)}, safe_serialization=True)
    return folder / LORA_FILE
