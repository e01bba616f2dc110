"""Loading pipeline folders (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2, Qwen-Image, Z-Image) from local paths (tiny pipelines
built in code: families/tiny.py).

Nothing here reaches a model hub: every loader takes a local folder and fails with a message
naming the flag to pass when it is missing.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from freezeasguard.models.families import FAMILIES, Family, family_of_pipeline_class

logger = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"     # a diffusers denoiser's weight file (UNet or transformer)


class ModelError(ValueError):
    """A model folder is missing, incomplete or does not match what was asked."""


@dataclass
class Components:
    """The parts of a text-to-image pipeline that training needs: the denoiser (a UNet or a
    transformer, the only trainable module), the VAE, the text encoders and tokenizers in the
    family's order, the scheduler config, and the family (families/) that says how they meet."""

    path: Path
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    family: str = "sd"
    train_resolution: int | None = None    # set_resolution: train at another side than the model's own

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per side of one of the denoiser's latent pixels (FLUX.2 folds 2x2 latents)."""
        return FAMILIES[self.family].latents.geometry(dict(self.vae.config))[1]

    @property
    def latent_channels(self) -> int:
        return FAMILIES[self.family].latents.geometry(dict(self.vae.config))[0]

    @property
    def resolution(self) -> int:
        """The image side training uses: the model's own, unless set_resolution chose another."""
        return self.train_resolution or image_side(dict(self.denoiser.config), dict(self.vae.config), self.family)

    @property
    def resolution_step(self) -> int:
        """What a training side must be a multiple of: the latents' downscaling times the denoiser's."""
        return self.vae_scale_factor * denoiser_downscale(dict(self.denoiser.config), FAMILIES[self.family])

    def set_resolution(self, side: int) -> "Components":
        """Train at ``side`` px (0: the model's own), as diffusers' scripts' --resolution; a side the
        model cannot take is an error naming the nearest that it can."""
        if side:
            step = self.resolution_step
            if side < step or side % step:
                near = max(step, round(side / step) * step)
                raise ModelError(f"--resolution {side}: this model takes multiples of {step} px; use {near}")
        self.train_resolution = side or None
        return self

    @classmethod
    def from_pipeline(cls, pipe, path) -> "Components":
        """The parts of a loaded diffusers pipeline (e.g. a base with a LoRA loaded), any family."""
        family = family_of_pipeline_class(type(pipe).__name__)
        return cls(Path(path), getattr(pipe, family.denoiser_folder), pipe.vae,
                   [getattr(pipe, enc) for enc, _ in family.encoders], [getattr(pipe, tok) for _, tok in family.encoders],
                   dict(pipe.scheduler.config), family.name)

    def to(self, device) -> "Components":
        for module in (self.denoiser, self.vae, *self.text_encoders):
            module.to(device)
        return self


def image_side(denoiser_config: dict, vae_config: dict, family: str = "sd") -> int:
    """The image side a denoiser was built for: its sample_size in latent pixels times the VAE's
    downscaling (UNets, SD3), else the VAE's own sample_size (FLUX's transformers have none), else
    the family's pipeline default (Qwen-Image's configs name no side)."""
    side = denoiser_config.get("sample_size")
    if side is None:
        return int(vae_config.get("sample_size") or FAMILIES[family].default_side)
    side = side[0] if isinstance(side, (list, tuple)) else side
    return int(side) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def denoiser_downscale(denoiser_config: dict, family: Family) -> int:
    """How many latent pixels per side one denoiser token or output pixel covers: a UNet halves
    once per down block but the last; SD3 and Qwen-Image patch (patch_size), FLUX.1 packs 2x2."""
    if "down_block_types" in denoiser_config:
        return 2 ** (len(denoiser_config["down_block_types"]) - 1)
    return family.patch or int(denoiser_config.get("patch_size", 1))


