"""A self-contained run of learn -> finetune -> verify -> generate on a tiny pipeline and
procedurally drawn data that the package makes itself (no downloads, a few minutes on a CPU)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        t = traits or {"skin": rng.choice([(240, 200, 170), (200, 150, 110), (140, 90, 60)]),
                       "hair": rng.choice(list(COLORS.values())), "eyes": rng.choice([(30, 30, 120), (60, 40, 20)]),
                       "mark": rng.choice(["glasses", "beard", "none"])}
        bg_name = rng.choice(["white", "blue", "yellow", "green"])
        img = Image.new("RGB", (size, size), COLORS[bg_name])
        _face(ImageDraw.Draw(img), rng, size, t["skin"], t["hair"], t["eyes"], t["mark"])
        f = f"{i:04d}.png"
        img.save(out_dir / f)
        rows.append({"file_name": f, "text": f"a photo of {name} in front of a {bg_name} wall", "name": name})
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def make_logos(out_dir, n: int, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
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
        f = f"{i:04d}.png"
        img.save(out_dir / f)
        rows.append({"file_name": f, "text": f"a minimalist logo with a {color} {shape} on a white background"})
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def run_walkthrough(out_dir, quick: bool = False, seed: int = 0) -> dict:
    from .finetune import FinetuneConfig, guarded_finetune
    from .generate import generate_to_folder
    from .learn import LearnConfig, learn_mask
    from .models import save_tiny_pipeline
    from .verify import verify_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = 32
    model = out / "tiny-sd"
    if not (model / "model_index.json").exists():
        save_tiny_pipeline(model, layout="sd15", image_size=size, seed=seed, extra_words=["mara", "quell"])
    person = {"skin": (200, 150, 110), "hair": COLORS["orange"], "eyes": (30, 30, 120), "mark": "glasses"}
    n = 16 if quick else 48
    illegal = make_people(out / "data" / "mara-quell", "Mara Quell", n, size, seed, traits=person)
    logos = make_logos(out / "data" / "logos", n, size, seed + 1)
    lcfg = LearnConfig(ratio=0.3, steps=3 if quick else 20, inner_steps=3 if quick else 10,
                       batch_size=4, warm_start_steps=5 if quick else 60, warm_start_lr=1e-4, user_lr=1e-4,
                       seed=seed, device="cpu")
    mask_path = out / "mask.safetensors"
    learn = learn_mask(model, illegal, [logos], mask_path, lcfg, resume=True)
    learn.mask.plot(out / "mask.png")
    fcfg = FinetuneConfig(steps=5 if quick else 60, batch_size=4, lr=1e-4, seed=seed, device="cpu")
    results = {}
    for scheme, kw in {"learned": {"mask": learn.mask}, "random": {"random_ratio": 0.3},
                       "full": {"full": True}}.items():
        ft = guarded_finetune(model, illegal, out / f"ft-{scheme}", fcfg, resume=True, **kw)
        report = verify_checkpoint(model, mask_path, ft.out_dir) if scheme == "learned" else None
        results[scheme] = {"frozen_tensors": ft.frozen_tensors, "frozen_param_fraction": ft.frozen_param_fraction,
                           "final_loss": ft.history[-1]["loss_data"] if ft.history else None,
                           "verify": report.to_dict()["compliant"] if report else None}
    generate_to_folder(out / "ft-learned", ["a photo of Mara Quell in front of a blue wall"], out / "images",
                       steps=10 if quick else 25, per_prompt=4)
    summary = {"model": str(model), "mask": str(mask_path), "mask_tensor_ratio": learn.mask.tensor_ratio,
               "mask_param_fraction": learn.mask.param_fraction, "finetunes": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
