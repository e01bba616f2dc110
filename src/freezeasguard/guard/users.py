"""The simulated users of mask learning: whom the lower loop fine-tunes as, and how several of
them enter one mask gradient. Small pure functions, each tested.

The paper simulates one user: plain SGD at one learning rate. A mask learned against that user
learns to stop that user; an attacker who raises the learning rate or trains a LoRA is someone
else. So each mask update may draw its users from a range the publisher sets (as tamper-resistant
training does for LLMs, TAR 2025): a learning rate log-uniform in [lr x low, lr x high] and a kind
of step, each a function of the user's gradient g that keeps the two-copy memory trick (no
optimizer state):

  sgd    lr * g                      the paper's user
  adam   lr * sign(g)                Adam's first step exactly (m/sqrt(v) = g/|g| after bias
                                     correction), and close to its early steps: every weight
                                     moves by ~lr whatever its gradient's scale, as the users'
                                     AdamW moves them
  lora   lr * sign(g A^T) A          Adam's first step on a rank-r LoRA (B = 0, A random as peft
                                     draws it, scale alpha/r = 1) of every attention projection;
                                     other tensors stay: what a LoRA user can reach in one step

With several users per update the publisher may weight the worst of them: the upper objective
becomes  lambda_1 * smax_k(-L_ill(theta_k)) + lambda_2 * mean_k L_inn(theta_k),  whose gradient
is the users' own mask gradients weighted by softmax(-L_ill / (tau * mean L_ill)) (or the
arg-min alone, or 1/K each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freezeasguard.training.lora import is_default_target

USER_STEPS = ("sgd", "adam", "lora")
USER_WEIGHTINGS = ("mean", "softmax", "max")
USER_TRAJECTORIES = ("continue", "restart")


@dataclass(frozen=True)
class SimulatedUser:
    step: str      # one of USER_STEPS
    lr: float
    seed: int      # draws a lora user's down-projections

    def describe(self) -> str:
        return f"{self.step}@{self.lr:.3g}"


def parse_user_steps(spec: str) -> tuple[str, ...]:
    """'sgd,adam' -> ('sgd', 'adam'); an unknown kind is an error naming the known ones."""
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    unknown = [k for k in kinds if k not in USER_STEPS]
    if not kinds or unknown:
        raise ValueError(f"simulated_users {spec!r}: use one or more of {', '.join(USER_STEPS)}, comma-separated")
    return kinds


def draw_users(kinds: tuple[str, ...], lr: float, low: float, high: float, count: int, seed: int,
               update: int) -> list[SimulatedUser]:
    """The ``count`` users of mask update ``update``: a kind drawn uniformly, a learning rate
    log-uniform in [lr*low, lr*high]. A function of (seed, update) alone, so a resumed run draws
    the users the interrupted one would have."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(update) + 17)
    users = []
    for _ in range(count):
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
        u = float(torch.rand(1, generator=g, dtype=torch.float64))
        factor = low if low == high else math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        users.append(SimulatedUser(kind, lr * factor, int(torch.randint(2**31 - 1, (1,), generator=g))))
    return users


def users_for_update(cfg, update: int) -> list[SimulatedUser]:
    """The simulated users of mask update ``update`` under mask-learning settings ``cfg``."""
    return draw_users(parse_user_steps(cfg.simulated_users), cfg.user_lr, cfg.user_lr_min_factor,
                      cfg.user_lr_max_factor, cfg.users_per_update, cfg.seed, update)


def lora_tensors(names: list[str]) -> list[int]:
    """Indices of the weights a LoRA user adapts: the attention projections (to_q, to_k, to_v,
    to_out.0), as the attacks' LoRA recipes and diffusers' LoRA scripts do."""
    return [i for i, n in enumerate(names) if n.endswith(".weight") and is_default_target(n.removesuffix(".weight"))]


def lora_down(shape: torch.Size, rank: int, seed: int, index: int, dtype, device) -> torch.Tensor:
    """A random LoRA down-projection A (rank x in) as peft initialises it: U(-1/sqrt(in), 1/sqrt(in))."""
    fan_in = shape[1]
    g = torch.Generator().manual_seed(seed * 7919 + index)
    bound = 1.0 / math.sqrt(fan_in)
    return ((torch.rand(min(rank, fan_in), fan_in, generator=g, dtype=torch.float32) * 2 - 1) * bound).to(device, dtype)


def user_direction_(grads: list[torch.Tensor], user: SimulatedUser, lora_indices: list[int], lora_rank: int) -> None:
    """Turn the user's gradient into its step direction, in place (the step is lr times it)."""
    if user.step == "sgd":
        return
    if user.step == "adam":
        torch._foreach_sign_(grads)
        return
    adapted = set(lora_indices)
    for i, g in enumerate(grads):
        if i not in adapted or g.dim() != 2 or g.numel() == 0:
            g.zero_()
            continue
        a = lora_down(g.shape, lora_rank, user.seed, i, g.dtype, g.device)
        g.copy_(torch.sign(g @ a.T) @ a)


def attacker_weights(illegal_losses: torch.Tensor, weighting: str, temperature: float) -> torch.Tensor:
    """How much each simulated user's mask gradient counts: 1/K each (mean), all on the user
    with the lowest illegal loss (max: the worst case for the publisher), or the softmax of
    -L_k / (temperature * mean L), the gradient of a soft maximum of -L whose temperature is
    relative to the loss (0.05: a user 5% below the mean counts e times more)."""
    k = len(illegal_losses)
    losses = illegal_losses.double()
    if weighting == "mean":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if weighting == "max":
        w = torch.zeros(k, dtype=torch.float64)
        w[int(torch.argmin(losses))] = 1.0
        return w
    if weighting == "softmax":
        scale = temperature * float(losses.mean().abs().clamp_min(1e-12))
        return torch.softmax(-losses / scale, dim=0)
    raise ValueError(f"user weighting {weighting!r}: use one of {USER_WEIGHTINGS}")


def combine_user_dots(illegal_dots: torch.Tensor, innocent_dots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """dL_upper/dm over K users (rows): the illegal part weighted by ``weights``, the innocent part
    averaged (innocent users take the default recipe; their loss is not a worst case)."""
    w = weights.to(illegal_dots.dtype)
    return (w[:, None] * illegal_dots).sum(0) + innocent_dots.mean(0)
