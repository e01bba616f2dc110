"""Guarded fine-tuning: the publisher's fine-tuning API, which enforces a freezing mask.

Enforcement is more than requires_grad: frozen tensors are left out of every optimizer group
(AdamW's weight decay would otherwise still move them), and after training every frozen tensor
is compared bit for bit with the base model's; the run fails if one moved.

Named steps, as a recipe: setup -> train -> check_frozen_unchanged -> save_pipeline.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import dist
from .batches import Domain, DomainMix, domain_means, weighted_loss
from .data import EncodedData, data_fingerprint, load_image_captions
from .diffusion import NoiseSchedule
from .generate import generate_images, pipeline_from_components, save_grid
from .io import atomic_write_json, normal_permissions
from .lora import LORA_FILE, LoraSettings, add_lora, attacker_targets, base_weights_moved, choose_targets, save_lora
from .mask import Mask, check_ratio
from .models import Components, fingerprint, load_denoiser_state, load_model, model_family
from .outputs import MARKER, check_provenance, mark_output, partial_dir, prepare_output_dir, replace_dir
from .optim import OPTIMIZERS, build_optimizer, checkpoint_tensors, restore_checkpoint
from .settings import setting
from .shard import (
    checkpoint_exists,
    full_state,
    is_sharded,
    load_checkpoint,
    local,
    plain_copy,
    save_checkpoint,
    shard_denoiser,
)

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")


class EnforcementError(RuntimeError):
    """A frozen tensor moved during guarded fine-tuning."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or weights; nothing was written."""


def check_finite_loss(losses: torch.Tensor, step: int, what: str, lr: float):
    """Stop a diverging run before it writes NaN weights that would load, verify and sample."""
    if not torch.isfinite(losses).all():
        value = losses[~torch.isfinite(losses)][0].item()
        raise DivergedError(f"{what} diverged: the loss is {value} at step {step} (learning rate {lr:g}). No model "
                            f"was written. Lower the learning rate (and check the data), then run again.")


