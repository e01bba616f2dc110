"""Throughput and memory of the base-free audit of a single-file checkpoint, against a plain read.

For each model (SD v1.5's UNet, SDXL's; real configs, random weights) and dtype, a single-file
checkpoint in the original SD layout is written tensor by tensor (never whole in memory), with a
mask freezing 30% of its tensors whose audit record (digests) is made while writing. Then, each
in a fresh process: a plain sequential read of the file (1 MiB blocks, like `cat > /dev/null`),
and `verify --mask M --candidate FILE` without the base. Reported: GB/s of each, their ratio
(targets: >= 0.6 from a warm page cache, >= 0.95 cold), the audit's peak RSS above the process's
RSS after imports, against the largest tensor (target <= 2x the largest tensor + 300 MB,
whatever the model's size).

    python benchmarks/bench_audit.py [--models sd15,sdxl] [--dtypes fp32,fp16] [--dir /tmp/bench-audit]

Writes benchmarks/results/bench_audit_cpu.json and .md. The files are our own, written under
--dir and removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": (torch.float32, "F32"), "fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16")}


def model_config(name: str) -> dict:
    from freezeasguard.models.families.shapes import SDXL_UNET
    from freezeasguard.models.families.tiny import tiny_unet_config
    if name == "sd15":
        return dict(tiny_unet_config("sd15-shapes"))
    if name == "sdxl":
        return dict(SDXL_UNET)
    raise ValueError(name)


def meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    return {n: tuple(p.shape) for n, p in unet.named_parameters()}


def write_checkpoint(path: Path, config: dict, dtype_name: str, ratio: float = 0.3, seed: int = 0):
    """The single file, written tensor by tensor, and the mask (with its audit record) beside it."""
    from freezeasguard.audit.digests import make_record, tensor_digests
    from freezeasguard.audit.original_layouts import ldm_key_map
    from freezeasguard.guard.mask import Mask
    dtype, tag = DTYPES[dtype_name]
    shapes = meta_shapes(config)
    keys = ldm_key_map(list(shapes), config)
    names = list(shapes)
    g = torch.Generator().manual_seed(seed)
    frozen = set(torch.randperm(len(names), generator=g)[: round(ratio * len(names))].tolist())
    header, offset = {}, 0
    size = torch.tensor([], dtype=dtype).element_size()
    for n in names:
        nbytes = int(torch.Size(shapes[n]).numel()) * size
        header[keys[n]] = {"dtype": tag, "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digests, dtypes = {}, {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, n in enumerate(names):
            t = (torch.randn(shapes[n], generator=g) * 0.02).to(dtype)
            if i in frozen:
                digests[n], dtypes[n] = tensor_digests(t), str(dtype).removeprefix("torch.")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    frozen_mask = torch.tensor([i in frozen for i in range(len(names))])
    record = make_record(digests, dtypes, names, config)
    mask = Mask(names, [shapes[n] for n in names], frozen_mask.float(), frozen_mask, {}, {"audit": record})
    mask_path = mask.save(path.with_suffix(".mask.safetensors"))
    largest = max(int(torch.Size(s).numel()) for s in shapes.values()) * size
    return mask_path, largest, sum(int(torch.Size(s).numel()) for s in shapes.values())


def worker(mode: str, path: str, mask: str) -> dict:
    """One measurement in this (fresh) process."""
    def rss():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    if mode == "read":
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(2**20)
            while f.readinto(buf):
                pass
        return {"seconds": time.perf_counter() - t0}
    import diffusers.loaders.single_file_utils  # noqa: F401  (a hub's long-running process imports it once)

    from freezeasguard.audit.verify import verify_checkpoint
    gc.freeze()        # as the CLI does after its imports: no full collection walks them mid-audit
    before, _ = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    report = verify_checkpoint(None, mask, path, "exact")
    seconds = time.perf_counter() - t0
    _, peak = rss()
    return {"seconds": seconds, "compliant": report.compliant, "bytes_read": report.bytes_read,
            "rss_after_imports": before, "peak_rss": peak, "peak_above_imports": peak - before}


def measure(mode: str, path: Path, mask: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(path), str(mask)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--dir", default="/tmp/bench-audit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_audit_cpu.json"))
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in a.models.split(","):
        for dtype in a.dtypes.split(","):
            path = work / f"{model}-{dtype}.safetensors"
            t0 = time.perf_counter()
            mask, largest, params = write_checkpoint(path, model_config(model), dtype)
            written = time.perf_counter() - t0
            size = path.stat().st_size
            row = {"model": model, "dtype": dtype, "params": params, "file_bytes": size, "largest_tensor_bytes": largest,
                   "write_seconds": written}
            for cache in ("cold", "warm"):
                cold = drop_page_cache() if cache == "cold" else True
                if not cold:
                    continue
                plain = measure("read", path, mask)
                if cache == "cold":
                    drop_page_cache()
                audit = measure("audit", path, mask)
                assert audit["compliant"], f"{path}: the untouched checkpoint must be compliant"
                row[cache] = {"read_gb_s": size / plain["seconds"] / 1e9, "audit_gb_s": size / audit["seconds"] / 1e9,
                              "ratio": plain["seconds"] / audit["seconds"], **audit}
            row["rss_target_bytes"] = 2 * largest + 300 * 2**20
            rows.append(row)
            if not a.keep:
                path.unlink()
                mask.unlink()
            print(json.dumps(row))
    lines = ["| model | dtype | file GB | largest tensor MB | cache | plain read GB/s | audit GB/s | audit / read | "
             "audit peak RSS above imports MB | target MB |", "|---" * 10 + "|"]
    for r in rows:
        for cache in ("cold", "warm"):
            if cache in r:
                c = r[cache]
                lines.append(f"| {r['model']} | {r['dtype']} | {r['file_bytes'] / 1e9:.2f} | "
                             f"{r['largest_tensor_bytes'] / 2**20:.0f} | {cache} | {c['read_gb_s']:.2f} | "
                             f"{c['audit_gb_s']:.2f} | {c['ratio']:.2f} | {c['peak_above_imports'] / 2**20:.0f} | "
                             f"{r['rss_target_bytes'] / 2**20:.0f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    from freezeasguard.audit.digests import make_record
    out.write_text(json.dumps({"rows": rows, "hash": make_record({}, {}, [], None)["hash"],
                               "targets": {"cold_ratio": 0.95, "warm_ratio": 0.6, "rss": "2 x largest tensor + 300 MB"}},
                              indent=1))
    out.with_suffix(".md").write_text(
        "Base-free audit of a single-file checkpoint (`verify --mask M --candidate FILE`, no base model) against a "
        "plain sequential read of the same file; real UNet configs, random weights; 2-core CPU.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
