"""Every export, checked by applying that tool's own matching rule to the UNet's module names:
the modules the tool would adapt are exactly those the mask leaves trainable."""
import pytest

from freezeasguard.cli import main
from freezeasguard.exports import FORMATS, adapter_modules, export
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import load_model


@pytest.fixture(scope="module")
def unet_and_mask(tiny_sd):
    """A mask freezing two whole blocks, one projection of a third, and a random 3% elsewhere: exact
    exports must follow it tensor by tensor, block-rounded ones must drop the third block too."""
    import torch
    unet = load_model(tiny_sd).denoiser
    named = list(unet.named_parameters())
    g = torch.Generator().manual_seed(5)
    chosen = [n.startswith(("down_blocks.1.", "mid_block.")) or n == "up_blocks.3.attentions.2.proj_out.weight"
              or (n.startswith("down_blocks.0.") and torch.rand(1, generator=g).item() < 0.03) for n, _ in named]
    scores = torch.tensor([float(c) for c in chosen])
    return unet, Mask.from_scores(named, scores, sum(chosen) / len(named))


def test_adapter_modules_are_the_linear_and_conv_modules_split_by_the_mask(unet_and_mask):
    import torch
    unet, mask = unet_and_mask
    frozen = set(mask.frozen_names)
    able = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    allowed, blocked = adapter_modules(mask)
    assert set(allowed) | set(blocked) == able and not set(allowed) & set(blocked)
    for name in blocked:        # a blocked module has a frozen parameter, an allowed one none
        assert any(p in frozen for p in (f"{name}.weight", f"{name}.bias"))
    for name in allowed:
        assert not any(p in frozen for p in (f"{name}.weight", f"{name}.bias"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_tool_adapts_exactly_the_allowed_modules_or_a_stated_subset(unet_and_mask, fmt):
    import torch
    unet, mask = unet_and_mask
    result = export(mask, fmt)
    able = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    selected = FORMATS[fmt].selects(result.fragment, [n for n, _ in unet.named_modules() if n]) & set(able)
    allowed = set(adapter_modules(mask)[0])
    if result.exact:
        assert selected == allowed
    else:        # rounded to blocks: never an adapter on a frozen module, and some left to train
        assert selected < allowed and selected


def test_kohya_block_index_is_sd_scripts_numbering():
    from freezeasguard.exports.kohya import block_index
    assert block_index("lora_unet_down_blocks_0_attentions_0_proj_in") == 1
    assert block_index("lora_unet_down_blocks_1_downsamplers_0_conv") == 6
    assert block_index("lora_unet_down_blocks_3_resnets_1_conv1") == 11
    assert block_index("lora_unet_mid_block_attentions_0_proj_out") == 12
    assert block_index("lora_unet_up_blocks_0_resnets_2_conv1") == 15
    assert block_index("lora_unet_up_blocks_3_attentions_2_proj_out") == 24
    assert block_index("lora_unet_conv_in") == -1


def test_mask_export_command_writes_the_fragment(unet_and_mask, tmp_path, capsys):
    _, mask = unet_and_mask
    path = mask.save(tmp_path / "m.safetensors")
    assert main(["mask", "export", str(path), "--format", "peft", "--out", str(tmp_path / "peft.json")]) == 0
    assert "LoraConfig" in capsys.readouterr().out
    assert (tmp_path / "peft.json").read_text().strip() == export(mask, "peft").fragment
    assert main(["mask", "export", str(path), "--format", "peft", "--out", str(tmp_path / "peft.json")]) == 2
