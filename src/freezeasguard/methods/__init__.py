"""Protection methods behind one registry: FreezeAsGuard and the baselines it is compared with.

A method turns (base model, illegal data, innocent data, settings) into a :class:`Protection`:
a modified base model, a mask to enforce in fine-tuning, a random freezing ratio, or nothing
(full fine-tuning). Methods chain with "+": in ``uce+learned`` the UCE-edited model is the base
on which the mask is learned, and the illegal user fine-tunes that edited model under the mask.

Adding a method is one small module that calls :func:`register`. Registered here:

=========  ===============================================================  ============
name       what it produces                                                 uses ratio
=========  ===============================================================  ============
full       nothing: every tensor trainable (the unprotected baseline)       no
random     a random mask of rho (drawn per fine-tuning seed)                yes
learned    FreezeAsGuard's learned mask (bilevel mask learning)             yes
saliency   a mask of the tensors with the largest illegal-loss gradients     yes
uce        a base model whose cross-attention maps the subjects' names       no
           onto a guide concept (closed-form edit, Gandikota et al. 2024)
imma       a base model whose cross-attention resists adaptation to the      no
           illegal data (bilevel immunisation, Zheng & Yeh 2024)
=========  ===============================================================  ============
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..mask import Mask

logger = logging.getLogger(__name__)


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ProtectSettings:
    """Settings of the protection methods (the experiment config extends this; every field can be
    set in its YAML file and, for ``freezeasguard protect``, on the command line)."""
    # learned (FreezeAsGuard mask learning; see LearnConfig for their meaning)
    warm_start_steps: int = _setting(100, "learned: full fine-tuning steps giving theta_ft before mask learning")
    warm_start_lr: float = _setting(1e-4, "learned: AdamW learning rate of the warm start")
    mask_steps: int = _setting(30, "learned: mask updates (K)")
    inner_steps: int = _setting(5, "learned: simulated-user steps per mask update (L)")
    upper_batches: int = _setting(1, "learned: batches averaged into each mask gradient")
    mask_batch: int = _setting(4, "learned, saliency: samples per step and domain group")
    user_lr: float = _setting(1e-4, "learned: the simulated user's SGD step")
    mask_lr: float | None = _setting(None, "learned: logit step (None: 0.05 for the normalised gradient)")
    sparsity_weight: float = _setting(5.0, "learned: weight c of the sparsity term")
    budget: str = _setting("tensors", "what rho counts for random/learned/saliency: tensors | params")
    # saliency
    saliency_batches: int = _setting(8, "illegal (and innocent) batches whose gradients are summed")
    saliency_innocent_weight: float = _setting(0.0, "score = |g_illegal| - weight * |g_innocent|")
    saliency_normalize: bool = _setting(False, "rank by gradient RMS (norm / sqrt(numel)) instead of norm")
    # uce
    uce_guide: str = _setting("a person", "what the erased names are mapped onto")
    uce_erase_scale: float = _setting(1.0, "weight of the erase terms (eta_e)")
    uce_preserve_scale: float = _setting(1.0, "weight of the preserve terms (eta_p)")
    uce_lambda: float = _setting(0.5, "pull towards the original weights")
    uce_preserve_prompts: int = _setting(64, "innocent captions kept unchanged (the first N, deduplicated)")
    # imma
    imma_steps: int = _setting(50, "outer (immunisation) updates")
    imma_inner_steps: int = _setting(3, "simulated adaptation steps per outer update")
    imma_inner_lr: float = _setting(1e-3, "adaptation step (Adam on the adapter)")
    imma_lr: float = _setting(1e-5, "outer step (Adam ascent on the base weights)")
    imma_adapter: str = _setting("lora", "lora | full: what the simulated attacker trains")
    imma_rank: int = _setting(4, "LoRA rank")
    imma_targets: str = _setting(r"attn2\.to_[kv]$", "regex over module names: the immunised (and adapted) layers")
    imma_batch: int = _setting(4, "samples per IMMA step")
    imma_preserve_weight: float = _setting(0.0, "ours: + weight * innocent loss in the outer step (paper: 0)")

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


@dataclass
class Protection:
    """What the illegal (and innocent) user fine-tunes: ``model`` (None: the input model) with
    ``mask`` enforced, or a random mask of ``random_ratio`` drawn per fine-tuning seed, or neither
    (full fine-tuning)."""
    model: Path | None = None
    mask: Mask | None = None
    random_ratio: float | None = None

    def finetune_kwargs(self) -> dict:
        if self.mask is not None:
            return {"mask": self.mask}
        if self.random_ratio is not None:
            return {"random_ratio": self.random_ratio}
        return {"full": True}

    def to_json(self, mask_path: Path | None) -> dict:
        return {"model": str(self.model) if self.model else None, "mask": str(mask_path) if mask_path else None,
                "random_ratio": self.random_ratio}

    @classmethod
    def from_json(cls, d: dict) -> "Protection":
        return cls(Path(d["model"]) if d["model"] else None, Mask.load(d["mask"]) if d["mask"] else None,
                   d["random_ratio"])


@dataclass
class Method:
    name: str
    fn: Callable[[MethodInputs], Protection]
    uses_ratio: bool
    summary: str


METHODS: dict[str, Method] = {}


def data_mix(paths, components, schedule, batch: int, seed: int, device):
    """One DomainMix over data folders, equal weight each: the batches a method's losses draw."""
    from ..batches import Domain, DomainMix
    from ..data import EncodedData, load_image_captions
    domains = [Domain(str(p), EncodedData(load_image_captions(p), components, device), batch, 1.0 / len(paths))
               for p in paths]
    return DomainMix(domains, schedule, seed)


def register(name: str, uses_ratio: bool, summary: str):
    def deco(fn):
        METHODS[name] = Method(name, fn, uses_ratio, summary)
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
    if sum(m.uses_ratio for m in chain) > 1:
        raise ValueError(f"{spec}: at most one freezing method (random, learned, saliency) per chain")
    if "full" in names and len(names) > 1:
        raise ValueError(f"{spec}: 'full' means no protection and does not chain")
    return chain


def chain_uses_ratio(spec: str) -> bool:
    return any(m.uses_ratio for m in parse_chain(spec))


def protect(spec: str, model: Path, illegal: Path, innocent: list[Path], subjects: list[str], ratio: float,
            work_root: Path, settings: ProtectSettings | None = None, device: str = "auto") -> Protection:
    """Run a method or a chain; each link's output is cached in work_root/<chain prefix>/ and a
    finished link is reused (methods that do not use the ratio are shared across ratios)."""
    settings = settings or ProtectSettings()
    current = Path(model)
    result = Protection()
    prefix = []
    for method in parse_chain(spec):
        prefix.append(method.name)
        work = Path(work_root) / "+".join(prefix)
        marker = work / (f"done-{ratio:g}.json" if method.uses_ratio else "done.json")
        if marker.exists():
            step = Protection.from_json(json.loads(marker.read_text()))
        else:
            step = method.fn(MethodInputs(current, Path(illegal), [Path(p) for p in innocent], list(subjects),
                                          ratio, work, settings, device))
            mask_path = None
            if step.mask is not None:
                mask_path = work / f"mask-{ratio:g}.safetensors"
                step.mask.save(mask_path)
            from ..io import atomic_write_json
            atomic_write_json(marker, step.to_json(mask_path))
        if step.model is not None:
            current = step.model
            result.model = step.model
        if step.mask is not None or step.random_ratio is not None:
            result.mask, result.random_ratio = step.mask, step.random_ratio
    return result


# importing the modules registers their methods
from . import basic, imma, saliency, uce  # noqa: E402,F401
