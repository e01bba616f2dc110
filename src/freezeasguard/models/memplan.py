"""The memory plan: what one replica holds at the peak of each stage, buffer by buffer, from the
denoiser's parameter counts and the activations autograd keeps (counted on the meta device, so a
publisher can plan a 12 B-parameter run on a laptop). fp32 weights and AdamW, as the trainers run
on CPU and by default:

- full fine-tuning (the warm start) and guarded fine-tuning: the weights (4 B/param), AdamW's two
  moments for the trainable parameters (8 B), and, at the peak of the backward pass, whichever is
  larger of the kept activations and the trainable parameters' gradients (4 B): gradients are
  made (``zero_grad(set_to_none=True)``) as the backward pass frees the activations, so the two
  are never all held at once;
- LoRA: the same with the adapter's parameters as the trainable ones;
- mask learning: theta(m) (the denoiser's weights), theta_d and the gradient buffer (4 B each;
  the buffer is kept between steps, so it is held with the activations) plus the activations.

What is not counted: the activations' own gradients in flight during the backward pass (a block's
worth), the allocator's slack, and the process itself (imports): benchmarks/bench_realsize.py
measures them against this plan at the SD v1.5 UNet's real size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FP32 = 4
STAGES = ("warm_start", "mask_learning", "guarded_ft", "lora")


@dataclass(frozen=True)
class StagePlan:
    stage: str
    buffers: dict[str, int] = field(default_factory=dict)     # name -> bytes held at the stage's peak

    @property
    def total(self) -> int:
        return sum(self.buffers.values())


def stage_plan(stage: str, params: int, activations: int = 0, trainable: int | None = None,
               lora_params: int = 0) -> StagePlan:
    """The buffers of ``stage`` (STAGES) for a denoiser of ``params`` parameters of which
    ``trainable`` are trained (guarded fine-tuning), with ``activations`` bytes kept for the
    backward pass and ``lora_params`` adapter parameters (LoRA)."""
    weights = FP32 * params
    if stage == "mask_learning":
        return StagePlan(stage, {"weights": weights, "theta_d": weights, "gradient_buffer": weights,
                                 "activations": activations})
    if stage == "lora":
        return StagePlan(stage, {"weights": weights, "lora_weights": FP32 * lora_params,
                                 "adamw_moments": 2 * FP32 * lora_params,
                                 "activations_or_gradients": max(activations, FP32 * lora_params)})
    if stage in ("warm_start", "guarded_ft"):
        trained = params if stage == "warm_start" or trainable is None else trainable
        return StagePlan(stage, {"weights": weights, "adamw_moments": 2 * FP32 * trained,
                                 "activations_or_gradients": max(activations, FP32 * trained)})
    raise ValueError(f"stage {stage!r}: one of {', '.join(STAGES)}")


class _FlashAttentionKeeps(torch.autograd.Function):
    """What PyTorch's CPU/CUDA flash attention keeps for backward (query, key, value, output and
    the log-sum-exp), with an empty output. On the meta device scaled_dot_product_attention runs
    its math decomposition, which would keep the full attention matrix instead."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):        # never run: the plan only counts
        raise RuntimeError("a planning stand-in; it has no backward")


def _flash_attention_stand_in(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashAttentionKeeps.apply(q, k, v)


def kept_activation_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the non-parameter tensors autograd keeps for the backward pass during ``run()`` (a
    forward with the model's requires_grad flags), each storage once. On the meta device attention
    is counted as the fused kernels keep it, so a meta model gives the real device's count."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t.detach()     # the output itself would make a cycle through its grad_fn that is never freed

    meta = any(p.device.type == "meta" for p in model.parameters())
    attention = F.scaled_dot_product_attention
    if meta:
        F.scaled_dot_product_attention = _flash_attention_stand_in
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
        del out
    finally:
        F.scaled_dot_product_attention = attention
    return sum(kept.values())


def gb(nbytes: float) -> float:
    return nbytes / 2**30
