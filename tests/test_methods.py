"""Protection methods: the registry and chains, UCE's closed form, IMMA's immunisation, saliency."""
import json

import pytest
import torch

from freezeasguard.methods import METHODS, ProtectSettings, parse_chain, protect
from freezeasguard.methods.imma import adapted_loss, immunize, target_modules
from freezeasguard.methods.saliency import tensor_scores
from freezeasguard.methods.uce import apply_uce, concept_embeddings, uce_closed_form, uce_objective


def test_registry_and_chains():
    assert {"full", "random", "learned", "saliency", "uce", "imma"} <= set(METHODS)
    assert [m.name for m in parse_chain("uce+learned")] == ["uce", "learned"]
    with pytest.raises(ValueError, match="registered"):
        parse_chain("uce+nope")
    with pytest.raises(ValueError, match="at most one freezing"):
        parse_chain("random+learned")
    with pytest.raises(ValueError, match="does not chain"):
        parse_chain("full+uce")


def test_uce_closed_form_is_the_minimiser():
    """Zero gradient of the objective at the closed form (autograd), and a higher objective nearby."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    e, t, p = (torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64),
               torch.randn(4, 10, generator=g, dtype=torch.float64))
    new = uce_closed_form(w, e, t, p, erase_scale=2.0, preserve_scale=0.7, lam=0.3).requires_grad_(True)
    obj = uce_objective(new, w, e, t, p, 2.0, 0.7, 0.3)
    (grad,) = torch.autograd.grad(obj, new)
    assert grad.abs().max() < 1e-9
    nudged = uce_objective(new.detach() + 1e-3 * torch.randn(6, 10, generator=g, dtype=torch.float64), w, e, t, p,
                           2.0, 0.7, 0.3)
    assert nudged > obj


def test_uce_maps_erased_to_targets_and_keeps_preserved():
    """With fewer constraints than input dimensions and a small lambda, both hold exactly."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    e, t, p = (torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64),
               torch.randn(5, 16, generator=g, dtype=torch.float64))
    new = uce_closed_form(w, e, t, p, lam=1e-9)
    torch.testing.assert_close(e @ new.T, t, rtol=0, atol=1e-6)
    torch.testing.assert_close(p @ new.T, p @ w.T, rtol=0, atol=1e-6)
    assert (e @ w.T - t).abs().max() > 0.5   # the edit did something


def _kv(comps):
    return {n: m.weight.detach().clone() for n, m in comps.denoiser.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))}


def test_uce_on_the_tiny_pipeline(tiny_sd):
    """Erasing alone: the edited K/V projections send the name's tokens as close to the guide's
    outputs as any matrix can (the least-squares residual, by torch.linalg.lstsq: the tail has
    more tokens than the text width, so no exact fit exists); 32 projections, nothing else touched. With a preserved prompt: its outputs move far
    less than when it is not preserved (the tail tokens of different prompts overlap, so erasing
    and preserving compete; the maths of the exact case is tested above)."""
    from freezeasguard.models.pipelines import load_model
    erase, guide, keep = ["mara quell"], "a person", ["a red circle logo"]
    comps = load_model(tiny_sd)
    old = _kv(comps)
    other = {n: p.detach().clone() for n, p in comps.denoiser.named_parameters()}
    edited = apply_uce(comps, erase, guide, [], lam=1e-6)
    assert set(edited) == set(old) and len(edited) == 32
    e, gd, p = concept_embeddings(comps, erase, guide, keep)
    new = _kv(comps)
    drift_unpreserved = 0.0
    for name, w_old in old.items():
        target = gd @ w_old.T
        before = (e @ w_old.T - target).norm() / target.norm()
        after = (e @ new[name].T - target).norm() / target.norm()
        best = e.double() @ torch.linalg.lstsq(e.double(), target.double()).solution
        optimum = (best - target.double()).norm() / target.norm()
        assert before > 0.05 and after < 0.3 * before, (name, before, after)
        assert abs(after - optimum) < 0.03 * optimum + 1e-4, (name, after, optimum)
        drift_unpreserved += float((p @ (new[name] - w_old).T).norm() / (p @ w_old.T).norm())
    for n, t in comps.denoiser.named_parameters():
        if "attn2.to_k" not in n and "attn2.to_v" not in n:
            assert torch.equal(t.detach(), other[n]), n

    comps = load_model(tiny_sd)
    apply_uce(comps, erase, guide, keep, lam=1e-6)
    new = _kv(comps)
    drift_preserved = sum(float((p @ (new[n] - w).T).norm() / (p @ w.T).norm()) for n, w in old.items())
    assert drift_preserved < 0.5 * drift_unpreserved, (drift_preserved, drift_unpreserved)


