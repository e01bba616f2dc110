"""What an experiment keeps loaded: the pipeline it is evaluating (its named and unnamed portraits,
each subject's prompts and the held-out loss all read the same folder; a third of the quick demo's
time was reloading it), and the models its users start fine-tunes from (every fine-tune starts
from the base or one edited release; reading the tiny model's folder took a fifth of the quick
demo's fine-tuning time)."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from freezeasguard.models.generate import load_pipeline
from freezeasguard.models.pipelines import Components, load_model, load_part, model_family, model_index
from freezeasguard.training.lora import lora_base

# models whose weight files stay under this are kept in memory between uses (the built-in world's
# tiny model: 11 MB); a real model's gigabytes are read again, their memory being needed
KEEP_BYTES = 512 * 2**20


def model_key(model_dir) -> tuple:
    """What identifies a model folder's weights on disk: its path and each weight file's size and
    modification time (a fine-tune replaces its folder whole, so a new model gets a new key)."""
    folder = Path(model_dir).resolve()
    return (str(folder),) + tuple(sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                                         for f in folder.rglob("*.safetensors")))


def weight_bytes(key: tuple) -> int:
    """The size of a model's weight files, from its ``model_key``."""
    return sum(size for _, size, _ in key[1:])


class LoadedModel:
    """At most one pipeline, keyed by ``model_key``: a folder replaced by a new fine-tune is loaded
    again; ``drop()`` frees it before a fine-tune needs the memory. A pipeline is valid until the
    next ``get`` of another folder: a small Stable Diffusion folder is assembled from parts already
    loaded, its VAE, text encoder and tokenizer where their files are byte for byte the last
    folder's (a fine-tune copies them from its base), and the last UNet given this folder's weights
    (building the UNet was half of each load)."""

    def __init__(self, keep_bytes: int = KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self._loaded: tuple[tuple, object] | None = None
        self._parts: dict[str, tuple[tuple, object]] = {}     # part -> (its files' hashes, the loaded part)
        self._unet: tuple[str, torch.nn.Module] | None = None  # (config.json's text, the UNet built for it)

    def get(self, model_dir):
        key = model_key(model_dir)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None      # the previous model's memory goes before the next loads
            self._loaded = (key, self._assemble(Path(model_dir), key) or load_pipeline(model_dir))
        return self._loaded[1]

    def drop(self):
        """Free the pipeline (a small model's kept parts stay: they are what makes the next load fast)."""
        self._loaded = None

    def _assemble(self, folder: Path, key: tuple):
        """The folder's pipeline from kept parts, or None where this does not apply (a LoRA folder,
        another family, sharded UNet weights, a model over ``keep_bytes``)."""
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        complete = weights.exists() and all((folder / p).is_dir() for p in ("vae", "text_encoder", "tokenizer",
                                                                             "scheduler"))
        if not complete or lora_base(folder) is not None or model_family(folder).name != "sd" \
                or weight_bytes(key) > self.keep_bytes:
            return None
        import diffusers

        index = model_index(folder)
        parts = {}
        for name in ("vae", "text_encoder", "tokenizer"):
            hashes = file_hashes(folder / name)
            if self._parts.get(name, (None,))[0] != hashes:
                extra = {} if name == "tokenizer" else {"dtype": torch.float32, "use_safetensors": True}
                part = load_part(folder, name, index, "--model", **extra)
                if name != "tokenizer":
                    part.requires_grad_(False).eval()
                self._parts[name] = (hashes, part)
            parts[name] = self._parts[name][1]
        config = (folder / "unet" / "config.json").read_text()
        if self._unet is None or self._unet[0] != config:
            self._unet = (config, getattr(diffusers, index["unet"][1]).from_pretrained(
                folder / "unet", dtype=torch.float32, use_safetensors=True))
        else:       # the previous pipeline's UNet, given this folder's weights (the previous one is gone)
            self._unet[1].load_state_dict(load_file(str(weights)), strict=True)
        unet = self._unet[1]
        sampler = getattr(diffusers, index["scheduler"][1])
        scheduler = sampler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
        pipe = diffusers.StableDiffusionPipeline(**parts, unet=unet, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def file_hashes(folder: Path) -> tuple:
    """Every file under a folder: its relative name and a hash of its bytes."""
    return tuple((str(f.relative_to(folder)), hashlib.blake2b(f.read_bytes(), digest_size=16).hexdigest())
                 for f in sorted(folder.rglob("*")) if f.is_file())


class StartingModels:
    """The models users start their fine-tunes from, each read once and handed out as a copy (a
    fine-tune trains the copy it is given). A model whose weight files pass ``keep_bytes`` (a real
    SD's gigabytes) is not kept: reading it again costs little beside its fine-tune, and the
    fine-tune needs the memory."""

    def __init__(self, keep_bytes: int = KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self._kept: dict[tuple, Components] = {}

    def copy_of(self, model_dir) -> Components | None:
        """A private copy of the folder's components, or None where the fine-tune should read the
        folder itself (too large to keep, or a LoRA folder: its base and adapter load together)."""
        if lora_base(model_dir) is not None:
            return None
        key = model_key(model_dir)
        if key not in self._kept:
            if weight_bytes(key) > self.keep_bytes:
                return None
            self._kept[key] = load_model(model_dir)
        return copy.deepcopy(self._kept[key])
