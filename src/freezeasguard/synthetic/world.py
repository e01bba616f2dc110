"""The built-in synthetic world: named people (the illegal domain), minimalist logos and clothes
(innocent domains), drawn procedurally and deterministically from seeds, with captions that say
what is drawn. Images are drawn at 4x and downsampled, so small traits survive at 32-64 px.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from freezeasguard.io import atomic_write_json
from freezeasguard.outputs import write_image_folder

SCALE = 4  # draw at 4x, then downsample with antialiasing
# Bumped whenever renders change: judges and caches carry it, so none made for other renders is reused.
WORLD_VERSION = 3

PALETTE = {
    "red": (205, 40, 45), "green": (40, 150, 70), "blue": (45, 80, 200), "yellow": (235, 200, 40),
    "black": (25, 25, 25), "white": (245, 245, 245), "orange": (240, 130, 30), "purple": (130, 60, 170),
    "pink": (235, 130, 170), "brown": (120, 75, 40), "gray": (130, 130, 130),
}
SKIN = {"pale": (250, 222, 200), "tan": (205, 150, 105), "brown": (140, 90, 55), "dark": (75, 45, 30)}
HAIR_COLOURS = {"black": (25, 20, 18), "brown": (120, 70, 30), "blonde": (240, 210, 100), "red": (200, 60, 25),
                "white": (240, 240, 240)}
FACE_SHAPES = ("round", "long", "square")
HAIR_STYLES = ("short", "long", "bald", "bun", "curly")
MARKS = ("glasses", "beard", "none")
# What a person is: the traits the judges read and a generic caption names. Every trait is a
# large region or outline (face, skin, hair, glasses, beard): smaller ones (eye colour, nose,
# brows) were 1-2 pixels after the VAE and no sample ever showed them.
TRAITS = {"face_shape": FACE_SHAPES, "skin": tuple(SKIN), "hair_style": HAIR_STYLES,
          "hair_colour": tuple(HAIR_COLOURS), "mark": MARKS}
# What a photo varies, each named in the caption: variation a caption does not name is noise
# that a small model can only average into a blur.
EXPRESSIONS = ("smiling", "neutral", "surprised")
BACKGROUNDS = ("a blue wall", "a white wall", "a brick wall", "the sea")
SHIRT_COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
LOGO_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
LOGO_COUNTS = ("one", "two")
LOGO_BACKGROUNDS = ("white", "black")
GARMENTS = ("t-shirt", "dress", "scarf", "trousers", "hat", "sweater")
CLOTH_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "pink", "gray")
PATTERNS = ("plain", "striped", "dotted", "checked")

NAME_SYLLABLES = ["ma", "ra", "quel", "lo", "ven", "ti", "sa", "dor", "el", "na", "kir", "os", "bel", "tor", "an",
              "mi", "ro", "ze", "lin", "ka", "vos", "tes", "ul", "fa", "ren", "do", "si", "mar", "cu", "ber"]


@dataclass(frozen=True)
class Identity:
    """A person: fixed traits (the keys of TRAITS) and a made-up full name."""
    name: str
    face_shape: str
    skin: str
    hair_style: str
    hair_colour: str
    mark: str

    def traits(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in TRAITS}


def _name(rng: random.Random) -> str:
    def word(n):
        return "".join(rng.choice(NAME_SYLLABLES) for _ in range(n)).capitalize()
    return f"{word(rng.choice((1, 2)))} {word(2)}"


def random_identity(rng: random.Random, name: str | None = None) -> Identity:
    return Identity(name or _name(rng), **{k: rng.choice(v) for k, v in TRAITS.items()})


def make_cast(seed: int = 0, size: int = 8) -> list[Identity]:
    """A cast of distinct named people; any seed gives a new cast. Every pair differs in at least
    two visible traits, so that a recogniser can tell them apart at 32 px."""
    rng = random.Random(f"cast-{seed}")
    cast: list[Identity] = []
    names = set()
    while len(cast) < size:
        p = random_identity(rng)
        if p.name in names:
            continue
        shown = visible_traits(p.traits())
        if all(sum(shown.get(k) != visible_traits(q.traits()).get(k) for k in TRAITS) >= 2 for q in cast):
            cast.append(p)
            names.add(p.name)
    return cast


# ------------------------------------------------------------------------------------------
# People
# ------------------------------------------------------------------------------------------

def _background(draw: ImageDraw.ImageDraw, S: int, kind: str):
    if kind == "a brick wall":
        draw.rectangle([0, 0, S, S], fill=(170, 75, 55))
        h = S // 6
        for row in range(7):
            off = (row % 2) * S // 6
            draw.line([0, row * h, S, row * h], fill=(225, 215, 205), width=SCALE)
            for x in range(-off, S, S // 3):
                draw.line([x, row * h, x, (row + 1) * h], fill=(225, 215, 205), width=SCALE)
    elif kind == "the sea":
        draw.rectangle([0, 0, S, S // 2], fill=(160, 205, 245))
        draw.rectangle([0, S // 2, S, S], fill=(30, 90, 170))
    else:
        draw.rectangle([0, 0, S, S], fill={"a blue wall": (110, 150, 225), "a white wall": (235, 235, 230)}[kind])


def visible_traits(traits: dict[str, str]) -> dict[str, str]:
    """The traits a photo shows: a bald person's hair colour shows only in a beard."""
    if traits["hair_style"] == "bald" and traits["mark"] != "beard":
        return {k: v for k, v in traits.items() if k != "hair_colour"}
    return dict(traits)


