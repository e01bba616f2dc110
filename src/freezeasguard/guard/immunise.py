"""The immunised release: once the mask is chosen, choose the frozen tensors' values too.

A guarded fine-tune never changes a frozen tensor and the audit checks their bytes, so whatever
the publisher writes there stays in every compliant fine-tune (IMMA's and UCE's edits of
trainable weights are fine-tuned away). Each outer update here:

  1. a simulated attacker (AdamW on every trainable tensor, or a LoRA on the trainable attention
     projections; learning rate drawn from a range) fine-tunes the release on the illegal data
     for a few steps, the frozen values held;
  2. at that adapted point, its loss on the illegal photos (or, with the identity objective, the
     name gap g = L(caption) - L(caption with the name replaced by its class phrase), same latents,
     noise and time) is pushed up to a target by a hinge, relu(target - value): a bounded ascent
     that stops once the attacker is held there, so nothing rewards breaking the model further;
  3. the attacker is undone; an innocent user fine-tunes the release on the innocent data the
     same way, and its paired loss (plain + name gap) at its adapted point is pushed down;
  4. the release's own predictions on neutral and innocent captions are pulled to the base's
     (distillation): the model's drawing of unnamed people and of the innocent domains is kept;
  5. one Adam step on the frozen values only (first-order: the attackers' steps are held fixed,
     as in IMMA and first-order MAML).

Nothing but frozen tensors changes: the release and the base differ exactly where the mask freezes.
"""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from freezeasguard.guard.attackers import Attack, Attacker, draw_attacker, lora_targets, parse_attackers
from freezeasguard.settings import setting
from freezeasguard.training.batches import LocalBatch, identity_loss, weighted_loss
from freezeasguard.training.diffusion import diffusion_loss, model_prediction
from freezeasguard.training.train import DivergedError

logger = logging.getLogger(__name__)


@dataclass
class ImmuniseSettings:
    """The immunised release's settings (`learned+immunise`, and every chain ending in `immunise`)."""
    immunise_steps: int = setting(60, "immunise: outer updates of the frozen tensors' values")
    immunise_lr: float = setting(1e-4, "immunise: Adam step on the frozen values (Adam moves every value about this much per update)")
    immunise_inner_steps: int = setting(5, "immunise: each simulated attacker's (and innocent user's) fine-tuning "
                                           "steps, from the release")
    immunise_attackers: str = setting("adam,lora", "immunise: the simulated attackers, comma-separated, one drawn "
                                                   "per update: adam (AdamW on every trainable tensor), lora (a LoRA "
                                                   "on the trainable attention projections)")
    immunise_lora_rank: int = setting(32, "immunise: the lora attacker's rank")
    immunise_attack_updates: int = setting(4, "immunise: an attacker carries on over this many updates (its "
                                              "--immunise-inner-steps each) before a fresh one starts from the "
                                              "release, so the immunisation meets attacks 1 to this many times as "
                                              "long at the same cost")
    immunise_lr_min: float = setting(1e-4, "immunise: the attackers' learning rates are drawn log-uniformly from "
                                           "[this, --immunise-lr-max]")
    immunise_lr_max: float = setting(1e-3, "immunise: upper end of the attackers' learning rates")
    immunise_objective: str = setting("diffusion", "immunise: what is pushed up at the attacker's adapted point: "
                                                   "diffusion (its loss on the illegal photos, up to "
                                                   "--immunise-loss-target) or identity (the name gap: loss under the "
                                                   "name minus loss under the class phrase, up to "
                                                   "--immunise-gap-target)", choices=("diffusion", "identity"))
    immunise_loss_target: float = setting(0.3, "immunise, diffusion objective: the attacker's illegal loss is pushed "
                                               "up to this and no further")
    immunise_gap_target: float = setting(0.0, "immunise, identity objective: the attacker's name gap is pushed up to "
                                              "this and no further")
    immunise_retain_weight: float = setting(10.0, "immunise: weight of keeping the release's predictions on "
                                                  "neutral and innocent captions those of the base")
    immunise_innocent_weight: float = setting(1.0, "immunise: weight of an innocent user's paired loss after its "
                                                   "own fine-tune")
    immunise_batch: int = setting(4, "immunise: samples per step and domain")

    def check_immunise(self):
        parse_attackers(self.immunise_attackers)
        if self.immunise_objective not in ("diffusion", "identity"):
            raise ValueError(f"immunise_objective {self.immunise_objective!r}: use diffusion or identity")
        if not 0 < self.immunise_lr_min <= self.immunise_lr_max:
            raise ValueError("immunise_lr_min must be > 0 and <= immunise_lr_max")
        if self.immunise_steps < 0 or min(self.immunise_inner_steps, self.immunise_batch, self.immunise_attack_updates) < 1:
            raise ValueError("immunise_steps must be >= 0; immunise_inner_steps, immunise_batch and "
                             "immunise_attack_updates >= 1")


