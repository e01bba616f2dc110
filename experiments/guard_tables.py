"""The guard study's tables (docs/guard.md), from the results files `bash experiments/run_guard.sh` wrote:
- guard-variants/variants.md: on cast 0 (where settings are picked), the immunised release's variants
  beside the masks they start from, under the default recipe and 10x the learning rate;
- guard-judged/judged.md: on the casts nobody tuned on, every method by the default recipe and its
  worst of four, the innocent subject and the release's own prior; targets.md: each target of the
  study checked per cast and method; verdict.md: the one sentence per cast that README quotes.

    python experiments/guard_tables.py

Mean ± std over the seeds each run has. The worst case is the recipe whose mean forgery rate is highest."""
import argparse
import json
from pathlib import Path

from learner_variants import cell, fmt

from freezeasguard.methods import method_label

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

# (results folder, method, what the row is): cast 0, seed 0, default and lr-x10
VARIANTS = [
    ("guard-tune-objectives", "full", "Full FT"),
    ("guard-tune-objectives", "learned", "FreezeAsGuard, the paper's objective"),
    ("guard-tune-objectives", "learned-identity", "FreezeAsGuard, identity objective"),
    ("guard-tune-objectives", "learned-identity+immunise", "… + immunised (attackers fresh each update, lr 1e-4)"),
    ("guard-tune-objectives", "saliency", "Saliency, the plain loss"),
    ("guard-tune-objectives", "saliency-identity", "Saliency, identity objective"),
    ("guard-tune-immunise-immunise_attack_updates=4", "saliency+immunise",
     "Saliency + immunised: attackers carry on 4 updates (default)"),
    ("guard-tune-immunise-immunise_attack_updates=20", "saliency+immunise", "… attackers carry on 20 updates"),
    ("guard-tune-immunise-immunise_attack_updates=4,immunise_lr=0.0003", "saliency+immunise", "… 3x the step (3e-4)"),
    ("guard-tune-immunise-immunise_attack_updates=4,immunise_lr=0.0003,immunise_loss_target=0.5", "saliency+immunise",
     "… 3x the step, loss target 0.5"),
    ("guard-tune-immunise-immunise_attack_updates=4,immunise_steps=120,immunise_lr_max=0.003", "saliency+immunise",
     "… 120 updates, attackers up to 30x the lr"),
]
JUDGED = ["guard-judge-cast1-clothes", "guard-judge-cast2-logos"]
# the methods whose targets are checked: the paper's learner and the study's new designs
CHECKED = ["learned", "learned-identity", "learned-identity+immunise", "saliency+immunise"]
ATTACKS = ["default", "lr-x10", "steps-x5", "lora-32"]


def innocent_domain(rows) -> str:
    return next(r["domain"] for r in rows if r["domain"] not in ("people", "release"))


def worst(rows, method) -> tuple[dict | None, str | None]:
    found = [(cell(rows, method, "identity_recognition", "people", a), a) for a in ATTACKS]
    found = [(c, a) for c, a in found if c]
    return max(found, key=lambda x: x[0]["mean"]) if found else (None, None)


def variants_table() -> list[str]:
    lines = ["Cast 0, innocent logos (brand Uldortor), 30% of the parameters, the demo's settings, seed 0 (16 "
             "portraits per cell: one portrait is 0.0625).", "",
             "| method | forgeries ↓ default | forgeries ↓ lr-x10 | brand recognised ↑ | release prior ↑ | source |",
             "|---|---|---|---|---|---|"]
    for folder, method, label in VARIANTS:
        path = RESULTS / folder / "results.json"
        if not path.exists():
            lines.append(f"| {label} | not run | | | | {folder} |")
            continue
        rows = json.loads(path.read_text())
        vals = [cell(rows, method, "identity_recognition", "people"),
                cell(rows, method, "identity_recognition", "people", "lr-x10"),
                cell(rows, method, "subject_recognition", innocent_domain(rows)),
                cell(rows, method, "prior_trait_accuracy", "release")]
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | {folder} |")
    return lines


def judged_table(folder: str) -> tuple[list[str], dict]:
    rows = json.loads((RESULTS / folder / "results.json").read_text())
    cfg = json.loads((RESULTS / folder / "config.json").read_text())
    domain = innocent_domain(rows)
    lines = [f"Cast {cfg['cast_seed']}, innocent {domain}, seeds {cfg['seeds']}, 30% of the parameters.", "",
             "| method | forgeries ↓ default | forgeries ↓ worst of 4 (which) | innocent subject ↑ | release prior ↑ |",
             "|---|---|---|---|---|"]
    out = {}
    for method in cfg["methods"]:
        w, attack = worst(rows, method)
        row = {"default": cell(rows, method, "identity_recognition", "people"), "worst": w, "worst_attack": attack,
               "innocent": cell(rows, method, "subject_recognition", domain),
               "prior": cell(rows, method, "prior_trait_accuracy", "release")}
        out[method] = row
        lines.append(f"| {method_label(method, 0.3, 'params')} | {fmt(row['default'])} | {fmt(w)} ({attack}) | "
                     f"{fmt(row['innocent'])} | "
                     f"{fmt(row['prior'])} |")
    base = cell(rows, "pretrained", "prior_trait_accuracy", "release")
    out["pretrained"] = {"prior": base}
    return lines, out


