"""Minimal procedurally drawn datasets (one person's portraits; logos) for tests and the
mask-agreement benchmark: fast to draw at any size. The full synthetic world is in synthetic/."""
from __future__ import annotations

import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

from freezeasguard.outputs import write_image_folder

logger = logging.getLogger(__name__)

COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
          "black": (20, 20, 20), "white": (245, 245, 245), "orange": (240, 130, 30), "purple": (130, 50, 160)}


def _face(draw, rng, size, skin, hair, eyes, mark):
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    r = size * rng.uniform(0.28, 0.33)
    draw.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 1.3], fill=hair)
    draw.ellipse([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r], fill=skin)
    for dx in (-0.35, 0.35):
        ex, ey = cx + dx * r, cy - 0.1 * r
        draw.ellipse([ex - r * 0.12, ey - r * 0.12, ex + r * 0.12, ey + r * 0.12], fill=eyes)
    if mark == "glasses":
        draw.line([cx - 0.55 * r, cy - 0.1 * r, cx + 0.55 * r, cy - 0.1 * r], fill=(0, 0, 0), width=1)
    elif mark == "beard":
        draw.chord([cx - 0.6 * r, cy + 0.2 * r, cx + 0.6 * r, cy + r], 0, 180, fill=hair)


def make_people(out_dir, name: str, n: int, size: int, seed: int, traits=None) -> Path:
    """Portraits: a named person has fixed traits; unnamed people get random ones."""
    rng = random.Random(seed)
    images, rows = [], []
    for i in range(n):
        t = traits or {"skin": rng.choice([(240, 200, 170), (200, 150, 110), (140, 90, 60)]),
                       "hair": rng.choice(list(COLORS.values())), "eyes": rng.choice([(30, 30, 120), (60, 40, 20)]),
                       "mark": rng.choice(["glasses", "beard", "none"])}
        bg_name = rng.choice(["white", "blue", "yellow", "green"])
        img = Image.new("RGB", (size, size), COLORS[bg_name])
        _face(ImageDraw.Draw(img), rng, size, t["skin"], t["hair"], t["eyes"], t["mark"])
        images.append(img)
        rows.append({"file_name": f"{i:04d}.png", "text": f"a photo of {name} in front of a {bg_name} wall", "name": name})
    return write_image_folder(out_dir, images, rows, "toydata", overwrite=True)


def make_logos(out_dir, n: int, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    images, rows = [], []
    for i in range(n):
        shape, color = rng.choice(["circle", "square", "triangle"]), rng.choice(["red", "green", "blue", "black"])
        img = Image.new("RGB", (size, size), COLORS["white"])
        d = ImageDraw.Draw(img)
        c, r = size / 2 + rng.uniform(-2, 2), size * rng.uniform(0.25, 0.35)
        box = [c - r, c - r, c + r, c + r]
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=COLORS[color])
        images.append(img)
        rows.append({"file_name": f"{i:04d}.png", "text": f"a minimalist logo with a {color} {shape} on a white background"})
    return write_image_folder(out_dir, images, rows, "toydata", overwrite=True)
