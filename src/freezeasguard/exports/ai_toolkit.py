"""ostris ai-toolkit: ``network.network_kwargs.only_if_contains``.

ai-toolkit's rule (toolkit/lora_special.py, LoRASpecialNetwork.create_modules): each Linear or
Conv2d module gets the name "<prefix>.<module path>" ("lora_unet" for a UNet) and is adapted
only if one of the only_if_contains strings is a substring of that name (and none of
ignore_if_contains is). It adapts only modules inside its target blocks (Transformer2DModel, and
ResNet/down/up-samplers when conv ranks are set), a subset of those allowed here. The export
lists the allowed modules' full paths; no full path of this UNet is a substring of another's
name, which the tests check on the model's own names.
"""
from __future__ import annotations

import json

from freezeasguard.exports.common import Export, adapter_modules

PREFIX = "lora_unet"


def export(mask) -> Export:
    allowed, _ = adapter_modules(mask)
    if not allowed:
        raise ValueError("every adapter-able module is frozen: there is nothing a LoRA may train under this mask "
                         "(an empty only_if_contains list would train every layer)")
    return Export("ai-toolkit", json.dumps({"network_kwargs": {"only_if_contains": allowed}}, indent=2),
                  "put network_kwargs under config.process[0].network in the job's YAML")


def selects(fragment: str, module_names) -> set[str]:
    words = json.loads(fragment)["network_kwargs"]["only_if_contains"]
    return {n for n in module_names if any(w in f"{PREFIX}.{n}" for w in words)}
