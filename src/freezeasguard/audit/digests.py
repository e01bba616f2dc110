"""The mask's audit record: a digest of every frozen tensor's bytes, so that a checkpoint can be
audited without the base model.

A hub that audits uploads cannot keep every base model beside its queue, and reading a 24 GB
base for every upload doubles the work. What a frozen tensor must hold is known when the mask is
made: the base's bytes, or (for an export in another precision) the base rounded to fp16 or
bf16, which is deterministic (round to nearest even, as ``tensor.half()`` and every exporter do).
So the record keeps, per frozen tensor, a digest of each; a candidate's tensor matches when its
own digest is the one for its dtype. Shape and dtype are part of what is hashed.
"""
from __future__ import annotations

import hashlib

import blake3
import gguf
import torch

ROUNDINGS = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
# GGUF types whose encoding of a tensor is deterministic (the gguf package's quantizer, which
# city96's convert calls), recorded as the blocks' bytes; K-quants are not (llama.cpp's search)
GGUF_RECORDED = ("Q8_0",)
# /2 records name their hash (BLAKE3 since); /1 records are blake2b and stay readable
RECORD_FORMAT = "freezeasguard-audit/2"
HASHES = ("blake3", "blake2b")


def dtype_name(dtype) -> str:
    """"float16" for torch.float16; a GGUF type's name ("Q8_0") as it is."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def digest(raw, dtype: torch.dtype, shape, algorithm: str = "blake3") -> str:
    """A tensor's identity: its dtype, shape and bytes (128 bits of BLAKE3, or of blake2b for the
    records masks made before BLAKE3)."""
    h = hasher(dtype, shape, algorithm)
    h.update(raw)
    return finish(h)


def hasher(dtype: torch.dtype, shape, algorithm: str = "blake3"):
    """digest() fed piece by piece: update() with the tensor's bytes in order, then finish()."""
    prefix = f"{dtype_name(dtype)}|{list(shape)}|".encode()
    if algorithm == "blake2b":
        return hashlib.blake2b(prefix, digest_size=16)
    if algorithm != "blake3":
        raise ValueError(f"hash {algorithm!r}: the audit record names one of {HASHES}")
    # one thread: the audit runs one tensor per core already, and on 2 cores BLAKE3's own threads
    # took the other's core (SD 1.5 warm: 4.9-5.4 GB/s with one thread, 3.4 with every core)
    return blake3.blake3(prefix, max_threads=1)


def finish(h) -> str:
    return h.hexdigest(length=16) if isinstance(h, blake3.blake3) else h.hexdigest()


def record_hash(record: dict) -> str:
    """The hash an audit record's digests were made with (records before BLAKE3 say nothing: blake2b)."""
    return record.get("hash", "blake2b")


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy of a contiguous CPU tensor)."""
    t = t.detach().cpu().contiguous()
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else b""


def tensor_digests(t: torch.Tensor, algorithm: str = "blake3") -> dict[str, str]:
    """The digest of a base tensor as stored and of its roundings to fp32, fp16, bf16 and fp8
    (e4m3fn, e5m2), and of its GGUF Q8_0 blocks where its rows split into 32s (the blocks of 32
    consecutive values are the same whatever rows the file stores: a fused part or a reshaped
    convolution hashes alike)."""
    dtypes = [t.dtype] + ([d for d in ROUNDINGS if d != t.dtype] if t.is_floating_point() else [])
    out = {dtype_name(d): digest(tensor_bytes(t.to(d)), d, t.shape, algorithm) for d in dtypes}
    if t.is_floating_point() and t.ndim >= 2 and t.shape[-1] % 32 == 0:
        for kind in GGUF_RECORDED:
            blocks = gguf.quants.quantize(t.detach().float().reshape(-1, 32).numpy(), gguf.GGMLQuantizationType[kind])
            out[kind] = digest(blocks.tobytes(), kind, t.shape, algorithm)
    return out


def make_record(digests: dict[str, dict[str, str]], dtypes: dict[str, str], base_names: list[str],
                denoiser_config: dict | None) -> dict:
    """What the mask keeps for a base-free audit: per frozen tensor its stored dtype and digests
    (tensor_digests), the base's other tensor names (buffers a checkpoint may hold), and the
    denoiser's config (which maps single-file checkpoints' names)."""
    return {"format": RECORD_FORMAT, "hash": "blake3", "dtypes": dtypes, "digests": digests,
            "base_names": sorted(base_names), "denoiser_config": denoiser_config}
