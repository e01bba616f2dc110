"""The protection registry: settings, what a method sees and produces, registration, chains.
(The package's __init__ imports the method modules, which register themselves here.)"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from freezeasguard.training.batches import Domain, DomainMix
from freezeasguard.training.data import EncodedData, load_image_captions
from freezeasguard.training.diffusion import NoiseSchedule
from freezeasguard.training.train import resolve_device
from freezeasguard.audit.verify import record_digests
from freezeasguard.io import atomic_write_json
from freezeasguard.guard.immunise import ImmuniseSettings
from freezeasguard.guard.learn import MaskLearningSettings
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import load_model
from freezeasguard.settings import setting

logger = logging.getLogger(__name__)


@dataclass
class ProtectSettings(MaskLearningSettings, ImmuniseSettings):
    """Settings of the protection methods: mask learning's (inherited, the paper's defaults), the
    immunised release's (inherited) and the baselines'. The experiment config extends this; every field is a key of its YAML file and a
    flag of ``freezeasguard protect``."""
    protection_seed: int = setting(0, "seed of every draw a protection makes (FreezeAsGuard's mask learning and its warm "
                                      "start, Saliency's batches, the immunised release, IMMA): a publisher ships one "
                                      "release, so experiments keep it across their fine-tuning seeds; another value "
                                      "makes another release, to see how much the guard depends on it")
    # saliency
    saliency_batches: int = setting(8, "saliency: illegal (and innocent) batches whose gradients are summed")
    saliency_innocent_weight: float = setting(0.0, "saliency: score = |g_illegal| - weight * |g_innocent|")
    saliency_normalize: bool = setting(False, "saliency: rank by gradient RMS (norm / sqrt(numel)) instead of norm")
    # uce
    uce_guide: str = setting("a person", "uce: what the erased names are mapped onto")
    uce_erase_scale: float = setting(1.0, "uce: weight of the erase terms (eta_e)")
    uce_preserve_scale: float = setting(1.0, "uce: weight of the preserve terms (eta_p)")
    uce_lambda: float = setting(0.5, "uce: pull towards the original weights")
    uce_preserve_prompts: int = setting(64, "uce: innocent captions kept unchanged (the first N, deduplicated)")
    # imma
    imma_steps: int = setting(50, "imma: outer (immunisation) updates")
    imma_inner_steps: int = setting(3, "imma: simulated adaptation steps per outer update")
    imma_inner_lr: float = setting(1e-3, "imma: adaptation step (Adam on the adapter)")
    imma_lr: float = setting(1e-5, "imma: outer step (Adam ascent on the base weights)")
    imma_adapter: str = setting("lora", "imma: what the simulated attacker trains", choices=("lora", "full"))
    imma_rank: int = setting(4, "imma: LoRA rank")
    imma_targets: str = setting(r"attn2\.to_[kv]$", "imma: regex over module names: the immunised (and adapted) "
                                                     "layers")
    imma_batch: int = setting(4, "imma: samples per step")
    imma_preserve_weight: float = setting(0.0, "imma, ours: + weight * innocent loss in the outer step (paper: 0)")


@dataclass
class MethodInputs:
    """What a method sees. ``model`` is the base, or the output of the previous method in a chain."""
    model: Path
    illegal: Path
    innocent: list[Path]
    subjects: list[str]                     # the illegal subjects' names (UCE erases them)
    ratio: float
    work_dir: Path                          # this method's own folder (kept across ratios: warm starts)
    settings: ProtectSettings = field(default_factory=ProtectSettings)
    device: str = "auto"
    mask: Mask | None = None                # the mask an earlier link of the chain chose (immunise needs one)


@dataclass
class Protection:
    """What the illegal (and innocent) user fine-tunes: ``model`` (None: the input model) with
    ``mask`` enforced, or a random mask of ``random_ratio`` drawn per fine-tuning seed, or neither
    (full fine-tuning)."""
    model: Path | None = None
    mask: Mask | None = None
    random_ratio: float | None = None
    budget: str = "tensors"                 # what random_ratio counts: tensors | params

    def finetune_kwargs(self) -> dict:
        if self.mask is not None:
            return {"mask": self.mask}
        if self.random_ratio is not None:
            return {"random_ratio": self.random_ratio, "budget": self.budget}
        return {"full": True}

    def to_json(self, mask_path: Path | None) -> dict:
        return {"model": str(self.model) if self.model else None, "mask": str(mask_path) if mask_path else None,
                "random_ratio": self.random_ratio, "budget": self.budget}

    @classmethod
    def from_json(cls, d: dict) -> "Protection":
        return cls(Path(d["model"]) if d["model"] else None, Mask.load(d["mask"]) if d["mask"] else None,
                   d["random_ratio"], d.get("budget", "tensors"))


@dataclass
class Method:
    name: str
    fn: Callable[[MethodInputs], Protection]
    uses_ratio: bool
    summary: str
    needs_mask: bool = False        # works on the mask of an earlier link (immunise)


METHODS: dict[str, Method] = {}


def draw_seed(settings: ProtectSettings, stream: int) -> int:
    """The seed of a protection's stream-th data stream (0: illegal, 1: innocent) under its
    protection_seed; protection_seed 0 gives the streams 0 and 1 every release drew before it existed."""
    return 2 * settings.protection_seed + stream


def data_mix(paths, components, schedule, batch: int, seed: int, device, class_phrase: str | None = None):
    """One DomainMix over data folders, equal weight each: the batches a method's losses draw
    (with the identity objective's neutral captions where a ``class_phrase`` is given)."""
    domains = [Domain(str(p), EncodedData(load_image_captions(p), components, device, class_phrase), batch,
                      1.0 / len(paths)) for p in paths]
    return DomainMix(domains, schedule, seed)


def load_base(inputs: MethodInputs):
    """The input model on the method's device, and its noise schedule: where every method starts."""
    device = resolve_device(inputs.device)
    comps = load_model(inputs.model).to(device)
    return comps, NoiseSchedule.for_components(comps), device


def register(name: str, uses_ratio: bool, summary: str, needs_mask: bool = False):
    def deco(fn):
        METHODS[name] = Method(name, fn, uses_ratio, summary, needs_mask)
        return fn
    return deco


def parse_chain(spec: str) -> list[Method]:
    """"uce+learned" -> [uce, learned]; at most one method of a chain may produce a mask."""
    names = [n.strip() for n in spec.split("+")]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not all(names):
        raise ValueError(f"unknown method {spec!r}; registered: {', '.join(sorted(METHODS))} "
                         f"(chain them with '+', e.g. uce+learned)")
    chain = [METHODS[n] for n in names]
    needs = [m.name for i, m in enumerate(chain) if m.needs_mask and not any(p.uses_ratio for p in chain[:i])]
    if needs:
        raise ValueError(f"{spec}: {needs[0]} changes the values a mask freezes: chain it after a freezing method "
                         f"(e.g. learned+{needs[0]})")
    if sum(m.uses_ratio for m in chain) > 1:
        raise ValueError(f"{spec}: at most one freezing method (random, learned, saliency, largest, smallest) per chain")
    if "full" in names and len(names) > 1:
        raise ValueError(f"{spec}: 'full' means no protection and does not chain")
    return chain


def chain_uses_ratio(spec: str) -> bool:
    return any(m.uses_ratio for m in parse_chain(spec))


def method_label(method: str, ratio: float, budget: str = "tensors") -> str:
    """Table labels as in the paper: Full FT, Random-30%, FreezeAsGuard-30%, UCE, UCE+FreezeAsGuard-30%;
    a parameter budget reads "Random-30% params"."""
    if method == "pretrained":
        return "Pre-trained (no FT)"
    names = {"full": "Full FT", "random": "Random", "learned": "FreezeAsGuard", "saliency": "Saliency",
             "largest": "Largest", "smallest": "Smallest", "uce": "UCE", "imma": "IMMA",
             "learned-identity": "FreezeAsGuard (identity)", "saliency-identity": "Saliency (identity)",
             "immunise": "immunised"}
    parts = method.split("+")
    label = "+".join(names.get(p, p) for p in parts)
    if not chain_uses_ratio(method):
        return label
    return f"{label}-{ratio:.0%}" + (" params" if budget == "params" else "")


def protect(spec: str, model: Path, illegal: Path, innocent: list[Path], subjects: list[str], ratio: float,
            work_root: Path, settings: ProtectSettings | None = None, device: str = "auto") -> Protection:
    """Run a method or a chain; each link's output is cached in work_root/<chain prefix>/ and a
    finished link is reused (links that neither use the ratio nor follow one that does are shared
    across ratios)."""
    settings = settings or ProtectSettings()
    current = Path(model)
    result = Protection()
    prefix, per_ratio = [], False
    for method in parse_chain(spec):
        prefix.append(method.name)
        per_ratio = per_ratio or method.uses_ratio
        work = Path(work_root) / "+".join(prefix)
        marker = work / (f"done-{ratio:g}.json" if per_ratio else "done.json")
        if marker.exists():
            step = Protection.from_json(json.loads(marker.read_text()))
        else:
            started = time.time()
            step = method.fn(MethodInputs(current, Path(illegal), [Path(p) for p in innocent], list(subjects),
                                          ratio, work, settings, device, result.mask))
            mask_path = None
            if step.mask is not None:
                mask_path = work / f"mask-{ratio:g}.safetensors"
                # the mask alone then audits checkpoints: digests of the model it is enforced on
                step.mask = record_digests(step.mask, step.model or current)
                step.mask.save(mask_path)
            atomic_write_json(marker, {**step.to_json(mask_path), "seconds": round(time.time() - started, 3)})
        if step.model is not None:
            current = step.model
            result.model = step.model
        if step.mask is not None or step.random_ratio is not None:
            result.mask, result.random_ratio, result.budget = step.mask, step.random_ratio, step.budget
    return result


