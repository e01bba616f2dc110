"""IMMA: immunising a text-to-image model against malicious adaptation (Zheng & Yeh, ECCV 2024).

Written from the paper's formulation only (the authors' code is licensed for review and was not
read). IMMA is a bilevel problem: the base weights theta are chosen so that the loss on the
illegal data *after* an attacker adapts the model stays high,

    max_theta  L_illegal(theta, phi*(theta)),   phi*(theta) = argmin_phi L_illegal(theta, phi),

where phi is the attacker's adaptation (LoRA or a full update of the same layers). Each outer
update here: a fresh adapter phi = 0 (LoRA: B = 0), ``inner_steps`` Adam steps on phi against
the illegal loss (the simulated attack), then one Adam *ascent* step on theta of the illegal
loss at the adapted point. The gradient is first-order: phi* is held fixed when differentiating
in theta (no unrolling through the inner steps). theta = the cross-attention key and value
projections by default, the layers the paper immunises. ``imma_preserve_weight`` > 0 adds the
innocent loss at theta (without adapter) to the outer objective; the paper has no such term (0).
"""
from __future__ import annotations

import logging
import re

import torch
from tqdm.auto import tqdm

from freezeasguard.training.batches import weighted_loss
from freezeasguard.training.train import save_pipeline
from freezeasguard.io import atomic_write_json
from freezeasguard.methods.registry import MethodInputs, Protection, data_mix, draw_seed, load_base, register
from freezeasguard.guard.attackers import Adapter

logger = logging.getLogger(__name__)


def target_modules(denoiser, pattern: str) -> dict[str, torch.nn.Linear]:
    regex = re.compile(pattern)
    found = {n: m for n, m in denoiser.named_modules() if regex.search(n) and isinstance(m, torch.nn.Linear)}
    if not found:
        raise ValueError(f"imma_targets {pattern!r} matches no Linear module of the UNet")
    return found


def adapt(denoiser, modules, draw_loss, steps: int, lr: float, kind: str, rank: int, seed: int) -> Adapter:
    """The simulated attack: ``steps`` Adam steps on a fresh adapter; returns it still attached."""
    adapter = Adapter(modules, kind, rank, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(adapter.parameters(), lr=lr)
    for _ in range(steps):
        loss = draw_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return adapter


def adapted_loss(denoiser, modules, draw_loss, eval_loss, steps: int, lr: float, kind: str = "lora", rank: int = 4,
                 seed: int = 0) -> float:
    """Illegal loss after an attacker's ``steps`` adaptation steps (the quantity IMMA raises)."""
    requires = [p.requires_grad for p in denoiser.parameters()]
    denoiser.requires_grad_(False)
    adapter = adapt(denoiser, modules, draw_loss, steps, lr, kind, rank, seed)
    with torch.no_grad():
        value = float(eval_loss())
    adapter.remove()
    for p, r in zip(denoiser.parameters(), requires):
        p.requires_grad_(r)
    return value


def immunize(denoiser, modules, draw_illegal, draw_innocent, steps: int, inner_steps: int, inner_lr: float, lr: float,
             kind: str = "lora", rank: int = 4, preserve_weight: float = 0.0, seed: int = 0) -> list[dict]:
    """IMMA's outer loop, in place on the target modules' weights; returns the per-step history."""
    if preserve_weight and draw_innocent is None:
        raise ValueError("imma_preserve_weight > 0 needs innocent data")
    denoiser.requires_grad_(False)
    theta = [m.weight for m in modules.values()]
    opt = torch.optim.Adam(theta, lr=lr)
    history = []
    for step in tqdm(range(steps), desc="IMMA"):
        for w in theta:
            w.requires_grad_(False)        # the attack trains the adapter only
        adapter = adapt(denoiser, modules, draw_illegal, inner_steps, inner_lr, kind, rank, seed * 100003 + step)
        for w in theta:
            w.requires_grad_(True)
        for t in adapter.parameters():
            t.requires_grad_(False)        # first-order: phi* held fixed in the outer gradient
        ill = draw_illegal()
        adapter.remove()
        objective = -ill
        inn = None
        if preserve_weight:
            inn = draw_innocent()
            objective = objective + preserve_weight * inn
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        history.append({"step": step + 1, "adapted_illegal_loss": float(ill.detach()),
                        "innocent_loss": None if inn is None else float(inn)})
    for w in theta:
        w.requires_grad_(False)
    return history


@register("imma", uses_ratio=False, summary="IMMA: cross-attention immunised against adaptation to the illegal data")
def imma(inputs: MethodInputs) -> Protection:
    s = inputs.settings
    comps, schedule, device = load_base(inputs)
    comps.denoiser.train()

    def loss_of(paths, seed):
        mix = data_mix(paths, comps, schedule, s.imma_batch, seed, device)
        return lambda: weighted_loss(comps.denoiser, mix.draw(device), schedule)[0]

    modules = target_modules(comps.denoiser, s.imma_targets)
    history = immunize(comps.denoiser, modules, loss_of([inputs.illegal], draw_seed(s, 0)),
                       loss_of(inputs.innocent, draw_seed(s, 1)) if inputs.innocent else None,
                       s.imma_steps, s.imma_inner_steps, s.imma_inner_lr, s.imma_lr, s.imma_adapter, s.imma_rank,
                       s.imma_preserve_weight, seed=s.protection_seed)
    out = inputs.work_dir / "model"
    atomic_write_json(inputs.work_dir / "imma_history.json", history)
    save_pipeline(inputs.model, comps.denoiser.cpu(), out,
                  {"scheme": "imma", "targets": s.imma_targets, "immunised_modules": len(modules),
                   "steps": s.imma_steps, "inner_steps": s.imma_inner_steps, "adapter": s.imma_adapter,
                   "final_adapted_illegal_loss": history[-1]["adapted_illegal_loss"] if history else None})
    return Protection(model=out)
