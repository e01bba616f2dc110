"""Sharded guarded fine-tuning (``finetune --shard`` under ``accelerate launch`` / torchrun): the
denoiser's weights, gradients and optimizer state split across the processes with PyTorch's FSDP2
(``fully_shard`` on each block, then on the whole model), for models whose fine-tuning does not
fit one device (FLUX.1: 177 GB of AdamW state and weights before activations).

FSDP2 keeps each parameter's requires_grad, so frozen tensors stay frozen and get no gradient and
no optimizer state; after training the full weights are gathered and checked bit for bit like an
unsharded run's. Each rank's share of the batch is weighted so that the gradients' sum over ranks
is the global batch's gradient (batches.py), so reduce-scatter sums instead of averaging.

Mid-run checkpoints of a sharded run are one safetensors file per rank holding that rank's shards
(weights, optimizer state, theta_d) and an index naming the step whose files are all complete;
nothing is gathered, so a checkpoint costs each rank its own share of the state, and a resume
needs the same number of processes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from freezeasguard.training import dist
from freezeasguard.io import atomic_save_safetensors, atomic_write_json
from freezeasguard.models.pipelines import load_denoiser


def shardable_blocks(denoiser) -> list[torch.nn.Module]:
    """The units FSDP gathers one at a time: a UNet's down/mid/up blocks, a transformer's blocks
    (Z-Image's: its refiners' and main layers)."""
    blocks: list[torch.nn.Module] = []
    for attr in ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks",
                 "noise_refiner", "context_refiner", "layers"):
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
    # torch.distributed.tensor is imported by sharding (fully_shard) and only then can a tensor be a
    # DTensor; importing it for this test cost every command ~0.5 s of its start
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(p, module.DTensor)


def local(t):
    """This rank's shard of a sharded tensor, the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full_state(denoiser) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (a collective: all ranks must call it)."""
    return {n: (p.full_tensor() if is_sharded(p) else p).detach().cpu().contiguous()
            for n, p in denoiser.named_parameters()}


def shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's shard of ``full`` as ``param`` is sharded (``full`` itself for a plain tensor).
    Every rank holds the same ``full``, so each takes its slice without communication."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def plain_copy(model_dir, gathered: dict[str, torch.Tensor]):
    """An unsharded copy of the base model's denoiser holding the gathered weights (its buffers,
    which no one trains, from the base): what gets saved."""
    denoiser = load_denoiser(model_dir)
    denoiser.load_state_dict(gathered, strict=False)
    return denoiser


def index_file(path: Path) -> Path:
    """The index of a sharded checkpoint ``path``: which step's rank files are complete."""
    return path.with_name(path.stem + ".shards.json")


def rank_file(path: Path, step: int, rank: int, world: int) -> Path:
    return path.with_name(f"{path.stem}.step{step}.rank{rank}-of-{world}.safetensors")


def _index(path: Path) -> dict | None:
    f = index_file(path)
    return json.loads(f.read_text()) if f.exists() else None


def save_checkpoint(path, tensors: dict, step: int, sharded: bool, metadata: dict | None = None) -> None:
    """Unsharded: one file, written by the main process (every rank holds the same state).
    Sharded: every rank writes its own file, then (after all have) the main process points the
    index at this step, and each rank removes its file of the step before. A kill at any moment
    leaves the index naming a complete set. Every rank must call this."""
    path = Path(path)
    if not sharded:
        if dist.is_main():
            atomic_save_safetensors(tensors, path, metadata)
        return
    rank, world = dist.rank(), dist.world_size()
    before = _index(path)                     # read before the main process can move it
    atomic_save_safetensors(tensors, rank_file(path, step, rank, world), metadata)
    dist.barrier()
    if dist.is_main():
        atomic_write_json(index_file(path), {"step": step, "world_size": world,
                                             "files": [rank_file(path, step, r, world).name for r in range(world)]})
    dist.barrier()
    if before and before["step"] != step:
        rank_file(path, before["step"], rank, before["world_size"]).unlink(missing_ok=True)


def checkpoint_exists(path, sharded: bool) -> bool:
    """Whether ``path`` holds a checkpoint this run can resume; one written by a run sharded over
    another number of processes (or by an unsharded run, or vice versa) is an error naming how
    to resume it."""
    path = Path(path)
    index = _index(path)
    if index is not None and (not sharded or index["world_size"] != dist.world_size()):
        n = index["world_size"]
        raise ValueError(f"{path.parent} holds a checkpoint of a run sharded over {n} processes (--shard); resume "
                         f"it the same way: accelerate launch --num_processes {n} ... --shard --resume")
    if sharded and path.exists():
        raise ValueError(f"{path} is the checkpoint of an unsharded run; resume it without --shard")
    return index is not None if sharded else path.exists()


def load_checkpoint(path, sharded: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's tensors of the checkpoint ``path`` and its metadata (see save_checkpoint)."""
    path = Path(path)
    if sharded:
        index = _index(path)
        path = rank_file(path, index["step"], dist.rank(), index["world_size"])
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
