"""The original layouts' names, mapped to the denoiser's own: what single files and adapters
trained on them call each parameter (layouts.py reads the files with these maps).

- SD 1.x/2.x and SDXL (LDM): diffusers' own converter (``convert_ldm_unet_checkpoint``, what
  ``from_single_file`` runs) on placeholder values, so that it says which file key each parameter
  comes from without reading a weight; ldm_key_map goes the other way.
- FLUX.1 and FLUX.2 (Black Forest Labs), SD3/SD3.5 (Stability AI) and Z-Image (its authors):
  tables after diffusers' converters, each tested equal to it. A parameter is one or more row
  ranges of file keys ("segments"): a fused q/k/v holds three.
"""
from __future__ import annotations

import re

import torch

class LayoutError(ValueError):
    """A checkpoint whose layout cannot be told or does not fit the base model."""


LDM_UNET_PREFIX = "model.diffusion_model."
# other parts of a single-file checkpoint: not the denoiser, never audited as part of it
LDM_OTHER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "text_encoders.",
                      "vae.")



# diffusers UNet names -> the original SD layout, for maps that start from the base model's names
# (an adapter in LDM names, a test writing single files). Each down level holds layers+1 slots
# (its resnets, then a downsampler), each up level layers+1 (the upsampler in the last, after the
# attention when there is one). ldm_key_map checks every name against diffusers' own converter.
_LDM_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _ldm_resnet(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return f"{_LDM_RESNET.get(head, head)}.{tail}"


def ldm_name(name: str, config: dict) -> str:
    """A diffusers UNet parameter's name in the original SD layout (without model.diffusion_model.)."""
    slots = config["layers_per_block"] + 1
    for a, b in _LDM_FIXED.items():
        if name.startswith(a + "."):
            return b + name[len(a):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{slots * i + j + 1}." + ("0." + _ldm_resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{slots * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{slots * i + j}." + ("0." + _ldm_resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
        i = int(m[1])
        return f"output_blocks.{slots * i + slots - 1}.{2 if 'CrossAttn' in config['up_block_types'][i] else 1}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{2 * int(m[1])}.{_ldm_resnet(m[2])}"
    raise LayoutError(f"{name}: a UNet parameter the single-file layout has no place for")


def ldm_key_map(names, config: dict) -> dict[str, str]:
    """Every diffusers UNet parameter -> its single-file key, checked against diffusers' converter
    (the map it gives back must be this one, name for name)."""
    forward = {n: LDM_UNET_PREFIX + ldm_name(n, config) for n in names}
    back = ldm_unet_names(list(forward.values()), config)
    if back != forward:
        wrong = sorted(set(back.items()) ^ set(forward.items()))[:2]
        raise LayoutError(f"this UNet's layout does not round-trip through diffusers' single-file converter "
                          f"(first differences: {wrong})")
    return forward


def ldm_unet_names(file_keys, unet_config: dict) -> dict[str, str]:
    """The denoiser parameter name -> the single-file key it is stored under, as diffusers'
    single-file loader maps them. Only the UNet's keys are looked at."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = [k for k in file_keys if k.startswith(LDM_UNET_PREFIX)]
    # the converter only renames: a scalar index per key says where each parameter came from
    placeholders = {k: torch.tensor(i) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(placeholders, dict(unet_config))
    return {name: keys[int(index)] for name, index in converted.items()}


# FLUX.1 in Black Forest Labs' layout, as diffusers' convert_flux_transformer_checkpoint_to_diffusers
# reads it; that function fixes the width at 3072 (FLUX.1's), so the table is rebuilt here with
# the width from the transformer's config. A segment is (file key, first row, end row): fused
# q/k/v (and q/k/v/mlp in the single blocks) hold several parameters as row ranges, and the final
# modulation stores (shift, scale) where diffusers holds (scale, shift).
_FLUX_WHOLE = [("time_text_embed.timestep_embedder.linear_{}", "time_in.{}_layer"),
               ("time_text_embed.text_embedder.linear_{}", "vector_in.{}_layer"),
               ("time_text_embed.guidance_embedder.linear_{}", "guidance_in.{}_layer")]
_FLUX_DOUBLE = [("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                ("ff_context.net.2", "txt_mlp.2"), ("attn.to_out.0", "img_attn.proj"),
                ("attn.to_add_out", "txt_attn.proj")]
_FLUX_DOUBLE_NORMS = [("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                      ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                      ("attn.norm_added_k", "txt_attn.norm.key_norm")]


def bfl_flux_segments(file_keys, config: dict) -> dict[str, list[tuple[str, int, int | None]]]:
    """The FLUX transformer's parameter name -> the row ranges of BFL-layout keys it is made of."""
    keys = set(file_keys)
    prefix = LDM_UNET_PREFIX if any(k.startswith(LDM_UNET_PREFIX + "double_blocks.") for k in keys) else ""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    split = [0, inner, 2 * inner, 3 * inner, 3 * inner + int(inner * 4.0)]
    out: dict[str, list[tuple[str, int, int | None]]] = {}

    def whole(name, key):
        for p in ("weight", "bias"):
            if prefix + f"{key}.{p}" in keys:
                out[f"{name}.{p}"] = [(prefix + f"{key}.{p}", 0, None)]

    for name, key in _FLUX_WHOLE:
        whole(name.format(1), key.format("in"))
        whole(name.format(2), key.format("out"))
    whole("context_embedder", "txt_in")
    whole("x_embedder", "img_in")
    whole("proj_out", "final_layer.linear")
    for i in sorted({int(k[len(prefix):].split(".")[1]) for k in keys if k[len(prefix):].startswith("double_blocks.")}):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for name, key in _FLUX_DOUBLE:
            whole(d + name, b + key)
        for name, key in _FLUX_DOUBLE_NORMS:
            out[f"{d}{name}.weight"] = [(f"{prefix}{b}{key}.scale", 0, None)]
        for stream, names in (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj",
                                                                                     "add_v_proj"))):
            for j, n in enumerate(names):
                for p in ("weight", "bias"):
                    out[f"{d}attn.{n}.{p}"] = [(f"{prefix}{b}{stream}.qkv.{p}", split[j], split[j + 1])]
    for i in sorted({int(k[len(prefix):].split(".")[1]) for k in keys if k[len(prefix):].startswith("single_blocks.")}):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        whole(d + "norm.linear", b + "modulation.lin")
        whole(d + "proj_out", b + "linear2")
        out[f"{d}attn.norm_q.weight"] = [(f"{prefix}{b}norm.query_norm.scale", 0, None)]
        out[f"{d}attn.norm_k.weight"] = [(f"{prefix}{b}norm.key_norm.scale", 0, None)]
        for j, n in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
            for p in ("weight", "bias"):
                out[f"{d}{n}.{p}"] = [(f"{prefix}{b}linear1.{p}", split[j], split[j + 1])]
    for p in ("weight", "bias"):
        key = f"{prefix}final_layer.adaLN_modulation.1.{p}"
        if key in keys:
            out[f"norm_out.linear.{p}"] = [(key, inner, None), (key, 0, inner)]     # (shift, scale) -> (scale, shift)
    return {n: segs for n, segs in out.items() if all(s[0] in keys for s in segs)}


def bfl_keys(names) -> set[str]:
    """The BFL-layout keys of a FLUX transformer with these diffusers parameter names (no data)."""
    keys = set()
    heads = ["time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "txt_in", "img_in",
             "final_layer.linear", "final_layer.adaLN_modulation.1"]
    if any(n.startswith("time_text_embed.guidance_embedder.") for n in names):
        heads += ["guidance_in.in_layer", "guidance_in.out_layer"]
    doubles = {int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks.")}
    singles = {int(n.split(".")[1]) for n in names if n.startswith("single_transformer_blocks.")}
    linear = heads + [f"double_blocks.{i}.{k}" for i in doubles for k in (
        "img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
        "txt_mlp.2", "img_attn.proj", "txt_attn.proj")]
    linear += [f"single_blocks.{i}.{k}" for i in singles for k in ("modulation.lin", "linear1", "linear2")]
    keys |= {f"{k}.{p}" for k in linear for p in ("weight", "bias")}
    keys |= {f"double_blocks.{i}.{k}.scale" for i in doubles for k in (
        "img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")}
    keys |= {f"single_blocks.{i}.norm.{k}.scale" for i in singles for k in ("query_norm", "key_norm")}
    return keys


# SD3/SD3.5 in Stability AI's layout (sd3.5_large.safetensors, ComfyUI's saves), as diffusers'
# convert_sd3_transformer_checkpoint_to_diffusers reads it: joint blocks with fused q/k/v per
# stream, SD3.5 Medium's second attention (attn2) in the blocks that have one, and the last block's
# context modulation and the final one stored (shift, scale) where diffusers holds (scale, shift).
_SD3_WHOLE = [("pos_embed.proj", "x_embedder.proj"), ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
              ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"), ("context_embedder", "context_embedder"),
              ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
              ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear")]
_SD3_BLOCK = [("attn.to_out.0", "x_block.attn.proj"), ("attn.to_add_out", "context_block.attn.proj"),
              ("attn2.to_out.0", "x_block.attn2.proj"), ("norm1.linear", "x_block.adaLN_modulation.1"),
              ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2"),
              ("ff_context.net.0.proj", "context_block.mlp.fc1"), ("ff_context.net.2", "context_block.mlp.fc2")]
_SD3_NORMS = [("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
              ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
              ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")]
_SD3_QKV = [("attn", "x_block.attn.qkv", ("to_q", "to_k", "to_v")),
            ("attn", "context_block.attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
            ("attn2", "x_block.attn2.qkv", ("to_q", "to_k", "to_v"))]


def sai_sd3_segments(file_keys, config: dict) -> dict[str, list[tuple[str, int, int | None]]]:
    """The SD3 transformer's parameter name -> the row ranges of Stability AI layout keys it is made of."""
    keys = set(file_keys)
    prefix = LDM_UNET_PREFIX if any(k.startswith(LDM_UNET_PREFIX + "joint_blocks.") for k in keys) else ""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, list[tuple[str, int, int | None]]] = {}

    def whole(name, key, params=("weight", "bias")):
        for p in params:
            out[f"{name}.{p}"] = [(f"{prefix}{key}.{p}", 0, None)]

    def swapped(name, key, half):
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = [(f"{prefix}{key}.{p}", half, None), (f"{prefix}{key}.{p}", 0, half)]

    out["pos_embed.pos_embed"] = [(prefix + "pos_embed", 0, None)]
    for name, key in _SD3_WHOLE:
        whole(name, key)
    blocks = sorted({int(k[len(prefix):].split(".")[1]) for k in keys if k[len(prefix):].startswith("joint_blocks.")})
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for name, key in _SD3_BLOCK:
            whole(d + name, b + key)
        for name, key in _SD3_NORMS:
            whole(d + name, b + key, ("weight",))
        for module, key, names in _SD3_QKV:
            for j, n in enumerate(names):
                for p in ("weight", "bias"):
                    out[f"{d}{module}.{n}.{p}"] = [(f"{prefix}{b}{key}.{p}", j * inner, (j + 1) * inner)]
        if i == blocks[-1]:   # the last block's context stream only modulates: (shift, scale) stored
            swapped(d + "norm1_context.linear", b + "context_block.adaLN_modulation.1", inner)
        else:
            whole(d + "norm1_context.linear", b + "context_block.adaLN_modulation.1")
    swapped("norm_out.linear", "final_layer.adaLN_modulation.1", inner)
    return {n: segs for n, segs in out.items() if all(s[0] in keys for s in segs)}


# FLUX.2 in Black Forest Labs' layout, as diffusers' convert_flux2_transformer_checkpoint_to_diffusers
# reads it: renames, the double blocks' fused q/k/v split in three, the single blocks' fused
# projection kept fused (diffusers' to_qkv_mlp_proj), and the final modulation's (shift, scale).
_FLUX2_RENAMES = {"img_in": "x_embedder", "txt_in": "context_embedder",
                  "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
                  "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
                  "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
                  "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
                  "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
                  "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
                  "single_stream_modulation.lin": "single_stream_modulation.linear", "final_layer.linear": "proj_out"}
_FLUX2_DOUBLE = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                 "img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
                 "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
                 "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.linear_in",
                 "txt_mlp.2": "ff_context.linear_out"}
_FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out", "norm.query_norm": "attn.norm_q",
                 "norm.key_norm": "attn.norm_k"}


def bfl_flux2_segments(file_keys, config: dict) -> dict[str, list[tuple[str, int, int | None]]]:
    """The FLUX.2 transformer's parameter name -> the row ranges of BFL-layout keys it is made of."""
    keys = set(file_keys)
    prefix = LDM_UNET_PREFIX if any(k.startswith(LDM_UNET_PREFIX + "double_blocks.") for k in keys) else ""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, list[tuple[str, int, int | None]]] = {}
    for key in keys:
        if not key.startswith(prefix) or key.startswith(LDM_OTHER_PREFIXES):
            continue
        module, param = key[len(prefix):].rsplit(".", 1)
        param = "weight" if param == "scale" else param
        if module == "final_layer.adaLN_modulation.1":       # (shift, scale) -> (scale, shift)
            out[f"norm_out.linear.{param}"] = [(key, inner, None), (key, 0, inner)]
        elif module.startswith(("double_blocks.", "single_blocks.")):
            kind, i, rest = module.split(".", 2)
            if kind == "single_blocks" and rest in _FLUX2_SINGLE:
                out[f"single_transformer_blocks.{i}.{_FLUX2_SINGLE[rest]}.{param}"] = [(key, 0, None)]
            elif rest in ("img_attn.qkv", "txt_attn.qkv"):
                names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                for j, n in enumerate(names):
                    out[f"transformer_blocks.{i}.attn.{n}.{param}"] = [(key, j * inner, (j + 1) * inner)]
            elif kind == "double_blocks" and rest in _FLUX2_DOUBLE:
                out[f"transformer_blocks.{i}.{_FLUX2_DOUBLE[rest]}.{param}"] = [(key, 0, None)]
        elif module in _FLUX2_RENAMES:
            out[f"{_FLUX2_RENAMES[module]}.{param}"] = [(key, 0, None)]
    return out


# Z-Image in its authors' layout, as diffusers' convert_z_image_transformer_checkpoint_to_diffusers
# reads it: a fused q/k/v per attention, out/q_norm/k_norm renamed, the patch embedder and final
# layer under diffusers' per-patch-size names (2-1), and norm_final (not in diffusers' model) unmapped.
_ZIMAGE_RENAMES = [(".attention.out.", ".attention.to_out.0."), (".attention.k_norm.", ".attention.norm_k."),
                   (".attention.q_norm.", ".attention.norm_q.")]


def zimage_original_segments(file_keys, config: dict) -> dict[str, list[tuple[str, int, int | None]]]:
    """The Z-Image transformer's parameter name -> the row ranges of its authors' layout keys."""
    keys = set(file_keys)
    prefix = LDM_UNET_PREFIX if any(k.startswith(LDM_UNET_PREFIX) and ".attention." in k for k in keys) else ""
    dim = config["dim"]
    out: dict[str, list[tuple[str, int, int | None]]] = {}
    for key in keys:
        if not key.startswith(prefix) or key.startswith(LDM_OTHER_PREFIXES) or key == prefix + "norm_final.weight":
            continue
        name = key[len(prefix):]
        for old, new in (("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1.")):
            if name.startswith(old):
                name = new + name[len(old):]
        for old, new in _ZIMAGE_RENAMES:
            name = name.replace(old, new)
        if name.endswith(".attention.qkv.weight"):
            for j, n in enumerate(("to_q", "to_k", "to_v")):
                out[name.replace(".qkv.", f".{n}.")] = [(key, j * dim, (j + 1) * dim)]
        else:
            out[name] = [(key, 0, None)]
    return out


def is_sd3(config: dict) -> bool:
    """An SD3/SD3.5 transformer's config (MMDiT: joint attention with a caption projection)."""
    return "caption_projection_dim" in config and "joint_attention_dim" in config


def is_flux1(config: dict) -> bool:
    """A FLUX.1 transformer's config (FLUX.2's has single blocks too, but no pooled projection)."""
    return "num_single_layers" in config and "pooled_projection_dim" in config


def original_module_aliases(names, config: dict | None) -> dict[str, list[str]]:
    """The denoiser's modules under the original layout's names (SD/SDXL LDM, FLUX.1 and FLUX.2
    BFL, SD3 Stability AI, Z-Image's authors') -> the diffusers modules each one is (several for
    a fused q/k/v): what LoRA files trained on a single-file checkpoint (ComfyUI's and ai-toolkit's
    diffusion_model.*, kohya's and musubi-tuner's lora_unet_* on those names) name."""
    names = list(names)
    if not config:
        return {}
    aliases: dict[str, set[str]] = {}
    if "layers_per_block" in config:
        for n, key in ldm_key_map(names, config).items():
            aliases.setdefault(key[len(LDM_UNET_PREFIX):].rsplit(".", 1)[0], set()).add(n.rsplit(".", 1)[0])
    else:
        known = set(names)
        table = bfl_flux_segments(bfl_keys(names), config) if is_flux1(config) else \
            sai_sd3_segments(sai_sd3_keys(names), config) if is_sd3(config) else \
            bfl_flux2_segments({bfl_flux2_key(n) for n in names}, config) \
            if config.get("_class_name") == "Flux2Transformer2DModel" else \
            zimage_original_segments({zimage_original_key(n) for n in names}, config) \
            if config.get("_class_name") == "ZImageTransformer2DModel" else {}
        for n, segs in table.items():
            if n in known:
                for key, _, _ in segs:
                    aliases.setdefault(key.rsplit(".", 1)[0], set()).add(n.rsplit(".", 1)[0])
    return {k: sorted(v) for k, v in aliases.items()}


# The original layouts' keys from diffusers' names, each read backwards off its table above; the
# tables then map them forwards, so a name they do not give back has no alias.
def sai_sd3_keys(names) -> set[str]:
    """Stability AI layout keys an SD3 transformer with these diffusers names may hold (a superset:
    the tables' entries for every block; sai_sd3_segments keeps those the names have)."""
    blocks = {int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks.")}
    modules = [o for _, o in _SD3_WHOLE] + ["final_layer.adaLN_modulation.1"]
    modules += [f"joint_blocks.{i}.{o}" for i in blocks for o in
                [o for _, o in _SD3_BLOCK] + [o for _, o, _ in _SD3_QKV] + ["context_block.adaLN_modulation.1"]]
    keys = {f"{m}.{p}" for m in modules for p in ("weight", "bias")} | {"pos_embed"}
    return keys | {f"joint_blocks.{i}.{o}.weight" for i in blocks for _, o in _SD3_NORMS}


def bfl_flux2_key(name: str) -> str:
    """The BFL-layout key a FLUX.2 transformer parameter lies in (its fused q/k/v for to_q, ...)."""
    module, param = name.rsplit(".", 1)
    if module == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{param}"
    renamed = {new: old for old, new in _FLUX2_RENAMES.items()}
    if module in renamed:
        return f"{renamed[module]}.{param}"
    kind, i, rest = (module.split(".", 2) + ["", ""])[:3]
    if kind == "transformer_blocks":
        if rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
            return f"double_blocks.{i}.img_attn.qkv.{param}"
        if rest in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
            return f"double_blocks.{i}.txt_attn.qkv.{param}"
        double = {new: old for old, new in _FLUX2_DOUBLE.items()}
        return f"double_blocks.{i}.{double.get(rest, rest)}.{param}"
    if kind == "single_transformer_blocks":
        single = {new: old for old, new in _FLUX2_SINGLE.items()}
        return f"single_blocks.{i}.{single.get(rest, rest)}.{param}"
    return name


def zimage_original_key(name: str) -> str:
    """The key a Z-Image parameter lies in in its authors' layout (its fused q/k/v for to_q, ...)."""
    for old, new in (("final_layer.", "all_final_layer.2-1."), ("x_embedder.", "all_x_embedder.2-1.")):
        if name.startswith(new):
            name = old + name[len(new):]
    for old, new in _ZIMAGE_RENAMES + [(".attention.qkv.", f".attention.{n}.") for n in ("to_q", "to_k", "to_v")]:
        name = name.replace(new, old)
    return name
