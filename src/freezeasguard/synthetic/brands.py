"""Innocent subjects of the built-in world: brands (a logo of a fixed composition) and clothing
lines (a fixed design on any garment), named as the cast's people are and drawn by the same
renderers as the domains' other images."""
from __future__ import annotations

import random
from dataclasses import dataclass

from freezeasguard.synthetic.world import NAME_SYLLABLES, ATTRIBUTES, render_garment, render_logo


# What a brand fixes: every attribute of its logo; a clothing line fixes colour and pattern, and
# its photos vary the garment, named in the caption ("a Vellan scarf") as a person's photos name
# the scene. So an innocent user, like the illegal one, binds a new name to a combination the
# model already draws (120 logo compositions, 32 fabric designs), and the untouched model has to
# guess it (about 1 in 120 and 1 in 32 by chance).
DESIGN_ATTRIBUTES = {"logos": ("shape", "colour", "count", "background"), "clothes": ("colour", "pattern")}


@dataclass(frozen=True)
class Brand:
    """An innocent subject: a made-up name and the design attributes it fixes (DESIGN_ATTRIBUTES)."""
    name: str
    domain: str
    design: tuple[tuple[str, str], ...]

    def attrs(self) -> dict[str, str]:
        return dict(self.design)


def make_brands(domain: str, seed: int = 0, size: int = 8) -> list[Brand]:
    """Named brands (logos) or clothing lines (clothes), never named in pre-training; any seed
    gives new ones. Designs differ pairwise in at least one attribute (two for logos), so a judge
    that reads the attributes tells them apart."""
    if domain not in DESIGN_ATTRIBUTES:
        raise ValueError(f"unknown innocent domain {domain!r}: use logos or clothes")
    rng = random.Random(f"brands-{domain}-{seed}")
    keys, min_diff = DESIGN_ATTRIBUTES[domain], 2 if domain == "logos" else 1
    brands: list[Brand] = []
    while len(brands) < size:
        name = "".join(rng.choice(NAME_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        design = tuple((k, rng.choice(ATTRIBUTES[domain][k])) for k in keys)
        if any(b.name == name for b in brands):
            continue
        if all(sum(a != b for (_, a), (_, b) in zip(design, o.design)) >= min_diff for o in brands):
            brands.append(Brand(name, domain, design))
    return brands


def render_brand(brand: Brand, rng: random.Random, size: int = 32):
    """One image of a brand's logo or of a garment of a clothing line; returns (image, caption
    naming the brand, what was drawn: its attributes and the brand's name)."""
    if brand.domain == "logos":
        img, _, attrs = render_logo(rng, size, brand.attrs())
        caption = f"a logo of {brand.name}"
    else:
        img, _, attrs = render_garment(rng, size, brand.attrs())
        caption = f"a {brand.name} {attrs['kind']}"
    return img, caption, {**attrs, "name": brand.name}
