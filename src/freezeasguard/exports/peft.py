"""peft's LoraConfig: ``target_modules`` and ``exclude_modules``.

peft's rule (peft/tuners/tuners_utils.py, check_target_module_exists): a string is a regular
expression that must match the whole module name (re.fullmatch); a list matches a name that
equals an entry or ends with "." + an entry. exclude_modules is checked first, by the same rule.
The export gives target_modules as a regex of exactly the allowed modules and exclude_modules as
the list of frozen ones, so either alone is exact.
"""
from __future__ import annotations

import json
import re

from freezeasguard.exports.common import Export, adapter_modules


def export(mask) -> Export:
    allowed, frozen = adapter_modules(mask)
    fragment = json.dumps({"target_modules": "(?:" + "|".join(re.escape(m) for m in allowed) + ")",
                           "exclude_modules": frozen}, indent=2)
    return Export("peft", fragment, "LoraConfig(r=..., **json.load(open('this.json'))) then unet.add_adapter(config) "
                                    "or get_peft_model(unet, config)")


def _matches(spec, key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{s}") for s in spec)


def selects(fragment: str, module_names) -> set[str]:
    """The modules peft would adapt with this config: exclude first, then target."""
    cfg = json.loads(fragment)
    out = set()
    for key in module_names:
        if cfg.get("exclude_modules") and _matches(cfg["exclude_modules"], key):
            continue
        if _matches(cfg["target_modules"], key):
            out.add(key)
    return out