def model_family(path) -> Family:
    """The family of a pipeline folder, from the pipeline class in its model_index.json (a folder
    without one is read as Stable Diffusion 1.x/2.x)."""
    index = Path(path) / "model_index.json"
    if not index.exists():
        return FAMILIES["sd"]
    try:
        return family_of_pipeline_class(json.loads(index.read_text()).get("_class_name"))
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def require_pipeline_dir(path, flag: str = "--model") -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{flag} {path}: no such folder. Pass a local diffusers pipeline folder (Stable Diffusion "
                         f"1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2, Qwen-Image or Z-Image: model_index.json and the parts it lists); nothing is "
                         f"downloaded.")
    family = model_family(path)
    parts = [family.denoiser_folder, "vae", "scheduler"] + [p for pair in family.encoders for p in pair]
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ModelError(f"{flag} {path}: not a complete diffusers {family.name} pipeline folder, missing "
                         f"{', '.join(p + '/' for p in missing)}. Save one with the pipeline's save_pretrained(path).")
    return path


_LIBRARIES = ("diffusers", "transformers")


def load_part(path: Path, name: str, index: dict, flag: str, **kwargs):
    """One component by the class model_index.json names for it (diffusers or transformers only)."""
    library, class_name = index.get(name, [None, None])
    if library not in _LIBRARIES:
        raise ModelError(f"{flag} {path}: model_index.json names {library!r} for {name}; only diffusers and "
                         f"transformers classes are loaded")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ModelError(f"{flag} {path}: {library} has no class {class_name} (for {name}); upgrade {library}?")
    return cls.from_pretrained(path / name, **kwargs)


def load_model(path, flag: str = "--model", denoiser_from=None) -> Components:
    """Load the trainable parts of a local pipeline folder in fp32 (frozen parts in eval mode).

    ``denoiser_from`` loads the denoiser from another folder (a fine-tuned pipeline or a bare
    unet/transformer folder)."""
    path = require_pipeline_dir(path, flag)
    family = model_family(path)
    index = model_index(path)
    weights = dict(dtype=torch.float32, use_safetensors=True)
    try:
        denoiser = load_denoiser(path, flag, denoiser_from)
        vae = load_part(path, "vae", index, flag, **weights)
        encoders = [load_part(path, enc, index, flag, **weights) for enc, _ in family.encoders]
        tokenizers = [load_part(path, tok, index, flag) for _, tok in family.encoders]
    except (OSError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{flag} {path}: cannot load the model ({str(exc).splitlines()[0][:300]}). Every part must "
                         f"be a diffusers/transformers folder with .safetensors weights (pickled .bin weights are "
                         f"never loaded).") from exc
    for tok, (_, name) in zip(tokenizers, family.encoders):
        if len(tok) <= 2:
            raise ModelError(f"{path}/{name} loaded as a {len(tok)}-token tokenizer; the folder is incomplete "
                             f"(needs its vocabulary files).")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    for module in (vae, *encoders):
        module.requires_grad_(False).eval()
    return Components(path, denoiser, vae, encoders, tokenizers, scheduler_config, family.name)


def model_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    return json.loads(index_file.read_text()) if index_file.exists() else {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}


def load_denoiser(path, flag: str = "--model", denoiser_from=None):
    """Only the denoiser of a pipeline folder (from ``denoiser_from`` when given), fp32."""
    path = require_pipeline_dir(path, flag)
    family = model_family(path)
    den_dir = resolve_denoiser_dir(denoiser_from) if denoiser_from is not None else path / family.denoiser_folder
    for f in denoiser_weight_files(den_dir):      # refuses pickles, names truncated files
        _read_safetensors_header(f)
    library, class_name = model_index(path)[family.denoiser_folder]
    # use_safetensors: a folder holding only pickled .bin weights is refused, never unpickled
    return getattr(importlib.import_module("diffusers"), class_name).from_pretrained(den_dir, dtype=torch.float32,
                                                                                     use_safetensors=True)


