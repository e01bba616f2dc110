"""The audit room: does a fine-tuned checkpoint leave every frozen tensor as the base model has
it? (Adapters: adapters.py; the formats read: layouts.py and original_layouts.py; a hub's batch: batch.py.)

Checkpoints (verify_checkpoint, against a Reference prepared once):
- exact mode: each frozen tensor must be the base's bytes in the candidate's dtype (an fp16/bf16
  export of an untouched tensor is the base rounded to nearest even, which is deterministic).
- tolerance mode: within ``atol`` of that rounding.
Without the base, the digests the mask records (digests.py) are the reference.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from freezeasguard.audit.digests import (GGUF_RECORDED, dtype_name, finish, hasher, make_record, record_hash,
                                         tensor_bytes, tensor_digests)
from freezeasguard.audit.layouts import Checkpoint
from freezeasguard.audit.quantized import compare_chunk, compare_gguf, gguf_finite, scale_problem
from freezeasguard.audit.tensorfile import all_finite
from freezeasguard.guard.mask import Mask, MaskError
from freezeasguard.models.pipelines import ModelError, fingerprint, resolve_denoiser_dir

logger = logging.getLogger(__name__)

EXIT_COMPLIANT, EXIT_VIOLATIONS = 0, 1     # unusable input exits 2, as in every command
# A chunk small enough to stay in a core's cache from its read to its last check; at most this
# many threads (one a core), beyond which the page cache's copy, not the checks, is the limit.
CHUNK_BYTES, AUDIT_THREADS = 4 * 2**20, 4


@dataclass
class Violation:
    name: str
    reason: str
    max_abs_diff: float | None = None


@dataclass
class VerifyReport:
    compliant: bool
    mode: str
    frozen_checked: int
    violations: list[Violation] = field(default_factory=list)
    trainable_changed: int | None = 0       # None: not known without the base model
    trainable_total: int | None = 0
    layout: str = "diffusers"
    bytes_read: int = 0
    quantized: dict = field(default_factory=dict)     # GGUF tensors: name -> type, rule, bound, max_abs_diff

    def to_dict(self) -> dict:
        return {"compliant": self.compliant, "mode": self.mode, "frozen_checked": self.frozen_checked,
                "violations": [v.__dict__ for v in self.violations],
                "trainable_changed": self.trainable_changed, "trainable_total": self.trainable_total,
                "layout": self.layout, "bytes_read": self.bytes_read,
                **({"quantized": self.quantized} if self.quantized else {})}


def verify_state(base: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], mask: Mask,
                 mode: str = "exact", atol: float = 0.0, check_base_fingerprint: bool = True) -> VerifyReport:
    """The audit of two in-memory states (verify_checkpoint reads files one tensor at a time)."""
    if mode not in ("exact", "tolerance"):
        raise ValueError(f"mode {mode!r}: use exact or tolerance")
    mask.check_matches(list(base.items()), fingerprint(base.items()) if check_base_fingerprint else None,
                       what="the base model", state_dict=True)
    violations = []
    frozen = set(mask.frozen_names)
    for name in mask.frozen_names:
        if name not in candidate:
            violations.append(Violation(name, "missing from the candidate"))
        elif tuple(base[name].shape) != tuple(candidate[name].shape):
            violations.append(Violation(name, f"shape {list(candidate[name].shape)}, base has {list(base[name].shape)}"))
        elif found := _compare(name, candidate[name], base[name], mode, atol):
            violations.append(found)
    violations += [Violation(n, "not a parameter of the base model") for n in candidate if n not in base]
    trainable = [n for n in mask.names if n not in frozen and n in candidate]
    changed = sum(1 for n in trainable if not torch.equal(candidate[n].double(), base[n].to(candidate[n].dtype).double()))
    return VerifyReport(not violations, mode, len(frozen), violations, changed, len(trainable))


@dataclass
class Reference:
    """What candidates are audited against, prepared once: the mask, and the base model streamed
    (its fingerprint checked against the mask's) or, without one, the digests the mask records.
    A batch audits every upload against one Reference."""
    mask: Mask
    base: Checkpoint | None
    denoiser_config: dict | None
    base_names: set[str]
    base_fingerprint: dict | None

    @property
    def record(self) -> dict | None:
        return self.mask.meta.get("audit")

    @property
    def shapes(self) -> dict[str, torch.Tensor]:
        """Parameter name -> a meta tensor of its shape (the base's, or the mask's without a base)."""
        if self.base is not None:
            return {n: torch.empty(self.base.shape(n), device="meta") for n in self.base.names()}
        return {n: torch.empty(s, device="meta") for n, s in zip(self.mask.names, self.mask.shapes)}


def reference(model_dir, mask_path) -> Reference:
    mask = Mask.load(mask_path)
    if model_dir is None:
        record = mask.meta.get("audit") or {}
        return Reference(mask, None, record.get("denoiser_config"), set(record.get("base_names", mask.names)), None)
    base = Checkpoint(model_dir)
    ref = Reference(mask, base, denoiser_config(model_dir), set(base.names()), base.fingerprint())
    mask.check_matches(list(ref.shapes.items()), ref.base_fingerprint, what="the base model", state_dict=True)
    return ref


def verify_checkpoint(model_dir, mask_path, candidate, mode: str = "exact", atol: float = 0.0) -> VerifyReport:
    """Audit a checkpoint against the base model (``model_dir``) or, when it is None, against the
    digests the mask records (digests.py). Tensors are read one at a time (tensorfile.py), from a
    diffusers folder or state file or a single file in the SD/SDXL or FLUX.1 layout (layouts.py)."""
    return audit_checkpoint(reference(model_dir, mask_path), candidate, mode, atol)


def audit_checkpoint(ref: Reference, candidate, mode: str = "exact", atol: float = 0.0) -> VerifyReport:
    if mode not in ("exact", "tolerance"):
        raise ValueError(f"mode {mode!r}: use exact or tolerance")
    if ref.base is None:
        if not ref.record:
            raise MaskError("the mask records no digests of its frozen tensors, so the audit needs the base model: "
                            "pass --model BASE, or record them once: freezeasguard mask record MASK --model BASE "
                            "--out MASK_WITH_DIGESTS")
        if mode == "tolerance" and atol > 0:
            raise MaskError("--atol above 0 compares values, which needs the base model: pass --model BASE")
    cand = Checkpoint(candidate, ref.denoiser_config)
    report = audit(ref.mask, cand, ref.base, ref.record, ref.base_names, mode, atol)
    logger.info("verify: %s (%d frozen tensors checked, %d violations; %s trainable tensors changed; %d bytes read)",
                "compliant" if report.compliant else "NOT compliant", report.frozen_checked, len(report.violations),
                f"{report.trainable_changed}/{report.trainable_total}" if ref.base is not None else "unknown (no base)",
                cand.bytes_read)
    return report


def audit(mask: Mask, cand: Checkpoint, base: Checkpoint | None, record: dict | None, base_names: set[str],
          mode: str, atol: float) -> VerifyReport:
    """One pass over the candidate's denoiser tensors: each frozen one compared with the base (or
    its digest), each trainable one compared with the base when there is one, every one checked
    for inf/NaN (a diverged checkpoint is unusable, exit 2, whatever it holds). Tensors are checked
    in the order the file stores them (a cold disk streams) by one thread per core, each reading
    its tensor chunk by chunk (_check_tensor); file reads, the checks and BLAKE3 release the GIL."""
    frozen, shapes = set(mask.frozen_names), dict(zip(mask.names, mask.shapes))
    cand.check_layout_shapes(shapes)
    fitting = sum(1 for n in mask.names if n in cand and tuple(cand.shape(n)) == tuple(shapes[n]))
    if fitting < len(mask.names) / 2:
        raise ModelError(f"{cand.path}: holds {fitting} of the mask's {len(mask.names)} tensors with their shapes; it "
                         f"is a checkpoint of another model, not a derivative of this mask's base model")
    violations, readable = [], []
    for name in mask.names:
        if name not in cand:
            if name in frozen:
                violations.append(Violation(name, "missing from the candidate"))
        elif tuple(cand.shape(name)) != tuple(shapes[name]):
            violations.append(Violation(name, f"shape {list(cand.shape(name))}, base has {list(shapes[name])}"))
        else:
            readable.append(name)
    file_index = {id(f): i for i, f in enumerate(cand.files)}

    def position(name):
        f, _, offset, _ = cand.pieces(name)[0]
        return file_index[id(f)], offset
    local = threading.local()

    def check(name):
        buffers = local.__dict__.setdefault("buffers", {})
        return _check_tensor(name, cand, base, record, name in frozen, mode, atol, buffers)
    checked = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(AUDIT_THREADS, os.cpu_count() or 1)))
    try:
        for result in pool.map(check, sorted(readable, key=position)):
            if not result.finite:
                raise ModelError(f"{cand.path}: tensor {result.name} holds inf/NaN; the checkpoint is unusable (a "
                                 f"diverged fine-tune), whatever its frozen tensors hold.")
            checked[result.name] = result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    violations += [checked[n].violation for n in readable if n in frozen and checked[n].violation]
    violations += _scale_violations(cand, checked, frozen)
    trainable = [n for n in readable if n not in frozen] if base is not None else []
    changed = sum(checked[n].changed for n in trainable)
    violations += [Violation(n, "not a parameter of the base model") for n in cand.names()
                   if n not in shapes and n not in base_names]
    violations += [Violation(k, "a UNet key of the single file that maps to no parameter") for k in cand.unmapped]
    return VerifyReport(not violations, mode, len(frozen), violations, changed if base is not None else None,
                        len(trainable) if base is not None else None, cand.layout, cand.bytes_read,
                        {n: r.quant for n, r in checked.items() if r.quant})


def _check_gguf(name: str, cand: Checkpoint, base: Checkpoint | None, record: dict | None, frozen: bool,
                qtype: str) -> _Checked:
    """A GGUF-quantized tensor (quantized.py: compare_gguf): frozen, the base quantized by the gguf
    package bit for bit where it quantizes the type, else within the type's rounding bound; the
    bound and the largest difference go into the report either way. Without the base, a type the
    mask's digests record (digests.GGUF_RECORDED: Q8_0) is hashed and compared; others need it."""
    if base is None:
        if not frozen:
            return _Checked(name, finite=gguf_finite(cand.gguf_blocks(name), qtype))
        expected = record["digests"][name].get(qtype)
        if expected is None:
            raise MaskError(f"{name} is GGUF {qtype}, which the mask's digests do not cover (they record "
                            f"{', '.join(GGUF_RECORDED)} where the mask was recorded since 2026-12-06); pass --model "
                            f"BASE, or record the mask again: freezeasguard mask record MASK --model BASE --out NEW")
        h = hasher(qtype, cand.shape(name), record_hash(record))
        h.update(cand.gguf_blocks(name))
        quant = {"type": qtype, "rule": "exact (digest)", "bound": None, "max_abs_diff": None}
        return _Checked(name, quant=quant, violation=None if finish(h) == expected else Violation(
            name, f"its {qtype} blocks differ from the base's, quantized by the gguf package"))
    raw = cand.gguf_blocks(name)
    reference = base.read(name).float().numpy().reshape(raw.shape[0], -1)
    found = compare_gguf(raw, reference, qtype)
    if not found["finite"]:
        return _Checked(name, finite=False)
    kept = found["exact"] if found["exact"] is not None else found["within_bound"]
    quant = {"type": qtype, "rule": "exact" if found["exact"] is not None else "bound", "bound": found["bound"],
             "max_abs_diff": found["max_diff"]}
    if not frozen:
        return _Checked(name, changed=not kept, quant=quant)
    if kept:
        return _Checked(name, quant=quant)
    reason = (f"its {qtype} blocks differ from the base quantized by the gguf package" if found["exact"] is not None
              else f"moves beyond {qtype}'s rounding bound ({found['max_diff']:.3g} > {found['bound']:.3g})")
    return _Checked(name, violation=Violation(name, reason, found["max_diff"]), quant=quant)


