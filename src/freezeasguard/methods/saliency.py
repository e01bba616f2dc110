"""Gradient-saliency freezing: a cheap baseline between Random-rho and FreezeAsGuard.

In the spirit of SalUn (Fan et al., ICLR 2024), but per tensor: freeze the rho tensors whose
illegal-domain loss gradient (or, with the identity objective, the gradient of what the
name adds to the loss) is largest (summed over a few batches at the base weights),
optionally minus a weight times the innocent gradient, so tensors that innocent users need are
spared. One look at the gradient, no bilevel simulation of the user: what it cannot see is
which tensors the user's *fine-tuning* would move, which is what the learned mask measures.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from freezeasguard.training.batches import objective_loss, weighted_loss
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
from freezeasguard.methods.registry import MethodInputs, Protection, data_mix, draw_seed, load_base, register


def tensor_scores(illegal_norms: torch.Tensor, innocent_norms: torch.Tensor | None, numel: list[int],
                  innocent_weight: float, normalize: bool) -> torch.Tensor:
    """score_i = |g_ill,i| - w |g_inn,i|, each norm divided by sqrt(numel_i) when ``normalize``."""
    scale = torch.tensor(numel, dtype=torch.float64).sqrt() if normalize else torch.ones(len(numel), dtype=torch.float64)
    scores = illegal_norms.double() / scale
    if innocent_norms is not None and innocent_weight:
        scores = scores - innocent_weight * innocent_norms.double() / scale
    return scores


def gradient_norms(denoiser, mix, schedule, batches: int, device, loss_fn=weighted_loss) -> torch.Tensor:
    """Per-tensor norm of the gradient of ``loss_fn`` (the plain loss, or the identity objective)
    summed over ``batches`` draws of ``mix``."""

    params = [p for _, p in denoiser.named_parameters()]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    for _ in range(batches):
        loss, _ = loss_fn(denoiser, mix.draw(device), schedule)
        (loss / batches).backward()
    norms = torch.stack([p.grad.detach().norm() if p.grad is not None else torch.zeros((), device=p.device)
                         for p in params]).cpu()
    for p in params:
        p.grad = None
    return norms


@register("saliency", uses_ratio=True, summary="freeze the tensors with the largest illegal-loss gradient")
def saliency(inputs: MethodInputs) -> Protection:
    return _saliency(inputs, inputs.settings.objective)


@register("saliency-identity", uses_ratio=True,
          summary="saliency of the identity objective: the largest gradient of what the name adds")
def saliency_identity(inputs: MethodInputs) -> Protection:
    return _saliency(inputs, "identity")


def _saliency(inputs: MethodInputs, objective: str) -> Protection:
    s = replace(inputs.settings, objective=objective)
    comps, schedule, device = load_base(inputs)
    named = list(comps.denoiser.named_parameters())
    base_fp = fingerprint(load_denoiser_state(inputs.model).items())

    identity = s.objective == "identity"

    def norms(paths, seed, class_phrase, illegal_domains):
        mix = data_mix(paths, comps, schedule, s.mask_batch, seed, device, class_phrase if identity else None)
        return gradient_norms(comps.denoiser, mix, schedule, s.saliency_batches, device,
                              objective_loss(s.objective, illegal_domains))

    ill = norms([inputs.illegal], draw_seed(s, 0), s.identity_class, (0,))
    inn = (norms(inputs.innocent, draw_seed(s, 1), s.innocent_identity_class, ())
           if s.saliency_innocent_weight and inputs.innocent else None)
    scores = tensor_scores(ill, inn, [p.numel() for _, p in named], s.saliency_innocent_weight, s.saliency_normalize)
    mask = Mask.from_scores(named, scores.float(), inputs.ratio, s.budget, base_fingerprint=base_fp,
                            meta={"method": "saliency", "objective": s.objective, "batches": s.saliency_batches,
                                  "innocent_weight": s.saliency_innocent_weight, "normalize": s.saliency_normalize})
    mask.plot(inputs.work_dir / f"saliency-{inputs.ratio:g}.png")
    return Protection(mask=mask)
