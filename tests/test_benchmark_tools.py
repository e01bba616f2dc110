"""The benchmarks' own measuring tools, checked against hand computations."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import forward_order, saved_activations  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_forward_order_is_call_order_not_definition_order():
    class Swapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.late = torch.nn.Linear(4, 4)
            self.early = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.late(self.early(x))

    m = Swapped()
    assert forward_order(m, lambda: m(torch.zeros(1, 4))) == ["early", "late"]


def test_saved_activations_match_a_hand_count():
    x = torch.randn(2, 8)
    model = _mlp()
    # all trainable: linear 0 keeps x (2x8 floats), ReLU keeps its output (2x16), which linear 2
    # also keeps (the same storage, counted once)
    full = saved_activations(model, lambda: model(x).sum())
    assert full["saved_bytes"] == (2 * 8 + 2 * 16) * 4
    assert full["saved_before_first_trainable_bytes"] == 0
    assert full["modules_before_first_trainable"] == 0

    # first linear frozen: nothing needs a gradient until linear 2, which keeps only its input
    model[0].requires_grad_(False)
    prefix = saved_activations(model, lambda: model(x).sum())
    assert prefix["saved_bytes"] == 2 * 16 * 4
    assert prefix["saved_before_first_trainable_bytes"] == 0
    assert prefix["modules_before_first_trainable"] == 2


def test_kept_prefix_activations_are_counted_when_autograd_keeps_them():
    # an input that needs a gradient makes the frozen first linear keep it: the tool must say so
    x = torch.randn(2, 8, requires_grad=True)
    model = _mlp()
    model[0].requires_grad_(False)
    kept = saved_activations(model, lambda: model(x).sum())
    assert kept["saved_before_first_trainable_bytes"] == 2 * 16 * 4    # ReLU's output, saved during ReLU
