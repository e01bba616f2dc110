"""Small CNNs that judge generated images without downloaded weights: an identity recogniser for
the people of a cast (plus an "other" class for anyone or anything else), a trait judge for
people (what the pre-trained model's prior is measured with) and attribute classifiers for logos
and clothes. Trained on renders of the world in about a minute on a CPU,
saved as safetensors with their label sets."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from freezeasguard.io import atomic_save_safetensors
from freezeasguard.synthetic.world import (
    ATTRIBUTES,
    TRAITS,
    make_cast,
    random_identity,
    render_garment,
    render_generic_person,
    render_logo,
    render_person,
    visible_traits,
)

logger = logging.getLogger(__name__)

OTHER = "other"


def to_tensor(images, size: int = 32) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, size, size) in [-1, 1]."""
    arrs = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


class SmallCNN(nn.Module):
    """Conv features (64-d, also used for the feature-space FID) and one linear head per attribute."""

    def __init__(self, heads: dict[str, int]):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(64, n) for k, n in heads.items()})

    def forward(self, x):
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}

    def embed(self, x):
        return self.features(x)


class Judge:
    """A trained SmallCNN with its label sets."""

    def __init__(self, model: SmallCNN, labels: dict[str, list[str]], kind: str, meta: dict | None = None):
        self.model, self.labels, self.kind, self.meta = model.eval(), labels, kind, meta or {}

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, str]]:
        out = []
        for s in range(0, len(images), 256):
            logits = self.model(to_tensor(images[s:s + 256]))
            idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
            n = len(next(iter(idx.values())))
            out += [{k: self.labels[k][idx[k][i]] for k in idx} for i in range(n)]
        return out

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        return torch.cat([self.model.embed(to_tensor(images[s:s + 256])) for s in range(0, len(images), 256)])

    def save(self, path) -> Path:
        meta = {"labels": json.dumps(self.labels), "kind": self.kind, "meta": json.dumps(self.meta)}
        return atomic_save_safetensors(self.model.state_dict(), path, meta)

    @classmethod
    def load(cls, path) -> "Judge":

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        labels = json.loads(meta["labels"])
        model = SmallCNN({k: len(v) for k, v in labels.items()})
        model.load_state_dict(load_file(str(path)))
        return cls(model, labels, meta["kind"], json.loads(meta["meta"]))


