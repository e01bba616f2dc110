"""Metrics that need no downloaded weights (small pure functions on images/features)."""
from __future__ import annotations

import torch


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula), computed in
    float64 with tr(sqrt(S_a S_b)) = sum sqrt(eig(sqrt(S_a) S_b sqrt(S_a)))."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eva, eve = torch.linalg.eigh(cov_a)
    sqrt_a = eve @ torch.diag(eva.clamp_min(0).sqrt()) @ eve.T
    mid = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * mid)


def identity_recognition(predicted_names: list[str], target: str) -> float:
    """Share of generated portraits of ``target`` that the recogniser names ``target``."""
    return sum(p == target for p in predicted_names) / max(1, len(predicted_names))


def prompt_accuracy(predicted: list[dict], expected: list[dict]) -> float:
    """Share of generated images whose every predicted attribute matches the prompt's."""
    return sum(all(p[k] == e[k] for k in p) for p, e in zip(predicted, expected)) / max(1, len(expected))


def attribute_accuracy(predicted: list[dict], expected: list[dict]) -> float:
    """Share of the prompt's attributes drawn right, averaged over images: partial credit where
    prompt_accuracy gives none (a logo has six attributes; a weak model rarely gets all six)."""
    per_image = [sum(p[k] == e[k] for k in p) / len(p) for p, e in zip(predicted, expected)]
    return sum(per_image) / max(1, len(per_image))
