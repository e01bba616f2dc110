"""Algorithm 1 of FreezeAsGuard, corrected (docs/algorithm.md): learn which denoiser tensors to freeze.

Per tensor i: logit w_i, soft mask m_i = sigmoid(w_i / T) (1 = frozen). Only two copies of the
weights live in memory: theta(m), the denoiser's own parameters, and theta_d = theta_pre - theta_ft.

  lower (simulated user):  g = dL_lower/dtheta(m);  theta_d += lr (1-m) g;  theta(m) -= lr (1-m)^2 g
  upper (publisher):       dL/dw_i = [<dL_up/dtheta(m)_i, theta_d_i> + c 2 (mean(m) - rho) / N] m_i(1-m_i)/T
                           then theta(m) += (m_new - m_old) theta_d, so theta(m) = m theta_pre + (1-m) theta_ft.

The paper's raw data term scales with how far the warm start moved and with the loss, and is
~1e5 times smaller than its sparsity term at the official weight, so the official mask ends up
as the top-k of its random start. By default we divide the data term by its RMS over tensors and
count the sparsity weight per tensor, so both terms are O(1) per tensor whatever the model, and
the logit step (eta_1) means the same thing on a 10-tensor test model and on SD (686 tensors).

Named steps: setup -> warm_start -> init_state -> (lower_step x L, upper_step) x K -> final mask.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from freezeasguard.training import dist
from freezeasguard.training.batches import OBJECTIVES, Domain, DomainMix, domain_means, split_batch, weighted_loss
from freezeasguard.guard.bilevel import (BilevelState, frozen_share, load_bilevel_checkpoint, per_tensor_dots, remask_,
                      save_bilevel_checkpoint)
from freezeasguard.training.data import EncodedData, data_fingerprint, load_image_captions
from freezeasguard.training.diffusion import NoiseSchedule
from freezeasguard.training.finetune import FinetuneConfig
from freezeasguard.io import atomic_write_json
from freezeasguard.guard.mask import BUDGETS, SELECTIONS, Mask, check_ratio
from freezeasguard.models.pipelines import LazyState, fingerprint, has_denoiser, load_model
from freezeasguard.outputs import check_provenance, prepare_output_file
from freezeasguard.settings import copy_fields, setting
from freezeasguard.training.shard import checkpoint_exists, full_state, plain_copy, shard_denoiser
from freezeasguard.training.train import RunSettings, autocast_dtype, check_finite_loss, resolve_device, save_pipeline, train_denoiser
from freezeasguard.guard.mask_updates import UpdateContext, mask_update
from freezeasguard.guard.users import USER_TRAJECTORIES, USER_WEIGHTINGS, parse_user_steps, users_for_update
from freezeasguard.audit.verify import record_digests

logger = logging.getLogger(__name__)


@dataclass
class MaskLearningSettings:
    """The hyperparameters of mask learning, shared by `freezeasguard learn` (LearnConfig), the
    protection methods and the experiment config (ProtectSettings). Defaults are the paper's
    (Appendix F) unless noted."""
    budget: str = setting("tensors", "what the ratio counts: tensors (the paper's) or params (what memory "
                                     "savings follow, and what makes masks comparable at an equal cost)",
                          choices=BUDGETS)
    sparsity_counts: str = setting("budget", "what the sparsity term counts: budget (what --budget counts: under "
                                             "params each tensor's pull grows with its size, a price per parameter) "
                                             "or tensors (the paper's mean(m), whatever the budget)",
                                   choices=("budget", "tensors"))
    selection: str = setting("knapsack", "the final mask under --budget params: knapsack (the tensors worth most "
                                         "in total within the budget, each worth its soft mask m) or greedy (the "
                                         "highest logits that still fit)", choices=SELECTIONS)
    mask_steps: int = setting(100, "mask updates K", flag="--steps")
    inner_steps: int = setting(10, "simulated-user steps per mask update L (Appendix B)")
    upper_batches: int = setting(1, "batches averaged into each mask gradient (ours; 1 = the paper's; more = "
                                    "less noise)")
    mask_batch: int = setting(16, "samples per step and domain group (illegal; innocent, split over the "
                                  "domains)", flag="--batch-size")
    temperature: float = setting(0.2, "T of the soft mask m = sigmoid(w / T)")
    mask_lr: float | None = setting(None, "logit step eta_1 (none: 0.05 on the normalised gradient; 10, the "
                                          "paper's, with --no-normalize-mask-grad)")
    user_lr: float = setting(1e-5, "the simulated user's learning rate eta_2")
    # who the simulated users are (users.py; docs/algorithm.md): the paper's single SGD user by default
    simulated_users: str = setting("sgd", "the simulated users' steps, comma-separated, each user drawing one: sgd "
                                          "(lr g, the paper's), adam (lr sign(g): Adam's first step), lora (Adam's "
                                          "first step on a random rank --user-lora-rank LoRA of the attention "
                                          "projections)")
    user_lr_min_factor: float = setting(1.0, "each simulated user's learning rate is drawn log-uniformly from "
                                             "[user_lr x this, user_lr x --user-lr-max-factor]")
    user_lr_max_factor: float = setting(1.0, "upper end of the simulated users' learning-rate range, x user_lr")
    user_lora_rank: int = setting(32, "rank of the lora simulated users")
    users_per_update: int = setting(1, "simulated users per mask update K, each running --inner-steps steps from "
                                       "the same start (K times the lower loop's cost)")
    user_weighting: str = setting("mean", "how K users' illegal losses weigh their mask gradients: mean, max (the "
                                          "user who learned the person best) or softmax (a soft maximum)",
                                  choices=USER_WEIGHTINGS)
    user_weighting_temperature: float = setting(0.05, "softmax temperature, relative to the mean illegal loss")
    user_trajectory: str = setting("continue", "continue (the paper's: the simulated user's fine-tuning carries on "
                                               "over mask updates, theta_d accumulates) or restart (every user starts "
                                               "from the warm start; one more copy of the weights)",
                                   choices=USER_TRAJECTORIES)
    objective: str = setting("diffusion", "what the publisher's objective measures: diffusion (the paper's: the "
                                          "whole photo's loss) or identity (what the name adds: the loss under the "
                                          "caption minus the loss of the same sample, noise and time under the "
                                          "caption with the name replaced by --identity-class; innocent names stay "
                                          "learnable the same way, plus the plain loss)", choices=OBJECTIVES)
    identity_class: str = setting("a person", "identity objective: what replaces the illegal subject's name in "
                                              "its neutral caption")
    innocent_identity_class: str = setting("", "identity objective: what replaces an innocent subject's name "
                                               "(empty: the name is dropped, 'a Vellan scarf' -> 'a scarf')")
    lambda_illegal: float = setting(1.0, "lambda_1, weight of the illegal loss in the publisher's objective")
    lambda_innocent: float = setting(1.0, "lambda_2, weight of the innocent loss")
    sparsity_weight: float = setting(5.0, "weight c of the sparsity term (mean(m) - ratio)^2, per tensor when "
                                          "normalised (ours, measured: README)")
    normalize_mask_grad: bool = setting(True, "rescale the data term of the mask gradient to per-tensor RMS 1 (the "
                                              "paper's raw gradient is usually negligible next to the sparsity term)")
    # initial w/T ~ U(low, high): m starts near 0.12 (the paper: "random negative values"); a narrow
    # range, because a wide random spread survives into the final top-k (experiments/mask_agreement.py)
    init_logit_low: float = setting(-2.02, "lower end of the initial w/T")
    init_logit_high: float = setting(-1.98, "upper end of the initial w/T")
    init_from: str = setting("random", "where in that range each logit starts: random (the paper's) or saliency (by the "
                                       "rank of the illegal loss gradient at the warm start: per parameter, its RMS, "
                                       "under --budget params, else its norm; widen the range to make it count)",
                             choices=("random", "saliency"))
    init_batches: int = setting(4, "illegal batches whose gradients rank the tensors for --init-from saliency")
    warm_start_steps: int = setting(200, "full fine-tuning steps that give theta_ft before mask learning")
    warm_start_lr: float = setting(1e-5, "AdamW learning rate of the warm start")
    warm_start_batch: int = setting(4, "samples per warm-start step and domain group")


@dataclass
class LearnConfig(MaskLearningSettings, RunSettings):
    """Settings of one `freezeasguard learn` run: the mask-learning hyperparameters plus the run's
    (RunSettings; checkpoints count mask updates here)."""
    ratio: float = setting(0.3, "share to freeze, 0..1 (tensors, or parameters with --budget params)")
    checkpoint_every: int = setting(10, "mask updates between atomic checkpoints (0: never)")

    def __post_init__(self):
        self.check_run_settings()
        check_ratio(self.ratio)
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r}: use one of {BUDGETS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection {self.selection!r}: use one of {SELECTIONS}")
        if self.sparsity_counts not in ("budget", "tensors"):
            raise ValueError(f"sparsity_counts {self.sparsity_counts!r}: use budget or tensors")
        if self.upper_batches < 1 or self.inner_steps < 0:
            raise ValueError("upper_batches must be >= 1 and inner_steps >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.init_logit_low > self.init_logit_high:
            raise ValueError("init_logit_low must be <= init_logit_high")
        parse_user_steps(self.simulated_users)
        if not 0 < self.user_lr_min_factor <= self.user_lr_max_factor:
            raise ValueError("user_lr_min_factor must be > 0 and <= user_lr_max_factor")
        if self.users_per_update < 1 or self.user_lora_rank < 1 or self.user_weighting_temperature <= 0:
            raise ValueError("users_per_update and user_lora_rank must be >= 1, user_weighting_temperature > 0")
        if self.user_weighting not in USER_WEIGHTINGS or self.user_trajectory not in USER_TRAJECTORIES:
            raise ValueError(f"user_weighting: one of {USER_WEIGHTINGS}; user_trajectory: one of {USER_TRAJECTORIES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: use one of {OBJECTIVES}")
        if self.mask_lr is None:
            self.mask_lr = 0.05 if self.normalize_mask_grad else 10.0

    def resume_key(self) -> dict:
        """Settings that must not change between a run and its resume."""
        d = asdict(self)
        for k in ("checkpoint_every", "device", "mask_steps"):
            d.pop(k)
        return d


@dataclass
class LearnResult:
    mask: Mask
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _domains(components, device, illegal, innocent, batch_size, cfg: LearnConfig, paired: bool = False):
    """The illegal domain then the innocent ones; ``paired``: with the identity objective's neutral captions."""
    ill_class, inn_class = (cfg.identity_class, cfg.innocent_identity_class) if paired else (None, None)
    inn_sizes = split_batch(batch_size, len(innocent))
    domains = [Domain("illegal", EncodedData(illegal, components, device, ill_class), batch_size, cfg.lambda_illegal)]
    for j, (data, size) in enumerate(zip(innocent, inn_sizes)):
        if size:
            # innocent domains share lambda_2 in proportion to their batch share
            domains.append(Domain(f"innocent{j}", EncodedData(data, components, device, inn_class), size,
                                  cfg.lambda_innocent * size / batch_size))
    return domains


