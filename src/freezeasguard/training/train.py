"""The training core both recipes use (guarded fine-tuning, finetune.py; mask learning's warm
start, learn.py): the settings every run has, the device and precision, the step loop with its
finite-loss check and resumable checkpoints, and saving a pipeline folder."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from freezeasguard.training import dist
from freezeasguard.training.batches import DomainMix, domain_means, weighted_loss
from freezeasguard.models.generate import generate_images, pipeline_from_components, save_grid
from freezeasguard.io import atomic_write_json, normal_permissions
from freezeasguard.models.pipelines import Components, model_family
from freezeasguard.training.optim import build_optimizer, checkpoint_tensors, restore_checkpoint
from freezeasguard.outputs import MARKER, mark_output, partial_dir, replace_dir
from freezeasguard.settings import setting
from freezeasguard.training.shard import checkpoint_exists, is_sharded, load_checkpoint, local, save_checkpoint

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class RunSettings:
    """What every training run has, whatever it trains for: `learn` and `finetune` both inherit
    these (each may give one another default)."""
    seed: int = setting(0, "seed of every random draw of the run (logits' start, data order, noise, timesteps)")
    mixed_precision: str = setting("no", "autocast on GPU; parameters (and mask logits, theta_d) stay fp32",
                                   choices=MIXED_PRECISION)
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")
    resolution: int = setting(0, "image side to train at (0: the model's own, e.g. 512 for SD 1.5, 1024 for SDXL "
                                 "and FLUX.1); smaller saves memory and time")
    shard: bool = setting(False, "with several processes (accelerate launch): shard the denoiser, its gradients and "
                                 "optimizer state or theta_d across them (PyTorch FSDP2) instead of replicating them; "
                                 "checkpoints are a file per process, and --resume needs as many processes")
    checkpoint_every: int = setting(100, "steps between resumable checkpoints (0: never)")
    device: str = setting("auto", "cpu, cuda, cuda:1 ... (auto: cuda if available)")

    def check_run_settings(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: use one of {MIXED_PRECISION}")


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or weights; nothing was written."""


def check_finite_loss(losses: torch.Tensor, step: int, what: str, lr: float):
    """Stop a diverging run before it writes NaN weights that would load, verify and sample."""
    if not torch.isfinite(losses).all():
        value = losses[~torch.isfinite(losses)][0].item()
        raise DivergedError(f"{what} diverged: the loss is {value} at step {step} (learning rate {lr:g}). No model "
                            f"was written. Lower the learning rate (and check the data), then run again.")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(mixed_precision: str, device: torch.device):
    if mixed_precision == "no" or device.type == "cpu":
        return None
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def train_denoiser(components: Components, mix: DomainMix, cfg, work_dir: Path | None = None,
               resume: bool = False, desc: str = "fine-tune", on_step=None) -> list[dict]:
    """The chosen optimizer on the denoiser's trainable tensors (``cfg``: a FinetuneConfig). Gradient accumulation draws the step's whole batch
    (data and noise) once and backpropagates it in grad_accum chunks; every sample carries weight
    1/batch_size, so the accumulated gradient equals the one-batch gradient."""
    device = next(components.denoiser.parameters()).device
    denoiser = components.denoiser
    denoiser.train()
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    optimizer = build_optimizer(denoiser, cfg)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    sharded = any(is_sharded(p) for p in trainable)     # finetune --shard: a checkpoint file per rank
    amp = autocast_dtype(cfg.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    ckpt = work_dir / "checkpoint.safetensors" if work_dir else None
    start = 0
    if resume and ckpt is not None and checkpoint_exists(ckpt, sharded):
        start = restore_checkpoint(load_checkpoint(ckpt, sharded)[0], denoiser, optimizer, mix)
        logger.info("resumed %s from step %d (%s)", desc, start, ckpt)
    history = []
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not dist.is_main(), initial=start, total=cfg.steps)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        totals = [0.0] * len(mix.domains)
        batch = mix.draw(device)
        per_sample = []
        for micro in batch.chunks(cfg.grad_accum):
            loss, losses = weighted_loss(denoiser, micro, mix.schedule, amp)
            (scaler.scale(loss) if scaler else loss).backward()
            per_sample.append(losses)
        check_finite_loss(torch.cat(per_sample).detach(), step + 1, desc, cfg.lr)
        totals = domain_means(torch.cat(per_sample), batch, len(mix.domains))
        for p in trainable:
            if p.grad is not None and not is_sharded(p):     # FSDP has reduce-scattered sharded ones
                dist.all_reduce_sum_(p.grad)
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        record = {"step": step + 1, **{f"loss_{d.name}": v for d, v in zip(mix.domains, totals)}}
        history.append(record)
        if on_step is not None:      # progress for a caller (the service); raising here stops the run
            on_step(step + 1, cfg.steps, record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "step"})
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt, checkpoint_tensors(denoiser, optimizer, mix, step + 1, scaler), step + 1, sharded)
        if cfg.validation_every and cfg.validation_prompts and work_dir is not None and not sharded \
                and (step + 1) % cfg.validation_every == 0 and dist.is_main():
            _validation_images(components, cfg, work_dir / "validation" / f"step{step + 1:06d}.png")
            denoiser.train()
    denoiser.eval()
    bad = [n for n, p in denoiser.named_parameters() if p.requires_grad and not torch.isfinite(local(p)).all()]
    if bad:
        raise DivergedError(f"{desc} diverged: {len(bad)} weight tensors hold inf/NaN after {cfg.steps} steps "
                            f"(first: {bad[0]}). No model was written. Lower the learning rate and run again.")
    return history


def _validation_images(components, cfg, path: Path):
    pipe = pipeline_from_components(components)
    images = generate_images(pipe, list(cfg.validation_prompts), steps=20, seed=cfg.seed, side=components.resolution)
    save_grid(images, path)


def save_pipeline(base_dir: Path, denoiser, out_dir: Path, manifest: dict, command: str = "finetune") -> Path:
    """Write a from_pretrained-loadable pipeline: the base folder's other parts plus the new denoiser.
    Written beside the target and renamed into place, so a kill leaves no half-written folder; an
    earlier output there (checked by prepare_output_dir: this command's own) is replaced only
    once the new one is complete."""
    out_dir = Path(out_dir)
    tmp = partial_dir(out_dir, command, create=False)
    folder = model_family(base_dir).denoiser_folder
    shutil.copytree(base_dir, tmp, ignore=lambda d, names: ([folder, MARKER] if Path(d) == Path(base_dir) else []))
    mark_output(tmp, command, base_model=str(Path(base_dir).resolve()))
    denoiser.save_pretrained(tmp / folder, safe_serialization=True)
    atomic_write_json(tmp / "freezeasguard_manifest.json", manifest)
    normal_permissions(tmp)
    return replace_dir(tmp, out_dir)


