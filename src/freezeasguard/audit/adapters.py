"""The audit of adapter files: which denoiser parameters does a LoRA / LyCORIS file change?

Freezing a tensor does not stop an adapter from being placed on its module: a LoRA on a frozen
``attn2.to_k`` changes exactly what the publisher froze. The audit reads an adapter file in the
formats people publish and maps every key to the denoiser parameter it changes:

- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B`` (``pipeline.save_lora_weights``),
  ``base_model.model.<module>...`` (peft), bare ``<module>.lora_A.weight``, and the older
  attention-processor form ``<block>.processor.to_q_lora.down.weight``;
- kohya sd-scripts: ``lora_unet_<module with dots as underscores>.lora_down.weight`` /
  ``lora_up`` / ``.alpha``;
- LyCORIS on the same names: LoCon (``lora_mid``), LoHa (``hada_*``), LoKr (``lokr_*``), DoRA
  (``dora_scale``), full and norm diffs (``diff``, ``diff_b``, ``w_norm``, ``b_norm``);
- ComfyUI's ``diffusion_model.<module>``, and any of these on the original layouts' module names
  (``input_blocks.4.1...``, ``double_blocks.0.img_attn.qkv``, ``joint_blocks.0.x_block.attn.qkv``,
  ``layers.0.attention.qkv``: original_layouts.original_module_aliases).

kohya's names replace the dots of a module path by underscores, and module names hold
underscores themselves (``transformer_blocks``, ``to_q``), so a name is resolved against the
model's own modules, never split by guessing. Keys for the text encoder (``text_encoder.``,
``lora_te*``) are reported as outside the denoiser; a key of no known pattern is reported as unknown.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from freezeasguard.audit.original_layouts import original_module_aliases
from freezeasguard.guard.mask import Mask
from freezeasguard.audit.verify import Reference, reference



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
    or none. ``aliases``: original-layout module -> diffusers modules (original_layouts.original_module_aliases)."""
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
    return audit_adapter_file(reference(model_dir, mask_path), adapter_path)


def audit_adapter_file(ref: Reference, adapter_path) -> AdapterReport:
    return audit_adapter(read_adapter(adapter_path), ref.shapes, ref.mask, str(adapter_path), ref.base_fingerprint,
                         original_module_aliases(ref.mask.names, ref.denoiser_config))


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
