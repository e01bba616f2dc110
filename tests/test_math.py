"""The mask-learning maths against independent computations (autograd in float64, loops)."""
import torch

from freezeasguard.guard.bilevel import (
    BilevelState,
    logit_gradient,
    lower_update_,
    per_tensor_dots,
    remask_,
    soft_mask,
    sparsity_loss,
)
from freezeasguard.guard.mask import select_frozen


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def test_logit_gradient_equals_autograd_through_theta_of_m():
    torch.manual_seed(0)
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    theta_pre = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta_ft = {n: p + 0.1 * torch.randn_like(p) for n, p in theta_pre.items()}
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    T, rho, c = 0.2, 0.3, 3.0
    w = (torch.randn(len(names), dtype=torch.float64) * 0.3).requires_grad_(True)

    # autograd: L(theta(m)) + c * sparsity with theta(m) = m theta_pre + (1 - m) theta_ft
    m = soft_mask(w, T)
    theta = {n: m[i] * theta_pre[n] + (1 - m[i]) * theta_ft[n] for i, n in enumerate(names)}
    loss = torch.nn.functional.mse_loss(torch.func.functional_call(model, theta, (x,)), y)
    (loss + c * sparsity_loss(m, rho)).backward()

    # ours: dots from a plain backward at theta(m), theta_d = theta_pre - theta_ft
    with torch.no_grad():
        m0 = soft_mask(w.detach(), T)
        for i, (n, p) in enumerate(model.named_parameters()):
            p.copy_(m0[i] * theta_pre[n] + (1 - m0[i]) * theta_ft[n])
    torch.nn.functional.mse_loss(model(x), y).backward()
    dots = torch.stack([(p.grad * (theta_pre[n] - theta_ft[n])).sum() for n, p in model.named_parameters()])
    ours, _ = logit_gradient(dots, m0, T, rho, c, normalize=False)
    torch.testing.assert_close(ours, w.grad, rtol=1e-10, atol=1e-12)


def test_normalized_gradient_is_a_positive_rescaling_of_the_data_term():
    dots = torch.tensor([1e-6, -3e-6, 2e-6, 0.0])
    m = torch.full((4,), 0.3)  # at the target ratio, so the sparsity term vanishes
    raw, _ = logit_gradient(dots, m, 0.2, 0.3, 5.0, normalize=False)
    norm, stats = logit_gradient(dots, m, 0.2, 0.3, 5.0, normalize=True)
    ratio = norm / raw.where(raw != 0, torch.ones(1))
    assert torch.allclose(ratio[:3], ratio[0].expand(3))
    assert ratio[0] > 0
    rms = (dots * stats["data_scale"]).pow(2).mean().sqrt()
    torch.testing.assert_close(rms, torch.tensor(1.0))   # data term per-tensor RMS = 1


def test_lower_step_is_sgd_on_theta_ft_and_keeps_theta_pre():
    torch.manual_seed(1)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    theta_pre = [torch.randn(s, dtype=torch.float64) for s in shapes]
    theta_ft = [torch.randn(s, dtype=torch.float64) for s in shapes]
    m = torch.tensor([0.1, 0.7, 0.4], dtype=torch.float64)
    params = [mi * a + (1 - mi) * b for mi, a, b in zip(m, theta_pre, theta_ft)]
    theta_d = [a - b for a, b in zip(theta_pre, theta_ft)]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]   # dL/dtheta(m)
    lr = 0.05
    expected_ft = [b - lr * (1 - mi) * g for b, mi, g in zip(theta_ft, m, grads)]   # SGD, dL/dtheta_ft = (1-m) g
    lower_update_(params, theta_d, [g.clone() for g in grads], m, lr)
    for p, d, pre, ft, mi in zip(params, theta_d, theta_pre, expected_ft, m):
        torch.testing.assert_close(pre - d, ft)                              # theta_ft = theta_pre - theta_d
        torch.testing.assert_close(p, mi * pre + (1 - mi) * ft)             # theta(m) consistent


