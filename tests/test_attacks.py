"""The illegal user's recipes: each runs on the tiny pipeline within the mask, and the sweep's
worst-case aggregation picks what an attacker would pick."""
import pytest
import torch
from safetensors.torch import load_file

from freezeasguard import Mask, guarded_finetune
from freezeasguard.attacks import BUILTIN_ATTACKS, SWEEP_ATTACKS, Attack, resolve_attack
from freezeasguard.attacks.sweep import illegal_metrics, worst_case
from freezeasguard.experiment.config import ExperimentConfig
from freezeasguard.models.pipelines import load_denoiser_state


@pytest.fixture(scope="module")
def mask(tiny_sd):
    state = load_denoiser_state(tiny_sd)
    return Mask.random(list(state.items()), 0.5, seed=11)


@pytest.mark.parametrize("name", list(BUILTIN_ATTACKS))
def test_every_builtin_attack_trains_and_respects_the_mask(name, tiny_sd, people, logos, mask, tmp_path):
    attack = BUILTIN_ATTACKS[name]
    cfg = attack.finetune_config(lr=1e-4, steps=2, batch=2, seed=0, device="cpu", checkpoint_every=0)
    out = tmp_path / "ft"
    r = guarded_finetune(tiny_sd, people, out, cfg, mask=mask, lora=attack.lora(), lora_as_attacker=True,
                         prior_data=logos if attack.prior_weight else None)
    assert len(r.history) == cfg.steps
    if attack.prior_weight:
        assert all("loss_prior" in h for h in r.history)
    base = load_denoiser_state(tiny_sd)
    frozen = set(mask.frozen_names)
    if attack.lora_rank:
        adapter = load_file(str(out / "pytorch_lora_weights.safetensors"))
        touched = {k[5:].split(".lora_")[0] + ".weight" for k in adapter}
        assert touched and not touched & frozen
        if attack.lora_targets:             # the targeted recipe stays on the up blocks' cross-attention
            assert all(".attn2." in t and t.startswith("up_blocks.") for t in touched)
    else:
        tuned = load_denoiser_state(out)
        assert all(torch.equal(tuned[n], base[n]) for n in frozen)       # frozen tensors byte-identical
        assert any(not torch.equal(tuned[n], base[n]) for n in base if n not in frozen)   # it trained


def test_recipe_settings_follow_the_experiments_users():
    a = Attack("x", optimizer="sgd", lr_factor=100, steps_factor=5, batch_factor=2, data_factor=4)
    cfg = a.finetune_config(lr=1e-5, steps=200, batch=4, seed=3)
    assert (cfg.optimizer, cfg.steps, cfg.batch_size, cfg.seed) == ("sgd", 1000, 8, 3)
    assert cfg.lr == pytest.approx(1e-3)
    assert a.images(48) == 192 and a.cost() == 10
    assert Attack("p", optimizer="prodigy", lr=1.0).finetune_config(1e-5, 10, 4, 0).lr == 1.0
    assert Attack("db", prior_weight=1.0).cost() == 2       # a prior batch beside every batch
    assert BUILTIN_ATTACKS["lora-128"].lora().rank == 128   # capped at the modules' size only when applied
    assert set(SWEEP_ATTACKS) <= set(BUILTIN_ATTACKS)


def test_a_rank_above_the_modules_size_is_capped_for_an_attacker(tiny_sd, mask):
    from freezeasguard.training.lora import LoraSettings, attacker_targets
    from freezeasguard.models.pipelines import load_model
    unet = load_model(tiny_sd).denoiser
    targets, used = attacker_targets(unet, mask, LoraSettings(rank=10_000))
    modules = dict(unet.named_modules())
    assert used.rank == min(min(modules[t].weight.shape) for t in targets)
    assert not {f"{t}.weight" for t in targets} & set(mask.frozen_names)


