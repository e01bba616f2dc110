"""Throughput and memory of the audit of quantized derivatives (ComfyUI's scaled fp8, GGUF Q8_0)
of an SD v1.5-sized UNet, against a plain read of the same file.

An SD v1.5 UNet (its real config, random weights) is written as the base model (a diffusers
denoiser folder, fp16) and as two derivatives of it, as their tools write them: a scaled fp8
single file (LDM keys, every linear weight float8_e4m3fn with its ``.scale_weight``, the rest
fp16) and a GGUF file in city96's layout (LDM keys without prefix; linear weights Q8_0 by the
gguf package's quantizer, 1-D and small tensors F32, convolutions F16). A mask freezes 30% of the
tensors, with its digests recorded. Then, each in a fresh process from a warm page cache: a
plain sequential read of the derivative (1 MiB blocks) and `verify --mask M --candidate FILE`,
base-free where the record covers the format (fp8 casts, Q8_0: hashing) and with `--model BASE`
(the base read too, from the cache) for Q8_0 again and scaled fp8. Targets: audit >= 0.5x the
plain read; peak RSS above the process's after imports <= 2x the largest tensor + 300 MB.

    python benchmarks/bench_audit_quantized.py [--dir /tmp/bench-audit-quantized] [--keep]

Writes benchmarks/results/bench_audit_quantized_cpu.json and .md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_audit import meta_shapes, model_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn


def random_state(shapes: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        yield name, (torch.randn(shape, generator=g) * 0.02).half()


def write_base(folder: Path, config: dict, shapes: dict):
    from safetensors.torch import save_file
    unet = folder / "unet"
    unet.mkdir(parents=True, exist_ok=True)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
    save_file(dict(random_state(shapes)), str(unet / "diffusion_pytorch_model.safetensors"))


def write_scaled_fp8(path: Path, config: dict, shapes: dict):
    """ComfyUI's legacy scaled fp8: each 2-D weight as (w / scale) in e4m3fn, scale = max|w| / 448."""
    from safetensors.torch import save_file

    from freezeasguard.audit.original_layouts import ldm_key_map
    keys = ldm_key_map(list(shapes), config)
    out = {}
    for name, t in random_state(shapes):
        key = keys[name]
        if t.ndim == 2:
            scale = t.float().abs().max() / torch.finfo(FP8).max
            out[key] = (t.float() / scale).clamp(-448, 448).to(FP8)
            out[key[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = t
    out["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(out, str(path))


def write_gguf_q8(path: Path, config: dict, shapes: dict):
    """city96's convert at Q8_0: LDM keys without prefix, 1-D and <= 1024-value tensors F32,
    linear weights Q8_0 (F16 where their rows do not split into 32s), convolutions F16."""
    import gguf

    from freezeasguard.audit.original_layouts import LDM_UNET_PREFIX, ldm_key_map
    keys = ldm_key_map(list(shapes), config)
    writer = gguf.GGUFWriter(path=str(path), arch="sd1")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kinds = gguf.GGMLQuantizationType
    for name, t in random_state(shapes):
        data = t.float().numpy()
        kind = kinds.F32 if data.ndim == 1 or data.size <= 1024 else kinds.Q8_0 if data.ndim == 2 and \
            data.shape[1] % 32 == 0 else kinds.F16
        writer.add_tensor(keys[name][len(LDM_UNET_PREFIX):], gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_fp8_cast(path: Path, config: dict, shapes: dict):
    """Every tensor cast to float8_e4m3fn (round to nearest even), LDM keys."""
    from safetensors.torch import save_file

    from freezeasguard.audit.original_layouts import ldm_key_map
    keys = ldm_key_map(list(shapes), config)
    save_file({keys[n]: t.to(FP8) for n, t in random_state(shapes)}, str(path))


def worker(mode: str, path: str, base: str, mask: str) -> dict:
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
    import diffusers.loaders.single_file_utils  # noqa: F401

    from freezeasguard.audit.verify import verify_checkpoint
    gc.freeze()
    before, _ = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    report = verify_checkpoint(None if base == "-" else base, mask, path, "exact")
    seconds = time.perf_counter() - t0
    _, peak = rss()
    return {"seconds": seconds, "compliant": report.compliant, "peak_above_imports": peak - before,
            "violations": [v.reason for v in report.violations[:2]]}


def measure(mode: str, path: Path, base: Path, mask: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(path), str(base), str(mask)], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench-audit-quantized")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_audit_quantized_cpu.json"))
    ap.add_argument("--keep", action="store_true", help="keep the written files")
    ap.add_argument("--small", action="store_true", help="SD v1.5's layout at 1/10 of its widths (a smoke run)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    from freezeasguard.guard.mask import Mask
    work = Path(a.dir)
    work.mkdir(parents=True, exist_ok=True)
    if a.small:
        from freezeasguard.models.families.tiny import tiny_unet_config
        config = tiny_unet_config("sd15", block_out_channels=(32, 64, 128, 128), cross_attention_dim=96)
    else:
        config = model_config("sd15")
    shapes = meta_shapes(config)
    base = work / "base"
    write_base(base, config, shapes)
    names = list(shapes)
    g = torch.Generator().manual_seed(1)
    frozen = torch.zeros(len(names), dtype=torch.bool)
    frozen[torch.randperm(len(names), generator=g)[: round(0.3 * len(names))]] = True
    from freezeasguard.audit.layouts import Checkpoint
    mask = Mask(names, [shapes[n] for n in names], frozen.float(), frozen, Checkpoint(base).fingerprint(),
                {}).save(work / "mask.safetensors")
    largest = max(int(torch.Size(s).numel()) for s in shapes.values()) * 4
    rows = []
    from freezeasguard.audit.verify import record_digests
    recorded = record_digests(Mask.load(mask), base).save(work / "mask-recorded.safetensors")
    for fmt, write, suffix, with_base in (("fp8 cast (e4m3fn), base-free", write_fp8_cast, ".safetensors", False),
                                          ("GGUF Q8_0, base-free", write_gguf_q8, ".gguf", False),
                                          ("GGUF Q8_0, with the base", write_gguf_q8, ".gguf", True),
                                          ("scaled fp8 (e4m3fn), with the base", write_scaled_fp8, ".safetensors",
                                           True)):
        path = work / ("candidate" + suffix)
        if not path.exists():
            write(path, config, shapes)
        ref = base if with_base else Path("-")
        measure("read", path, ref, recorded)           # fills the page cache
        plain = measure("read", path, ref, recorded)
        audit = measure("audit", path, ref, recorded)
        assert audit["compliant"], f"{fmt}: the untouched derivative must be compliant ({audit['violations']})"
        size = path.stat().st_size
        rows.append({"format": fmt, "file_bytes": size, "read_gb_s": size / plain["seconds"] / 1e9,
                     "audit_gb_s": size / audit["seconds"] / 1e9, "ratio": plain["seconds"] / audit["seconds"],
                     "audit_seconds": audit["seconds"], "peak_above_imports": audit["peak_above_imports"],
                     "rss_target_bytes": 2 * largest + 300 * 2**20})
        print(json.dumps(rows[-1]), flush=True)
    if not a.keep:
        for path in work.glob("candidate*"):
            path.unlink()
    lines = ["| derivative | file GB | plain read GB/s | audit GB/s | audit / read | target | peak RSS above imports MB | "
             "target MB |", "|---" * 8 + "|"]
    lines += [f"| {r['format']} | {r['file_bytes'] / 1e9:.2f} | {r['read_gb_s']:.2f} | {r['audit_gb_s']:.3f} | "
              f"{r['ratio']:.3f} | 0.5 | {r['peak_above_imports'] / 2**20:.0f} | {r['rss_target_bytes'] / 2**20:.0f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.write_text(json.dumps({"rows": rows, "model": "sd15 UNet (real config, random weights), base fp16",
                               "targets": {"warm_ratio": 0.5, "rss": "2 x largest tensor + 300 MB"}}, indent=1))
    out.with_suffix(".md").write_text(
        "Audit of quantized derivatives of an SD v1.5-sized UNet (`verify --mask M --candidate FILE`, base-free from "
        "the mask's digests or with `--model BASE`), warm page cache, against a plain sequential read of the "
        "derivative; 2-core CPU.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
