"""One mask update (an iteration k of Algorithm 1): the simulated users' lower steps, then the
publisher's upper step on the logits. learn.py runs K of them; users.py says who the users are.

  lower (simulated user):  g = dL_lower/dtheta(m), turned into the user's step d(g) (users.py);
                           theta_d += lr (1-m) d;  theta(m) -= lr (1-m)^2 d
  upper (publisher):       dL/dw_i = [<dL_up/dtheta(m)_i, theta_d_i> + c 2 (share(m) - rho) price_i] m_i(1-m_i)/T
                           then theta(m) += (m_new - m_old) theta_d.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from freezeasguard.training import dist
from freezeasguard.training.batches import DomainMix, domain_means, objective_loss, weighted_loss
from freezeasguard.guard.bilevel import BilevelState, frozen_share, logit_gradient, lower_update_, remask_
from freezeasguard.guard.users import SimulatedUser, attacker_weights, combine_user_dots, lora_tensors, user_direction_

# ``cfg`` below is a learn.LearnConfig (MaskLearningSettings + ratio and run settings); it is not
# imported here because learn.py imports this module.


@dataclass
class UpdateContext:
    """What a mask update needs besides the bilevel state: the data, the noise schedule, the
    settings, and (restart, or several users) the theta_d every simulated user starts from."""
    mix: DomainMix
    schedule: object
    device: object
    amp: object
    cfg: object
    names: list[str]
    start_theta_d: torch.Tensor | None = None

    def __post_init__(self):
        # L_upper = -lambda_1 L_ill + lambda_2 L_inn: the domain weights' signs
        self.upper_sign = [-1.0] + [1.0] * (len(self.mix.domains) - 1)
        self.lora_indices = lora_tensors(self.names)
        # the simulated user trains on the plain loss; the publisher's objective may be the identity one
        self.upper_objective = objective_loss(self.cfg.objective)

    def loss(self, state: BilevelState, batch):
        loss, per_sample = weighted_loss(state.denoiser, batch, self.schedule, self.amp)
        return loss, (per_sample, batch)

    def upper_loss(self, state: BilevelState, batch):
        loss, per_sample = self.upper_objective(state.denoiser, batch, self.schedule, self.amp)
        return loss, (per_sample, batch)

    def lower_batch(self):
        return self.mix.draw(self.device)

    def upper_batch(self):
        return self.mix.draw(self.device, sign=self.upper_sign)


class ClosureContext:
    """Mask updates on a caller's own losses (tests, benchmarks): ``lower()`` returns the simulated
    user's (loss, info), ``upper()`` the publisher's signed one. One user per update (a closure's
    loss cannot be split into its illegal and innocent parts)."""

    def __init__(self, state: BilevelState, cfg, lower, upper):
        if cfg.users_per_update > 1:
            raise ValueError("ClosureContext runs one simulated user per update")
        self.cfg, self.lora_indices = cfg, lora_tensors([n for n, _ in state.named])
        self.start_theta_d = state.flat_theta_d.clone() if cfg.user_trajectory == "restart" else None
        self._lower, self._upper = lower, upper

    def lower_batch(self):
        return self._lower

    def upper_batch(self):
        return self._upper

    def loss(self, state, closure):
        return closure()

    upper_loss = loss


def lower_step(state: BilevelState, ctx: UpdateContext, user: SimulatedUser):
    """One simulated-user step: backprop the lower loss at theta(m), turn the gradient into the
    user's step direction, then Eq. 9-10 at the user's learning rate."""
    state.zero_grad()
    loss, info = ctx.loss(state, ctx.lower_batch())
    loss.backward()
    state.sync_grads()
    with torch.no_grad():
        user_direction_(state.grad_views, user, ctx.lora_indices, ctx.cfg.user_lora_rank)
        lower_update_(state.local, state.theta_d, state.grad_views, state.m, user.lr)
    return info


def upper_step(state: BilevelState, ctx: UpdateContext) -> tuple[dict, object]:
    """One mask update on a fresh sample: logits step (Eq. 8, corrected), then re-mask theta(m)."""
    dots, info = upper_dots(state, ctx, [ctx.upper_batch() for _ in range(ctx.cfg.upper_batches)])
    return logit_step(state, dots, ctx.cfg), info


def upper_dots(state: BilevelState, ctx: UpdateContext, batches) -> tuple[torch.Tensor, object]:
    """dL_upper/dm for every tensor, averaged over ``batches`` (more batches, less noise), whose
    loss is this rank's share of L_upper = -lambda_1 L_ill + lambda_2 L_inn."""
    state.zero_grad()
    for batch in batches:
        loss, info = ctx.upper_loss(state, batch)
        (loss / len(batches)).backward()
    state.sync_grads()
    with torch.no_grad():
        return state.tensor_dots().cpu(), info


def logit_step(state: BilevelState, dots: torch.Tensor, cfg) -> dict:
    """w -= eta_1 dL/dw from the per-tensor dots dL_upper/dm, then theta(m) follows the new m."""
    with torch.no_grad():
        m_old = state.m
        grad, stats = logit_gradient(dots, m_old, cfg.temperature, cfg.ratio, cfg.sparsity_weight,
                                     cfg.normalize_mask_grad, sparsity_sizes(state, cfg))
        device = state.flat_grad.device
        state.logits = dist.broadcast_((state.logits - cfg.mask_lr * grad).to(device)).cpu()
        remask_(state.local, state.theta_d, m_old, state.m)
    m = state.m
    stats.update(soft_ratio=float(m.mean()), hard_ratio=float((m > 0.5).float().mean()),
                 soft_param_share=float(frozen_share(m, state.sizes)))
    return stats