def test_unknown_attacks_and_recipe_keys_are_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match="neither built in"):
        resolve_attack("lr-x1000")
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_attack("mine", {"mine": {"learning_rate": 1}})
    assert resolve_attack("mine", {"mine": {"optimizer": "sgd", "lr_factor": 50}}).lr_factor == 50
    with pytest.raises(ValueError, match="optimizer"):
        ExperimentConfig(attacks=["bad"], attack_recipes={"bad": {"optimizer": "lion"}})
    path = tmp_path / "c.yaml"
    path.write_text("attacks: [default, nope]\n")
    with pytest.raises(ValueError, match="nope"):
        ExperimentConfig.from_yaml(path)


def _cell(method, attack, mean, metric="identity_recognition", domain="people", ratio=0.3):
    return {"method": method, "ratio": 0.0 if method in ("full", "pretrained") else ratio, "attack": attack,
            "domain": domain, "metric": metric, "mean": mean, "std": 0.01, "n": 3}


def test_worst_case_is_the_attackers_best_recipe_and_breaks_are_judged_against_full_ft_default():
    summary = [
        _cell("pretrained", "default", 0.0),
        _cell("full", "default", 0.50), _cell("full", "lr-x10", 0.70), _cell("full", "lora", 0.40),
        _cell("learned", "default", 0.10), _cell("learned", "lr-x10", 0.55), _cell("learned", "lora", 0.50),
        _cell("random", "default", 0.30), _cell("random", "lr-x10", 0.45), _cell("random", "lora", 0.20),
        _cell("learned", "default", 0.9, "prompt_accuracy", "logos"),
        _cell("learned", "default", 0.7, "prompt_accuracy", "clothes"),
    ]
    assert illegal_metrics(summary) == [("identity_recognition", 1)]
    rows = {r["method"]: r for r in worst_case(summary, "identity_recognition", 1, {"default": 1, "lr-x10": 1,
                                                                                    "lora": 0.5},
                                               "prompt_accuracy")}
    assert set(rows) == {"full", "learned", "random"}                      # the untouched model is no method
    assert (rows["full"]["worst"], rows["full"]["worst_attack"]) == (0.70, "lr-x10")
    assert rows["full"]["broken_by"] == []                                  # Full FT protects nothing to break
    assert (rows["learned"]["default"], rows["learned"]["worst"]) == (0.10, 0.55)
    assert rows["learned"]["broken_by"] == ["lr-x10", "lora"]              # both reach Full FT's default 0.50
    assert (rows["learned"]["cheapest_break"], rows["learned"]["cheapest_break_cost"]) == ("lora", 0.5)
    assert rows["learned"]["innocent_default"] == pytest.approx(0.8)       # mean over the innocent domains
    assert rows["learned"]["innocent_under_worst"] is None                 # innocent users ran no attack
    assert rows["random"]["broken_by"] == [] and rows["random"]["cheapest_break"] is None


def test_nothing_breaks_when_full_ft_forges_no_more_than_the_untouched_model():
    summary = [_cell("pretrained", "default", 0.1), _cell("full", "default", 0.1), _cell("learned", "default", 0.1),
               _cell("learned", "lr-x10", 0.3)]
    learned = worst_case(summary, "identity_recognition", 1, {"default": 1, "lr-x10": 1})[1]
    assert learned["broken_by"] is None and learned["cheapest_break"] is None
    assert (learned["worst"], learned["worst_attack"]) == (0.3, "lr-x10")


def test_for_a_lower_is_better_forgery_metric_the_worst_case_is_the_minimum():
    summary = [_cell("full", "default", 100.0, "fid"), _cell("learned", "default", 150.0, "fid"),
               _cell("learned", "steps", 90.0, "fid"), _cell("learned", "sgd", 120.0, "fid")]
    assert illegal_metrics(summary) == [("fid", -1)]
    (full, learned) = worst_case(summary, "fid", -1, {"default": 1, "steps": 5, "sgd": 1})
    assert (learned["worst"], learned["worst_attack"], learned["broken_by"]) == (90.0, "steps", ["steps"])
    assert learned["cheapest_break_cost"] == 5


