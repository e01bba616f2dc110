"""What every export shares: the result type and which modules an adapter may go on."""
from __future__ import annotations

from dataclasses import dataclass

from freezeasguard.guard.mask import Mask


@dataclass
class Export:
    format: str
    fragment: str          # what to paste into the tool's config or command line
    how_to_use: str        # one line
    exact: bool = True     # False where the tool cannot express the mask and it was rounded (freezing more)


def adapter_modules(mask: Mask) -> tuple[list[str], list[str]]:
    """(allowed, frozen) adapter-able module names, in model order: a module is frozen when any
    of its parameters is (an adapter on it changes its weight)."""
    frozen_params = set(mask.frozen_names)
    order, shapes, frozen = [], {}, set()
    for name, shape in zip(mask.names, mask.shapes):
        module, _, kind = name.rpartition(".")    # Z-Image has parameters of no module (x_pad_token)
        if module not in shapes:
            order.append(module)
            shapes[module] = None
        if kind == "weight":
            shapes[module] = tuple(shape)
        if name in frozen_params:
            frozen.add(module)
    able = [m for m in order if shapes[m] is not None and len(shapes[m]) >= 2]
    return [m for m in able if m not in frozen], [m for m in able if m in frozen]
