"""Memory of guarded fine-tuning, full and LoRA, against the ideal.

Rows: full fine-tuning under random and learned masks at freezing ratios 0, 0.1, 0.3, 0.8; a
"prefix" mask (the 30% of tensors that run first in the forward pass); and a rank-4 LoRA on
the attention projections the mask allows (no mask, learned 30%, prefix 30%).

For each row, measured in a fresh process: peak memory and step time of one AdamW step with the
mask enforced (frozen tensors: no gradient, no optimizer state), and what autograd keeps for the
backward pass (saved non-parameter tensors, counted once per storage), split into the part saved
while modules run that come before the first module with a trainable tensor.

- ideal_peak_bytes = the memory plan (freezeasguard.models.memplan): parameters + the trainable
  parameters' two AdamW moments + the larger of the kept activations and the trainable
  parameters' gradients (the backward pass frees the one as it makes the other; both counted at
  once overstates the need by the smaller); peak_vs_ideal = measured / ideal.
- ideal_saving_bytes = ideal_peak(full FT, rho 0) - ideal_peak(row); measured_saving_bytes the
  same difference of measured peaks. Target: measured >= 0.95 x ideal.
- activation_before_first_trainable_bytes: activations of the blocks before the first trainable
  tensor that are kept although no gradient flows through them. Target: 0 (autograd saves an
  input only for an operation with an input that needs a gradient; a frozen prefix costs nothing).

The learned masks come from a short mask learning on the same UNet with random latents (their
frozen set has the size distribution of a learned mask; quality is not measured here).

    python benchmarks/bench_finetune.py --out benchmarks/results/bench_finetune_cpu.json   # and its .md table
    python benchmarks/bench_finetune.py --device cuda --preset sd15-shapes --out bench_finetune_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from _common import (PRESETS, NearbyBase, RssBaseline, build_unet, forward_order, print_table,  # noqa: I001
                     random_batch, reset_peak_rss, run_isolated, saved_activations, timed)
from tqdm.auto import tqdm

def learn_scores(preset, device, path):
    """A few mask updates on random latents: logits with a learned (not uniform) structure."""
    from freezeasguard.guard.bilevel import BilevelState
    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.guard.learn import LearnConfig
    from freezeasguard.guard.mask_updates import ClosureContext, mask_update
    from freezeasguard.guard.users import users_for_update
    from freezeasguard.models.families.tiny import scheduler_config

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
        mask_update(state, ClosureContext(state, cfg, loss_fn, lambda: loss_fn(-1.0)), users_for_update(cfg, 0))
    torch.save(state.logits, path)   # our own temp file, written and read by this benchmark only


def build_mask(scheme: str, unet, ratio: float, scores_path: str, forward):
    from freezeasguard.guard.mask import Mask

    named = list(unet.named_parameters())
    fp = {"weights_hash": "benchmark"}
    if scheme == "learned":
        return Mask.from_scores(named, torch.load(scores_path, weights_only=True), ratio, base_fingerprint=fp)
    if scheme == "prefix":
        # the tensors that run first: freezing them lets autograd keep no activation before them
        rank = {m: i for i, m in enumerate(forward_order(unet, forward))}
        scores = torch.tensor([-float(rank.get(n.rsplit(".", 1)[0], len(rank))) for n, _ in named])
        return Mask.from_scores(named, scores, ratio, base_fingerprint=fp)
    return Mask.random(named, ratio, seed=0, base_fingerprint=fp)


def worker(scheme: str, ratio: float, lora_rank: int, preset: str, device: str, batch: int, repeats: int,
           scores_path: str, amp: str, checkpointing: bool) -> dict:
    from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
    from freezeasguard.training.finetune import FinetuneConfig
    from freezeasguard.training.optim import build_optimizer
    from freezeasguard.training.lora import LoraSettings, add_lora, choose_targets
    from freezeasguard.models.families.tiny import scheduler_config

    baseline = RssBaseline()
    unet, latent, text_dim = build_unet(preset, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    x, text, noise, t = random_batch(batch, latent, text_dim, device, 0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.startswith("cuda") else None

    def forward():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            return diffusion_loss(unet, x, text, noise, t, schedule).mean()

    mask = build_mask(scheme, unet, ratio, scores_path, forward)
    mask.apply(unet)
    frozen_params = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    if lora_rank:
        settings = LoraSettings(rank=lora_rank)
        add_lora(unet, choose_targets(unet, mask, settings), settings)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = build_optimizer(unet, FinetuneConfig(lr=1e-5))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    kept = saved_activations(unet, forward)

    def step():
        opt.zero_grad(set_to_none=True)
        forward().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    reset_peak_rss()
    seconds = timed(step, device, repeats)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else baseline.peak_above()
    param_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    trainable_params = sum(p.numel() for p in trainable)
    state_bytes = trainable_params * 3 * 4        # gradient + two AdamW moments, fp32
    return {"scheme": scheme, "ratio": ratio, "lora_rank": lora_rank, "frozen_param_fraction": frozen_params / total,
            "frozen_params": frozen_params, "trainable_params": trainable_params, "peak_bytes": peak,
            "step_s": seconds, "param_bytes": param_bytes, "state_bytes": state_bytes,
            "activation_bytes": kept["saved_bytes"],
            "activation_before_first_trainable_bytes": kept["saved_before_first_trainable_bytes"],
            "leaf_modules_before_first_trainable": kept["modules_before_first_trainable"],
            "ideal_peak_bytes": ideal_plan(total, trainable_params, kept["saved_bytes"], lora_rank).total}


def ideal_plan(base_params: int, trainable: int, activations: int, lora_rank: int):
    """The memory plan of the row (memplan.stage_plan): weights, AdamW moments of the trainable
    parameters (the adapter's, with a LoRA), and the larger of the kept activations and the
    trainable parameters' gradients."""
    from freezeasguard.models.memplan import stage_plan

    if lora_rank:
        return stage_plan("lora", base_params, activations, lora_params=trainable)
    return stage_plan("guarded_ft", base_params, activations, trainable=trainable)


ROWS = [("random", 0.0, 0), ("random", 0.1, 0), ("random", 0.3, 0), ("random", 0.8, 0),
        ("learned", 0.1, 0), ("learned", 0.3, 0), ("learned", 0.8, 0), ("prefix", 0.3, 0),
        ("random", 0.0, 4), ("learned", 0.3, 4), ("prefix", 0.3, 4)]


def markdown(result: dict) -> str:
    """The rows as the table docs/algorithm.md shows (first line: what was run)."""
    mb = 2**20
    lines = [f"bench_finetune.py, preset {result['preset']}, device {result['device_name']}, batch {result['batch_size']}",
             "| mask | ratio | LoRA rank | frozen param fraction | peak MB | ideal MB | kept activations MB | "
             "kept before first trainable MB | measured saving MB | ideal saving MB | measured/ideal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = "–" if r["saving_vs_ideal"] is None else f"{r['saving_vs_ideal']:.2f}"
        lines.append(f"| {r['scheme']} | {r['ratio']} | {r['lora_rank'] or '–'} | {r['frozen_param_fraction']:.3f} | "
                     f"{r['peak_bytes'] / mb:.1f} | {r['ideal_peak_bytes'] / mb:.1f} | {r['activation_bytes'] / mb:.1f} | "
                     f"{r['activation_before_first_trainable_bytes'] / mb:.1f} | {r['measured_saving_bytes'] / mb:.1f} | "
                     f"{r['ideal_saving_bytes'] / mb:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    a = ap.parse_args()
    preset = a.preset or ("sd15-shapes" if a.device.startswith("cuda") else "cpu-34m")
    if a.worker:
        print(json.dumps(worker(a.scheme, a.ratio, a.lora_rank, preset, a.device, a.batch_size, a.repeats, a.scores,
                                a.mixed_precision, a.gradient_checkpointing)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        scores = str(Path(tmp) / "scores.pt")
        learn_scores(preset, a.device, scores)
        common = ["--preset", preset, "--device", a.device, "--batch-size", str(a.batch_size), "--repeats",
                  str(a.repeats), "--scores", scores, "--mixed-precision", a.mixed_precision]
        if a.gradient_checkpointing:
            common.append("--gradient-checkpointing")
        rows = [run_isolated(__file__, ["--scheme", scheme, "--ratio", str(ratio), "--lora-rank", str(rank), *common])
                for scheme, ratio, rank in tqdm(ROWS, desc="rows")]
    full = rows[0]
    for r in rows:
        r["peak_vs_ideal"] = r["peak_bytes"] / r["ideal_peak_bytes"]
        r["ideal_saving_bytes"] = full["ideal_peak_bytes"] - r["ideal_peak_bytes"]
        r["measured_saving_bytes"] = full["peak_bytes"] - r["peak_bytes"]
        r["saving_vs_ideal"] = r["measured_saving_bytes"] / r["ideal_saving_bytes"] if r["ideal_saving_bytes"] else None
    mb = 2**20
    print_table([{**r, "peak_MB": r["peak_bytes"] / mb, "ideal_MB": r["ideal_peak_bytes"] / mb,
                  "acts_MB": r["activation_bytes"] / mb, "acts_before_MB": r["activation_before_first_trainable_bytes"] / mb,
                  "saved_MB": r["measured_saving_bytes"] / mb, "ideal_saved_MB": r["ideal_saving_bytes"] / mb}
                 for r in rows],
                ["scheme", "ratio", "lora_rank", "frozen_param_fraction", "step_s", "peak_MB", "ideal_MB",
                 "peak_vs_ideal", "acts_MB", "acts_before_MB", "leaf_modules_before_first_trainable", "saved_MB",
                 "ideal_saved_MB", "saving_vs_ideal"])
    result = {"rows": rows, "preset": preset, "device": a.device, "batch_size": a.batch_size,
              "gradient_checkpointing": a.gradient_checkpointing,
              "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
              "target": "measured_saving_bytes >= 0.95 * ideal_saving_bytes; "
                        "activation_before_first_trainable_bytes == 0"}
    Path(a.out).write_text(json.dumps(result, indent=2))
    Path(a.out).with_suffix(".md").write_text(markdown(result))
    print(f"wrote {a.out} and its table {Path(a.out).with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
