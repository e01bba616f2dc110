"""The one-person guard study's verdict sentence (experiments/guard_tables.py), which README quotes:
the best worst case among the freezing guards, against half of Full FT's default forgeries."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import guard_tables  # noqa: E402


def _c(mean):
    return {"mean": mean, "std": 0.0, "n": 3}


def test_the_verdict_names_the_best_worst_case_and_its_margin():
    table = {"full": {"default": _c(0.8), "worst": _c(1.0)}, "imma": {"default": _c(0.8), "worst": _c(0.1)},
             "learned": {"default": _c(0.3), "worst": _c(0.7)}, "saliency": {"default": _c(0.4), "worst": _c(0.65)},
             "random": {"default": _c(0.9), "worst": _c(1.0)}, "pretrained": {"prior": _c(0.88)}}
    text = guard_tables.verdict("guard-judge-cast2-logos", table)
    # IMMA's 10% is not a freezing guard's; the best of learned/saliency/random is Saliency's 65%
    assert text.startswith("Cast 2: Full FT forges 80% of portraits by default (the target, half that, is ≤ 40%)")
    assert "best worst case among the 3 freezing guards is 65% (Saliency-30% params), missing the target by 25 points" \
        in text
    table["saliency"]["worst"] = _c(0.35)
    assert "Saliency-30% params meets it at its worst recipe (35%)" in guard_tables.verdict("guard-judge-cast2-logos",
                                                                                             table)


def test_the_verdict_says_when_every_guard_reaches_the_same_worst_case():
    table = {"full": {"default": _c(1.0), "worst": _c(1.0)}, "learned": {"default": _c(0.9), "worst": _c(1.0)},
             "random": {"default": _c(1.0), "worst": _c(1.0)}}
    assert guard_tables.verdict("guard-judge-cast1-clothes", table) == (
        "Cast 1: Full FT forges 100% of portraits by default (the target, half that, is ≤ 50%); every freezing guard "
        "reaches 100% at its worst recipe.")