def resolve_denoiser_dir(path) -> Path:
    """Accept a pipeline folder (with unet/ or transformer/) or a bare denoiser folder."""
    path = Path(path)
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").exists():
            return path / sub
    if (path / "config.json").exists():
        return path
    raise ModelError(f"{path}: neither a pipeline folder with unet/ or transformer/ nor a denoiser folder with "
                     f"config.json.")


def has_denoiser(path) -> bool:
    """Whether a folder is a pipeline with a saved denoiser (or a bare denoiser folder)."""
    try:
        resolve_denoiser_dir(path)
        return True
    except ModelError:
        return False


def denoiser_weight_files(path) -> list[Path]:
    """The safetensors files holding a denoiser's weights: a file, a denoiser folder or a pipeline folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelError(f"{path}: only .safetensors checkpoints are read (pickled files can run code).")
        return [path]
    den_dir = resolve_denoiser_dir(path)
    index = den_dir / (WEIGHTS + ".index.json")
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [den_dir / s for s in shards]
    single = den_dir / WEIGHTS
    if single.exists():
        return [single]
    if any(den_dir.glob("*.bin")):
        raise ModelError(f"{den_dir}: holds only pickled .bin weights, which are never loaded (they can run code). "
                         f"Convert them to safetensors first.")
    raise ModelError(f"{den_dir}: no {WEIGHTS} found.")


def _read_safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, or a ModelError naming a truncated or corrupt file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {"keys": list(f.keys())}
    except Exception as exc:        # SafetensorError has no public base class to catch
        raise ModelError(f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt. "
                         f"Copy it again from its source.") from exc


def load_denoiser_state(path) -> dict[str, torch.Tensor]:
    """Read the denoiser's weights from safetensors without building the model."""

    state: dict[str, torch.Tensor] = {}
    for f in denoiser_weight_files(path):
        _read_safetensors_header(f)
        try:
            state.update(load_file(str(f)))
        except Exception as exc:
            raise ModelError(f"{f}: cannot read its tensors ({exc}); the file is truncated or corrupt.") from exc
    return state


class LazyState(Mapping):
    """A denoiser's weights as a Mapping that reads one tensor at a time from its safetensors
    files: the base model's weights without a second full copy of them in memory (mask learning
    reads theta_pre once, tensor by tensor; at SD v1.5's size a copy is 3.4 GB)."""

    def __init__(self, path):
        self.file_of: dict[str, Path] = {}
        self._open: dict[Path, object] = {}       # one memory-mapped handle per file, opened once
        for f in denoiser_weight_files(path):
            for key in _read_safetensors_header(f)["keys"]:
                self.file_of[key] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self.file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(name)

    def __iter__(self):
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def fingerprint(named_tensors) -> dict:
    """Identify a model by its parameter names, shapes and a hash of the weight bytes.
    ``named_tensors``: (name, tensor) pairs, or a Mapping (read one tensor at a time)."""
    names, shapes = [], []
    weights = hashlib.blake2b(digest_size=16)
    # sorted by name: a model's parameter order and a safetensors file's key order differ
    if isinstance(named_tensors, Mapping):
        pairs = ((name, named_tensors[name]) for name in sorted(named_tensors))
    else:
        pairs = sorted(named_tensors, key=lambda kv: kv[0])
    for name, t in pairs:
        t = t.detach().to("cpu").contiguous()
        names.append(name)
        shapes.append(list(t.shape))
        weights.update(str(t.dtype).encode())
        weights.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")   # the buffer, not a copy
    return {
        "num_tensors": len(names),
        "names_hash": hashlib.blake2b("\n".join(names).encode(), digest_size=16).hexdigest(),
        "shapes_hash": hashlib.blake2b(json.dumps(shapes).encode(), digest_size=16).hexdigest(),
        "weights_hash": weights.hexdigest(),
    }
