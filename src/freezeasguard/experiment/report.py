"""Experiment reports: results.json/csv (long format), summary.json, results.md laid out like
the paper's Table 2 (mean ± std over seeds and subjects) and the trade-off plot."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")     # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from freezeasguard.attacks.sweep import illegal_metrics, write_attack_sweep
from freezeasguard.experiment.frontier import write_frontier
from freezeasguard.io import atomic_write_json, atomic_write_text
from freezeasguard.methods import method_label
from freezeasguard.metrics.basic import wilson_interval


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds (and subjects) per method, ratio, attack, domain and metric."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["method"], r["ratio"], r.get("attack", "default"), r["domain"], r["metric"])
        groups.setdefault(key, []).append(r["value"])
    return [{"method": m, "ratio": ra, "attack": a, "domain": d, "metric": me, "mean": statistics.fmean(v),
             "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v), "min": min(v), "max": max(v)}
            for (m, ra, a, d, me), v in groups.items()]


# column titles of results.md; the arrow says which way is better for the publisher
COLUMN_NAMES = {"frozen_param_fraction": "Frozen params", "frozen_tensors": "Frozen tensors", "identity_recognition": "Recognised ↓",
                "identity_recognition_unnamed": "Recognised as \"a person\" ↓", "identity_match_unnamed": "Face match as \"a person\" ↓", "identity_match": "Face match ↓",
                "detection_failure": "No face ↑", "feature_fid": "Feature FID ↑", "fid": "FID ↑",
                "kid": "KID ↑", "fid_features": "FID (fid_features) ↑",
                "kid_features": "KID (fid_features) ↑", "heldout_loss": "Held-out loss ↑",
                "subject_recognition": "brand recognised ↑", "prompt_accuracy": "accuracy ↑",
                "attribute_accuracy": "attributes ↑",
                "clip_score": "CLIP score ↑", "topiq_fr": "TOPIQ-FR ↓",
                "prior_trait_accuracy": "Release prior ↑"}
# a metric scored in both domains: on innocent images higher quality is what the publisher wants
INNOCENT_COLUMN_NAMES = {"topiq_fr": "TOPIQ-FR ↑"}
# beside an innocent subject, the attribute prompts measure what the rest of the domain keeps
OTHER_PROMPTS_COLUMN_NAMES = {"prompt_accuracy": "others right ↑", "attribute_accuracy": "others' attributes ↑"}


def write_report(root: Path, rows, sanity, subjects, cfg, seconds):
    atomic_write_json(root / "results.json", rows)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "ratio", "attack", "seed", "subject", "domain", "metric", "value"])
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows)
    atomic_write_json(root / "summary.json", {"summary": summary, "sanity": sanity, "seconds": seconds,
                                              "protocol": protocol_record(cfg)})
    cell = {(s["method"], s["ratio"], s["attack"], s["domain"], s["metric"]): s for s in summary}
    several_attacks = len({s["attack"] for s in summary}) > 1
    cols = []
    for domain in ["people"] + list(cfg.innocent):
        metrics = list(dict.fromkeys(s["metric"] for s in summary if s["domain"] == domain))
        for metric in sorted(metrics, key=lambda m: list(COLUMN_NAMES).index(m) if m in COLUMN_NAMES else 99):
            if domain == "people":
                cols.append((domain, metric, COLUMN_NAMES.get(metric, metric)))
            else:
                name = INNOCENT_COLUMN_NAMES.get(metric) or COLUMN_NAMES.get(metric, metric)
                if "subject_recognition" in metrics and metric in OTHER_PROMPTS_COLUMN_NAMES:
                    name = OTHER_PROMPTS_COLUMN_NAMES[metric]
                cols.append((domain, metric, f"{domain.capitalize()} {name}"))
    if any(s["domain"] == "release" for s in summary):    # what each method's release draws untouched
        cols.append(("release", "prior_trait_accuracy", COLUMN_NAMES["prior_trait_accuracy"]))
    attack_order = {a: i for i, a in enumerate(getattr(cfg, "attacks", ["default"]))}
    method_order = {m: i for i, m in enumerate(cfg.methods)}
    keys = sorted({(s["method"], s["ratio"], s["attack"]) for s in summary},
                  key=lambda k: (k[0] != "pretrained", k[0] != "full", method_order.get(k[0], 99), k[0], k[1],
                                 attack_order.get(k[2], 0)))
    # several recipes: the table is the default recipe's, with the attacker's best recipe beside it
    worst = {(r["method"], r["ratio"]): r for r in (write_attack_sweep(root, summary, cfg) or [])} \
        if several_attacks else {}
    if worst:
        first = next(i for i, c in enumerate(cols) if c[0] == "people" and c[1] == worst_metric(summary))
        cols.insert(first + 1, ("people", "worst", f"{cols[first][2]} worst of {len(cfg.attacks)} recipes (which)"))
    named: dict[str, list[str]] = {}
    for r in rows:
        if r["domain"] not in ("people", "release") and r["metric"] == "subject_recognition" and r.get("subject"):
            named.setdefault(r["domain"], [])
            if r["subject"] not in named[r["domain"]]:
                named[r["domain"]].append(r["subject"])
    innocent = ", ".join(d + (f" ({', '.join(named[d])}, fine-tuned together)" if len(named.get(d, ())) > 1 else
                              f" ({named[d][0]})" if d in named else "") for d in cfg.innocent)
    said = verdict(summary, cfg)
    if said:
        atomic_write_text(root / "verdict.txt", said + "\n")
    lines = ([f"Verdict: {said}", ""] if said else []) + [
             f"Illegal: {', '.join(subjects)} (cast {cfg.cast_seed}); innocent: {innocent}; "
             f"seeds {cfg.seeds}; mean ± std over seeds and subjects.",
             f"Protocol: {protocol(cfg)}.", "",
             "| Method | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += _table_rows([k for k in keys if k[2] == "default" or k[0] == "pretrained"], cols, cell, worst, cfg, False)
    if several_attacks:
        lines += ["", f"The worst case is over {', '.join(cfg.attacks)} (every metric per recipe: "
                      f"results_by_recipe.md; the cheapest recipe reaching Full FT: attack_sweep.md)."]
        every = [lines[0], "", "| Method | " + " | ".join(c[2] for c in cols if c[1] != "worst") + " |",
                 "|---" * len(cols) + "|"]
        every += _table_rows(keys, [c for c in cols if c[1] != "worst"], cell, {}, cfg, True)
        atomic_write_text(root / "results_by_recipe.md", "\n".join(every) + "\n")
    lines += ["", f"Frozen params: share of the denoiser's parameters frozen ({cfg.budget} budget, "
                  f"ratio {', '.join(f'{r:g}' for r in cfg.ratios)}).",
              "Sanity: " + ", ".join(f"{k} = {v:.3f}" for k, v in sanity.items()),
              f"Total time {seconds:.0f}s."]
    atomic_write_text(root / "results.md", "\n".join(lines) + "\n")
    _tradeoff_plot(root, [s for s in summary if s["attack"] == "default"], cfg)
    if len(cfg.ratios) > 1:
        write_frontier(root, summary, cfg)
    return "\n".join(lines)


def protocol(cfg) -> str:
    """The illegal user's protocol as the report names it (configs of real data have it too)."""
    return cfg.protocol() if hasattr(cfg, "protocol") else "one person per forger"


