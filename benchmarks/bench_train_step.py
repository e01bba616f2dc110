"""What one training step of the shipped tiny UNet costs on this CPU, and whether the usual knobs
make it cheaper: the demo spends most of its time in these steps (batch 4, 16x16 latents, 64 text
tokens, one thread per job process), so its wall time is this number times its step count.

Rows, each a forward and backward pass with the loss on the output (median of --repeats after
warm-up): torch's default attention backend; the math attention backend; channels-last memory
format; both; and with --compile, torch.compile (its first step, the compilation, reported too).
A slower row is a knob that does not help here; the ratio to the default row is what to read.

    python benchmarks/bench_train_step.py --out benchmarks/results/bench_train_step_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from _common import print_table, timed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="add torch.compile (minutes to compile on a CPU)")
    ap.add_argument("--out", default="bench_train_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from freezeasguard.synthetic import TINY_SD

    unet = UNet2DConditionModel.from_pretrained(TINY_SD / "unet").train()
    side, text_dim = unet.config.sample_size, unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, unet.config.in_channels, side, side, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    text = torch.randn(args.batch, 64, text_dim, generator=gen)

    def step(model, latents):
        def run():
            model(latents, t, text).sample.pow(2).mean().backward()
        return run

    rows = []

    def measure(name, model, latents, ctx=contextlib.nullcontext):
        with ctx():
            start = time.perf_counter()
            step(model, latents)()
            first = time.perf_counter() - start
            ms = 1e3 * timed(step(model, latents), "cpu", args.repeats, warmup=2)
        rows.append({"variant": name, "step_ms": ms, "first_step_s": first})

    math_attention = lambda: sdpa_kernel(SDPBackend.MATH)        # noqa: E731
    measure("default", unet, x)
    measure("math attention", unet, x, math_attention)
    last = unet.to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    measure("channels-last", last, x_last)
    measure("channels-last + math attention", last, x_last, math_attention)
    unet = unet.to(memory_format=torch.contiguous_format)
    if args.compile:
        measure("torch.compile", torch.compile(unet), x)
    base = rows[0]["step_ms"]
    for r in rows:
        r["vs_default"] = r["step_ms"] / base
    print_table(rows, ["variant", "step_ms", "vs_default", "first_step_s"])
    params = sum(p.numel() for p in unet.parameters())
    print(f"tiny UNet: {params:,} parameters, batch {args.batch}, {side}x{side} latents, {args.threads} thread(s)")
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "batch": args.batch, "torch": torch.__version__, "parameters": params,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
