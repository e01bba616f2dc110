"""The experiment runner: results in long format, and a killed run resumes without redoing stages."""
import json
from pathlib import Path

from PIL import Image

import pytest

from freezeasguard.experiment import runner as experiment
from freezeasguard.experiment.config import ExperimentConfig
from freezeasguard.experiment.runner import Runner


def _cfg(out, model):
    return ExperimentConfig(out=str(out), model=str(model), seeds=[0], mask_images=4, finetune_images=4,
                            eval_images=2, warm_start_steps=2, mask_steps=1, inner_steps=1, mask_batch=2,
                            finetune_steps=2, finetune_batch=2, generate_steps=2)


@pytest.mark.slow
def test_runner_resumes_without_redoing_finished_stages(tiny_sd, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "exp", tiny_sd)
    calls = []
    real = Runner.finetune

    def counting(self, method, ratio, seed, domain, subject, attack="default"):
        calls.append((method, domain))
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(self, method, ratio, seed, domain, subject, attack)

    monkeypatch.setattr(Runner, "finetune", counting)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run()
    assert not (tmp_path / "exp" / "protect" / "learned").exists()   # learned comes last
    monkeypatch.setattr(Runner, "finetune", real)
    trained = []
    real_ft = experiment.Runner.stage

    def watch(self, name, fn, valid=None):
        marker = self.root / "stages" / f"{name}.done.json"
        if not marker.exists() and name.startswith("finetune-"):
            trained.append(name)
        return real_ft(self, name, fn, valid)

    monkeypatch.setattr(Runner, "stage", watch)
    rows = Runner(cfg).run()
    # 3 methods x (people + logos) = 6 fine-tunes; 3 were finished before the kill
    assert len(trained) == 3
    assert {r["method"] for r in rows} == {"pretrained", "full", "random", "learned"}
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved == rows
    for r in saved:
        assert set(r) == {"method", "ratio", "attack", "seed", "subject", "domain", "metric", "value"}
        if r["metric"] in ("identity_recognition", "prompt_accuracy"):
            assert 0 <= r["value"] <= 1
    assert "FreezeAsGuard-30%" in (tmp_path / "exp" / "results.md").read_text()
    assert (tmp_path / "exp" / "tradeoff.png").exists()


def test_unknown_settings_and_methods_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("methods: [full]\nfinetune_stepz: 3\n")
    with pytest.raises(ValueError, match="finetune_stepz"):
        ExperimentConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="unknown method"):
        Runner(ExperimentConfig(out=str(tmp_path / "x"), methods=["magic"]))