@dataclass
class FinetuneConfig:
    """Settings of one guarded fine-tuning run (the paper's illegal user unless noted)."""
    steps: int = setting(2000, "optimizer steps")
    batch_size: int = setting(4, "samples per optimizer step, over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step (each process's share is split)")
    lr: float = setting(1e-5, "learning rate (prodigy: a multiplier of its own estimate, 1.0 as its authors use it)")
    optimizer: str = setting("adamw", "adamw (diffusers' scripts), sgd (momentum 0.9), adafactor (transformers', "
                                      "fixed lr), prodigy (prodigyopt, learning-rate free)", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-2, "weight decay (diffusers' default); adafactor: none")
    prior_weight: float = setting(1.0, "with prior data (DreamBooth's prior preservation): the weight of its loss")
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 turns it off")
    seed: int = setting(0, "seed of the data order, noise and timesteps")
    mixed_precision: str = setting("no", "autocast on GPU; parameters stay fp32", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")
    resolution: int = setting(0, "image side to train at (0: the model's own, e.g. 512 for SD 1.5, 1024 for SDXL "
                                 "and FLUX.1); smaller saves memory and time")
    shard: bool = setting(False, "with several processes (accelerate launch): shard weights, gradients and optimizer "
                                 "state across them (PyTorch FSDP2) instead of replicating the model; "
                                 "checkpoints are a file per process, and --resume needs as many processes")
    checkpoint_every: int = setting(100, "steps between resumable checkpoints (0: never)")
    validation_prompts: tuple[str, ...] = setting((), "prompt for validation images", flag="--validation-prompt")
    validation_every: int = setting(0, "steps between validation grids (0: none)")
    device: str = setting("auto", "cpu, cuda, cuda:1 ... (auto: cuda if available)")

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: use one of {MIXED_PRECISION}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps must be >= 0, batch_size and grad_accum >= 1")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(mixed_precision: str, device: torch.device):
    if mixed_precision == "no" or device.type == "cpu":
        return None
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def train_unet(components: Components, mix: DomainMix, cfg: FinetuneConfig, work_dir: Path | None = None,
               resume: bool = False, desc: str = "fine-tune", on_step=None) -> list[dict]:
    """The chosen optimizer on the UNet's trainable tensors. Gradient accumulation draws the step's whole batch
    (data and noise) once and backpropagates it in grad_accum chunks; every sample carries weight
    1/batch_size, so the accumulated gradient equals the one-batch gradient."""
    device = next(components.denoiser.parameters()).device
    unet = components.denoiser
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = build_optimizer(unet, cfg)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    sharded = any(is_sharded(p) for p in trainable)     # finetune --shard: a checkpoint file per rank
    amp = autocast_dtype(cfg.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    ckpt = work_dir / "checkpoint.safetensors" if work_dir else None
    start = 0
    if resume and ckpt is not None and checkpoint_exists(ckpt, sharded):
        start = restore_checkpoint(load_checkpoint(ckpt, sharded)[0], unet, optimizer, mix)
        logger.info("resumed %s from step %d (%s)", desc, start, ckpt)
    history = []
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not dist.is_main(), initial=start, total=cfg.steps)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        totals = [0.0] * len(mix.domains)
        batch = mix.draw(device)
        per_sample = []
        for micro in batch.chunks(cfg.grad_accum):
            loss, losses = weighted_loss(unet, micro, mix.schedule, amp)
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
            save_checkpoint(ckpt, checkpoint_tensors(unet, optimizer, mix, step + 1, scaler), step + 1, sharded)
        if cfg.validation_every and cfg.validation_prompts and work_dir is not None and not sharded \
                and (step + 1) % cfg.validation_every == 0 and dist.is_main():
            _validation_images(components, cfg, work_dir / "validation" / f"step{step + 1:06d}.png")
            unet.train()
    unet.eval()
    bad = [n for n, p in unet.named_parameters() if p.requires_grad and not torch.isfinite(local(p)).all()]
    if bad:
        raise DivergedError(f"{desc} diverged: {len(bad)} weight tensors hold inf/NaN after {cfg.steps} steps "
                            f"(first: {bad[0]}). No model was written. Lower the learning rate and run again.")
    return history


def _validation_images(components, cfg: FinetuneConfig, path: Path):
    pipe = pipeline_from_components(components)
    images = generate_images(pipe, list(cfg.validation_prompts), steps=20, seed=cfg.seed)
    save_grid(images, path)


def check_frozen_unchanged(model_or_state, base_state: dict[str, torch.Tensor], frozen_names: list[str]):
    """Every frozen tensor (of a model, or of a gathered state) must equal the base model's bit for bit."""
    params = model_or_state if isinstance(model_or_state, dict) else dict(model_or_state.named_parameters())
    moved = [n for n in frozen_names if not torch.equal(params[n].detach().cpu(), base_state[n].to(params[n].dtype))]
    if moved:
        raise EnforcementError(f"{len(moved)} frozen tensors changed during fine-tuning (first: {moved[:3]}); "
                               f"the output is not compliant and was not saved.")


def frozen_tensor_hashes(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, str]:
    return {n: hashlib.blake2b(state[n].contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                               digest_size=16).hexdigest() for n in names}


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


def save_lora_folder(unet, out_dir: Path, manifest: dict, command: str = "finetune", family: str = "sd") -> Path:
    """A folder with the adapter (diffusers' pytorch_lora_weights.safetensors) and the manifest,
    written beside the target and moved into place when complete."""
    tmp = partial_dir(out_dir, command)
    save_lora(unet, tmp, family)
    atomic_write_json(tmp / "freezeasguard_manifest.json", manifest)
    normal_permissions(tmp)
    return replace_dir(tmp, out_dir)


@dataclass
class FinetuneResult:
    out_dir: Path
    scheme: str
    frozen_tensors: int
    frozen_param_fraction: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def resolve_scheme(unet, mask: Mask | None = None, random_ratio: float | None = None, seed: int = 0,
                   full: bool = False, budget: str = "tensors", base_fp: dict | None = None) -> tuple[str, Mask]:
    """Exactly one of: a learned mask, a random ratio, or full fine-tuning."""
    chosen = sum([mask is not None, random_ratio is not None, bool(full)])
    if chosen != 1:
        raise ValueError("choose exactly one freezing scheme: --mask FILE, --random-ratio R, or --full")
    named = list(unet.named_parameters())
    if mask is not None:
        mask.check_matches(named, base_fp, what="the base model")
        return "mask", mask
    if random_ratio is not None:
        check_ratio(random_ratio, "--random-ratio")
        return "random", Mask.random(named, random_ratio, seed, budget, base_fingerprint=base_fp)
    return "full", Mask.none(named, base_fingerprint=base_fp)


def guarded_finetune(model_dir, data_dir, out_dir, cfg: FinetuneConfig, mask: Mask | None = None,
                     random_ratio: float | None = None, full: bool = False, budget: str = "tensors",
                     subject: str | None = None, caption_column: str = "text", resume: bool = False,
                     work_dir=None, overwrite: bool = False, lora: LoraSettings | None = None,
                     prior_data=None, lora_as_attacker: bool = False, on_step=None) -> FinetuneResult:
    """Fine-tune the UNet (or, with ``lora.rank``, a LoRA on the modules the mask allows) on
    one dataset; the output is a pipeline folder (a LoRA folder with a LoRA) and a manifest.
    ``prior_data`` (DreamBooth's prior preservation): images of the subject's class, drawn
    beside the data every step (a batch of each) and weighted by ``cfg.prior_weight``.
    ``lora_as_attacker`` (the attack sweep): requested LoRA modules the mask freezes are left out
    and the rank is capped at the modules' size, instead of both being errors."""
    t0 = time.time()
    dist.init_from_env()
    # --- setup
    inputs = {"--model": model_dir, "--data": data_dir, **({"--prior-data": prior_data} if prior_data else {})}
    prepare_output_dir(out_dir, "finetune", inputs, overwrite, resume)
    device = resolve_device(cfg.device)
    components = load_model(model_dir).to(device).set_resolution(cfg.resolution)
    base_state = load_denoiser_state(model_dir)
    base_fp = fingerprint(base_state.items()) if mask is not None else None
    scheme, active = resolve_scheme(components.denoiser, mask, random_ratio, cfg.seed, full, budget, base_fp)
    targets = None
    if lora is not None and lora.rank:
        if lora_as_attacker:
            targets, lora = attacker_targets(components.denoiser, active, lora)
        else:
            targets = choose_targets(components.denoiser, active, lora)
        add_lora(components.denoiser, targets, lora)
        logger.info("LoRA rank %d on %d modules, none of them frozen", lora.rank, len(targets))
    frozen = active.frozen_names if targets is not None else active.apply(components.denoiser)
    logger.info("scheme %s: %d/%d tensors frozen (%.1f%% of parameters)", scheme, len(frozen),
                len(active.names), 100 * active.param_fraction)
    sharded = cfg.shard and dist.world_size() > 1
    if sharded:
        if targets is not None:
            raise ValueError("--shard with --lora-rank: a LoRA's trainable state is small; run it without --shard "
                             "(each process then holds the frozen base, as data parallelism does)")
        shard_denoiser(components.denoiser)
        logger.info("sharded the denoiser over %d processes (FSDP2)", dist.world_size())
    data = load_image_captions(data_dir, subject=subject, caption_column=caption_column)
    schedule = NoiseSchedule.for_components(components)
    domains = [Domain("data", EncodedData(data, components, device), cfg.batch_size, 1.0)]
    prior = load_image_captions(prior_data, caption_column=caption_column) if prior_data else None
    if prior is not None:
        domains.append(Domain("prior", EncodedData(prior, components, device), cfg.batch_size, cfg.prior_weight))
    mix = DomainMix(domains, schedule, cfg.seed)
    work_dir = Path(work_dir) if work_dir else Path(str(out_dir) + ".work")
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every", "device",
                                                                  "validation_prompts", "validation_every")}
    check_provenance(work_dir, {"model": base_fp or fingerprint(base_state.items()), "data": data_fingerprint(data),
                                "prior_data": data_fingerprint(prior) if prior is not None else None,
                                "scheme": scheme, "frozen": frozen, "settings": settings,
                                "lora": asdict(lora) if targets is not None else None})
    # --- train
    history = train_unet(components, mix, cfg, work_dir, resume=resume, desc=f"fine-tune ({scheme})", on_step=on_step)
    # --- check_frozen_unchanged (with a LoRA: every base weight)
    if targets is not None:
        moved = base_weights_moved(components.denoiser, base_state)
        if moved:
            raise EnforcementError(f"{len(moved)} base weights changed under a LoRA (first: {moved[0]}); nothing saved.")
    elif sharded:
        gathered = full_state(components.denoiser)          # every rank takes part in the gathering
        check_frozen_unchanged(gathered, base_state, frozen)
    else:
        check_frozen_unchanged(components.denoiser, base_state, frozen)
    # --- save_pipeline
    manifest = {
        "scheme": scheme, "frozen_tensors": len(frozen), "tensors": len(active.names),
        "tensor_ratio": active.tensor_ratio, "frozen_param_fraction": active.param_fraction,
        "mask_fingerprint": active.base_fingerprint if scheme == "mask" else None,
        "mask_meta": active.meta, "frozen_names": frozen,
        "frozen_tensor_hashes": frozen_tensor_hashes(base_state, frozen),
        "base_model": str(Path(model_dir).resolve()), "data": str(Path(data_dir).resolve()), "subject": subject,
        "prior_data": str(Path(prior_data).resolve()) if prior_data else None,
        "config": asdict(cfg), "final_loss": history[-1] if history else None,
        "lora": {**asdict(lora), "modules": targets, "file": LORA_FILE} if targets is not None else None,
    }
    if dist.is_main() and targets is not None:
        save_lora_folder(components.denoiser, Path(out_dir), manifest, family=components.family)
    elif dist.is_main():
        denoiser = plain_copy(model_dir, gathered) if sharded else components.denoiser
        save_pipeline(Path(model_dir), denoiser, Path(out_dir), manifest)
        atomic_write_json(work_dir / "history.json", history)
    dist.barrier()
    seconds = time.time() - t0
    logger.info("fine-tuned %d steps in %.1fs; wrote %s", cfg.steps, seconds, out_dir)
    return FinetuneResult(Path(out_dir), scheme, len(frozen), active.param_fraction, history, seconds)