def trait_phrase(traits: dict[str, str], drop=frozenset()) -> str:
    """The words a caption uses for a person's visible traits: "with a round face, tan skin, short
    red hair and glasses"; traits in ``drop`` are left out ("" when all are)."""
    t = {k: v for k, v in visible_traits(traits).items() if k not in drop}
    parts = []
    if "face_shape" in t:
        parts.append(f"a {t['face_shape']} face")
    if "skin" in t:
        parts.append(f"{t['skin']} skin")
    colour = [t["hair_colour"]] if "hair_colour" in t else []
    style = t.get("hair_style")
    if style == "bald":
        parts.append("a bald head")
    elif style == "bun":
        parts.append(" ".join(colour + ["hair in a bun"]))
    elif style or colour:
        parts.append(" ".join(([style] if style else []) + colour + ["hair"]))
    if t.get("mark") == "glasses":
        parts.append("glasses")
    elif t.get("mark") == "beard":
        parts.append(" ".join(["a"] + (colour if style == "bald" else []) + ["beard"]))
    if not parts:
        return ""
    return "with " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def person_caption(subject: str, scene: dict[str, str], traits: dict[str, str] | None = None,
                   drop=frozenset()) -> str:
    """"a photo of Sara Belfa smiling, wearing a red shirt, in front of a blue wall"; with
    ``traits`` (generic people) the traits follow the subject: "a photo of a person with a round
    face, ... hair, smiling, ..."."""
    who = subject
    if traits is not None:
        phrase = trait_phrase(traits, drop)
        who = f"{subject} {phrase}," if phrase else subject
    return f"a photo of {who} {scene['expression']}, wearing a {scene['shirt']} shirt, in front of {scene['background']}"


def render_person(person: Identity, rng: random.Random, size: int = 32):
    """One photo of ``person``; returns (image, caption naming the person, what was drawn)."""
    scene = {"expression": rng.choice(EXPRESSIONS), "background": rng.choice(BACKGROUNDS),
             "shirt": rng.choice(SHIRT_COLOURS)}
    S = size * SCALE
    img = Image.new("RGB", (S, S))
    _background(ImageDraw.Draw(img), S, scene["background"])
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy, r = S / 2, S * 0.47, S * 0.25
    skin, hair = SKIN[person.skin], HAIR_COLOURS[person.hair_colour]
    d.ellipse([cx - 1.8 * r, cy + 1.0 * r, cx + 1.8 * r, cy + 3.0 * r], fill=PALETTE[scene["shirt"]])
    if person.hair_style == "long":   # hair behind the face, down to the shoulders
        d.rounded_rectangle([cx - 1.25 * r, cy - 1.2 * r, cx + 1.25 * r, cy + 1.45 * r], radius=r * 0.5, fill=hair)
    elif person.hair_style == "curly":  # a ring of curls around the head
        for a in range(0, 360, 30):
            x, y = cx + 1.05 * r * math.cos(math.radians(a)), cy - 0.15 * r + 1.0 * r * math.sin(math.radians(a))
            if y < cy + 0.5 * r:
                d.ellipse([x - 0.38 * r, y - 0.38 * r, x + 0.38 * r, y + 0.38 * r], fill=hair)
    w, h = {"round": (1.0, 1.0), "long": (0.72, 1.25), "square": (1.0, 1.0)}[person.face_shape]
    box = [cx - w * r, cy - h * r, cx + w * r, cy + h * r]
    if person.face_shape == "square":
        d.rounded_rectangle(box, radius=r * 0.12, fill=skin)
    else:
        d.ellipse(box, fill=skin)
    if person.hair_style in ("short", "long", "curly"):
        d.chord([cx - w * r * 1.08, cy - h * r * 1.15, cx + w * r * 1.08, cy + h * r * 0.25], 180, 360, fill=hair)
    elif person.hair_style == "bun":
        d.chord([cx - w * r, cy - h * r * 1.08, cx + w * r, cy + h * r * 0.15], 180, 360, fill=hair)
        d.ellipse([cx - 0.45 * r, cy - h * r - 0.8 * r, cx + 0.45 * r, cy - h * r + 0.1 * r], fill=hair)
    ey = cy - 0.08 * r
    for side in (-1, 1):
        ex = cx + side * 0.4 * r * w
        d.ellipse([ex - 0.16 * r, ey - 0.13 * r, ex + 0.16 * r, ey + 0.13 * r], fill=(250, 250, 250))
        d.ellipse([ex - 0.09 * r, ey - 0.09 * r, ex + 0.09 * r, ey + 0.09 * r], fill=(40, 30, 25))
    my, mouth = cy + 0.5 * r, (150, 40, 50)
    if scene["expression"] == "smiling":
        d.chord([cx - 0.35 * r, my - 0.3 * r, cx + 0.35 * r, my + 0.2 * r], 0, 180, fill=mouth)
    elif scene["expression"] == "surprised":
        d.ellipse([cx - 0.15 * r, my - 0.12 * r, cx + 0.15 * r, my + 0.22 * r], fill=mouth)
    else:
        d.line([cx - 0.25 * r, my, cx + 0.25 * r, my], fill=mouth, width=SCALE * 2)
    if person.mark == "glasses":
        for side in (-1, 1):
            ex = cx + side * 0.4 * r * w
            d.ellipse([ex - 0.3 * r, ey - 0.26 * r, ex + 0.3 * r, ey + 0.26 * r], outline=(15, 15, 15), width=SCALE * 3)
        d.line([cx - 0.12 * r, ey, cx + 0.12 * r, ey], fill=(15, 15, 15), width=SCALE * 2)
    elif person.mark == "beard":
        d.chord([cx - w * r, cy + 0.05 * r, cx + w * r, cy + h * r * 1.1], 0, 180, fill=hair)
        d.line([cx - 0.25 * r, my, cx + 0.25 * r, my], fill=mouth, width=SCALE * 2)
    # a photo's framing varies a little; kept small, as a small model learns little from it
    scale, angle = rng.uniform(0.95, 1.05), rng.uniform(-4, 4)
    dx, dy = rng.uniform(-0.03, 0.03) * S, rng.uniform(-0.03, 0.03) * S
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=(cx, cy))
    layer = layer.resize((int(S * scale), int(S * scale)), Image.BICUBIC)
    img.paste(layer, (int((S - layer.width) / 2 + dx), int((S - layer.height) / 2 + dy)), layer)
    img = img.resize((size, size), Image.LANCZOS)
    return img, person_caption(person.name, scene), {"name": person.name, **scene}


