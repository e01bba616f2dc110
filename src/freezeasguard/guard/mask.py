"""The mask artifact: which denoiser tensors are frozen, keyed by parameter name.

A mask is a safetensors file holding, per parameter name, the learned logit
(``logits/<name>``) and the frozen flag (``frozen/<name>``), plus JSON metadata: names, shapes,
numel, target and achieved ratios (tensor and parameter), the learning hyperparameters, the
package version and a fingerprint of the base model it was made for.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from freezeasguard.models.families import FAMILIES, family_from_names
from freezeasguard.io import atomic_save_safetensors
from freezeasguard.models.pipelines import fingerprint
from freezeasguard.version import __version__

logger = logging.getLogger(__name__)

BUDGETS = ("tensors", "params")


class MaskError(ValueError):
    """A mask that cannot be used with the model at hand; the message says what differs."""


def check_ratio(ratio: float, flag: str = "--ratio") -> float:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{flag} {ratio}: a freezing ratio is a share of the denoiser, between 0 and 1 "
                         f"(0.3 freezes 30%).")
    return float(ratio)


SELECTIONS = ("greedy", "knapsack")


def select_frozen(scores: torch.Tensor, numel: list[int], ratio: float, budget: str = "tensors",
                  selection: str = "greedy", values: torch.Tensor | None = None) -> torch.Tensor:
    """Freeze the highest-scoring tensors up to ``ratio``.

    budget="tensors": exactly round(ratio * N) tensors (the paper counts tensors).
    budget="params", selection="greedy": walk tensors from the highest score and take each one
    that still fits under round(ratio * P) parameters, so the frozen parameter count is at most
    the target and short of it by less than the size of any tensor left unfrozen.
    budget="params", selection="knapsack": the set of largest total ``values`` (default: the
    scores shifted to start at 0) within round(ratio * P) parameters (knapsack_select): value per
    parameter decides, not the raw score, so one large tensor does not take the budget of many
    small ones worth more together."""
    check_ratio(ratio)
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r}: use one of {BUDGETS}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r}: use one of {SELECTIONS}")
    n = scores.numel()
    # stable descending order: ties go to the earlier tensor, so selection is deterministic
    order = torch.sort(scores.double(), descending=True, stable=True).indices.tolist()
    frozen = torch.zeros(n, dtype=torch.bool)
    if budget == "tensors":
        frozen[order[:round(ratio * n)]] = True
        return frozen
    target = round(ratio * sum(numel))
    if selection == "knapsack":
        if values is None:
            values = scores.double() - scores.double().min()
        return knapsack_select(values, numel, target)
    total = 0
    for i in order:
        if total + numel[i] <= target:
            frozen[i] = True
            total += numel[i]
        if total == target:
            break
    return frozen


def knapsack_select(values: torch.Tensor, numel: list[int], capacity: int, resolution: int = 20_000) -> torch.Tensor:
    """0/1 knapsack: the tensors of largest total value whose sizes sum to at most ``capacity``,
    by dynamic programming over the capacity. Exact when capacity <= ``resolution``; above it,
    sizes are counted in units of ceil(capacity / resolution) parameters, rounded up (so the
    budget is never exceeded, and at most one unit per chosen tensor is left unspent); then the
    budget left is filled greedily by value per parameter. Ties keep the earlier tensor.
    Time and memory O(N * resolution): the tiny UNet's 684 tensors took 0.015 s."""
    v = values.double().cpu().numpy()
    n = len(numel)
    chosen = torch.zeros(n, dtype=torch.bool)
    if capacity <= 0 or n == 0:
        return chosen
    unit = max(1, -(-capacity // resolution))
    cap = capacity // unit
    weights = [-(-int(k) // unit) for k in numel]
    best = np.zeros(cap + 1)
    take = np.zeros((n, cap + 1), dtype=bool)
    for i in range(n):
        w = weights[i]
        if v[i] <= 0 or w > cap:
            continue
        candidate = best[:cap + 1 - w] + v[i]
        better = candidate > best[w:]
        take[i, w:] = better
        best[w:] = np.where(better, candidate, best[w:])
    c = cap
    for i in range(n - 1, -1, -1):
        if take[i, c]:
            chosen[i] = True
            c -= weights[i]
    used = sum(k for k, f in zip(numel, chosen.tolist()) if f)
    # what the rounding left: fill it with the best value per parameter that still fits
    for i in sorted(range(n), key=lambda i: -v[i] / max(1, numel[i])):
        if not chosen[i] and v[i] > 0 and used + numel[i] <= capacity:
            chosen[i] = True
            used += numel[i]
    return chosen


def tensor_kind(name: str) -> str:
    """weight, bias or norm (norm layers' weights and biases are counted as norm)."""
    parts = name.split(".")
    if len(parts) >= 2 and "norm" in parts[-2]:
        return "norm"
    return "bias" if name.endswith("bias") else "weight"


def block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


@dataclass
class Mask:
    names: list[str]
    shapes: list[tuple[int, ...]]
    logits: torch.Tensor          # float32 (N,)
    frozen: torch.Tensor          # bool (N,)
    base_fingerprint: dict
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.names)
        if len(self.shapes) != n or self.logits.numel() != n or self.frozen.numel() != n:
            raise MaskError("mask fields disagree in length")
        self.logits = self.logits.detach().float().cpu()
        self.frozen = self.frozen.detach().bool().cpu()

    # ---- sizes -------------------------------------------------------------------------
    @property
    def numel(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def frozen_names(self) -> list[str]:
        return [n for n, f in zip(self.names, self.frozen.tolist()) if f]

    @property
    def tensor_ratio(self) -> float:
        return float(self.frozen.float().mean()) if self.names else 0.0

    @property
    def param_fraction(self) -> float:
        numel = torch.tensor(self.numel, dtype=torch.float64)
        return float((numel * self.frozen).sum() / numel.sum()) if self.names else 0.0

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_scores(cls, named_params, scores: torch.Tensor, ratio: float, budget: str = "tensors",
                    base_fingerprint: dict | None = None, meta: dict | None = None, selection: str = "greedy",
                    values: torch.Tensor | None = None) -> "Mask":

        named_params = list(named_params)
        names = [n for n, _ in named_params]
        shapes = [tuple(p.shape) for _, p in named_params]
        numel = [p.numel() for _, p in named_params]
        frozen = select_frozen(scores, numel, ratio, budget, selection, values)
        mask = cls(names, shapes, scores.float(), frozen,
                   base_fingerprint or fingerprint(named_params), dict(meta or {}))
        mask.meta.update(target_ratio=ratio, budget=budget, selection=selection if budget == "params" else "top-k",
                         achieved_tensor_ratio=mask.tensor_ratio,
                         achieved_param_fraction=mask.param_fraction)
        return mask

    @classmethod
    def random(cls, named_params, ratio: float, seed: int, budget: str = "tensors", **kw) -> "Mask":
        """Random-rho: a seeded random ranking, then exactly k tensors (or the parameter budget)."""
        named_params = list(named_params)
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(len(named_params), generator=g)
        return cls.from_scores(named_params, scores, ratio, budget,
                               meta={"method": "random", "seed": seed}, **kw)

    @classmethod
    def none(cls, named_params, **kw) -> "Mask":
        named_params = list(named_params)
        return cls.from_scores(named_params, torch.zeros(len(named_params)), 0.0,
                               meta={"method": "full"}, **kw)

    # ---- checks ------------------------------------------------------------------------
    def check_matches(self, named_tensors, fingerprint_: dict | None = None, what: str = "the model",
                      state_dict: bool = False):
        """Refuse a model whose names, shapes or weights differ from the mask's base model.
        ``state_dict``: the tensors are a saved state, which also holds persistent buffers (SD3's
        positional table) that no mask names; extra names are then allowed, missing ones never."""
        shapes = {n: tuple(t.shape) for n, t in named_tensors}
        names_differ = (not set(self.names) <= set(shapes)) if state_dict else set(shapes) != set(self.names)
        if names_differ:
            made_for, given = family_from_names(self.names), family_from_names(shapes)
            if made_for and given and made_for != given:
                raise MaskError(f"this mask was made for a {made_for} model ({FAMILIES[made_for].summary}), and "
                                f"{what} is a {given} model ({FAMILIES[given].summary}). A mask belongs to the base "
                                f"model it was learned on; learn one for this model.")
            known = set(self.names)
            missing = [n for n in self.names if n not in shapes]
            extra = [n for n in shapes if n not in known]
            raise MaskError(f"this mask was made for another model: {len(self.names)} tensors in the mask, "
                            f"{len(shapes)} in {what}; {len(missing)} of the mask's tensors are missing "
                            f"(first: {missing[:3]}), {len(extra)} unknown ones are present (first: {extra[:3]}).")
        bad = [(n, s, shapes[n]) for n, s in zip(self.names, self.shapes) if tuple(s) != shapes[n]]
        if bad:
            n, s, t = bad[0]
            raise MaskError(f"this mask was made for another model: {len(bad)} tensors differ in shape "
                            f"(first: {n} is {list(s)} in the mask, {list(t)} in {what}).")
        if fingerprint_ is not None and self.base_fingerprint:
            if fingerprint_.get("weights_hash") != self.base_fingerprint.get("weights_hash"):
                raise MaskError(f"{what} has the mask's names and shapes but other weights "
                                f"(weights hash {fingerprint_.get('weights_hash')} vs "
                                f"{self.base_fingerprint.get('weights_hash')} recorded in the mask). A mask is "
                                f"learned for one base model; pass that model, or learn a mask for this one.")

    # ---- persistence -------------------------------------------------------------------
    def save(self, path) -> Path:
        tensors = OrderedDict()
        for i, name in enumerate(self.names):
            tensors[f"logits/{name}"] = self.logits[i].clone()
            tensors[f"frozen/{name}"] = self.frozen[i].to(torch.uint8).clone()
        header = {
            "format": "freezeasguard-mask/1",
            "version": __version__,
            "names": self.names,
            "shapes": [list(s) for s in self.shapes],
            "numel": self.numel,
            "num_frozen": int(self.frozen.sum()),
            "achieved_tensor_ratio": self.tensor_ratio,
            "achieved_param_fraction": self.param_fraction,
            "base_fingerprint": self.base_fingerprint,
            "meta": self.meta,
        }
        return atomic_save_safetensors(tensors, path, {"freezeasguard": json.dumps(header)})

    @classmethod
    def load(cls, path) -> "Mask":

        path = Path(path)
        if not path.is_file():
            raise MaskError(f"{path}: no such mask file. Make one with `freezeasguard learn ... --out {path}`.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["freezeasguard"])
                names = header["names"]
                logits = torch.stack([f.get_tensor(f"logits/{n}") for n in names])
                frozen = torch.stack([f.get_tensor(f"frozen/{n}") for n in names]).bool()
        except (KeyError, json.JSONDecodeError) as exc:
            raise MaskError(f"{path}: not a freezeasguard mask (missing {exc}).") from exc
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise MaskError(f"{path}: unreadable mask file ({exc}).") from exc
        return cls(names, [tuple(s) for s in header["shapes"]], logits, frozen, header["base_fingerprint"],
                   header.get("meta", {}))

    # ---- use ---------------------------------------------------------------------------
    def apply(self, model) -> list[str]:
        """Set requires_grad False on frozen tensors (True elsewhere); returns the frozen names."""
        named = list(model.named_parameters())
        self.check_matches(named)
        frozen = set(self.frozen_names)
        for name, p in named:         # by name: the mask's order need not be the model's
            p.requires_grad_(name not in frozen)
        return self.frozen_names

    def export_names(self) -> str:
        return "\n".join(self.frozen_names) + ("\n" if self.frozen_names else "")

    def export_regex(self) -> str:
        """A regex matching exactly the frozen parameter names (re.fullmatch)."""
        if not self.frozen_names:
            return "(?!)"
        return "^(?:" + "|".join(re.escape(n) for n in self.frozen_names) + ")$"

    def summary(self) -> dict:
        kinds_total = Counter(tensor_kind(n) for n in self.names)
        kinds_frozen = Counter(tensor_kind(n) for n in self.frozen_names)
        blocks_total = Counter(block_of(n) for n in self.names)
        blocks_frozen = Counter(block_of(n) for n in self.frozen_names)
        return {
            "tensors": len(self.names), "frozen_tensors": int(self.frozen.sum()),
            "tensor_ratio": self.tensor_ratio, "param_fraction": self.param_fraction,
            "target_ratio": self.meta.get("target_ratio"), "budget": self.meta.get("budget"),
            "method": self.meta.get("method"),
            "by_kind": {k: [kinds_frozen.get(k, 0), v] for k, v in kinds_total.items()},
            "by_block": {k: [blocks_frozen.get(k, 0), v] for k, v in blocks_total.items()},
        }

    def plot(self, path) -> Path:
        """Figure 16-style: one column per tensor in model order, frozen ones marked, colored by
        kind, with the learned logits above and block boundaries drawn."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {"weight": "tab:blue", "bias": "tab:orange", "norm": "tab:green"}
        kinds = [tensor_kind(n) for n in self.names]
        x = list(range(len(self.names)))
        fig, (ax_l, ax_m) = plt.subplots(2, 1, figsize=(12, 4.5), sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1]})
        ax_l.scatter(x, self.logits.tolist(), s=4, c=[colors[k] for k in kinds])
        ax_l.set_ylabel("logit w")
        for kind, color in colors.items():
            xs = [i for i in x if kinds[i] == kind and self.frozen[i]]
            ax_m.bar(xs, [1] * len(xs), width=1.0, color=color, label=f"{kind} ({len(xs)} frozen)")
        blocks = [block_of(n) for n in self.names]
        for i in range(1, len(blocks)):
            if blocks[i] != blocks[i - 1]:
                for ax in (ax_l, ax_m):
                    ax.axvline(i - 0.5, color="0.8", lw=0.5)
        ax_m.set_yticks([])
        ax_m.set_xlabel("denoiser tensor index (model order)")
        ax_m.legend(loc="upper right", fontsize=7, ncol=3)
        ax_l.set_title(f"frozen tensors: {int(self.frozen.sum())}/{len(self.names)} "
                       f"({self.tensor_ratio:.1%} of tensors, {self.param_fraction:.1%} of parameters)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
