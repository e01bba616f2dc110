"""Simulated attackers that fine-tune what a mask leaves trainable: the inner loop of the
immunisation (immunise.py) and of IMMA (methods/imma.py).

An attacker is a recipe (AdamW on every trainable tensor, or a LoRA on the trainable attention
projections) with a learning rate; it starts from the release, takes a few steps on the illegal
data, and is undone afterwards (snapshot/restore), so that every outer update meets a fresh one.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTACKER_KINDS = ("adam", "lora")


class Adapter:
    """An additive update of each target Linear: delta = B @ A (LoRA) or a full matrix, applied
    by forward hooks so the base weight stays a leaf that the outer step can differentiate."""

    def __init__(self, modules: dict[str, torch.nn.Linear], kind: str = "lora", rank: int = 4,
                 generator: torch.Generator | None = None):
        if kind not in ("lora", "full"):
            raise ValueError(f"imma_adapter {kind!r}: use lora or full")
        self.kind, self.factors, self.handles = kind, {}, []
        for name, m in modules.items():
            out_f, in_f = m.weight.shape
            dev = m.weight.device
            if kind == "full":
                self.factors[name] = [torch.zeros(out_f, in_f, device=dev, requires_grad=True)]
            else:
                a = (torch.randn(rank, in_f, generator=generator) / in_f ** 0.5).to(dev).requires_grad_(True)
                self.factors[name] = [a, torch.zeros(out_f, rank, device=dev, requires_grad=True)]
            self.handles.append(m.register_forward_hook(self._hook(name)))

    def delta(self, name) -> torch.Tensor:
        f = self.factors[name]
        return f[0] if self.kind == "full" else f[1] @ f[0]

    def _hook(self, name):
        def hook(module, args, output):
            return output + F.linear(args[0], self.delta(name).to(args[0].dtype))
        return hook

    def parameters(self) -> list[torch.Tensor]:
        return [t for f in self.factors.values() for t in f]

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def attach(self, modules: dict[str, torch.nn.Linear]):
        """Hook the same factors onto ``modules`` again (after remove())."""
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]


@dataclass(frozen=True)
class Attacker:
    kind: str        # adam | lora
    lr: float

    def describe(self) -> str:
        return f"{self.kind}@{self.lr:.2g}"


def parse_attackers(spec: str) -> list[str]:
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ATTACKER_KINDS]
    if not kinds or unknown:
        raise ValueError(f"attackers {spec!r}: comma-separated, each one of {', '.join(ATTACKER_KINDS)}")
    return kinds


def draw_attacker(kinds: list[str], lr_min: float, lr_max: float, rng: random.Random) -> Attacker:
    """One attacker: a kind drawn uniformly, a learning rate log-uniformly in [lr_min, lr_max]."""
    lr = math.exp(rng.uniform(math.log(lr_min), math.log(lr_max))) if lr_max > lr_min else lr_min
    return Attacker(rng.choice(kinds), lr)


def lora_targets(denoiser, trainable: set[str]) -> dict[str, torch.nn.Linear]:
    """The attention projections whose weight the mask leaves trainable (where a LoRA attacker may sit)."""
    return {n: m for n, m in denoiser.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in trainable
            and any(n.endswith(s) for s in ("to_q", "to_k", "to_v", "to_out.0"))}


class Attack:
    """An attacker's fine-tune of the trainable tensors, undone by ``undo()``: AdamW on the tensors
    themselves (their values restored from a snapshot), or a LoRA on ``lora_targets`` (removed)."""

    def __init__(self, denoiser, trainable: list[torch.Tensor], attacker: Attacker, lora_modules: dict, rank: int,
                 seed: int):
        self.attacker, self.trainable, self.adapter, self.snapshot = attacker, trainable, None, None
        self.lora_modules, self.parked, self.steps = lora_modules, None, 0
        if attacker.kind == "lora" and lora_modules:
            self.adapter = Adapter(lora_modules, "lora", rank, torch.Generator().manual_seed(seed))
            params = self.adapter.parameters()
        else:       # AdamW on the tensors themselves (also a lora attacker where no projection is trainable)
            self.snapshot = [t.detach().clone() for t in trainable]
            params = trainable
            for t in trainable:
                t.requires_grad_(True)
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=attacker.lr, weight_decay=0.0)

    def step(self, loss: torch.Tensor):
        self.opt.zero_grad(set_to_none=True)
        loss.backward(inputs=self.params)
        self.opt.step()
        self.steps += 1

    def hold(self):
        """Keep the adapted point fixed (first-order: no gradient flows into the attacker's own weights)."""
        for p in self.params:
            p.requires_grad_(False)

    def park(self):
        """Set the attacker aside (the model back at the release) to carry on later with resume()."""
        if self.adapter is not None:
            self.adapter.remove()
        else:
            self.parked = [t.detach().clone() for t in self.trainable]
            with torch.no_grad():
                for t, s in zip(self.trainable, self.snapshot):
                    t.copy_(s)

    def resume(self):
        """Back to where the attacker stopped, its optimizer state kept."""
        if self.adapter is not None:
            self.adapter.attach(self.lora_modules)
        else:
            with torch.no_grad():
                for t, s in zip(self.trainable, self.parked):
                    t.copy_(s)
            self.parked = None
        for p in self.params:
            p.requires_grad_(True)

    def undo(self):
        """Remove the attacker for good (the model back at the release)."""
        if self.parked is not None:
            self.parked = None
        elif self.adapter is not None:
            self.adapter.remove()
        else:
            with torch.no_grad():
                for t, s in zip(self.trainable, self.snapshot):
                    t.copy_(s)
        for p in self.params:
            p.grad = None
