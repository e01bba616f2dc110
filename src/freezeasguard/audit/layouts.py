"""The layouts people share checkpoints in, mapped to the denoiser's own parameter names.

A fine-tuned model is shared as a diffusers folder or, more often, as one file in the original
layout that AUTOMATIC1111, ComfyUI, Forge and kohya's scripts save: the UNet under
``model.diffusion_model.`` with LDM names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``),
often in fp16, often with the VAE (``first_stage_model.``) and text encoders
(``cond_stage_model.``, ``conditioner.``) beside it. The map from those names to the UNet's is
diffusers' own (``convert_ldm_unet_checkpoint``, what ``from_single_file`` runs); we run it on
placeholder values, so that it says which file key each parameter comes from without reading a
weight. A layout that cannot be told is an error naming what was found, never a guess.
"""
from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from freezeasguard.models.pipelines import ModelError, denoiser_weight_files
from freezeasguard.audit.digests import tensor_bytes
from freezeasguard.audit.tensorfile import TensorFile, TensorFileError

LDM_UNET_PREFIX = "model.diffusion_model."
# other parts of a single-file checkpoint: not the denoiser, never audited as part of it
LDM_OTHER_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "text_encoders.",
                      "vae.")


LAYOUT_NAMES = {"ldm-unet": "single-file SD/SDXL (LDM layout)", "bfl-flux": "single-file FLUX.1 (BFL layout)",
                "bfl-flux2": "single-file FLUX.2 (BFL layout)",
                "sai-sd3": "single-file SD3/SD3.5 (Stability AI's layout)",
                "zimage-original": "single-file Z-Image (its authors' layout)", "diffusers": "diffusers"}


# single files of transformers in their authors' layout: every key not under another part's prefix is the denoiser's
ORIGINAL_TRANSFORMER_LAYOUTS = ("bfl-flux", "bfl-flux2", "sai-sd3", "zimage-original")
# keys of a release that diffusers' converter drops because its model has no such parameter (Z-Image's
# final norm; diffusers' model, which reproduces the release's outputs, has none): counted with the other parts
UNUSED_BY_DIFFUSERS = {"zimage-original": ("norm_final.weight",)}


class LayoutError(ValueError):
    """A checkpoint whose layout cannot be told or does not fit the base model."""


def detect_layout(keys) -> str:
    """'ldm-unet' (an SD 1.x/2.x or SDXL single file) or 'diffusers' (the denoiser's own names);
    anything else is a LayoutError naming the keys found."""
    keys = list(keys)
    if any(k.startswith(("double_blocks.", LDM_UNET_PREFIX + "double_blocks.")) for k in keys):
        # FLUX.2 shares its modulation over the blocks; FLUX.1 modulates each block
        return "bfl-flux2" if any(k.removeprefix(LDM_UNET_PREFIX).startswith("double_stream_modulation_img.")
                                  for k in keys) else "bfl-flux"
    if any(k.startswith(("joint_blocks.", LDM_UNET_PREFIX + "joint_blocks.")) for k in keys):
        return "sai-sd3"
    if any(k.removeprefix(LDM_UNET_PREFIX).startswith(("layers.", "noise_refiner.", "context_refiner."))
           and k.endswith(".attention.qkv.weight") for k in keys):
        return "zimage-original"
    if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
        return "ldm-unet"
    # UNets; SD3, FLUX.1/2 and Qwen-Image transformers; Z-Image's (layers, refiners)
    if any(k.startswith(("down_blocks.", "transformer_blocks.", "single_transformer_blocks.", "conv_in.",
                         "context_refiner.", "noise_refiner.")) for k in keys):
        return "diffusers"
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise LayoutError(f"cannot tell this checkpoint's layout (keys such as {shown}): neither a diffusers denoiser, "
                      f"a single-file SD/SDXL checkpoint ({LDM_UNET_PREFIX}...), a FLUX.1 one (double_blocks...) nor "
                      f"an SD3/SD3.5 one (joint_blocks...)")


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


