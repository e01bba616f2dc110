"""Guarded fine-tuning: the publisher's fine-tuning API, which enforces a freezing mask.

Enforcement is more than requires_grad: frozen tensors are left out of every optimizer group
(AdamW's weight decay would otherwise still move them), and after training every frozen tensor
is compared bit for bit with the base model's; the run fails if one moved.

Named steps, as a recipe: setup -> train -> check_frozen_unchanged -> save_pipeline.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from freezeasguard.training import dist
from freezeasguard.training.batches import Domain, DomainMix
from freezeasguard.training.data import EncodedData, data_fingerprint, load_image_captions
from freezeasguard.training.diffusion import NoiseSchedule
from freezeasguard.io import atomic_write_json, normal_permissions
from freezeasguard.training.lora import LORA_FILE, LoraSettings, add_lora, attacker_targets, base_weights_moved, choose_targets, save_lora
from freezeasguard.guard.mask import Mask, check_ratio
from freezeasguard.models.pipelines import Components, LazyState, fingerprint, load_model
from freezeasguard.training.optim import OPTIMIZERS
from freezeasguard.outputs import check_provenance, partial_dir, prepare_output_dir, replace_dir
from freezeasguard.settings import setting
from freezeasguard.training.shard import full_state, plain_copy, shard_denoiser
from freezeasguard.training.train import RunSettings, resolve_device, save_pipeline, train_denoiser

logger = logging.getLogger(__name__)

class EnforcementError(RuntimeError):
    """A frozen tensor moved during guarded fine-tuning."""


@dataclass
class FinetuneConfig(RunSettings):
    """Settings of one guarded fine-tuning run (the paper's illegal user unless noted); the run's
    own (seed, device, precision, ...) are RunSettings'."""
    steps: int = setting(2000, "optimizer steps")
    batch_size: int = setting(4, "samples per optimizer step, over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step (each process's share is split)")
    lr: float = setting(1e-5, "learning rate (prodigy: a multiplier of its own estimate, 1.0 as its authors use it)")
    optimizer: str = setting("adamw", "adamw (diffusers' scripts), sgd (momentum 0.9), adafactor (transformers', "
                                      "fixed lr), prodigy (prodigyopt, learning-rate free)", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-2, "weight decay (diffusers' default); adafactor: none")
    prior_weight: float = setting(1.0, "with prior data (DreamBooth's prior preservation): the weight of its loss")
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 turns it off")
    validation_prompts: tuple[str, ...] = setting((), "prompt for validation images", flag="--validation-prompt")
    validation_every: int = setting(0, "steps between validation grids (0: none)")

    def __post_init__(self):
        self.check_run_settings()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps must be >= 0, batch_size and grad_accum >= 1")


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
    already_complete: bool = False


def finished_output(out_dir: Path, work_dir: Path, cfg: FinetuneConfig) -> FinetuneResult | None:
    """The result of an earlier run of this command that wrote ``out_dir`` to the end (its manifest
    names as many steps as asked); None when there is none. Called after the provenance check, so
    the inputs and settings are the same."""
    manifest_path = out_dir / "freezeasguard_manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("config", {}).get("steps") != cfg.steps:
        return None
    history_path = work_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else (
        [manifest["final_loss"]] if manifest.get("final_loss") else [])
    return FinetuneResult(out_dir, manifest["scheme"], manifest["frozen_tensors"], manifest["frozen_param_fraction"],
                          history, already_complete=True)


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


def _lora_targets(denoiser, active: Mask, lora: LoraSettings | None, as_attacker: bool, seed: int = 0):
    """The modules a LoRA goes on (None: no LoRA) with the adapters added, and the LoRA's settings
    (an attacker's rank is capped at its modules' size)."""
    if lora is None or not lora.rank:
        return None, lora
    if as_attacker:
        targets, lora = attacker_targets(denoiser, active, lora)
    else:
        targets = choose_targets(denoiser, active, lora)
    add_lora(denoiser, targets, lora, seed)
    logger.info("LoRA rank %d on %d modules, none of them frozen", lora.rank, len(targets))
    return targets, lora


def _user_data(components, data_dir, prior_data, subject, caption_column, cfg: FinetuneConfig, device):
    """The user's data (and DreamBooth's prior images, a batch of each per step, weighted by
    ``cfg.prior_weight``) and the mix that draws their batches."""
    data = load_image_captions(data_dir, subject=subject, caption_column=caption_column)
    domains = [Domain("data", EncodedData(data, components, device), cfg.batch_size, 1.0)]
    prior = load_image_captions(prior_data, caption_column=caption_column) if prior_data else None
    if prior is not None:
        domains.append(Domain("prior", EncodedData(prior, components, device), cfg.batch_size, cfg.prior_weight))
    return data, prior, DomainMix(domains, NoiseSchedule.for_components(components), cfg.seed)


def _sources(model_dir, data_dir, subject, prior_data) -> dict:
    """What the manifest records of the inputs."""
    return {"base_model": str(Path(model_dir).resolve()), "data": str(Path(data_dir).resolve()), "subject": subject,
            "prior_data": str(Path(prior_data).resolve()) if prior_data else None}


def guarded_finetune(model_dir, data_dir, out_dir, cfg: FinetuneConfig, mask: Mask | None = None,
                     random_ratio: float | None = None, full: bool = False, budget: str = "tensors",
                     subject: str | None = None, caption_column: str = "text", resume: bool = False,
                     work_dir=None, overwrite: bool = False, lora: LoraSettings | None = None,
                     prior_data=None, lora_as_attacker: bool = False, on_step=None,
                     components: Components | None = None) -> FinetuneResult:
    """Fine-tune the UNet (or, with ``lora.rank``, a LoRA on the modules the mask allows) on
    one dataset; the output is a pipeline folder (a LoRA folder with a LoRA) and a manifest.
    ``prior_data`` (DreamBooth's prior preservation): images of the subject's class, drawn
    beside the data every step (a batch of each) and weighted by ``cfg.prior_weight``.
    ``lora_as_attacker`` (the attack sweep): requested LoRA modules the mask freezes are left out
    and the rank is capped at the modules' size, instead of both being errors. ``components``:
    ``model_dir`` already loaded, a copy the caller gives up (it is trained in place); by default
    the folder is read."""
    t0 = time.time()
    dist.init_from_env()
    # --- setup
    inputs = {"--model": model_dir, "--data": data_dir, **({"--prior-data": prior_data} if prior_data else {})}
    prepare_output_dir(out_dir, "finetune", inputs, overwrite, resume)
    device = resolve_device(cfg.device)
    components = (components or load_model(model_dir)).to(device).set_resolution(cfg.resolution)
    base_state = LazyState(model_dir)      # read tensor by tensor when checked: no second copy of the weights
    base_fp = fingerprint(base_state) if mask is not None else None
    scheme, active = resolve_scheme(components.denoiser, mask, random_ratio, cfg.seed, full, budget, base_fp)
    targets, lora = _lora_targets(components.denoiser, active, lora, lora_as_attacker, cfg.seed)
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
    data, prior, mix = _user_data(components, data_dir, prior_data, subject, caption_column, cfg, device)
    work_dir = Path(work_dir) if work_dir else Path(str(out_dir) + ".work")
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every", "device",
                                                                  "validation_prompts", "validation_every")}
    check_provenance(work_dir, {"model": base_fp or fingerprint(base_state), "data": data_fingerprint(data),
                                "prior_data": data_fingerprint(prior) if prior is not None else None,
                                "scheme": scheme, "frozen": frozen, "settings": settings,
                                "lora": asdict(lora) if targets is not None else None})
    if resume:
        finished = finished_output(Path(out_dir), work_dir, cfg)
        if finished is not None:
            logger.info("%s is already complete (%d steps, same inputs and settings): left as it is", out_dir, cfg.steps)
            return finished
    # --- train
    history = train_denoiser(components, mix, cfg, work_dir, resume=resume, desc=f"fine-tune ({scheme})", on_step=on_step)
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
        "mask_meta": active.meta, "frozen_names": frozen, "frozen_tensor_hashes": frozen_tensor_hashes(base_state, frozen),
        **_sources(model_dir, data_dir, subject, prior_data), "config": asdict(cfg),
        "final_loss": history[-1] if history else None,
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