def _scale_violations(cand: Checkpoint, checked: dict, frozen: set) -> list[Violation]:
    """A scaled fp8 tensor's scale against the exporter's, max|w| / fp8 max over the whole stored
    tensor (a fused q/k/v has one scale for its three parts): a frozen part whose bits match the
    base quantized at an outsized scale is still quantized away."""
    amax: dict[str, float] = {}
    for name, result in checked.items():
        if result.amax is not None:
            key = cand.where[name][0][0]
            amax[key] = max(amax.get(key, 0.0), result.amax)
    out = []
    for name, result in checked.items():
        if result.amax is None or name not in frozen or result.violation is not None:
            continue
        problem = scale_problem(cand.scale(name), amax[cand.where[name][0][0]], result.fp8)
        if problem:
            out.append(Violation(name, problem))
    return out


@dataclass
class _Checked:
    name: str
    finite: bool = True
    violation: Violation | None = None
    changed: bool = False
    amax: float | None = None               # scaled fp8: the base's largest magnitude in this tensor
    fp8: torch.dtype | None = None
    quant: dict | None = None               # GGUF: the rule applied, the bound and the largest difference


def _buffer(buffers: dict, role: str, size: int) -> bytearray:
    if len(buffers.get(role, b"")) < size:
        buffers[role] = bytearray(size)
    return buffers[role]


