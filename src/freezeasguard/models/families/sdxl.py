"""SDXL: two CLIP text encoders, their penultimate hidden states concatenated as cross-attention,
and added conditioning: the second encoder's projected text embedding and six size numbers
(original size, crop top-left, target size), as diffusers' SDXL training scripts build them."""
from __future__ import annotations

import torch

from freezeasguard.models.families.base import Family, penultimate_and_pooled, tokenize


def encode(components, captions):
    states, pooled = [], None
    for encoder, tokenizer in zip(components.text_encoders, components.tokenizers):
        hidden, pooled = penultimate_and_pooled(encoder, tokenize(tokenizer, captions, encoder.device))
        states.append(hidden)
    side = components.resolution
    # images are resized and centre-cropped to the training side before encoding: original size =
    # target size = that side, crop offset 0 (data.preprocess)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(captions), dtype=torch.float32, device=pooled.device)
    return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled, "time_ids": time_ids}


def predict(denoiser, noisy, timesteps, cond):
    return denoiser(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample


SDXL = Family("sdxl", ("StableDiffusionXLPipeline",), "unet",
              (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")), encode, predict,
              "SDXL: UNet with text_time added conditioning, two CLIP text encoders, epsilon")
