"""The audit room: does a fine-tuned checkpoint or an adapter file leave every frozen tensor as
the base model has it? (What `freezeasguard verify` reads is all here.)

Checkpoints (verify_checkpoint):
- exact mode: each frozen tensor must have the base tensor's dtype and bytes.
- tolerance mode: for checkpoints exported in fp16/bf16; each frozen tensor must equal the base
  tensor rounded to the candidate's dtype, within ``atol`` (0 by default: rounding is exact).

Adapters (verify_adapter): every key of a LoRA / LyCORIS file (diffusers, peft, kohya, LyCORIS
layouts) is mapped to the denoiser parameter it changes; a frozen one is a violation, and a key
of no known pattern leaves the file uncertified.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .digests import digest, dtype_name, make_record, tensor_bytes, tensor_digests
from .layouts import Checkpoint, original_module_aliases
from .tensorfile import all_finite
from .mask import Mask, MaskError
from .models import ModelError, fingerprint, resolve_denoiser_dir

logger = logging.getLogger(__name__)

EXIT_COMPLIANT, EXIT_VIOLATIONS = 0, 1     # unusable input exits 2, as in every command


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

    def to_dict(self) -> dict:
        return {"compliant": self.compliant, "mode": self.mode, "frozen_checked": self.frozen_checked,
                "violations": [v.__dict__ for v in self.violations],
                "trainable_changed": self.trainable_changed, "trainable_total": self.trainable_total,
                "layout": self.layout, "bytes_read": self.bytes_read}


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


def verify_checkpoint(model_dir, mask_path, candidate, mode: str = "exact", atol: float = 0.0) -> VerifyReport:
    """Audit a checkpoint against the base model (``model_dir``) or, when it is None, against the
    digests the mask records (digests.py). Tensors are read one at a time (tensorfile.py), from a
    diffusers folder or state file or a single-file SD/SDXL checkpoint (layouts.py)."""
    if mode not in ("exact", "tolerance"):
        raise ValueError(f"mode {mode!r}: use exact or tolerance")
    mask = Mask.load(mask_path)
    record = mask.meta.get("audit")
    if model_dir is not None:
        base = Checkpoint(model_dir)
        mask.check_matches([(n, torch.empty(base.shape(n), device="meta")) for n in base.names()],
                           base.fingerprint(), what="the base model", state_dict=True)
        config, base_names = denoiser_config(model_dir), set(base.names())
    else:
        if not record:
            raise MaskError(f"{mask_path} records no digests of its frozen tensors, so the audit needs the base "
                            f"model: pass --model BASE, or record them once: freezeasguard mask record {mask_path} "
                            f"--model BASE --out MASK_WITH_DIGESTS")
        if mode == "tolerance" and atol > 0:
            raise MaskError("--atol above 0 compares values, which needs the base model: pass --model BASE")
        base, config, base_names = None, record["denoiser_config"], set(record["base_names"])
    cand = Checkpoint(candidate, config)
    report = audit(mask, cand, base, record, base_names, mode, atol)
    logger.info("verify: %s (%d frozen tensors checked, %d violations; %s trainable tensors changed; %d bytes read)",
                "compliant" if report.compliant else "NOT compliant", report.frozen_checked, len(report.violations),
                f"{report.trainable_changed}/{report.trainable_total}" if base is not None else "unknown (no base)",
                cand.bytes_read)
    return report


def audit(mask: Mask, cand: Checkpoint, base: Checkpoint | None, record: dict | None, base_names: set[str],
          mode: str, atol: float) -> VerifyReport:
    """One pass over the candidate's denoiser tensors: each frozen one compared with the base (or
    its digest), each trainable one compared with the base when there is one, every one checked
    for inf/NaN (a diverged checkpoint is unusable, exit 2, whatever it holds)."""
    frozen, shapes = set(mask.frozen_names), dict(zip(mask.names, mask.shapes))
    fitting = sum(1 for n in mask.names if n in cand and tuple(cand.shape(n)) == tuple(shapes[n]))
    if fitting < len(mask.names) / 2:
        raise ModelError(f"{cand.path}: holds {fitting} of the mask's {len(mask.names)} tensors with their shapes; it "
                         f"is a checkpoint of another model, not a derivative of this mask's base model")
    violations, changed, trainable, readable = [], 0, 0, []
    for name in mask.names:
        if name not in cand:
            if name in frozen:
                violations.append(Violation(name, "missing from the candidate"))
        elif tuple(cand.shape(name)) != tuple(shapes[name]):
            violations.append(Violation(name, f"shape {list(cand.shape(name))}, base has {list(shapes[name])}"))
        else:
            readable.append(name)
    for name, c in cand.stream(readable):     # the next tensor is read while this one is checked
        if not all_finite(c):
            raise ModelError(f"{cand.path}: tensor {name} holds inf/NaN; the checkpoint is unusable (a diverged "
                             f"fine-tune), whatever its frozen tensors hold.")
        if name in frozen:
            found = (_compare(name, c, base.read(name), mode, atol) if base is not None
                     else _compare_digest(name, c, record))
            violations += [found] if found else []
        elif base is not None:
            trainable += 1
            changed += not torch.equal(c.double(), base.read(name).to(c.dtype).double())
    violations += [Violation(n, "not a parameter of the base model") for n in cand.names()
                   if n not in shapes and n not in base_names]
    violations += [Violation(k, "a UNet key of the single file that maps to no parameter") for k in cand.unmapped]
    return VerifyReport(not violations, mode, len(frozen), violations, changed if base is not None else None,
                        trainable if base is not None else None, cand.layout, cand.bytes_read)


def _compare(name: str, c: torch.Tensor, b: torch.Tensor, mode: str, atol: float) -> Violation | None:
    """Exact: the candidate's bytes are the base's in the candidate's dtype (an fp16/bf16 export
    of an untouched tensor is the base rounded to nearest even, which is deterministic).
    Tolerance: within ``atol`` of that rounding."""
    expected = b if c.dtype == b.dtype else b.to(c.dtype)
    if mode == "exact":
        if not torch.equal(c.reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)):
            diff = float((c.double() - b.double()).abs().max())
            return Violation(name, "bytes differ from the base model" + ("" if c.dtype == b.dtype else
                                                                          f" rounded to {c.dtype}"), diff)
        return None
    diff = float((c.double() - expected.double()).abs().max()) if c.numel() else 0.0
    if not diff <= atol:   # also catches NaN
        return Violation(name, f"differs from the base rounded to {c.dtype} by {diff:g} (> atol {atol:g})", diff)
    return None


def _compare_digest(name: str, c: torch.Tensor, record: dict) -> Violation | None:
    stored, kind = record["dtypes"][name], dtype_name(c.dtype)
    expected = record["digests"][name].get(kind)
    if expected is None:
        raise MaskError(f"{name} is stored as {c.dtype}, a precision the mask's digests do not cover; pass --model "
                        f"BASE to compare values")
    if digest(tensor_bytes(c), c.dtype, c.shape) != expected:
        return Violation(name, "bytes differ from the base model" + ("" if kind == stored else f" rounded to {kind}"))
    return None


def denoiser_config(model_dir) -> dict:
    """The denoiser's config.json of a pipeline or denoiser folder."""
    return json.loads((resolve_denoiser_dir(model_dir) / "config.json").read_text())


