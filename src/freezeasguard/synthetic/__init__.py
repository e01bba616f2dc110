"""The built-in synthetic world (people, logos, clothes), its judges and the shipped tiny pipeline."""
from pathlib import Path

from freezeasguard.synthetic.world import (  # noqa: F401
    ATTRIBUTES,
    TRAITS,
    Identity,
    export_imagefolder,
    make_cast,
    random_identity,
    render_domain,
    render_garment,
    render_generic_person,
    render_logo,
    render_person,
    visible_traits,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_SD = ASSETS / "tiny-sd"
JUDGES = ASSETS / "judges"


def world_vocabulary() -> list[str]:
    """Caption words of the world, so the offline tokenizer keeps them whole."""
    from freezeasguard.synthetic import world as w
    words = set()
    for group in (w.PALETTE, *w.TRAITS.values(), w.EXPRESSIONS, w.BACKGROUNDS, w.SHIRT_COLOURS, w.SHAPES,
                  [s + "s" for s in w.SHAPES], w.LOGO_COLOURS, w.LOGO_COUNTS, w.LOGO_BACKGROUNDS, w.GARMENTS,
                  w.CLOTH_COLOURS, w.PATTERNS):
        for item in group:
            words.update(item.replace("-", " ").split())
    words.update("a photo of person wearing in front minimalist logo with on background plain t shirt face skin hair head and bald bun".split())
    return sorted(words)
