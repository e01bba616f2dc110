"""LoRA under a freezing mask: guarded LoRA fine-tuning, and the audit of adapter files.

Guarded LoRA (``freezeasguard finetune --lora-rank R``) puts adapters only on modules whose
parameters are all trainable under the mask; a requested target that the mask freezes is an
error naming it, never silently dropped. The base weights stay untouched (checked after
training), and the adapter is saved in the diffusers/peft format that
``pipeline.load_lora_weights`` reads.

The audit answers which UNet parameters a LoRA file would change.

Freezing a tensor does not stop an adapter from being placed on its module: a LoRA on a frozen
``attn2.to_k`` changes exactly what the publisher froze. The audit reads an adapter file in the
formats people publish and maps every key to the UNet parameter it changes:

- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B`` (``pipeline.save_lora_weights``),
  ``base_model.model.<module>...`` (peft), bare ``<module>.lora_A.weight``, and the older
  attention-processor form ``<block>.processor.to_q_lora.down.weight``;
- kohya sd-scripts: ``lora_unet_<module with dots as underscores>.lora_down.weight`` /
  ``lora_up`` / ``.alpha``;
- LyCORIS on the same names: LoCon (``lora_mid``), LoHa (``hada_*``), LoKr (``lokr_*``), DoRA
  (``dora_scale``), full and norm diffs (``diff``, ``diff_b``, ``w_norm``, ``b_norm``).

kohya's names replace the dots of a module path by underscores, and module names hold
underscores themselves (``transformer_blocks``, ``to_q``), so a name is resolved against the
model's own modules, never split by guessing. Keys for the text encoder (``text_encoder.``,
``lora_te*``) are reported as outside the UNet; a key of no known pattern is reported as unknown.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .mask import Mask
from .models import fingerprint, load_denoiser_state
from .settings import setting

LORA_FILE = "pytorch_lora_weights.safetensors"      # the name diffusers' save/load_lora_weights use
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # attention projections, as diffusers' LoRA scripts


@dataclass
class LoraSettings:
    """A guarded LoRA fine-tune (rank 0: no adapter, full fine-tuning under the mask)."""
    rank: int = setting(0, "train a LoRA of this rank instead of the UNet's weights (0: no LoRA)", flag="--lora-rank")
    alpha: float | None = setting(None, "LoRA alpha (none: the rank, i.e. scale 1)", flag="--lora-alpha")
    targets: str | None = setting(None, "modules to adapt, by peft's rules: a regex that must match the whole module "
                                        "name, or comma-separated names (a name matches itself and any module ending "
                                        "in .name); none: every attention projection (to_q, to_k, to_v, to_out.0) "
                                        "the mask allows", flag="--lora-targets")


def _peft_matches(spec: str, name: str) -> bool:
    if "," in spec or re.fullmatch(r"[\w.]+", spec):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        return any(name == p or name.endswith(f".{p}") for p in parts)
    return re.fullmatch(spec, name) is not None


def choose_targets(unet, mask: Mask, settings: LoraSettings) -> list[str]:
    """The modules to put adapters on: requested (or default) Linear/Conv2d modules, every one
    of them trainable under the mask; a frozen request is an error naming it."""
    frozen = set(mask.frozen_names)
    able = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    blocked = {n for n, m in able.items() if any(f"{n}.{k}" in frozen for k, _ in m.named_parameters())}
    if settings.targets:
        chosen = [n for n in able if _peft_matches(settings.targets, n)]
        if not chosen:
            raise ValueError(f"--lora-targets {settings.targets!r} matches no Linear/Conv2d module of the UNet "
                             f"(module names look like {next(iter(able))}).")
        refused = [n for n in chosen if n in blocked]
        if refused:
            raise ValueError(f"--lora-targets asks for {len(refused)} modules the mask freezes (first: {refused[0]}); "
                             f"an adapter there would change frozen weights. Leave them out.")
    else:
        chosen = [n for n in able if n not in blocked and any(n == t or n.endswith(f".{t}") for t in DEFAULT_TARGETS)]
        if not chosen:
            raise ValueError("the mask freezes every attention projection; name other modules with --lora-targets")
    for n in chosen:
        w = able[n].weight
        if settings.rank > min(w.shape[0], w.shape[1]):
            raise ValueError(f"--lora-rank {settings.rank} is larger than module {n} ({w.shape[1]} -> {w.shape[0]}); "
                             f"a rank above min(in, out) adds nothing. Use at most {min(w.shape[0], w.shape[1])}.")
    return chosen


class NoAllowedModules(ValueError):
    """An attacker's LoRA recipe finds no module the mask leaves trainable."""


