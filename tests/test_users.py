"""Simulated users of mask learning (users.py): their draws, steps, and the worst-of-K mask
gradient, against independent computations; and a learn run over a range of users resumed."""
import math

import pytest
import torch

from freezeasguard import LearnConfig, learn_mask
from freezeasguard.guard.bilevel import BilevelState, logit_gradient, lower_update_, soft_mask, sparsity_loss
from freezeasguard.guard.mask_updates import undo_user_
from freezeasguard.guard.users import (SimulatedUser, attacker_weights, combine_user_dots, draw_users, lora_down,
                                 lora_tensors, parse_user_steps, user_direction_)


def test_users_are_a_function_of_seed_and_update_and_span_the_range():
    kinds = parse_user_steps("sgd, adam,lora")
    a = draw_users(kinds, 1e-4, 0.1, 30.0, 4, seed=3, update=7)
    assert a == draw_users(kinds, 1e-4, 0.1, 30.0, 4, seed=3, update=7)          # resumable: no hidden state
    assert a != draw_users(kinds, 1e-4, 0.1, 30.0, 4, seed=3, update=8)
    many = [u for k in range(500) for u in draw_users(kinds, 1e-4, 0.1, 30.0, 2, seed=0, update=k)]
    logs = torch.tensor([math.log(u.lr / 1e-4) for u in many])
    assert float(logs.min()) >= math.log(0.1) - 1e-12 and float(logs.max()) <= math.log(30.0) + 1e-12
    # log-uniform: the mean of log(factor) is the middle of the range, its spread that of a uniform
    mid, width = (math.log(0.1) + math.log(30.0)) / 2, math.log(30.0) - math.log(0.1)
    assert abs(float(logs.mean()) - mid) < 0.05 * width
    assert abs(float(logs.std()) - width / math.sqrt(12)) < 0.05 * width
    counts = {k: sum(u.step == k for u in many) for k in kinds}
    assert all(250 < c < 420 for c in counts.values())
    # the paper's single user: exactly the given learning rate
    assert {u.lr for u in draw_users(("sgd",), 1e-5, 1.0, 1.0, 3, 0, 0)} == {1e-5}
    with pytest.raises(ValueError, match="sgd, adam, lora"):
        parse_user_steps("sgd,rmsprop")


def test_user_steps_are_sgd_adam_first_step_and_a_rank_r_lora_step():
    torch.manual_seed(0)
    names = ["down.attn1.to_q.weight", "down.attn1.to_q.bias", "down.conv.weight", "up.attn2.to_out.0.weight"]
    shapes = [(6, 5), (6,), (6, 5), (5, 7)]
    assert lora_tensors(names) == [0, 3]
    grads = [torch.randn(s) for s in shapes]
    adam = [g.clone() for g in grads]
    user_direction_(adam, SimulatedUser("adam", 1e-3, 0), [], 2)
    for g, a in zip(grads, adam):
        assert torch.equal(a, torch.sign(g))
    # Adam's first step, computed by torch's Adam on a copy: lr * sign(g) (eps aside)
    p = torch.zeros(6, 5, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1e-3, eps=1e-12)
    p.grad = grads[0].clone()
    opt.step()
    torch.testing.assert_close(-p.detach(), 1e-3 * adam[0])
    lora = [g.clone() for g in grads]
    user_direction_(lora, SimulatedUser("lora", 1e-3, 11), lora_tensors(names), 2)
    assert float(lora[1].abs().sum()) == 0 and float(lora[2].abs().sum()) == 0      # not adapted
    for i in (0, 3):
        assert torch.linalg.matrix_rank(lora[i]) <= 2
        # independently: a LoRA W0 + B A with peft's A and B = 0, one step of torch's Adam on B
        a = lora_down(torch.Size(shapes[i]), 2, 11, i, torch.float32, "cpu")
        assert a.shape == (2, shapes[i][1]) and float(a.abs().max()) <= 1 / math.sqrt(shapes[i][1])
        x, target, w0 = torch.randn(9, shapes[i][1]), torch.randn(9, shapes[i][0]), torch.randn(shapes[i])
        b = torch.zeros(shapes[i][0], 2, requires_grad=True)
        opt = torch.optim.Adam([b], lr=1e-3, eps=1e-12)
        ((x @ (w0 + b @ a).T - target) ** 2).sum().backward()
        opt.step()
        w = w0.clone().requires_grad_(True)
        ((x @ w.T - target) ** 2).sum().backward()            # G = dL/dW at W0
        direction = [torch.zeros(s) for s in shapes]
        direction[i] = w.grad.clone()
        user_direction_(direction, SimulatedUser("lora", 1e-3, 11), [i], 2)
        torch.testing.assert_close(-1e-3 * direction[i], (b @ a).detach())