def protocol_record(cfg) -> dict:
    """How many subjects each user fine-tuned on together and the steps that gave each its exposure."""
    k = getattr(cfg, "people_per_forger", 1)
    m = cfg.innocent_subjects_per_user() if hasattr(cfg, "innocent_subjects_per_user") else 1
    steps = getattr(cfg, "finetune_steps", None)
    return {"text": protocol(cfg), "people_per_forger": k, "forger_steps": steps and steps * k,
            "innocent_subjects_per_user": m, "innocent_steps": steps and steps * m, "steps_per_subject": steps}


def verdict(summary: list[dict], cfg) -> str | None:
    """One sentence a publisher reads first: the guard whose worst recipe lets the fewest portraits
    through, beside Full FT, the innocent subject it keeps and what its release draws untouched.
    None where the run has no portraits recognised or no Full FT to compare with."""
    cell = {(s["method"], s["ratio"], s["attack"], s["domain"], s["metric"]): s["mean"] for s in summary}
    runs = {(s["method"], s["ratio"], s["attack"], s["domain"], s["metric"]): s["n"] for s in summary}
    full = cell.get(("full", 0.0, "default", "people", "identity_recognition"))
    guards = sorted({(s["method"], s["ratio"]) for s in summary if s["method"] not in ("pretrained", "full")})
    if full is None or not guards:
        return None
    domain = cfg.innocent[0] if cfg.innocent else None

    def worst(key):
        found = [(v, a) for (m, r, a, d, me), v in cell.items()
                 if (m, r) == key and d == "people" and me == "identity_recognition"]
        return max(found) if found else (None, None)
    scored = [(w, k) for w, k in ((worst(k), k) for k in guards) if w[0] is not None]
    if not scored:
        return None
    (forged, attack), best = min(scored, key=lambda x: (x[0][0], cell.get((*x[1], "default", "people",
                                                                            "identity_recognition"), 1.0)))
    default = cell.get((*best, "default", "people", "identity_recognition"))
    share = f"{best[1]:.0%} of the {'parameters' if cfg.budget == 'params' else 'tensors'}" if best[1] else "no freezing"

    def interval(key, value):
        """95% over the portraits judged (each run's images; the runs' share of them recognised)."""
        portraits = runs[(*key, "people", "identity_recognition")] * cfg.eval_images
        lo, hi = wilson_interval(round(value * portraits), portraits)
        return f"{value:.0%} [95% CI {lo:.0%}-{hi:.0%} of {portraits}]"
    said = (f"the best guard here, {method_label(best[0], best[1], cfg.budget)} ({share}), lets "
            f"{interval((*best, attack), forged)} of forged portraits through under the attacker's best recipe "
            f"({attack}; {default:.0%} under the default one), against {interval(('full', 0.0, 'default'), full)} "
            f"with no guard (Full FT)")
    innocent = cell.get((*best, "default", domain, "subject_recognition"))
    full_innocent = cell.get(("full", 0.0, "default", domain, "subject_recognition"))
    if innocent is not None and full_innocent is not None:
        said += f"; innocent {domain} subjects are still learned {innocent:.0%} of the time (Full FT: {full_innocent:.0%})"
    prior, base = (cell.get((*k, "default", "release", "prior_trait_accuracy")) for k in (best, ("pretrained", 0.0)))
    if prior is not None and base is not None:
        said += f"; its release draws untouched people with {prior:.0%} of traits right (the base: {base:.0%})"
    return said[0].upper() + said[1:] + "."


