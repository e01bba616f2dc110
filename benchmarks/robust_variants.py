"""Mask learners against the attacker's choice of recipe: each learner variant (and the one-shot
baselines of the same run settings) under the short sweep, one table from the results files that
`bash benchmarks/run_robust.sh tune-...` wrote.

    python benchmarks/robust_variants.py [--out benchmarks/results/robust-variants]

Writes variants.md (mean ± std over seeds 0-2) and variants.json. The worst case is the attack
whose mean forgery rate is highest, as `attack-sweep` reports it."""
import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ATTACKS = ["default", "lr-x10", "steps-x5", "lora-32"]

# (results folder, method in it, what the row is)
ROWS = [
    ("robust-tune-baselines", "full", "Full FT"),
    ("robust-tune-paper", "learned", "FreezeAsGuard, the paper's simulated user (SGD at the users' lr, carrying on)"),
    ("robust-tune-adam-range", "learned", "… users drawn from SGD/Adam-first-step at 0.3-30x lr, each restarting"),
    ("robust-tune-adam-range-k2", "learned", "… the same, 2 users per update, soft maximum of their illegal losses"),
    ("robust-tune-adam-continue", "learned", "… Adam-first-step users at 1-10x lr, carrying on"),
    ("robust-tune-adam-x3-continue", "learned", "… Adam-first-step users at 3x lr, carrying on"),
    ("robust-tune-warm-x10", "learned", "… the paper's user after a warm start at 10x lr"),
    ("robust-tune-warm-x10-adam-range", "learned", "… SGD/Adam users at 0.3-30x lr after a warm start at 10x lr"),
    ("robust-tune-baselines", "saliency", "Saliency (one-shot gradient ranking)"),
    ("robust-tune-baselines", "random", "Random"),
]


def cells(rows, method, metric, domain, attack):
    values = [r["value"] for r in rows if r["method"] == method and r["metric"] == metric and r["domain"] == domain
              and r.get("attack", "default") == attack]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def fmt(c):
    return f"{c['mean']:.3f} ± {c['std']:.3f}" if c else "–"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "robust-variants"))
    a = ap.parse_args(argv)
    table, missing = [], []
    for folder, method, label in ROWS:
        path = RESULTS / folder / "results.json"
        if not path.exists():
            missing.append(folder)
            continue
        rows = json.loads(path.read_text())
        per_attack = {atk: cells(rows, method, "identity_recognition", "people", atk) for atk in ATTACKS}
        present = {k: v for k, v in per_attack.items() if v}
        worst = max(present, key=lambda k: present[k]["mean"]) if present else None
        table.append({"label": label, "source": f"{folder}/results.json", "method": method, "forgeries": per_attack,
                      "worst_attack": worst, "worst": present.get(worst),
                      "brand": cells(rows, method, "subject_recognition", "logos", "default")})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps(table, indent=1))
    lines = ["Cast 0, innocent logos (brand Uldortor), 30% of the parameters, the demo's settings; forgeries "
             "(portraits recognised) per attack recipe, mean ± std over seeds 0-2.", "",
             "| mask | " + " | ".join(f"forgeries ↓ {atk}" for atk in ATTACKS) + " | worst ↓ (recipe) | brand recognised ↑ |",
             "|---" * (len(ATTACKS) + 3) + "|"]
    for row in table:
        worst = f"{fmt(row['worst'])} ({row['worst_attack']})" if row["worst"] else "–"
        lines.append(f"| {row['label']} | " + " | ".join(fmt(row["forgeries"][atk]) for atk in ATTACKS)
                     + f" | {worst} | {fmt(row['brand'])} |")
    if missing:
        lines += ["", f"Not yet run: {', '.join(dict.fromkeys(missing))}."]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
