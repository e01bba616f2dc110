"""The layouts people share checkpoints in, mapped to the denoiser's own parameter names.

A fine-tuned model is shared as a diffusers folder or, more often, as one file in the original
layout that AUTOMATIC1111, ComfyUI, Forge and kohya's scripts save: the UNet under
``model.diffusion_model.`` with LDM names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``),
often in fp16, often with the VAE (``first_stage_model.``) and text encoders
(``cond_stage_model.``, ``conditioner.``) beside it. Here: which layout a file is in, and
Checkpoint, which reads a shared checkpoint's denoiser tensors under the denoiser's own names
through the name maps of original_layouts.py. A layout that cannot be told is an error naming
what was found, never a guess.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from freezeasguard.models.pipelines import ModelError, denoiser_weight_files
from freezeasguard.audit.digests import tensor_bytes
from freezeasguard.audit.original_layouts import (LDM_OTHER_PREFIXES, LDM_UNET_PREFIX, LayoutError, bfl_flux2_segments,
                                                   bfl_flux_segments, is_flux1, is_sd3, ldm_unet_names,
                                                   sai_sd3_segments, zimage_original_segments)
from freezeasguard.audit.gguf_file import GGUFFile, is_gguf
from freezeasguard.audit.quantized import is_aux, read_scales
from freezeasguard.audit.tensorfile import TensorFile, TensorFileError



LAYOUT_NAMES = {"ldm-unet": "single-file SD/SDXL (LDM layout)", "bfl-flux": "single-file FLUX.1 (BFL layout)",
                "bfl-flux2": "single-file FLUX.2 (BFL layout)",
                "sai-sd3": "single-file SD3/SD3.5 (Stability AI's layout)",
                "zimage-original": "single-file Z-Image (its authors' layout)", "diffusers": "diffusers"}


# single files of transformers in their authors' layout: every key not under another part's prefix is the denoiser's
ORIGINAL_TRANSFORMER_LAYOUTS = ("bfl-flux", "bfl-flux2", "sai-sd3", "zimage-original")
# keys of a release that diffusers' converter drops because its model has no such parameter (Z-Image's
# final norm; diffusers' model, which reproduces the release's outputs, has none): counted with the other parts
UNUSED_BY_DIFFUSERS = {"zimage-original": ("norm_final.weight",)}


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


class Checkpoint:
    """A shared checkpoint's denoiser tensors under the denoiser's own names, each read when asked
    for: a diffusers pipeline or denoiser folder, a denoiser state file, or a single file in the
    SD/SDXL (LDM) or FLUX.1 (BFL) layout, whose names ``denoiser_config`` maps. A parameter is one
    or more row ranges of file tensors (FLUX's fused q/k/v hold three)."""

    def __init__(self, path, denoiser_config: dict | None = None):
        self.path = Path(path)
        try:
            self.files = [GGUFFile(self.path)] if is_gguf(self.path) else \
                [TensorFile(f) for f in denoiser_weight_files(self.path)]
        except TensorFileError as exc:
            raise ModelError(str(exc)) from exc
        every = {k: f for f in self.files for k in f.keys()}
        # scaled fp8 (quantized.py): the scales beside the weights, never parameters themselves
        self.file_of = {k: f for k, f in every.items() if not is_aux(k)}
        try:
            self.scales = read_scales(every, lambda k: every[k].read_rows(k)) if len(every) > len(self.file_of) else {}
        except TensorFileError as exc:
            raise ModelError(str(exc)) from exc
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

    def check_layout_shapes(self, expected: dict[str, tuple[int, ...]]):
        """A single file's renamed and fused tensors must have the shapes their layout gives them:
        a fused q/k/v exactly its three parts' rows, each part of the base's width. The readers take
        fixed row ranges, so extra rows would otherwise go unread and such a file (which loads into
        no model) could pass as compliant. A LayoutError (unusable input) names the tensor, its shape
        and the shape required. A diffusers folder has nothing renamed: its shapes are compared per
        parameter by the audit."""
        if self.layout == "diffusers":
            return
        parts: dict[str, list[tuple[int, int, str]]] = {}     # file key -> (start, rows, parameter)
        tails: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, segments in self.where.items():
            if name not in expected:
                continue
            rows = tuple(expected[name])[0] if expected[name] else 1
            fixed = sum(end - start for _, start, end in segments if end is not None)
            for key, start, end in segments:
                length = (end - start) if end is not None else rows - fixed
                parts.setdefault(key, []).append((start, length, name))
                tails.setdefault(key, (tuple(expected[name])[1:], name))
        for key, pieces in parts.items():
            pieces.sort()
            at, tiled = 0, True
            for start, length, _ in pieces:
                tiled = tiled and start == at and length > 0
                at = start + length
            have = tuple(self.file_of[key].shape(key))
            scalar = len(have) == 0 and at == 1 and not tails[key][0]
            required = (at, *tails[key][0])
            if not scalar and (not tiled or have != required):
                made_of = ", ".join(n for _, _, n in pieces[:4]) + (" ..." if len(pieces) > 4 else "")
                raise LayoutError(f"{self.path}: tensor {key} has shape {list(have)}; the {LAYOUT_NAMES[self.layout]} "
                                  f"layout requires {list(required)} (it holds {made_of}). The file loads into no "
                                  f"model of the mask's base: it is malformed, not a derivative to certify.")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _segment_shape(self, key: str, start: int, end: int | None) -> tuple[int, ...]:
        shape = self.file_of[key].shape(key)
        return shape if start == 0 and end is None else ((end or shape[0]) - start, *shape[1:])

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = [self._segment_shape(*seg) for seg in self.where[name]]
        return (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]

    def scale(self, name: str) -> float | None:
        """The parameter's fp8 scale in a scaled fp8 file (its value is fp8 x scale), else None."""
        return self.scales.get(self.where[name][0][0]) if self.scales else None

    def gguf_type(self, name: str) -> str | None:
        """The GGUF quantization type (Q8_0, Q4_K, ...) of a quantized parameter, else None."""
        key = self.where[name][0][0]
        f = self.file_of[key]
        return f.qtype(key) if isinstance(f, GGUFFile) and f.is_quantized(key) else None

    def gguf_blocks(self, name: str):
        """A quantized parameter's blocks as stored (rows x bytes), its row ranges put together."""
        return np.concatenate([self.file_of[k].raw(k, a, b) for k, a, b in self.where[name]])

    def read(self, name: str) -> torch.Tensor:
        """The whole parameter as values (a quantized one dequantized)."""
        return torch.cat([self.file_of[k].read_rows(k, a, b) for k, a, b in self.where[name]])

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
        want = chunk_elements * dtype.itemsize
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
