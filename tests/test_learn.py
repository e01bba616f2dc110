"""Mask learning on the tiny SD-layout pipeline: exact ratio, resume, multi-process."""

import pytest
import torch

from freezeasguard import LearnConfig, Mask, learn_mask


def _cfg(**kw):
    base = dict(ratio=0.3, mask_steps=4, inner_steps=2, mask_batch=2, user_lr=1e-3, seed=0, device="cpu",
                checkpoint_every=1)
    base.update(kw)
    return LearnConfig(**base)


def test_learned_mask_hits_the_ratio_and_records_its_settings(tiny_sd, people, logos, warm_start, tmp_path):
    r = learn_mask(tiny_sd, people, [logos], tmp_path / "m.safetensors", _cfg(mask_steps=2), finetuned_dir=warm_start)
    mask = Mask.load(tmp_path / "m.safetensors")
    assert int(mask.frozen.sum()) == round(0.3 * 686)
    assert mask.meta["hyperparameters"]["temperature"] == 0.2 and mask.meta["method"] == "learned"
    assert torch.equal(mask.logits, r.mask.logits)
    assert len(r.history) == 2 and {"upper_illegal", "upper_innocent", "soft_ratio", "hard_ratio",
                                    "data_grad_rms", "sparsity_grad_rms"} <= set(r.history[0])
    # the logits moved away from their start (the same run with no update), each by its own amount
    start = learn_mask(tiny_sd, people, [logos], tmp_path / "s.safetensors", _cfg(mask_steps=0),
                       finetuned_dir=warm_start, work_dir=tmp_path / "sw").mask.logits
    moved = (mask.logits - start).abs()
    assert float(moved.min()) > 0 and float(moved.std()) > 0.1 * float(moved.mean())
    p = learn_mask(tiny_sd, people, [logos], tmp_path / "p.safetensors", _cfg(mask_steps=1, budget="params"),
                   finetuned_dir=warm_start, work_dir=tmp_path / "pw")
    assert 0.29 < p.mask.param_fraction <= 0.3


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_mask_bit_exactly(tiny_sd, people, logos, warm_start, tmp_path,
                                                            kill_mask_learning_at):
    whole = learn_mask(tiny_sd, people, [logos], tmp_path / "a.safetensors", _cfg(), finetuned_dir=warm_start)
    calls = kill_mask_learning_at(3)
    with pytest.raises(KeyboardInterrupt):
        learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(), finetuned_dir=warm_start)
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(), finetuned_dir=warm_start)
    with pytest.raises(ValueError, match="differ in: settings"):
        learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(user_lr=1e-2),
                   finetuned_dir=warm_start, resume=True)
    resumed = learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(), finetuned_dir=warm_start,
                         resume=True)
    assert calls["n"] == 3 + 2                      # updates 3 and 4 only
    assert torch.equal(resumed.mask.logits, whole.mask.logits)
    assert torch.equal(resumed.mask.frozen, whole.mask.frozen)


@pytest.mark.slow
def test_two_processes_give_the_mask_of_one_with_the_same_global_batch(tiny_sd, people, logos, warm_start,
                                                                      tmp_path, run_cli):
    args = ["learn", "--model", str(tiny_sd), "--illegal", str(people), "--innocent", str(logos),
            "--finetuned", str(warm_start), "--steps", "3", "--inner-steps", "2", "--batch-size", "4",
            "--user-lr", "1e-3", "--device", "cpu"]
    run_cli([*args, "--out", str(tmp_path / "one.safetensors")])
    run_cli([*args, "--out", str(tmp_path / "two.safetensors")], processes=2)
    a, b = Mask.load(tmp_path / "one.safetensors"), Mask.load(tmp_path / "two.safetensors")
    assert torch.equal(a.frozen, b.frozen)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    assert int(a.frozen.sum()) == round(0.3 * 686)


def test_saliency_start_ranks_logits_by_an_independent_gradient_computation(tiny_sd, people, logos, warm_start,
                                                                             tmp_path):
    """--init-from saliency: with no mask update the logits are the start, in the order of each
    tensor's illegal-gradient RMS at the warm start, as saliency's own gradient_norms computes it."""
    from freezeasguard.training.batches import Domain, DomainMix
    from freezeasguard.training.data import EncodedData, load_image_captions
    from freezeasguard.training.diffusion import NoiseSchedule
    from freezeasguard.methods.saliency import gradient_norms
    from freezeasguard.models.pipelines import load_model
    cfg = _cfg(mask_steps=0, budget="params", init_from="saliency", init_logit_low=-3.0, init_logit_high=-1.0,
               init_batches=2)
    r = learn_mask(tiny_sd, people, [logos], tmp_path / "s.safetensors", cfg, finetuned_dir=warm_start)
    comps = load_model(tiny_sd, denoiser_from=warm_start)
    schedule = NoiseSchedule.for_components(comps)
    mix = DomainMix([Domain("illegal", EncodedData(load_image_captions(people), comps, "cpu"), cfg.mask_batch,
                            cfg.lambda_illegal)], schedule, cfg.seed + 2)
    norms = gradient_norms(comps.denoiser, mix, schedule, 2, "cpu").double()
    rms = norms / torch.tensor([p.numel() for p in comps.denoiser.parameters()]).double().sqrt()
    # the same order up to float32 rounding of near-equal gradients: rank correlation and the top 100 as sets
    rank_a, rank_b = rms.argsort().argsort().double(), r.mask.logits.double().argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1] > 0.999
    assert set(rms.argsort()[-100:].tolist()) == set(r.mask.logits.argsort()[-100:].tolist())
    assert abs(float(r.mask.logits.min()) / 0.2 + 3.0) < 1e-5 and abs(float(r.mask.logits.max()) / 0.2 + 1.0) < 1e-5


@pytest.mark.slow
def test_parameter_budget_learning_counts_parameters_and_fills_by_knapsack(tiny_sd, people, logos, warm_start,
                                                                           tmp_path):
    from freezeasguard.guard.bilevel import frozen_share, soft_mask
    from freezeasguard.guard.mask import knapsack_select
    r = learn_mask(tiny_sd, people, [logos], tmp_path / "k.safetensors", _cfg(mask_steps=3, budget="params"),
                   finetuned_dir=warm_start)
    assert r.mask.meta["selection"] == "knapsack" and 0.29 < r.mask.param_fraction <= 0.3
    m = soft_mask(r.mask.logits.double(), 0.2)
    assert torch.equal(r.mask.frozen, knapsack_select(m, r.mask.numel, round(0.3 * sum(r.mask.numel))))
    sizes = torch.tensor(r.mask.numel)
    assert abs(r.history[-1]["soft_param_share"] - float(frozen_share(m, sizes))) < 1e-6
    paper = learn_mask(tiny_sd, people, [logos], tmp_path / "g.safetensors",
                       _cfg(mask_steps=3, budget="params", sparsity_counts="tensors", selection="greedy"),
                       finetuned_dir=warm_start, work_dir=tmp_path / "gw")
    assert paper.mask.meta["selection"] == "greedy" and not torch.equal(paper.mask.frozen, r.mask.frozen)