class Checkpoint:
    """A shared checkpoint's denoiser tensors under the denoiser's own names, each read when asked
    for: a diffusers pipeline or denoiser folder, a denoiser state file, or a single file in the
    SD/SDXL (LDM) or FLUX.1 (BFL) layout, whose names ``denoiser_config`` maps. A parameter is one
    or more row ranges of file tensors (FLUX's fused q/k/v hold three)."""

    def __init__(self, path, denoiser_config: dict | None = None):
        self.path = Path(path)
        try:
            self.files = [TensorFile(f) for f in denoiser_weight_files(self.path)]
        except TensorFileError as exc:
            raise ModelError(str(exc)) from exc
        self.file_of = {k: f for f in self.files for k in f.keys()}
        self.scratch: bytearray | None = None
        self.layout = detect_layout(self.file_of)
        self.unmapped, self.others = [], 0
        if self.layout == "diffusers":
            self.where = {k: [(k, 0, None)] for k in self.file_of}
            return
        if denoiser_config is None:
            raise LayoutError(f"{self.path} is a single-file checkpoint ({self.layout}); mapping its names needs the "
                              f"denoiser's config: pass --model BASE, or a mask that records it (`freezeasguard mask "
                              f"record`)")
        family = "ldm-unet" if "layers_per_block" in denoiser_config else \
            "bfl-flux" if is_flux1(denoiser_config) else "sai-sd3" if is_sd3(denoiser_config) else \
            "bfl-flux2" if denoiser_config.get("_class_name") == "Flux2Transformer2DModel" else \
            "zimage-original" if denoiser_config.get("_class_name") == "ZImageTransformer2DModel" else \
            denoiser_config.get("_class_name", "another")
        if family != self.layout:
            raise LayoutError(f"{self.path} is a {LAYOUT_NAMES[self.layout]} checkpoint, and the mask's base model is "
                              f"{LAYOUT_NAMES.get(family, family)}: audit it with a mask for its own base model")
        try:
            if self.layout == "ldm-unet":
                self.where = {n: [(k, 0, None)] for n, k in ldm_unet_names(self.file_of, denoiser_config).items()}
            elif self.layout == "sai-sd3":
                self.where = sai_sd3_segments(self.file_of, denoiser_config)
            elif self.layout == "bfl-flux2":
                self.where = bfl_flux2_segments(self.file_of, denoiser_config)
            elif self.layout == "zimage-original":
                self.where = zimage_original_segments(self.file_of, denoiser_config)
            else:
                self.where = bfl_flux_segments(self.file_of, denoiser_config)
        except (KeyError, IndexError, ValueError, RuntimeError) as exc:
            raise LayoutError(f"{self.path}: its {LAYOUT_NAMES[self.layout]} keys do not fit the mask's base model "
                              f"({type(exc).__name__}: {exc})") from exc
        used = {seg[0] for segs in self.where.values() for seg in segs}
        unused = UNUSED_BY_DIFFUSERS.get(self.layout, ())
        own = [k for k in self.file_of if (k.startswith(LDM_UNET_PREFIX) or self.layout in ORIGINAL_TRANSFORMER_LAYOUTS
               and not k.startswith(LDM_OTHER_PREFIXES)) and k.removeprefix(LDM_UNET_PREFIX) not in unused]
        self.unmapped = [k for k in own if k not in used]
        self.others = len(self.file_of) - len(own)

    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _segment_shape(self, key: str, start: int, end: int | None) -> tuple[int, ...]:
        shape = self.file_of[key].shape(key)
        return shape if start == 0 and end is None else ((end or shape[0]) - start, *shape[1:])

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = [self._segment_shape(*seg) for seg in self.where[name]]
        return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]

    def dtype(self, name: str) -> torch.dtype:
        key = self.where[name][0][0]
        return self.file_of[key].dtype(key)

    def pieces(self, name: str) -> list[tuple[TensorFile, str, int, int]]:
        """The parameter's bytes in order, as (file, key, offset in the file, length)."""
        out = []
        for key, start, end in self.where[name]:
            f = self.file_of[key]
            offset, length, _ = f.row_bytes(key, start, end)
            out.append((f, key, offset, length))
        return out

    def chunks(self, name: str, chunk_elements: int, buf: bytearray):
        """The parameter's elements in order, flat, ``chunk_elements`` at a time (the last chunk
        shorter), each a tensor over ``buf`` valid until the next is asked for. Two checkpoints
        chunked alike yield the same elements in step, whatever their layouts. A chunk stays in
        the core's cache while it is checked and hashed, where a whole 100 MB tensor goes to
        memory and comes back once per pass."""
        dtype = self.dtype(name)
        want = chunk_elements * torch.tensor([], dtype=dtype).element_size()
        if len(buf) < want:
            raise ValueError(f"a {len(buf)}-byte buffer cannot hold {chunk_elements} elements of {dtype}")
        view, filled = memoryview(buf), 0
        try:
            for f, key, offset, length in self.pieces(name):
                while length:
                    n = min(length, want - filled)
                    f.read_into(offset, view[filled:filled + n], key)
                    filled, offset, length = filled + n, offset + n, length - n
                    if filled == want:
                        yield torch.frombuffer(view[:filled], dtype=dtype)
                        filled = 0
        except TensorFileError as exc:
            raise ModelError(str(exc)) from exc
        if filled:
            yield torch.frombuffer(view[:filled], dtype=dtype)

    def stream(self, names):
        """(name, tensor) for each of ``names`` in order, the next one read by a second thread
        while the caller works on this one (file reads and hashing release the GIL), into two
        buffers used in turn: each tensor is valid until the caller asks for the one after it."""
        names = list(names)
        if not names:
            return
        buffers = [self._scratch(), bytearray(len(self._scratch()))]

        def load(i):
            segments = self.where[names[i]]
            if len(segments) == 1:
                key, start, end = segments[0]
                return self.file_of[key].read_rows(key, start, end, buffers[i % 2])
            return torch.cat([self.file_of[k].read_rows(k, a, b) for k, a, b in segments])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, 0)
            for i, name in enumerate(names):
                try:
                    tensor = pending.result()
                except TensorFileError as exc:
                    raise ModelError(str(exc)) from exc
                if i + 1 < len(names):
                    pending = pool.submit(load, i + 1)
                yield name, tensor

    def _scratch(self) -> bytearray:
        if self.scratch is None:
            self.scratch = bytearray(max((f.nbytes(k) for f in self.files for k in f.keys()), default=0))
        return self.scratch

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read + f.header_bytes for f in self.files)

    def fingerprint(self, visit=None) -> dict:
        """models.fingerprint of the denoiser's tensors, one tensor in memory at a time;
        ``visit(name, tensor)`` sees each tensor on the way (one pass for whatever else needs them)."""
        names = sorted(self.where)
        weights = hashlib.blake2b(digest_size=16)
        for name, t in self.stream(names):
            weights.update(str(t.dtype).encode())
            weights.update(tensor_bytes(t))
            if visit is not None:
                visit(name, t)
        shapes = [list(self.shape(n)) for n in names]
        return {"num_tensors": len(names),
                "names_hash": hashlib.blake2b("\n".join(names).encode(), digest_size=16).hexdigest(),
                "shapes_hash": hashlib.blake2b(json.dumps(shapes).encode(), digest_size=16).hexdigest(),
                "weights_hash": weights.hexdigest()}


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
