"""full, random, largest and smallest (data-free controls) and learned (FreezeAsGuard)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from freezeasguard.guard.learn import LearnConfig, learn_mask
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state, load_model
from freezeasguard.settings import copy_fields
from freezeasguard.methods.registry import MethodInputs, Protection, register


@register("full", uses_ratio=False, summary="no protection: full fine-tuning")
def full(inputs: MethodInputs) -> Protection:
    return Protection()


@register("random", uses_ratio=True, summary="Random-rho: a random mask, drawn per fine-tuning seed")
def random_mask(inputs: MethodInputs) -> Protection:
    return Protection(random_ratio=inputs.ratio, budget=inputs.settings.budget)


@register("largest", uses_ratio=True, summary="the largest tensors up to the budget (a data-free control)")
def largest(inputs: MethodInputs) -> Protection:
    """Gradient-based rankings (saliency, and the learned mask's data term <g, theta_d>) grow with
    a tensor's size; this mask is that size bias alone. A method that does no better than it at
    the same budget has learned nothing from the data."""
    return _by_size(inputs, sign=1.0, method="largest")


@register("smallest", uses_ratio=True, summary="the smallest tensors up to the budget (a data-free control)")
def smallest(inputs: MethodInputs) -> Protection:
    """Under a parameter budget, the most tensors the budget buys: every bias and norm first. A
    learned mask that spends its budget on many small tensors (a knapsack over soft masks does)
    must do better than this to have learned anything."""
    return _by_size(inputs, sign=-1.0, method="smallest")


def _by_size(inputs: MethodInputs, sign: float, method: str) -> Protection:
    named = list(load_model(inputs.model).denoiser.named_parameters())
    scores = sign * torch.tensor([float(t.numel()) for _, t in named])
    # ties (many tensors share a size) broken by position, deterministically
    scores = scores + torch.linspace(0, 0.5, len(named))
    mask = Mask.from_scores(named, scores, inputs.ratio, inputs.settings.budget,
                            base_fingerprint=fingerprint(load_denoiser_state(inputs.model).items()),
                            meta={"method": method})
    return Protection(mask=mask)


@register("learned", uses_ratio=True, summary="FreezeAsGuard: the mask learned by bilevel optimisation")
def learned(inputs: MethodInputs) -> Protection:
    return _learned(inputs, inputs.settings.objective)


@register("learned-identity", uses_ratio=True,
          summary="FreezeAsGuard with the identity objective (what the name adds, not the whole photo)")
def learned_identity(inputs: MethodInputs) -> Protection:
    return _learned(inputs, "identity")


def _learned(inputs: MethodInputs, objective: str) -> Protection:
    cfg = copy_fields(LearnConfig, inputs.settings, ratio=inputs.ratio, seed=inputs.settings.protection_seed,
                      device=inputs.device, objective=objective)
    # the warm start (theta_ft) depends on the base model and data only, so every ratio shares it
    path = inputs.work_dir / f"learned-{inputs.ratio:g}.safetensors"
    result = learn_mask(inputs.model, inputs.illegal, inputs.innocent, path, cfg,
                        work_dir=inputs.work_dir / f"learned-{inputs.ratio:g}.work", resume=True,
                        warm_start_dir=shared_warm_start(inputs))
    result.mask.plot(inputs.work_dir / f"learned-{inputs.ratio:g}.png")
    return Protection(mask=result.mask)


def shared_warm_start(inputs: MethodInputs) -> Path:
    """Where the warm start (theta_ft) of this base model and data lives: beside the methods' own
    folders, so that both objectives (learned, learned-identity) and every ratio share one. The
    runner makes a learner's masks in one process (protection_groups), so none is made twice at once."""
    parts = [Path(inputs.model).resolve(), inputs.illegal, *inputs.innocent]
    if inputs.settings.protection_seed:        # another seed, another warm start (seed 0 keeps its old name)
        parts.append(f"protection_seed {inputs.settings.protection_seed}")
    key = hashlib.blake2b("\n".join(map(str, parts)).encode(), digest_size=6).hexdigest()
    return inputs.work_dir.parent / f"warm-start-{key}"
