"""What each mask of a paper-protocol run froze, by kind of tensor, and what that leaves a LoRA
forger: the reason a mask at 30% of the parameters can stop a rank-32 LoRA and not a full
fine-tune is where those parameters sit, which the forgery rates alone do not show.

Per run and method: tensors frozen (of the UNet's), the parameter share, the attention projection
weights frozen (the modules a LoRA recipe adapts by default), the convolution weights frozen and
their parameter share, and the LoRA modules the lora-32 recipe finds trainable under the mask
(the project's own `attacker_targets`, as the runner's LoRA forger calls it).

    python experiments/mask_anatomy.py runs/paper/guard-k5-cast1-clothes-s0 ...

Writes experiments/results/paper-mask-anatomy/<run>.json for each run (the masks themselves stay
under runs/, which does not outlive the machine) and anatomy.md from every JSON there."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusers import UNet2DConditionModel

from freezeasguard.guard.mask import Mask, tensor_kind
from freezeasguard.io import atomic_write_json, atomic_write_text
from freezeasguard.methods import method_label
from freezeasguard.synthetic import TINY_SD
from freezeasguard.training.lora import LoraSettings, NoAllowedModules, attacker_targets, is_default_target

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "paper-mask-anatomy"
KINDS = ("attention projection", "convolution", "other linear", "norm", "bias")


def kind_of(name: str, shape: tuple[int, ...]) -> str:
    """The kind of one denoiser tensor: norms and biases first (tensor_kind's rule), then weights
    by role: attention projections (what LoRA recipes adapt), convolutions (4-d), other linears."""
    kind = tensor_kind(name)
    if kind != "weight":
        return kind
    if is_default_target(name.removesuffix(".weight")):
        return "attention projection"
    return "convolution" if len(shape) == 4 else "other linear"


def anatomy(mask: Mask, denoiser) -> dict:
    """Frozen/total tensors and parameters per kind, and the LoRA forger's trainable modules."""
    kinds = {k: {"tensors": [0, 0], "params": [0, 0]} for k in KINDS}
    for name, shape, numel, frozen in zip(mask.names, mask.shapes, mask.numel, mask.frozen.tolist()):
        entry = kinds[kind_of(name, tuple(shape))]
        entry["tensors"][1] += 1
        entry["params"][1] += numel
        if frozen:
            entry["tensors"][0] += 1
            entry["params"][0] += numel
    try:
        lora_modules = len(attacker_targets(denoiser, mask, LoraSettings(rank=32))[0])
    except NoAllowedModules:
        lora_modules = 0
    return {"tensors": [len(mask.frozen_names), len(mask.names)], "param_fraction": mask.param_fraction,
            "by_kind": kinds, "lora_modules": lora_modules}


def run_anatomy(run: Path, denoiser) -> dict:
    """Every mask a run's protections wrote (protect/<method>/mask-<ratio>.safetensors)."""
    config = run / "config.json"
    budget = json.loads(config.read_text()).get("budget", "tensors") if config.exists() else "tensors"
    out = {}
    for path in sorted(run.glob("protect/*/mask-*.safetensors")):
        method, ratio = path.parent.name, float(path.stem.removeprefix("mask-"))
        out[f"{method}@{ratio}"] = {"method": method, "ratio": ratio, "budget": budget,
                                    **anatomy(Mask.load(path), denoiser)}
    return out


def table(runs: dict[str, dict]) -> list[str]:
    lines = ["| run | method | tensors frozen | params frozen | attention projections frozen | "
             "convolution weights frozen (their params) | LoRA-32 modules left |", "|---" * 7 + "|"]
    for run, masks in sorted(runs.items()):
        for entry in masks.values():
            att, conv = entry["by_kind"]["attention projection"], entry["by_kind"]["convolution"]
            share = conv["params"][0] / conv["params"][1] if conv["params"][1] else 0.0
            lines.append(f"| {run} | {method_label(entry['method'], entry['ratio'], entry['budget'])} | "
                         f"{entry['tensors'][0]} of {entry['tensors'][1]} | {entry['param_fraction']:.1%} | "
                         f"{att['tensors'][0]} of {att['tensors'][1]} | {conv['tensors'][0]} of "
                         f"{conv['tensors'][1]} ({share:.0%}) | {entry['lora_modules']} of {att['tensors'][1]} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run folders (runs/paper/<name>) whose masks to read")
    args = ap.parse_args(argv)
    denoiser = UNet2DConditionModel.from_pretrained(TINY_SD / "unet")
    OUT.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        if not run.is_dir():
            print(f"{run}: no such run folder", file=sys.stderr)
            return 2
        masks = run_anatomy(run, denoiser)
        if masks:
            atomic_write_json(OUT / f"{run.name}.json", masks)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    lines = ["What each mask froze (the shipped tiny UNet, 684 tensors; LoRA-32: the attention projections a "
             "rank-32 LoRA forger finds trainable under the mask).", "", *table(runs)]
    atomic_write_text(OUT / "anatomy.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