def test_theta_of_m_stays_consistent_over_many_updates():
    torch.manual_seed(2)
    shapes = [(5,), (3, 3), (2,)]
    theta_pre = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ft = [torch.randn(s, dtype=torch.float64) for s in shapes]
    w = torch.randn(3, dtype=torch.float64)
    m = soft_mask(w, 0.2)
    params = [mi * a + (1 - mi) * b for mi, a, b in zip(m, theta_pre, ft)]
    theta_d = [a - b for a, b in zip(theta_pre, ft)]
    for _ in range(20):
        lower_update_(params, theta_d, [torch.randn(s, dtype=torch.float64) for s in shapes], m, 0.01)
        w_new = w + 0.3 * torch.randn(3, dtype=torch.float64)
        m_new = soft_mask(w_new, 0.2)
        remask_(params, theta_d, m, m_new)
        w, m = w_new, m_new
        for p, d, pre, mi in zip(params, theta_d, theta_pre, m):
            theta_ft = pre - d
            torch.testing.assert_close(p, mi * pre + (1 - mi) * theta_ft, rtol=1e-12, atol=1e-12)


def test_per_tensor_dots_match_a_loop():
    torch.manual_seed(3)
    a, b = [torch.randn(n) for n in (5, 1, 17)], [torch.randn(n) for n in (5, 1, 17)]
    flat_a, flat_b = torch.cat(a), torch.cat(b)
    dots = per_tensor_dots(flat_a.clone(), flat_b, torch.tensor([5, 1, 17]))
    torch.testing.assert_close(dots, torch.stack([(x * y).sum() for x, y in zip(a, b)]))


def test_sparsity_alone_drives_the_soft_ratio_to_rho():
    torch.manual_seed(4)
    n, T, rho = 200, 0.2, 0.3
    w = T * (-3 + 2 * torch.rand(n))        # the learner's initialisation: m well below rho
    for _ in range(3000):
        m = soft_mask(w, T)
        grad, _ = logit_gradient(torch.zeros(n), m, T, rho, 5.0, normalize=True)
        w = w - 0.05 * grad
    assert abs(float(soft_mask(w, T).mean()) - rho) < 0.01


def test_select_frozen_hits_the_ratio_exactly_under_both_budgets():
    torch.manual_seed(5)
    numel = [int(x) for x in torch.randint(1, 5000, (101,))] + [1, 1, 2, 3]   # small tensors like biases
    scores = torch.randn(len(numel))
    for ratio in (0.0, 0.1, 0.3, 0.8, 1.0):
        frozen = select_frozen(scores, numel, ratio, "tensors")
        assert int(frozen.sum()) == round(ratio * len(numel))
        assert scores[frozen].min() >= scores[~frozen].max() if 0 < ratio < 1 else True
        frozen = select_frozen(scores, numel, ratio, "params")
        target, got = round(ratio * sum(numel)), sum(n for n, f in zip(numel, frozen.tolist()) if f)
        assert got <= target
        left = [n for n, f in zip(numel, frozen.tolist()) if not f]
        assert target - got < min(left) if left else got == target


def test_bilevel_state_views_share_memory_with_flat_buffers():
    model = _mlp(dtype=torch.float32)
    pre = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    state = BilevelState(model, pre, 0.2)
    for (n, p), d in zip(model.named_parameters(), state.theta_d):
        torch.testing.assert_close(d, torch.ones_like(p))
    model(torch.randn(2, 3)).sum().backward()
    assert state.flat_grad.abs().sum() > 0                     # autograd wrote into the flat buffer
    assert all(p.grad.data_ptr() == g.data_ptr() for p, g in zip(model.parameters(), state.grad_views))


def test_parameter_weighted_sparsity_gradient_equals_autograd():
    torch.manual_seed(6)
    n, T, rho, c = 9, 0.2, 0.3, 4.0
    sizes = torch.tensor([1, 7, 300, 2, 50, 50, 1000, 3, 12])
    dots = torch.randn(n, dtype=torch.float64)
    w = (torch.randn(n, dtype=torch.float64) * 0.4).requires_grad_(True)
    m = soft_mask(w, T)
    # the paper's objective with a parameter-counting sparsity term: L = <dots, m> + c (sum(n m)/sum(n) - rho)^2
    ((dots * m).sum() + c * sparsity_loss(m, rho, sizes)).backward()
    ours, _ = logit_gradient(dots, m.detach(), T, rho, c, normalize=False, numel=sizes)
    torch.testing.assert_close(ours, w.grad, rtol=1e-10, atol=1e-12)
    # by hand: the share's derivative is n_i / sum(n)
    share = float((sizes * m.detach()).sum() / sizes.sum())
    by_hand = (dots + c * 2 * (share - rho) * sizes / sizes.sum()) * m.detach() * (1 - m.detach()) / T
    torch.testing.assert_close(ours, by_hand)


