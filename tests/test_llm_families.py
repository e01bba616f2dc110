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


ORIGINAL_NAMES = {   # family: (a fused q/k/v in the original layout, its diffusers modules, a renamed module, its name)
    "flux2": ("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_{}", "double_blocks.0.img_attn.proj",
              "transformer_blocks.0.attn.to_out.0"),
    "zimage": ("layers.0.attention.qkv", "layers.0.attention.to_{}", "layers.0.attention.out",
               "layers.0.attention.to_out.0"),
    "sd3": ("joint_blocks.0.x_block.attn.qkv", "transformer_blocks.0.attn.to_{}", "joint_blocks.0.x_block.attn.proj",
            "transformer_blocks.0.attn.to_out.0"),
}


@pytest.mark.parametrize("family", sorted(ORIGINAL_NAMES))
def test_loras_in_the_original_layouts_names_change_the_parameters_they_name(family, tmp_path):
    """LoRAs trained on a single file in FLUX.2's (BFL), Z-Image's (its authors') or SD3's (Stability
    AI's) layout, as ComfyUI / ai-toolkit (diffusion_model.*) and kohya / musubi-tuner (lora_unet_*)
    name them: one on a fused q/k/v changes its three projections (a frozen one among them is a
    violation), one on a renamed module changes that module; with the base and without it."""
    from freezeasguard.audit.adapters import verify_adapter
    from freezeasguard.audit.original_layouts import bfl_flux2_key, zimage_original_key
    from freezeasguard.audit.verify import denoiser_config, record_digests
    from freezeasguard.models.pipelines import fingerprint
    folder = save_tiny(tmp_path / family, family)
    state = load_denoiser_state(folder)
    fused, parts, renamed, renamed_as = ORIGINAL_NAMES[family]
    targets = [parts.format(x) + ".weight" for x in "qkv"]
    assert all(t in state for t in targets) and f"{renamed_as}.weight" in state
    names = list(state)
    if family != "sd3":      # the key each parameter lies in, against the tests' own inverse tables
        own = _flux2_bfl_key if family == "flux2" else _zimage_original_key
        ours = bfl_flux2_key if family == "flux2" else zimage_original_key
        assert {n: ours(n).rsplit(".", 1)[0] for n in names} == {n: own(n).rsplit(".", 1)[0] for n in names}
    scores = torch.tensor([1.0 if n == targets[2] else 0.0 for n in names])
    mask = Mask.from_scores([(n, state[n]) for n in names], scores, 1 / len(names),
                            base_fingerprint=fingerprint(state.items()))
    assert mask.frozen_names == [targets[2]]
    plain = mask.save(tmp_path / "mask.safetensors")
    recorded = record_digests(mask, folder).save(tmp_path / "rec.safetensors")
    assert denoiser_config(folder)["_class_name"]
    inner, width = state[targets[0]].shape
    out_rows, in_cols = state[f"{renamed_as}.weight"].shape
    for prefix in ("diffusion_model.", "lora_unet_"):
        def key(module):
            return prefix + module.replace(".", "_") if prefix == "lora_unet_" else prefix + module
        up, down = (".lora_up.weight", ".lora_down.weight") if prefix == "lora_unet_" else (".lora_B.weight",
                                                                                           ".lora_A.weight")
        save_file({key(fused) + down: torch.randn(2, width), key(fused) + up: torch.randn(3 * inner, 2)},
                  str(tmp_path / "qkv.safetensors"))
        save_file({key(renamed) + down: torch.randn(2, in_cols), key(renamed) + up: torch.randn(out_rows, 2)},
                  str(tmp_path / "proj.safetensors"))
        for ref_model, ref_mask in ((folder, plain), (None, recorded)):
            report = verify_adapter(ref_model, ref_mask, tmp_path / "qkv.safetensors")
            assert sorted(report.changed) == sorted(targets) and not report.unknown
            assert report.frozen_changed == [targets[2]] and not report.compliant
            report = verify_adapter(ref_model, ref_mask, tmp_path / "proj.safetensors")
            assert list(report.changed) == [f"{renamed_as}.weight"] and report.compliant


def test_each_familys_parameter_names_tell_the_family_and_a_mask_is_refused_on_another(tiny, tmp_path):
    family, folder, comps = tiny
    names = [n for n, _ in comps.denoiser.named_parameters()]
    assert family_from_names(names) == family
    other = "zimage" if family != "zimage" else "qwenimage"
    mask = Mask.random(list(load_denoiser_state(save_tiny(tmp_path / other, other)).items()), 0.3, seed=0)
    with pytest.raises(MaskError, match=f"made for a {other} model .* is a {family} model"):
        mask.check_matches(list(comps.denoiser.named_parameters()))