def targets(method: str, table: dict) -> list[str]:
    """Each target of the study for one method on one cast: met or missed, by how much."""
    m, full, base = table[method], table["full"], table["pretrained"]
    checks = []
    if m["worst"] and full["default"]:
        limit = full["default"]["mean"] / 2
        checks.append(("worst ≤ ½ Full FT default", m["worst"]["mean"] <= limit,
                       f"{m['worst']['mean']:.3f} vs ≤ {limit:.3f}"))
    for other in ("saliency", "random"):
        if other in table and other != method and m["worst"] and table[other]["worst"]:
            for key in ("default", "worst"):
                gap = table[other][key]["mean"] - m[key]["mean"]
                spread = max(table[other][key]["std"], m[key]["std"])
                checks.append((f"below {other} ({key}) by more than the spread", gap > spread,
                               f"{m[key]['mean']:.3f} vs {table[other][key]['mean']:.3f} (spread {spread:.3f})"))
    if m["innocent"] and full["innocent"]:
        checks.append(("innocent within 5 points of Full FT", m["innocent"]["mean"] >= full["innocent"]["mean"] - 0.05,
                       f"{m['innocent']['mean']:.3f} vs {full['innocent']['mean']:.3f}"))
    if m["prior"] and base["prior"]:
        checks.append(("release prior within 2 points of the base", m["prior"]["mean"] >= base["prior"]["mean"] - 0.02,
                       f"{m['prior']['mean']:.3f} vs {base['prior']['mean']:.3f}"))
    label = method_label(method, 0.3, "params")
    return [f"| {label} | {name} | {'met' if ok else 'missed'} | {detail} |" for name, ok, detail in checks]


GUARDS_EXCLUDED = ("full", "imma", "pretrained")   # not freezing guards: nothing to compare a worst case with


def verdict(folder: str, table: dict) -> str:
    """One cast in a sentence: the best worst case among the freezing guards against Full FT's default."""
    cast = folder.split("-")[2].removeprefix("cast")
    guards = {m: r["worst"] for m, r in table.items() if m not in GUARDS_EXCLUDED and r.get("worst")}
    full = table["full"]["default"]["mean"]
    text = f"Cast {cast}: Full FT forges {full:.0%} of portraits by default (the target, half that, is ≤ {full / 2:.0%})"
    best = min(guards.values(), key=lambda c: c["mean"])
    if all(c["mean"] == best["mean"] for c in guards.values()):
        return text + f"; every freezing guard reaches {best['mean']:.0%} at its worst recipe."
    names = [method_label(m, 0.3, "params") for m, c in guards.items() if c["mean"] == best["mean"]]
    return text + (f"; the best worst case among the {len(guards)} freezing guards is {best['mean']:.0%} "
                   f"({', '.join(names)}), missing the target by {100 * (best['mean'] - full / 2):.0f} points."
                   if best["mean"] > full / 2 else f"; {', '.join(names)} meets it at its worst recipe "
                   f"({best['mean']:.0%}).")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    out = RESULTS / "guard-variants"
    out.mkdir(parents=True, exist_ok=True)
    lines = variants_table()
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    judged, checks, data = [], [], {}
    for folder in JUDGED:
        if not (RESULTS / folder / "results.json").exists():
            judged += [f"{folder}: not yet run.", ""]
            continue
        lines, table = judged_table(folder)
        data[folder] = table
        judged += lines + [""]
        for method in table:
            if method in CHECKED:
                checks += [line.replace("| ", f"| {folder.split('-', 2)[-1]} · ", 1) for line in targets(method, table)]
    out = RESULTS / "guard-judged"
    out.mkdir(parents=True, exist_ok=True)
    (out / "judged.md").write_text("\n".join(judged) + "\n")
    targets_md = ["The study's targets per cast and method (worst of the four recipes; spreads are the larger "
                  "of the two methods' std over seeds):", "", "| cast · method | target | | measured |",
                  "|---|---|---|---|", *checks]
    (out / "targets.md").write_text("\n".join(targets_md) + "\n")
    (out / "judged.json").write_text(json.dumps(data, indent=1))
    sentences = [verdict(folder, table) for folder, table in data.items()]
    (out / "verdict.md").write_text(" ".join(sentences) + "\n")
    print("\n".join(judged + [""] + targets_md))


if __name__ == "__main__":
    main()
