"""Mask exports for the trainers people fine-tune with: the fragment each tool reads to restrict
what trains, so that an adapter goes only on modules whose weights the mask leaves trainable.

One small module per tool; each exposes ``export(mask) -> Export`` and ``selects(fragment,
module_names) -> set`` (the tool's own matching rule, written from its source, which the tests
apply to the model's names). Adapter-able modules are those with a weight of two or more
dimensions (Linear, Conv2d); a module is allowed when every parameter it has is trainable.
"""
from __future__ import annotations

from freezeasguard.guard.mask import Mask
from freezeasguard.exports import ai_toolkit, diffusers_scripts, kohya, onetrainer, peft
from freezeasguard.exports.common import Export, adapter_modules  # noqa: F401

FORMATS = {"peft": peft, "diffusers": diffusers_scripts, "onetrainer": onetrainer, "ai-toolkit": ai_toolkit,
           "kohya": kohya}


def export(mask: Mask, fmt: str) -> Export:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    return FORMATS[fmt].export(mask)