def learn_mask(model_dir, illegal_dir, innocent_dirs: list, out_path, cfg: LearnConfig,
               illegal_subject: str | None = None, finetuned_dir=None, work_dir=None,
               resume: bool = False, caption_column: str = "text", tensorboard_dir=None,
               overwrite: bool = False, warm_start_dir=None) -> LearnResult:
    """Algorithm 1, corrected; theta_ft: ``finetuned_dir``, else the warm start in ``warm_start_dir`` (shareable)."""
    t0 = time.time()
    dist.init_from_env()
    device = resolve_device(cfg.device)
    out_path = prepare_output_file(out_path, {"--model": model_dir, "--illegal": illegal_dir, "--innocent": innocent_dirs,
                                              "--finetuned": finetuned_dir}, overwrite or resume)
    if not innocent_dirs:
        raise ValueError("mask learning needs at least one --innocent domain")
    work_dir = Path(work_dir) if work_dir else out_path.with_name(out_path.name + ".work")
    work_dir.mkdir(parents=True, exist_ok=True)

    # --- setup
    illegal = load_image_captions(illegal_dir, subject=illegal_subject, caption_column=caption_column,
                                  subject_flag="--illegal-subject")
    innocent = [load_image_captions(d, caption_column=caption_column) for d in innocent_dirs]
    theta_pre = LazyState(model_dir)        # read tensor by tensor: no second copy of the weights
    base_fp = fingerprint(theta_pre)
    check_provenance(work_dir, {"model": base_fp, "illegal": data_fingerprint(illegal),
                                "innocent": [data_fingerprint(d) for d in innocent], "settings": cfg.resume_key(),
                                "finetuned": str(Path(finetuned_dir).resolve()) if finetuned_dir else None})

    # --- warm_start: theta_ft by full fine-tuning on illegal + innocent (or a given checkpoint)
    if finetuned_dir is None:
        finetuned_dir = Path(warm_start_dir) if warm_start_dir else work_dir / "warm_start"
        if not has_denoiser(finetuned_dir):
            _warm_start(model_dir, illegal, innocent, cfg, device, finetuned_dir, work_dir, resume)
        else:
            logger.info("reusing warm start %s", finetuned_dir)
    components = load_model(model_dir, denoiser_from=finetuned_dir).to(device).set_resolution(cfg.resolution)
    param_names = [n for n, _ in components.denoiser.named_parameters()]
    if not set(param_names) <= set(theta_pre):
        raise ValueError(f"--finetuned {finetuned_dir} has other parameter names than --model {model_dir}")
    sharded = cfg.shard and dist.world_size() > 1
    if sharded:
        shard_denoiser(components.denoiser)
        logger.info("sharded the denoiser over %d processes (FSDP2)", dist.world_size())

    # --- init_state: theta_d = theta_pre - theta_ft, theta_pre read a tensor at a time (two copies only)
    state = BilevelState(components.denoiser, theta_pre, cfg.temperature)
    shapes = {n: torch.empty(p.shape, device="meta") for n, p in state.named}    # whole shapes, also sharded
    del theta_pre
    schedule = NoiseSchedule.for_components(components)
    mix = DomainMix(_domains(components, device, illegal, innocent, cfg.mask_batch, cfg,
                             paired=cfg.objective == "identity"), schedule, cfg.seed + 1)
    amp = autocast_dtype(cfg.mixed_precision, device)
    if cfg.gradient_checkpointing:
        components.denoiser.enable_gradient_checkpointing()
    components.denoiser.train()
    state.logits = initial_logits(state, mix, schedule, device, amp, cfg)
    with torch.no_grad():
        remask_(state.local, state.theta_d, torch.zeros_like(state.logits), state.m)

    ckpt, start, history = work_dir / "learn_checkpoint.safetensors", 0, []
    if checkpoint_exists(ckpt, sharded):
        if not resume:
            raise FileExistsError(f"{ckpt} exists from an earlier run: pass --resume to continue it, "
                                  f"or remove {work_dir} to start over.")
        start, history = load_bilevel_checkpoint(ckpt, state, mix, cfg.resume_key(), sharded)
        logger.info("resumed mask learning at update %d/%d", start, cfg.mask_steps)
    # --- train: K mask updates, each L simulated-user steps and one logit step
    history = run_mask_updates(state, mix, schedule, device, amp, cfg, start, history,
                               lambda k, h: save_bilevel_checkpoint(ckpt, state, mix, cfg.resume_key(), k, h, sharded),
                               _tensorboard(tensorboard_dir))

    # --- final mask: the top-k of the learned logits, or the knapsack over the parameter budget
    mask = final_mask(state, shapes, cfg, base_fp, {"illegal": str(illegal_dir), "illegal_subject": illegal_subject,
                                                    "innocent": [str(d) for d in innocent_dirs]})
    if dist.is_main():
        # digests of the frozen tensors, so that the mask alone audits checkpoints (verify without --model)
        record_digests(mask, model_dir).save(out_path)
        atomic_write_json(work_dir / "learn_history.json", history)
    dist.barrier()
    seconds = time.time() - t0
    logger.info("mask: %d/%d tensors frozen (%.1f%% of tensors, %.1f%% of parameters), %d updates in %.1fs -> %s",
                int(mask.frozen.sum()), len(mask.names), 100 * mask.tensor_ratio, 100 * mask.param_fraction,
                cfg.mask_steps, seconds, out_path)
    return LearnResult(mask, history, seconds)


