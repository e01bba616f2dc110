"""The built-in synthetic world (people, logos, clothes), its judges and the shipped tiny pipeline."""
from pathlib import Path

from .world import (ATTRIBUTES, Identity, export_imagefolder, make_cast, random_identity, render_domain,  # noqa: F401
                    render_garment, render_logo, render_person)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_SD = ASSETS / "tiny-sd"
JUDGES = ASSETS / "judges"


def world_vocabulary() -> list[str]:
    """Caption words of the world, so the offline tokenizer keeps them whole."""
    from . import world as w
    words = set()
    for group in (w.PALETTE, w.SKIN, w.HAIR_COLOURS, w.EYE_COLOURS, w.FACE_SHAPES, w.HAIR_STYLES, w.MARKS,
                  w.EXPRESSIONS, w.BACKGROUNDS, w.ACCESSORIES, w.SHAPES, w.LOGO_COLOURS, w.LAYOUTS,
                  w.LOGO_BACKGROUNDS, w.GARMENTS, w.CLOTH_COLOURS, w.PATTERNS):
        for item in group:
            words.update(item.replace("-", " ").split())
    words.update("a photo of person wearing in front minimalist logo with on background plain t shirt".split())
    return sorted(words)