def test_normalized_parameter_sparsity_pulls_each_tensor_in_proportion_to_its_size():
    m = torch.full((4,), 0.5)
    sizes = torch.tensor([1, 1, 10, 100])
    grad, _ = logit_gradient(torch.zeros(4), m, 0.2, 0.3, 5.0, normalize=True, numel=sizes)
    torch.testing.assert_close(grad / grad[0], sizes.float())
    tensors, _ = logit_gradient(torch.zeros(4), m, 0.2, 0.3, 5.0, normalize=True)
    # averaged over tensors the two pulls agree when every tensor has the same m: mean(n_i / mean(n)) = 1
    torch.testing.assert_close(grad.mean(), tensors.mean())


def _brute_force_knapsack(values, sizes, capacity):
    import itertools
    best, best_set = 0.0, ()
    for k in range(len(sizes) + 1):
        for subset in itertools.combinations(range(len(sizes)), k):
            if sum(sizes[i] for i in subset) <= capacity:
                v = sum(values[i] for i in subset)
                if v > best + 1e-12:
                    best, best_set = v, subset
    return best, best_set


def test_knapsack_is_exact_against_brute_force():
    from freezeasguard.guard.mask import knapsack_select
    g = torch.Generator().manual_seed(7)
    for trial in range(40):
        n = int(torch.randint(1, 11, (1,), generator=g))
        sizes = [int(x) for x in torch.randint(1, 60, (n,), generator=g)]
        values = torch.rand(n, generator=g, dtype=torch.float64)
        capacity = int(torch.randint(0, sum(sizes) + 1, (1,), generator=g))
        chosen = knapsack_select(values, sizes, capacity)
        got = float(values[chosen].sum())
        assert sum(s for s, c in zip(sizes, chosen.tolist()) if c) <= capacity
        assert abs(got - _brute_force_knapsack(values.tolist(), sizes, capacity)[0]) < 1e-9


def test_knapsack_prefers_value_per_parameter_where_greedy_takes_the_top_score():
    # one large tensor with the top score would take the whole budget; three small ones are worth more
    values = torch.tensor([1.0, 0.9, 0.9, 0.9])
    sizes = [90, 30, 30, 30]
    greedy = select_frozen(values, sizes, 0.5, "params", "greedy")      # budget 90 parameters
    knapsack = select_frozen(values, sizes, 0.5, "params", "knapsack", values)
    assert greedy.tolist() == [True, False, False, False]
    assert knapsack.tolist() == [False, True, True, True]


def test_knapsack_at_scale_stays_within_budget_and_near_the_exact_optimum():
    from freezeasguard.guard.mask import knapsack_select
    g = torch.Generator().manual_seed(8)
    sizes = [int(x) for x in torch.randint(1, 200_000, (300,), generator=g)] + [1] * 20
    values = torch.rand(len(sizes), generator=g, dtype=torch.float64)
    capacity = sum(sizes) // 3
    coarse = knapsack_select(values, sizes, capacity, resolution=2_000)
    fine = knapsack_select(values, sizes, capacity, resolution=200_000)
    assert sum(s for s, c in zip(sizes, coarse.tolist()) if c) <= capacity
    assert float(values[coarse].sum()) >= 0.98 * float(values[fine].sum())
    # an upper bound on the optimum: the fractional (LP) knapsack, greedy by value per parameter
    order = sorted(range(len(sizes)), key=lambda i: -float(values[i]) / sizes[i])
    left, bound = capacity, 0.0
    for i in order:
        take = min(1.0, left / sizes[i])
        bound += take * float(values[i])
        left -= take * sizes[i]
        if left <= 0:
            break
    assert float(values[fine].sum()) <= bound + 1e-9
    assert float(values[fine].sum()) >= 0.99 * bound


def test_wilson_interval_matches_scipys_and_stays_inside_zero_one():
    import pytest
    from scipy.stats import binomtest

    from freezeasguard.metrics.basic import wilson_interval
    for k, n in [(0, 32), (32, 32), (7, 32), (21, 48), (1, 2)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, n)
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=2e-4)     # scipy's z is 1.95996...
        assert 0 <= lo <= k / n <= hi <= 1
    assert wilson_interval(0, 32)[1] > 0 and wilson_interval(32, 32)[0] < 1
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