def initial_logits(state: BilevelState, mix: DomainMix, schedule, device, amp, cfg: LearnConfig) -> torch.Tensor:
    """w at the start: w/T spread over [init_logit_low, init_logit_high], at random (the paper's
    "random negative values") or by the saliency rank (the parameters hold theta_ft until the
    first re-mask, so the ranking is at the warm start)."""
    if cfg.init_from == "saliency":
        u = saliency_ranks(state, DomainMix(mix.domains[:1], schedule, cfg.seed + 2), schedule, device, amp,
                           cfg.init_batches, per_parameter=cfg.budget == "params")
    else:
        u = torch.rand(len(state.params), generator=torch.Generator().manual_seed(cfg.seed))
    return cfg.temperature * (cfg.init_logit_low + (cfg.init_logit_high - cfg.init_logit_low) * u)


def run_mask_updates(state: BilevelState, mix: DomainMix, schedule, device, amp, cfg: LearnConfig, start: int,
                     history: list[dict], save_checkpoint_at, writer=None) -> list[dict]:
    """Mask updates ``start`` .. K (Algorithm 1's loop), each recorded (domain losses, gradient
    scales, soft and hard ratios, the simulated users); stops with DivergedError on a non-finite
    loss; ``save_checkpoint_at(update, history)`` every ``checkpoint_every`` updates."""
    ctx = UpdateContext(mix, schedule, device, amp, cfg, [n for n, _ in state.named])
    if cfg.user_trajectory == "restart" or cfg.users_per_update > 1:
        ctx.start_theta_d = state.flat_theta_d.clone()       # where each user starts (restart: the warm start)
    nd = len(mix.domains)
    bar = tqdm(range(start, cfg.mask_steps), desc="learn mask", disable=not dist.is_main(), initial=start,
               total=cfg.mask_steps)
    for k in bar:
        users = users_for_update(cfg, k)
        stats, lower_infos, upper_info = mask_update(state, ctx, users)
        lower = [_domain_losses(i, nd) for i in lower_infos]
        upper = _domain_losses(upper_info, nd)
        record = {"update": k + 1, "upper_illegal": upper[0], "upper_innocent": sum(upper[1:]) / (nd - 1),
                  "lower_illegal": sum(x[0] for x in lower) / max(1, len(lower)),
                  "lower_innocent": sum(sum(x[1:]) / (nd - 1) for x in lower) / max(1, len(lower)),
                  "users": [u.describe() for u in users], **stats}
        check_finite_loss(torch.tensor([record["upper_illegal"], record["upper_innocent"],
                                        record["lower_illegal"], record["lower_innocent"]]), k + 1,
                          "mask learning", max(u.lr for u in users))
        history.append(record)
        bar.set_postfix(ill=f"{record['upper_illegal']:.4f}", inn=f"{record['upper_innocent']:.4f}",
                        soft=f"{record['soft_ratio']:.3f}", hard=f"{record['hard_ratio']:.3f}")
        if writer is not None:
            for key, v in record.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"learn/{key}", v, k + 1)
        if cfg.checkpoint_every and (k + 1) % cfg.checkpoint_every == 0 and k + 1 < cfg.mask_steps:
            save_checkpoint_at(k + 1, history)
    if writer is not None:
        writer.close()
    return history


