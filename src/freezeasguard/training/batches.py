"""Batches drawn per domain, weighted so that the loss is lambda-weighted per-domain means.

Every step draws each domain's batch separately (the official code draws from one pool that is
~9% innocent, so most steps see no innocent sample). The whole global batch and its noise come
from generators that advance identically on every rank; each rank then computes its own slice,
and the weights are chosen so that summing gradients across ranks gives exactly the gradient of
the global loss. One process and N processes with the same global batch see the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from freezeasguard.training import dist
from freezeasguard.training.data import DomainSampler, EncodedData
from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss, draw_noise
from freezeasguard.models.families.base import cond_apply, cond_join


@dataclass
class Domain:
    name: str
    data: EncodedData
    batch_size: int     # global samples per step
    weight: float       # lambda: the domain contributes weight * mean(per-sample loss)


@dataclass
class LocalBatch:
    latents: torch.Tensor
    text: object               # the conditioning: a tensor (SD's text embeddings) or a dict of tensors
    noise: torch.Tensor
    timesteps: torch.Tensor
    weights: torch.Tensor      # per sample; sum over all ranks of weights * loss = the global loss
    domain_ids: torch.Tensor   # index into the domain list
    domain_counts: list[int]   # global batch size per domain
    # the identity objective's pairs (domains built with a class phrase): each caption with the
    # subject's name replaced, and which samples name a subject (the others are their own pair)
    neutral_text: object = None
    named: torch.Tensor | None = None

    def _take(self, pick) -> "LocalBatch":
        on_device = pick.to(self.latents.device) if isinstance(pick, torch.Tensor) else pick
        on_cpu = pick.cpu() if isinstance(pick, torch.Tensor) else pick
        return LocalBatch(self.latents[on_device], cond_apply(self.text, lambda v: v[on_device]), self.noise[on_device],
                          self.timesteps[on_device], self.weights[on_device], self.domain_ids[on_cpu], self.domain_counts,
                          None if self.neutral_text is None else cond_apply(self.neutral_text, lambda v: v[on_device]),
                          None if self.named is None else self.named[on_cpu])

    def select(self, index: torch.Tensor) -> "LocalBatch":
        """The samples at ``index`` (weights kept as they are)."""
        return self._take(index)

    def chunks(self, n: int) -> list["LocalBatch"]:
        """Split into at most n micro-batches (gradient accumulation); weights are kept as they are."""
        size = max(1, -(-len(self.weights) // n))
        return [self._take(slice(s, s + size)) for s in range(0, len(self.weights), size)]


def split_batch(total: int, parts: int) -> list[int]:
    """Split ``total`` samples over ``parts`` domains as evenly as possible (earlier ones get more)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class DomainMix:
    def __init__(self, domains: list[Domain], schedule: NoiseSchedule, seed: int):
        if not domains:
            raise ValueError("no domains to sample from")
        self.domains, self.schedule = domains, schedule
        self.samplers = [DomainSampler(len(d.data), seed * 1009 + i) for i, d in enumerate(domains)]
        self.noise_generator = torch.Generator().manual_seed(seed)

    def draw(self, device, sign: list[float] | None = None) -> LocalBatch:
        """Draw the next global batch and return this rank's slice. ``sign`` multiplies each
        domain's weight (the upper level uses -1 for the illegal domain)."""
        entries = []  # (domain id, sample index) for the global batch
        for d_id, (domain, sampler) in enumerate(zip(self.domains, self.samplers)):
            entries += [(d_id, i) for i in sampler.next(domain.batch_size)]
        shape = self.domains[0].data.latent_shape
        draw = draw_noise(len(entries), shape, self.schedule.num_train_timesteps, self.noise_generator,
                          self.schedule.timestep_sampling)
        local = list(range(dist.rank(), len(entries), dist.world_size()))
        counts = [d.batch_size for d in self.domains]
        latents, texts, weights, ids, neutral, named = [], [], [], [], [], []
        paired = any(d.data.paired for d in self.domains)
        for d_id, domain in enumerate(self.domains):
            pos = [p for p in local if entries[p][0] == d_id]
            if not pos:
                continue
            indices = [entries[p][1] for p in pos]
            lat, txt = domain.data.batch(indices, draw.latent_noise[pos])
            latents.append(lat)
            texts.append(txt)
            if paired:
                pair, is_named = domain.data.pairs(indices) if domain.data.paired else (txt, torch.zeros(len(pos), dtype=torch.bool))
                neutral.append(pair)
                named.append(is_named)
            w = domain.weight * (sign[d_id] if sign else 1.0) / counts[d_id]
            weights.append(torch.full((len(pos),), w))
            ids.append(torch.full((len(pos),), d_id))
        order = [p for d_id in range(len(self.domains)) for p in local if entries[p][0] == d_id]
        return LocalBatch(torch.cat(latents).to(device), cond_apply(cond_join(texts, torch.cat), lambda v: v.to(device)),
                          draw.noise[order].to(device), draw.timesteps[order].to(device),
                          torch.cat(weights).to(device), torch.cat(ids), counts,
                          cond_apply(cond_join(neutral, torch.cat), lambda v: v.to(device)) if paired else None,
                          torch.cat(named) if paired else None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"noise_generator": self.noise_generator.get_state()}
        for i, s in enumerate(self.samplers):
            state.update({f"sampler{i}.{k}": v for k, v in s.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        self.noise_generator.set_state(state["noise_generator"])
        for i, s in enumerate(self.samplers):
            s.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"sampler{i}.")})