def _loss_fn(comps, path, seed, batch=4):
    from freezeasguard.training.batches import Domain, DomainMix, weighted_loss
    from freezeasguard.training.data import EncodedData, load_image_captions
    from freezeasguard.training.diffusion import NoiseSchedule
    schedule = NoiseSchedule.from_scheduler_config(comps.scheduler_config)
    mix = DomainMix([Domain("d", EncodedData(load_image_captions(path), comps), batch, 1.0)], schedule, seed)
    return lambda: weighted_loss(comps.denoiser, mix.draw("cpu"), schedule)[0]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_imma_raises_the_adapted_loss(tiny_sd_v, people, kind):
    """After immunisation, the illegal loss after k adaptation steps (same attack, same batches)
    is higher than for the untouched model; the non-target tensors are byte-identical."""
    from freezeasguard.models.pipelines import load_model

    def measure(comps):
        modules = target_modules(comps.denoiser, r"attn2\.to_[kv]$")
        return adapted_loss(comps.denoiser, modules, _loss_fn(comps, people, 7), _loss_fn(comps, people, 8), steps=3,
                            lr=1e-2, kind=kind, seed=3)

    plain = load_model(tiny_sd_v)
    before_state = {n: p.detach().clone() for n, p in plain.denoiser.named_parameters()}
    baseline = measure(plain)
    comps = load_model(tiny_sd_v)
    modules = target_modules(comps.denoiser, r"attn2\.to_[kv]$")
    history = immunize(comps.denoiser, modules, _loss_fn(comps, people, 0), None, steps=12, inner_steps=2, inner_lr=1e-2,
                       lr=1e-2, kind=kind)
    assert len(history) == 12
    immunised = measure(comps)
    assert immunised > baseline * 1.05, (baseline, immunised)
    for n, p in comps.denoiser.named_parameters():
        changed = not torch.equal(p.detach(), before_state[n])
        assert changed == ("attn2.to_k" in n or "attn2.to_v" in n), n


def test_saliency_scores():
    ill = torch.tensor([4.0, 1.0, 3.0])
    inn = torch.tensor([0.0, 0.0, 4.0])
    assert torch.equal(tensor_scores(ill, None, [1, 1, 1], 0.0, False), ill.double())
    assert torch.argmax(tensor_scores(ill, inn, [1, 1, 1], 1.0, False)) == 0
    # normalising by sqrt(numel): a large tensor's big norm no longer wins
    norm = tensor_scores(torch.tensor([4.0, 1.0]), None, [16, 1], 0.0, True)
    assert torch.allclose(norm, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_protect_chain_uce_then_saliency(tiny_sd, people, logos, tmp_path):
    """A chain runs end to end: the mask is built on the UCE-edited model, whose fingerprint it
    carries; a second call reuses every finished link."""
    from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
    s = ProtectSettings(saliency_batches=2, mask_batch=2)
    p = protect("uce+saliency", tiny_sd, people, [logos], ["mara quell"], 0.3, tmp_path, s, device="cpu")
    assert p.model == tmp_path / "uce" / "model" and p.mask is not None
    assert p.mask.base_fingerprint == fingerprint(load_denoiser_state(p.model).items())
    assert p.mask.base_fingerprint != fingerprint(load_denoiser_state(tiny_sd).items())
    assert round(p.mask.tensor_ratio * 686) == round(0.3 * 686)
    manifest = json.loads((p.model / "freezeasguard_manifest.json").read_text())
    assert manifest["scheme"] == "uce" and manifest["erased"] == ["mara quell"]
    stamp = (tmp_path / "uce" / "done.json").stat().st_mtime_ns
    again = protect("uce+saliency", tiny_sd, people, [logos], ["mara quell"], 0.3, tmp_path, s, device="cpu")
    assert (tmp_path / "uce" / "done.json").stat().st_mtime_ns == stamp
    assert torch.equal(again.mask.frozen, p.mask.frozen)


@pytest.mark.parametrize("budget", ["tensors", "params"])
def test_largest_freezes_the_biggest_tensors_up_to_the_budget(tiny_sd, people, logos, tmp_path, budget):
    from freezeasguard.models.pipelines import load_denoiser_state
    prot = protect("largest", tiny_sd, people, [logos], [], 0.3, tmp_path / "p", ProtectSettings(budget=budget))
    sizes = {n: t.numel() for n, t in load_denoiser_state(tiny_sd).items()}
    frozen = set(prot.mask.frozen_names)
    free = [sizes[n] for n in sizes if n not in frozen]
    total = sum(sizes.values())
    if budget == "tensors":
        assert len(frozen) == round(0.3 * len(sizes))
        assert min(sizes[n] for n in frozen) >= max(free)          # no smaller tensor is frozen before a bigger one
    else:
        share = sum(sizes[n] for n in frozen) / total
        assert 0.3 - max(free) / total <= share <= 0.3   # filled up to the budget: no free tensor still fits
        assert all(s > (0.3 * total - sum(sizes[n] for n in frozen)) for s in free)
    # a protection the runner can use: random masks of the same budget get it too
    assert protect("random", tiny_sd, people, [logos], [], 0.3, tmp_path / "r",
                   ProtectSettings(budget=budget)).finetune_kwargs() == {"random_ratio": 0.3, "budget": budget}


def test_smallest_freezes_the_most_tensors_a_parameter_budget_buys(tiny_sd, people, logos, tmp_path):
    from freezeasguard.guard.mask import tensor_kind
    from freezeasguard.models.pipelines import load_denoiser_state
    prot = protect("smallest", tiny_sd, people, [logos], [], 0.3, tmp_path / "p", ProtectSettings(budget="params"))
    sizes = {n: t.numel() for n, t in load_denoiser_state(tiny_sd).items()}
    frozen = set(prot.mask.frozen_names)
    free = [sizes[n] for n in sizes if n not in frozen]
    assert max(sizes[n] for n in frozen) <= min(free)       # no larger tensor frozen before a smaller one
    assert all(n in frozen for n in sizes if tensor_kind(n) in ("bias", "norm"))
    assert sum(sizes[n] for n in frozen) <= 0.3 * sum(sizes.values()) < sum(sizes[n] for n in frozen) + min(free)


@pytest.mark.slow
def test_learned_masks_of_several_ratios_share_one_warm_start(tiny_sd, people, logos, tmp_path, monkeypatch):
    import freezeasguard.guard.learn as learn
    calls = []
    real = learn._warm_start
    monkeypatch.setattr(learn, "_warm_start", lambda *a, **k: (calls.append(a[5]), real(*a, **k))[1])
    s = ProtectSettings(warm_start_steps=2, mask_steps=1, inner_steps=1, mask_batch=2, warm_start_batch=2)
    a = protect("learned", tiny_sd, people, [logos], [], 0.3, tmp_path, s, device="cpu")
    b = protect("learned", tiny_sd, people, [logos], [], 0.5, tmp_path, s, device="cpu")
    c = protect("learned-identity", tiny_sd, people, [logos], [], 0.3, tmp_path, s, device="cpu")
    # made once, beside the methods' folders, where both ratios and the other objective read it
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0].name.startswith("warm-start-")
    assert int(a.mask.frozen.sum()) == round(0.3 * 686) and int(b.mask.frozen.sum()) == round(0.5 * 686)
    assert c.mask.meta["hyperparameters"]["objective"] == "identity" != a.mask.meta["hyperparameters"]["objective"]