def record_digests(mask: Mask, model_dir) -> Mask:
    """The mask with its audit record (digests.py) made from the base model in ``model_dir``, which
    must be the mask's base (its fingerprint is checked), read one tensor at a time."""
    base = Checkpoint(model_dir)
    mask.check_matches([(n, torch.empty(base.shape(n), device="meta")) for n in base.names()], base.fingerprint(),
                       what=str(model_dir), state_dict=True)
    digests, dtypes = {}, {}
    for name in mask.frozen_names:       # one tensor in memory at a time
        t = base.read(name)
        digests[name], dtypes[name] = tensor_digests(t), dtype_name(t.dtype)
    record = make_record(digests, dtypes, base.names(), denoiser_config(model_dir))
    return Mask(mask.names, mask.shapes, mask.logits, mask.frozen, mask.base_fingerprint, {**mask.meta, "audit": record})


# ------------------------------------------------------------------------------------------
# Adapter files
# ------------------------------------------------------------------------------------------
# Freezing a tensor does not stop an adapter from being placed on its module: a LoRA on a frozen
# ``attn2.to_k`` changes exactly what the publisher froze. The audit reads an adapter file in the
# formats people publish and maps every key to the denoiser parameter it changes:
#
# - diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B`` (``pipeline.save_lora_weights``),
#   ``base_model.model.<module>...`` (peft), bare ``<module>.lora_A.weight``, and the older
#   attention-processor form ``<block>.processor.to_q_lora.down.weight``;
# - kohya sd-scripts: ``lora_unet_<module with dots as underscores>.lora_down.weight`` /
#   ``lora_up`` / ``.alpha``;
# - LyCORIS on the same names: LoCon (``lora_mid``), LoHa (``hada_*``), LoKr (``lokr_*``), DoRA
#   (``dora_scale``), full and norm diffs (``diff``, ``diff_b``, ``w_norm``, ``b_norm``).
#
# kohya's names replace the dots of a module path by underscores, and module names hold
# underscores themselves (``transformer_blocks``, ``to_q``), so a name is resolved against the
# model's own modules, never split by guessing. Keys for the text encoder (``text_encoder.``,
# ``lora_te*``) are reported as outside the denoiser; a key of no known pattern is reported as unknown.


