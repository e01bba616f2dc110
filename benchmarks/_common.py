"""Shared set-up for the benchmarks: a UNet, random latents, peak memory, timing.

Memory on CPU is the peak resident set of a fresh subprocess during the measured loop (the peak
is reset after set-up) minus its resident set after the imports (diffusers and transformers
included) and minus the library code paged in during the run (RssBaseline), so it counts the
model, the training state, activations and the allocator's overhead; on CUDA it is torch.cuda.max_memory_allocated. Times are medians over repeated steps after warm-up.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PRESETS = {
    # tens of millions of parameters: differences stand above CPU noise, a step takes ~1-2 s
    "cpu-34m": dict(layout="sd15", block_out_channels=(64, 128, 256, 256), cross_attention_dim=64, latent=16),
    # the shipped tiny pipeline's widths: smoke tests of the benchmarks' code paths
    "tiny": dict(layout="sd15", block_out_channels=(32, 32, 64, 64), cross_attention_dim=64, latent=8),
    # the real SD v1.5 UNet shapes (859.5 M parameters), random init, 64x64 latents (512 px)
    "sd15-shapes": dict(layout="sd15-shapes", latent=64),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def file_rss_bytes() -> int:
    """The file-backed part of the resident set: library code pages (libtorch's kernels are paged
    in as they are first used), shared and reclaimable, not training memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


class RssBaseline:
    """The resident set before a measured run, after importing what the run imports (diffusers and
    transformers are ~150 MB before the first tensor); ``peak_above()`` is the run's peak minus it,
    less the library code paged in meanwhile: the memory that tensors and the allocator took."""

    def __init__(self):
        # diffusers imports lazily: the model classes themselves are ~80 MB more
        from diffusers import UNet2DConditionModel  # noqa: F401
        import transformers  # noqa: F401
        self.rss, self.file = rss_bytes(), file_rss_bytes()

    def peak_above(self) -> int:
        return peak_rss_bytes() - self.rss - (file_rss_bytes() - self.file)


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM), so the peak of the
    measured loop is not hidden by a larger transient during model construction."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_unet(preset: str, device):
    from diffusers import UNet2DConditionModel

    from freezeasguard.models.families.tiny import tiny_unet_config

    p = PRESETS[preset]
    if p["layout"] == "sd15-shapes":
        cfg = tiny_unet_config("sd15-shapes")
    else:
        cfg = tiny_unet_config("sd15", sample_size=p["latent"], block_out_channels=p["block_out_channels"],
                               cross_attention_dim=p["cross_attention_dim"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(device)
    return unet, p["latent"], unet.config.cross_attention_dim


def random_batch(batch: int, latent: int, text_dim: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, latent, latent, generator=g).to(device),
            torch.randn(batch, 77, text_dim, generator=g).to(device),
            torch.randn(batch, 4, latent, latent, generator=g).to(device),
            torch.randint(0, 1000, (batch,), generator=g).to(device))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class FixedMix:
    """The same batch at every draw (the upper level's sign applied), standing in for DomainMix."""
    def __init__(self, batch):
        self.batch, self.domains = batch, [None, None]

    def draw(self, device, sign=None):
        if sign is None:
            return self.batch
        factor = torch.tensor(sign, dtype=self.batch.weights.dtype)[self.batch.domain_ids]
        return dataclasses.replace(self.batch, weights=self.batch.weights * factor.to(self.batch.weights.device))


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process and return the JSON it prints last."""
    # a fixed mmap threshold makes glibc return every large freed tensor to the OS at once, so the
    # resident set tracks live tensors instead of the allocator's high-water mark
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], keys: list[str]):
    widths = [max(len(k), *(len(fmt(r.get(k))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(k)).ljust(w) for k, w in zip(keys, widths)))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class NearbyBase(dict):
    """A theta_pre close to the model's weights, made one tensor at a time when BilevelState reads
    it, so no third full copy of the weights inflates the measured peak."""

    def __init__(self, unet):
        super().__init__()
        self.params = dict(unet.named_parameters())

    def __getitem__(self, name):
        return self.params[name].detach() + 1e-3 * torch.randn_like(self.params[name])


def forward_order(model, run) -> list[str]:
    """Names of the model's leaf modules in the order one call of ``run()`` first executes them."""
    order, hooks = [], []
    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))   # first call of each module, in order


def saved_activations(model, run) -> dict:
    """What autograd keeps for the backward pass during one ``run()`` (a forward with the model's
    current requires_grad flags): the bytes of the saved non-parameter tensors (each storage once),
    and those saved while a module runs that comes before the first module owning a trainable
    parameter. Autograd saves a tensor only for an operation with an input that needs a gradient,
    so the second number is zero when the frozen prefix costs no activation memory."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, hooks, records = {"name": None}, [], []
    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: current.__setitem__("name", n)))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            records.append((current["name"], storage.data_ptr(), storage.nbytes()))
        # detached: a pack hook that returns an op's own output makes a cycle (node -> saved output
        # -> its grad_fn -> node) that nothing frees: ~100 MB of activations left behind per call
        return t.detach()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run()
    finally:
        for h in hooks:
            h.remove()
    del out
    trainable_modules = {n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    order = forward_order(model, run)
    first = next((i for i, n in enumerate(order) if n in trainable_modules), len(order))
    before = set(order[:first])
    unique, unique_before = {}, {}
    for name, ptr, nbytes in records:
        unique[ptr] = nbytes
        if name in before:
            unique_before[ptr] = nbytes
    return {"saved_bytes": sum(unique.values()), "saved_before_first_trainable_bytes": sum(unique_before.values()),
            "modules_before_first_trainable": first, "leaf_modules": len(order)}