def _flux2_bfl_key(name: str) -> str:
    """The BFL-layout key holding a FLUX.2 transformer parameter (written out from BFL's flux2 code)."""
    renames = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "norm_out.linear": "final_layer.adaLN_modulation.1",
               "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
               "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
               "single_stream_modulation.linear": "single_stream_modulation.lin"}
    double = {"attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
              "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv",
              "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
              "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
              "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
    single = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
              "attn.norm_k": "norm.key_norm"}
    module, param = name.rsplit(".", 1)
    if module.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        kind, i, rest = module.split(".", 2)
        table, bfl_kind = (double, "double_blocks") if kind == "transformer_blocks" else (single, "single_blocks")
        key = f"{bfl_kind}.{i}.{table[rest]}"
        return f"{key}.scale" if "norm" in rest and "norm" in table[rest] else f"{key}.{param}"
    return f"{renames[module]}.{param}"


def write_flux2_bfl_file(state: dict, config: dict, path, dtype=None, prefix: str = ""):
    from freezeasguard.audit.original_layouts import bfl_flux2_segments
    keys = {_flux2_bfl_key(n) for n in state}
    table = bfl_flux2_segments(keys, config)
    assert set(table) == set(state)
    names_of = {}
    for name, segs in table.items():
        for key, _, _ in segs:
            names_of.setdefault(key, set()).add(name)
    total = {k: sum(state[n].shape[0] for n in names) if len(names) > 1 else state[next(iter(names))].shape[0]
             for k, names in names_of.items()}
    out = {k: torch.empty((total[k], *state[next(iter(names))].shape[1:])) for k, names in names_of.items()}
    for name, segs in table.items():
        offset = 0
        for key, start, end in segs:
            length = (end if end is not None else total[key]) - start
            out[key][start:start + length] = state[name][offset:offset + length]
            offset += length
    save_file({prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in out.items()}, str(path))
    return path