def test_attacker_weights_mean_max_and_the_softmax_of_relative_losses():
    losses = torch.tensor([0.30, 0.27, 0.33])
    assert torch.allclose(attacker_weights(losses, "mean", 0.1), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert attacker_weights(losses, "max", 0.1).tolist() == [0.0, 1.0, 0.0]
    w = attacker_weights(losses, "softmax", 0.05)
    scale = 0.05 * 0.30
    e = [math.exp(-x / scale) for x in (0.30, 0.27, 0.33)]
    assert torch.allclose(w, torch.tensor([x / sum(e) for x in e], dtype=torch.float64))
    assert float(attacker_weights(losses, "softmax", 1e-4)[1]) > 0.999                 # -> max as tau -> 0
    # scale-free: the same weights for losses 1000x larger
    assert torch.allclose(attacker_weights(losses * 1000, "softmax", 0.05), w)


@pytest.mark.parametrize("weighting", ["softmax", "max", "mean"])
def test_worst_of_k_mask_gradient_equals_autograd(weighting):
    """dL/dw of  lambda_1 smax_k(-L_ill(theta_k(m))) + lambda_2 mean_k L_inn(theta_k(m)) + c sparsity,
    theta_k(m) = m theta_pre + (1-m) theta_ft^k, by autograd in float64, against the per-user dots
    each from a plain backward, weighted by attacker_weights and combined."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    names = [n for n, _ in model.named_parameters()]
    pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    fts = [{n: p + 0.3 * torch.randn_like(p) for n, p in pre.items()} for _ in range(3)]
    xi, yi = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    xn, yn = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    lam1, lam2, T, rho, c, tau = 1.3, 0.7, 0.2, 0.3, 2.0, 0.05
    mse = torch.nn.functional.mse_loss

    def losses(theta):
        call = torch.func.functional_call
        return mse(call(model, theta, (xi,)), yi), mse(call(model, theta, (xn,)), yn)

    w = (torch.randn(len(names), dtype=torch.float64) * 0.3).requires_grad_(True)
    m = soft_mask(w, T)
    ill, inn = zip(*[losses({n: m[i] * pre[n] + (1 - m[i]) * ft[n] for i, n in enumerate(names)}) for ft in fts])
    ill, inn = torch.stack(ill), torch.stack(inn)
    if weighting == "softmax":
        scale = tau * ill.detach().mean()
        worst = lam1 * scale * torch.logsumexp(-ill / scale, 0)
    elif weighting == "max":
        worst = lam1 * (-ill).max()
    else:
        worst = lam1 * (-ill).mean()
    (worst + lam2 * inn.mean() + c * sparsity_loss(m, rho)).backward()

    m0 = soft_mask(w.detach(), T)
    ill_dots, inn_dots, ill_losses = [], [], []
    for ft in fts:
        theta = {n: (m0[i] * pre[n] + (1 - m0[i]) * ft[n]).requires_grad_(True) for i, n in enumerate(names)}
        li, ln = losses(theta)
        gi = torch.autograd.grad(-lam1 * li, list(theta.values()))
        gn = torch.autograd.grad(lam2 * ln, list(theta.values()))
        ill_dots.append(torch.stack([(g * (pre[n] - ft[n])).sum() for g, n in zip(gi, names)]))
        inn_dots.append(torch.stack([(g * (pre[n] - ft[n])).sum() for g, n in zip(gn, names)]))
        ill_losses.append(float(li.detach()))
    weights = attacker_weights(torch.tensor(ill_losses, dtype=torch.float64), weighting, tau)
    dots = combine_user_dots(torch.stack(ill_dots), torch.stack(inn_dots), weights)
    ours, _ = logit_gradient(dots, m0, T, rho, c, normalize=False)
    torch.testing.assert_close(ours, w.grad, rtol=1e-9, atol=1e-12)


def test_undoing_a_user_restores_theta_d_and_keeps_theta_of_m_consistent():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    pre = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    state = BilevelState(model, pre, temperature=0.2)
    state.logits = torch.randn(len(state.params))
    params0 = [p.detach().clone() for p in state.params]
    start = state.flat_theta_d.clone()
    for _ in range(3):
        grads = [torch.randn_like(p) for p in state.params]
        user_direction_(grads, SimulatedUser("adam", 0.05, 0), [], 4)
        with torch.no_grad():
            lower_update_(state.local, state.theta_d, grads, state.m, 0.05)
    assert not torch.equal(state.flat_theta_d, start)
    undo_user_(state, start)
    assert torch.equal(state.flat_theta_d, start)
    for p, p0 in zip(state.params, params0):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=1e-6)


def _cfg(**kw):
    base = dict(ratio=0.3, mask_steps=4, inner_steps=2, mask_batch=2, user_lr=1e-3, seed=0, device="cpu",
                checkpoint_every=1, simulated_users="sgd,adam,lora", user_lr_min_factor=0.1, user_lr_max_factor=30,
                user_lora_rank=4, users_per_update=2, user_weighting="softmax", user_trajectory="restart")
    base.update(kw)
    return LearnConfig(**base)


@pytest.mark.slow
def test_learning_over_a_range_of_users_resumes_bit_exactly_and_records_them(tiny_sd, people, logos, warm_start,
                                                                            tmp_path, kill_mask_learning_at):
    whole = learn_mask(tiny_sd, people, [logos], tmp_path / "a.safetensors", _cfg(), finetuned_dir=warm_start)
    first = whole.history[0]
    assert len(first["users"]) == 2 and len(first["user_weights"]) == 2
    assert abs(sum(first["user_weights"]) - 1) < 1e-9
    # the weights are the softmax of the users' own illegal losses
    expected = attacker_weights(torch.tensor(first["user_illegal_losses"]), "softmax", 0.05)
    assert torch.allclose(torch.tensor(first["user_weights"], dtype=torch.float64), expected)
    calls = kill_mask_learning_at(3)
    with pytest.raises(KeyboardInterrupt):
        learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(), finetuned_dir=warm_start)
    with pytest.raises(ValueError, match="differ in: settings"):
        learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(user_lr_max_factor=10),
                   finetuned_dir=warm_start, resume=True)
    resumed = learn_mask(tiny_sd, people, [logos], tmp_path / "b.safetensors", _cfg(), finetuned_dir=warm_start,
                         resume=True)
    assert calls["n"] == 3 + 2
    assert torch.equal(resumed.mask.logits, whole.mask.logits)
    assert [h["users"] for h in resumed.history] == [h["users"] for h in whole.history]
    # another range of users learns another mask from the same start
    other = learn_mask(tiny_sd, people, [logos], tmp_path / "c.safetensors", _cfg(simulated_users="sgd",
                       user_lr_max_factor=1, user_lr_min_factor=1, users_per_update=1, user_trajectory="continue"),
                       finetuned_dir=warm_start, work_dir=tmp_path / "cw")
    assert not torch.equal(other.mask.logits, whole.mask.logits)


def test_bad_user_settings_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="user_lr_min_factor"):
        LearnConfig(user_lr_min_factor=3, user_lr_max_factor=1)
    with pytest.raises(ValueError, match="simulated_users"):
        LearnConfig(simulated_users="adam,momentum")
    with pytest.raises(ValueError, match="users_per_update"):
        LearnConfig(users_per_update=0)
