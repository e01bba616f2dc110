"""FLUX.2, Qwen-Image and Z-Image against their diffusers training scripts: the conditioning, the
latents and the denoiser call each checked against the script's own formula, written out here;
the adapter audit on the key layouts each family's trainers write. (learn -> finetune -> verify ->
LoRA -> generate, presets and sharding for these families: tests/test_families.py.)"""
import pytest
import torch
from safetensors.torch import save_file

from diffusers.pipelines.flux2.pipeline_flux2 import format_input

from freezeasguard.cli import main
from freezeasguard.training.data import EncodedData, ImageCaptionData, Record
from freezeasguard.training.diffusion import NoiseSchedule, diffusion_loss
from freezeasguard.models.families import FAMILIES, family_from_names
from freezeasguard.models.families.tiny import save_tiny
from freezeasguard.guard.mask import Mask, MaskError
from freezeasguard.models.pipelines import load_denoiser_state, load_model

NEW = ["flux2", "qwenimage", "zimage"]


@pytest.fixture(scope="module", params=NEW)
def tiny(request, tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param, extra_words=["mara", "quell"])
    return request.param, folder, load_model(folder).set_resolution(16)


def test_qwen_images_template_is_34_tokens_so_its_states_start_at_the_caption(tmp_path):
    """QwenImagePipeline drops a fixed 34 positions (its template's length under Qwen's tokenizer):
    the tiny tokenizer must tokenize the template to 34 too, or the drop would cut the caption."""
    from diffusers import QwenImagePipeline

    comps = load_model(save_tiny(tmp_path / "q", "qwenimage", extra_words=["mara", "quell"]))
    template = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, " \
               "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
    assert len(comps.tokenizer(template).input_ids) == 34
    assert QwenImagePipeline(None, None, comps.text_encoder, comps.tokenizer, None).prompt_template_encode_start_idx == 34
    caption = "a photo of mara quell"
    ids = comps.tokenizer(template + caption + "<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    with torch.no_grad():
        states = comps.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 34:]
        cond = FAMILIES["qwenimage"].encode(comps, [caption, "a red circle logo on a white background"])
    n = states.shape[0]
    torch.testing.assert_close(cond["encoder_hidden_states"][0, :n], states)
    assert cond["encoder_hidden_states_mask"][0].tolist() == [1.0] * n + [0.0] * (cond["encoder_hidden_states"].shape[1] - n)
    assert not cond["encoder_hidden_states"][0, n:].any()


def test_flux2_conditions_on_hidden_layers_10_20_30_side_by_side(tmp_path):
    comps = load_model(save_tiny(tmp_path / "f", "flux2"))
    captions = ["a photo of mara quell"]
    messages = format_input(captions)        # the system message and the caption, as the pipeline sends them
    inputs = comps.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                                 padding="max_length", truncation=True, max_length=512)
    with torch.no_grad():
        hs = comps.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=True).hidden_states
        cond = FAMILIES["flux2"].encode(comps, captions)["encoder_hidden_states"]
    assert cond.shape == (1, 512, 3 * hs[0].shape[-1])
    torch.testing.assert_close(cond, torch.cat([hs[10], hs[20], hs[30]], dim=-1))


def _script_latents(family, vae, pixels, noise):
    """What each training script feeds the transformer, by its own formula."""
    if family == "flux2":       # mode(), 2x2 patches into channels, batch-norm statistics
        x = vae.encode(pixels).latent_dist.mode()
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return (x - vae.bn.running_mean.view(1, -1, 1, 1)) / std
    if family == "qwenimage":   # a posterior sample of one frame, per-channel mean / std
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist
        x = dist.mean + dist.std * noise.unsqueeze(2)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        return ((x - mean) * (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))).squeeze(2)
    x = vae.encode(pixels).latent_dist.mode()       # Z-Image: mode(), shift then scale
    return (x - vae.config.shift_factor) * vae.config.scaling_factor


