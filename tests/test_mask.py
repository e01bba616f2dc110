"""The mask artifact: save/load, refusing masks for other models, exports, summaries, plots."""
import re

import pytest
import torch

from freezeasguard.guard.mask import Mask, MaskError, tensor_kind
from freezeasguard.models.pipelines import fingerprint


def _unet():
    from diffusers import UNet2DConditionModel

    from freezeasguard.models.families.tiny import tiny_unet_config
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config("sd15", sample_size=8))


@pytest.fixture(scope="module")
def unet():
    return _unet()


def test_sd15_layout_has_the_real_models_686_names_in_order(unet):
    from diffusers import UNet2DConditionModel

    from freezeasguard.models.families.tiny import tiny_unet_config
    with torch.device("meta"):
        real = UNet2DConditionModel(**tiny_unet_config("sd15-shapes"))
    real_names = [n for n, _ in real.named_parameters()]
    assert len(real_names) == 686
    assert [n for n, _ in unet.named_parameters()] == real_names
    assert sum(p.numel() for p in real.parameters()) == 859_520_964


def test_save_load_roundtrip_keeps_everything(unet, tmp_path):
    named = list(unet.named_parameters())
    scores = torch.randn(len(named))
    mask = Mask.from_scores(named, scores, 0.3, "tensors", meta={"method": "learned", "seed": 3})
    path = mask.save(tmp_path / "m.safetensors")
    back = Mask.load(path)
    assert back.names == mask.names and back.shapes == mask.shapes
    assert torch.equal(back.logits, mask.logits) and torch.equal(back.frozen, mask.frozen)
    assert back.base_fingerprint == fingerprint(named)
    assert back.meta["achieved_tensor_ratio"] == pytest.approx(206 / 686)
    assert back.meta["seed"] == 3
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:        # keyed by parameter name
        assert f"frozen/{named[0][0]}" in f.keys() and f"logits/{named[-1][0]}" in f.keys()


def test_mask_for_another_model_is_refused(unet, tmp_path):
    from diffusers import UNet2DConditionModel

    from freezeasguard.models.families.tiny import tiny_unet_config
    named = list(unet.named_parameters())
    mask = Mask.random(named, 0.3, seed=0)
    mini = UNet2DConditionModel(**tiny_unet_config("mini"))
    with pytest.raises(MaskError, match="another model: 686 tensors in the mask"):
        mask.check_matches(list(mini.named_parameters()))
    wide = UNet2DConditionModel(**tiny_unet_config("sd15", sample_size=8, cross_attention_dim=48))
    with pytest.raises(MaskError, match="differ in shape"):
        mask.check_matches(list(wide.named_parameters()))
    other = _unet()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other_named = list(other.named_parameters())
    with pytest.raises(MaskError, match="other weights"):
        mask.check_matches(other_named, fingerprint(other_named))
    mask.check_matches(named, fingerprint(named))        # the right model passes
    with pytest.raises(MaskError, match="another model"):
        mask.apply(mini)


def test_random_mask_is_seeded_and_exact(unet):
    named = list(unet.named_parameters())
    a, b, c = Mask.random(named, 0.3, 1), Mask.random(named, 0.3, 1), Mask.random(named, 0.3, 2)
    assert torch.equal(a.frozen, b.frozen) and not torch.equal(a.frozen, c.frozen)
    assert int(a.frozen.sum()) == round(0.3 * 686)
    p = Mask.random(named, 0.3, 1, budget="params")
    assert p.param_fraction <= 0.3 and p.param_fraction > 0.29


def test_apply_and_exports(unet):
    named = list(unet.named_parameters())
    mask = Mask.random(named, 0.1, 0)
    frozen = mask.apply(unet)
    assert {n for n, p in unet.named_parameters() if not p.requires_grad} == set(frozen)
    names = mask.export_names().split()
    assert names == mask.frozen_names
    rx = re.compile(mask.export_regex())
    assert {n for n, _ in named if rx.fullmatch(n)} == set(frozen)
    for p in unet.parameters():
        p.requires_grad_(True)


def test_apply_goes_by_name_when_the_mask_lists_tensors_in_another_order(unet):
    # a safetensors file lists tensors alphabetically, the model in definition order: a mask made
    # from one must freeze the same named tensors in the other (it once froze by position)
    named = sorted(unet.named_parameters(), key=lambda kv: kv[0])
    assert [n for n, _ in named] != [n for n, _ in unet.named_parameters()]
    mask = Mask.random(named, 0.3, 4)
    mask.apply(unet)
    assert {n for n, p in unet.named_parameters() if not p.requires_grad} == set(mask.frozen_names)
    for p in unet.parameters():
        p.requires_grad_(True)


def test_summary_counts_and_plot(unet, tmp_path):
    mask = Mask.random(list(unet.named_parameters()), 0.3, 0)
    s = mask.summary()
    assert sum(f for f, _ in s["by_block"].values()) == 206
    assert sum(t for _, t in s["by_kind"].values()) == 686
    assert tensor_kind("down_blocks.0.resnets.0.norm1.weight") == "norm"
    assert tensor_kind("conv_in.bias") == "bias" and tensor_kind("conv_in.weight") == "weight"
    png = mask.plot(tmp_path / "mask.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_out_of_range_is_a_clear_error(unet):
    with pytest.raises(ValueError, match="between 0 and 1"):
        Mask.random(list(unet.named_parameters()), 30, 0)


def test_truncated_mask_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(MaskError, match="bad.safetensors"):
        Mask.load(bad)
    with pytest.raises(MaskError, match="no such mask file"):
        Mask.load(tmp_path / "missing.safetensors")
