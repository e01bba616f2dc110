"""The published denoiser configs of the big models, as numbers (no download), and the memory plan
computed from their real shapes built on the meta device (no memory is allocated)."""
from __future__ import annotations

from freezeasguard.models.memplan import gb, stage_plan

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32)
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X)
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm")
FLUX1_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds false)
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])

FLUX2_DEV = dict(  # black-forest-labs/FLUX.2-dev transformer/config.json ("32 billion parameter")
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32],
    rope_theta=2000, guidance_embeds=True)
QWEN_IMAGE = dict(  # Qwen/Qwen-Image transformer/config.json ("a 20B MMDiT")
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56])
Z_IMAGE = dict(  # Tongyi-MAI/Z-Image transformer/config.json ("6B parameters")
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
    n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])

PUBLISHED = {   # name -> (diffusers class, config, published parameter count of the denoiser)
    "sdxl": ("UNet2DConditionModel", SDXL_UNET, 2.6e9),
    "sd35-medium": ("SD3Transformer2DModel", SD35_MEDIUM, 2.5e9),
    "sd35-large": ("SD3Transformer2DModel", SD35_LARGE, 8.1e9),
    "flux1-dev": ("FluxTransformer2DModel", FLUX1_DEV, 12e9),
    "flux2-dev": ("Flux2Transformer2DModel", FLUX2_DEV, 32e9),
    "qwen-image": ("QwenImageTransformer2DModel", QWEN_IMAGE, 20e9),
    "z-image": ("ZImageTransformer2DModel", Z_IMAGE, 6e9),
}


def meta_model(name: str):
    """The denoiser with its real shapes on the meta device: counts and names, no memory."""
    import diffusers
    from accelerate import init_empty_weights

    cls_name, config, _ = PUBLISHED[name]
    with init_empty_weights():
        return getattr(diffusers, cls_name)(**config)


def memory_plan(params: int, activations_gb: float = 0.0) -> dict:
    """GB per device for one replica, before activations (memplan.stage_plan, B = bytes per parameter):
    - mask learning, fp32: theta(m) 4 + theta_d 4 + gradient 4 (+ logits, negligible);
    - mask learning, bf16 theta_d (a plan, not an option yet): theta(m) 4 + theta_d 2 + gradient 4;
    - full fine-tuning, fp32 AdamW: weights 4 + gradient 4 + two moments 8 (frozen share: guarded_full_gb);
    - bf16 weights with fp32 AdamW moments (diffusers' scripts under mixed precision with a bf16
      copy): weights 2 + gradient 2 + moments 8 + fp32 master 4."""
    activations = int(activations_gb * 2**30)
    learning = stage_plan("mask_learning", params, activations)
    return {"params_billion": params / 1e9,
            "mask_learning_fp32_gb": gb(learning.total),
            "mask_learning_bf16_theta_d_gb": gb(learning.total - learning.buffers["theta_d"] // 2),
            "full_ft_fp32_adamw_gb": gb(stage_plan("warm_start", params, activations).total),
            "full_ft_bf16_mixed_gb": 16 * params / 2**30, "weights_bf16_gb": 2 * params / 2**30}


def guarded_full_gb(params: int, frozen_fraction: float) -> float:
    """AdamW fine-tuning under a mask, before activations: every weight (4 B) plus gradient and two
    moments (12 B) for the trainable share only."""
    return gb(stage_plan("guarded_ft", params, trainable=round(params * (1 - frozen_fraction))).total)