def test_a_sweep_without_the_default_recipe_still_writes_its_summary(tmp_path):
    """An experiment that only runs other recipes (attacks: [dreambooth]) has no default cell: "–"."""
    import types

    from freezeasguard.attacks.sweep import write_attack_sweep

    def cell(method, attack, mean):
        return {"method": method, "ratio": 0.0 if method == "full" else 0.3, "attack": attack, "domain": "people",
                "metric": "identity_recognition", "mean": mean, "std": 0.0, "n": 1}
    cfg = types.SimpleNamespace(attacks=["dreambooth"], seeds=[0], budget="params", attack_recipes={}, methods=[],
                                innocent=[])
    write_attack_sweep(tmp_path, [cell("full", "dreambooth", 1.0), cell("learned", "dreambooth", 0.25)], cfg)
    summary = (tmp_path / "attack_sweep_summary.md").read_text()
    assert "– → 0.25 (dreambooth)" in summary and "– → 1 (dreambooth)" in summary


def test_only_a_longer_run_of_the_same_recipe_continues_it():
    from freezeasguard.attacks import continues, recipe_chains
    steps5, default = BUILTIN_ATTACKS["steps-x5"], BUILTIN_ATTACKS["default"]
    assert continues(steps5, default) and not continues(default, steps5)
    assert not continues(steps5, BUILTIN_ATTACKS["lr-x10"])             # another learning rate
    assert not continues(Attack("x", steps_factor=5, data_factor=2), default)  # other data
    assert not continues(default, default)
    assert recipe_chains(["default", "lr-x10", "steps-x5", "lora-32"]) == [("default", "steps-x5"), ("lr-x10",),
                                                                          ("lora-32",)]
    assert recipe_chains(["steps-x5", "lr-x10", "steps-x2", "default"]) == [("default", "steps-x2", "steps-x5"),
                                                                          ("lr-x10",)]
    # a LoRA run lengthened continues the LoRA run, not the full fine-tune
    recipes = {"lora-32-long": {"lora_rank": 32, "lr_factor": 10, "steps_factor": 3}}
    assert recipe_chains(["default", "lora-32", "lora-32-long"], recipes) == [("default",), ("lora-32", "lora-32-long")]
    # a recipe equal to another but for its name runs on its own (nothing longer to continue)
    twin = {"five": {"steps_factor": 5}}
    assert recipe_chains(["default", "steps-x5", "five"], twin) == [("default", "steps-x5"), ("five",)]


@pytest.mark.slow
def test_a_longer_run_started_from_the_shorter_ones_checkpoint_is_bit_identical(tiny_sd, people, mask, tmp_path):
    from freezeasguard.experiment.jobs import start_from_checkpoint
    short, long_ = BUILTIN_ATTACKS["default"], BUILTIN_ATTACKS["steps-x2"]
    kw = dict(lr=1e-3, steps=3, batch=2, seed=5, device="cpu", checkpoint_every=2)   # the shorter run's last checkpoint: step 2
    guarded_finetune(tiny_sd, people, tmp_path / "short", short.finetune_config(**kw), mask=mask)
    start_from_checkpoint(tmp_path / "short", tmp_path / "long")
    continued = guarded_finetune(tiny_sd, people, tmp_path / "long", long_.finetune_config(**kw), mask=mask, resume=True)
    alone = guarded_finetune(tiny_sd, people, tmp_path / "alone", long_.finetune_config(**kw), mask=mask)
    assert len(continued.history) == 6 - 2 and len(alone.history) == 6   # it did start from step 2
    assert continued.history == alone.history[2:]
    a, b = load_denoiser_state(tmp_path / "long"), load_denoiser_state(tmp_path / "alone")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the shorter run of another learning rate is refused, naming what differs
    start_from_checkpoint(tmp_path / "short", tmp_path / "other")
    with pytest.raises(Exception, match="settings"):
        guarded_finetune(tiny_sd, people, tmp_path / "other", BUILTIN_ATTACKS["lr-x10"].finetune_config(**kw), mask=mask,
                         resume=True)