def render_generic_person(rng: random.Random, size: int = 32, drop_rate: float = 0.0):
    """A random unnamed person, captioned "a photo of a person with <traits>, ..." (each trait
    left out of the caption with probability ``drop_rate``, so the model also learns to draw
    a person whose traits the caption does not say); attributes hold the traits drawn."""
    p = random_identity(rng, name="a person")
    img, _, scene = render_person(p, rng, size)
    drop = frozenset(k for k in TRAITS if rng.random() < drop_rate)
    return img, person_caption("a person", scene, p.traits(), drop), {**scene, **visible_traits(p.traits())}


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
    """One or two copies of a coloured shape on a plain background. (Two different shapes in a
    spatial relation, as the world first had, ask a 2.5 M-parameter model to bind colours to
    shapes and places; it never did, so no method's logos could be judged right.)"""
    a = attrs or {}
    shape, colour = a.get("shape") or rng.choice(SHAPES), a.get("colour") or rng.choice(LOGO_COLOURS)
    count, bg = a.get("count") or rng.choice(LOGO_COUNTS), a.get("background") or rng.choice(LOGO_BACKGROUNDS)
    S = size * SCALE
    img = Image.new("RGB", (S, S), PALETTE[bg])
    d = ImageDraw.Draw(img)
    jx, jy = rng.uniform(-0.03, 0.03) * S, rng.uniform(-0.03, 0.03) * S
    if count == "one":
        _shape(d, shape, S / 2 + jx, S / 2 + jy, S * rng.uniform(0.28, 0.33), PALETTE[colour])
    else:
        r = S * rng.uniform(0.18, 0.21)
        for x in (0.28, 0.72):
            _shape(d, shape, S * x + jx, S / 2 + jy, r, PALETTE[colour])
    img = img.resize((size, size), Image.LANCZOS)
    what = f"one {colour} {shape}" if count == "one" else f"two {colour} {shape}s"
    caption = f"a minimalist logo with {what} on a {bg} background"
    return img, caption, {"shape": shape, "colour": colour, "count": count, "background": bg}


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
    "logos": {"shape": SHAPES, "colour": LOGO_COLOURS, "count": LOGO_COUNTS, "background": LOGO_BACKGROUNDS},
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
                yield render_generic_person(rng, size)
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
                       cast_size: int = 8, subject: str | None = None, generic: bool = False,
                       overwrite: bool = False) -> Path:
    """Write a domain as an imagefolder with metadata.jsonl (file_name, text, name/attributes)."""
    cast = make_cast(cast_seed, cast_size) if domain == "people" and not generic else None
    samples = list(render_domain(domain, n, seed, size, cast, subject, generic))
    rows = [{"file_name": f"{i:05d}.png", "text": caption, **attrs} for i, (_, caption, attrs) in enumerate(samples)]

    def cast_file(folder):
        if cast:
            atomic_write_json(folder / "cast.json", [asdict(p) for p in cast])
    return write_image_folder(out_dir, [img for img, _, _ in samples], rows, "world export", overwrite=overwrite,
                              extra=cast_file)