def _train(model: SmallCNN, x: torch.Tensor, y: dict[str, torch.Tensor], epochs: int, seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(x)
    steps = epochs * ((n + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for s in range(0, n, 64):
            idx = perm[s:s + 64]
            out = model(x[idx])
            loss = sum(nn.functional.cross_entropy(out[k], y[k][idx]) for k in out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def person_samples(cast, n_per_person: int, n_other: int, seed: int, size: int = 32):
    """Renders of each cast member and of "other": random strangers, logos and garments."""
    rng = random.Random(f"recogniser-{seed}")
    images, labels = [], []
    for p in cast:
        for _ in range(n_per_person):
            images.append(render_person(p, rng, size)[0])
            labels.append(p.name)
    for i in range(n_other):
        if i % 4 == 3:
            images.append((render_logo if i % 8 == 3 else render_garment)(rng, size)[0])
        else:
            images.append(render_person(stranger(cast, rng), rng, size)[0])
        labels.append(OTHER)
    return images, labels


def stranger(cast, rng: random.Random):
    """A random person who differs from every cast member in at least two visible traits (the
    rule the cast itself follows), so "other" never names someone who looks like a cast member."""
    while True:
        q = random_identity(rng)
        shown = visible_traits(q.traits())
        if all(sum(shown.get(k) != visible_traits(p.traits()).get(k) for k in TRAITS) >= 2 for p in cast):
            return q


def blurred_copies(images, seed: int, low: float = 0.5, high: float = 2.0):
    """Each image once more under a Gaussian blur of random radius: generated images are blurry
    (a VAE round trip alone takes a sharp recogniser from 100% to 34-91%), and a judge of
    generated portraits must read traits through that blur."""
    rng = random.Random(f"blur-{seed}")
    return [im.filter(ImageFilter.GaussianBlur(rng.uniform(low, high))) for im in images]


@torch.no_grad()
def vae_round_trip(images, vae, size: int = 32):
    """Images encoded and decoded by a pipeline's VAE: what its generated images can look like."""
    x = to_tensor(images, size)
    out = []
    for s in range(0, len(x), 256):
        r = vae.decode(vae.encode(x[s:s + 256]).latent_dist.mean).sample.clamp(-1, 1)
        out += [Image.fromarray(((t.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for t in r]
    return out


def train_recogniser(cast_seed: int = 0, cast_size: int = 8, n_per_person: int = 200, n_other: int = 1200,
                     epochs: int = 6, seed: int = 0, blur: bool = True, vae=None) -> Judge:
    cast = make_cast(cast_seed, cast_size)
    images, labels = person_samples(cast, n_per_person, n_other, seed)
    extra = []
    if blur:
        extra.append(blurred_copies(images, seed))
    if vae is not None:
        extra.append(vae_round_trip(images, vae))
    for copies in extra:
        images, labels = images + copies, labels + labels[:len(copies)]
    names = [p.name for p in cast] + [OTHER]
    y = torch.tensor([names.index(lab) for lab in labels])
    model = _train(SmallCNN({"identity": len(names)}), to_tensor(images), {"identity": y}, epochs, seed)
    return Judge(model, {"identity": names}, "recogniser", {"cast_seed": cast_seed, "cast_size": cast_size,
                                                             "blur_augmented": blur,
                                                             "vae_augmented": vae is not None})


UNSEEN = "unseen"     # a bald person's hair colour (no beard): the trait judge's label for "not drawn"


def trait_samples(n: int, seed: int, size: int = 32):
    """Generic people and their visible traits (hair colour UNSEEN where it is not drawn)."""
    rng = random.Random(f"traits-{seed}")
    images, traits = [], []
    for _ in range(n):
        img, _, attrs = render_generic_person(rng, size)
        images.append(img)
        traits.append({k: attrs.get(k, UNSEEN) for k in TRAITS})
    return images, traits


def train_trait_judge(n: int = 6000, epochs: int = 8, seed: int = 0, vae=None) -> Judge:
    """Reads a person's traits (face shape, skin, hair style, hair colour, mark); trained on sharp,
    blurred and VAE round-trip renders, as the recogniser."""
    images, traits = trait_samples(n, seed)
    copies = blurred_copies(images, seed) + (vae_round_trip(images, vae) if vae is not None else [])
    images, traits = images + copies, traits + (traits * 2)[:len(copies)]
    labels = {k: list(v) + ([UNSEEN] if k == "hair_colour" else []) for k, v in TRAITS.items()}
    y = {k: torch.tensor([labels[k].index(t[k]) for t in traits]) for k in labels}
    model = _train(SmallCNN({k: len(v) for k, v in labels.items()}), to_tensor(images), y, epochs, seed)
    return Judge(model, labels, "traits", {"vae_augmented": vae is not None})


def attribute_samples(domain: str, n: int, seed: int, size: int = 32):
    rng = random.Random(f"attributes-{domain}-{seed}")
    render = render_logo if domain == "logos" else render_garment
    images, attrs = [], []
    for _ in range(n):
        img, _, a = render(rng, size)
        images.append(img)
        attrs.append(a)
    return images, attrs


def train_attribute_classifier(domain: str, n: int = 5000, epochs: int = 10, seed: int = 0, vae=None) -> Judge:
    """Trained on sharp renders and, as the recogniser, on blurred and VAE round-trip copies
    (a sharp-only judge read 33-59% of logos and clothes blurred by 1 px)."""
    images, attrs = attribute_samples(domain, n, seed)
    copies = blurred_copies(images, seed, high=1.5) + (vae_round_trip(images, vae) if vae is not None else [])
    images, attrs = images + copies, attrs + (attrs * 2)[:len(copies)]
    labels = {k: list(v) for k, v in ATTRIBUTES[domain].items()}
    y = {k: torch.tensor([labels[k].index(a[k]) for a in attrs]) for k in labels}
    model = _train(SmallCNN({k: len(v) for k, v in labels.items()}), to_tensor(images), y, epochs, seed)
    return Judge(model, labels, domain, {"vae_augmented": vae is not None})


def accuracy(judge: Judge, images, expected: list[dict[str, str]]) -> float:
    """Share of images whose every predicted attribute matches the expected one."""
    preds = judge.predict(images)
    return sum(all(p[k] == e[k] for k in p) for p, e in zip(preds, expected)) / max(1, len(images))
