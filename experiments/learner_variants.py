"""The mask learner's variants at an equal parameter budget, side by side with the one-shot
baselines of the same run settings: one table from the results files that
`bash experiments/run_selective.sh variant-... demo-cast0-logos` wrote.

    python experiments/learner_variants.py [--out experiments/results/brands-variants]

Writes variants.md (mean ± std over seeds) and variants.json."""
import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

# (results folder, method in it, what the row is)
ROWS = [
    ("brands-demo-cast0-logos", "full", "Full FT"),
    ("brands-variant-paper", "learned", "FreezeAsGuard: the paper's tensor-count sparsity, greedy fill"),
    ("brands-variant-sizes-greedy", "learned", "FreezeAsGuard: parameter-count sparsity, greedy fill"),
    ("brands-variant-knapsack", "learned", "FreezeAsGuard: parameter-count sparsity, knapsack (default)"),
    ("brands-variant-knapsack-4x", "learned", "… the same with 4x the mask updates (120)"),
    ("brands-variant-knapsack-saliency-start", "learned", "… the same with logits started from the saliency ranking"),
    ("brands-variant-knapsack-upper4", "learned", "… the same with 4 batches per mask gradient"),
    ("brands-variant-knapsack-step4x", "learned", "… the same with a 4x logit step (0.2)"),
    ("brands-variant-knapsack-user-lr-1e-2", "learned", "… the same with a 100x simulated user (SGD lr 1e-2)"),
    ("brands-variant-knapsack-user-lr-1e-2-inner20", "learned", "… the same with that user taking 20 steps"),
    ("brands-variant-knapsack-generic-people", "learned", "… the same with unnamed people's photos as innocent data"),
    ("brands-demo-cast0-logos", "saliency", "Saliency (one-shot gradient ranking)"),
    ("brands-demo-cast0-logos", "random", "Random"),
    ("brands-demo-cast0-logos", "largest", "Largest tensors (data-free)"),
    ("brands-control-smallest", "smallest", "Smallest tensors (data-free: every bias and norm first)"),
]
METRICS = [("frozen_param_fraction", "people", "frozen params"), ("identity_recognition", "people", "forgeries ↓"),
           ("subject_recognition", "logos", "brand recognised ↑"), ("prompt_accuracy", "logos", "other logos right ↑")]


def cell(rows, method, metric, domain, attack="default"):
    """Mean and spread of one metric of one method's results under one recipe, or None."""
    values = [r["value"] for r in rows if r["method"] == method and r["metric"] == metric and r["domain"] == domain
              and r.get("attack", "default") == attack]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def fmt(c) -> str:
    return f"{c['mean']:.3f} ± {c['std']:.3f}" if c else "–"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "brands-variants"))
    a = ap.parse_args(argv)
    table, missing = [], []
    for folder, method, label in ROWS:
        path = RESULTS / folder / "results.json"
        if not path.exists():
            missing.append(folder)
            continue
        rows = json.loads(path.read_text())
        table.append({"label": label, "source": f"{folder}/results.json", "method": method,
                      **{name: cell(rows, method, metric, domain) for metric, domain, name in METRICS}})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps(table, indent=1))
    lines = ["Cast 0, innocent logos (brand Uldortor), 30% of the parameters, the demo's settings; mean ± std over "
             "seeds 0-2.", "", "| mask | " + " | ".join(n for _, _, n in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for row in table:
        vals = [fmt(row[n]) for _, _, n in METRICS]
        lines.append(f"| {row['label']} | " + " | ".join(vals) + " |")
    if missing:
        lines += ["", f"Not yet run: {', '.join(dict.fromkeys(missing))}."]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