def final_mask(state: BilevelState, shapes: dict, cfg: LearnConfig, base_fp: dict, inputs: dict) -> Mask:
    """The mask the learned logits give (select_frozen: top-k, or the knapsack on soft masks), with
    every setting and the inputs in its metadata."""
    m = state.m
    meta = {"method": "learned", "hyperparameters": asdict(cfg), "seed": cfg.seed, "temperature": cfg.temperature,
            **inputs, "final_soft_ratio": float(m.mean()), "final_hard_ratio": float((m > 0.5).float().mean()),
            "mask_updates": cfg.mask_steps, "final_soft_param_share": float(frozen_share(m, state.sizes))}
    return Mask.from_scores([(n, shapes[n]) for n, _ in state.named], state.logits.clone(), cfg.ratio,
                            cfg.budget, base_fingerprint=base_fp, meta=meta, selection=cfg.selection,
                            values=m.double())


def saliency_ranks(state: BilevelState, illegal_mix, schedule, device, amp, batches: int,
                   per_parameter: bool) -> torch.Tensor:
    """Each tensor's rank (0 lowest .. 1 highest) by the norm of the illegal loss gradient summed
    over ``batches`` draws, or by its RMS (norm / sqrt(size)) when ``per_parameter``."""
    state.zero_grad()
    for _ in range(batches):
        loss, _ = weighted_loss(state.denoiser, illegal_mix.draw(device), schedule, amp)
        (loss / batches).backward()
    state.sync_grads()
    with torch.no_grad():
        squares = state.flat_grad.clone()
        norms = per_tensor_dots(squares, state.flat_grad, state.lengths)
        norms = (dist.all_reduce_sum_(norms) if state.sharded else norms).cpu().double().sqrt()
    state.zero_grad()
    if per_parameter:
        norms = norms / state.sizes.double().sqrt()
    ranks = torch.empty(len(norms), dtype=torch.float32)
    ranks[torch.sort(norms, stable=True).indices] = torch.arange(len(norms), dtype=torch.float32)
    return ranks / max(1, len(norms) - 1)


