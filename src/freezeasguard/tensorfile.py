"""Read a safetensors file one tensor at a time, with plain reads rather than a memory map.

An audit reads every tensor of a checkpoint once. Through a memory map, each page read stays
mapped (and counted in the process's memory) until the file is closed, so auditing a 24 GB
checkpoint would look like a 24 GB process; with positioned reads the memory in use is the
tensor being compared. The format: 8 bytes (little-endian header length), a JSON header
(name -> dtype, shape, data_offsets), then the data.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20        # the format's own limit


class TensorFileError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt, another format)."""


class TensorFile:
    """The tensors of one safetensors file, each read when asked for."""

    def __init__(self, path):
        self.path = Path(path)
        self.bytes_read = 0
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise TensorFileError("shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise TensorFileError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, struct.error) as exc:
            raise TensorFileError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        except TensorFileError as exc:
            raise TensorFileError(f"{self.path}: {exc}; it is truncated or not a safetensors file") from exc
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            start, end = e["data_offsets"]
            if e.get("dtype") not in DTYPES or self.data_start + end > size or start > end:
                raise TensorFileError(f"{self.path}: tensor {name} ({e.get('dtype')}, bytes {start}-{end}) does not fit "
                                      f"the {size}-byte file; it is truncated or corrupt")
        self.header_bytes = self.data_start

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        start, end = self.entries[key]["data_offsets"]
        return end - start

    def read_bytes(self, key: str) -> bytearray:
        start, end = self.entries[key]["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            got = f.readinto(buf)
        if got != len(buf):
            raise TensorFileError(f"{self.path}: tensor {key} is cut short ({got} of {len(buf)} bytes)")
        self.bytes_read += len(buf)
        return buf

    def read_rows(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows start..end of a tensor (its first dimension), reading only their bytes."""
        shape = self.shape(key)
        if start == 0 and end is None:
            return self.read(key)
        end = shape[0] if end is None else end
        if not 0 <= start <= end <= shape[0]:
            raise TensorFileError(f"{self.path}: rows {start}-{end} of {key} (shape {list(shape)}) do not exist")
        row = self.nbytes(key) // shape[0] if shape[0] else 0
        first, _ = self.entries[key]["data_offsets"]
        buf = bytearray(row * (end - start))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + first + row * start)
            got = f.readinto(buf)
        if got != len(buf):
            raise TensorFileError(f"{self.path}: tensor {key} is cut short")
        self.bytes_read += len(buf)
        out_shape = (end - start, *shape[1:])
        return torch.frombuffer(buf, dtype=self.dtype(key)).reshape(out_shape) if buf else torch.empty(out_shape,
                                                                                                      dtype=self.dtype(key))

    def read(self, key: str) -> torch.Tensor:
        buf = self.read_bytes(key)
        shape = self.shape(key)
        if not buf:
            return torch.empty(shape, dtype=self.dtype(key))
        return torch.frombuffer(buf, dtype=self.dtype(key)).reshape(shape)
