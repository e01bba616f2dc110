"""Quantized derivatives as hubs receive them: ComfyUI's scaled fp8 checkpoints and GGUF files.

A scaled fp8 file stores a linear layer's weight as float8 (e4m3fn or e5m2) beside a float32
scale, the weight being ``fp8 x scale``. ComfyUI has written two conventions:

- legacy ("scaled_fp8"): a marker tensor ``scaled_fp8`` (its dtype the fp8 type) at the model's
  prefix, ``<layer>.scale_weight`` beside each fp8 ``<layer>.weight``, optionally ``.scale_input``;
- current: ``<layer>.weight_scale`` and ``<layer>.comfy_quant`` (the layer's format as UTF-8 JSON
  bytes, ``{"format": "float8_e4m3fn"}``), optionally ``.input_scale``.

Both quantize a tensor the same way: scale = max|w| / the fp8 type's largest value, then
``(w / scale)`` clamped to that range and cast (round to nearest even). An untouched tensor is
therefore the base quantized with its own scale, bit for bit; that is what a frozen tensor must
hold. A scale far above the exporter's (max|w| / fp8 max) would quantize a tensor away while its
bits still "match", so the scale is checked too. Other formats ComfyUI knows (nvfp4, int8,
block-wise fp8) are refused by name: an audit that cannot read a tensor never certifies it.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import torch

# the aux tensors of the two conventions: never parameters of the model
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
AUX_SUFFIXES = SCALE_SUFFIXES + (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"
FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# the scale may exceed the exporter's max|w| / fp8 max by this factor (an exporter with a margin);
# beyond it, the tensor loses more than one bit of precision to a scale nobody's exporter picks
SCALE_SLACK = 2.0


class QuantizationError(ValueError):
    """A quantized tensor the audit cannot read (an unknown format, a scale of another shape)."""


def is_aux(key: str) -> bool:
    return key.endswith(AUX_SUFFIXES) or key == MARKER or key.endswith("." + MARKER)


def weight_key(aux: str) -> str:
    """The weight an aux tensor belongs to: "x.scale_weight" -> "x.weight"."""
    return aux.rsplit(".", 1)[0] + ".weight"


def read_scales(file_of: dict, read_small) -> dict[str, float]:
    """Weight key -> its float32 scale, for every scaled fp8 weight of a checkpoint (``file_of``:
    key -> its file; ``read_small(key)`` reads a small tensor). Each layer's comfy_quant format is
    checked; a scale of another shape than one value, or a scale beside a weight that is not fp8,
    is a QuantizationError naming the tensor."""
    scales = {}
    for key in file_of:
        if key.endswith(".comfy_quant"):
            raw = bytes(read_small(key).to(torch.uint8).tolist())
            try:
                fmt = json.loads(raw.decode()).get("format")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
                raise QuantizationError(f"{key} is not ComfyUI's layer format record (JSON bytes): {exc}") from exc
            if fmt not in FP8:
                raise QuantizationError(f"{weight_key(key)} is quantized as {fmt!r}, a format the audit does not read "
                                        f"(it reads ComfyUI's per-tensor scaled fp8: {', '.join(FP8)}); audit the "
                                        f"full-precision file instead")
    for key in file_of:
        if not key.endswith(SCALE_SUFFIXES):
            continue
        weight = weight_key(key)
        scale = read_small(key)
        if weight not in file_of:
            raise QuantizationError(f"{key} scales no weight ({weight} is not in the file)")
        if file_of[weight].dtype(weight) not in FP8.values():
            if float(scale.float().reshape(-1)[0]) == 1.0 and scale.numel() == 1:
                continue              # a legacy file's dummy scale beside a weight kept in full precision
            raise QuantizationError(f"{key} scales {weight}, which is stored as {file_of[weight].dtype(weight)}, not fp8")
        if scale.numel() != 1:
            raise QuantizationError(f"{key} has shape {list(scale.shape)}: the audit reads one scale per tensor "
                                    f"(ComfyUI's tensor-wise scaled fp8), not row- or block-wise scales")
        value = float(scale.float().reshape(-1)[0])
        if not value > 0 or value == float("inf"):
            raise QuantizationError(f"{key} is {value}: a scale must be a positive finite number")
        scales[weight] = value
    return scales


def quantize(base: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The base as the exporter stores it: (w / scale) clamped to the fp8 range, rounded to nearest."""
    top = torch.finfo(dtype).max
    return (base.float() / torch.tensor(scale, dtype=torch.float32)).clamp(-top, top).to(dtype)


def exporter_scale(amax: float, dtype: torch.dtype) -> float:
    """max|w| / the fp8 type's largest value: the scale ComfyUI's exporters compute."""
    return float(torch.tensor(amax, dtype=torch.float32) / torch.finfo(dtype).max)


def compare_chunk(candidate: torch.Tensor, base: torch.Tensor, scale: float) -> tuple[bool, float, float]:
    """One chunk of a scaled fp8 tensor against the same elements of the base: whether its bits
    differ from the base quantized at the file's scale, the largest |fp8 x scale - base|, and the
    base's largest magnitude (for the scale check, over the whole tensor)."""
    expected = quantize(base, scale, candidate.dtype)
    differs = not torch.equal(candidate.view(torch.uint8), expected.view(torch.uint8))
    diff = float((candidate.float() * scale - base.float()).abs().max()) if candidate.numel() else 0.0
    amax = float(base.float().abs().max()) if base.numel() else 0.0
    return differs, diff, amax


