"""Cost of mask learning vs plain full fine-tuning on the same UNet and batch (and, with --users, of
mask learning over a range of simulated users vs the paper's single user).

One mask-learning iteration = inner_steps lower steps + 1 upper step (Algorithm 1). We report
  time_ratio     = iteration time / (inner_steps x full-FT AdamW step time)   (amortised over its inner steps)
  per_pass_ratio = iteration time / ((inner_steps + 1) x full-FT step time)   (same number of forward/backward passes)
  memory_ratio   = peak memory of mask learning / peak memory of full FT with AdamW
Targets (issue): time_ratio <= 1.10, memory_ratio <= 1.0.

    python benchmarks/bench_learn.py --out bench_learn.json
    python benchmarks/bench_learn.py --device cuda --preset sd15-shapes --out bench_learn_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _common import (PRESETS, FixedMix, NearbyBase, RssBaseline, build_unet, print_table, random_batch,  # noqa: I001
                     reset_peak_rss, run_isolated, timed)


# the simulated users of each mask-learning mode (LearnConfig fields)
USERS = {"mask_learning": {},
         "mask_learning_range": dict(simulated_users="sgd,adam", user_lr_min_factor=0.3, user_lr_max_factor=30,
                                     user_trajectory="restart"),
         "mask_learning_range_k2": dict(simulated_users="sgd,adam", user_lr_min_factor=0.3, user_lr_max_factor=30,
                                        user_trajectory="restart", users_per_update=2, user_weighting="softmax")}


def worker(mode: str, preset: str, device: str, batch: int, inner: int, repeats: int, amp: str) -> dict:
    from freezeasguard.guard.bilevel import BilevelState, remask_
    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.training.optim import build_optimizer
    from freezeasguard.training.batches import LocalBatch
    from freezeasguard.guard.learn import LearnConfig
    from freezeasguard.guard.mask_updates import UpdateContext, mask_update
    from freezeasguard.guard.users import draw_users, parse_user_steps
    from freezeasguard.models.families.tiny import scheduler_config

    baseline = RssBaseline()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    unet, latent, text_dim = build_unet(preset, device)
    unet.train()
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.startswith("cuda") else None
    # the same global batch for both: half illegal, half innocent in mask learning
    x, text, noise, t = random_batch(batch, latent, text_dim, device, 0)
    half = batch // 2

    def loss_fn():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            per = diffusion_loss(unet, x, text, noise, t, schedule)
        return per[:half].mean() + per[half:].mean(), None

    if mode == "full_ft":
        opt = build_optimizer(unet, FinetuneConfig(lr=1e-5))

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn()[0].backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
        reset_peak_rss()
        seconds = timed(step, device, repeats)
    else:
        cfg = LearnConfig(inner_steps=inner, user_lr=1e-5, device=device, **USERS[mode])
        state = BilevelState(unet, NearbyBase(unet), cfg.temperature)
        state.logits = cfg.temperature * (-3 + 2 * torch.rand(len(state.params)))
        with torch.no_grad():
            remask_(state.params, state.theta_d, torch.zeros_like(state.logits), state.m)
        ctx = UpdateContext(FixedMix(LocalBatch(x, text, noise, t, torch.full((batch,), 1.0 / half),
                                                torch.tensor([0] * half + [1] * (batch - half)), [half, batch - half])),
                            schedule, device, dtype, cfg, [n for n, _ in state.named])
        if cfg.user_trajectory == "restart" or cfg.users_per_update > 1:
            ctx.start_theta_d = state.flat_theta_d.clone()
        kinds = parse_user_steps(cfg.simulated_users)
        counter = iter(range(10**6))
        reset_peak_rss()
        seconds = timed(lambda: mask_update(state, ctx, draw_users(kinds, cfg.user_lr, cfg.user_lr_min_factor,
                                                                   cfg.user_lr_max_factor, cfg.users_per_update, 0,
                                                                   next(counter))),
                        device, max(1, repeats // inner))
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = baseline.peak_above()
    return {"mode": mode, "seconds": seconds, "peak_bytes": peak,
            "params": sum(p.numel() for p in unet.parameters()), "tensors": len(list(unet.parameters()))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_learn.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default=None, choices=list(PRESETS), help="default: cpu-34m on CPU, sd15-shapes on CUDA")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default 4 on CPU, 4 on CUDA)")
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10, help="full-FT steps timed (mask iterations: repeats/inner)")
    ap.add_argument("--mixed-precision", default="bf16", help="autocast dtype on CUDA (ignored on CPU)")
    ap.add_argument("--users", action="store_true",
                    help="also time a mask update over a range of simulated users (K=1 and K=2) against the paper's one")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    preset = a.preset or ("sd15-shapes" if a.device.startswith("cuda") else "cpu-34m")
    batch = a.batch_size or 4
    if a.worker:
        print(json.dumps(worker(a.mode, preset, a.device, batch, a.inner_steps, a.repeats, a.mixed_precision)))
        return
    common = ["--preset", preset, "--device", a.device, "--batch-size", str(batch), "--inner-steps",
              str(a.inner_steps), "--repeats", str(a.repeats), "--mixed-precision", a.mixed_precision]
    ft = run_isolated(__file__, ["--mode", "full_ft", *common])
    ml = run_isolated(__file__, ["--mode", "mask_learning", *common])
    users = {mode: run_isolated(__file__, ["--mode", mode, *common]) for mode in list(USERS)[1:]} if a.users else {}
    result = {
        "time_ratio": ml["seconds"] / (a.inner_steps * ft["seconds"]),
        "per_pass_ratio": ml["seconds"] / ((a.inner_steps + 1) * ft["seconds"]),
        "memory_ratio": ml["peak_bytes"] / ft["peak_bytes"],
        "full_ft_step_s": ft["seconds"], "mask_iteration_s": ml["seconds"],
        "full_ft_peak_bytes": ft["peak_bytes"], "mask_learning_peak_bytes": ml["peak_bytes"],
        "inner_steps": a.inner_steps, "batch_size": batch, "preset": preset, "device": a.device,
        "params": ft["params"], "tensors": ft["tensors"],
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "targets": {"time_ratio": 1.10, "memory_ratio": 1.0},
    }
    for mode, r in users.items():     # a range of simulated users against the paper's one, per mask update
        result[f"{mode}_vs_single_user"] = {"time_ratio": r["seconds"] / ml["seconds"],
                                            "memory_ratio": r["peak_bytes"] / ml["peak_bytes"],
                                            "mask_iteration_s": r["seconds"], "peak_bytes": r["peak_bytes"],
                                            "settings": USERS[mode]}
        if mode.endswith("k2"):
            result["targets"][f"{mode}_vs_single_user"] = 2.0
    print_table([{"what": "full FT step", "seconds": ft["seconds"], "peak_MB": ft["peak_bytes"] / 2**20},
                 {"what": f"mask iteration ({a.inner_steps}+1 passes)", "seconds": ml["seconds"],
                  "peak_MB": ml["peak_bytes"] / 2**20}]
                + [{"what": f"{mode} ({a.inner_steps}+1 passes per user)", "seconds": r["seconds"],
                    "peak_MB": r["peak_bytes"] / 2**20} for mode, r in users.items()], ["what", "seconds", "peak_MB"])
    for mode in users:
        print(f"{mode}: {result[mode + '_vs_single_user']['time_ratio']:.3f}x the time of the single-user update, "
              f"{result[mode + '_vs_single_user']['memory_ratio']:.3f}x its memory")
    print(f"time_ratio {result['time_ratio']:.3f} (target <= 1.10), per_pass_ratio {result['per_pass_ratio']:.3f}, "
          f"memory_ratio {result['memory_ratio']:.3f} (target <= 1.0)")
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