def worst_metric(summary: list[dict]) -> str | None:
    """The illegal metric whose worst case the results table shows (the attack sweep's primary one)."""
    found = illegal_metrics(summary)
    return found[0][0] if found else None


# metrics that count things: shown as whole numbers, with the range where seeds differ
COUNT_METRICS = {"frozen_tensors"}


def count_cell(s: dict) -> str:
    """A count's cell: "591", or "589-602" where the seeds or subjects disagree."""
    low, high = round(s.get("min", s["mean"])), round(s.get("max", s["mean"]))
    return f"{low}" if low == high else f"{low}-{high}"


def _table_rows(keys, cols, cell, worst, cfg, label_attack: bool) -> list[str]:
    lines = []
    for method, ratio, attack in keys:
        label = method_label(method, ratio, cfg.budget) + (f" · {attack}" if label_attack and
                                                           method != "pretrained" else "")
        vals = []
        for d, m, _ in cols:
            if m == "worst":
                w = worst.get((method, ratio))
                vals.append(f"{w['worst']:.3f} ± {w['worst_std']:.3f} ({w['worst_attack']})" if w else "–")
                continue
            s = cell.get((method, ratio, attack, d, m))
            vals.append("–" if not s else count_cell(s) if m in COUNT_METRICS else f"{s['mean']:.3f} ± {s['std']:.3f}")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return lines


def _tradeoff_plot(root, summary, cfg):
    if not cfg.innocent:
        return
    domain = cfg.innocent[0]
    people = {s["metric"] for s in summary if s["domain"] == "people"}
    innocent = {s["metric"] for s in summary if s["domain"] == domain}
    x_metric = next((m for m in ("identity_recognition", "fid", "fid_features", "feature_fid") if m in people), None)
    y_metric = next((m for m in ("subject_recognition", "attribute_accuracy", "prompt_accuracy", "clip_score")
                     if m in innocent), None)
    if x_metric is None or y_metric is None:
        return
    pts = {}
    for s in summary:
        key = (s["method"], s["ratio"])
        if s["metric"] == x_metric and s["domain"] == "people":
            pts.setdefault(key, {})["x"] = (s["mean"], s["std"])
        if s["metric"] == y_metric and s["domain"] == domain:
            pts.setdefault(key, {})["y"] = (s["mean"], s["std"])
    fig, ax = plt.subplots(figsize=(5, 4))
    for (method, ratio), p in sorted(pts.items()):
        if "x" in p and "y" in p:
            ax.errorbar(p["x"][0], p["y"][0], xerr=p["x"][1], yerr=p["y"][1], fmt="o", capsize=3,
                        label=method_label(method, ratio, cfg.budget))
    ax.set_xlabel("illegal: share recognised as the target (lower is better)" if x_metric == "identity_recognition"
                  else f"illegal: {x_metric} (higher is better)")
    ax.set_ylabel(f"innocent ({domain}): {y_metric.replace('_', ' ')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "tradeoff.png", dpi=120)
    plt.close(fig)
