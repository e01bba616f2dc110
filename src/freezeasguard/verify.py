"""Compliance audit: did a fine-tuned checkpoint leave every frozen tensor as the base model has it?

exact mode: each frozen tensor must have the base tensor's dtype and bytes.
tolerance mode: for checkpoints exported in fp16/bf16; each frozen tensor must equal the base
tensor rounded to the candidate's dtype, within ``atol`` (0 by default: rounding is exact).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .mask import Mask
from .models import ModelError, fingerprint, load_denoiser_state

logger = logging.getLogger(__name__)

EXIT_COMPLIANT, EXIT_VIOLATIONS, EXIT_UNUSABLE = 0, 1, 2


@dataclass
class Violation:
    name: str
    reason: str
    max_abs_diff: float | None = None


@dataclass
class VerifyReport:
    compliant: bool
    mode: str
    frozen_checked: int
    violations: list[Violation] = field(default_factory=list)
    trainable_changed: int = 0
    trainable_total: int = 0

    def to_dict(self) -> dict:
        return {"compliant": self.compliant, "mode": self.mode, "frozen_checked": self.frozen_checked,
                "violations": [v.__dict__ for v in self.violations],
                "trainable_changed": self.trainable_changed, "trainable_total": self.trainable_total}


def verify_state(base: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], mask: Mask,
                 mode: str = "exact", atol: float = 0.0, check_base_fingerprint: bool = True) -> VerifyReport:
    if mode not in ("exact", "tolerance"):
        raise ValueError(f"mode {mode!r}: use exact or tolerance")
    mask.check_matches(list(base.items()), fingerprint(base.items()) if check_base_fingerprint else None,
                       what="the base model", state_dict=True)
    violations = []
    frozen = set(mask.frozen_names)
    for name in mask.frozen_names:
        if name not in candidate:
            violations.append(Violation(name, "missing from the candidate"))
            continue
        b, c = base[name], candidate[name]
        if tuple(b.shape) != tuple(c.shape):
            violations.append(Violation(name, f"shape {list(c.shape)}, base has {list(b.shape)}"))
            continue
        if mode == "exact":
            if c.dtype != b.dtype:
                violations.append(Violation(name, f"dtype {c.dtype}, base has {b.dtype}; use --tolerance for "
                                                  f"exports in another precision"))
            elif not torch.equal(c.view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)):
                diff = float((c.double() - b.double()).abs().max())
                violations.append(Violation(name, "bytes differ from the base model", diff))
        else:
            expected = b.to(c.dtype).double()
            diff = float((c.double() - expected).abs().max()) if c.numel() else 0.0
            if not diff <= atol:   # also catches NaN
                violations.append(Violation(name, f"differs from the base rounded to {c.dtype} by {diff:g} "
                                                  f"(> atol {atol:g})", diff))
    unknown = [n for n in candidate if n not in base]
    for n in unknown:
        violations.append(Violation(n, "not a parameter of the base model"))
    trainable = [n for n in mask.names if n not in frozen and n in candidate]
    changed = sum(1 for n in trainable if not torch.equal(candidate[n].double(), base[n].to(candidate[n].dtype).double()))
    return VerifyReport(not violations, mode, len(frozen), violations, changed, len(trainable))


def verify_checkpoint(model_dir, mask_path, candidate, mode: str = "exact", atol: float = 0.0) -> VerifyReport:
    mask = Mask.load(mask_path)
    base = load_denoiser_state(model_dir)
    cand = load_denoiser_state(candidate)
    broken = [n for n, t in cand.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise ModelError(f"{candidate}: {len(broken)} tensors hold inf/NaN (first: {broken[0]}); the checkpoint is "
                         f"unusable (a diverged fine-tune), whatever its frozen tensors hold.")
    report = verify_state(base, cand, mask, mode, atol)
    logger.info("verify: %s (%d frozen tensors checked, %d violations; %d/%d trainable tensors changed)",
                "compliant" if report.compliant else "NOT compliant", report.frozen_checked,
                len(report.violations), report.trainable_changed, report.trainable_total)
    return report
