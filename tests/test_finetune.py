"""Guarded fine-tuning: enforcement, gradient accumulation, resume, both prediction types."""
import pytest
import torch

from freezeasguard import EnforcementError, FinetuneConfig, Mask, guarded_finetune
from freezeasguard.training.finetune import check_frozen_unchanged
from freezeasguard.models.pipelines import load_denoiser_state


def _cfg(**kw):
    base = dict(steps=2, batch_size=2, lr=1e-3, weight_decay=0.1, device="cpu", checkpoint_every=0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_frozen_tensors_stay_bit_identical_and_every_trainable_one_moves(tiny_sd, people, tmp_path):
    from freezeasguard.models.pipelines import load_model
    unet = load_model(tiny_sd).denoiser
    named = list(unet.named_parameters())
    mask = Mask.random(named, 0.3, seed=5)
    out = tmp_path / "ft"
    result = guarded_finetune(tiny_sd, people, out, _cfg(), mask=mask)
    assert result.frozen_tensors == 206
    base, tuned = load_denoiser_state(tiny_sd), load_denoiser_state(out)
    frozen = set(mask.frozen_names)
    for name in base:
        same = torch.equal(base[name].view(torch.uint8), tuned[name].view(torch.uint8))
        assert same == (name in frozen), name       # frozen: same bytes; trainable: moved (AdamW + decay)
    import json
    manifest = json.loads((out / "freezeasguard_manifest.json").read_text())
    assert manifest["scheme"] == "mask" and len(manifest["frozen_tensor_hashes"]) == 206


def test_pipeline_output_loads_with_from_pretrained(tiny_sd, people, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "ft"
    guarded_finetune(tiny_sd, people, out, _cfg(steps=1), random_ratio=0.5)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    # what from_pretrained loads is the fine-tuned denoiser, and the other parts are the base's
    tuned, base = load_denoiser_state(out), load_denoiser_state(tiny_sd)
    loaded = dict(pipe.unet.named_parameters())
    assert all(torch.equal(loaded[n].detach(), tuned[n]) for n in tuned)
    assert any(not torch.equal(tuned[n], base[n]) for n in tuned)
    from freezeasguard.models.pipelines import load_model
    base_vae = load_model(tiny_sd).vae.state_dict()
    assert all(torch.equal(v, base_vae[k]) for k, v in pipe.vae.state_dict().items())


def test_a_moved_frozen_tensor_fails_the_run():
    unet = torch.nn.Linear(2, 2)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        unet.bias[0] = torch.nextafter(unet.bias[0], torch.tensor(1e9))
    check_frozen_unchanged(unet, base, ["weight"])
    with pytest.raises(EnforcementError, match="1 frozen tensors changed"):
        check_frozen_unchanged(unet, base, ["weight", "bias"])


def test_gradient_accumulation_equals_one_big_batch(tiny_sd, people, tmp_path, monkeypatch):
    import freezeasguard.training.train as ft
    # plain SGD makes the update -lr * gradient, so the comparison is of gradients (Adam's first
    # step is lr * sign(g) and would hide or exaggerate differences)
    monkeypatch.setattr(ft, "build_optimizer",
                        lambda unet, cfg: torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=1.0))
    a = guarded_finetune(tiny_sd, people, tmp_path / "a", _cfg(steps=1, batch_size=4, grad_accum=1,
                                                               max_grad_norm=0), full=True)
    b = guarded_finetune(tiny_sd, people, tmp_path / "b", _cfg(steps=1, batch_size=4, grad_accum=4,
                                                               max_grad_norm=0), full=True)
    sa, sb = load_denoiser_state(a.out_dir), load_denoiser_state(b.out_dir)
    base = load_denoiser_state(tiny_sd)
    for n in sa:
        torch.testing.assert_close(sa[n] - base[n], sb[n] - base[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", *(pytest.param(o, marks=pytest.mark.slow)
                                                   for o in ("sgd", "adafactor", "prodigy"))])
