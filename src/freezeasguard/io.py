"""Atomic file writes: a kill or a full disk never leaves a half-written file in place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return _atomic(path, write)


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def convert_to_safetensors(src, dst) -> int:
    """A PyTorch checkpoint (.pth/.pt/.bin: a state dict, {"state_dict": ...} or pyiqa's
    {"params": ...}) -> .safetensors.

    Read with ``torch.load(weights_only=True)``: the restricted unpickler builds tensors and plain
    containers only, so a tampered file fails instead of running code. Returns the tensor count."""
    import torch

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    if dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: the output must end in .safetensors")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:     # UnpicklingError and friends: say what it means
        raise ValueError(f"{src}: not a plain tensor checkpoint ({type(exc).__name__}: {str(exc)[:200]}); only state "
                         "dicts of tensors are converted, nothing in the file is executed") from exc
    for wrapper in ("state_dict", "params"):     # {"params": ...}: pyiqa's checkpoints (TOPIQ)
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{src}: expected a dict of tensors (a state dict)")
    atomic_save_safetensors({k: v.clone() for k, v in state.items()}, dst,   # clone: tied tensors cannot share storage in safetensors
                            metadata={"converted_from": src.name})
    return len(state)