def _check_tensor(name: str, cand: Checkpoint, base: Checkpoint | None, record: dict | None, frozen: bool,
                  mode: str, atol: float, buffers: dict) -> _Checked:
    """One tensor, CHUNK_BYTES at a time: finite; if frozen, equal to the base (_difference, chunk by
    chunk) or to the digest the mask records for its dtype; if trainable and the base is here,
    changed or not."""
    qtype = cand.gguf_type(name)
    if qtype is not None:
        return _check_gguf(name, cand, base, record, frozen, qtype)
    dtype = cand.dtype(name)
    elements = max(1, CHUNK_BYTES // dtype.itemsize)
    chunks = cand.chunks(name, elements, _buffer(buffers, "candidate", elements * dtype.itemsize))
    if base is None and not frozen:
        return _Checked(name, finite=all(all_finite(c) for c in chunks))
    scale = cand.scale(name)
    if scale is not None:
        return _check_scaled(name, chunks, base, frozen, scale, elements, buffers)
    if base is None:
        stored, kind = record["dtypes"][name], dtype_name(dtype)
        expected = record["digests"][name].get(kind)
        if expected is None:
            raise MaskError(f"{name} is stored as {dtype}, a precision the mask's digests do not cover (fp8 is "
                            f"recorded since 2026-12-06); pass --model BASE to compare values, or record the mask "
                            f"again: freezeasguard mask record MASK --model BASE --out NEW")
        h = hasher(dtype, cand.shape(name), record_hash(record))
        for c in chunks:
            if not all_finite(c):
                return _Checked(name, finite=False)
            h.update(tensor_bytes(c))
        return _Checked(name, violation=None if finish(h) == expected else Violation(
            name, "bytes differ from the base model" + ("" if kind == stored else f" rounded to {kind}")))
    base_dtype = base.dtype(name)
    base_chunks = base.chunks(name, elements, _buffer(buffers, "base", elements * base_dtype.itemsize))
    differs, diff = False, 0.0
    for c in chunks:
        if not all_finite(c):
            return _Checked(name, finite=False)
        b = next(base_chunks)
        if not frozen:
            differs = differs or not torch.equal(c, b if b.dtype == dtype else b.to(dtype))   # values: -0.0 is 0.0
            continue
        chunk_differs, d = _difference(c, b, mode)
        differs = differs or chunk_differs
        if diff == diff and not d <= diff:     # the largest so far; a NaN stays
            diff = d
    if not frozen:
        return _Checked(name, changed=differs)
    return _Checked(name, violation=_frozen_violation(name, mode, atol, dtype, base_dtype, differs, diff))


def _check_scaled(name: str, chunks, base: Checkpoint | None, frozen: bool, scale: float, elements: int,
                  buffers: dict) -> _Checked:
    """A scaled fp8 tensor (quantized.py): frozen, its bits must be the base quantized at the
    file's scale and that scale an exporter's; trainable, changed when they are not."""
    if base is None:
        raise MaskError(f"{name} is scaled fp8: its bits depend on the scale the exporter chose, which the mask's "
                        f"digests cannot know; pass --model BASE to audit quantized files")
    base_dtype = base.dtype(name)
    base_chunks = base.chunks(name, elements, _buffer(buffers, "base", elements * base_dtype.itemsize))
    differs, diff, amax, dtype = False, 0.0, 0.0, None
    for c in chunks:
        dtype = c.dtype
        if not all_finite(c):
            return _Checked(name, finite=False)
        chunk_differs, d, a = compare_chunk(c, next(base_chunks), scale)
        differs, diff, amax = differs or chunk_differs, max(diff, d), max(amax, a)
    if not frozen:
        return _Checked(name, changed=differs, amax=amax, fp8=dtype)
    return _Checked(name, violation=Violation(name, f"fp8 bits differ from the base quantized at the file's scale "
                                                    f"({scale:g})", diff) if differs else None, amax=amax, fp8=dtype)


def _compare(name: str, c: torch.Tensor, b: torch.Tensor, mode: str, atol: float) -> Violation | None:
    """A frozen tensor against the base's, both whole (in memory)."""
    differs, diff = _difference(c, b, mode) if c.numel() else (False, 0.0)
    return _frozen_violation(name, mode, atol, c.dtype, b.dtype, differs, diff)


def _difference(c: torch.Tensor, b: torch.Tensor, mode: str) -> tuple[bool, float]:
    """Some elements of a frozen tensor (a chunk, or all of them) against the same elements of the
    base: whether their bytes differ from the base's in the candidate's dtype (an fp16/bf16 export
    of an untouched tensor is the base rounded to nearest even, which is deterministic), and the
    largest difference, from the base itself (exact) or from that rounding (tolerance)."""
    rounded = b if c.dtype == b.dtype else b.to(c.dtype)
    if mode == "exact":
        if torch.equal(c.reshape(-1).view(torch.uint8), rounded.contiguous().reshape(-1).view(torch.uint8)):
            return False, 0.0
        return True, float((c.double() - b.double()).abs().max())
    diff = float((c.double() - rounded.double()).abs().max())
    return diff != 0.0, diff


def _frozen_violation(name: str, mode: str, atol: float, dtype: torch.dtype, base_dtype: torch.dtype, differs: bool,
                      diff: float) -> Violation | None:
    """Exact: any byte changed is a violation. Tolerance: a difference above ``atol`` (or NaN)."""
    if mode == "exact":
        return Violation(name, "bytes differ from the base model" + (
            "" if dtype == base_dtype else f" rounded to {dtype}"), diff) if differs else None
    if not diff <= atol:   # also catches NaN
        return Violation(name, f"differs from the base rounded to {dtype} by {diff:g} (> atol {atol:g})", diff)
    return None


def denoiser_config(model_dir) -> dict:
    """The denoiser's config.json of a pipeline or denoiser folder."""
    return json.loads((resolve_denoiser_dir(model_dir) / "config.json").read_text())


def record_digests(mask: Mask, model_dir) -> Mask:
    """The mask with its audit record (digests.py) made from the base model in ``model_dir``, which
    must be the mask's base (its fingerprint is checked); one pass over the base, a tensor at a time."""
    base = Checkpoint(model_dir)
    frozen, digests, dtypes = set(mask.frozen_names), {}, {}

    def keep(name, t):
        if name in frozen:
            digests[name], dtypes[name] = tensor_digests(t), dtype_name(t.dtype)
    fp = base.fingerprint(visit=keep)
    mask.check_matches([(n, torch.empty(base.shape(n), device="meta")) for n in base.names()], fp,
                       what=str(model_dir), state_dict=True)
    record = make_record(digests, dtypes, base.names(), denoiser_config(model_dir))
    return Mask(mask.names, mask.shapes, mask.logits, mask.frozen, mask.base_fingerprint, {**mask.meta, "audit": record})