def _domain_losses(info, num_domains) -> list[float]:
    per_sample, batch = info
    return domain_means(per_sample, batch, num_domains)


def _warm_start(model_dir, illegal, innocent, cfg: LearnConfig, device, out_dir: Path, work_dir: Path, resume):
    logger.info("warm start: %d full fine-tuning steps on illegal + innocent data", cfg.warm_start_steps)
    components = load_model(model_dir).to(device).set_resolution(cfg.resolution)
    schedule = NoiseSchedule.for_components(components)
    # the warm start is plain fine-tuning with the run's own settings (seed, precision, resolution, ...)
    ft_cfg = copy_fields(FinetuneConfig, cfg, steps=cfg.warm_start_steps, batch_size=cfg.warm_start_batch,
                         lr=cfg.warm_start_lr, device=str(device),
                         checkpoint_every=max(1, cfg.checkpoint_every * cfg.inner_steps))
    mix = DomainMix(_domains(components, device, illegal, innocent, cfg.warm_start_batch, cfg), schedule,
                    cfg.seed)
    ws_dir = work_dir / "warm_start.work"
    ws_dir.mkdir(parents=True, exist_ok=True)
    sharded = cfg.shard and dist.world_size() > 1
    if sharded:
        shard_denoiser(components.denoiser)
    history = train_denoiser(components, mix, ft_cfg, ws_dir, resume=resume, desc="warm start")
    gathered = full_state(components.denoiser) if sharded else None     # every rank takes part
    if dist.is_main():
        denoiser = plain_copy(model_dir, gathered) if sharded else components.denoiser
        save_pipeline(Path(model_dir), denoiser, out_dir,
                      {"scheme": "full", "purpose": "FreezeAsGuard warm start (theta_ft)", "config": asdict(ft_cfg),
                       "final_loss": history[-1] if history else None})
    dist.barrier()


def _tensorboard(log_dir):
    if log_dir is None or not dist.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("--tensorboard needs the tensorboard package: pip install 'freezeasguard[tensorboard]'") from exc
    return SummaryWriter(str(log_dir))
