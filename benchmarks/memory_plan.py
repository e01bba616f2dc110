"""Memory plan of mask learning and guarded fine-tuning for SDXL, SD3.5, FLUX.1, FLUX.2 [dev],
Qwen-Image and Z-Image, computed from
the denoisers' real shapes (built on the meta device from their published configs, written in
freezeasguard/models/families/shapes.py; nothing is downloaded or allocated).

Per model: parameters and tensors; GB for one replica of
- mask learning: theta(m), theta_d and a gradient in fp32 (12 B/param), or with theta_d in bf16 (10 B);
- guarded fine-tuning with AdamW under a mask freezing a share rho = 0 (full fine-tuning, 16
  B/param: weights, gradient, two moments), 0.3 and 0.8 (frozen tensors need no gradient and no
  moments: 4 + 12 x trainable share);
and the H100-80GB / H200-141GB devices mask learning and guarded fine-tuning at rho 0.3 need when
sharded evenly (FSDP, --shard), before activations. Activations are not counted (they depend on resolution, batch and checkpointing).

    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from freezeasguard.models.families.shapes import PUBLISHED, guarded_full_gb, memory_plan, meta_model  # noqa: E402

from _common import print_table  # noqa: E402

RHOS = (0.0, 0.3, 0.8)      # frozen share: none (full fine-tuning), the paper's default, a heavy mask
CARDS_GB = (80, 141)        # H100-80GB, H200-141GB


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="memory_plan.json")
    a = ap.parse_args()
    rows = []
    for name in PUBLISHED:
        model = meta_model(name)
        params = sum(p.numel() for p in model.parameters())
        plan = memory_plan(params)
        guarded = {f"guarded_ft_rho{rho}_gb": guarded_full_gb(params, rho) for rho in RHOS}
        rows.append({"model": name, "class": PUBLISHED[name][0], "tensors": len(list(model.parameters())), **plan,
                     **guarded, **{f"{stage}_{card}gb_devices": math.ceil(gb / card)
                                   for stage, gb in (("mask_learning", plan["mask_learning_fp32_gb"]),
                                                     ("guarded_ft_rho0.3", guarded["guarded_ft_rho0.3_gb"]))
                                   for card in CARDS_GB}})
    columns = ["model", "params_billion", "tensors", "mask_learning_fp32_gb", "mask_learning_bf16_theta_d_gb",
               *[f"guarded_ft_rho{rho}_gb" for rho in RHOS], *[c for c in rows[0] if c.endswith("gb_devices")]]
    print_table(rows, columns)
    Path(a.out).write_text(json.dumps({"rows": rows, "note": "before activations; GB = 2**30 bytes; rho = the "
                                       "share of parameters frozen"}, indent=2))
    lines = ["memory_plan.py: GB for one replica, before activations (GB = 2^30 bytes; ρ = share frozen; "
             "devices: evenly sharded with --shard)",
             "| model | params (B) | tensors | mask learning fp32 | θ_d bf16 | guarded FT ρ 0 (full FT) | ρ 0.3 | ρ 0.8 | "
             "mask learning: 80 / 141 GB cards | guarded FT ρ 0.3: 80 / 141 GB cards |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_billion']:.2f} | {r['tensors']} | {r['mask_learning_fp32_gb']:.0f} | "
                     f"{r['mask_learning_bf16_theta_d_gb']:.0f} | "
                     + " | ".join(f"{r[f'guarded_ft_rho{rho}_gb']:.0f}" for rho in RHOS) + " | "
                     f"{r['mask_learning_80gb_devices']} / {r['mask_learning_141gb_devices']} | "
                     f"{r['guarded_ft_rho0.3_80gb_devices']} / {r['guarded_ft_rho0.3_141gb_devices']} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out} and its table {Path(a.out).with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
