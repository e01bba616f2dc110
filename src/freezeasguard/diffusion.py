"""The diffusion loss of Eq. 1, shared by every trainer (warm start, mask learning, fine-tuning).

Noise comes from the model's own scheduler config read with DDPM semantics, so epsilon and
v-prediction models train alike (PNDMScheduler, which SD folders ship, has no get_velocity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float64 on CPU
    prediction_type: str

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(config)
        prediction_type = ddpm.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
        return cls(ddpm.alphas_cumprod.to(torch.float64), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()


@dataclass
class NoiseDraw:
    """Everything random about one diffusion-loss evaluation, drawn for a whole (global) batch so
    that every data-parallel rank can take its own slice of the same draw."""
    latent_noise: torch.Tensor   # for sampling latents from the VAE's posterior
    noise: torch.Tensor          # epsilon
    timesteps: torch.Tensor      # int64

    def slice(self, index) -> "NoiseDraw":
        return NoiseDraw(self.latent_noise[index], self.noise[index], self.timesteps[index])


def draw_noise(batch: int, latent_shape, num_train_timesteps: int, generator: torch.Generator) -> NoiseDraw:
    latent_noise = torch.randn((batch, *latent_shape), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    return NoiseDraw(latent_noise, noise, timesteps)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    a = alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    """v = sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho), as DDPMScheduler.get_velocity."""
    a = alphas_cumprod.to(x0.device)[timesteps].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def diffusion_loss(unet, latents: torch.Tensor, text_embeddings: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sample MSE between the UNet's prediction and its target (shape: batch)."""
    noisy = add_noise(latents, noise, timesteps, schedule.alphas_cumprod)
    target = noise if schedule.prediction_type == "epsilon" else velocity(latents, noise, timesteps,
                                                                           schedule.alphas_cumprod)
    pred = unet(noisy, timesteps.to(latents.device), encoder_hidden_states=text_embeddings).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def min_snr_weights(timesteps: torch.Tensor, schedule: NoiseSchedule, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v targets. Low-noise steps, whose loss is easy and whose
    gradients fight the high-noise ones, count less; pre-training converges several times faster."""
    a = schedule.alphas_cumprod[timesteps.cpu()]
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    w = clipped / snr if schedule.prediction_type == "epsilon" else clipped / (snr + 1)
    return w.float().to(timesteps.device)