def weighted_loss(denoiser, batch: LocalBatch, schedule: NoiseSchedule, autocast_dtype=None):
    """This rank's share of the weighted loss, and the per-sample losses (detached) for logging."""
    device_type = batch.latents.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        per_sample = diffusion_loss(denoiser, batch.latents, batch.text, batch.noise, batch.timesteps, schedule)
    return (per_sample * batch.weights).sum(), per_sample.detach()


OBJECTIVES = ("diffusion", "identity")


def identity_terms(named_loss: torch.Tensor, neutral_loss: torch.Tensor, named: torch.Tensor,
                   illegal: torch.Tensor) -> torch.Tensor:
    """Per-sample values of the identity objective. A sample that names its subject: on the
    illegal side what the name adds, L(caption) - L(neutral caption) (scene, pose and background
    cancel: same latents, noise and time); on the innocent side the plain loss plus that
    difference (the image learned, and its name learnable). A sample that names no subject keeps
    its plain loss."""
    gap = named_loss - neutral_loss
    paired_value = torch.where(illegal, gap, named_loss + gap)
    return torch.where(named, paired_value, named_loss)


def identity_loss(denoiser, batch: LocalBatch, schedule: NoiseSchedule, autocast_dtype=None,
                  illegal_domains: tuple[int, ...] = (0,)):
    """This rank's share of the weighted identity objective (identity_terms) and the per-sample
    plain losses (detached, for the record). Needs a batch drawn from domains with a class phrase."""
    if batch.named is None:
        raise ValueError("the identity objective needs paired captions: build the domains' EncodedData with a "
                         "class phrase")
    device_type = batch.latents.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        per_sample = diffusion_loss(denoiser, batch.latents, batch.text, batch.noise, batch.timesteps, schedule)
        neutral = torch.zeros_like(per_sample)
        index = torch.nonzero(batch.named).flatten().to(batch.latents.device)
        if len(index):
            neutral = neutral.index_put((index,), diffusion_loss(
                denoiser, batch.latents[index], cond_apply(batch.neutral_text, lambda v: v[index]), batch.noise[index],
                batch.timesteps[index], schedule))
    illegal = torch.isin(batch.domain_ids, torch.tensor(illegal_domains, dtype=batch.domain_ids.dtype)).to(per_sample.device)
    values = identity_terms(per_sample, neutral, batch.named.to(per_sample.device), illegal)
    return (values * batch.weights).sum(), per_sample.detach()


def objective_loss(objective: str, illegal_domains: tuple[int, ...] = (0,)):
    """The loss function of a publisher's objective, with weighted_loss's signature."""
    if objective == "diffusion":
        return weighted_loss
    if objective == "identity":
        return lambda denoiser, batch, schedule, autocast_dtype=None: identity_loss(
            denoiser, batch, schedule, autocast_dtype, illegal_domains)
    raise ValueError(f"objective {objective!r}: use one of {OBJECTIVES}")


def domain_means(per_sample: torch.Tensor, batch: LocalBatch, num_domains: int) -> list[float]:
    """Global mean loss per domain (summed across ranks)."""
    sums = torch.zeros(num_domains, dtype=torch.float64, device=per_sample.device)
    sums.index_add_(0, batch.domain_ids.to(per_sample.device), per_sample.double())
    dist.all_reduce_sum_(sums)
    return [float(s) / c for s, c in zip(sums, batch.domain_counts)]