def test_the_flux2_table_equals_diffusers_converter_at_flux2_dev_width():
    """diffusers' convert_flux2_transformer_checkpoint_to_diffusers on row-coded placeholders at
    FLUX.2 [dev]'s width (48 heads of 128): each parameter decodes to bfl_flux2_segments' rows."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from freezeasguard.audit.original_layouts import bfl_flux2_segments
    inner = 48 * 128
    keys = [f"{k}.weight" for k in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                                    "guidance_in.out_layer", "double_stream_modulation_img.lin",
                                    "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
                                    "final_layer.linear", "final_layer.adaLN_modulation.1")]
    for i in range(2):
        keys += [f"double_blocks.{i}.{k}.weight" for k in ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                                                          "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")]
        keys += [f"double_blocks.{i}.{k}.scale" for k in ("img_attn.norm.query_norm", "img_attn.norm.key_norm",
                                                         "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")]
        keys += [f"single_blocks.{i}.{k}.weight" for k in ("linear1", "linear2")]
        keys += [f"single_blocks.{i}.norm.{k}.scale" for k in ("query_norm", "key_norm")]

    def rows(key):
        return 3 * inner if ".qkv." in key else 2 * inner if "adaLN_modulation" in key else 5
    coded = {k: (i * 100_000 + torch.arange(rows(k), dtype=torch.float64)).reshape(-1, 1) for i, k in enumerate(keys)}
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(coded))
    ours = bfl_flux2_segments(keys, {"num_attention_heads": 48, "attention_head_dim": 128})

    def decode(t):
        segments = []
        for code in t.view(-1).long().tolist():
            key, row = keys[code // 100_000], code % 100_000
            if segments and segments[-1][0] == key and segments[-1][2] == row:
                segments[-1][2] = row + 1
            else:
                segments.append([key, row, row + 1])
        return [tuple(s) for s in segments]
    assert set(converted) == set(ours) and len(ours) == 11 + 2 * (12 + 4) + 2 * 4
    for name, t in converted.items():
        assert decode(t) == [(k, a, b if b is not None else rows(k)) for k, a, b in ours[name]], name


def test_a_flux2_single_file_in_bfl_layout_is_audited_and_one_ulp_in_a_fused_qkv_slice_flagged(tmp_path, capsys):
    """The tiny FLUX.2 written in BFL's layout: diffusers' converter gives the state back; verify
    passes it (and ComfyUI's prefixed fp16 under tolerance), flags one ulp in a frozen slice of a
    double block's fused q/k/v and passes one in a trainable slice of the same tensor (exit 1 / 0)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    from freezeasguard.audit.verify import denoiser_config
    from freezeasguard.models.pipelines import fingerprint
    folder = save_tiny(tmp_path / "f", "flux2")
    base = load_denoiser_state(folder)
    config = denoiser_config(folder)
    write_flux2_bfl_file(base, config, tmp_path / "flux2.safetensors")
    back = convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(tmp_path / "flux2.safetensors")))
    assert set(back) == set(base) and all(torch.equal(back[n], base[n]) for n in base)
    names = list(base)
    frozen_slice, trainable_slice = "transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.attn.to_v.weight"
    scores = torch.tensor([1.0 if n == frozen_slice or ".ff." in n else 0.0 for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.1, base_fingerprint=fingerprint(base.items()))
    assert frozen_slice in mask.frozen_names and trainable_slice not in mask.frozen_names
    mask_path = mask.save(tmp_path / "mask.safetensors")
    write_flux2_bfl_file(base, config, tmp_path / "comfy16.safetensors", torch.float16, prefix="model.diffusion_model.")

    def one_ulp(name, file):
        t = base[name].clone().view(-1)
        t[2] = torch.nextafter(t[2], torch.tensor(float("inf")))
        return write_flux2_bfl_file({**base, name: t.view_as(base[name])}, config, tmp_path / file)

    def verify(candidate, *extra):
        code = main(["verify", "--model", str(folder), "--mask", str(mask_path), "--candidate", str(candidate), *extra])
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out + out.err
    code, out = verify(tmp_path / "flux2.safetensors")
    assert code == 0 and "bfl-flux2 layout" in out
    assert verify(tmp_path / "comfy16.safetensors", "--tolerance")[0] == 0
    code, out = verify(one_ulp(frozen_slice, "frozen-ulp.safetensors"))
    assert code == 1 and frozen_slice in out
    assert verify(one_ulp(trainable_slice, "free-ulp.safetensors"))[0] == 0


def _zimage_original_key(name: str) -> str:
    """The key holding a Z-Image parameter in its authors' layout (their fused q/k/v, out, q/k_norm)."""
    for new, old in (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder.")):
        if name.startswith(new):
            return old + name[len(new):]
    for new, old in ((".attention.to_q.", ".attention.qkv."), (".attention.to_k.", ".attention.qkv."),
                     (".attention.to_v.", ".attention.qkv."), (".attention.to_out.0.", ".attention.out."),
                     (".attention.norm_k.", ".attention.k_norm."), (".attention.norm_q.", ".attention.q_norm.")):
        name = name.replace(new, old)
    return name


def test_a_zimage_single_file_in_its_authors_layout_is_audited_and_one_ulp_in_a_fused_qkv_slice_flagged(tmp_path,
                                                                                                       capsys):
    """Z-Image's original layout differs from diffusers' (fused q/k/v, renamed out and norms, the
    embedder and final layer without the patch-size name): the tiny Z-Image written so round-trips
    through diffusers' converter, passes verify, and one ulp in a frozen slice of a fused q/k/v is
    flagged while one in a trainable slice of the same tensor passes."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    from freezeasguard.models.pipelines import fingerprint
    folder = save_tiny(tmp_path / "z", "zimage")
    base = load_denoiser_state(folder)

    def write(state, path, prefix=""):
        out = {}
        for name in state:
            out.setdefault(_zimage_original_key(name), []).append(state[name])
        tensors = {prefix + k: torch.cat(v) if len(v) > 1 else v[0] for k, v in out.items()}
        tensors[prefix + "norm_final.weight"] = torch.ones(4)          # in the release, not in diffusers' model
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path
    ordered = {}          # each fused q/k/v assembled in the order q, k, v (the state's own order is by name)
    for name in base:
        if ".attention.to_" in name and ".to_out." not in name:
            stem = name.rsplit(".to_", 1)[0]
            for n in ("to_q", "to_k", "to_v"):
                ordered[f"{stem}.{n}.weight"] = base[f"{stem}.{n}.weight"]
        else:
            ordered[name] = base[name]
    write(ordered, tmp_path / "z.safetensors", "model.diffusion_model.")
    back = convert_z_image_transformer_checkpoint_to_diffusers(load_file(str(tmp_path / "z.safetensors")))
    assert set(back) == set(base) and all(torch.equal(back[n], base[n]) for n in base)
    names = list(base)
    frozen_slice, trainable_slice = "layers.0.attention.to_k.weight", "layers.0.attention.to_q.weight"
    scores = torch.tensor([1.0 if n == frozen_slice or "feed_forward" in n else 0.0 for n in names])
    mask = Mask.from_scores([(n, base[n]) for n in names], scores, 0.1, base_fingerprint=fingerprint(base.items()))
    assert frozen_slice in mask.frozen_names and trainable_slice not in mask.frozen_names
    mask_path = mask.save(tmp_path / "mask.safetensors")

    def one_ulp(name, file):
        t = ordered[name].clone().view(-1)
        t[2] = torch.nextafter(t[2], torch.tensor(float("inf")))
        return write({**ordered, name: t.view_as(ordered[name])}, tmp_path / file)

    def verify(candidate):
        code = main(["verify", "--model", str(folder), "--mask", str(mask_path), "--candidate", str(candidate)])
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out + out.err
    code, out = verify(tmp_path / "z.safetensors")
    assert code == 0 and "zimage-original layout" in out, out
    code, out = verify(one_ulp(frozen_slice, "frozen-ulp.safetensors"))
    assert code == 1 and frozen_slice in out
    assert verify(one_ulp(trainable_slice, "free-ulp.safetensors"))[0] == 0
