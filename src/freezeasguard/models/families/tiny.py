"""Tiny pipelines of every family (SD included), built in code (tests; nothing is downloaded): the same classes
and the same conditioning paths as the real models, a few hundred thousand parameters each.

The T5 slots of SD3 and FLUX get the offline CLIP byte-pair tokenizer (build_offline_tokenizer):
a T5 tokenizer needs a trained sentencepiece model, and training reads only input ids."""
from __future__ import annotations

import logging
import string
from pathlib import Path

import torch

from freezeasguard.models.families.tiny_llm import CAPTION_WORDS, build_tiny_llm

logger = logging.getLogger(__name__)


def build_offline_tokenizer(extra_words=(), model_max_length: int = 77):
    """A real byte-pair CLIPTokenizer whose vocabulary is made here: every character plus whole-word
    merges for common caption words. Unknown words fall back to characters, so any text tokenises."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen_merges = set()
    for word in dict.fromkeys(list(CAPTION_WORDS) + [w.lower() for w in extra_words]):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            tokens.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    assert len(tok) > 2, "transformers built a degenerate tokenizer"
    return tok


def tiny_unet_config(layout: str = "sd15", sample_size: int = 8, cross_attention_dim: int = 32,
                     block_out_channels=None) -> dict:
    """UNet configs. ``sd15``: the SD v1.5 block layout (686 parameter names, same order) with small
    widths. ``mini``: two blocks, for the fastest tests. ``sd15-shapes``: the real SD v1.5 UNet."""
    if layout in ("sd15", "sd15-shapes"):
        real = layout == "sd15-shapes"
        return dict(
            sample_size=64 if real else sample_size,
            in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=list(block_out_channels or ((320, 640, 1280, 1280) if real else (32, 64, 128, 128))),
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            cross_attention_dim=768 if real else cross_attention_dim,
            attention_head_dim=8, norm_num_groups=32,
        )
    if layout == "mini":
        return dict(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=list(block_out_channels or (32, 64)),
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
        )
    raise ValueError(f"unknown UNet layout {layout!r}; use sd15, mini or sd15-shapes")


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion's noise schedule (scaled-linear betas, 1000 steps). clip_sample=False as in
    SD's own scheduler configs: DDIM/DDPM built from this config would otherwise clip each x0
    estimate to [-1, 1], which wrecks latents (their scale is ~1, not bounded by 1)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                prediction_type=prediction_type)


def build_tiny_pipeline(layout: str = "sd15", image_size: int = 16, prediction_type: str = "epsilon",
                        seed: int = 0, extra_words=(), unet_channels=None):
    """A randomly initialised Stable-Diffusion-shaped pipeline small enough for a CPU."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_offline_tokenizer(extra_words)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32,
                        sample_size=image_size)
    latent = image_size // 2
    if layout == "sd15" and latent % 8:
        raise ValueError(f"image_size {image_size}: the sd15 layout needs a latent side divisible by 8 "
                         f"(image_size a multiple of 16)")
    unet = UNet2DConditionModel(**tiny_unet_config(layout, sample_size=latent, block_out_channels=unet_channels))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler.from_config(scheduler_config(prediction_type))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(out_dir, **kwargs) -> Path:
    pipe = build_tiny_pipeline(**kwargs)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    logger.info("saved a tiny %s pipeline to %s", kwargs.get("layout", "sd15"), out_dir)
    return out_dir




FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)     # SD3's scheduler config


def _clip(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # a wide encoder (a preset's text width) gets one layer and a narrow MLP: its width is what counts
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=min(2 * hidden, 64),
                            num_attention_heads=4, num_hidden_layers=2 if hidden <= 64 else 1,
                            max_position_embeddings=77, projection_dim=projection or hidden,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=min(2 * width, 64),
                                   num_layers=1, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _vae(image_size: int, channels: int, shift: float | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=[32, 64],
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=image_size,
                         scaling_factor=1.5, shift_factor=shift)


def build_tiny(family: str, image_size: int = 16, seed: int = 0, extra_words=(), guidance_embeds: bool = True,
               text_width: int | None = None, depth: int | None = None, native_side: int | None = None):
    """A randomly initialised pipeline object of the family (sd, sdxl, sd3, flux). ``text_width``,
    ``depth`` and ``native_side`` (the side its configs declare; it trains at any side with
    --resolution) make it look like a published model to a preset's folder check."""
    from diffusers import (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    torch.manual_seed(seed)
    tok = build_offline_tokenizer(extra_words)
    native = native_side or image_size
    if family == "sdxl":
        width = text_width or 64          # the two encoders' penultimate states side by side
        te1, te2 = _clip(tok, width // 2), _clip(tok, width // 2, projection=32)
        unet = UNet2DConditionModel(
            sample_size=native // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            cross_attention_dim=width, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=32,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
        sched = EulerDiscreteScheduler.from_config(scheduler_config())
        return StableDiffusionXLPipeline(vae=_vae(image_size, 4), text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=sched)
    if family == "sd3":
        width = text_width or 32          # T5's width; the CLIP states are padded to it
        transformer = SD3Transformer2DModel(sample_size=native // 2, patch_size=2, in_channels=16, num_layers=depth or 2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=width,
                                            caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                                            pos_embed_max_size=8, qk_norm="rms_norm")
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER),
            vae=_vae(image_size, 16, shift=0.1), text_encoder=_clip(tok, 16, projection=32), tokenizer=tok,
            text_encoder_2=_clip(tok, 16, projection=32), tokenizer_2=tok, text_encoder_3=_t5(tok, width),
            tokenizer_3=tok)
    if family == "flux":
        width = text_width or 32          # T5's width
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=depth or 1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=width,
                                             pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                             axes_dims_rope=(2, 2, 4))
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
        return FluxPipeline(scheduler=sched, vae=_vae(native, 16, shift=0.1), text_encoder=_clip(tok, 32),
                            tokenizer=tok, text_encoder_2=_t5(tok, width), tokenizer_2=tok, transformer=transformer)
    raise ValueError(f"family {family!r}: build_tiny makes sdxl, sd3 and flux (sd: build_tiny_pipeline)")


def build_preset_shaped(preset, seed: int = 0, extra_words=()):
    """A tiny pipeline that passes ``preset``'s folder check (presets.Preset of a transformer or
    SDXL family): its family, objective, latent channels, native side, text width, depth and
    guidance embedding are the published model's, everything else is tiny (the wide text
    encoders have one layer and a 64-wide MLP). It trains at 16 px with --resolution 16."""
    if preset.family in LLM_FAMILIES:
        return build_tiny_llm(preset.family, seed=seed, extra_words=extra_words, text_width=preset.text_width,
                              depth=preset.depth, native_side=preset.resolution,
                              latent_channels=preset.latent_channels, guidance_embeds=bool(preset.guidance_embeds))
    return build_tiny(preset.family, seed=seed, extra_words=extra_words, text_width=preset.text_width,
                      depth=preset.depth, native_side=preset.resolution,
                      guidance_embeds=bool(preset.guidance_embeds))


LLM_FAMILIES = ("flux2", "qwenimage", "zimage")     # built by tiny_llm.build_tiny_llm


def save_tiny(out_dir, family: str, **kwargs) -> Path:
    if family == "sd":
        return save_tiny_pipeline(out_dir, layout="sd15", **kwargs)
    if family in LLM_FAMILIES:
        pipe = build_tiny_llm(family, **{k: v for k, v in kwargs.items() if k != "native_side"})
    else:
        pipe = build_tiny(family, **kwargs)
    pipe.save_pretrained(Path(out_dir), safe_serialization=True)
    return Path(out_dir)
