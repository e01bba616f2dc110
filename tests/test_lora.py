"""The adapter audit: LoRA files in the diffusers/peft, kohya and LyCORIS formats, built by hand,
against a mask on the tiny SD-layout pipeline."""
import pytest
import torch
from safetensors.torch import save_file

from freezeasguard.cli import main
from freezeasguard.audit.adapters import module_index, resolve_module, split_key
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import load_denoiser_state


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    state = load_denoiser_state(tiny_sd)
    mask = Mask.random(list(state.items()), 0.5, seed=3)
    frozen = set(mask.frozen_names)
    linear = [n[:-7] for n in state if n.endswith(".weight") and state[n].ndim == 2 and "attn" in n]
    frozen_module = next(m for m in linear if f"{m}.weight" in frozen)
    free_module = next(m for m in linear if f"{m}.weight" not in frozen)
    return tmp, state, mask.save(tmp / "mask.safetensors"), frozen_module, free_module


def lora_pair(state, module, rank=2):
    out_dim, in_dim = state[f"{module}.weight"].shape
    return torch.zeros(rank, in_dim), torch.zeros(out_dim, rank)


def diffusers_lora(state, module):
    down, up = lora_pair(state, module)
    return {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}


def kohya_lora(state, module):
    down, up = lora_pair(state, module)
    name = "lora_unet_" + module.replace(".", "_")
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}


def verify(tiny_sd, setup, tensors, name, capsys):
    tmp, _, mask, *_ = setup
    path = tmp / name
    save_file(tensors, str(path))
    code = main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--lora", str(path),
                 "--report", str(tmp / f"{name}.json")])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out + out.err


@pytest.mark.parametrize("fmt", [diffusers_lora, kohya_lora])
def test_a_lora_on_a_frozen_module_is_a_violation_naming_it(tiny_sd, setup, capsys, fmt):
    tmp, state, mask, frozen_module, free_module = setup
    code, text = verify(tiny_sd, setup, {**fmt(state, frozen_module), **fmt(state, free_module)},
                        f"bad-{fmt.__name__}.safetensors", capsys)
    assert code == 1 and f"{frozen_module}.weight" in text and f"{free_module}.weight" not in text
    code, text = verify(tiny_sd, setup, fmt(state, free_module), f"good-{fmt.__name__}.safetensors", capsys)
    assert code == 0 and "COMPLIANT" in text


def test_lycoris_variants_map_to_the_module_they_change(tiny_sd, setup, capsys):
    tmp, state, mask, frozen_module, free_module = setup
    name = "lora_unet_" + frozen_module.replace(".", "_")
    out_dim, in_dim = state[f"{frozen_module}.weight"].shape
    loha = {f"{name}.hada_w1_a": torch.zeros(out_dim, 2), f"{name}.hada_w1_b": torch.zeros(2, in_dim),
            f"{name}.hada_w2_a": torch.zeros(out_dim, 2), f"{name}.hada_w2_b": torch.zeros(2, in_dim),
            f"{name}.alpha": torch.tensor(2.0)}
    code, text = verify(tiny_sd, setup, loha, "loha.safetensors", capsys)
    assert code == 1 and f"{frozen_module}.weight" in text
    free = "lora_unet_" + free_module.replace(".", "_")
    lokr_dora = {f"{free}.lokr_w1": torch.zeros(2, 2), f"{free}.lokr_w2": torch.zeros(2, 2),
                 f"{free}.dora_scale": torch.zeros(1, in_dim)}
    assert verify(tiny_sd, setup, lokr_dora, "lokr.safetensors", capsys)[0] == 0


def test_text_encoder_keys_are_reported_and_unknown_keys_are_not_certified(tiny_sd, setup, capsys):
    tmp, state, mask, frozen_module, free_module = setup
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 4)}
    code, text = verify(tiny_sd, setup, {**kohya_lora(state, free_module), **te}, "te.safetensors", capsys)
    assert code == 0 and "text encoder" in text
    odd = {f"unet.{free_module}.mystery_adapter.weight": torch.zeros(2, 2)}
    code, text = verify(tiny_sd, setup, {**kohya_lora(state, free_module), **odd}, "odd.safetensors", capsys)
    assert code == 2 and "mystery_adapter" in text


def test_files_that_cannot_be_audited_are_clear_errors(tiny_sd, setup, capsys):
    tmp, state, mask, frozen_module, free_module = setup
    # another architecture: FLUX's kohya names are no module of this UNet
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}
    code, text = verify(tiny_sd, setup, flux, "flux.safetensors", capsys)
    assert code == 2 and "another model" in text
    # original-SD names (A1111/ComfyUI) are read, and a factor of the wrong size says so
    ldm = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 8)}
    code, text = verify(tiny_sd, setup, ldm, "ldm.safetensors", capsys)
    assert code == 2 and "other sizes" in text and "input_blocks_4_1_proj_in" in text
    # right names, wrong sizes
    down, up = lora_pair(state, free_module)
    wrong = {f"unet.{free_module}.lora_A.weight": torch.zeros(2, down.shape[1] + 3),
             f"unet.{free_module}.lora_B.weight": up}
    code, text = verify(tiny_sd, setup, wrong, "wrong.safetensors", capsys)
    assert code == 2 and "other sizes" in text
    code, text = verify(tiny_sd, setup, {}, "empty.safetensors", capsys)
    assert code == 2 and "no tensors" in text
    good = tmp / "good-kohya_lora.safetensors"
    (tmp / "cut.safetensors").write_bytes(good.read_bytes()[:40] if good.exists() else b"\x00" * 40)
    code = main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--lora", str(tmp / "cut.safetensors")])
    assert code == 2 and "truncated or corrupt" in capsys.readouterr().err
    (tmp / "x.pt").write_bytes(b"not read")
    assert main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--lora", str(tmp / "x.pt")]) == 2
    assert "only .safetensors" in capsys.readouterr().err


