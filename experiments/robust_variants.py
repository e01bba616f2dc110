"""Mask learners against the attacker's choice of recipe, from the results files that
`bash experiments/run_robust.sh` wrote:
- robust-variants/variants.md: each learner variant (and the one-shot baselines of the same run
  settings) under the short sweep on cast 0, where settings are picked;
- robust-sweeps/cast*.md: on casts nobody tuned on, every method under all 11 recipes, the paper's
  single-user learner beside the learner over a range of users.

    python experiments/robust_variants.py

Mean ± std over seeds 0-2. The worst case is the recipe whose mean forgery rate is highest, as
`attack-sweep` reports it; a recipe reaches Full FT when it forges at least what Full FT forges
with the default recipe."""
import argparse
import json
from pathlib import Path

from learner_variants import cell, fmt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
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


# held-out casts: (file name, caption, [(results folder, method, row label)])
def _sweep_rows(cast: str) -> list[tuple[str, str, str]]:
    return [(f"robust-sweep-{cast}", "full", "Full FT"), (f"robust-sweep-{cast}", "random", "Random"),
            (f"robust-sweep-{cast}", "saliency", "Saliency"),
            (f"robust-sweep-{cast}", "learned", "FreezeAsGuard, the paper's single simulated user"),
            (f"robust-sweep-{cast}-robust", "learned", "FreezeAsGuard, users drawn from SGD/Adam at 0.3-30x lr")]


SWEEPS = [("cast1-clothes", "Cast 1, innocent clothes (a clothing line)", "clothes", _sweep_rows("cast1-clothes")),
          ("cast2-logos", "Cast 2, innocent logos (a brand)", "logos", _sweep_rows("cast2-logos"))]
TRAINED_ON = {"default", "lr-x10"}     # AdamW at 1x and 10x: inside the range-of-users learner's family (Adam-like, 0.3-30x)


def sweep_table(caption: str, domain: str, rows_spec) -> tuple[list[dict], list[str]]:
    """One held-out cast: per method, forgeries under each recipe, the worst case, the cheapest
    recipe reaching Full FT's default, and the innocent subject under the default recipe."""
    loaded, found = {}, []
    for folder, method, label in rows_spec:
        path = RESULTS / folder / "results.json"
        if path.exists():
            loaded.setdefault(folder, json.loads(path.read_text()))
            found.append((folder, method, label))
    if not found:
        return [], [f"{caption}: not yet run."]
    config = json.loads((RESULTS / found[0][0] / "config.json").read_text())
    attacks = config["attacks"]
    costs = json.loads((RESULTS / found[0][0] / "attack_sweep.json").read_text())["costs"]
    full = cell(loaded[found[0][0]], "full", "identity_recognition", "people", "default")
    table = []
    for folder, method, label in found:
        rows = loaded[folder]
        per = {atk: cell(rows, method, "identity_recognition", "people", atk) for atk in attacks}
        present = {k: v for k, v in per.items() if v}
        worst = max(present, key=lambda k: present[k]["mean"])
        reach = [k for k, v in present.items() if method != "full" and full and v["mean"] >= full["mean"]]
        cheapest = min(reach, key=lambda k: costs[k]) if reach else None
        table.append({"label": label, "source": f"{folder}/results.json", "forgeries": per, "worst_attack": worst,
                      "worst": present[worst], "cheapest_reaching_full": cheapest,
                      "cheapest_cost": costs.get(cheapest) if cheapest else None,
                      "innocent": cell(rows, method, "subject_recognition", domain, "default")})
    lines = [f"{caption}, 30% of the parameters; portraits recognised per recipe (mean over seeds 0-2; * = a "
             f"recipe inside the range-of-users learner's family), the worst case, the cheapest recipe that "
             f"reaches Full FT's default ({full['mean']:.3f}) with its cost, and the innocent subject recognised "
             f"under the default recipe.", "",
             "| mask | " + " | ".join(a + ("*" if a in TRAINED_ON else "") for a in attacks)
             + " | worst (recipe) | reaches Full FT (cost) | innocent ↑ |", "|---" * (len(attacks) + 4) + "|"]
    for row in table:
        vals = [f"{row['forgeries'][a]['mean']:.2f}" if row["forgeries"][a] else "–" for a in attacks]
        reach = (f"{row['cheapest_reaching_full']} ({row['cheapest_cost']:g}x)" if row["cheapest_reaching_full"]
                 else "–")
        lines.append(f"| {row['label']} | " + " | ".join(vals) + f" | {fmt(row['worst'])} ({row['worst_attack']}) | "
                     f"{reach} | {fmt(row['innocent'])} |")
    return table, lines