def attacker_targets(unet, mask: Mask, settings: LoraSettings) -> tuple[list[str], LoraSettings]:
    """What an illegal user gets from a LoRA recipe under the mask: the requested (or default)
    modules the mask leaves fully trainable, frozen ones left out rather than refused, and the
    rank capped at the smallest chosen module (a rank-128 recipe on a model whose projections
    are 32 wide is a rank-32 LoRA). NoAllowedModules when nothing is left."""
    frozen = set(mask.frozen_names)
    able = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    allowed = [n for n, m in able.items() if not any(f"{n}.{k}" in frozen for k, _ in m.named_parameters())]
    if settings.targets:
        chosen = [n for n in allowed if _peft_matches(settings.targets, n)]
    else:
        chosen = [n for n in allowed if any(n == t or n.endswith(f".{t}") for t in DEFAULT_TARGETS)]
    if not chosen:
        raise NoAllowedModules(f"no module the recipe asks for ({settings.targets or 'attention projections'}) is "
                               f"trainable under the mask")
    cap = min(min(able[n].weight.shape[0], able[n].weight.shape[1]) for n in chosen)
    return chosen, LoraSettings(rank=min(settings.rank, cap), alpha=settings.alpha, targets=settings.targets)


def add_lora(unet, targets: list[str], settings: LoraSettings) -> None:
    """Freeze every UNet weight and put a fresh LoRA (peft) on exactly ``targets``."""
    from peft import LoraConfig  # imports transformers (seconds): only guarded LoRA pays for it

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                                target_modules=list(targets), init_lora_weights=True))
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def base_weights_moved(unet, base: dict[str, torch.Tensor]) -> list[str]:
    """UNet weights (under their plain names) that differ from the base model's: none, after a LoRA."""
    moved = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        if not torch.equal(p.detach().cpu(), base[plain].to(p.dtype)):
            moved.append(plain)
    return moved


def lora_base(folder) -> Path | None:
    """The base model of a guarded-LoRA output folder (its manifest says), or None for any other folder."""
    folder = Path(folder)
    manifest = folder / "freezeasguard_manifest.json"
    if not (folder / LORA_FILE).is_file() or not manifest.is_file():
        return None
    return Path(json.loads(manifest.read_text())["base_model"])


# the pipeline class whose save_lora_weights writes each family's keys (unet. or transformer.)
LORA_WRITERS = {"sd": ("StableDiffusionPipeline", "unet_lora_layers"),
                "sdxl": ("StableDiffusionXLPipeline", "unet_lora_layers"),
                "sd3": ("StableDiffusion3Pipeline", "transformer_lora_layers"),
                "flux": ("FluxPipeline", "transformer_lora_layers")}


def save_lora(denoiser, folder: Path, family: str = "sd") -> Path:
    """The adapter in the diffusers/peft format that the family's pipeline.load_lora_weights reads
    (unet.<module>.lora_A.weight ..., transformer.<module>... for SD3 and FLUX)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    cls, arg = LORA_WRITERS[family]
    getattr(diffusers, cls).save_lora_weights(folder, **{arg: get_peft_model_state_dict(denoiser)},
                                              safe_serialization=True)
    return folder / LORA_FILE

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
UNET_DOTTED_PREFIXES = ("unet.", "transformer.", "base_model.model.", "model.diffusion_model.")
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


def resolve_module(module_part: str, modules: set[str], underscored: dict[str, str]) -> str | None:
    """The UNet module a key's module part names, or None."""
    if module_part.startswith(KOHYA_UNET_PREFIX):
        return underscored.get(module_part[len(KOHYA_UNET_PREFIX):])
    for prefix in UNET_DOTTED_PREFIXES:
        if module_part.startswith(prefix):
            module_part = module_part[len(prefix):]
            break
    m = _PROCESSOR.search(module_part)
    if m:
        module_part = module_part[: m.start()] + "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1))
    return module_part if module_part in modules else None


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
                  file: str = "") -> AdapterReport:
    """Map every adapter key to the UNet parameter it changes; a changed frozen parameter is a
    violation. ``adapter``: key -> shape (read_adapter)."""
    mask.check_matches(list(base.items()), fingerprint(base.items()), what="the base model", state_dict=True)
    modules, underscored = module_index(base)
    frozen = set(mask.frozen_names)
    report = AdapterReport(file, True)
    mismatched = []
    for key, shape in sorted(adapter.items()):
        if key.startswith(TEXT_PREFIXES):
            report.outside_unet.append(key)
            continue
        parts = split_key(key)
        module = resolve_module(parts[0], modules, underscored) if parts else None
        if module is None:
            report.unknown.append(key)
            continue
        if parts[1] == "meta":
            continue
        param = f"{module}.{parts[1]}"
        if param not in base:
            report.unknown.append(key)
            continue
        problem = _check_shape(key, shape, tuple(base[f"{module}.weight"].shape)) if f"{module}.weight" in base else None
        if problem:
            mismatched.append(problem)
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
    """The audit of an adapter file against a base model and its mask."""
    return audit_adapter(read_adapter(adapter_path), load_denoiser_state(model_dir), Mask.load(mask_path),
                         str(adapter_path))


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
        lines.insert(0, f"COMPLIANT: the adapter changes {len(report.changed)} UNet parameters, none of them frozen.")
    return "\n".join(lines)
