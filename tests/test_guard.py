"""The guard's second design: the identity objective (what the name adds to the loss, scene and
pose cancelled by pairing) and the immunised release (the frozen tensors' values optimised)."""
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from freezeasguard import FinetuneConfig, Mask, MaskError, guarded_finetune, verify_checkpoint
from freezeasguard.guard.bilevel import BilevelState, remask_
from freezeasguard.guard.immunise import ImmuniseSettings, gap_hinge, immunise, loss_hinge
from freezeasguard.guard.learn import LearnConfig, _domains
from freezeasguard.guard.mask_updates import UpdateContext, upper_dots
from freezeasguard.methods import parse_chain, protect
from freezeasguard.methods.registry import ProtectSettings
from freezeasguard.models.families import FAMILIES
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state, load_model
from freezeasguard.training.batches import Domain, DomainMix, identity_loss, identity_terms
from freezeasguard.training.data import EncodedData, load_image_captions, neutral_caption
from freezeasguard.training.diffusion import NoiseSchedule

BACKGROUNDS = ["white", "blue", "yellow", "green"]     # toydata.make_people's walls


def test_neutral_caption_replaces_the_name_and_leaves_unnamed_captions_alone():
    assert neutral_caption("a photo of Sara Belfa smiling, in front of the sea", "Sara Belfa", "a person") == \
        "a photo of a person smiling, in front of the sea"
    assert neutral_caption("a Vellan scarf", "Vellan", "") == "a scarf"
    assert neutral_caption("a minimalist logo with two stars", None, "a person") is None
    assert neutral_caption("a photo of someone", "Sara Belfa", "a person") is None


def test_identity_terms_by_hand():
    named_loss = torch.tensor([0.5, 0.4, 0.3, 0.2])
    neutral_loss = torch.tensor([0.45, 0.1, 0.6, 9.0])
    named = torch.tensor([True, True, True, False])
    illegal = torch.tensor([True, False, True, True])
    # illegal named: the gap; innocent named: loss + gap; unnamed: the plain loss
    expected = torch.tensor([0.5 - 0.45, 0.4 + (0.4 - 0.1), 0.3 - 0.6, 0.2])
    torch.testing.assert_close(identity_terms(named_loss, neutral_loss, named, illegal), expected)


def test_gap_hinge_stops_pushing_once_the_name_adds_nothing():
    named = torch.tensor([0.30, 0.20], requires_grad=True)
    neutral = torch.tensor([0.10, 0.10])
    assert float(gap_hinge(named, neutral, 0.0).detach()) == 0.0          # named worse than neutral: done
    gap_hinge(named, neutral, 0.5).backward()                     # target above the gap: push
    torch.testing.assert_close(named.grad, torch.tensor([-0.5, -0.5]))
    assert float(loss_hinge(torch.tensor([0.2, 0.4]), 0.5)) == pytest.approx(0.2)
    assert float(loss_hinge(torch.tensor([0.6, 0.8]), 0.5)) == 0.0


def _paired_mix(tiny_sd, people, logos, comps, schedule, seed=0):
    ill = EncodedData(load_image_captions(people), comps, "cpu", "a person")
    inn = EncodedData(load_image_captions(logos), comps, "cpu", "")
    return DomainMix([Domain("illegal", ill, 3, 1.0), Domain("innocent", inn, 2, 0.5)], schedule, seed)


