"""Image generation from a (fine-tuned) pipeline folder with the folder's own scheduler (PNDM in
SD's folders, as the paper, 50 steps; DDIM from pure noise in the shipped tiny model's)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from freezeasguard.models.families import FAMILIES, family_of_pipeline_class
from freezeasguard.io import atomic_write_json
from freezeasguard.training.lora import lora_base
from freezeasguard.models.pipelines import image_side, model_family, require_pipeline_dir
from freezeasguard.outputs import prepare_output_dir, write_image_folder

logger = logging.getLogger(__name__)


def load_pipeline(path, device="cpu"):
    """A pipeline folder of any family, or a guarded-LoRA output folder (its base model with the
    LoRA loaded)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    base = lora_base(path)
    folder = require_pipeline_dir(base or path)
    if model_family(folder).name == "sd":
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                       dtype=torch.float32)
    else:       # SDXL, SD3, FLUX: the pipeline class the folder names
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    if base is not None:
        pipe.load_lora_weights(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_from_components(components):
    """A pipeline of the components' own family over the loaded parts (validation images during
    fine-tuning): the class the family's folders name, its denoiser, text encoders, tokenizers,
    VAE and the folder's own sampler."""
    import diffusers

    family = FAMILIES[components.family]
    # the folder's own sampler (PNDM in SD's folders): a schedule such as zero terminal SNR exists
    # only in the classes that implement it, and another class would sample from other noise levels
    sampler = getattr(diffusers, components.scheduler_config.get("_class_name") or "PNDMScheduler")
    parts = {family.denoiser_folder: components.denoiser, "vae": components.vae,
             "scheduler": sampler.from_config(components.scheduler_config)}
    for (encoder, tokenizer), e, t in zip(family.encoders, components.text_encoders, components.tokenizers):
        parts[encoder], parts[tokenizer] = e, t
    if components.family == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, family.pipeline_classes[0])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(pipe, prompts: list[str], steps: int = 50, seed: int = 0, guidance: float = 7.5,
                    per_prompt: int = 1, batch_size: int = 16, progress: bool = False, side: int | None = None):
    """One list of PIL images, ``per_prompt`` per prompt in prompt order; image j of prompt i
    uses seed + i * per_prompt + j: every image starts from its own noise, and an image does not
    depend on what else is in the batch. ``side``: image side in px (default: the model's own)."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    was_training = denoiser.training
    denoiser.eval()
    family = family_of_pipeline_class(type(pipe).__name__).name
    side = side or image_side(dict(denoiser.config), dict(pipe.vae.config), family)
    jobs = [(p, seed + i * per_prompt + j) for i, p in enumerate(prompts) for j in range(per_prompt)]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        chunk = jobs[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        out = pipe(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=side, width=side)
        images += out.images
    denoiser.train(was_training)
    return images


def grid_image(images, columns: int | None = None) -> Image.Image:
    """The images side by side, ``columns`` to a row (default: up to 8)."""
    columns = columns or min(len(images), 8)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def save_grid(images, path, columns: int | None = None) -> Path:
    grid = grid_image(images, columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def generate_to_folder(model_dir, prompts: list[str], out_dir, steps=50, seed=0, guidance=7.5, per_prompt=1,
                       device="cpu", overwrite: bool = False, side: int | None = None) -> list[Path]:
    """Write PNGs named <index>_<prompt>_<seed>.png, metadata.jsonl (file_name, text, seed), a
    grid.png, and prompts.json mapping files to prompts."""
    prepare_output_dir(out_dir, "generate", {"--model": model_dir}, overwrite)
    pipe = load_pipeline(model_dir, device)
    images = generate_images(pipe, prompts, steps, seed, guidance, per_prompt, progress=True, side=side)
    # image k used seed + k
    rows = [{"file_name": f"{k:04d}_{slug(prompts[k // per_prompt])}_s{seed + k}.png", "text": prompts[k // per_prompt],
             "seed": seed + k} for k in range(len(images))]

    def extras(folder):
        save_grid(images, folder / "grid.png", columns=per_prompt if per_prompt > 1 else None)
        atomic_write_json(folder / "prompts.json", [{"file": r["file_name"], "prompt": r["text"], "seed": r["seed"]}
                                                    for r in rows])
    out_dir = write_image_folder(out_dir, images, rows, "generate", {"--model": model_dir}, overwrite, extras)
    logger.info("wrote %d images to %s", len(images), out_dir)
    return [out_dir / r["file_name"] for r in rows]
