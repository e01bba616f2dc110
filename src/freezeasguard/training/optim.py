"""The fine-tuning optimizer and its resumable state: which optimizer (AdamW, SGD, Adafactor,
Prodigy) over the trainable tensors only, and the checkpoint that makes a resume bit-exact
whatever the optimizer (shared by guarded fine-tuning and mask learning's warm start)."""
from __future__ import annotations


import torch

from freezeasguard.training.shard import is_sharded, local

OPTIMIZERS = ("adamw", "sgd", "adafactor", "prodigy")


def build_optimizer(denoiser, cfg) -> torch.optim.Optimizer:
    """The chosen optimizer over trainable tensors only: frozen tensors appear in no param group."""
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("every denoiser tensor is frozen; nothing to fine-tune")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor     # transformers comes with peft; seconds to import
        # a fixed learning rate, not scaled by each tensor's RMS: cfg.lr means what it means for AdamW
        return Adafactor(trainable, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Fused AdamW updates all tensors in one kernel (CUDA, and CPU since torch 2.4). On the tiny
    # UNet's 684 tensors at one CPU thread the default per-tensor loop takes 70 ms a step, fused
    # 16 ms, a tenth of a demo fine-tune step saved (benchmarks/bench_optimizer.py).
    fused = all(p.dtype.is_floating_point and p.device.type in ("cuda", "cpu") and not is_sharded(p)
                for p in trainable)
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def checkpoint_tensors(denoiser, optimizer, mix, step: int, scaler=None) -> dict:
    """Trainable weights, the optimizer's state (per tensor, and the numbers some optimizers keep
    per group, such as Prodigy's step-size estimate), the data order and the step: a resume is
    bit-exact whatever the optimizer. Of a sharded model, this rank's shards only ("#shard" marks
    optimizer state kept as shards of a parameter-shaped tensor)."""
    names = {p: n for n, p in denoiser.named_parameters()}
    tensors = {f"param/{n}": local(p).detach() for n, p in denoiser.named_parameters() if p.requires_grad}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            # "@" marks a Python number (Adafactor counts steps in an int): restored as one
            if is_sharded(v):
                tensors[f"opt/{names[p]}/{k}#shard"] = local(v).detach()
            else:
                tensors[f"opt/{names[p]}/{k}" if torch.is_tensor(v) else f"opt/{names[p]}/{k}@"] = \
                    v if torch.is_tensor(v) else torch.tensor(v)
    for i, group in enumerate(optimizer.param_groups):
        for k, v in group.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tensors[f"optgroup/{i}/{k}"] = torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)
    tensors.update({f"mix/{k}": v for k, v in mix.state_dict().items()})
    tensors["step"] = torch.tensor([step])
    if scaler is not None:
        tensors["scaler/scale"] = torch.tensor([scaler.get_scale()])
    return tensors


def _restored(key: str, value: torch.Tensor, p):
    if key.endswith("@"):
        return value.item()
    if key.endswith("#shard"):            # a shard of a parameter-shaped state: rebuilt as p is sharded
        full = torch.zeros_like(p)
        with torch.no_grad():
            local(full).copy_(value)
        return full
    return value if key == "step" else value.to(p.device)


def restore_checkpoint(state: dict[str, torch.Tensor], denoiser, optimizer, mix) -> int:
    """Put back what checkpoint_tensors saved (this rank's shards, for a sharded model); returns the step."""
    params = dict(denoiser.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("param/"):
                local(params[key[6:]]).copy_(value)
    for p in optimizer.param_groups[0]["params"]:
        name = next(n for n, q in params.items() if q is p)
        entries = {k.rsplit("/", 1)[1]: v for k, v in state.items() if k.startswith(f"opt/{name}/")}
        if entries:
            optimizer.state[p] = {k.removesuffix("@").removesuffix("#shard"): _restored(k, v, p)
                                  for k, v in entries.items()}
    for key, value in state.items():
        if key.startswith("optgroup/"):
            _, i, k = key.split("/", 2)
            optimizer.param_groups[int(i)][k] = value.item()
    mix.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mix/")})
    return int(state["step"][0])
