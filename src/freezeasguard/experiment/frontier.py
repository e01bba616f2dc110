"""The trade-off frontier: for each freezing method, forgeries (illegal recognition, lower is better)
against innocent subjects recognised (higher is better) as the frozen share grows. A method is
better where its curve lies below-right of another's. Written when an experiment has several
ratios (``freezeasguard demo --frontier``): frontier.json/.csv/.md and frontier.png."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")     # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from freezeasguard.io import atomic_write_json, atomic_write_text
from freezeasguard.methods import chain_uses_ratio, method_label

ILLEGAL_METRICS = ("identity_recognition", "fid", "fid_features", "feature_fid")
INNOCENT_METRICS = ("subject_recognition", "prompt_accuracy", "clip_score")
KEEP = 0.9    # innocent users keep at least this share of Full FT's innocent score


def frontier_points(summary: list[dict], domain: str) -> tuple[list[dict], str, str] | None:
    """One point per (method, ratio) of the default attack: the illegal and innocent means and
    spreads, and the frozen share of parameters. None when either metric is missing."""
    rows = [s for s in summary if s["attack"] == "default"]
    have_ill = {s["metric"] for s in rows if s["domain"] == "people"}
    have_inn = {s["metric"] for s in rows if s["domain"] == domain}
    illegal = next((m for m in ILLEGAL_METRICS if m in have_ill), None)
    innocent = next((m for m in INNOCENT_METRICS if m in have_inn), None)
    if illegal is None or innocent is None:
        return None
    cell = {(s["method"], s["ratio"], s["domain"], s["metric"]): s for s in rows}
    points = []
    for method, ratio in dict.fromkeys((s["method"], s["ratio"]) for s in rows):
        ill, inn = cell.get((method, ratio, "people", illegal)), cell.get((method, ratio, domain, innocent))
        if ill is None or inn is None:
            continue
        frozen = cell.get((method, ratio, "people", "frozen_param_fraction"))
        points.append({"method": method, "ratio": ratio, "label": method_label(method, ratio),
                       "frozen_params": frozen["mean"] if frozen else (0.0 if method == "full" else None),
                       "illegal": ill["mean"], "illegal_std": ill["std"],
                       "innocent": inn["mean"], "innocent_std": inn["std"], "seeds": ill["n"]})
    return points, illegal, innocent


def operating_point(points: list[dict], reference_innocent: float, keep: float = KEEP) -> dict | None:
    """The point of lowest forgery among those whose innocent score is at least ``keep`` times the
    reference (Full FT's); None when no point keeps that much."""
    kept = [p for p in points if p["innocent"] >= keep * reference_innocent]
    return min(kept, key=lambda p: (p["illegal"], -p["innocent"])) if kept else None


def write_frontier(root: Path, summary: list[dict], cfg) -> dict | None:
    domain = cfg.innocent[0] if cfg.innocent else None
    found = frontier_points(summary, domain) if domain else None
    if not found:
        return None
    points, illegal, innocent = found
    full = next((p for p in points if p["method"] == "full"), None)
    untouched = next((p for p in points if p["method"] == "pretrained"), None)
    curves: dict[str, list[dict]] = {}
    for p in points:
        if p["method"] not in ("full", "pretrained") and chain_uses_ratio(p["method"]):
            curves.setdefault(p["method"], []).append(p)
    for c in curves.values():
        c.sort(key=lambda p: p["ratio"])
    operating = {m: operating_point(c, full["innocent"]) if full else None for m, c in curves.items()}
    result = {"domain": domain, "illegal_metric": illegal, "innocent_metric": innocent, "keep": KEEP,
              "budget": cfg.budget, "points": points,
              "operating_points": {m: (op and {k: op[k] for k in ("ratio", "illegal", "innocent", "frozen_params")})
                                   for m, op in operating.items()}}
    atomic_write_json(root / "frontier.json", result)
    with open(root / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(points[0]))
        w.writeheader()
        w.writerows(points)
    atomic_write_text(root / "frontier.md", _markdown(curves, full, untouched, operating, illegal, innocent, domain))
    _plot(root / "frontier.png", curves, full, untouched, illegal, innocent, domain, cfg.budget)
    return result


def _fmt(p, key):
    return f"{p[key]:.3f} ± {p[key + '_std']:.3f}"


def _markdown(curves, full, untouched, operating, illegal, innocent, domain) -> str:
    ratios = sorted({p["ratio"] for c in curves.values() for p in c})
    methods = list(curves)
    lines = [f"Forgeries ({illegal}, lower is better) / innocent {domain} ({innocent}, higher is better) per "
             f"frozen share; mean over seeds.", "",
             "| frozen share | " + " | ".join(_name(m) for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for r in ratios:
        cells = []
        for m in methods:
            p = next((p for p in curves[m] if p["ratio"] == r), None)
            cells.append(f"{p['illegal']:.3f} / {p['innocent']:.3f}" if p else "–")
        lines.append(f"| {r:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: forgeries / innocent (seed spreads in frontier.csv)."]
    if full:
        lines.append(f"Full FT: forgeries {_fmt(full, 'illegal')}, innocent {_fmt(full, 'innocent')}.")
    if untouched:
        lines.append(f"Untouched model: forgeries {_fmt(untouched, 'illegal')}, innocent {_fmt(untouched, 'innocent')}.")
    lines += ["", f"Operating point (the lowest forgery rate at which innocent users keep ≥ {KEEP:.0%} of Full FT's "
                  f"innocent score):", ""]
    for m in methods:
        op = operating[m]
        lines.append(f"- {_name(m)}: " + (f"{op['illegal']:.3f} at {op['ratio']:.0%} frozen (innocent "
                                          f"{op['innocent']:.3f})" if op else "no frozen share keeps that much"))
    return "\n".join(lines) + "\n"


def _name(method: str) -> str:
    return method_label(method, 0).rsplit("-", 1)[0]


def _plot(path, curves, full, untouched, illegal, innocent, domain, budget):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, c in curves.items():
        ax.errorbar([p["innocent"] for p in c], [p["illegal"] for p in c], xerr=[p["innocent_std"] for p in c],
                    yerr=[p["illegal_std"] for p in c], marker="o", capsize=2,
                    label=_name(m))
        for p in c:
            ax.annotate(f"{p['ratio']:.0%}", (p["innocent"], p["illegal"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    for p, marker, name in ((full, "*", "Full FT"), (untouched, "s", "untouched model")):
        if p:
            ax.plot(p["innocent"], p["illegal"], marker, color="k", markersize=9, label=name)
    ax.set_xlabel(f"innocent {domain}: {innocent.replace('_', ' ')} (higher is better)")
    ax.set_ylabel(f"illegal: {illegal.replace('_', ' ')} (lower is better)")
    ax.set_title(f"trade-off frontier (share of {'parameters' if budget == 'params' else 'tensors'} frozen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
