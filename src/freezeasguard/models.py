"""Loading pipeline folders (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) from local paths, and the tiny SD
pipelines built in code (tiny pipelines of the other families: families/tiny.py).

Nothing here reaches a model hub: every loader takes a local folder and fails with a message
naming the flag to pass when it is missing.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .families import FAMILIES, Family, family_of_pipeline_class

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
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image side training uses: the model's own, unless set_resolution chose another."""
        return self.train_resolution or image_side(dict(self.denoiser.config), dict(self.vae.config))

    @property
    def resolution_step(self) -> int:
        """What a training side must be a multiple of: the VAE's downscaling times the denoiser's
        (a UNet halves the latent once per down block but the last; SD3 patches, FLUX packs 2x2)."""
        config = dict(self.denoiser.config)
        if "down_block_types" in config:
            factor = 2 ** (len(config["down_block_types"]) - 1)
        else:
            factor = 2 if self.family == "flux" else int(config.get("patch_size", 1))
        return self.vae_scale_factor * factor

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


def image_side(denoiser_config: dict, vae_config: dict) -> int:
    """The image side a denoiser was built for: its sample_size in latent pixels times the VAE's
    downscaling (UNets, SD3), else the VAE's own sample_size (FLUX's transformer has none)."""
    side = denoiser_config.get("sample_size")
    if side is None:
        return int(vae_config["sample_size"])
    side = side[0] if isinstance(side, (list, tuple)) else side
    return int(side) * 2 ** (len(vae_config["block_out_channels"]) - 1)


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
                         f"1.x/2.x, SDXL, SD3/3.5 or FLUX.1: model_index.json and the parts it lists); nothing is "
                         f"downloaded.")
    family = model_family(path)
    parts = [family.denoiser_folder, "vae", "scheduler"] + [p for pair in family.encoders for p in pair]
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ModelError(f"{flag} {path}: not a complete diffusers {family.name} pipeline folder, missing "
                         f"{', '.join(p + '/' for p in missing)}. Save one with the pipeline's save_pretrained(path).")
    return path


_LIBRARIES = ("diffusers", "transformers")


def _load_part(path: Path, name: str, index: dict, flag: str, **kwargs):
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
    index = _model_index(path)
    weights = dict(dtype=torch.float32, use_safetensors=True)
    try:
        denoiser = load_denoiser(path, flag, denoiser_from)
        vae = _load_part(path, "vae", index, flag, **weights)
        encoders = [_load_part(path, enc, index, flag, **weights) for enc, _ in family.encoders]
        tokenizers = [_load_part(path, tok, index, flag) for _, tok in family.encoders]
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


def _model_index(path: Path) -> dict:
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
    library, class_name = _model_index(path)[family.denoiser_folder]
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


def fingerprint(named_tensors) -> dict:
    """Identify a model by its parameter names, shapes and a hash of the weight bytes."""
    names, shapes = [], []
    weights = hashlib.blake2b(digest_size=16)
    # sorted by name: a model's parameter order and a safetensors file's key order differ
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        names.append(name)
        shapes.append(list(t.shape))
        weights.update(str(t.dtype).encode())
        weights.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {
        "num_tensors": len(names),
        "names_hash": hashlib.blake2b("\n".join(names).encode(), digest_size=16).hexdigest(),
        "shapes_hash": hashlib.blake2b(json.dumps(shapes).encode(), digest_size=16).hexdigest(),
        "weights_hash": weights.hexdigest(),
    }


# --------------------------------------------------------------------------------------------
# Tiny pipelines built in code (tests, the walk-through, benchmarks)
# --------------------------------------------------------------------------------------------

_CAPTION_WORDS = """a an the of in on with and photo portrait person man woman wearing smiling front wall
logo minimalist shape above below left right beside circle square triangle star red green blue yellow
black white orange purple pink brown gray grey striped dotted plain checked scarf shirt dress hat coat
sweater jacket background brick wooden garden sky sea room hair glasses beard mole eyes looking at
frowning laughing neutral surprised is dog cat tree car house""".split()


def build_offline_tokenizer(extra_words=(), model_max_length: int = 77):
    """A real byte-pair CLIPTokenizer whose vocabulary is made here: every character plus whole-word
    merges for common caption words. Unknown words fall back to characters, so any text tokenises."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen_merges = set()
    for word in dict.fromkeys(list(_CAPTION_WORDS) + [w.lower() for w in extra_words]):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            tokens.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    assert len(tok) > 2, "transformers built a degenerate tokenizer"
    return tok


def tiny_unet_config(layout: str = "sd15", sample_size: int = 8, cross_attention_dim: int = 32,
                     block_out_channels=None) -> dict:
    """UNet configs. ``sd15``: the SD v1.5 block layout (686 parameter names, same order) with small
    widths. ``mini``: two blocks, for the fastest tests. ``sd15-shapes``: the real SD v1.5 UNet."""
    if layout in ("sd15", "sd15-shapes"):
        real = layout == "sd15-shapes"
        return dict(
            sample_size=64 if real else sample_size,
            in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=list(block_out_channels or ((320, 640, 1280, 1280) if real else (32, 64, 128, 128))),
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            cross_attention_dim=768 if real else cross_attention_dim,
            attention_head_dim=8, norm_num_groups=32,
        )
    if layout == "mini":
        return dict(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=list(block_out_channels or (32, 64)),
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
        )
    raise ValueError(f"unknown UNet layout {layout!r}; use sd15, mini or sd15-shapes")


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion's noise schedule (scaled-linear betas, 1000 steps). clip_sample=False as in
    SD's own scheduler configs: DDIM/DDPM built from this config would otherwise clip each x0
    estimate to [-1, 1], which wrecks latents (their scale is ~1, not bounded by 1)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                prediction_type=prediction_type)


def build_tiny_pipeline(layout: str = "sd15", image_size: int = 16, prediction_type: str = "epsilon",
                        seed: int = 0, extra_words=(), unet_channels=None):
    """A randomly initialised Stable-Diffusion-shaped pipeline small enough for a CPU."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_offline_tokenizer(extra_words)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32,
                        sample_size=image_size)
    latent = image_size // 2
    if layout == "sd15" and latent % 8:
        raise ValueError(f"image_size {image_size}: the sd15 layout needs a latent side divisible by 8 "
                         f"(image_size a multiple of 16)")
    unet = UNet2DConditionModel(**tiny_unet_config(layout, sample_size=latent, block_out_channels=unet_channels))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler.from_config(scheduler_config(prediction_type))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(out_dir, **kwargs) -> Path:
    pipe = build_tiny_pipeline(**kwargs)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    logger.info("saved a tiny %s pipeline to %s", kwargs.get("layout", "sd15"), out_dir)
    return out_dir