CEILING = "robust-ceiling"


def ceiling_table() -> tuple[list[dict], list[str]]:
    """Does any mask hold against the strong recipes at a larger share? Learned and Saliency at 50%
    and 80% of the parameters (cast 0, logos), beside the 30% rows of the tuning runs."""
    path = RESULTS / CEILING / "results.json"
    if not path.exists():
        return [], ["The ceiling run (`run_robust.sh ceiling`) has not been run."]
    rows = json.loads(path.read_text())
    attacks = json.loads((RESULTS / CEILING / "config.json").read_text())["attacks"]
    base = {"baselines": json.loads((RESULTS / "robust-tune-baselines" / "results.json").read_text()),
            "paper": json.loads((RESULTS / "robust-tune-paper" / "results.json").read_text())}
    spec = [("Full FT", base["baselines"], "full", 0.0), ("FreezeAsGuard", base["paper"], "learned", 0.3),
            ("Saliency", base["baselines"], "saliency", 0.3)]
    spec += [(label, rows, method, ratio) for ratio in (0.5, 0.8)
             for label, method in (("FreezeAsGuard", "learned"), ("Saliency", "saliency"))]
    table = []
    for label, data, method, ratio in spec:
        picked = [r for r in data if r.get("ratio") == ratio]
        per = {a: cell(picked, method, "identity_recognition", "people", a) for a in attacks}
        table.append({"label": label, "ratio": ratio, "forgeries": per,
                      "brand": cell(picked, method, "subject_recognition", "logos", "default")})
    lines = ["Cast 0, innocent logos (brand Uldortor); portraits recognised per recipe and the brand recognised "
             "(default recipe), mean ± std over seeds 0-2; 30% rows from the tuning runs (lr-x3 not run there).", "",
             "| mask | share of parameters | " + " | ".join(attacks) + " | brand recognised ↑ |",
             "|---" * (len(attacks) + 3) + "|"]
    for row in table:
        lines.append(f"| {row['label']} | {row['ratio']:.0%} | " + " | ".join(fmt(row["forgeries"][a]) for a in attacks)
                     + f" | {fmt(row['brand'])} |")
    return table, lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "robust-variants"))
    ap.add_argument("--sweeps-out", default=str(RESULTS / "robust-sweeps"))
    a = ap.parse_args(argv)
    sweeps_out = Path(a.sweeps_out)
    sweeps_out.mkdir(parents=True, exist_ok=True)
    for name, caption, domain, spec in SWEEPS:
        table, lines = sweep_table(caption, domain, spec)
        (sweeps_out / f"{name}.json").write_text(json.dumps(table, indent=1))
        (sweeps_out / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines) + "\n")
    table, lines = ceiling_table()
    (sweeps_out / "ceiling.json").write_text(json.dumps(table, indent=1))
    (sweeps_out / "ceiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + "\n")
    table, missing = [], []
    for folder, method, label in ROWS:
        path = RESULTS / folder / "results.json"
        if not path.exists():
            missing.append(folder)
            continue
        rows = json.loads(path.read_text())
        per_attack = {atk: cell(rows, method, "identity_recognition", "people", atk) for atk in ATTACKS}
        present = {k: v for k, v in per_attack.items() if v}
        worst = max(present, key=lambda k: present[k]["mean"]) if present else None
        table.append({"label": label, "source": f"{folder}/results.json", "method": method, "forgeries": per_attack,
                      "worst_attack": worst, "worst": present.get(worst),
                      "brand": cell(rows, method, "subject_recognition", "logos", "default")})
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
