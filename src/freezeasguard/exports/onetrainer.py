"""OneTrainer: the LoRA tab's layer filter (``layer_filter`` with ``layer_filter_regex``).

OneTrainer's rule (modules/util/ModuleFilter.py, LoRAModuleWrapper): the filter string is split
on commas; each stripped piece is a regex searched in the module's name relative to the UNet
(re.search) when layer_filter_regex is on, else a substring; a Linear or Conv2d module is adapted
when any piece matches, and a piece that matches nothing is an error. The export gives one
anchored, escaped regex per allowed module, so exactly the allowed modules match and every piece
matches one.
"""
from __future__ import annotations

import json
import re

from freezeasguard.exports.common import Export, adapter_modules


def export(mask) -> Export:
    allowed, _ = adapter_modules(mask)
    if not allowed:
        raise ValueError("every adapter-able module is frozen: there is nothing a LoRA may train under this mask "
                         "(an empty OneTrainer filter would train every layer)")
    fragment = json.dumps({"layer_filter": ",".join(f"^{re.escape(m)}$" for m in allowed),
                           "layer_filter_regex": True}, indent=2)
    return Export("onetrainer", fragment, "set layer_filter and layer_filter_regex in the training config "
                                          "(LoRA tab: custom layer filter, 'use regex')")


def selects(fragment: str, module_names) -> set[str]:
    cfg = json.loads(fragment)
    pieces = [p.strip() for p in cfg["layer_filter"].split(",")]
    if cfg["layer_filter_regex"]:
        return {n for n in module_names if any(re.search(p, n) for p in pieces)}
    return {n for n in module_names if any(p in n for p in pieces)}