def scale_problem(scale: float, amax: float, dtype: torch.dtype) -> str | None:
    """Why a frozen tensor's scale is not an exporter's, or None."""
    canonical = exporter_scale(amax, dtype)
    if amax > 0 and scale > SCALE_SLACK * canonical:
        return (f"its fp8 scale {scale:g} is {scale / canonical:.1f}x the exporter's (max|w| / "
                f"{torch.finfo(dtype).max:g} = {canonical:g}): the tensor is quantized away")
    return None


# ---- GGUF (city96's layout; gguf_file.py reads it) -------------------------------------------
# bits per value of each block-quantized type read, and the block the bound is taken over: the
# type's block (32 values) or, for K-quants, its super-block (256), whose own scale and minimum
# are themselves quantized
GGUF_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5,
             "Q6_K": 6}
GGUF_SYMMETRIC = {"Q8_0", "Q4_0", "Q5_0", "Q3_K", "Q6_K"}       # a scale, no minimum: the grid spans ±max|w|


def gguf_block(qtype: str) -> int:
    return 256 if qtype.endswith("_K") else 32


def gguf_bound(base: np.ndarray, qtype: str) -> np.ndarray:
    """Per element, the largest difference a GGUF type's own rounding of ``base`` (rows x columns,
    as stored) allows: one step of a grid of 2^bits values spanning the element's block (its
    max - min, or ±max|w| for the types without a minimum). Round-to-nearest quantizers stay
    within half of it; the rest of it covers K-quants' quantized block scales and minimums."""
    if qtype not in GGUF_BITS:
        raise QuantizationError(f"GGUF type {qtype} is not read (the audit reads {', '.join(GGUF_BITS)} and F32/F16/BF16)")
    block = gguf_block(qtype)
    rows, cols = base.shape
    if cols % block:
        raise QuantizationError(f"a {qtype} tensor's rows of {cols} values do not split into blocks of {block}")
    blocks = base.reshape(rows, cols // block, block).astype(np.float64)
    span = 2 * np.abs(blocks).max(-1) if qtype in GGUF_SYMMETRIC else blocks.max(-1) - blocks.min(-1)
    step = span / (2 ** GGUF_BITS[qtype] - 1)
    return np.repeat(step, block, axis=-1).reshape(rows, cols)


def gguf_reference(base: np.ndarray, qtype: str) -> np.ndarray | None:
    """The base quantized by the gguf package's own quantizer (what city96's convert script calls),
    or None for the types it cannot quantize (K-quants: llama.cpp makes those)."""
    try:
        return gguf.quants.quantize(np.ascontiguousarray(base, dtype=np.float32), gguf.GGMLQuantizationType[qtype])
    except NotImplementedError:
        return None


# rows compared at a time: the temporaries of a 112 MB tensor's comparison would otherwise be
# several times its size (the audit's memory target is 2x the largest tensor + 300 MB)
COMPARE_VALUES = 2**20


def compare_gguf(raw: np.ndarray, base: np.ndarray, qtype: str) -> dict:
    """A GGUF tensor's blocks (``raw``, rows as stored) against the base's same elements: exact
    where the package quantizes the type (the bits must be the base's, quantized so), else within
    gguf_bound of the base. Returns {"exact": bit-for-bit or None, "within_bound", "max_diff",
    "bound", "finite"} (bound: the largest per-element bound, for the report)."""
    kind = gguf.GGMLQuantizationType[qtype]
    step = max(1, COMPARE_VALUES // max(1, base.shape[1]))
    exact, within, max_diff, max_bound = None, True, 0.0, 0.0
    for start in range(0, base.shape[0], step):
        rows, b = raw[start:start + step], base[start:start + step]
        values = gguf.quants.dequantize(rows, kind).reshape(b.shape)
        if not np.isfinite(values).all():
            return {"finite": False}
        bound = gguf_bound(b, qtype)
        diff = np.abs(values.astype(np.float64) - b.astype(np.float64))
        within = within and bool((diff <= bound).all())
        max_diff = max(max_diff, float(diff.max()) if diff.size else 0.0)
        max_bound = max(max_bound, float(bound.max()) if bound.size else 0.0)
        reference = gguf_reference(b, qtype)
        if reference is not None:
            same = bool(np.array_equal(reference.view(np.uint8).reshape(rows.shape), rows))
            exact = same if exact is None else exact and same
    return {"finite": True, "exact": exact, "within_bound": within, "max_diff": max_diff, "bound": max_bound}


def gguf_finite(raw: np.ndarray, qtype: str) -> bool:
    """No inf/NaN in a quantized tensor: in Q8_0 only the blocks' fp16 scales can be non-finite
    (the values are int8), so only they are read; other types are dequantized."""
    if qtype == "Q8_0":
        return bool(np.isfinite(np.ascontiguousarray(raw.reshape(-1, 34)[:, :2]).view(np.float16)).all())
    return bool(np.isfinite(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])).all())