def test_identity_loss_pairs_each_named_caption_with_its_neutral_one_by_hand(tiny_sd, people, logos):
    comps = load_model(tiny_sd)
    schedule = NoiseSchedule.for_components(comps)
    batch = _paired_mix(tiny_sd, people, logos, comps, schedule).draw("cpu", sign=[-1.0, 1.0])
    encode = FAMILIES["sd"].encode
    named_of = {bg: encode(comps, [f"a photo of Mara Quell in front of a {bg} wall"])[0] for bg in BACKGROUNDS}
    neutral_of = {bg: encode(comps, [f"a photo of a person in front of a {bg} wall"])[0] for bg in BACKGROUNDS}
    assert batch.named.tolist() == [True, True, True, False, False]
    for i in range(3):       # the pair of sample i is the same wall without the name
        bg = next(b for b in BACKGROUNDS if torch.allclose(batch.text[i], named_of[b], atol=1e-5))
        torch.testing.assert_close(batch.neutral_text[i], neutral_of[bg], atol=1e-5, rtol=0)

    ours, _ = identity_loss(comps.denoiser, batch, schedule)
    # by hand: epsilon-prediction MSE at x_t = sqrt(a) x0 + sqrt(1-a) eps, under each conditioning
    a = DDPMScheduler.from_config(comps.scheduler_config).alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * batch.latents + (1 - a).sqrt() * batch.noise
    with torch.no_grad():
        def mse(text):
            pred = comps.denoiser(noisy, batch.timesteps, encoder_hidden_states=text).sample
            return ((pred - batch.noise) ** 2).mean(dim=(1, 2, 3))
        plain, neutral = mse(batch.text), mse(batch.neutral_text)
    values = torch.cat([plain[:3] - neutral[:3], plain[3:]])
    torch.testing.assert_close(ours.detach(), (values * batch.weights).sum(), rtol=1e-4, atol=1e-6)


class _Substituted(torch.nn.Module):
    """The model called with other parameter tensors (functions of the mask, for autograd)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.params, args, kwargs)


@pytest.mark.parametrize("objective", ["identity", "diffusion"])
def test_the_upper_steps_mask_gradient_equals_autograd(tiny_sd, people, logos, objective):
    """dL_upper/dm_i from upper_dots (<dL/dtheta(m)_i, theta_d_i>) against autograd of L_upper at
    theta(m) = theta_pre - (1 - m) theta_d, for the publisher's objective the config names."""
    comps = load_model(tiny_sd)
    unet, schedule = comps.denoiser, NoiseSchedule.for_components(comps)
    pre = {n: p.detach().clone() for n, p in unet.named_parameters()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():          # theta_ft: the warm start moved every tensor a little
            p.add_(1e-2 * p.abs().mean() * torch.randn_like(p))
    state = BilevelState(unet, pre, temperature=0.2)
    state.logits = 0.2 * torch.randn(len(state.params))
    with torch.no_grad():
        remask_(state.local, state.theta_d, torch.zeros_like(state.logits), state.m)
    cfg = LearnConfig(objective=objective, device="cpu")
    data = [load_image_captions(people), load_image_captions(logos)]
    mix = DomainMix(_domains(comps, "cpu", data[0], data[1:], 4, cfg, paired=objective == "identity"), schedule, 3)
    ctx = UpdateContext(mix, schedule, torch.device("cpu"), None, cfg, [n for n, _ in state.named])
    batch = ctx.upper_batch()
    dots, _ = upper_dots(state, ctx, [batch])

    m = state.m.clone().requires_grad_(True)
    theta_d = {n: d.detach().clone() for (n, _), d in zip(state.named, state.theta_d)}
    params = {n: pre[n] - (1 - m[i]) * theta_d[n] for i, (n, _) in enumerate(state.named)}
    loss, _ = ctx.upper_objective(_Substituted(unet, params), batch, schedule)
    (expected,) = torch.autograd.grad(loss, m)
    torch.testing.assert_close(dots.float(), expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))
    if objective == "identity":      # the objective changes the gradient (it is not the plain loss's)
        plain = ctx.loss(state, batch)[0]
        state.zero_grad()
        plain.backward()
        assert not torch.allclose(state.tensor_dots().cpu().float(), expected, rtol=0.1)


def _largest_mask(model_dir, ratio=0.3):
    named = list(load_model(model_dir).denoiser.named_parameters())
    scores = torch.tensor([float(t.numel()) for _, t in named]) + torch.linspace(0, 0.5, len(named))
    return Mask.from_scores(named, scores, ratio, "params", base_fingerprint=fingerprint(named))


