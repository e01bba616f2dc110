"""Real scale: the SD v1.5 UNet at its published size (859.5 M parameters; random fp32 weights,
latents and text states of the real shapes standing in for the VAE and text encoder), each
training stage in its own process, measured against the memory plan (freezeasguard.models.memplan)
for the same settings.

Stages, batch 1, two steps each (the time is the faster: the first also allocates AdamW's
state): warm_start (full AdamW steps, as the warm start takes them), mask_learning (iterations of
2 simulated-user steps and 1 mask step), guarded_ft (AdamW steps under a random mask freezing 30%
of the parameters), lora (AdamW steps of a rank-4 LoRA on every attention projection). Per stage and latent side: the peak resident set above the process's baseline
(imports done, library code pages not counted) or, on CUDA, torch.cuda.max_memory_allocated;
seconds per step (per iteration for mask learning); the plan, each buffer computed from the
parameter counts and the activations a meta-device copy keeps; measured / planned.

    python benchmarks/bench_realsize.py --out benchmarks/results/bench_realsize_cpu.json   # ~8 min, 13 GB
    python benchmarks/bench_realsize.py --device cuda --model sdxl --sides 64,128 --out bench_realsize_gpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from _common import FixedMix, NearbyBase, RssBaseline, print_table, reset_peak_rss, run_isolated  # noqa: I001

STAGES = ("warm_start", "mask_learning", "guarded_ft", "lora")
MODELS = ("sd15", "sdxl", "tiny")        # tiny: the shipped tiny UNet's widths (tests)
RATIO, LORA_RANK, INNER_STEPS = 0.3, 4, 2


def unet_config(model: str, side: int) -> dict:
    from freezeasguard.models.families.shapes import SDXL_UNET
    from freezeasguard.models.families.tiny import tiny_unet_config

    if model == "sd15":
        return {**tiny_unet_config("sd15-shapes"), "sample_size": side}
    if model == "sdxl":
        return {**SDXL_UNET, "sample_size": side}
    return tiny_unet_config("sd15", sample_size=side, block_out_channels=(32, 32, 64, 64), cross_attention_dim=64)


def inputs(model: str, config: dict, side: int, device) -> tuple:
    """One sample's latents, conditioning, noise and timestep (SDXL's added conditioning included)."""
    g = torch.Generator().manual_seed(0)
    x, noise = (torch.randn(1, 4, side, side, generator=g).to(device) for _ in range(2))
    text = torch.randn(1, 77, config["cross_attention_dim"], generator=g).to(device)
    if model == "sdxl":
        text = {"encoder_hidden_states": text, "text_embeds": torch.randn(1, 1280, generator=g).to(device),
                "time_ids": torch.tensor([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]], device=device)}
    return x, text, noise, torch.tensor([500], device=device)


def prepare(stage: str, unet, model: str):
    """The stage's trainable parameters on ``unet`` (a real or a meta one): a random 30% mask
    applied, or a LoRA added; returns the adapter's module names (LoRA) or None."""
    from freezeasguard.training.lora import LoraSettings, add_lora, choose_targets
    from freezeasguard.guard.mask import Mask

    named = list(unet.named_parameters())
    unnamed = {"model": "random weights"}     # a meta model has no bytes to fingerprint
    if stage == "guarded_ft":
        Mask.random(named, RATIO, seed=0, budget="params", base_fingerprint=unnamed).apply(unet)
    if stage == "lora":
        settings = LoraSettings(rank=LORA_RANK)
        add_lora(unet, choose_targets(unet, Mask.random(named, 0.0, seed=0, base_fingerprint=unnamed), settings),
                 settings)


def plan_for(stage: str, model: str, side: int) -> dict:
    """memplan's plan for the stage, with the activations a meta copy keeps."""
    from diffusers import UNet2DConditionModel

    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.models.families.tiny import scheduler_config
    from freezeasguard.models.memplan import kept_activation_bytes, stage_plan

    config = unet_config(model, side)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    params = sum(p.numel() for p in unet.parameters())
    prepare(stage, unet, model)
    unet.train()
    x, text, noise, t = inputs(model, config, side, "meta")
    family = "sdxl" if model == "sdxl" else "sd"
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config(), family)
    acts = kept_activation_bytes(unet, lambda: diffusion_loss(unet, x, text, noise, t, schedule).mean())
    trainable = sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad and "lora_" not in n)
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    return dataclasses.asdict(stage_plan(stage, params, acts, trainable=trainable, lora_params=lora))


