"""Sharded guarded fine-tuning (``finetune --shard`` under ``accelerate launch`` / torchrun): the
denoiser's weights, gradients and optimizer state split across the processes with PyTorch's FSDP2
(``fully_shard`` on each block, then on the whole model), for models whose fine-tuning does not
fit one device (FLUX.1: 177 GB of AdamW state and weights before activations).

FSDP2 keeps each parameter's requires_grad, so frozen tensors stay frozen and get no gradient and
no optimizer state; after training the full weights are gathered and checked bit for bit like an
unsharded run's. Each rank's share of the batch is weighted so that the gradients' sum over ranks
is the global batch's gradient (batches.py), so reduce-scatter sums instead of averaging.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from .models import load_denoiser


def shardable_blocks(denoiser) -> list[torch.nn.Module]:
    """The units FSDP gathers one at a time: a UNet's down/mid/up blocks, a transformer's blocks."""
    blocks: list[torch.nn.Module] = []
    for attr in ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks"):
        blocks += list(getattr(denoiser, attr, None) or [])
    if getattr(denoiser, "mid_block", None) is not None:
        blocks.append(denoiser.mid_block)
    return blocks


def shard_denoiser(denoiser) -> None:
    from torch.distributed.fsdp import fully_shard

    units = shardable_blocks(denoiser)
    for block in units:
        fully_shard(block)
    fully_shard(denoiser)
    for module in [*units, denoiser]:
        module.set_force_sum_reduction_for_comms(True)    # plain SUM: gloo (CPU) has no pre-multiplied sum
        module.set_gradient_divide_factor(1.0)


def is_sharded(p) -> bool:
    return isinstance(p, DTensor)


def local(t):
    """This rank's shard of a sharded tensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_state(denoiser) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (a collective: all ranks must call it)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for n, p in denoiser.named_parameters()}


def shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of ``full`` as ``param`` is sharded (``full`` itself for a plain tensor).
    Every rank holds the same ``full``, so each takes its slice without communication."""
    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def plain_copy(model_dir, gathered: dict[str, torch.Tensor]):
    """An unsharded copy of the base model's denoiser holding the gathered weights (its buffers,
    which no one trains, from the base): what gets saved."""
    denoiser = load_denoiser(model_dir)
    denoiser.load_state_dict(gathered, strict=False)
    return denoiser
