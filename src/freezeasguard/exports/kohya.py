"""kohya sd-scripts (networks.lora, SD 1.x/2.x): block learning-rate weights in ``--network_args``.

sd-scripts' rule (networks/lora.py): a LoRA module is named "lora_unet_" + its diffusers path with
dots as underscores, and belongs to a block by get_block_index: down_blocks.i.(resnets|attentions).j
is block 1 + 3i + j, down_blocks.i.downsamplers block 1 + 3i + 2, mid_block block 12, up_blocks
13 + the same index. ``down_lr_weight`` (blocks 0-11), ``mid_lr_weight`` (12) and ``up_lr_weight``
(13-24) scale each block's learning rate, and a block of weight 0 gets no LoRA modules at all.
Its LoRA sits on Linear/1x1 modules inside Transformer2DModel blocks (and on ResNet and sampler
convolutions with conv_dim).

Per-tensor freezing cannot be said in these terms: the export rounds it to blocks, always
towards freezing more. A block with any frozen adapter-able module gets weight 0, so kohya trains
a subset of the allowed modules (exact=False); modules outside every block (conv_in, the time
embedding, conv_out) are never given a LoRA by sd-scripts.
"""
from __future__ import annotations

import re

from freezeasguard.exports.common import Export, adapter_modules

NUM_BLOCKS, MID = 12, 12          # per side, and the mid block's index
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(lora_name: str) -> int:
    """sd-scripts' get_block_index for SD 1.x/2.x names (-1: in no block)."""
    m = _UPDOWN.search(lora_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
    return MID if "mid_block_" in lora_name else -1


def lora_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def export(mask) -> Export:
    allowed, frozen = adapter_modules(mask)
    weights = [1] * (2 * NUM_BLOCKS + 1)
    for module in frozen:
        b = block_index(lora_name(module))
        if b >= 0:
            weights[b] = 0
    if not any(weights[block_index(lora_name(m))] for m in allowed if block_index(lora_name(m)) >= 0):
        raise ValueError("every block holds a frozen module: kohya's block weights cannot let any LoRA train "
                         "under this mask (use a trainer with per-module filters: peft, OneTrainer, ai-toolkit)")
    down, mid, up = weights[:NUM_BLOCKS], weights[MID], weights[MID + 1:]
    fragment = " ".join([f'"down_lr_weight={",".join(map(str, down))}"', f'"mid_lr_weight={mid}"',
                         f'"up_lr_weight={",".join(map(str, up))}"'])
    return Export("kohya", fragment, "add to train_network.py: --network_module networks.lora --network_args "
                                     "<this line> (blocks rounded towards freezing more)", exact=False)


def selects(fragment: str, module_names) -> set[str]:
    """The modules sd-scripts would give a LoRA (Linear and conv alike, all blocks it can adapt)."""
    args = dict(part.strip('"').split("=", 1) for part in fragment.split())
    weights = ([float(w) for w in args["down_lr_weight"].split(",")] + [float(args["mid_lr_weight"])] +
               [float(w) for w in args["up_lr_weight"].split(",")])
    out = set()
    for module in module_names:
        b = block_index(lora_name(module))
        if b >= 0 and weights[b] > 0:
            out.add(module)
    return out
