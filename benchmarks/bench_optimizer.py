"""AdamW step cost on the shipped tiny UNet (684 tensors, 2.49 M parameters): torch's per-tensor
loop, foreach, and fused (what build_optimizer picks), plus gradient clipping, at 1 CPU thread,
the setting of the demo's one-thread job processes. Median of 30 steps after warm-up.

    python benchmarks/bench_optimizer.py --out bench_optimizer.json
"""
from __future__ import annotations

import argparse
import json

import torch
from _common import print_table, timed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="bench_optimizer.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.training.optim import build_optimizer
    from freezeasguard.synthetic import TINY_SD

    unet = UNet2DConditionModel.from_pretrained(TINY_SD / "unet")
    params = list(unet.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    rows = []
    variants = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    for name, kw in variants.items():
        opt = torch.optim.AdamW(params, lr=1e-6, **kw)
        rows.append({"variant": name, "adamw_step_ms": 1e3 * timed(opt.step, "cpu", args.repeats)})
    chosen = build_optimizer(unet, FinetuneConfig(lr=1e-6))
    rows.append({"variant": "build_optimizer", "adamw_step_ms": 1e3 * timed(chosen.step, "cpu", args.repeats)})
    clip_ms = 1e3 * timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), "cpu", args.repeats)
    base = rows[0]["adamw_step_ms"]
    for r in rows:
        r["speedup_vs_loop"] = base / r["adamw_step_ms"]
    print_table(rows, ["variant", "adamw_step_ms", "speedup_vs_loop"])
    print(f"clip_grad_norm_: {clip_ms:.2f} ms; tensors {len(params)}, parameters {sum(p.numel() for p in params):,}")
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows, "clip_grad_norm_ms": clip_ms}, f, indent=2)


if __name__ == "__main__":
    main()
