"""full, random, largest and smallest (data-free controls) and learned (FreezeAsGuard)."""
from __future__ import annotations

import torch

from ..learn import LearnConfig, learn_mask
from ..mask import Mask
from ..models import fingerprint, load_denoiser_state, load_model
from ..settings import copy_fields
from .registry import MethodInputs, Protection, register


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
    cfg = copy_fields(LearnConfig, inputs.settings, ratio=inputs.ratio, seed=0, device=inputs.device)
    # the warm start (theta_ft) depends on the base model and data only, so every ratio shares it
    path = inputs.work_dir / f"learned-{inputs.ratio:g}.safetensors"
    result = learn_mask(inputs.model, inputs.illegal, inputs.innocent, path, cfg,
                        work_dir=inputs.work_dir / f"learned-{inputs.ratio:g}.work", resume=True,
                        warm_start_dir=inputs.work_dir / "warm_start")
    result.mask.plot(inputs.work_dir / f"learned-{inputs.ratio:g}.png")
    return Protection(mask=result.mask)
