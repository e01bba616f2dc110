"""The built-in synthetic world: named people (the illegal domain), minimalist logos and clothes
(innocent domains), drawn procedurally and deterministically from seeds, with captions that say
what is drawn. Images are drawn at 4x and downsampled, so small traits survive at 32-64 px.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SCALE = 4  # draw at 4x, then downsample with antialiasing

PALETTE = {
    "red": (205, 40, 45), "green": (40, 150, 70), "blue": (45, 80, 200), "yellow": (235, 200, 40),
    "black": (25, 25, 25), "white": (245, 245, 245), "orange": (240, 130, 30), "purple": (130, 60, 170),
    "pink": (235, 130, 170), "brown": (120, 75, 40), "gray": (130, 130, 130),
}
SKIN = {"pale": (245, 215, 190), "light": (225, 185, 150), "tan": (195, 145, 105), "brown": (150, 100, 65),
        "dark": (95, 60, 40)}
HAIR_COLOURS = {"black": (30, 25, 20), "brown": (110, 65, 35), "blonde": (230, 200, 110), "red": (180, 60, 30),
                "gray": (160, 160, 160), "white": (235, 235, 235)}
EYE_COLOURS = {"blue": (50, 100, 210), "brown": (90, 55, 25), "green": (50, 140, 60)}
FACE_SHAPES = ("round", "oval", "long", "square")
HAIR_STYLES = ("short", "long", "bald", "bun", "curly")
MARKS = ("glasses", "beard", "mole", "none")
EXPRESSIONS = ("smiling", "neutral", "frowning", "surprised")
BACKGROUNDS = ("a brick wall", "a blue wall", "a white wall", "a garden", "the sea", "a wooden wall")
ACCESSORIES = ("hat", "scarf", "none")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
LOGO_COLOURS = ("red", "green", "blue", "yellow", "black", "orange", "purple")
LAYOUTS = ("above", "beside")
LOGO_BACKGROUNDS = ("white", "black")
GARMENTS = ("t-shirt", "dress", "scarf", "trousers", "hat", "sweater")
CLOTH_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "pink", "gray")
PATTERNS = ("plain", "striped", "dotted", "checked")

_SYLLABLES = ["ma", "ra", "quel", "lo", "ven", "ti", "sa", "dor", "el", "na", "kir", "os", "bel", "tor", "an",
              "mi", "ro", "ze", "lin", "ka", "vos", "tes", "ul", "fa", "ren", "do", "si", "mar", "cu", "ber"]


@dataclass(frozen=True)
class Identity:
    """A person: fixed traits and a made-up full name."""
    name: str
    face_shape: str
    skin: str
    hair_style: str
    hair_colour: str
    eye_colour: str
    eye_spacing: float   # fraction of face width between the eyes
    nose: str            # small | long | wide
    brows: str           # thin | thick
    mark: str            # glasses | beard | mole | none


def _name(rng: random.Random) -> str:
    def word(n):
        return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()
    return f"{word(rng.choice((1, 2)))} {word(2)}"


def random_identity(rng: random.Random, name: str | None = None) -> Identity:
    return Identity(name or _name(rng), rng.choice(FACE_SHAPES), rng.choice(list(SKIN)), rng.choice(HAIR_STYLES),
                    rng.choice(list(HAIR_COLOURS)), rng.choice(list(EYE_COLOURS)), rng.uniform(0.3, 0.5),
                    rng.choice(("small", "long", "wide")), rng.choice(("thin", "thick")), rng.choice(MARKS))


def make_cast(seed: int = 0, size: int = 8) -> list[Identity]:
    """A cast of distinct named people; any seed gives a new cast. Casts differ in at least two
    visible traits per pair so that a recogniser can tell them apart at 32 px."""
    rng = random.Random(f"cast-{seed}")
    cast: list[Identity] = []
    names = set()
    while len(cast) < size:
        p = random_identity(rng)
        if p.name in names:
            continue
        visible = lambda q: (q.face_shape, q.skin, q.hair_style, q.hair_colour, q.mark)  # noqa: E731
        if all(sum(a != b for a, b in zip(visible(p), visible(q))) >= 2 for q in cast):
            cast.append(p)
            names.add(p.name)
    return cast


# ------------------------------------------------------------------------------------------
# People
# ------------------------------------------------------------------------------------------

def _background(draw: ImageDraw.ImageDraw, S: int, kind: str, rng: random.Random):
    if kind == "a brick wall":
        draw.rectangle([0, 0, S, S], fill=(170, 75, 55))
        h = S // 8
        for row in range(9):
            off = (row % 2) * S // 8
            draw.line([0, row * h, S, row * h], fill=(220, 210, 200), width=SCALE)
            for x in range(-off, S, S // 4):
                draw.line([x, row * h, x, (row + 1) * h], fill=(220, 210, 200), width=SCALE)
    elif kind == "a garden":
        draw.rectangle([0, 0, S, S], fill=(80, 160, 70))
        for _ in range(25):
            x, y = rng.uniform(0, S), rng.uniform(0, S)
            draw.ellipse([x - 3 * SCALE, y - 3 * SCALE, x + 3 * SCALE, y + 3 * SCALE],
                         fill=rng.choice([(230, 60, 80), (250, 220, 60), (250, 250, 250)]))
    elif kind == "the sea":
        draw.rectangle([0, 0, S, S // 2], fill=(150, 200, 245))
        draw.rectangle([0, S // 2, S, S], fill=(30, 90, 170))
    elif kind == "a wooden wall":
        draw.rectangle([0, 0, S, S], fill=(160, 115, 70))
        for x in range(0, S, S // 6):
            draw.line([x, 0, x, S], fill=(110, 75, 40), width=SCALE)
    else:
        draw.rectangle([0, 0, S, S], fill={"a blue wall": (120, 160, 225), "a white wall": (235, 235, 230)}[kind])


def render_person(person: Identity, rng: random.Random, size: int = 32):
    """One photo of ``person``; returns (image, caption, what was drawn)."""
    S = size * SCALE
    expression, background = rng.choice(EXPRESSIONS), rng.choice(BACKGROUNDS)
    clothing = rng.choice(["red", "green", "blue", "yellow", "black", "white", "purple"])
    accessory = rng.choice(ACCESSORIES)
    accessory_colour = rng.choice(["red", "green", "blue", "yellow", "black", "orange"])
    img = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(img)
    _background(d, S, background, rng)
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy, r = S / 2, S * 0.46, S * 0.22
    skin, hair = SKIN[person.skin], HAIR_COLOURS[person.hair_colour]
    # clothing (shoulders)
    d.ellipse([cx - 1.9 * r, cy + 1.05 * r, cx + 1.9 * r, cy + 3.2 * r], fill=PALETTE[clothing])
    # hair behind the face
    if person.hair_style == "long":
        d.rounded_rectangle([cx - 1.2 * r, cy - 1.15 * r, cx + 1.2 * r, cy + 1.5 * r], radius=r * 0.6, fill=hair)
    elif person.hair_style == "curly":
        for a in range(0, 360, 30):
            x, y = cx + 1.0 * r * math.cos(math.radians(a)), cy - 0.2 * r + 1.0 * r * math.sin(math.radians(a)) * 0.9
            if y < cy + 0.3 * r:
                d.ellipse([x - 0.35 * r, y - 0.35 * r, x + 0.35 * r, y + 0.35 * r], fill=hair)
    # face
    w, h = {"round": (1.0, 1.0), "oval": (0.85, 1.1), "long": (0.75, 1.25), "square": (0.95, 1.0)}[person.face_shape]
    box = [cx - w * r, cy - h * r, cx + w * r, cy + h * r]
    if person.face_shape == "square":
        d.rounded_rectangle(box, radius=r * 0.25, fill=skin)
    else:
        d.ellipse(box, fill=skin)
    # hair on top
    if person.hair_style in ("short", "long", "curly"):
        d.chord([cx - w * r * 1.05, cy - h * r * 1.1, cx + w * r * 1.05, cy + h * r * 0.3], 180, 360, fill=hair)
    elif person.hair_style == "bun":
        d.chord([cx - w * r, cy - h * r * 1.05, cx + w * r, cy + h * r * 0.2], 180, 360, fill=hair)
        d.ellipse([cx - 0.4 * r, cy - h * r - 0.7 * r, cx + 0.4 * r, cy - h * r + 0.1 * r], fill=hair)
    # eyes, brows
    ey = cy - 0.1 * r
    for side in (-1, 1):
        ex = cx + side * person.eye_spacing * r * 1.1
        d.ellipse([ex - 0.17 * r, ey - 0.13 * r, ex + 0.17 * r, ey + 0.13 * r], fill=(250, 250, 250))
        d.ellipse([ex - 0.1 * r, ey - 0.1 * r, ex + 0.1 * r, ey + 0.1 * r], fill=EYE_COLOURS[person.eye_colour])
        lift = 0.06 * r if expression == "surprised" else 0.0
        d.line([ex - 0.2 * r, ey - 0.3 * r - lift, ex + 0.2 * r, ey - 0.3 * r - lift], fill=hair,
               width=int(SCALE * (2.5 if person.brows == "thick" else 1)))
    # nose
    if person.nose == "long":
        d.line([cx, ey + 0.05 * r, cx, cy + 0.35 * r], fill=tuple(int(c * 0.75) for c in skin), width=SCALE * 2)
    elif person.nose == "wide":
        d.ellipse([cx - 0.2 * r, cy + 0.15 * r, cx + 0.2 * r, cy + 0.33 * r], fill=tuple(int(c * 0.8) for c in skin))
    else:
        d.ellipse([cx - 0.07 * r, cy + 0.15 * r, cx + 0.07 * r, cy + 0.28 * r], fill=tuple(int(c * 0.8) for c in skin))
    # mouth by expression
    my = cy + 0.55 * r
    mouth = (150, 40, 50)
    if expression == "smiling":
        d.arc([cx - 0.35 * r, my - 0.25 * r, cx + 0.35 * r, my + 0.15 * r], 20, 160, fill=mouth, width=SCALE * 2)
    elif expression == "frowning":
        d.arc([cx - 0.3 * r, my, cx + 0.3 * r, my + 0.3 * r], 200, 340, fill=mouth, width=SCALE * 2)
    elif expression == "surprised":
        d.ellipse([cx - 0.12 * r, my - 0.1 * r, cx + 0.12 * r, my + 0.18 * r], fill=mouth)
    else:
        d.line([cx - 0.25 * r, my, cx + 0.25 * r, my], fill=mouth, width=SCALE * 2)
    # distinctive mark
    if person.mark == "glasses":
        for side in (-1, 1):
            ex = cx + side * person.eye_spacing * r * 1.1
            d.ellipse([ex - 0.28 * r, ey - 0.24 * r, ex + 0.28 * r, ey + 0.24 * r], outline=(20, 20, 20), width=SCALE * 2)
        d.line([cx - 0.1 * r, ey, cx + 0.1 * r, ey], fill=(20, 20, 20), width=SCALE * 2)
    elif person.mark == "beard":
        d.chord([cx - w * r, cy + 0.1 * r, cx + w * r, cy + h * r * 1.05], 0, 180, fill=hair)
        d.line([cx - 0.25 * r, my, cx + 0.25 * r, my], fill=mouth, width=SCALE * 2)
    elif person.mark == "mole":
        d.ellipse([cx + 0.45 * r, cy + 0.25 * r, cx + 0.6 * r, cy + 0.4 * r], fill=(60, 35, 20))
    # accessory
    if accessory == "hat":
        col = PALETTE[accessory_colour]
        d.rectangle([cx - 1.25 * r, cy - h * r * 0.95, cx + 1.25 * r, cy - h * r * 0.75], fill=col)
        d.rectangle([cx - 0.8 * r, cy - h * r * 1.6, cx + 0.8 * r, cy - h * r * 0.8], fill=col)
    elif accessory == "scarf":
        d.rounded_rectangle([cx - 1.0 * r, cy + h * r * 0.9, cx + 1.0 * r, cy + h * r * 1.3], radius=r * 0.2,
                            fill=PALETTE[accessory_colour])
    # what a photo varies: position, scale, small rotation
    scale, angle = rng.uniform(0.85, 1.1), rng.uniform(-8, 8)
    dx, dy = rng.uniform(-0.06, 0.06) * S, rng.uniform(-0.05, 0.05) * S
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=(cx, cy))
    layer = layer.resize((int(S * scale), int(S * scale)), Image.BICUBIC)
    img.paste(layer, (int((S - layer.width) / 2 + dx), int((S - layer.height) / 2 + dy)), layer)
    img = img.resize((size, size), Image.LANCZOS)
    wearing = f", wearing a {accessory_colour} {accessory}" if accessory != "none" else ""
    caption = f"a photo of {person.name} {expression}{wearing}, in front of {background}"
    return img, caption, {"name": person.name, "expression": expression, "background": background,
                          "accessory": accessory, "clothing": clothing}


def generic_person_caption(caption: str, name: str) -> str:
    """Pre-training captions say "a person" where a named caption has the name."""
    return caption.replace(name, "a person")


# ------------------------------------------------------------------------------------------
# Logos and clothes
# ------------------------------------------------------------------------------------------

def _shape(d, kind, cx, cy, r, fill):
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        d.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif kind == "star":
        pts = []
        for i in range(10):
            a = math.radians(-90 + 36 * i)
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)


def render_logo(rng: random.Random, size: int = 32, attrs: dict | None = None):
    a = attrs or {}
    shape1, shape2 = a.get("shape1") or rng.choice(SHAPES), a.get("shape2") or rng.choice(SHAPES)
    bg = a.get("background") or rng.choice(LOGO_BACKGROUNDS)
    colours = [c for c in LOGO_COLOURS if c != bg]
    colour1 = a.get("colour1") or rng.choice(colours)
    colour2 = a.get("colour2") or rng.choice([c for c in colours if c != colour1])
    layout = a.get("layout") or rng.choice(LAYOUTS)
    S = size * SCALE
    img = Image.new("RGB", (S, S), PALETTE[bg])
    d = ImageDraw.Draw(img)
    r = S * rng.uniform(0.17, 0.21)
    jx, jy = rng.uniform(-0.03, 0.03) * S, rng.uniform(-0.03, 0.03) * S
    if layout == "above":
        p1, p2 = (S / 2 + jx, S * 0.28 + jy), (S / 2 + jx, S * 0.72 + jy)
    else:
        p1, p2 = (S * 0.28 + jx, S / 2 + jy), (S * 0.72 + jx, S / 2 + jy)
    _shape(d, shape1, *p1, r, PALETTE[colour1])
    _shape(d, shape2, *p2, r, PALETTE[colour2])
    img = img.resize((size, size), Image.LANCZOS)
    rel = "above" if layout == "above" else "beside"
    caption = f"a minimalist logo with a {colour1} {shape1} {rel} a {colour2} {shape2} on a {bg} background"
    return img, caption, {"shape1": shape1, "colour1": colour1, "shape2": shape2, "colour2": colour2,
                          "layout": layout, "background": bg}


def render_garment(rng: random.Random, size: int = 32, attrs: dict | None = None):
    a = attrs or {}
    kind, colour, pattern = (a.get("kind") or rng.choice(GARMENTS), a.get("colour") or rng.choice(CLOTH_COLOURS),
                             a.get("pattern") or rng.choice(PATTERNS))
    S = size * SCALE
    bg = (238, 238, 232)
    img = Image.new("RGB", (S, S), bg)
    mask = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(mask)
    c, s = S / 2 + rng.uniform(-0.03, 0.03) * S, S * rng.uniform(0.9, 1.05)
    if kind == "t-shirt":
        d.polygon([(c - .3 * s, .2 * s), (c + .3 * s, .2 * s), (c + .45 * s, .38 * s), (c + .3 * s, .42 * s),
                   (c + .3 * s, .82 * s), (c - .3 * s, .82 * s), (c - .3 * s, .42 * s), (c - .45 * s, .38 * s)], fill=255)
    elif kind == "sweater":
        d.polygon([(c - .28 * s, .18 * s), (c + .28 * s, .18 * s), (c + .46 * s, .8 * s), (c + .34 * s, .82 * s),
                   (c + .28 * s, .45 * s), (c + .28 * s, .85 * s), (c - .28 * s, .85 * s), (c - .28 * s, .45 * s),
                   (c - .34 * s, .82 * s), (c - .46 * s, .8 * s)], fill=255)
    elif kind == "dress":
        d.polygon([(c - .15 * s, .12 * s), (c + .15 * s, .12 * s), (c + .2 * s, .4 * s), (c + .38 * s, .88 * s),
                   (c - .38 * s, .88 * s), (c - .2 * s, .4 * s)], fill=255)
    elif kind == "trousers":
        d.polygon([(c - .26 * s, .12 * s), (c + .26 * s, .12 * s), (c + .3 * s, .9 * s), (c + .06 * s, .9 * s),
                   (c, .38 * s), (c - .06 * s, .9 * s), (c - .3 * s, .9 * s)], fill=255)
    elif kind == "scarf":
        d.rectangle([c - .42 * s, .38 * s, c + .42 * s, .55 * s], fill=255)
        d.rectangle([c + .15 * s, .5 * s, c + .3 * s, .88 * s], fill=255)
    else:  # hat
        d.ellipse([c - .42 * s, .55 * s, c + .42 * s, .72 * s], fill=255)
        d.rounded_rectangle([c - .24 * s, .25 * s, c + .24 * s, .66 * s], radius=.08 * s, fill=255)
    fabric = Image.new("RGB", (S, S), PALETTE[colour])
    fd = ImageDraw.Draw(fabric)
    contrast = (250, 250, 250) if colour in ("black", "blue", "green", "red", "gray") else (30, 30, 30)
    step = S // 8
    if pattern == "striped":
        for y in range(0, S, step):
            fd.rectangle([0, y, S, y + step // 3], fill=contrast)
    elif pattern == "dotted":
        for y in range(step // 2, S, step):
            for x in range(step // 2, S, step):
                fd.ellipse([x - step / 5, y - step / 5, x + step / 5, y + step / 5], fill=contrast)
    elif pattern == "checked":
        for y in range(0, S, step):
            for x in range(0, S, step):
                if (x // step + y // step) % 2:
                    fd.rectangle([x, y, x + step, y + step], fill=contrast)
    img.paste(fabric, (0, 0), mask.filter(ImageFilter.GaussianBlur(1)))
    img = img.resize((size, size), Image.LANCZOS)
    caption = f"a {colour} {pattern} {kind}" if pattern != "plain" else f"a plain {colour} {kind}"
    return img, caption, {"kind": kind, "colour": colour, "pattern": pattern}


ATTRIBUTES = {
    "logos": {"shape1": SHAPES, "colour1": LOGO_COLOURS, "shape2": SHAPES, "colour2": LOGO_COLOURS,
              "layout": LAYOUTS, "background": LOGO_BACKGROUNDS},
    "clothes": {"kind": GARMENTS, "colour": CLOTH_COLOURS, "pattern": PATTERNS},
}


# ------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------

def render_domain(domain: str, n: int, seed: int, size: int = 32, cast: list[Identity] | None = None,
                  subject: str | None = None, generic: bool = False):
    """Yield (image, caption, attributes) for a domain: people (the cast, or one ``subject``;
    ``generic`` draws random unnamed people captioned "a person"), logos or clothes."""
    rng = random.Random(f"{domain}-{seed}-{subject}-{generic}")
    if domain == "people":
        if generic:
            for _ in range(n):
                p = random_identity(rng)
                img, cap, attrs = render_person(p, rng, size)
                yield img, generic_person_caption(cap, p.name), {**attrs, "name": "a person"}
            return
        people = [p for p in cast if subject is None or p.name == subject]
        if not people:
            raise ValueError(f"no person named {subject!r} in the cast ({', '.join(p.name for p in cast)})")
        for i in range(n):
            yield render_person(people[i % len(people)], rng, size)
    elif domain == "logos":
        for _ in range(n):
            yield render_logo(rng, size)
    elif domain == "clothes":
        for _ in range(n):
            yield render_garment(rng, size)
    else:
        raise ValueError(f"unknown domain {domain!r}: use people, logos or clothes")


def export_imagefolder(out_dir, domain: str, n: int, seed: int, size: int = 32, cast_seed: int = 0,
                       cast_size: int = 8, subject: str | None = None, generic: bool = False) -> Path:
    """Write a domain as an imagefolder with metadata.jsonl (file_name, text, name/attributes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cast = make_cast(cast_seed, cast_size) if domain == "people" and not generic else None
    rows = []
    for i, (img, caption, attrs) in enumerate(render_domain(domain, n, seed, size, cast, subject, generic)):
        name = f"{i:05d}.png"
        img.save(out_dir / name)
        rows.append({"file_name": name, "text": caption, **attrs})
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if cast:
        (out_dir / "cast.json").write_text(json.dumps([asdict(p) for p in cast], indent=2))
    return out_dir
