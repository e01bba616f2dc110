"""experiments/mask_anatomy.py: what a mask froze, by kind of tensor, and the LoRA modules left."""
import re
import sys
from pathlib import Path

import pytest
import torch

from freezeasguard.guard.mask import Mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import mask_anatomy  # noqa: E402

PROJECTION = re.compile(r".*\.(to_q|to_k|to_v|to_out\.0)\.weight")


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    from freezeasguard.models.families.tiny import tiny_unet_config
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config("sd15", sample_size=8))


def _mask(unet, frozen_names):
    mask = Mask.none(unet.named_parameters())
    mask.frozen = torch.tensor([n in frozen_names for n in mask.names])
    return mask


def test_counts_by_kind_match_the_names_and_shapes(unet):
    params = dict(unet.named_parameters())
    to_q = [n for n in params if n.endswith("to_q.weight")]
    convs = [n for n, p in params.items() if p.dim() == 4]
    a = mask_anatomy.anatomy(_mask(unet, set(to_q + convs[:3])), unet)
    projections = [n for n in params if PROJECTION.fullmatch(n)]
    assert a["by_kind"]["attention projection"]["tensors"] == [len(to_q), len(projections)]
    assert a["by_kind"]["convolution"]["tensors"] == [3, len(convs)]
    assert a["by_kind"]["convolution"]["params"] == [sum(params[n].numel() for n in convs[:3]),
                                                      sum(params[n].numel() for n in convs)]
    assert sum(k["tensors"][1] for k in a["by_kind"].values()) == len(params)
    assert a["tensors"] == [len(to_q) + 3, len(params)]
    assert a["lora_modules"] == len(projections) - len(to_q)


def test_a_frozen_bias_takes_its_projection_from_the_lora_forger(unet):
    params = dict(unet.named_parameters())
    out_biases = [n for n in params if n.endswith("to_out.0.bias")]
    projections = [n for n in params if PROJECTION.fullmatch(n)]
    a = mask_anatomy.anatomy(_mask(unet, set(out_biases)), unet)
    assert a["by_kind"]["bias"]["tensors"][0] == len(out_biases)
    assert a["by_kind"]["attention projection"]["tensors"][0] == 0
    assert a["lora_modules"] == len(projections) - len(out_biases)
    every = mask_anatomy.anatomy(_mask(unet, set(projections)), unet)
    assert every["lora_modules"] == 0          # nothing left: the forger's recipe finds no module