def test_key_parsing_by_hand():
    modules, underscored = module_index(["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
                                         "down_blocks.0.resnets.0.time_emb_proj.weight"])
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert split_key(f"unet.{attn}.to_k.lora_A.default.weight") == (f"unet.{attn}.to_k", "weight")
    assert split_key("lora_unet_x.alpha") == ("lora_unet_x", "meta")
    assert split_key("lora_unet_x.diff_b") == ("lora_unet_x", "bias")
    assert resolve_module("lora_unet_down_blocks_0_resnets_0_time_emb_proj", modules, underscored) == \
        ["down_blocks.0.resnets.0.time_emb_proj"]
    assert resolve_module(f"{attn}.processor.to_out_lora", modules, underscored) == [f"{attn}.to_out.0"]
    assert resolve_module(f"base_model.model.{attn}.to_k", modules, underscored) == [f"{attn}.to_k"]
    assert resolve_module("lora_unet_down_blocks_0_resnets_1_conv1", modules, underscored) == []
    # original-layout names (ComfyUI's diffusion_model.*, kohya's lora_unet_* on them) through aliases
    aliases = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k": [f"{attn}.to_k"],
               "double_blocks.0.img_attn.qkv": ["a.to_q", "a.to_k", "a.to_v"]}
    assert resolve_module("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k", modules, underscored,
                          aliases) == [f"{attn}.to_k"]
    assert resolve_module("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", modules, underscored,
                          aliases) == [f"{attn}.to_k"]
    assert resolve_module("lora_unet_double_blocks_0_img_attn_qkv", modules, underscored, aliases) == \
        ["a.to_q", "a.to_k", "a.to_v"]


def test_guarded_lora_trains_allowed_modules_and_both_it_and_its_merge_pass_verify(tiny_sd, people, setup, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    tmp, state, mask, frozen_module, free_module = setup
    out = tmp / "lora-out"
    assert main(["finetune", "--model", str(tiny_sd), "--data", str(people), "--mask", str(mask), "--out", str(out),
                 "--lora-rank", "2", "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--device", "cpu",
                 "--checkpoint-every", "0"]) == 0
    adapter = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert adapter and all(k.startswith("unet.") for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())   # it trained
    frozen = set(Mask.load(mask).frozen_names)
    assert not {k[5:].split(".lora_")[0] + ".weight" for k in adapter} & frozen
    capsys.readouterr()
    assert main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--lora",
                 str(out / "pytorch_lora_weights.safetensors")]) == 0
    # the output folder itself is a valid --candidate: its adapter is audited
    capsys.readouterr()
    assert main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--candidate", str(out)]) == 0
    assert "the adapter changes" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = {k: v.contiguous() for k, v in pipe.unet.state_dict().items()}
    assert any(not torch.equal(merged[k], state[k]) for k in state)          # the merge changed weights
    save_file(merged, str(tmp / "merged.safetensors"))
    assert main(["verify", "--model", str(tiny_sd), "--mask", str(mask), "--candidate",
                 str(tmp / "merged.safetensors")]) == 0


def test_lora_targets_the_mask_freezes_and_oversized_ranks_are_refused(tiny_sd, people, setup, capsys):
    tmp, state, mask, frozen_module, free_module = setup
    base = ["finetune", "--model", str(tiny_sd), "--data", str(people), "--mask", str(mask), "--steps", "1",
            "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "0"]
    assert main([*base, "--out", str(tmp / "x"), "--lora-rank", "2", "--lora-targets", frozen_module]) == 2
    err = capsys.readouterr().err
    assert frozen_module in err and "freezes" in err and not (tmp / "x").exists()
    assert main([*base, "--out", str(tmp / "y"), "--lora-rank", "4096", "--lora-targets", free_module]) == 2
    assert "larger than module" in capsys.readouterr().err


def test_a_guarded_lora_run_gives_the_same_adapter_whatever_ran_before_it(tiny_sd, people, setup):
    from safetensors.torch import load_file

    from freezeasguard import FinetuneConfig, guarded_finetune
    from freezeasguard.training.lora import LoraSettings
    tmp, _, mask, *_ = setup
    cfg = FinetuneConfig(steps=1, batch_size=2, lr=1e-3, device="cpu", checkpoint_every=0, seed=4)
    adapters = []
    for i, draws in enumerate([0, 1000]):
        torch.rand(draws)              # another job's draws from the global generator, before this run
        guarded_finetune(tiny_sd, people, tmp / f"seeded-{i}", cfg, mask=Mask.load(mask), lora=LoraSettings(rank=2))
        adapters.append(load_file(str(tmp / f"seeded-{i}" / "pytorch_lora_weights.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
