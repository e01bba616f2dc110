"""Memory plan of mask learning and guarded fine-tuning for SDXL, SD3.5 and FLUX.1, computed from
the denoisers' real shapes (built on the meta device from their published configs, written in
freezeasguard/families/shapes.py; nothing is downloaded or allocated).

Per model: parameters and tensors; GB for one replica of
- mask learning: theta(m), theta_d and a gradient in fp32 (12 B/param), or with theta_d in bf16 (10 B);
- full fine-tuning with AdamW (16 B/param: weights, gradient, two moments);
- guarded fine-tuning under a mask freezing 30% / 75% of the parameters (frozen tensors need no
  gradient and no moments: 4 + 12 x trainable share);
and the H100-80GB / H200-141GB devices the largest plan needs when sharded evenly (FSDP), before
activations. Activations are not counted (they depend on resolution, batch and checkpointing).

    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from freezeasguard.families.shapes import PUBLISHED, guarded_full_gb, memory_plan, meta_model  # noqa: E402

from _common import print_table  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="memory_plan.json")
    a = ap.parse_args()
    rows = []
    for name in PUBLISHED:
        model = meta_model(name)
        params = sum(p.numel() for p in model.parameters())
        plan = memory_plan(params)
        worst = max(plan["mask_learning_fp32_gb"], plan["full_ft_fp32_adamw_gb"])
        rows.append({"model": name, "class": PUBLISHED[name][0], "tensors": len(list(model.parameters())), **plan,
                     "guarded_ft_30pct_gb": guarded_full_gb(params, 0.3), "guarded_ft_75pct_gb": guarded_full_gb(params, 0.75),
                     "h100_80gb_needed": math.ceil(worst / 80), "h200_141gb_needed": math.ceil(worst / 141)})
    print_table(rows, ["model", "params_billion", "tensors", "mask_learning_fp32_gb", "mask_learning_bf16_theta_d_gb",
                       "full_ft_fp32_adamw_gb", "guarded_ft_30pct_gb", "guarded_ft_75pct_gb", "h100_80gb_needed",
                       "h200_141gb_needed"])
    Path(a.out).write_text(json.dumps({"rows": rows, "note": "before activations; GB = 2**30 bytes"}, indent=2))
    lines = ["memory_plan.py: GB for one replica, before activations (GB = 2^30 bytes)",
             "| model | params (B) | tensors | mask learning fp32 | θ_d bf16 | full FT AdamW | guarded FT, 30% frozen | "
             "75% frozen | H100-80GB needed | H200-141GB needed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_billion']:.2f} | {r['tensors']} | {r['mask_learning_fp32_gb']:.0f} | "
                     f"{r['mask_learning_bf16_theta_d_gb']:.0f} | {r['full_ft_fp32_adamw_gb']:.0f} | "
                     f"{r['guarded_ft_30pct_gb']:.0f} | {r['guarded_ft_75pct_gb']:.0f} | {r['h100_80gb_needed']} | "
                     f"{r['h200_141gb_needed']} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out} and its table {Path(a.out).with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
