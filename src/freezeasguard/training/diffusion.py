"""The diffusion loss of Eq. 1, shared by every trainer (warm start, mask learning, fine-tuning).

Three objectives, chosen by the model's own scheduler config:
- epsilon and v-prediction (SD 1.x/2.x, SDXL): the config read with DDPM semantics (PNDMScheduler,
  which SD folders ship, has no get_velocity); x_t = sqrt(a) x0 + sqrt(1-a) eps;
- flow matching (SD3, FLUX; a FlowMatchEulerDiscreteScheduler config): x_t = (1-s) x0 + s eps,
  target eps - x0, with s and the model's timestep taken from the scheduler's own tables at a
  uniformly drawn index, its shift applied, as diffusers' SD3/FLUX training scripts do; SD3's
  scripts also precondition the output (their --precondition_outputs 1, the default): the loss
  compares x0 = x_t - s * prediction with the latents, which is the flow loss times s^2.
How the denoiser is called is its family's (families/).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from freezeasguard.models.families import FAMILIES


FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def objective(scheduler_config: dict) -> str:
    """What a scheduler config trains: epsilon, v_prediction, or flow (flow matching)."""
    if scheduler_config.get("_class_name") in FLOW_SCHEDULERS:
        return "flow"
    return scheduler_config.get("prediction_type", "epsilon")


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor | None   # (num_train_timesteps,) float64 on CPU; None for flow matching
    prediction_type: str                  # epsilon | v_prediction | flow
    family: str = "sd"                    # how the denoiser is called (families.FAMILIES)
    sigmas: torch.Tensor | None = None    # flow matching: noise level per index (shift applied)
    flow_timesteps: torch.Tensor | None = None   # flow matching: the model's timestep per index
    timestep_sampling: str = "uniform"    # uniform | logit_normal (SD3's training script default)
    precondition_outputs: bool = False    # flow matching: the loss on x0 = x_t - s * pred (SD3's scripts)

    @classmethod
    def from_scheduler_config(cls, config: dict, family: str = "sd") -> "NoiseSchedule":
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        if objective(config) == "flow":
            flow = FlowMatchEulerDiscreteScheduler.from_config(config)
            n = flow.config.num_train_timesteps       # the tables before set_timesteps: one entry per index
            # diffusers' SD3 scripts draw times logit-normally ("following the SD3 paper"), FLUX's uniformly
            sampling = "logit_normal" if family == "sd3" else "uniform"
            return cls(None, "flow", family, flow.sigmas[:n].to(torch.float64), flow.timesteps[:n].to(torch.float64),
                       sampling, precondition_outputs=family == "sd3")
        ddpm = DDPMScheduler.from_config(config)
        prediction_type = ddpm.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
        return cls(ddpm.alphas_cumprod.to(torch.float64), prediction_type, family)

    @classmethod
    def for_components(cls, components) -> "NoiseSchedule":
        return cls.from_scheduler_config(components.scheduler_config, components.family)

    @property
    def num_train_timesteps(self) -> int:
        return (self.alphas_cumprod if self.alphas_cumprod is not None else self.flow_timesteps).numel()


@dataclass
class NoiseDraw:
    """Everything random about one diffusion-loss evaluation, drawn for a whole (global) batch so
    that every data-parallel rank can take its own slice of the same draw."""
    latent_noise: torch.Tensor   # for sampling latents from the VAE's posterior
    noise: torch.Tensor          # epsilon
    timesteps: torch.Tensor      # int64


def draw_noise(batch: int, latent_shape, num_train_timesteps: int, generator: torch.Generator,
               sampling: str = "uniform") -> NoiseDraw:
    latent_noise = torch.randn((batch, *latent_shape), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    if sampling == "logit_normal":
        # compute_density_for_timestep_sampling("logit_normal", mean 0, std 1): u = sigmoid(N(0, 1)),
        # index = floor(u * N): most draws fall at middle noise levels
        u = torch.sigmoid(torch.randn(batch, generator=generator))
        timesteps = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    else:
        timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    return NoiseDraw(latent_noise, noise, timesteps)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    a = alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    """v = sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho), as DDPMScheduler.get_velocity."""
    a = alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, sigmas: torch.Tensor):
    """Rectified flow: x_t = (1 - s) x0 + s eps, and its target eps - x0."""
    s = sigmas.to(x0.device)[index].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def noisy_and_target(x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, schedule: NoiseSchedule):
    """The denoiser's input, the timestep it is told, and what it must predict, for each objective."""
    if schedule.prediction_type == "flow":
        noisy, target = flow_noise(x0, noise, index, schedule.sigmas)
        return noisy, schedule.flow_timesteps.to(x0.device)[index].to(x0.dtype), target
    noisy = add_noise(x0, noise, index, schedule.alphas_cumprod)
    target = noise if schedule.prediction_type == "epsilon" else velocity(x0, noise, index, schedule.alphas_cumprod)
    return noisy, index.to(x0.device), target


def diffusion_loss(denoiser, latents: torch.Tensor, cond, noise: torch.Tensor, timesteps: torch.Tensor,
                   schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample MSE between the denoiser's prediction and its target (shape: batch). ``cond``:
    the family's conditioning (SD: the text embeddings); ``timesteps``: indices into the schedule."""
    noisy, model_t, target = noisy_and_target(latents, noise, timesteps.to(latents.device), schedule)
    pred = FAMILIES[schedule.family].predict(denoiser, noisy, model_t, cond)
    return prediction_loss(pred, target, timesteps, schedule)


def model_prediction(denoiser, latents: torch.Tensor, cond, noise: torch.Tensor, timesteps: torch.Tensor,
                     schedule: NoiseSchedule) -> torch.Tensor:
    """The denoiser's prediction at the noisy latents diffusion_loss would score (for distillation)."""
    noisy, model_t, _ = noisy_and_target(latents, noise, timesteps.to(latents.device), schedule)
    return FAMILIES[schedule.family].predict(denoiser, noisy, model_t, cond)


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample MSE of a prediction against its target, SD3's preconditioning applied."""
    losses = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if schedule.precondition_outputs:
        # x_t - s * pred - x0 = s * (target - pred): the same loss without forming x0 again
        losses = losses * schedule.sigmas.to(target.device)[timesteps.to(target.device)].float() ** 2
    return losses


def min_snr_weights(timesteps: torch.Tensor, schedule: NoiseSchedule, gamma: float = 5.0,
                    floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets. Low-noise steps, whose loss is easy and whose
    gradients fight the high-noise ones, count less; pre-training converges several times faster.

    Measured on x0 (an epsilon loss is SNR times the x0 error, a v loss SNR + 1 times), these
    weights are min(SNR, gamma): nearly nothing at high noise (0.008 at t = 950 of SD's schedule),
    where a sample's layout and colours are decided. ``floor`` adds that much x0 weight at every
    step (1: what v-prediction gives high-noise steps), so the prompt's colours are learnt there."""
    a = schedule.alphas_cumprod[timesteps.cpu()]
    snr = a / (1 - a)
    x0_weight = snr.clamp(max=gamma) + floor
    w = x0_weight / snr if schedule.prediction_type == "epsilon" else x0_weight / (snr + 1)
    return w.float().to(timesteps.device)
