"""GPU cost of guarded fine-tuning and of mask learning on the SD v1.5 UNet shapes (paper Table 3).

Random-init SD v1.5 UNet (859.5 M parameters), batch 4, 64x64 latents (512 px), 77x768 text
embeddings, bf16 autocast over fp32 weights, fused AdamW over the trainable tensors only. One
row per (freezing ratio, gradient checkpointing): peak memory (torch.cuda.max_memory_allocated
during the timed steps), median step time, the FLOPs of one step counted by
torch.utils.flop_counter (forward + the backward that frozen tensors leave), achieved TFLOP/s and
its share of the card's dense bf16 peak (MFU; with checkpointing the recomputed forward is not
counted, so MFU compares useful work). Frozen tensors are a random mask by parameter budget.
Then one mask-learning iteration (inner_steps lower steps + 1 upper step, Algorithm 1) beside
inner_steps plain full fine-tuning steps, as in bench_learn.py.

Goals (issue): guarded fine-tuning at >= 40% of bf16 peak; memory saving >= 0.95 of the ideal
(frozen parameters x (gradient + 2 AdamW moments) x 4 bytes).

    python benchmarks/bench_gpu.py --out benchmarks/results/bench_gpu_h100.json
    python benchmarks/bench_gpu.py --device cpu --preset cpu-34m --steps 2   # smoke test of the code path
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from _common import PRESETS, NearbyBase, build_unet, print_table, random_batch, timed
from freezeasguard.models.families.shapes import guarded_full_gb, memory_plan, meta_model  # noqa: E402  (_common puts src/ on the path)

RATIOS = (0.0, 0.1, 0.3, 0.8)

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                    "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.2}


def card_peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):    # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def free_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def finetune_rows(unet, latent, text_dim, device, dtype, a) -> list[dict]:
    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.training.optim import build_optimizer
    from freezeasguard.guard.mask import Mask
    from freezeasguard.models.families.tiny import scheduler_config

    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    x, text, noise, t = random_batch(a.batch_size, latent, text_dim, device, 0)
    named = list(unet.named_parameters())
    total = sum(p.numel() for _, p in named)
    rows, model_flops = [], dict(a.known_flops)
    for checkpointing in {"both": (False, True), "off": (False,), "on": (True,)}[a.checkpointing]:
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        for ratio in a.ratios:
            for p in unet.parameters():
                p.requires_grad_(True)
            mask = Mask.random(named, ratio, seed=0, budget="params", base_fingerprint={"weights_hash": "benchmark"})
            mask.apply(unet)
            opt = build_optimizer(unet, FinetuneConfig(lr=1e-6))
            trainable = [p for p in unet.parameters() if p.requires_grad]

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                    loss = diffusion_loss(unet, x, text, noise, t, schedule).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()

            step()                      # optimizer state exists before the peak is reset
            free_memory(device)
            seconds = timed(step, device, a.steps, a.warmup)
            peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
            flops = None if a.compile else count_flops(step)   # the counter does not see inside compiled graphs
            if not checkpointing and flops is not None:
                model_flops[ratio] = flops
            frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
            useful = model_flops.get(ratio)
            rows.append({"ratio": ratio, "gradient_checkpointing": checkpointing, "compiled": a.compile,
                         "frozen_params": frozen, "frozen_param_fraction": frozen / total, "step_s": seconds,
                         "peak_bytes": peak, "counted_flops": flops, "model_flops": useful,
                         "achieved_tflops": useful / seconds / 1e12 if useful else None,
                         "ideal_saving_bytes": frozen * 3 * 4})
            logging_row(rows[-1])
            opt = trainable = step = None      # frees the optimizer state before the next row
            for p in unet.parameters():
                p.grad = None
            free_memory(device)
    unet.disable_gradient_checkpointing()
    for p in unet.parameters():
        p.requires_grad_(True)
    for r in rows:
        base = next((b for b in rows if b["ratio"] == 0.0 and b["gradient_checkpointing"] == r["gradient_checkpointing"]),
                    None)
        if base and r["peak_bytes"] is not None:
            r["measured_saving_bytes"] = base["peak_bytes"] - r["peak_bytes"]
            r["saving_vs_ideal"] = r["measured_saving_bytes"] / r["ideal_saving_bytes"] if r["ideal_saving_bytes"] else None
    return rows


def logging_row(r):
    print(f"  rho {r['ratio']:.1f} ckpt {int(r['gradient_checkpointing'])} compiled {int(r['compiled'])}: "
          f"{r['step_s'] * 1e3:.1f} ms/step, {r['achieved_tflops'] or 0:.1f} TFLOP/s", flush=True)


def mask_learning_row(unet, latent, text_dim, device, dtype, a) -> dict:
    from freezeasguard.guard.bilevel import BilevelState, remask_
    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.training.optim import build_optimizer
    from freezeasguard.guard.learn import LearnConfig
    from freezeasguard.guard.mask_updates import ClosureContext, mask_update
    from freezeasguard.guard.users import users_for_update
    from freezeasguard.models.families.tiny import scheduler_config

    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    x, text, noise, t = random_batch(a.batch_size, latent, text_dim, device, 1)
    half = a.batch_size // 2

    def loss_fn(sign_ill=1.0):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            per = diffusion_loss(unet, x, text, noise, t, schedule)
        return sign_ill * per[:half].mean() + per[half:].mean(), None

    opt = build_optimizer(unet, FinetuneConfig(lr=1e-6))

    def plain_step():
        opt.zero_grad(set_to_none=True)
        loss_fn()[0].backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    plain_step()
    free_memory(device)
    plain = timed(plain_step, device, a.steps, a.warmup)
    plain_peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    opt = None      # frees the optimizer state
    for p in unet.parameters():
        p.grad = None
    free_memory(device)

    cfg = LearnConfig(inner_steps=a.inner_steps, user_lr=1e-6, device=device)
    state = BilevelState(unet, NearbyBase(unet), cfg.temperature)
    state.logits = cfg.temperature * (-3 + 2 * torch.rand(len(state.params)))
    with torch.no_grad():
        remask_(state.params, state.theta_d, torch.zeros_like(state.logits), state.m)
    free_memory(device)
    ctx = ClosureContext(state, cfg, loss_fn, lambda: loss_fn(-1.0))
    iteration = timed(lambda: mask_update(state, ctx, users_for_update(cfg, 0)), device, a.mask_iterations, 1)
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    return {"inner_steps": a.inner_steps, "plain_step_s": plain, "mask_iteration_s": iteration,
            "time_ratio": iteration / (a.inner_steps * plain),
            "per_pass_ratio": iteration / ((a.inner_steps + 1) * plain),
            "plain_peak_bytes": plain_peak, "mask_learning_peak_bytes": peak,
            "memory_ratio": peak / plain_peak if peak and plain_peak else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="sd15-shapes", choices=list(PRESETS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--mask-iterations", type=int, default=2, help="timed mask-learning iterations")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when its name is not in the table")
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--checkpointing", default="both", choices=["both", "off", "on"],
                    help="rows without gradient checkpointing, with it, or both")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the UNet (each ratio recompiles, since requires_grad changes the graph)")
    ap.add_argument("--flops-from", help="a JSON this script wrote without --compile: FLOPs per ratio for compiled rows")
    ap.add_argument("--skip-mask-learning", action="store_true")
    a = ap.parse_args()
    a.known_flops = {}
    if a.flops_from:
        a.known_flops = {r["ratio"]: r["model_flops"] for r in json.loads(Path(a.flops_from).read_text())["finetune"]
                         if not r["gradient_checkpointing"]}
    cuda = torch.device(a.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine, or pass --device cpu --preset cpu-34m for a smoke test")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.mixed_precision) if cuda else None
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tflops = a.peak_tflops or (card_peak_tflops(name) if cuda else None)

    t0 = time.time()
    unet, latent, text_dim = build_unet(a.preset, a.device)
    print(f"{name}: {a.preset} UNet, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters, "
          f"built in {time.time() - t0:.0f}s", flush=True)
    if a.compile:
        unet.compile()      # in place: parameter names (and so masks) stay those of the eager model
    rows = finetune_rows(unet, latent, text_dim, a.device, dtype, a)
    for r in rows:
        r["mfu"] = r["achieved_tflops"] / peak_tflops if peak_tflops and r["achieved_tflops"] else None
    learning = None if a.skip_mask_learning else mask_learning_row(unet, latent, text_dim, a.device, dtype, a)

    print_table([{**r, "peak_GiB": r["peak_bytes"] / 2**30 if r["peak_bytes"] else None,
                  "ideal_saving_GiB": r["ideal_saving_bytes"] / 2**30,
                  "step_ms": r["step_s"] * 1e3} for r in rows],
                ["ratio", "gradient_checkpointing", "compiled", "frozen_param_fraction", "step_ms", "peak_GiB",
                 "ideal_saving_GiB", "saving_vs_ideal", "achieved_tflops", "mfu"])
    if learning:
        print(f"mask learning: one iteration ({a.inner_steps} lower + 1 upper) {learning['mask_iteration_s']:.3f}s vs "
              f"{a.inner_steps} plain steps {a.inner_steps * learning['plain_step_s']:.3f}s: time_ratio "
              f"{learning['time_ratio']:.3f}, memory_ratio {learning['memory_ratio']}")
    # the big families' memory plan from their real shapes (meta device): what this card would have to hold
    plan = []
    for family in ("sdxl", "flux1-dev"):
        params = sum(p.numel() for p in meta_model(family).parameters())
        plan.append({"model": family, **memory_plan(params), "guarded_ft_30pct_gb": guarded_full_gb(params, 0.3)})
    print_table(plan, ["model", "params_billion", "mask_learning_fp32_gb", "full_ft_fp32_adamw_gb", "guarded_ft_30pct_gb"])
    result = {"device_name": name, "peak_bf16_tflops": peak_tflops, "preset": a.preset, "batch_size": a.batch_size,
              "mixed_precision": a.mixed_precision, "compiled": a.compile, "torch": torch.__version__, "finetune": rows,
              "mask_learning": learning, "memory_plan": plan,
              "goals": {"mfu": 0.40, "saving_vs_ideal": 0.95}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
