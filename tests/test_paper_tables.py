"""The paper-protocol tables (experiments/paper_tables.py): cells are the mean over seeds of each
seed's mean over the people judged, the spread is over seeds, and each target's verdict and margin."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import paper_tables  # noqa: E402


def _row(method, seed, subject, value, metric="identity_recognition", attack="default", ratio=0.3, domain="people"):
    return {"method": method, "ratio": ratio, "attack": attack, "seed": seed, "subject": subject, "domain": domain,
            "metric": metric, "value": value}


def test_a_cell_averages_people_within_a_seed_then_spreads_over_seeds():
    rows = [_row("learned", 0, "A", 1.0), _row("learned", 0, "B", 0.5), _row("learned", 0, "C", 0.0),   # seed 0: 0.5
            _row("learned", 1, "A", 1.0), _row("learned", 1, "B", 1.0), _row("learned", 1, "C", 0.7),   # seed 1: 0.9
            _row("learned", 1, "A", 0.0, attack="lr-x10"), _row("learned", 1, "A", 0.0, ratio=0.2),
            _row("random", 0, "A", 0.0)]
    cell = paper_tables.seed_cell(rows, "learned", 0.3, "identity_recognition", "people")
    assert cell["mean"] == pytest.approx(0.7) and cell["seeds"] == 2 and cell["n"] == 6
    assert cell["std"] == pytest.approx(((0.5 - 0.7) ** 2 + (0.9 - 0.7) ** 2) ** 0.5)   # n-1 = 1
    assert paper_tables.seed_cell(rows, "learned", 0.3, "identity_recognition", "logos") is None
    one = paper_tables.seed_cell(rows, "learned", 0.2, "identity_recognition", "people")
    assert (one["mean"], one["std"]) == (0.0, 0.0)


def test_targets_are_met_or_missed_with_their_margins_by_hand():
    def c(mean, std=0.0):
        return {"mean": mean, "std": std}
    table = {"full": {"default": c(0.9), "worst": c(1.0), "innocent": c(0.8), "prior": c(0.88)},
             "pretrained": {"prior": c(0.88)},
             "saliency": {"default": c(0.5), "worst": c(0.6, 0.05), "innocent": c(0.7), "prior": c(0.88)},
             "random": {"default": c(0.8), "worst": c(0.9, 0.02), "innocent": c(0.8), "prior": c(0.88)},
             "learned": {"default": c(0.3), "worst": c(0.44, 0.1), "innocent": c(0.76), "prior": c(0.85)}}
    checks = {name: (ok, detail) for name, ok, detail in paper_tables.targets("learned", table)}
    assert checks["worst ≤ ½ Full FT default"][0] and "-1.0 points" in checks["worst ≤ ½ Full FT default"][1]
    # 0.16 below Saliency's worst, its spread 0.1: met; 0.46 below Random's: met
    assert checks["worst below saliency's by more than the seed spread"][0]
    assert checks["worst below random's by more than the seed spread"][0]
    assert checks["innocent within 5 points of Full FT"][0] and "-4.0 points" in checks["innocent within 5 points of Full FT"][1]
    assert not checks["release prior within 2 points of the base"][0]
    table["learned"]["worst"] = c(0.55, 0.1)
    checks = {name: ok for name, ok, _ in paper_tables.targets("learned", table)}
    assert not checks["worst ≤ ½ Full FT default"] and not checks["worst below saliency's by more than the seed spread"]


def test_the_verdict_sentence_says_the_numbers_and_the_margin_it_misses_by():
    def c(mean):
        return {"mean": mean, "std": 0.0}
    table = {"full": {"default": c(0.775), "worst": c(0.988), "worst_attack": "steps-x5", "unnamed": c(0.087),
                      "innocent": c(0.9)},
             "learned": {"default": c(0.512), "worst": c(0.95), "worst_attack": "steps-x5", "unnamed": c(0.087),
                         "innocent": c(0.7)},
             "saliency": {"default": c(0.525), "worst": c(0.8), "worst_attack": "steps-x5"},
             "random": {"default": c(0.7), "worst": c(0.97), "worst_attack": "lr-x10"}}
    text = paper_tables.verdict("guard-k5-cast2-logos", table, [0])
    assert text.startswith("**Cast 2, innocent logos** (1 seed): Full FT forges 78% of portraits by default (9%")
    # the target is half Full FT's default (38.75%): 95% misses it by 56 points
    assert "lets 51% through by default but 95% under steps-x5" in text and "missed by 56 points" in text
    assert "Saliency: 52% by default, 80% at worst (steps-x5); Random: 70% and 97% (lr-x10)" in text
    assert "learned 70% of the time under it against 90% under Full FT" in text
    assert "LoRA" not in text              # runs without the lora-32 recipe say nothing of it
    table["learned"]["worst"] = c(0.3)
    assert "the target met" in paper_tables.verdict("guard-k5-cast2-logos", table, [0, 1])


def test_the_verdict_gives_the_lora_attack_and_the_tensors_each_mask_froze_where_recorded():
    def c(mean):
        return {"mean": mean, "std": 0.0}
    table = {"full": {"default": c(0.84), "worst": c(0.99), "worst_attack": "steps-x5", "unnamed": c(0.09),
                      "lora": c(0.794), "tensors": c(0.0)},
             "learned": {"default": c(0.53), "worst": c(0.97), "worst_attack": "steps-x5", "unnamed": c(0.09),
                         "lora": c(0.013), "tensors": c(600.0)},
             "saliency": {"default": c(0.57), "worst": c(0.84), "worst_attack": "steps-x5", "lora": c(0.688),
                          "tensors": c(91.0)},
             "random": {"default": c(0.78), "worst": c(0.99), "worst_attack": "steps-x5"}}
    text = paper_tables.verdict("guard-k5-cast2-logos", table, [0, 1])
    assert ("A rank-32 LoRA on what its mask leaves trainable forges 1% (on Full FT's model 79%, under Saliency's "
            "mask 69%); for its 30% of the parameters the mask freezes 600 tensors (Saliency's 91)") in text
    del table["learned"]["tensors"]          # a run that recorded no tensor count
    text = paper_tables.verdict("guard-k5-cast2-logos", table, [0, 1])
    assert "forges 1% (on Full FT's model 79%, under Saliency's mask 69%)" in text and "tensors" not in text


def test_the_scale_sentence_gives_the_lead_over_random_at_each_number_of_people():
    def c(mean, seeds=1):
        return {"mean": mean, "std": 0.0, "seeds": seeds}
    table4 = {}
    for k, learned, random, brands in ((2, 0.1875, 0.969, 0.656), (10, 0.244, 0.744, 0.797)):
        table4[f"learned-0.3-k{k}"] = {"forgeries": c(learned), "brands": c(brands)}
        table4[f"random-0.3-k{k}"] = {"forgeries": c(random), "brands": c(1.0)}
        table4[f"full-0-k{k}"] = {"forgeries": c(0.93), "brands": c(0.97)}
    text = paper_tables.scale_verdict(table4)
    # 96.9 - 18.75 = 78.15 -> 78 points; 74.4 - 24.4 = 50 points: the lead shrinks
    assert "at 2 / 10 people per forger FreezeAsGuard lets 19% / 24% of portraits through against Random's " \
           "97% / 74%, a lead of 78 / 50 points that shrinks" in text
    assert "brands are learned 66% / 80% of the time under it (Full FT 97% / 97%)" in text and "seeds: 1 / 1" in text
    assert "size" not in text                          # no parameter shares recorded: no claim about them
    for k, learned_share in ((2, 0.715), (10, 0.644)):
        table4[f"learned-0.3-k{k}"]["frozen"] = c(learned_share)
        table4[f"random-0.3-k{k}"]["frozen"] = c(0.279)
    assert ("but at 30% of tensors FreezeAsGuard's mask holds 72% / 64% of the parameters and Random's 28% / 28%, "
            "so part of the lead is size") in paper_tables.scale_verdict(table4)
    table4["random-0.3-k2"]["forgeries"] = c(0.3)     # a lead of 11 then 50 points grows: no claim of the trend
    assert "shrinks" not in paper_tables.scale_verdict(table4)
    assert paper_tables.scale_verdict({}) == ""


def test_the_table2_paragraph_compares_at_each_share_and_at_the_closest_parameter_share():
    def c(mean, seeds=2):
        return {"mean": mean, "std": 0.0, "seeds": seeds}
    table2 = {"full-0": {"forgeries": c(0.925), "unnamed": c(0.113), "brands": c(0.969)},
              "uce-0": {"forgeries": c(0.681)},
              "learned-0.1": {"forgeries": c(0.369), "frozen": c(0.34), "brands": c(0.891)},
              "random-0.1": {"forgeries": c(0.869), "frozen": c(0.10), "brands": c(0.953)},
              "learned-0.4": {"forgeries": c(0.219), "frozen": c(0.66), "brands": c(0.812)},
              "random-0.4": {"forgeries": c(0.700), "frozen": c(0.35), "brands": c(0.938)}}
    text = paper_tables.table2_verdict(table2)
    assert text.startswith("Table 2 (2 seeds, the default recipe;") and "Full FT forges 92% of portraits, 11%" in text
    assert "less than Random at every share of tensors: 37% at 10% against 87%, 22% at 40% against 70%." in text
    assert "10 / 40% of tensors are 34 / 66% of the parameters" in text
    # |0.34 - 0.35| is the smallest gap of the four learned x random pairs
    assert ("the closest pair, FreezeAsGuard-10% (34% of the parameters) and Random-40% (35%), forge 37% and 70% and "
            "keep 89% and 94% of the brands") in text
    assert "fall from 97% (Full FT) to 81-89%" in text and "The other baselines forge: UCE 68%." in text
    table2["random-0.4"]["forgeries"] = {"mean": 0.25, "std": 0.1, "seeds": 2}   # 3 points ahead, spread 10
    assert "every share of tensors (by more than the seed spread at 1 of them): " in paper_tables.table2_verdict(table2)
    table2["random-0.4"]["forgeries"] = c(0.2)
    assert "less than Random at 1 of 2 shares of tensors" in paper_tables.table2_verdict(table2)
    assert paper_tables.table2_verdict({}) == ""


def test_the_budget_table_joins_the_guard_runs_30_percent_masks_of_the_same_seeds_and_judges_the_target():
    budget = [_row("full", 0, "A", 0.8, ratio=0.0), _row("full", 0, "A", 1.0, attack="steps-x5", ratio=0.0),
              _row("full", 0, "brand", 1.0, metric="subject_recognition", ratio=0.0, domain="logos")]
    for ratio, default, worst, brands in ((0.5, 0.2, 0.6, 0.7), (0.7, 0.1, 0.35, 0.4)):
        budget += [_row("learned", 0, "A", default, ratio=ratio), _row("learned", 0, "A", worst, "identity_recognition",
                                                                       "steps-x5", ratio),
                   _row("learned", 0, "brand", brands, "subject_recognition", ratio=ratio, domain="logos")]
    guard = [_row("learned", 0, "A", 0.5), _row("learned", 0, "A", 0.95, attack="steps-x5"),
             _row("learned", 0, "brand", 0.9, "subject_recognition", domain="logos"),
             _row("learned", 1, "A", 0.0, attack="steps-x5"),          # another seed: not this run's
             _row("imma", 0, "A", 0.0, ratio=0.3)]                     # not a method of the budget table
    lines, data = paper_tables.budget_table("budget-k5-cast2-logos", budget, guard, [0])
    assert set(data) == {"full-0", "learned-0.3", "learned-0.5", "learned-0.7"}
    assert data["learned-0.3"]["steps-x5"]["mean"] == pytest.approx(0.95)
    assert any(line.startswith("| 2 (logos) | FreezeAsGuard-70% params | – | 0.100 ± 0.000 | 0.350 ± 0.000 | 0.400")
               for line in lines)
    text = paper_tables.budget_verdict("budget-k5-cast2-logos", data, [0])
    assert text.startswith("**A larger mask** (cast 2, innocent logos, 1 seed): under steps-x5, at 30% / 50% / 70%")
    # the target is half Full FT's default, 40%: only the 70% mask's 35% meets it
    assert "FreezeAsGuard 95% / 60% / 35% (innocent subjects 90% / 70% / 40%)" in text
    assert ("against Full FT's 100% (80% by default, so the target is ≤ 40%); 1 of 3 masks meets it: "
            "FreezeAsGuard-70% params, under which the innocent user's subjects are learned 40% of the time "
            "(Full FT 100%).") in text
    data["learned-0.7"]["steps-x5"]["mean"] = 0.5
    assert paper_tables.budget_verdict("budget-k5-cast2-logos", data, [0]).endswith("no mask meets it.")
