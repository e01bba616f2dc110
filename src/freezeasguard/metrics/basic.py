"""Metrics that need no downloaded weights (small pure functions on images/features)."""
from __future__ import annotations

import math

import numpy as np
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
    """Share of generated images whose every attribute the prompt names (and the judge reads)
    is drawn as the prompt says."""
    return sum(all(p[k] == e[k] for k in e if k in p) for p, e in zip(predicted, expected)) / max(1, len(expected))


def attribute_accuracy(predicted: list[dict], expected: list[dict]) -> float:
    """Share of the prompt's attributes drawn right, averaged over images: partial credit where
    prompt_accuracy gives none. For people this is the trait accuracy of a prior: the share of a
    generic prompt's named traits that the trait judge reads in the sample."""
    per_image = []
    for p, e in zip(predicted, expected):
        keys = [k for k in e if k in p]
        per_image.append(sum(p[k] == e[k] for k in keys) / max(1, len(keys)))
    return sum(per_image) / max(1, len(per_image))


def images_to_uint8(images) -> torch.Tensor:
    """PIL images (or an (N, 3, H, W) uint8 tensor) -> (N, 3, H, W) uint8, all of one size."""
    if torch.is_tensor(images):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("image tensors must be (N, 3, H, W) uint8")
        return images
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images of different sizes {sorted({a.shape for a in arrays})}; resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval for a proportion (95% at z 1.96): unlike mean ± 1.96 std it stays
    inside [0, 1] and is not empty at 0 or n successes, which a guard's counts often are."""
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
