"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden states as cross-attention."""
from __future__ import annotations

from freezeasguard.models.families.base import Family, tokenize


def encode(components, captions):
    encoder, tokenizer = components.text_encoders[0], components.tokenizers[0]
    return encoder(tokenize(tokenizer, captions, encoder.device))[0]


def predict(denoiser, noisy, timesteps, cond):
    return denoiser(noisy, timesteps, encoder_hidden_states=cond).sample


SD = Family("sd", ("StableDiffusionPipeline",), "unet", (("text_encoder", "tokenizer"),), encode, predict,
            "Stable Diffusion 1.x/2.x: UNet, CLIP text encoder, epsilon or v-prediction")