def test_immunise_moves_only_frozen_values_and_only_while_the_hinge_is_active(tiny_sd, people, logos):
    comps = load_model(tiny_sd)
    schedule = NoiseSchedule.for_components(comps)
    mask = _largest_mask(tiny_sd)
    frozen = set(mask.frozen_names)
    before = {n: p.detach().clone() for n, p in comps.denoiser.named_parameters()}
    mix = _paired_mix(tiny_sd, people, logos, comps, schedule)
    ill = DomainMix(mix.domains[:1], schedule, 1)
    inn = DomainMix(mix.domains[1:], schedule, 2)
    settings = ImmuniseSettings(immunise_steps=2, immunise_inner_steps=1, immunise_lr=1e-3, immunise_batch=2,
                                immunise_objective="identity",
                                immunise_gap_target=-1e9, immunise_retain_weight=0.0, immunise_innocent_weight=0.0)
    history = immunise(comps.denoiser, frozen, lambda: ill.draw("cpu"), lambda: inn.draw("cpu"), schedule, settings)
    after = dict(comps.denoiser.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before), "an unreachable target moved something"
    assert [h["hinge"] for h in history] == [0.0, 0.0]

    settings.immunise_gap_target = 1.0                 # far above any gap: every update pushes
    settings.immunise_attack_updates = 2               # and the second update's attacker carries on
    history = immunise(comps.denoiser, frozen, lambda: ill.draw("cpu"), lambda: inn.draw("cpu"), schedule, settings)
    assert all(h["hinge"] > 0 for h in history) and history[-1]["frozen_change"] > 0
    assert [h["attacker_steps"] for h in history] == [1, 2]
    assert all(torch.equal(after[n], before[n]) for n in before if n not in frozen)
    assert all(not torch.equal(after[n], before[n]) for n in frozen)


def test_immunise_chains_after_a_freezing_method_only():
    assert [m.name for m in parse_chain("learned-identity+immunise")] == ["learned-identity", "immunise"]
    with pytest.raises(ValueError, match="chain it after a freezing method"):
        parse_chain("immunise")
    with pytest.raises(ValueError, match="chain it after a freezing method"):
        parse_chain("uce+immunise")


@pytest.mark.slow
def test_an_immunised_release_is_enforced_and_audited_as_any_model(tiny_sd, people, logos, tmp_path):
    """largest+immunise (a data-free mask, so the test needs no mask learning): the release differs
    from the base only in frozen tensors; its mask is the release's (the base no longer matches);
    a guarded fine-tune of the release passes verify, one frozen value moved does not."""
    settings = ProtectSettings(budget="params", immunise_steps=2, immunise_inner_steps=1, immunise_batch=2,
                               immunise_lr=1e-3, immunise_loss_target=10.0)
    chosen = protect("largest+immunise", tiny_sd, people, [logos], ["Mara Quell"], 0.3, tmp_path / "protect",
                     settings, device="cpu")
    release, mask = chosen.model, chosen.mask
    base_state, release_state = load_denoiser_state(tiny_sd), load_denoiser_state(release)
    changed = {n for n in base_state if not torch.equal(base_state[n], release_state[n])}
    assert changed and changed <= set(mask.frozen_names)
    assert mask.base_fingerprint["weights_hash"] == fingerprint(release_state)["weights_hash"]
    with pytest.raises(MaskError):
        mask.check_matches(list(base_state.items()), fingerprint(base_state))
    # the marker is per ratio: another ratio's release is another optimisation, not this one reused
    assert (tmp_path / "protect" / "largest+immunise" / "done-0.3.json").exists()

    ft = tmp_path / "ft"
    guarded_finetune(release, logos, ft, FinetuneConfig(steps=2, batch_size=2, lr=1e-3, device="cpu",
                                                        checkpoint_every=0), mask=mask)
    mask_file = mask.save(tmp_path / "release-mask.safetensors")
    assert verify_checkpoint(release, mask_file, ft).compliant
    weights = ft / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = next(n for n in mask.frozen_names if n in changed)
    state[name] = state[name] + 1e-3
    save_file(state, weights)
    report = verify_checkpoint(release, mask_file, ft)
    assert not report.compliant and name in str(report.violations)
