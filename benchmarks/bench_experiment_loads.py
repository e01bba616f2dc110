"""What an experiment pays to load models, on the shipped tiny pipeline at 1 CPU thread (the
setting of the runner's one-thread job processes): reading a folder from disk against what the
runner does instead (experiment/loaded_model.py).

Rows (median of --repeats after one warm-up):
- start a fine-tune: load_model(base) vs StartingModels.copy_of(base) (a copy of the model read once)
- evaluate a fine-tune: load_pipeline(folder) vs LoadedModel.get(folder) after another folder of the
  same base (its UNet's weights read into the UNet already built; VAE, text encoder and tokenizer
  shared, their files being the base's)

Both sides of a row are checked to hold the same weights before they are timed.

    python benchmarks/bench_experiment_loads.py --out benchmarks/results/bench_experiment_loads_cpu.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from _common import print_table, timed
from safetensors.torch import load_file, save_file


def tuned_copy(base: Path, out: Path, scale: float) -> Path:
    """The base folder with its UNet's weights scaled: a fine-tune's folder as save_pipeline leaves it."""
    shutil.copytree(base, out)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * scale for k, v in load_file(str(weights)).items()}, str(weights))
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench_experiment_loads.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from freezeasguard.experiment.loaded_model import LoadedModel, StartingModels
    from freezeasguard.models.generate import load_pipeline
    from freezeasguard.models.pipelines import load_model
    from freezeasguard.synthetic import TINY_SD

    rows = []
    starting = StartingModels()
    assert same_weights(starting.copy_of(TINY_SD).denoiser, load_model(TINY_SD).denoiser)
    rows.append({"what": "start a fine-tune", "from_disk_ms": 1e3 * timed(lambda: load_model(TINY_SD), "cpu", args.repeats),
                 "runner_ms": 1e3 * timed(lambda: starting.copy_of(TINY_SD), "cpu", args.repeats)})
    with tempfile.TemporaryDirectory() as tmp:
        folders = [tuned_copy(Path(TINY_SD), Path(tmp) / f"ft{i}", 1 + 0.01 * i) for i in range(2)]
        loaded, turn = LoadedModel(), [0]

        def next_folder():      # alternate, so that every get is a new folder
            turn[0] += 1
            return loaded.get(folders[turn[0] % 2])
        assert same_weights(next_folder().unet, load_pipeline(folders[turn[0] % 2]).unet)
        rows.append({"what": "evaluate a fine-tune",
                     "from_disk_ms": 1e3 * timed(lambda: load_pipeline(folders[0]), "cpu", args.repeats),
                     "runner_ms": 1e3 * timed(next_folder, "cpu", args.repeats)})
    for r in rows:
        r["speedup"] = r["from_disk_ms"] / r["runner_ms"]
    print_table(rows, ["what", "from_disk_ms", "runner_ms", "speedup"])
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats, "rows": rows}, f,
                  indent=2)


if __name__ == "__main__":
    main()
