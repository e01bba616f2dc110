"""Pre-train the tiny Stable-Diffusion-shaped pipeline that freezeasguard ships.

What it learns: generic people of the synthetic world captioned with their traits in the words
the cast is made of ("a photo of a person with a long face, brown skin, curly red hair, smiling,
wearing a red shirt, in front of the sea"; each trait left out of a caption with probability
--trait-drop, so the model also draws a person whose traits the caption does not say), logos and
clothes at 32 px. Never a named person: fine-tuning then only has to bind a name to traits the
model already draws, which is how a real text-to-image model learns a face.

Recipe (each choice measured against the runs before it; docs/experiments.md has the record):
- the CLIP-style text encoder trains with the UNet (a frozen random one gave "red hat" and "blue
  hat" per-token cosine similarities >= 0.958, so the UNet could hardly tell prompts apart);
  it is frozen afterwards, like real SD's;
- zero terminal SNR (--zero-terminal-snr: SD's betas rescaled so the last step is pure noise,
  v-prediction, DDIM sampling from the last step). With SD's own schedule the last training step
  still holds 7-9% of the image, so the model learnt to read a portrait's colours from it, and
  sampling, which starts from pure noise, drew faces in the noise's colours (prior 0.57; this
  change alone: 0.91 within 1,500 steps);
- min-SNR-5 loss weighting plus an x0-weight floor of 1 (--x0-weight-floor): min-SNR alone gives
  the high-noise steps, where layout and colours are decided, almost no weight;
- an exponential moving average of the weights (text encoder and UNet) is what ships; constant
  learning rate after a warm-up (the EMA does the annealing, so a run can be continued);
- the VAE (32 px -> 4x16x16) is kept from --vae-from when given, else trained here.

Checkpoints (weights, EMA, AdamW moments as safetensors, progress as JSON) go to --work every
--checkpoint-minutes, atomically; rerunning the same command resumes there, and a resume with
other settings is refused. At the end (or with --export-only) the EMA pipeline is written to
--out with pretrain_info.json (settings, seconds, losses, sha256 of every weight file).

The shipped model is the world-v3 model (4,194 steps of the recipe without the last two
changes, 65 CPU minutes) continued for 2,138 steps with them (40 CPU minutes):

    python scripts/pretrain_tiny.py --work runs/pretrain-zsnr --out runs/tiny-sd-zsnr \
        --continue-from <the world-v3 pipeline> --zero-terminal-snr --x0-weight-floor 1 \
        --steps 6000 --threads 2      # stopped at 2,138, then the same command with --export-only

To pre-train it further, start a new run from it (its VAE kept, its history recorded):

    python scripts/pretrain_tiny.py --work runs/pretrain-next --out runs/tiny-sd-next \
        --continue-from src/freezeasguard/assets/tiny-sd --zero-terminal-snr --x0-weight-floor 1 \
        --steps 4000 --threads 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from freezeasguard.training.data import preprocess  # noqa: E402
from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss, draw_noise, min_snr_weights  # noqa: E402
from freezeasguard.experiment.synthetic_world import SyntheticWorld  # noqa: E402
from freezeasguard.io import atomic_save_safetensors, atomic_write_json, normal_permissions  # noqa: E402
from freezeasguard.models.families.tiny import build_offline_tokenizer, scheduler_config, tiny_unet_config  # noqa: E402
from freezeasguard.synthetic import world_vocabulary  # noqa: E402
from freezeasguard.synthetic.world import person_caption, render_domain  # noqa: E402

logger = logging.getLogger("pretrain")
MAX_TOKENS = 64     # a generic caption with every trait named is up to ~51 tokens
# settings that define the run: a resume with any of these changed is refused
IDENTITY = ("seed", "people", "logos", "clothes", "trait_drop", "batch", "lr", "text_lr", "ema_decay",
            "min_snr_gamma", "vae_from", "vae_steps", "warmup", "continue_from", "unet_channels", "attention_heads",
            "x0_weight_floor", "zero_terminal_snr")   # (--unet-from only starts a run)


def render_pool(a):
    """Images and, per image, how to caption it: a fixed caption, or (scene, traits) for a generic
    person whose caption is drawn anew each step (trait dropout)."""
    images, items = [], []
    for domain, n in (("people", a.people), ("logos", a.logos), ("clothes", a.clothes)):
        for img, cap, attrs in tqdm(render_domain(domain, n, a.seed, 32, generic=domain == "people"),
                                    total=n, desc=f"render {domain}"):
            images.append(img)
            if domain == "people":
                scene = {k: attrs[k] for k in ("expression", "shirt", "background")}
                traits = {k: v for k, v in attrs.items() if k not in scene and k != "name"}
                items.append((scene, traits))
            else:
                items.append(cap)
    return images, items


def caption_of(item, rng: random.Random, trait_drop: float) -> str:
    if isinstance(item, str):
        return item
    scene, traits = item
    drop = frozenset(k for k in traits if rng.random() < trait_drop)
    return person_caption("a person", scene, traits, drop)


def build_vae(a, pixels, work: Path):
    """The VAE of --vae-from, or the one this run trained (kept in --work), or a new one trained
    here: MSE + a small KL term, batch 32, cosine-decayed lr."""
    from diffusers import AutoencoderKL
    if a.vae_from or a.continue_from:
        return AutoencoderKL.from_pretrained(Path(a.vae_from or a.continue_from) / "vae").eval()
    if (work / "vae" / "config.json").exists():
        return AutoencoderKL.from_pretrained(work / "vae").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        norm_num_groups=8, sample_size=32)
    torch.manual_seed(a.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=a.vae_steps, pct_start=0.02)
    for _ in tqdm(range(a.vae_steps), desc="VAE"):
        x = pixels[torch.randint(0, len(pixels), (32,))]
        post = vae.encode(x).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(post.sample()).sample, x) + 1e-3 * post.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        mean = torch.cat([vae.encode(pixels[s:s + 256]).latent_dist.mean for s in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    vae.save_pretrained(work / "vae", safe_serialization=True)
    return vae.eval()


def build_models(a, tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(a.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    if a.continue_from:
        # every weight of a pipeline this script made (its EMA weights) starts the new run
        text_encoder = CLIPTextModel.from_pretrained(Path(a.continue_from) / "text_encoder")
        if text_encoder.config.vocab_size != len(tokenizer):
            sys.exit(f"error: {a.continue_from} has another vocabulary ({text_encoder.config.vocab_size} tokens, this "
                     f"world has {len(tokenizer)}); start a new run with --unet-from instead")
        unet = UNet2DConditionModel.from_pretrained(Path(a.continue_from) / "unet")
    elif a.unet_from:
        # the conv and norm weights of an earlier model transfer; its cross-attention is re-learnt
        unet = UNet2DConditionModel.from_pretrained(Path(a.unet_from) / "unet")
    else:
        channels = tuple(int(c) for c in a.unet_channels.split(","))
        unet = UNet2DConditionModel(**{**tiny_unet_config("sd15", sample_size=16, block_out_channels=channels,
                                                          cross_attention_dim=64), "attention_head_dim": a.attention_heads})
    return text_encoder, unet


def flat_state(prefix: str, module) -> dict:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def optimizer_state(opt, params: list) -> dict:
    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                out[f"adam.{i}.{k}"] = st[k]
    return out


def load_optimizer_state(opt, params: list, tensors: dict, step: int):
    for i, p in enumerate(params):
        if f"adam.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone()}


def save_checkpoint(work: Path, models: dict, opt, params, progress: dict):
    tensors = {}
    for name, m in models.items():
        tensors.update(flat_state(name, m))
    tensors.update(optimizer_state(opt, params))
    atomic_save_safetensors(tensors, work / "checkpoint.safetensors")
    atomic_write_json(work / "progress.json", progress)     # written second: it names a complete checkpoint


def run_summary(step: int, losses: list[float], seconds: float) -> dict:
    return {"steps": step, "seconds": seconds, "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "loss_curve_per_100_steps": [sum(losses[i:i + 100]) / len(losses[i:i + 100])
                                         for i in range(0, len(losses), 100)],
            "torch": torch.__version__}


def noise_schedule_config(zero_terminal_snr: bool) -> dict:
    """SD's schedule (epsilon, sampled with PNDM), or with --zero-terminal-snr (Lin et al., 2024)
    its betas rescaled so the last step is pure noise, v-prediction (epsilon is undefined there)
    and DDIM from the last step ("trailing"). SD's schedule keeps 7% of the image at its last step,
    which training learns to read (the colours of a 16x16 latent's large regions) and sampling,
    starting from pure noise, cannot: the prompt's colours then lose to the noise's."""
    if not zero_terminal_snr:
        return {"_class_name": "PNDMScheduler", **scheduler_config("epsilon")}
    return {"_class_name": "DDIMScheduler", **scheduler_config("v_prediction"), "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing"}


def export_pipeline(out: Path, vae, tokenizer, text_encoder, unet, info: dict, zero_terminal_snr: bool = False):
    import diffusers
    config = noise_schedule_config(zero_terminal_snr)
    sampler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=sampler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    normal_permissions(out)
    info["sha256"] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(out.rglob("*.safetensors"))}
    # the prior, measured as the demo reads it: trait accuracy on generic people at guidance 3
    info["prior"], _ = SyntheticWorld(0).measure_prior(out)
    logger.info("prior trait accuracy %.3f %s", info["prior"]["trait_accuracy"], info["prior"]["per_trait"])
    atomic_write_json(out / "pretrain_info.json", info)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where the finished (EMA) pipeline is written")
    ap.add_argument("--work", required=True, help="checkpoint folder; rerunning the command resumes from it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--people", type=int, default=12000)
    ap.add_argument("--logos", type=int, default=3000)
    ap.add_argument("--clothes", type=int, default=3000)
    ap.add_argument("--trait-drop", type=float, default=0.3, help="chance that a caption leaves out each trait")
    ap.add_argument("--steps", type=int, default=4000, help="total UNet steps (a resume can raise it)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--text-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--x0-weight-floor", type=float, default=0.0,
                    help="x0 weight added to min-SNR's at every noise level (1: v-prediction's weight at high noise; "
                         "0: plain min-SNR, the v3 model)")
    ap.add_argument("--zero-terminal-snr", action="store_true",
                    help="rescale the noise schedule to end in pure noise, train v-prediction, sample with DDIM "
                         "(trailing); a --continue-from model relearns its output")
    ap.add_argument("--vae-from", help="a pipeline folder whose VAE to keep (else one is trained here)")
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--unet-from", help="a pipeline folder whose UNet weights start the UNet")
    ap.add_argument("--continue-from", help="a pipeline this script made: its VAE, text encoder and UNet start the run")
    ap.add_argument("--unet-channels", default="32,32,64,64", help="a new UNet's block widths (the shipped model's)")
    ap.add_argument("--attention-heads", type=int, default=1, help="a new UNet's attention heads per block")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (after a checkpoint) after this long")
    ap.add_argument("--checkpoint-minutes", type=float, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export-only", action="store_true", help="write --out from the last checkpoint and stop")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    settings = vars(a)
    progress = json.loads((work / "progress.json").read_text()) if (work / "progress.json").exists() else None
    if progress:
        # a setting added after a run began is compared with its default (what that run used)
        before = {k: progress["settings"].get(k, ap.get_default(k)) for k in IDENTITY}
        changed = {k: (before[k], settings[k]) for k in IDENTITY if before[k] != settings[k]}
        if changed:
            sys.exit(f"error: {work} holds a run with other settings {changed} (was, now): use another --work")

    images, items = render_pool(a)
    pixels = torch.stack([preprocess(im, 32) for im in images])
    vae = build_vae(a, pixels, work)
    with torch.no_grad():
        dists = [vae.encode(pixels[s:s + 256]).latent_dist for s in range(0, len(pixels), 256)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
        rec_mse = float(torch.nn.functional.mse_loss(vae.decode(mean[:256]).sample, pixels[:256]))
    scaling = float(vae.config.scaling_factor)
    logger.info("VAE reconstruction MSE %.4f on this world, scaling %.3f", rec_mse, scaling)

    tokenizer = build_offline_tokenizer(world_vocabulary(), model_max_length=MAX_TOKENS)
    text_encoder, unet = build_models(a, tokenizer)
    ema_text, ema_unet = build_models(a, tokenizer)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    for p in list(ema_text.parameters()) + list(ema_unet.parameters()):
        p.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": a.lr},
                             {"params": list(text_encoder.parameters()), "lr": a.text_lr}], weight_decay=1e-2)
    models = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    step, losses = 0, []
    if progress:
        from safetensors.torch import load_file
        tensors = load_file(str(work / "checkpoint.safetensors"))
        for name, m in models.items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        step, losses = progress["step"], progress["losses"]
        load_optimizer_state(opt, params, tensors, step)
        logger.info("resumed from %s at step %d", work, step)

    info = {"settings": settings, "vae_reconstruction_mse": rec_mse, "vae_scaling_factor": scaling,
            # where the UNet's first weights came from (that model's own record is in git history)
            "unet_from_sha256": hashlib.sha256((Path(a.unet_from) / "unet" / "diffusion_pytorch_model.safetensors")
                                               .read_bytes()).hexdigest() if a.unet_from else None,
            # the run this one continued, one level deep: its own record holds the runs before it
            "continued_from": ({k: v for k, v in json.loads((Path(a.continue_from) / "pretrain_info.json").read_text())
                                .items() if k != "loss_curve_per_100_steps"} if a.continue_from else None),
            "unet_params": sum(p.numel() for p in unet.parameters()), "unet_tensors": len(list(unet.parameters())),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters())}
    if a.export_only:
        export_pipeline(out, vae, tokenizer, ema_text, ema_unet, {**info, **run_summary(step, losses, progress["seconds"])},
                        a.zero_terminal_snr)
        return

    schedule = NoiseSchedule.from_scheduler_config(noise_schedule_config(a.zero_terminal_snr))
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()
    t_run, t_ckpt = time.time(), time.time()
    seconds_before = progress["seconds"] if progress else 0.0
    bar = tqdm(total=a.steps, initial=step, desc="pre-train")
    while step < a.steps:
        # every draw is seeded by the step, so a resumed run draws what an uninterrupted one would
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        rng = random.Random(a.seed * 1_000_003 + step)
        idx = torch.randint(0, len(pixels), (a.batch,), generator=g)
        d = draw_noise(a.batch, (4, 16, 16), schedule.num_train_timesteps, g)
        latents = (mean[idx] + std[idx] * d.latent_noise) * scaling
        captions = [caption_of(items[i], rng, a.trait_drop) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        drop = torch.rand(a.batch, generator=g) < 0.1    # empty captions: classifier-free guidance
        ids[drop] = empty_ids
        cond = text_encoder(ids)[0]
        per_sample = diffusion_loss(unet, latents, cond, d.noise, d.timesteps, schedule)
        loss = (per_sample * min_snr_weights(d.timesteps, schedule, a.min_snr_gamma, a.x0_weight_floor)).mean()
        if not torch.isfinite(loss):
            sys.exit(f"error: loss is {loss.item()} at step {step}: lower --lr; the last checkpoint is in {work}")
        for group, base in zip(opt.param_groups, (a.lr, a.text_lr)):
            group["lr"] = base * min(1.0, (step + 1) / a.warmup)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(a.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (text_encoder, ema_text)):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        losses.append(per_sample.mean().item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        over = a.max_minutes and time.time() - t_run > 60 * a.max_minutes
        if time.time() - t_ckpt > 60 * a.checkpoint_minutes or step == a.steps or over:
            save_checkpoint(work, models, opt, params, {"settings": settings, "step": step, "losses": losses,
                                                        "seconds": seconds_before + time.time() - t_run})
            t_ckpt = time.time()
            logger.info("checkpoint at step %d, loss (last 100) %.4f", step, sum(losses[-100:]) / len(losses[-100:]))
        if over:
            logger.warning("stopping at step %d (--max-minutes); rerun the command to continue", step)
            return
    bar.close()
    info.update(run_summary(step, losses, seconds_before + time.time() - t_run))
    export_pipeline(out, vae, tokenizer, ema_text, ema_unet, info, a.zero_terminal_snr)
    logger.info("pre-trained %d steps -> %s", step, out)


if __name__ == "__main__":
    main()
