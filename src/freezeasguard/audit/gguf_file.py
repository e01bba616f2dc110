"""GGUF files as hubs receive them: city96's layout (ComfyUI-GGUF, read by diffusers'
``from_single_file`` with ``GGUFQuantizationConfig``), read through the ``gguf`` package.

city96's convert script writes the original layout's keys without their prefix (BFL's for FLUX,
Stability AI's for SD3, LDM's or diffusers' for SD/SDXL), one-dimensional and small tensors in
F32, the rest in F16/BF16 or quantized (Q8_0 by the ``gguf`` package; K-quants by llama.cpp).
SD/SDXL tensors whose last dimension is not a multiple of 256 may be stored reshaped to
(n / 256, 256), their shape kept as ``comfy.gguf.orig_shape.<key>``.

GGUFFile offers what Checkpoint reads of a safetensors file (keys, shapes, row bytes) under the
tensors' own names; a quantized tensor's elements come out through ``rows`` (raw blocks) and
``dequantized``. What an audit may call equal for each type is in quantized.py's GGUF part.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from freezeasguard.audit.original_layouts import LDM_UNET_PREFIX
from freezeasguard.audit.tensorfile import TensorFileError

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_gguf(path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


class GGUFFile:
    """One GGUF file's tensors, under the names a safetensors single file of the same layout
    would give them (an LDM UNet's keys get back the prefix the converter stripped)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise TensorFileError(f"{path}: not a readable GGUF file ({exc})") from exc
        names = [t.name for t in self.reader.tensors]
        ldm = any(n.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for n in names)
        self.prefix = LDM_UNET_PREFIX if ldm else ""
        self.tensors = {self.prefix + t.name: t for t in self.reader.tensors}
        self.orig_shapes = {}
        for field_name, f in self.reader.fields.items():
            if field_name.startswith("comfy.gguf.orig_shape."):
                self.orig_shapes[self.prefix + field_name[len("comfy.gguf.orig_shape."):]] = \
                    tuple(int(f.parts[i][0]) for i in f.data)
        self.bytes_read, self.header_bytes = 0, min((t.data_offset for t in self.reader.tensors), default=0)
        self._fd = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def qtype(self, key: str) -> str:
        return self.tensors[key].tensor_type.name

    def stored_shape(self, key: str) -> tuple[int, ...]:
        """The shape as stored (numpy order; a reshaped tensor's (n / 256, 256))."""
        return tuple(int(d) for d in reversed(self.tensors[key].shape.tolist()))

    def shape(self, key: str) -> tuple[int, ...]:
        return self.orig_shapes.get(key) or self.stored_shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """A float type's torch dtype; quantized types read as float32 once dequantized."""
        return FLOAT_TYPES.get(self.qtype(key), torch.float32)

    def is_quantized(self, key: str) -> bool:
        return self.qtype(key) not in FLOAT_TYPES

    def nbytes(self, key: str) -> int:
        return int(self.tensors[key].n_bytes)

    def row_bytes(self, key: str, start: int = 0, end: int | None = None) -> tuple[int, int, tuple[int, ...]]:
        """Where rows start..end lie in the file (offset, length, their shape). A quantized type
        stores each row as whole blocks, so rows slice as in any row-major file; a reshaped
        tensor is read whole only."""
        shape = self.shape(key)
        end = shape[0] if end is None and shape else end
        if shape and not 0 <= start <= end <= shape[0]:
            raise TensorFileError(f"{self.path}: rows {start}-{end} of {key} (shape {list(shape)}) do not exist")
        t, total = self.tensors[key], self.nbytes(key)
        if key in self.orig_shapes and (start, end) != (0, shape[0]):
            raise TensorFileError(f"{self.path}: {key} is stored reshaped; it is read whole only")
        if not shape or not shape[0]:
            return int(t.data_offset), total, shape
        row = total // shape[0]
        return int(t.data_offset) + row * start, row * (end - start), (end - start, *shape[1:])

    def read_into(self, offset: int, buf, key: str = ""):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view, done = memoryview(buf), 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done) if hasattr(os, "preadv") else \
                self._read_at(offset + done, view[done:])
            if n == 0:
                raise TensorFileError(f"{self.path}: ends inside tensor {key} (truncated)")
            done += n
        self.bytes_read += done

    def _read_at(self, offset, view) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.readinto(view)

    def raw(self, key: str, start: int = 0, end: int | None = None) -> np.ndarray:
        """Rows start..end as stored: a quantized type's blocks (uint8), a float type's values."""
        offset, n, shape = self.row_bytes(key, start, end)
        buf = bytearray(n)
        self.read_into(offset, buf, key)
        if not self.is_quantized(key):
            return torch.frombuffer(buf, dtype=self.dtype(key)).reshape(shape) if n else torch.empty(shape)
        rows = shape[0] if key not in self.orig_shapes else self.stored_shape(key)[0]
        return np.frombuffer(buf, dtype=np.uint8).reshape(rows, -1)

    def read_rows(self, key: str, start: int = 0, end: int | None = None, scratch=None) -> torch.Tensor:
        """Rows start..end as values: float types as stored, quantized ones dequantized (float32)."""
        if not self.is_quantized(key):
            return self.raw(key, start, end)
        values = gguf.quants.dequantize(self.raw(key, start, end), self.tensors[key].tensor_type)
        _, _, shape = self.row_bytes(key, start, end)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