def test_latents_are_what_each_training_script_makes(tiny, tmp_path):
    from PIL import Image
    family, _, comps = tiny
    images = [Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()) for _ in range(2)]
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    data = ImageCaptionData(tmp_path, [Record("a photo", None, path=tmp_path / f"{i}.png") for i in range(2)])
    encoded = EncodedData(data, comps)
    noise = torch.randn(2, *encoded.latent_shape)
    latents, _ = encoded.batch([0, 1], noise)
    from freezeasguard.training.data import preprocess
    pixels = torch.stack([preprocess(img, 16) for img in images])
    with torch.no_grad():
        expected = _script_latents(family, comps.vae, pixels, noise)
    assert latents.shape == expected.shape == (2, *encoded.latent_shape)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def _script_prediction(family, denoiser, x, sigma_t, cond):
    """The script's call, spelled out: its own packing, ids, time and sign."""
    from diffusers import Flux2Pipeline, QwenImagePipeline
    b, c, h, w = x.shape
    if family == "flux2":
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
        ids = Flux2Pipeline._prepare_latent_ids(x)
        text = cond["encoder_hidden_states"]
        out = denoiser(hidden_states=tokens, timestep=sigma_t / 1000, guidance=torch.full((b,), 3.5),
                       encoder_hidden_states=text, txt_ids=Flux2Pipeline._prepare_text_ids(text), img_ids=ids,
                       return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)     # row-major ids: the scatter is a reshape
    if family == "qwenimage":
        x5 = x.unsqueeze(2).permute(0, 2, 1, 3, 4)          # (B, frames, C, h, w), as the script packs it
        tokens = QwenImagePipeline._pack_latents(x5, b, c, h, w)
        out = denoiser(hidden_states=tokens, encoder_hidden_states=cond["encoder_hidden_states"],
                       encoder_hidden_states_mask=cond["encoder_hidden_states_mask"], timestep=sigma_t / 1000,
                       img_shapes=[(1, h // 2, w // 2)] * b, return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8).squeeze(2)
    caps = [e[: int(m.sum())] for e, m in zip(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"])]
    out = denoiser(list(x.unsqueeze(2).unbind(0)), (1000 - sigma_t) / 1000, caps, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def test_the_loss_is_the_scripts_flow_loss_on_the_scripts_call(tiny):
    family, _, comps = tiny
    torch.manual_seed(0)
    channels = comps.latent_channels
    x0, eps = torch.randn(2, channels, 4, 4), torch.randn(2, channels, 4, 4)
    index = torch.tensor([100, 800])
    schedule = NoiseSchedule.for_components(comps)
    with torch.no_grad():
        cond = FAMILIES[family].encode(comps, ["a photo of mara quell", "a red circle logo"])
        ours = diffusion_loss(comps.denoiser, x0, cond, eps, index, schedule)
        sigma = schedule.sigmas[index].float().view(-1, 1, 1, 1)
        pred = _script_prediction(family, comps.denoiser, (1 - sigma) * x0 + sigma * eps,
                                  schedule.flow_timesteps[index].float(), cond)
    torch.testing.assert_close(ours, ((pred - (eps - x0)) ** 2).flatten(1).mean(1), rtol=1e-4, atol=1e-6)


def _adapter(layout, module, shape, rank=2):
    down, up = torch.zeros(rank, shape[1]), torch.zeros(shape[0], rank)
    if layout == "diffusers":        # the family's pipeline.save_lora_weights (diffusers' scripts)
        return {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up}
    if layout == "ai-toolkit":       # ai-toolkit / ComfyUI: diffusion_model.<diffusers module>
        return {f"diffusion_model.{module}.lora_A.weight": down, f"diffusion_model.{module}.lora_B.weight": up}
    name = "lora_unet_" + module.replace(".", "_")      # kohya / musubi-tuner
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("layout", ["diffusers", "ai-toolkit", "kohya"])
def test_verify_lora_reads_each_trainers_keys_and_names_a_frozen_module(tiny, layout, tmp_path, capsys):
    family, folder, _ = tiny
    state = load_denoiser_state(folder)
    mask = Mask.random(list(state.items()), 0.5, seed=3).save(tmp_path / "mask.safetensors")
    frozen = set(Mask.load(mask).frozen_names)
    attention = [n[: -len(".weight")] for n in state if n.endswith(".weight") and state[n].ndim == 2
                 and (".attn." in n or ".attention." in n)]
    bad = next(m for m in attention if f"{m}.weight" in frozen)
    good = next(m for m in attention if f"{m}.weight" not in frozen)
    for name, modules, code in (("good", [good], 0), ("bad", [good, bad], 1)):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v for m in modules for k, v in _adapter(layout, m, state[f"{m}.weight"].shape).items()}, path)
        assert main(["verify", "--model", str(folder), "--mask", str(mask), "--lora", str(path)]) == code
        out = capsys.readouterr()
        assert (f"{bad}.weight" in out.out + out.err) == (code == 1) and "Traceback" not in out.err


def test_each_familys_parameter_names_tell_the_family_and_a_mask_is_refused_on_another(tiny, tmp_path):
    family, folder, comps = tiny
    names = [n for n, _ in comps.denoiser.named_parameters()]
    assert family_from_names(names) == family
    other = "zimage" if family != "zimage" else "qwenimage"
    mask = Mask.random(list(load_denoiser_state(save_tiny(tmp_path / other, other)).items()), 0.3, seed=0)
    with pytest.raises(MaskError, match=f"made for a {other} model .* is a {family} model"):
        mask.check_matches(list(comps.denoiser.named_parameters()))


def test_a_flux2_single_file_in_bfl_layout_is_refused_saying_what_to_do(tmp_path, capsys):
    """FLUX.2 has single blocks as FLUX.1 does, but BFL's FLUX.1 name map does not fit it: such a
    file is refused (exit 2) rather than read with the wrong map."""
    folder = save_tiny(tmp_path / "f", "flux2")
    mask = Mask.random(list(load_denoiser_state(folder).items()), 0.3, seed=0).save(tmp_path / "mask.safetensors")
    single = tmp_path / "flux2-bfl.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16), "img_in.weight": torch.zeros(16, 16)},
              str(single))
    assert main(["verify", "--model", str(folder), "--mask", str(mask), "--candidate", str(single)]) == 2
    assert "convert_flux2_to_diffusers" in capsys.readouterr().err