def gap_hinge(named_loss: torch.Tensor, neutral_loss: torch.Tensor, target: float) -> torch.Tensor:
    """relu(target - mean name gap): zero (and no gradient) once the name adds no more than ``target``."""
    return F.relu(target - (named_loss - neutral_loss).mean())


def loss_hinge(loss: torch.Tensor, target: float) -> torch.Tensor:
    """relu(target - mean loss): a bounded ascent, zero once the attacker's loss reaches ``target``."""
    return F.relu(target - loss.mean())


def paired_losses(denoiser, batch: LocalBatch, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses of the named samples under their caption and under the neutral one
    (same latents, noise and time)."""
    pick = torch.nonzero(batch.named).flatten().to(batch.latents.device)
    if len(pick) == 0:
        raise ValueError("the illegal data names no subject in its captions: the immunisation needs the subject "
                         "column (name) and captions that name it")
    sub = batch.select(pick)
    named = diffusion_loss(denoiser, sub.latents, sub.text, sub.noise, sub.timesteps, schedule)
    neutral = diffusion_loss(denoiser, sub.latents, sub.neutral_text, sub.noise, sub.timesteps, schedule)
    return named, neutral


@contextmanager
def grads_into(tensors: list[torch.Tensor]):
    """Within the block, backward passes reach ``tensors`` (the frozen values) and nothing else of theirs."""
    for p in tensors:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in tensors:
            p.requires_grad_(False)


def retain_batch(batch: LocalBatch) -> LocalBatch:
    """The batch with every named caption replaced by its neutral one: what the release must still
    draw as the base does (unnamed people, the innocent domain)."""
    return LocalBatch(batch.latents, batch.neutral_text, batch.noise, batch.timesteps, batch.weights, batch.domain_ids,
                      batch.domain_counts)


class BaseValues:
    """The frozen tensors' original values, swapped in to compute the base's predictions."""

    def __init__(self, frozen: list[torch.Tensor]):
        self.frozen, self.original = frozen, [t.detach().clone() for t in frozen]

    def predict(self, denoiser, batch: LocalBatch, schedule) -> torch.Tensor:
        current = [t.detach().clone() for t in self.frozen]
        with torch.no_grad():
            for t, o in zip(self.frozen, self.original):
                t.copy_(o)
            try:
                return model_prediction(denoiser, batch.latents, batch.text, batch.noise, batch.timesteps, schedule)
            finally:
                for t, c in zip(self.frozen, current):
                    t.copy_(c)

    def distance(self) -> float:
        """RMS change of the frozen values, relative to their RMS."""
        num = sum(float((t.detach() - o).pow(2).sum()) for t, o in zip(self.frozen, self.original))
        den = sum(float(o.pow(2).sum()) for o in self.original)
        return (num / max(den, 1e-30)) ** 0.5


def immunise(denoiser, frozen_names: set[str], draw_illegal, draw_innocent, schedule, s: ImmuniseSettings,
             seed: int = 0) -> list[dict]:
    """Optimise the frozen tensors' values in place (module docstring); returns the per-update
    history. ``draw_illegal``/``draw_innocent``: functions returning the next LocalBatch, drawn
    from domains with neutral captions (EncodedData with a class phrase)."""
    s.check_immunise()
    named = dict(denoiser.named_parameters())
    frozen = [p for n, p in named.items() if n in frozen_names]
    trainable = [p for n, p in named.items() if n not in frozen_names]
    if not frozen:
        raise ValueError("the mask freezes nothing: there are no frozen values to immunise")
    kinds = parse_attackers(s.immunise_attackers)
    lora_modules = lora_targets(denoiser, {n for n in named if n not in frozen_names})
    base = BaseValues(frozen)
    opt = torch.optim.Adam(frozen, lr=s.immunise_lr)
    rng = random.Random(seed)
    denoiser.requires_grad_(False)
    history, attack = [], None
    bar = tqdm(range(s.immunise_steps), desc="immunise")
    for step in bar:
        for p in frozen:
            p.grad = None
        # 1-2. an attacker fine-tunes the trainable rest (a fresh one, or the last one carrying on);
        # the hinge on its illegal loss (or name gap) at its adapted point
        if step % s.immunise_attack_updates == 0:
            if attack is not None:
                attack.undo()
            attack = Attack(denoiser, trainable, draw_attacker(kinds, s.immunise_lr_min, s.immunise_lr_max, rng),
                            lora_modules, s.immunise_lora_rank, seed * 100003 + step)
        else:
            attack.resume()
        attack_gap = _adapted_gap(denoiser, frozen, attack, draw_illegal, schedule, s)
        attack.park()
        # 3. an innocent user (the default recipe's learning rate) still learns its names
        innocent = 0.0
        if s.immunise_innocent_weight and draw_innocent is not None:
            innocent = _adapted_innocent(denoiser, trainable, frozen, lora_modules, draw_innocent, schedule, s,
                                         seed * 100003 + step)
        # 4. the release draws what the base draws when no name is said
        retain = 0.0
        with grads_into(frozen):
            for draw in (draw_illegal, draw_innocent):
                if draw is None or not s.immunise_retain_weight:
                    continue
                batch = retain_batch(draw())
                target = base.predict(denoiser, batch, schedule)
                pred = model_prediction(denoiser, batch.latents, batch.text, batch.noise, batch.timesteps, schedule)
                loss = F.mse_loss(pred.float(), target.float())
                (s.immunise_retain_weight * loss).backward(inputs=frozen)
                retain += float(loss.detach())
        values = [attack_gap["hinge"], innocent, retain]
        if not all(torch.isfinite(torch.tensor(values))):
            raise DivergedError(f"immunisation diverged at update {step + 1} (losses {values}); lower --immunise-lr")
        opt.step()
        record = {"update": step + 1, "attacker": attack.attacker.describe(), "attacker_steps": attack.steps,
                  **attack_gap, "innocent_adapted": innocent,
                  "retain": retain, "frozen_change": base.distance()}
        history.append(record)
        bar.set_postfix(gap=f"{attack_gap['gap']:.4f}", retain=f"{retain:.5f}", inn=f"{innocent:.4f}")
    if attack is not None:
        attack.undo()
    for p in frozen:
        p.grad = None
    return history


def _adapted_gap(denoiser, frozen, attack: Attack, draw_illegal, schedule, s) -> dict:
    """The attacker's inner steps; the hinge on its illegal loss or name gap at its adapted point,
    backpropagated into the frozen values (accumulated in their .grad). The gap is recorded either way."""
    for _ in range(s.immunise_inner_steps):
        loss, _ = weighted_loss(denoiser, draw_illegal(), schedule)
        attack.step(loss)
    attack.hold()
    with grads_into(frozen):
        named, neutral = paired_losses(denoiser, draw_illegal(), schedule)
        if s.immunise_objective == "identity":
            hinge = gap_hinge(named, neutral, s.immunise_gap_target)
        else:
            hinge = loss_hinge(named, s.immunise_loss_target)
        if hinge.requires_grad:
            hinge.backward(inputs=frozen)
    return {"gap": float((named - neutral).mean().detach()), "hinge": float(hinge.detach()),
            "adapted_illegal_loss": float(named.mean().detach())}


def _adapted_innocent(denoiser, trainable, frozen, lora_modules, draw_innocent, schedule, s, seed) -> float:
    """An innocent user's inner steps (AdamW at the attackers' lowest learning rate) from the
    release; its paired loss at the adapted point, weighted, into the frozen values' .grad."""
    user = Attack(denoiser, trainable, Attacker("adam", s.immunise_lr_min), lora_modules, s.immunise_lora_rank, seed)
    for _ in range(s.immunise_inner_steps):
        loss, _ = weighted_loss(denoiser, draw_innocent(), schedule)
        user.step(loss)
    user.hold()
    with grads_into(frozen):
        # the innocent side of the identity objective: plain loss, plus the name gap where a caption names a subject
        value, _ = identity_loss(denoiser, draw_innocent(), schedule, illegal_domains=())
        (s.immunise_innocent_weight * value).backward(inputs=frozen)
    user.undo()
    return float(value.detach())
