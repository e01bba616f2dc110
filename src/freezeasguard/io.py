"""Atomic file writes: a kill or a full disk never leaves a half-written file in place."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files; a written file gets the permissions any new file gets (umask)
    os.chmod(tmp, 0o666 & ~_umask())
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


def normal_permissions(folder) -> None:
    """Give every file under ``folder`` (all written by this process) the permissions a new file
    gets under the umask: diffusers' save_pretrained leaves its weight files 0600."""
    mode = 0o666 & ~_umask()
    for p in Path(folder).rglob("*"):
        if p.is_file():
            os.chmod(p, mode)


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:

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


def load_weights_strictly(model, path, flag: str, what: str, how_to_get: str, ignore_unexpected=()):
    """Load a local .safetensors file into ``model``: every key must be there with its shape, or
    the error names ``flag``, the missing/unexpected/misshaped keys and ``how_to_get`` the file.
    BatchNorm's num_batches_tracked may be absent (bookkeeping some exports drop); keys starting
    with one of ``ignore_unexpected`` (heads the model does not use) are skipped."""

    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no file there. {how_to_get} Nothing is downloaded.")
    if path.suffix != ".safetensors":
        raise ValueError(f"{flag} {path}: only .safetensors is read (pickled checkpoints can run code); convert it "
                         "with: freezeasguard convert-weights IN.pth OUT.safetensors")
    state = load_file(path)
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(tuple(ignore_unexpected)))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{flag} {path}: not {what} ({len(missing)} missing keys, e.g. {missing[:3]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(wrong)} of the wrong shape, "
                         f"e.g. {wrong[:3]}). {how_to_get}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model
