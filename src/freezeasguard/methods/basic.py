"""full, random and learned (FreezeAsGuard)."""
from __future__ import annotations

import torch

from . import MethodInputs, Protection, register


@register("full", uses_ratio=False, summary="no protection: full fine-tuning")
def full(inputs: MethodInputs) -> Protection:
    return Protection()


@register("random", uses_ratio=True, summary="Random-rho: a random mask, drawn per fine-tuning seed")
def random_mask(inputs: MethodInputs) -> Protection:
    return Protection(random_ratio=inputs.ratio)


@register("learned", uses_ratio=True, summary="FreezeAsGuard: the mask learned by bilevel optimisation")
def learned(inputs: MethodInputs) -> Protection:
    from ..learn import LearnConfig, learn_mask

    s = inputs.settings
    cfg = LearnConfig(ratio=inputs.ratio, budget=s.budget, steps=s.mask_steps, inner_steps=s.inner_steps,
                      upper_batches=s.upper_batches, batch_size=s.mask_batch, user_lr=s.user_lr, mask_lr=s.mask_lr,
                      sparsity_weight=s.sparsity_weight, warm_start_steps=s.warm_start_steps,
                      warm_start_lr=s.warm_start_lr, warm_start_batch_size=s.mask_batch, seed=0,
                      device=inputs.device if inputs.device != "auto" or torch.cuda.is_available() else "cpu")
    # the warm start (theta_ft) depends on the base model only, so every ratio shares it
    warm = inputs.work_dir / "warm-start"
    path = inputs.work_dir / f"learned-{inputs.ratio:g}.safetensors"
    result = learn_mask(inputs.model, inputs.illegal, inputs.innocent, path, cfg,
                        finetuned_dir=warm if (warm / "unet" / "config.json").exists() else None,
                        work_dir=inputs.work_dir / f"learned-{inputs.ratio:g}.work", resume=True)
    produced = inputs.work_dir / f"learned-{inputs.ratio:g}.work" / "warm_start"
    if not (warm / "unet" / "config.json").exists() and produced.exists():
        produced.rename(warm)
    result.mask.plot(inputs.work_dir / f"learned-{inputs.ratio:g}.png")
    return Protection(mask=result.mask)