def sparsity_sizes(state: BilevelState, cfg) -> torch.Tensor | None:
    """Tensor sizes when the sparsity term counts parameters, None when it counts tensors."""
    return state.sizes if cfg.budget == "params" and cfg.sparsity_counts == "budget" else None


def mask_update(state: BilevelState, ctx: UpdateContext, users: list[SimulatedUser]) -> tuple[dict, list, object]:
    """One iteration k of Algorithm 1: L lower steps then one upper step (the paper's single user
    carrying on), or each of K users' L steps from the same start, their mask gradients weighted."""
    if len(users) == 1 and ctx.cfg.user_trajectory == "continue":
        lower_infos = [lower_step(state, ctx, users[0]) for _ in range(ctx.cfg.inner_steps)]
        stats, upper_info = upper_step(state, ctx)
        return stats, lower_infos, upper_info
    return mask_update_over_users(state, ctx, users)


def mask_update_over_users(state: BilevelState, ctx: UpdateContext, users: list[SimulatedUser]):
    """K users each run L steps from the same theta_d, each one's mask gradient is taken on the
    same upper batches (so they differ only by the user), and each is undone but the last
    (continue) or all (restart); the logits then step on the weighted sum (users.py)."""
    cfg = ctx.cfg
    if cfg.user_trajectory == "continue":
        ctx.start_theta_d.copy_(state.flat_theta_d)
    batches, lower_infos, ill_dots, inn_dots, ill_losses = None, [], [], [], []
    for k, user in enumerate(users):
        lower_infos += [lower_step(state, ctx, user) for _ in range(cfg.inner_steps)]
        if batches is None:      # drawn after the first user's steps: with one user, the paper's order of draws
            batches = [ctx.upper_batch() for _ in range(cfg.upper_batches)]
        if len(users) == 1:      # nothing to weigh: one backward over the whole batch, as the paper's
            dots, upper_info = upper_dots(state, ctx, batches)
        else:
            ill, inn, ill_loss, upper_info = split_upper_dots(state, ctx, batches)
            ill_dots.append(ill), inn_dots.append(inn), ill_losses.append(ill_loss)
        if cfg.user_trajectory == "restart" or k < len(users) - 1:
            undo_user_(state, ctx.start_theta_d)
    if len(users) == 1:
        return logit_step(state, dots, cfg), lower_infos, upper_info
    weights = attacker_weights(torch.tensor(ill_losses), cfg.user_weighting, cfg.user_weighting_temperature)
    dots = combine_user_dots(torch.stack(ill_dots), torch.stack(inn_dots), weights)
    stats = logit_step(state, dots.float(), cfg)
    stats.update(user_illegal_losses=ill_losses, user_weights=weights.tolist())
    return stats, lower_infos, upper_info


def split_upper_dots(state: BilevelState, ctx: UpdateContext, batches) -> tuple[torch.Tensor, torch.Tensor, float, object]:
    """The user's mask gradient dL_upper/dm split into its illegal and innocent parts (a backward
    over the illegal samples, one over the innocent: together one pass over each batch), its
    illegal loss on these batches, and the last batch's per-sample losses for the record."""
    per_sample = [torch.zeros(len(b.weights)) for b in batches]
    parts = []
    for illegal in (True, False):
        state.zero_grad()
        for batch, per in zip(batches, per_sample):
            index = torch.nonzero((batch.domain_ids == 0) == illegal).flatten()
            if len(index) == 0 and not state.sharded:
                continue
            # a sharded rank with no such sample still takes part in the collective passes, at weight 0
            sub = batch.select(index) if len(index) else _zero_weights(batch)
            loss, sub_per = ctx.upper_objective(state.denoiser, sub, ctx.schedule, ctx.amp)
            (loss / len(batches)).backward()
            if len(index):
                per[index] = sub_per.float().cpu()
        state.sync_grads()
        with torch.no_grad():
            parts.append(state.tensor_dots().cpu().double())
    nd = len(ctx.mix.domains)
    ill_loss = sum(domain_means(per, b, nd)[0] for per, b in zip(per_sample, batches)) / len(batches)
    return parts[0], parts[1], ill_loss, (per_sample[-1], batches[-1])


def undo_user_(state: BilevelState, start_theta_d: torch.Tensor):
    """Undo a simulated user's steps: theta_d back to ``start_theta_d`` and theta(m) back by (1-m)
    times what the user added to theta_d (m does not change within a user's steps)."""
    keep = (1.0 - state.m.double()).tolist()
    with torch.no_grad():
        state.flat_theta_d.sub_(start_theta_d)                 # theta_d now holds the user's own steps
        torch._foreach_mul_(state.theta_d, keep)
        torch._foreach_add_(state.local, state.theta_d)
        state.flat_theta_d.copy_(start_theta_d)


def _zero_weights(batch):
    return replace(batch, weights=torch.zeros_like(batch.weights))