def test_the_protection_seed_draws_another_release_and_zero_keeps_the_old_one(tiny_sd, people, logos, tmp_path):
    s0 = ProtectSettings(budget="params", saliency_batches=2, mask_batch=2)
    first = protect("saliency", tiny_sd, people, [logos], [], 0.3, tmp_path / "a", s0, device="cpu")
    again = protect("saliency", tiny_sd, people, [logos], [], 0.3, tmp_path / "b", s0, device="cpu")
    other = protect("saliency", tiny_sd, people, [logos], [], 0.3, tmp_path / "c",
                    ProtectSettings(budget="params", saliency_batches=2, mask_batch=2, protection_seed=1), device="cpu")
    assert torch.equal(first.mask.logits, again.mask.logits)          # a release is reproducible
    assert not torch.equal(first.mask.logits, other.mask.logits)      # another seed draws other batches


def test_the_learned_mask_takes_the_protection_seed_and_a_warm_start_of_its_own(tmp_path, monkeypatch):
    from freezeasguard.methods import basic
    from freezeasguard.methods.registry import MethodInputs, draw_seed
    seen = []

    def fake_learn(model, illegal, innocent, path, cfg, work_dir, resume, warm_start_dir):
        seen.append((cfg.seed, warm_start_dir))
        raise StopIteration
    monkeypatch.setattr(basic, "learn_mask", fake_learn)
    for seed in (0, 0, 3):
        inputs = MethodInputs(tmp_path / "base", tmp_path / "ill", [tmp_path / "inn"], [], 0.3, tmp_path / "learned",
                              ProtectSettings(protection_seed=seed))
        with pytest.raises(StopIteration):
            basic.learned(inputs)
    assert [s for s, _ in seen] == [0, 0, 3]
    assert seen[0][1] == seen[1][1] != seen[2][1]
    assert (draw_seed(ProtectSettings(), 0), draw_seed(ProtectSettings(), 1)) == (0, 1)   # the streams before it
    assert (draw_seed(ProtectSettings(protection_seed=3), 0), draw_seed(ProtectSettings(protection_seed=3), 1)) == (6, 7)
