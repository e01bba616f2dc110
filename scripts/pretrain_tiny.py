"""Pre-train the tiny Stable-Diffusion-shaped pipeline that freezeasguard ships.

What it learns: generic people (random identities, captions "a photo of a person ..."), logos
and clothes of the synthetic world at 32 px. Never the named people of any cast: as with a real
model, fine-tuning is what teaches it a named person.

Stages: render data -> train the VAE (AutoencoderKL, 32 px -> 4x16x16 latents) -> set its
scaling factor -> train the UNet (SD v1.5 block layout, small widths) on cached latents and text
embeddings of a frozen, randomly initialised CLIP text encoder (10% empty captions, so
classifier-free guidance works) -> save the pipeline in fp32 with pretrain_info.json (settings,
seconds, final losses, sha256 of every weight file).

    python scripts/pretrain_tiny.py --out src/freezeasguard/assets/tiny-sd [--unet-steps 3000]

The shipped model is four runs, each continuing the last (every run's settings, seconds, losses
and checksums are nested in its pretrain_info.json): --unet-steps 2500 --max-minutes 16 (1,119
steps done); --continue-from it --unet-steps 1000 --unet-lr 3e-4; --unet-steps 5500 --unet-lr 3e-4
--max-minutes 105 (5,029 done); then --attention-heads 1 --min-snr-gamma 5 --unet-batch 64
--unet-steps 2400 --unet-lr 3e-4 --seed 3 --people 8000 --logos 3000 --clothes 3000.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

logger = logging.getLogger("pretrain")


def render_pool(n_people, n_logos, n_clothes, seed):
    from freezeasguard.synthetic.world import render_domain
    images, captions = [], []
    for domain, n in (("people", n_people), ("logos", n_logos), ("clothes", n_clothes)):
        for img, cap, _ in render_domain(domain, n, seed, 32, generic=domain == "people"):
            images.append(img)
            captions.append(cap)
    return images, captions


def train_vae(vae, pixels, steps, batch, lr, kl_weight, seed):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    vae.train()
    losses = []
    for step in tqdm(range(steps), desc="VAE"):
        idx = torch.randint(0, len(pixels), (batch,))
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval()
    return sum(losses[-50:]) / len(losses[-50:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="src/freezeasguard/assets/tiny-sd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--people", type=int, default=3000)
    ap.add_argument("--logos", type=int, default=1500)
    ap.add_argument("--clothes", type=int, default=1500)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--unet-batch", type=int, default=16)
    ap.add_argument("--unet-lr", type=float, default=5e-4)
    ap.add_argument("--min-snr-gamma", type=float, default=0,
                    help="weight the UNet loss by min(SNR, gamma) / SNR (0: plain mean, as the first runs)")
    ap.add_argument("--attention-heads", type=int, default=0,
                    help="UNet attention heads (diffusers' attention_head_dim); with --continue-from the "
                         "trained weights are reused (heads split the same projections). 1 head trains about "
                         "2x faster on CPU than 8 heads of width 4 (0: keep / 8)")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop UNet training after this long (0: no limit)")
    ap.add_argument("--continue-from", help="a pipeline this script made: keep its VAE, text encoder and tokenizer "
                                            "and continue training its UNet (a new warm-up + cosine schedule)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from freezeasguard.data import preprocess
    from freezeasguard.diffusion import NoiseSchedule, diffusion_loss, draw_noise, min_snr_weights
    from freezeasguard.models import build_offline_tokenizer, scheduler_config, tiny_unet_config
    from freezeasguard.synthetic import world_vocabulary

    t_start = time.time()
    torch.manual_seed(a.seed)
    info = {"settings": vars(a), "stages": {}}
    images, captions = render_pool(a.people, a.logos, a.clothes, a.seed)
    pixels = torch.stack([preprocess(im, 32) for im in images])
    info["stages"]["render_s"] = time.time() - t_start

    t = time.time()
    previous = json.loads((Path(a.continue_from) / "pretrain_info.json").read_text()) if a.continue_from else None
    if previous:
        # one flat list, oldest first: each run is recorded once, without its own copy of the history
        info["previous_runs"] = previous.get("previous_runs", []) + [
            {k: v for k, v in previous.items() if k != "previous_runs"}]
        vae = AutoencoderKL.from_pretrained(Path(a.continue_from) / "vae")
    else:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        norm_num_groups=8, sample_size=32)
    vae_loss = train_vae(vae, pixels, a.vae_steps, a.vae_batch, 1e-3, 1e-3, a.seed) if not previous else None
    with torch.no_grad():
        dists = [vae.encode(pixels[s:s + 256]).latent_dist for s in range(0, len(pixels), 256)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        scaling = float(1.0 / mean.std())
        rec = vae.decode(mean[:256]).sample
        rec_mse = float(torch.nn.functional.mse_loss(rec, pixels[:256]))
    if previous:
        scaling = float(vae.config.scaling_factor)
    vae.register_to_config(scaling_factor=scaling)
    info["stages"].update(vae_s=time.time() - t, vae_final_loss=vae_loss, vae_reconstruction_mse=rec_mse,
                          vae_scaling_factor=scaling)
    logger.info("VAE: loss %s, reconstruction MSE %.4f, scaling %.3f", vae_loss, rec_mse, scaling)

    if previous:
        from transformers import CLIPTokenizer
        tokenizer = CLIPTokenizer.from_pretrained(Path(a.continue_from) / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(Path(a.continue_from) / "text_encoder").eval()
    else:
        tokenizer = build_offline_tokenizer(world_vocabulary(), model_max_length=40)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=40, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    torch.manual_seed(a.seed + len(info.get("previous_runs", [])))
    with torch.no_grad():
        def embed(texts):
            ids = tokenizer(texts, padding="max_length", max_length=40, truncation=True, return_tensors="pt").input_ids
            return text_encoder(ids)[0]
        text = torch.cat([embed(captions[s:s + 256]) for s in range(0, len(captions), 256)])
        empty = embed([""])[0]

    t = time.time()
    heads = {"attention_head_dim": a.attention_heads} if a.attention_heads else {}
    if previous:
        unet = UNet2DConditionModel.from_pretrained(Path(a.continue_from) / "unet", **heads)
    else:
        unet = UNet2DConditionModel(**{**tiny_unet_config("sd15", sample_size=16, block_out_channels=(32, 32, 64, 64),
                                                          cross_attention_dim=64), **heads})
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config("epsilon"))
    opt = torch.optim.AdamW(unet.parameters(), lr=a.unet_lr, weight_decay=1e-2)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.unet_lr, total_steps=a.unet_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(a.seed + len(info.get("previous_runs", [])))
    unet.train()
    losses, steps_done = [], 0
    for step in tqdm(range(a.unet_steps), desc="UNet"):
        idx = torch.randint(0, len(pixels), (a.unet_batch,), generator=g)
        d = draw_noise(a.unet_batch, (4, 16, 16), schedule.num_train_timesteps, g)
        latents = (mean[idx] + std[idx] * d.latent_noise) * scaling
        cond = text[idx].clone()
        drop = torch.rand(a.unet_batch, generator=g) < 0.1
        cond[drop] = empty
        per_sample = diffusion_loss(unet, latents, cond, d.noise, d.timesteps, schedule)
        if a.min_snr_gamma:
            loss = (per_sample * min_snr_weights(d.timesteps, schedule, a.min_snr_gamma)).mean()
        else:
            loss = per_sample.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        losses.append(per_sample.mean().item())    # unweighted: comparable across runs
        steps_done = step + 1
        if a.max_minutes and time.time() - t > 60 * a.max_minutes:
            logger.warning("stopping UNet training at step %d (time limit)", steps_done)
            break
    unet.eval()
    info["stages"].update(unet_s=time.time() - t, unet_steps_done=steps_done,
                          unet_final_loss=sum(losses[-100:]) / len(losses[-100:]),
                          unet_params=sum(p.numel() for p in unet.parameters()),
                          unet_tensors=len(list(unet.parameters())))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(scheduler_config("epsilon")), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = Path(a.out)
    pipe.save_pretrained(out, safe_serialization=True)
    info["total_s"] = time.time() - t_start
    info["torch"] = torch.__version__
    info["sha256"] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(out.rglob("*.safetensors"))}
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2))
    logger.info("pre-trained in %.0fs -> %s", info["total_s"], out)


if __name__ == "__main__":
    main()
