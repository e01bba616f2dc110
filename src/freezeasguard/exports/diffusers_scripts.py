"""diffusers' LoRA training scripts (train_dreambooth_lora*.py, train_text_to_image_lora*.py):
``--lora_layers``.

The scripts split the flag on commas and pass the stripped names as peft's target_modules list
(``target_modules = [layer.strip() for layer in args.lora_layers.split(",")]``), so peft's list
rule applies: a module is adapted when its name equals an entry or ends with "." + an entry. The
export lists every allowed module by its full name, which matches exactly those.
"""
from __future__ import annotations

from freezeasguard.exports.common import Export, adapter_modules


def export(mask) -> Export:
    allowed, _ = adapter_modules(mask)
    return Export("diffusers", ",".join(allowed),
                  'pass as --lora_layers "<this line>" to a diffusers LoRA training script that has the flag')


def selects(fragment: str, module_names) -> set[str]:
    targets = [layer.strip() for layer in fragment.split(",")]
    return {k for k in module_names if k in targets or any(k.endswith(f".{t}") for t in targets)}