# key suffix -> which parameter of the target module it changes ("meta": changes nothing by itself)
SUFFIXES = {
    # diffusers / peft
    ".lora_A.weight": "weight", ".lora_B.weight": "weight", ".lora_B.bias": "bias",
    ".lora_A.default.weight": "weight", ".lora_B.default.weight": "weight",
    ".lora_magnitude_vector": "weight", ".lora_magnitude_vector.weight": "weight",
    ".lora.down.weight": "weight", ".lora.up.weight": "weight",
    ".lora_linear_layer.down.weight": "weight", ".lora_linear_layer.up.weight": "weight",
    ".down.weight": "weight", ".up.weight": "weight",
    # kohya / LyCORIS
    ".lora_down.weight": "weight", ".lora_up.weight": "weight", ".lora_mid.weight": "weight",
    ".hada_w1_a": "weight", ".hada_w1_b": "weight", ".hada_w2_a": "weight", ".hada_w2_b": "weight",
    ".hada_t1": "weight", ".hada_t2": "weight",
    ".lokr_w1": "weight", ".lokr_w1_a": "weight", ".lokr_w1_b": "weight",
    ".lokr_w2": "weight", ".lokr_w2_a": "weight", ".lokr_w2_b": "weight", ".lokr_t2": "weight",
    ".dora_scale": "weight", ".diff": "weight", ".w_norm": "weight",
    ".diff_b": "bias", ".b_norm": "bias",
    ".alpha": "meta", ".scale": "meta", ".on_input": "meta",
}
# longest first, so ".lora_A.default.weight" is not read as ".weight" of a module named "...default"
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)
# a denoiser's keys: diffusers' unet. / transformer. (SD3, FLUX), peft's, the original SD checkpoints'
UNET_DOTTED_PREFIXES = ("unet.", "transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.", "te1.", "te2.")
KOHYA_UNET_PREFIX = "lora_unet_"
# old diffusers attention processors: <attn>.processor.to_q_lora.down.weight -> <attn>.to_q
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


class AdapterError(ValueError):
    """An adapter file that cannot be audited (unreadable, empty, or for another model)."""


@dataclass
class AdapterReport:
    file: str
    compliant: bool
    changed: dict[str, list[str]] = field(default_factory=dict)       # UNet parameter -> adapter keys
    frozen_changed: list[str] = field(default_factory=list)           # the violations
    outside_unet: list[str] = field(default_factory=list)             # text-encoder keys
    unknown: list[str] = field(default_factory=list)                  # keys of no known pattern

    def to_dict(self) -> dict:
        return asdict(self)


