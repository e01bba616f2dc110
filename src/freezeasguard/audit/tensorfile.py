"""Read a safetensors file a tensor, or a piece of one, at a time, with plain reads rather than a
memory map.

An audit reads every tensor of a checkpoint once. Through a memory map, each page read stays
mapped (and counted in the process's memory) until the file is closed, so auditing a 24 GB
checkpoint would look like a 24 GB process; with positioned reads the memory in use is the
buffers being compared, and threads can share one descriptor. The format: 8 bytes (little-endian header length), a JSON header
(name -> dtype, shape, data_offsets), then the data.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import weakref
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 2**20        # the format's own limit


# fp8's non-finite values, without the sign bit: e4m3fn's NaN is 0x7F (S.1111.111), e5m2's inf
# and NaN are 0x7C and above (exponent 11111)
_FP8_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in ``t``: its largest and smallest values are finite (both propagate NaN).
    One pass for both without a temporary (aminmax), where isfinite(t).all() writes a mask of
    t's size and reads it again (~25x slower on fp16)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in _FP8_NONFINITE:      # no aminmax for fp8: its inf/NaN are the largest magnitudes' bytes
        # a positive non-finite byte is the largest as int8, a negative one the largest as uint8: two
        # maxima, each one pass at memory speed (masking the sign bit first measured 2.7x slower, a
        # compare-and-any 30x)
        top, raw = _FP8_NONFINITE[t.dtype], t.reshape(-1)
        return int(raw.view(torch.int8).amax()) < top and int(raw.view(torch.uint8).amax()) < top + 128
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class TensorFileError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt, another format)."""


class TensorFile:
    """The tensors of one safetensors file, each read when asked for."""

    def __init__(self, path):
        self.path = Path(path)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
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

    def read_rows(self, key: str, start: int = 0, end: int | None = None, scratch: bytearray | None = None
                  ) -> torch.Tensor:
        """Rows start..end of a tensor (its first dimension), reading only their bytes; into
        ``scratch`` when given (no allocation: the tensor is then valid until its next use)."""
        offset, n, out_shape = self.row_bytes(key, start, end)
        buf = memoryview(scratch)[:n] if scratch is not None and len(scratch) >= n else bytearray(n)
        self.read_into(offset, buf, key)
        if n == 0:
            return torch.empty(out_shape, dtype=self.dtype(key))
        return torch.frombuffer(buf, dtype=self.dtype(key)).reshape(out_shape)

    def row_bytes(self, key: str, start: int = 0, end: int | None = None) -> tuple[int, int, tuple[int, ...]]:
        """Where rows start..end of a tensor lie in the file: (offset, length, their shape)."""
        shape = self.shape(key)
        end = shape[0] if end is None and shape else end
        if shape and not 0 <= start <= end <= shape[0]:
            raise TensorFileError(f"{self.path}: rows {start}-{end} of {key} (shape {list(shape)}) do not exist")
        first, last = self.entries[key]["data_offsets"]
        if shape and shape[0]:
            row = (last - first) // shape[0]
            return self.data_start + first + row * start, row * (end - start), (end - start, *shape[1:])
        return self.data_start + first, last - first, shape

    def _descriptor(self) -> int:
        """One descriptor per file, opened at the first read and closed with this object: positioned
        reads share it between threads, where an open per tensor cost more than reading a bias."""
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as exc:
                    raise TensorFileError(f"{self.path}: cannot be read ({exc})") from exc
                weakref.finalize(self, os.close, self._fd)
            return self._fd

    def read_into(self, offset: int, buf, key: str) -> None:
        """Fill ``buf`` from ``offset`` of this file (threads may share this object)."""
        buf, got = memoryview(buf), 0
        if hasattr(os, "preadv"):
            fd = self._descriptor()
            while got < len(buf):      # one call reads at most ~2 GiB on Linux
                n = os.preadv(fd, [buf[got:]], offset + got)
                if n == 0:
                    break
                got += n
        else:                          # Windows has no positioned read: a handle of this read's own
            with open(self.path, "rb") as f:
                f.seek(offset)
                got = f.readinto(buf) or 0
        if got != len(buf):
            raise TensorFileError(f"{self.path}: tensor {key} is cut short ({got} of {len(buf)} bytes)")
        with self._lock:
            self.bytes_read += got

    def read(self, key: str) -> torch.Tensor:
        return self.read_rows(key)