def test_config_values_are_read_as_their_field_types(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; the config turns it into the float it means,
    and refuses values of the wrong kind by name instead of failing inside a worker."""
    (tmp_path / "c.yaml").write_text("finetune_lr: 1e-3\nseeds: 4\nratios: [0.1, 3e-1]\n"
                                     "finetune_steps: 2.0\nmodel: null\n")
    cfg = ExperimentConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.finetune_lr == 0.001 and isinstance(cfg.finetune_lr, float)
    assert cfg.seeds == [4] and cfg.ratios == [0.1, 0.3]
    assert cfg.finetune_steps == 2 and isinstance(cfg.finetune_steps, int)
    assert cfg.model is None
    for bad, name in [("finetune_steps: 2.5", "finetune_steps"), ("seeds: [0, one]", r"seeds\[1\]"),
                      ("face_identity: maybe", "face_identity"), ("innocent_data: logos", "innocent_data")]:
        (tmp_path / "c.yaml").write_text(bad + "\n")
        with pytest.raises(ValueError, match=name):
            ExperimentConfig.from_yaml(tmp_path / "c.yaml")


@pytest.mark.slow
def test_runner_with_baselines_and_a_chain(tiny_sd, tmp_path):
    """UCE, IMMA, saliency and uce+learned run through the same runner; the chain's fine-tune
    starts from the UCE-edited model and keeps its frozen tensors byte-identical to it."""
    from freezeasguard.guard.mask import Mask
    from freezeasguard.models.pipelines import load_denoiser_state
    cfg = _cfg(tmp_path / "exp", tiny_sd)
    cfg.methods = ["uce", "imma", "saliency", "uce+learned"]
    cfg.imma_steps, cfg.imma_inner_steps, cfg.saliency_batches = 2, 1, 1
    rows = Runner(cfg).run()
    assert {r["method"] for r in rows} == {"pretrained", "uce", "imma", "saliency", "uce+learned"}
    table = (tmp_path / "exp" / "results.md").read_text()
    for label in ("| UCE |", "| IMMA |", "| Saliency-30% |", "| UCE+FreezeAsGuard-30% |"):
        assert label in table
    uce_model = tmp_path / "exp" / "protect" / "uce" / "model"
    mask = Mask.load(tmp_path / "exp" / "protect" / "uce+learned" / "mask-0.3.safetensors")
    edited, base = load_denoiser_state(uce_model), load_denoiser_state(tiny_sd)
    ft = next((tmp_path / "exp" / "finetunes").glob("uce+learned-0.3-s0-people-*"))
    tuned = load_denoiser_state(ft)
    frozen = set(mask.frozen_names)
    assert frozen and all(tuned[n].equal(edited[n]) for n in frozen)
    assert any(not edited[n].equal(base[n]) for n in edited if "attn2.to_k" in n)


@pytest.mark.slow
def test_jobs_in_two_processes_give_the_sequential_results(tiny_sd, tmp_path, capfd):
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as the workers: the same float sums, so the same numbers
    try:
        one = Runner(_cfg(tmp_path / "one", tiny_sd)).run()
        cfg = _cfg(tmp_path / "two", tiny_sd)
        cfg.workers = 2
        two = Runner(cfg).run()
    finally:
        torch.set_num_threads(threads)
    key = lambda r: (r["method"], r["seed"], r["domain"], r["metric"])   # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two))
    by_key = {key(r): r["value"] for r in one}
    for r in two:
        assert r["value"] == pytest.approx(by_key[key(r)], rel=1e-6, abs=1e-9), key(r)
    # every job's fine-tune ran in a worker and left its done-marker
    assert len(list((tmp_path / "two" / "stages").glob("finetune-*.done.json"))) == 6
    # the workers' per-step bars went to their log files, not to the terminal the run's bar is on
    logs = list((tmp_path / "two" / "logs").glob("worker-*.log"))
    assert logs and any("fine-tune (" in f.read_text() for f in logs)
    assert "fine-tune (" not in capfd.readouterr().err.split("protections and jobs", 1)[1]


def test_the_worker_server_preloads_modules_that_exist():
    # the fork server skips a preload it cannot import without a word: a misspelt name would
    # silently give every worker its ~9 s of imports back
    import importlib.util
    import multiprocessing as mp
    from freezeasguard.experiment.workers import WORKER_PRELOAD, worker_context
    assert all(importlib.util.find_spec(name) is not None for name in WORKER_PRELOAD)
    expected = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    assert worker_context().get_start_method() == expected


def test_protections_sharing_a_cached_first_link_are_one_group():
    from freezeasguard.experiment.jobs import protection_groups
    jobs = [("full", 0.0, 0, "people", "A"), ("learned", 0.3, 0, "people", "A"), ("learned", 0.3, 1, "logos", None),
            ("learned", 0.1, 0, "people", "A"), ("uce", 0.0, 0, "people", "A"), ("uce+learned", 0.3, 0, "people", "A"),
            ("random", 0.3, 0, "people", "A")]
    assert protection_groups(jobs) == [[("full", 0.0)], [("learned", 0.3), ("learned", 0.1)],
                                       [("uce", 0.0), ("uce+learned", 0.3)], [("random", 0.3)]]


def test_example_configs_name_only_known_settings():
    from pathlib import Path
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = ExperimentConfig.from_yaml(path)       # unknown keys raise, naming them
        assert cfg.methods and cfg.out


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports_the_prior(tmp_path, capsys):
    from freezeasguard.cli import main
    assert main(["demo", "--quick", "--workers", "1", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    methods = {s["method"] for s in summary["summary"]}
    assert methods == {"pretrained", "full", "learned", "saliency", "random"}
    assert 0 <= summary["sanity"]["prior_trait_accuracy"] <= 1
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "FreezeAsGuard-30% params" in table and "Logos brand recognised" in table
    # the verdict first, naming a guard and Full FT; every method's release prior (the base's where it releases the base)
    verdict = (tmp_path / "demo" / "verdict.txt").read_text().strip()
    assert table.startswith(f"Verdict: {verdict}") and "Full FT" in verdict and "Release prior" in table
    priors = {s["method"]: s["mean"] for s in summary["summary"] if s["metric"] == "prior_trait_accuracy"}
    assert priors["saliency"] == priors["pretrained"] == summary["sanity"]["prior_trait_accuracy"]
    assert set(priors) == methods
    # the short sweep's worst case beside the default recipe, for every method that fine-tunes
    assert "worst of 4 recipes" in table and {r["attack"] for r in summary["summary"]} == {
        "default", "lr-x10", "steps-x5", "lora-32"}
    # every freezing method froze the same share of parameters (at most 30%, short by less than a tensor)
    shares = {s["method"]: s["mean"] for s in summary["summary"] if s["metric"] == "frozen_param_fraction"
              and s["method"] != "full"}
    assert all(0.25 <= v <= 0.3 for v in shares.values()), shares
    # and how many tensors that is: the count in the mask file each fine-tune ran under
    from freezeasguard.guard.mask import Mask
    counts = {s["method"]: s["mean"] for s in summary["summary"] if s["metric"] == "frozen_tensors"}
    assert counts["full"] == 0 and counts["saliency"] > 0
    learned = Mask.load(tmp_path / "demo" / "protect" / "learned" / "mask-0.3.safetensors")
    assert counts["learned"] == len(learned.frozen_names)
    # the innocent user fine-tuned on the world's brand, and the untouched model was judged on it too
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())
    brands = {r["subject"] for r in rows if r["metric"] == "subject_recognition"}
    assert len(brands) == 2 and {r["method"] for r in rows if r["metric"] == "subject_recognition"} == methods
    # the paper's protocol: 2 people fine-tuned together, each judged alone, named and as "a person"
    assert summary["protocol"]["people_per_forger"] == 2 and "Protocol:" in table
    named = {r["subject"] for r in rows if r["metric"] == "identity_recognition"}
    unnamed = {r["subject"] for r in rows if r["metric"] == "identity_recognition_unnamed"}
    assert len(named) == 2 and unnamed == named
    assert not (tmp_path / "demo" / "tensor-budget").exists()


def test_demo_compares_at_an_equal_share_of_parameters_by_default(tmp_path):
    from freezeasguard.cli import build_parser
    from freezeasguard.cli.experiment import demo_config
    from freezeasguard.experiment import DEMO
    args = build_parser().parse_args(["demo"])
    assert args.budget == "params" and not args.frontier
    cfg = demo_config(tmp_path / "d")
    assert cfg.methods == ["full", "learned", "saliency", "random"] and cfg.budget == "params"
    assert cfg.seeds == [0] and demo_config(tmp_path / "q", quick=True).seeds == [0]
    assert cfg.people_per_forger == 2 and demo_config(tmp_path / "o", people_per_forger=1).people_per_forger == 1
    assert build_parser().parse_args(["attack-sweep"]).people_per_forger is None
    every = demo_config(tmp_path / "b", baselines=True).methods
    assert every[:4] == cfg.methods and {"saliency+immunise", "learned-identity+immunise", "imma", "uce"} <= set(every)
    assert demo_config(tmp_path / "t", budget="tensors").methods == ["full", "learned", "random"]
    assert all(getattr(cfg, k) == v for k, v in DEMO.items())
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("preset: demo\nfinetune_steps: 7\n")
    from_file = ExperimentConfig.from_yaml(yaml_path)
    assert from_file.finetune_steps == 7 and from_file.mask_steps == DEMO["mask_steps"]
    assert from_file.guidance == DEMO["guidance"] != ExperimentConfig().guidance


def test_operating_point_is_the_lowest_forgery_that_keeps_innocent_users_by_hand():
    from freezeasguard.experiment.frontier import operating_point
    pts = [{"ratio": 0.1, "illegal": 0.9, "innocent": 0.95}, {"ratio": 0.3, "illegal": 0.4, "innocent": 0.9},
           {"ratio": 0.5, "illegal": 0.1, "innocent": 0.5}, {"ratio": 0.7, "illegal": 0.0, "innocent": 0.2}]
    assert operating_point(pts, 1.0)["ratio"] == 0.3            # 0.9 >= 0.9 * 1.0; 0.5 is not
    assert operating_point(pts, 0.5)["ratio"] == 0.5             # 0.5 >= 0.45 keeps; 0.2 does not
    assert operating_point(pts, 2.0) is None


def test_frontier_points_and_report_from_a_hand_made_summary(tmp_path):
    import types

    from freezeasguard.experiment.frontier import write_frontier

    def cell(method, ratio, domain, metric, mean):
        return {"method": method, "ratio": ratio, "attack": "default", "domain": domain, "metric": metric,
                "mean": mean, "std": 0.01, "n": 3}
    summary = [cell("pretrained", 0.0, "people", "identity_recognition", 0.0),
               cell("pretrained", 0.0, "logos", "subject_recognition", 0.0),
               cell("full", 0.0, "people", "identity_recognition", 1.0),
               cell("full", 0.0, "logos", "subject_recognition", 1.0)]
    for ratio, (ill_a, inn_a, ill_b, inn_b) in {0.1: (0.8, 1.0, 0.9, 0.95), 0.5: (0.2, 0.92, 0.1, 0.6)}.items():
        summary += [cell("learned", ratio, "people", "identity_recognition", ill_a),
                    cell("learned", ratio, "logos", "subject_recognition", inn_a),
                    cell("learned", ratio, "people", "frozen_param_fraction", ratio),
                    cell("random", ratio, "people", "identity_recognition", ill_b),
                    cell("random", ratio, "logos", "subject_recognition", inn_b)]
    cfg = types.SimpleNamespace(innocent=["logos"], budget="params")
    result = write_frontier(tmp_path, summary, cfg)
    assert result["illegal_metric"] == "identity_recognition" and result["innocent_metric"] == "subject_recognition"
    assert result["operating_points"]["learned"]["ratio"] == 0.5        # 0.92 >= 0.9: kept, and fewer forgeries
    assert result["operating_points"]["random"]["ratio"] == 0.1         # at 50% random loses the innocent user
    md = (tmp_path / "frontier.md").read_text()
    assert "| 50% | 0.200 / 0.920 | 0.100 / 0.600 |" in md
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert (tmp_path / "frontier.csv").read_text().count("\n") == 1 + 2 + 4    # header, full/untouched, 4 points


@pytest.mark.slow
def test_quick_frontier_writes_one_curve_per_freezing_method(tmp_path, capsys):
    from freezeasguard.cli import main
    out = tmp_path / "f"
    assert main(["demo", "--quick", "--workers", "1", "--frontier", "--ratios", "0.1,0.5", "--out", str(out)]) == 0
    result = json.loads((out / "frontier.json").read_text())
    curves = {}
    for p in result["points"]:
        curves.setdefault(p["method"], []).append(p["ratio"])
    assert curves == {"pretrained": [0.0], "full": [0.0], "learned": [0.1, 0.5], "saliency": [0.1, 0.5],
                      "random": [0.1, 0.5]}
    frozen = {(p["method"], p["ratio"]): p["frozen_params"] for p in result["points"] if p["ratio"]}
    assert all(r - 0.06 <= f <= r for (_, r), f in frozen.items()), frozen
    assert set(result["operating_points"]) == {"learned", "saliency", "random"}
    assert (out / "frontier.png").stat().st_size > 0 and "Operating point" in capsys.readouterr().out


@pytest.mark.slow
def test_runner_sweeps_attacks_keeps_adapters_off_frozen_modules_and_reports_the_worst_case(tiny_sd, tmp_path):
    import dataclasses

    from safetensors.torch import load_file

    from freezeasguard.guard.mask import Mask
    cfg = dataclasses.replace(_cfg(tmp_path / "exp", tiny_sd), methods=["full", "learned"],
                              attacks=["default", "lora-2"], attack_recipes={"lora-2": {"lora_rank": 2}})
    rows = Runner(cfg).run()
    assert {r["method"] for r in rows} == {"pretrained", "full", "learned"}
    assert {r["attack"] for r in rows if r["domain"] == "people"} == {"default", "lora-2"}
    assert {r["attack"] for r in rows if r["domain"] != "people"} == {"default"}     # innocent: default recipe
    assert all(r["value"] == r["value"] for r in rows)                 # no NaN: generation and loss ran
    mask = Mask.load(next((tmp_path / "exp" / "protect" / "learned").glob("mask-*.safetensors")))
    frozen = set(mask.frozen_names)
    ft = next((tmp_path / "exp" / "finetunes").glob("learned-*-people-*-lora-2"))
    keys = load_file(str(ft / "pytorch_lora_weights.safetensors"))
    assert keys and not {k[5:].split(".lora_")[0] + ".weight" for k in keys} & frozen
    sweep = json.loads((tmp_path / "exp" / "attack_sweep.json").read_text())
    learned = next(r for r in sweep["worst_case"] if r["method"] == "learned")
    cells = {c["attack"]: c["mean"] for c in sweep["cells"] if c["method"] == "learned"}
    assert learned["worst"] == max(cells.values()) and cells[learned["worst_attack"]] == learned["worst"]
    assert (tmp_path / "exp" / "attack_sweep.png").stat().st_size > 0
    assert "lora-2" in (tmp_path / "exp" / "attack_sweep.md").read_text()
    # results.md: the default recipe's table with the worst case beside it, then every recipe
    default_part = (tmp_path / "exp" / "results.md").read_text()
    every = (tmp_path / "exp" / "results_by_recipe.md").read_text()
    assert "worst of 2 recipes" in default_part and "· lora-2" not in default_part and "· lora-2" in every
    row = next(line for line in default_part.splitlines() if line.startswith("| FreezeAsGuard"))
    assert f"{learned['worst']:.3f} ± {learned['worst_std']:.3f} ({learned['worst_attack']})" in row


def test_every_example_config_loads():
    from pathlib import Path
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        ExperimentConfig.from_yaml(path)          # unknown keys, bad values or attacks fail here


def test_generic_people_join_the_mask_learning_innocent_data_only_when_asked(tmp_path, monkeypatch):
    from freezeasguard.training.data import load_image_captions
    seen = {}

    def fake_protect(method, model, illegal, innocent, subjects, ratio, work, cfg, device="auto"):
        seen[cfg.mask_generic_people] = innocent
        return None
    monkeypatch.setattr(experiment, "protect", fake_protect)
    for flag in (False, True):
        cfg = ExperimentConfig(out=str(tmp_path / f"e{flag}"), mask_images=6, mask_generic_people=flag)
        Runner(cfg).protection("learned", 0.3)
    assert len(seen[False]) == 1 and len(seen[True]) == 2
    generic = load_image_captions(seen[True][1]).records
    assert len(generic) == 6 and all(r.caption.startswith("a photo of a person") for r in generic)
    logos = [r.caption for r in load_image_captions(seen[True][0]).records]
    assert sum(c.startswith("a logo of ") for c in logos) == 3        # every other one names a publisher's brand
    with pytest.raises(ValueError, match="only the built-in world"):
        ExperimentConfig(out=str(tmp_path / "x"), mask_generic_people=True, people_data=str(tmp_path))


def test_timings_sum_each_kind_of_stage_and_name_each_protection(tmp_path):
    from freezeasguard.experiment.timings import write_timings
    for name, seconds in [("finetune-full-0-s0-people-A", 2.5), ("finetune-full-0-s1-people-A", 1.5),
                          ("eval-full-0-s0-A", 0.5), ("generate-images_full-0-s0-A", 4.0)]:
        (tmp_path / "stages").mkdir(exist_ok=True)
        (tmp_path / "stages" / f"{name}.done.json").write_text(json.dumps({"result": None, "seconds": seconds}))
    (tmp_path / "protect" / "learned").mkdir(parents=True)
    (tmp_path / "protect" / "learned" / "done-0.3.json").write_text(json.dumps({"mask": "m", "seconds": 12.0}))
    result = write_timings(tmp_path)
    assert result["by_kind"] == {"finetune": {"seconds": 4.0, "stages": 2}, "eval": {"seconds": 0.5, "stages": 1},
                                 "generate": {"seconds": 4.0, "stages": 1}}
    assert result["protections"] == {"learned/done-0.3": 12.0}
    assert result["slowest_stages"][0] == {"stage": "generate-images_full-0-s0-A", "seconds": 4.0}
    assert json.loads((tmp_path / "timings.json").read_text()) == result


def test_the_verdict_names_the_guard_with_the_fewest_forgeries_at_its_worst_by_hand():
    import types

    from freezeasguard.experiment.report import verdict

    def cell(method, ratio, attack, domain, metric, mean):
        return {"method": method, "ratio": ratio, "attack": attack, "domain": domain, "metric": metric,
                "mean": mean, "std": 0.0, "n": 3}
    summary = [cell("pretrained", 0.0, "default", "release", "prior_trait_accuracy", 0.88),
               cell("full", 0.0, "default", "people", "identity_recognition", 1.0),
               cell("full", 0.0, "default", "logos", "subject_recognition", 0.9),
               # saliency: fewer by default, but its worst recipe forges more than learned's
               cell("saliency", 0.3, "default", "people", "identity_recognition", 0.2),
               cell("saliency", 0.3, "lr-x10", "people", "identity_recognition", 0.9),
               cell("learned", 0.3, "default", "people", "identity_recognition", 0.5),
               cell("learned", 0.3, "lr-x10", "people", "identity_recognition", 0.7),
               cell("learned", 0.3, "default", "logos", "subject_recognition", 0.8),
               cell("learned", 0.3, "default", "release", "prior_trait_accuracy", 0.87)]
    cfg = types.SimpleNamespace(innocent=["logos"], budget="params", eval_images=10)
    said = verdict(summary, cfg)
    # 3 runs of 10 portraits: 21 of 30 recognised under lr-x10 (Wilson's interval by hand: 0.521-0.833)
    assert said.startswith("The best guard here, FreezeAsGuard-30% params (30% of the parameters), lets 70% "
                           "[95% CI 52%-83% of 30] ")
    assert "(lr-x10; 50% under the default one), against 100% [95% CI 89%-100% of 30] with no guard" in said
    assert "learned 80% of the time (Full FT: 90%)" in said and "87% of traits right (the base: 88%)" in said
    assert verdict(summary[3:], cfg) is None   # no Full FT


def test_forgers_of_several_people_split_the_subjects_and_size_the_cast(tmp_path):
    cfg = ExperimentConfig(out=str(tmp_path / "a"), people_per_forger=10)
    assert cfg.n_people() == 10 and cfg.world_cast_size() == 12       # two people nobody forges
    assert cfg.innocent_subjects_per_user() == 4 and "10 x 2000 = 20000 steps" in cfg.protocol()
    one = ExperimentConfig(out=str(tmp_path / "b"))
    assert (one.n_people(), one.world_cast_size(), one.innocent_subjects_per_user()) == (1, 8, 1)
    assert one.protocol().startswith("one person per forger")
    assert ExperimentConfig(out=str(tmp_path / "c"), people_per_forger=2, n_subjects=3).n_people() == 4
    assert ExperimentConfig(out=str(tmp_path / "d"), people_per_forger=2).innocent_subjects_per_user() == 2
    with pytest.raises(ValueError, match="multiple of it"):
        ExperimentConfig(out=str(tmp_path / "e"), people_per_forger=2, subjects=["A", "B", "C"])
    with pytest.raises(ValueError, match="innocent_per_user must be 1-4"):
        ExperimentConfig(out=str(tmp_path / "f"), innocent_per_user=5)
    with pytest.raises(ValueError, match="cast_size 8 is smaller than the 10"):
        ExperimentConfig(out=str(tmp_path / "g"), people_per_forger=10, cast_size=8)
    with pytest.raises(ValueError, match="people_per_forger must be >= 1"):
        ExperimentConfig(out=str(tmp_path / "h"), people_per_forger=0)
    runner = Runner(ExperimentConfig(out=str(tmp_path / "i"), people_per_forger=2, n_subjects=4))
    assert runner.forgers == [tuple(runner.subjects[:2]), tuple(runner.subjects[2:])]
    assert len(set(runner.subjects)) == 4 and runner.world.cast_size == 8
    assert runner.innocent_user("logos") == tuple(b.name for b in runner.world.brands["logos"][:2])


@pytest.mark.slow
def test_a_forger_of_two_people_trains_on_both_with_twice_the_steps_and_each_is_judged_named_and_unnamed(
        tiny_sd, tmp_path, monkeypatch):
    from freezeasguard.synthetic import judges
    from freezeasguard.metrics.basic import identity_recognition
    from freezeasguard.training.data import load_image_captions, neutral_caption
    cfg = ExperimentConfig(out=str(tmp_path / "exp"), model=str(tiny_sd), seeds=[0], methods=["full"],
                           people_per_forger=2, finetune_images=3, eval_images=2, finetune_steps=2, finetune_batch=2,
                           generate_steps=2, mask_images=2)
    prompts_by_folder = {}
    real_generate = Runner.generate

    def recording(self, model_dir, prompts, seed, out):
        prompts_by_folder[out.name] = (list(prompts), seed)
        return real_generate(self, model_dir, prompts, seed, out)
    monkeypatch.setattr(Runner, "generate", recording)
    runner = Runner(cfg)
    rows = runner.run()
    a, b = runner.subjects
    root = tmp_path / "exp"
    # one illegal user for both people: their images pooled, the steps doubled
    data = load_image_captions(root / "data" / f"people-{a}+1-finetune".replace(" ", "_")).records
    assert sorted(r.subject for r in data) == sorted([a] * 3 + [b] * 3)
    forger = root / "finetunes" / f"full-0-s0-people-{a}+1".replace(" ", "_")
    assert json.loads((forger / "freezeasguard_manifest.json").read_text())["config"]["steps"] == 4
    brands = runner.innocent_user("logos")
    assert len(brands) == 2
    innocent = root / "finetunes" / f"full-0-s0-logos-{brands[0]}+1".replace(" ", "_")
    assert json.loads((innocent / "freezeasguard_manifest.json").read_text())["config"]["steps"] == 4
    # each person judged on their own, named and with "a person" for the name: same prompts otherwise, same seed
    full = [r for r in rows if r["method"] == "full" and r["domain"] == "people"]
    recogniser = judges.recogniser(0, 8)
    for person in (a, b):
        tag = f"full-0-s0-{person}".replace(" ", "_")
        named, seed = prompts_by_folder[tag]
        unnamed, unnamed_seed = prompts_by_folder[f"{tag}-unnamed"]
        assert unnamed == [neutral_caption(p, person, "a person") for p in named] and unnamed_seed == seed
        assert all(person not in p and "a photo of a person" in p for p in unnamed)
        images = [Image.open(root / "images" / f"{tag}-unnamed" / f"{i:03d}.png").convert("RGB") for i in range(2)]
        expected = identity_recognition([p["identity"] for p in recogniser.predict(images)], person)
        got = {r["metric"]: r["value"] for r in full if r["subject"] == person and r["attack"] == "default"}
        assert got["identity_recognition_unnamed"] == expected and "identity_recognition" in got
    # each brand judged on its own
    judged = {r["subject"] for r in rows if r["method"] == "full" and r["metric"] == "subject_recognition"}
    assert judged == set(brands)
    report = (root / "results.md").read_text()
    assert "each forger fine-tunes on 2 people together (2 x 2 = 4 steps" in report
    assert 'Recognised as "a person"' in report and "fine-tuned together" in report
    protocol = json.loads((root / "summary.json").read_text())["protocol"]
    assert protocol["forger_steps"] == 4 and protocol["innocent_steps"] == 4 and protocol["people_per_forger"] == 2


def test_a_resume_is_refused_with_other_settings_but_not_for_a_setting_added_since_at_its_default(tmp_path):
    from dataclasses import asdict

    from freezeasguard.experiment.config import check_same_config
    root = tmp_path / "exp"
    root.mkdir()
    cfg = ExperimentConfig(out=str(root), seeds=[0])
    saved = json.loads(json.dumps(asdict(cfg)))
    del saved["people_per_forger"]                  # a run started before the setting existed
    (root / "config.json").write_text(json.dumps(saved))
    check_same_config(root, cfg)                    # at its default: the same run
    with pytest.raises(ValueError, match="people_per_forger"):
        check_same_config(root, ExperimentConfig(out=str(root), seeds=[0], people_per_forger=2))
    with pytest.raises(ValueError, match="seeds"):
        check_same_config(root, ExperimentConfig(out=str(root), seeds=[1]))


@pytest.mark.slow
def test_a_run_resumes_on_another_machine_from_its_stage_markers_alone(tiny_sd, tmp_path, monkeypatch):
    """experiments/run_paper.sh keeps an unfinished run's markers in git (not its models, data or
    images): a run restored from them reports the same rows without fine-tuning again, and a
    stage whose evaluation is missing fine-tunes again (deterministically) and evaluates."""
    import shutil

    from freezeasguard.experiment import runner as runner_module
    cfg = ExperimentConfig(out=str(tmp_path / "a"), model=str(tiny_sd), seeds=[0], methods=["full"],
                           attacks=["default", "steps-x5"], finetune_images=3, eval_images=2, finetune_steps=2,
                           finetune_batch=2, generate_steps=2, mask_images=2)
    rows = Runner(cfg).run()
    moved = tmp_path / "b"
    moved.mkdir()
    for name in (".freezeasguard-output.json", "config.json", "elapsed.json"):
        shutil.copy(tmp_path / "a" / name, moved / name)
    shutil.copytree(tmp_path / "a" / "stages", moved / "stages")
    trained = []
    real = runner_module.guarded_finetune

    def counting(*args, **kwargs):
        trained.append(args[2])
        return real(*args, **kwargs)
    monkeypatch.setattr(runner_module, "guarded_finetune", counting)
    again = Runner(ExperimentConfig(**{**cfg.__dict__, "out": str(moved)})).run()
    assert trained == [] and again == rows
    # an evaluation lost: its fine-tune runs again (the chain's default recipe, then steps-x5 continues it)
    person = Runner(cfg).subjects[0]
    (moved / "stages" / f"eval-{Runner.people_tag('full', 0.0, 0, person, 'steps-x5')}.done.json").unlink()
    third = Runner(ExperimentConfig(**{**cfg.__dict__, "out": str(moved)})).run()
    stem = "full-0-s0-people-" + person.replace(" ", "_")
    assert [Path(p).name for p in trained] == [stem, stem + "-steps-x5"]
    assert third == rows


def test_a_model_is_loaded_once_while_evaluated_and_again_once_replaced(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import torch
    from freezeasguard.experiment import loaded_model
    folder = tmp_path / "ft"
    (folder / "unet").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    loads = []
    monkeypatch.setattr(loaded_model, "load_pipeline", lambda path: loads.append(path) or object())
    runner = Runner(ExperimentConfig(out=str(tmp_path / "run")))
    first = runner.loaded.get(folder)
    assert runner.loaded.get(folder) is first and len(loads) == 1
    # a new fine-tune replaces the folder: other bytes, so it is loaded again
    save_file({"w": torch.ones(3)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert loaded_model.model_key(folder) != (str(folder.resolve()),) and runner.loaded.get(folder) is not first
    assert len(loads) == 2


@pytest.mark.slow
def test_the_held_out_loss_is_the_same_from_a_loaded_pipeline(tmp_path):
    from freezeasguard.experiment.heldout import heldout_loss
    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    from freezeasguard.models.generate import load_pipeline
    from freezeasguard.synthetic import TINY_SD
    world = SyntheticWorld(0)
    subject = world.subjects(1)[0]
    fresh = heldout_loss(TINY_SD, world, subject, 0, tmp_path, draws=1)
    assert heldout_loss(TINY_SD, world, subject, 0, tmp_path, draws=1, pipe=load_pipeline(TINY_SD)) == fresh


def test_held_out_renders_of_another_count_get_their_own_folder(tmp_path):
    from freezeasguard.experiment.heldout import HELDOUT_IMAGES, heldout_data
    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    world = SyntheticWorld(0)
    subject = world.subjects(1)[0]
    full, few = heldout_data(world, subject, tmp_path), heldout_data(world, subject, tmp_path, 4)
    # the default count keeps its old folder name: a resumed run finds the renders it measured
    assert full.name == f"heldout-{subject}".replace(" ", "_") and few != full
    rows = lambda p: len((p / "metadata.jsonl").read_text().splitlines())  # noqa: E731
    assert rows(full) == HELDOUT_IMAGES and rows(few) == 4


def test_held_out_settings_must_be_positive(tmp_path):
    for name in ("heldout_images", "heldout_draws"):
        with pytest.raises(ValueError, match=name):
            ExperimentConfig(out=str(tmp_path / "run"), **{name: 0})


def test_fine_tunes_start_from_private_copies_of_a_model_read_once(monkeypatch):
    import torch
    from freezeasguard.experiment import loaded_model
    from freezeasguard.models.pipelines import load_model
    from freezeasguard.synthetic import TINY_SD
    reads = []
    monkeypatch.setattr(loaded_model, "load_model", lambda path: reads.append(path) or load_model(path))
    starting = loaded_model.StartingModels()
    first = starting.copy_of(TINY_SD)
    with torch.no_grad():        # a fine-tune trains its copy in place
        for p in first.denoiser.parameters():
            p.add_(1.0)
    second, fresh = starting.copy_of(TINY_SD), load_model(TINY_SD)
    assert len(reads) == 1 and second.denoiser is not first.denoiser
    # the next copy holds the folder's weights, not the trained ones
    for (name, a), b in zip(second.denoiser.state_dict().items(), fresh.denoiser.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.tokenizer("a photo").input_ids == fresh.tokenizer("a photo").input_ids
    # a model larger than the budget is read by the fine-tune itself
    assert loaded_model.StartingModels(keep_bytes=1).copy_of(TINY_SD) is None


def test_an_assembled_pipeline_holds_each_folders_own_weights(tmp_path):
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    from freezeasguard.experiment.loaded_model import LoadedModel
    from freezeasguard.models.generate import load_pipeline
    from freezeasguard.synthetic import TINY_SD

    def variant(name, part):     # the base with one part's weights changed, as a fine-tune leaves it
        folder = tmp_path / name
        shutil.copytree(TINY_SD, folder)
        path = next((folder / part).glob("*.safetensors"))
        save_file({k: v * 1.5 for k, v in load_file(str(path)).items()}, str(path))
        return folder

    tuned, new_encoder = variant("tuned", "unet"), variant("enc", "text_encoder")
    loaded = LoadedModel()
    base_vae = loaded.get(TINY_SD).vae
    for folder in (tuned, new_encoder, TINY_SD):
        pipe, fresh = loaded.get(folder), load_pipeline(folder)
        for part in ("unet", "text_encoder", "vae"):
            mine, theirs = getattr(pipe, part).state_dict(), getattr(fresh, part).state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), (folder, part)
        # parts whose files are the base's are shared, not read again
        assert pipe.vae is base_vae


def test_counts_are_whole_numbers_in_the_table_with_the_range_where_seeds_differ():
    from freezeasguard.experiment.report import count_cell, summarise
    rows = [{"method": "learned", "ratio": 0.3, "attack": "default", "domain": "people", "metric": "frozen_tensors",
             "value": v} for v in (602.0, 589.0, 601.0)]
    s = summarise(rows)[0]
    assert (s["min"], s["max"], s["n"]) == (589.0, 602.0, 3)
    assert count_cell(s) == "589-602"
    assert count_cell(summarise(rows[:1])[0]) == "602"
