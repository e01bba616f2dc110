"""Data-parallel helpers that are no-ops in a single process (``accelerate launch`` sets up the
process group; mask learning and fine-tuning sum gradients across ranks before their updates)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env():
    """Join the process group that ``accelerate launch`` / torchrun describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from accelerate import PartialState
        PartialState()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        dist.broadcast(t, src=src)
    return t


def barrier():
    if world_size() > 1:
        dist.barrier()