def split_key(key: str) -> tuple[str, str] | None:
    """``key`` -> (module part, the parameter it changes: weight | bias | meta), or None."""
    for suffix in _ORDERED:
        if key.endswith(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


def module_index(param_names) -> tuple[set[str], dict[str, str]]:
    """The UNet's module paths, and kohya's underscored name of each -> its dotted path."""
    modules = {n.rsplit(".", 1)[0] for n in param_names}
    return modules, {m.replace(".", "_"): m for m in modules}


def resolve_module(module_part: str, modules: set[str], underscored: dict[str, str],
                   aliases: dict[str, list[str]] | None = None) -> list[str]:
    """The UNet modules a key's module part names (several for a fused original-layout module),
    or none. ``aliases``: original-layout module -> diffusers modules (layouts.original_module_aliases)."""
    aliases = aliases or {}
    if module_part.startswith(KOHYA_UNET_PREFIX):
        name = module_part[len(KOHYA_UNET_PREFIX):]
        if name in underscored:
            return [underscored[name]]
        return aliases.get(_underscored_aliases(aliases).get(name, ""), [])
    for prefix in UNET_DOTTED_PREFIXES:
        if module_part.startswith(prefix):
            module_part = module_part[len(prefix):]
            break
    m = _PROCESSOR.search(module_part)
    if m:
        module_part = module_part[: m.start()] + "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1))
    if module_part in modules:
        return [module_part]
    return aliases.get(module_part, [])


def _underscored_aliases(aliases: dict[str, list[str]]) -> dict[str, str]:
    return {k.replace(".", "_"): k for k in aliases}


def read_adapter(path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a safetensors adapter file (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"--lora {path}: no such file.")
    if path.suffix != ".safetensors":
        raise AdapterError(f"--lora {path}: only .safetensors adapters are read (pickled files can run code); "
                           f"convert it with `freezeasguard convert-weights`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:        # SafetensorError has no public base class to catch
        raise AdapterError(f"--lora {path}: not a readable safetensors file ({exc}); it is truncated or "
                           f"corrupt.") from exc
    if not shapes:
        raise AdapterError(f"--lora {path}: the file holds no tensors.")
    return shapes


def _check_shape(key: str, shape: tuple, weight_shape: tuple) -> str | None:
    """A LoRA factor whose size does not fit its module: the adapter is for another model."""
    if len(weight_shape) < 2 or len(shape) < 2:
        return None
    out_dim, in_dim = weight_shape[0], weight_shape[1]
    if key.endswith((".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".down.weight")):
        if shape[1] != in_dim:
            return f"{key}: input size {shape[1]}, the module takes {in_dim}"
    if key.endswith((".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight", ".up.weight")):
        if shape[0] != out_dim:
            return f"{key}: output size {shape[0]}, the module gives {out_dim}"
    return None


def audit_adapter(adapter: dict[str, tuple], base: dict[str, torch.Tensor], mask: Mask,
                  file: str = "", base_fingerprint: dict | None = None,
                  aliases: dict[str, list[str]] | None = None) -> AdapterReport:
    """Map every adapter key to the UNet parameter it changes; a changed frozen parameter is a
    violation. ``adapter``: key -> shape (read_adapter); ``base``: name -> tensor (only names and
    shapes are used: meta tensors will do), checked against the mask with ``base_fingerprint``."""
    mask.check_matches(list(base.items()), base_fingerprint, what="the base model", state_dict=True)
    modules, underscored = module_index(base)
    frozen = set(mask.frozen_names)
    report = AdapterReport(file, True)
    mismatched = []
    for key, shape in sorted(adapter.items()):
        if key.startswith(TEXT_PREFIXES):
            report.outside_unet.append(key)
            continue
        parts = split_key(key)
        targets = resolve_module(parts[0], modules, underscored, aliases) if parts else []
        if not targets:
            report.unknown.append(key)
            continue
        if parts[1] == "meta":
            continue
        params = [f"{m}.{parts[1]}" for m in targets]
        if any(p not in base for p in params):
            report.unknown.append(key)
            continue
        weights = [tuple(base[f"{m}.weight"].shape) for m in targets if f"{m}.weight" in base]
        if weights:   # a fused module's factor spans its parts' rows
            problem = _check_shape(key, shape, (sum(w[0] for w in weights), *weights[0][1:]))
            if problem:
                mismatched.append(problem)
        for param in params:
            report.changed.setdefault(param, []).append(key)
    if mismatched:
        raise AdapterError(f"{file}: the adapter is for a model of other sizes ({len(mismatched)} factors do not fit; "
                           f"first: {mismatched[0]}). Audit it against the model it was trained on.")
    if not report.changed:
        raise AdapterError(f"{file}: none of its {len(adapter)} keys names a module of this UNet "
                           f"(first keys: {sorted(adapter)[:3]}); it is for another model or in a format not "
                           f"read here (see `freezeasguard verify --help`).")
    report.frozen_changed = sorted(p for p in report.changed if p in frozen)
    # an adapter whose keys cannot all be read is not certified: unknown keys could change anything
    report.compliant = not report.frozen_changed and not report.unknown
    return report


def verify_adapter(model_dir, mask_path, adapter_path) -> AdapterReport:
    """The audit of an adapter file against a base model and its mask, or (``model_dir`` None)
    against the mask alone: an adapter's keys name modules, and the mask knows every parameter's
    name and shape."""
    mask = Mask.load(mask_path)
    adapter = read_adapter(adapter_path)
    if model_dir is None:
        shapes = {n: torch.empty(s, device="meta") for n, s in zip(mask.names, mask.shapes)}
        config = (mask.meta.get("audit") or {}).get("denoiser_config")
        return audit_adapter(adapter, shapes, mask, str(adapter_path),
                             aliases=original_module_aliases(mask.names, config))
    base = Checkpoint(model_dir)
    shapes = {n: torch.empty(base.shape(n), device="meta") for n in base.names()}
    return audit_adapter(adapter, shapes, mask, str(adapter_path), base.fingerprint(),
                         original_module_aliases(mask.names, denoiser_config(model_dir)))


def report_text(report: AdapterReport, limit: int = 50) -> str:
    lines = []
    if report.frozen_changed:
        lines.append(f"VIOLATIONS: the adapter changes {len(report.frozen_changed)} frozen parameters:")
        lines += [f"  {p}  (keys: {', '.join(report.changed[p][:2])})" for p in report.frozen_changed[:limit]]
    if report.unknown:
        lines.append(f"NOT AUDITED: {len(report.unknown)} keys of no known adapter pattern (they could change any "
                     f"parameter, so the file is not certified): " + ", ".join(report.unknown[:5]))
    if report.outside_unet:
        lines.append(f"note: {len(report.outside_unet)} keys adapt the text encoder, which the mask does not cover")
    if report.compliant:
        lines.insert(0, f"COMPLIANT: the adapter changes {len(report.changed)} denoiser parameters, none of them frozen.")
    return "\n".join(lines)