def worker(stage: str, model: str, side: int, device: str, steps: int) -> dict:
    """Run ``steps`` steps of ``stage`` and return its peak memory, time and the buffers it held."""
    from diffusers import UNet2DConditionModel

    from freezeasguard.training.batches import LocalBatch
    from freezeasguard.guard.bilevel import BilevelState, remask_
    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.models.families.tiny import scheduler_config
    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.guard.learn import LearnConfig
    from freezeasguard.guard.mask_updates import UpdateContext, mask_update
    from freezeasguard.models.memplan import kept_activation_bytes
    from freezeasguard.training.optim import build_optimizer
    from freezeasguard.guard.users import SimulatedUser

    cuda = device.startswith("cuda")
    baseline = None if cuda else RssBaseline()
    config = unet_config(model, side)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device)
    params_bytes = sum(p.numel() * 4 for p in unet.parameters())
    prepare(stage, unet, model)
    unet.train()
    x, text, noise, t = inputs(model, config, side, device)
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config(), "sdxl" if model == "sdxl" else "sd")
    loss = lambda: diffusion_loss(unet, x, text, noise, t, schedule).mean()    # noqa: E731
    acts = kept_activation_bytes(unet, loss)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * 4 for n, p in unet.named_parameters() if "lora_" in n)
    if stage == "mask_learning":
        cfg = LearnConfig(inner_steps=INNER_STEPS, user_lr=1e-5, device=device)
        state = BilevelState(unet, NearbyBase(unet), cfg.temperature)
        state.logits = cfg.temperature * (-3 + 2 * torch.rand(len(state.params)))
        with torch.no_grad():
            remask_(state.local, state.theta_d, torch.zeros_like(state.logits), state.m)
        batch = LocalBatch(x, text, noise, t, torch.ones(1), torch.tensor([0]), [1, 0])
        ctx = UpdateContext(FixedMix(batch), schedule, device, None, cfg, [n for n, _ in state.named])
        users = [SimulatedUser("sgd", cfg.user_lr, 0)]
        step = lambda: mask_update(state, ctx, users)    # noqa: E731
        buffers = {"weights": params_bytes, "theta_d": state.flat_theta_d.numel() * 4,
                   "gradient_buffer": state.flat_grad.numel() * 4, "activations": acts}
    else:
        opt = build_optimizer(unet, FinetuneConfig(lr=1e-5))

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
    if not cuda:
        reset_peak_rss()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else baseline.peak_above()
    if stage != "mask_learning":
        moments = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                      if k in ("exp_avg", "exp_avg_sq"))
        grads = sum(p.numel() * 4 for p in trainable)
        if stage == "lora":
            buffers = {"weights": params_bytes, "lora_weights": lora_bytes, "adamw_moments": moments,
                       "activations_or_gradients": max(acts, grads)}
        else:
            buffers = {"weights": params_bytes, "adamw_moments": moments, "activations_or_gradients": max(acts, grads)}
    return {"stage": stage, "model": model, "side": side, "device": device, "peak_bytes": peak,
            "seconds_per_step": min(times), "first_step_s": times[0], "steps": steps, "buffers": buffers}


def table(rows: list[dict]) -> str:
    gb = 2**30
    lines = ["| model | latent side | stage | planned GB | measured peak GB | measured / planned | s per step | "
             "plan's buffers (GB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = ", ".join(f"{k} {v / gb:.2f}" for k, v in r["plan"]["buffers"].items())
        lines.append(f"| {r['model']} | {r['side']} | {r['stage']} | {r['planned_bytes'] / gb:.2f} | "
                     f"{r['peak_bytes'] / gb:.2f} | {r['ratio']:.3f} | {r['seconds_per_step']:.1f} | {parts} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_realsize.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="sd15", choices=MODELS)
    ap.add_argument("--sides", default="32,64", help="latent sides (x8 = image side)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps = {"warm_start": 2, "mask_learning": 2, "guarded_ft": 2, "lora": 2}    # the first step also allocates AdamW state
    if a.worker:
        print(json.dumps(worker(a.stage, a.model, a.side, a.device, steps[a.stage])))
        return
    rows, started = [], time.time()
    for side in (int(s) for s in a.sides.split(",")):
        for stage in a.stages.split(","):
            r = run_isolated(__file__, ["--stage", stage, "--model", a.model, "--side", str(side), "--device", a.device])
            r["plan"] = plan_for(stage, a.model, side)
            r["planned_bytes"] = sum(r["plan"]["buffers"].values())
            r["ratio"] = r["peak_bytes"] / r["planned_bytes"]
            rows.append(r)
            print(f"{a.model} side {side} {stage}: peak {r['peak_bytes'] / 2**30:.2f} GB, plan "
                  f"{r['planned_bytes'] / 2**30:.2f} GB ({r['ratio']:.3f}), {r['seconds_per_step']:.1f} s/step",
                  flush=True)
    print_table([{k: r[k] for k in ("model", "side", "stage", "ratio", "seconds_per_step")} for r in rows],
                ["model", "side", "stage", "ratio", "seconds_per_step"])
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    result = {"rows": rows, "device": device_name, "seconds_total": time.time() - started,
              "torch": torch.__version__, "target": "measured / planned in 0.9-1.1 per stage"}
    Path(a.out).write_text(json.dumps(result, indent=2))
    Path(a.out).with_suffix(".md").write_text(
        f"bench_realsize.py: {a.model} UNet, {device_name}, batch 1, fp32, torch {torch.__version__}; "
        f"{result['seconds_total'] / 60:.0f} min in all\n\n" + table(rows))
    print(f"wrote {a.out} and its table {Path(a.out).with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
