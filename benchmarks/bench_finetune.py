"""Guarded fine-tuning cost at freezing ratios 0, 0.1, 0.3, 0.8 with random and learned masks.

For each row: peak memory and step time of AdamW fine-tuning with the mask enforced (frozen
tensors: no gradient, no optimizer state). ideal_saving_bytes = frozen parameters x (gradient +
two AdamW moments) x 4 bytes; measured_saving_bytes = peak(rho = 0) - peak(row).
Target (issue): measured >= 0.95 x ideal.

The learned masks come from a short mask learning on the same UNet with random latents (their
frozen set has the size distribution of a learned mask; quality is not measured here).

    python benchmarks/bench_finetune.py --out bench_finetune.json
    python benchmarks/bench_finetune.py --device cuda --preset sd15-shapes --out bench_finetune_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from _common import (PRESETS, NearbyBase, build_unet, peak_rss_bytes, print_table, random_batch,  # noqa: I001
                     reset_peak_rss, rss_bytes, run_isolated, timed)

RATIOS = (0.0, 0.1, 0.3, 0.8)


def learn_scores(preset, device, path):
    """A few mask updates on random latents: logits with a learned (not uniform) structure."""
    from freezeasguard.bilevel import BilevelState
    from freezeasguard.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.learn import LearnConfig, mask_update
    from freezeasguard.models import scheduler_config

    unet, latent, text_dim = build_unet(preset, device)
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    cfg = LearnConfig(inner_steps=1, user_lr=1e-4, device=device)
    state = BilevelState(unet, NearbyBase(unet), cfg.temperature)
    state.logits = cfg.temperature * (-3 + 2 * torch.rand(len(state.params)))
    step = {"i": 0}

    def loss_fn(sign=1.0):
        step["i"] += 1
        x, text, noise, t = random_batch(2, latent, text_dim, device, step["i"])
        per = diffusion_loss(unet, x, text, noise, t, schedule)
        return sign * per[:1].mean() + per[1:].mean(), None

    for _ in range(3):
        mask_update(state, loss_fn, lambda: loss_fn(-1.0), cfg)
    torch.save(state.logits, path)   # our own temp file, written and read by this benchmark only


def worker(scheme: str, ratio: float, preset: str, device: str, batch: int, repeats: int, scores_path: str,
           amp: str, checkpointing: bool) -> dict:
    from freezeasguard.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.finetune import FinetuneConfig, build_optimizer
    from freezeasguard.mask import Mask
    from freezeasguard.models import scheduler_config

    base_rss = rss_bytes()
    unet, latent, text_dim = build_unet(preset, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    named = list(unet.named_parameters())
    fp = {"weights_hash": "benchmark"}
    if scheme == "learned":
        mask = Mask.from_scores(named, torch.load(scores_path, weights_only=True), ratio, base_fingerprint=fp)
    else:
        mask = Mask.random(named, ratio, seed=0, base_fingerprint=fp)
    mask.apply(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = build_optimizer(unet, FinetuneConfig(lr=1e-5))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    x, text, noise, t = random_batch(batch, latent, text_dim, device, 0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.startswith("cuda") else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion_loss(unet, x, text, noise, t, schedule).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    reset_peak_rss()
    seconds = timed(step, device, repeats)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes() - base_rss
    frozen_params = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    return {"scheme": scheme, "ratio": ratio, "frozen_param_fraction": frozen_params / total,
            "frozen_params": frozen_params, "peak_bytes": peak, "step_s": seconds,
            "ideal_saving_bytes": frozen_params * 3 * 4}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_finetune.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mixed-precision", default="bf16", help="autocast dtype on CUDA (ignored on CPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    a = ap.parse_args()
    preset = a.preset or ("sd15-shapes" if a.device.startswith("cuda") else "cpu-34m")
    if a.worker:
        print(json.dumps(worker(a.scheme, a.ratio, preset, a.device, a.batch_size, a.repeats, a.scores,
                                a.mixed_precision, a.gradient_checkpointing)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        scores = str(Path(tmp) / "scores.pt")
        learn_scores(preset, a.device, scores)
        common = ["--preset", preset, "--device", a.device, "--batch-size", str(a.batch_size), "--repeats",
                  str(a.repeats), "--scores", scores, "--mixed-precision", a.mixed_precision]
        if a.gradient_checkpointing:
            common.append("--gradient-checkpointing")
        rows = []
        for scheme in ("random", "learned"):
            for ratio in RATIOS:
                if scheme == "learned" and ratio == 0.0:
                    continue    # identical to random at rho = 0
                rows.append(run_isolated(__file__, ["--scheme", scheme, "--ratio", str(ratio), *common]))
    base = rows[0]["peak_bytes"]
    for r in rows:
        r["measured_saving_bytes"] = base - r["peak_bytes"]
        r["saving_vs_ideal"] = r["measured_saving_bytes"] / r["ideal_saving_bytes"] if r["ideal_saving_bytes"] else None
    print_table([{**r, "peak_MB": r["peak_bytes"] / 2**20, "ideal_MB": r["ideal_saving_bytes"] / 2**20,
                  "saved_MB": r["measured_saving_bytes"] / 2**20} for r in rows],
                ["scheme", "ratio", "frozen_param_fraction", "peak_MB", "step_s", "ideal_MB", "saved_MB",
                 "saving_vs_ideal"])
    result = {"rows": rows, "preset": preset, "device": a.device, "batch_size": a.batch_size,
              "gradient_checkpointing": a.gradient_checkpointing,
              "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "target": "measured_saving_bytes >= 0.95 * ideal_saving_bytes"}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