def test_resume_continues_bit_exactly(tiny_sd, people, tmp_path, optimizer):
    # every optimizer's state (AdamW's moments, SGD's momentum, Adafactor's factored moments and
    # integer step, Prodigy's per-group step-size estimate) must come back from the checkpoint
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    n = 8 if optimizer == "prodigy" else 4       # Prodigy's estimate starts moving after a few steps
    full = guarded_finetune(tiny_sd, people, tmp_path / "full", _cfg(steps=n, optimizer=optimizer, lr=lr),
                            random_ratio=0.3)
    half = _cfg(steps=n // 2, checkpoint_every=n // 2, optimizer=optimizer, lr=lr)
    guarded_finetune(tiny_sd, people, tmp_path / "part", half, random_ratio=0.3)
    resumed = guarded_finetune(tiny_sd, people, tmp_path / "part", _cfg(steps=n, checkpoint_every=n // 2,
                                                                        optimizer=optimizer, lr=lr),
                               random_ratio=0.3, resume=True)
    assert len(resumed.history) == n // 2             # only the second half ran
    sf, sr = load_denoiser_state(full.out_dir), load_denoiser_state(resumed.out_dir)
    assert all(torch.equal(sf[n], sr[n]) for n in sf)


def test_prior_preservation_adds_the_weighted_prior_loss(tiny_sd, people, logos, tmp_path, monkeypatch):
    """DreamBooth's loss is data mean + w * prior mean: with plain SGD at lr 1 the update is minus
    the gradient, linear in w, so update(w=2) - update(w=0) = 2 (update(w=1) - update(w=0))."""
    import freezeasguard.training.train as ft
    monkeypatch.setattr(ft, "build_optimizer",
                        lambda unet, cfg: torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=1.0))
    base = load_denoiser_state(tiny_sd)
    deltas = []
    for w in (0.0, 1.0, 2.0):
        r = guarded_finetune(tiny_sd, people, tmp_path / f"w{w}", _cfg(steps=1, max_grad_norm=0, prior_weight=w,
                                                                       weight_decay=0), full=True, prior_data=logos)
        assert "loss_prior" in r.history[0]
        tuned = load_denoiser_state(r.out_dir)
        deltas.append({n: tuned[n] - base[n] for n in base})
    moved = 0
    for n in base:
        torch.testing.assert_close(deltas[2][n] - deltas[0][n], 2 * (deltas[1][n] - deltas[0][n]), rtol=1e-3, atol=1e-6)
        moved += int(not torch.allclose(deltas[1][n], deltas[0][n]))
    assert moved > 100                                   # the prior term changes the update


def test_v_prediction_model_trains(tiny_sd_v, people, tmp_path):
    r = guarded_finetune(tiny_sd_v, people, tmp_path / "v", _cfg(steps=15, batch_size=4, lr=3e-3), full=True)
    first, last = r.history[0]["loss_data"], sum(h["loss_data"] for h in r.history[-5:]) / 5
    assert last < first


def test_scheme_must_be_chosen_once(tiny_sd, people, tmp_path):
    with pytest.raises(ValueError, match="exactly one freezing scheme"):
        guarded_finetune(tiny_sd, people, tmp_path / "x", _cfg(), random_ratio=0.3, full=True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        guarded_finetune(tiny_sd, people, tmp_path / "x", _cfg(), random_ratio=1.5)


def test_optimizer_is_adamw_over_trainable_tensors_matching_the_reference_loop():
    """build_optimizer's (fused) AdamW must take the steps of torch's plain per-tensor AdamW with
    the config's lr and weight decay, and hold no state for a frozen tensor."""
    from freezeasguard.training.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m[0].weight.requires_grad_(False)
    cfg = FinetuneConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2,
                                weight_decay=0.1, foreach=False)
    frozen_before, trained_before = model[0].weight.clone(), model[1].weight.clone()
    for step in range(5):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.equal(model[0].weight, frozen_before)
    assert model[0].weight not in opt.state and len(opt.state) == 3
    assert not torch.equal(model[1].weight, trained_before)
