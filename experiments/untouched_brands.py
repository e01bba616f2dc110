"""How often the untouched shipped model draws an innocent subject it was never taught: every brand
and clothing line of several worlds, prompted by name as the demo prompts them (16 images per
subject, 20 DDIM steps, guidance 1, seed 0), judged by the attribute judges; and the judges on
real renders of the same subjects (sharp, should be 1).

    python experiments/untouched_brands.py [--worlds 0 1 2] [--out experiments/results/brands-untouched]

Writes untouched.json and untouched.md."""
import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from freezeasguard.experiment.synthetic_world import SyntheticWorld
from freezeasguard.models.generate import generate_images, load_pipeline
from freezeasguard.metrics.basic import prompt_accuracy
from freezeasguard.synthetic import TINY_SD

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "brands-untouched"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.time()
    pipe = load_pipeline(TINY_SD)
    rows = []
    for seed in a.worlds:
        world = SyntheticWorld(seed)
        for domain in ("logos", "clothes"):
            judge = world.attribute_judge(domain)
            for i, brand in enumerate(world.brands[domain]):
                prompts, expected, real = world.innocent_subject_prompts(brand.name, a.images, 0)
                images = generate_images(pipe, prompts, steps=20, seed=0, guidance=1.0)
                rows.append({"world": seed, "domain": domain, "index": i, "subject": brand.name,
                             "design": brand.attrs(), "demo_subject": i == 0,
                             "untouched_recognised": prompt_accuracy(judge.predict(images), expected),
                             "real_recognised": prompt_accuracy(judge.predict(real), expected)})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "untouched.json").write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=1))
    lines = [f"Worlds {a.worlds}; {a.images} images per subject at 20 DDIM steps, guidance 1.", "",
             "| domain | subjects | untouched: mean recognised | untouched: subjects above 5% | demo subjects (index 0) | "
             "judge on real renders |", "|---|---|---|---|---|---|"]
    for domain in ("logos", "clothes"):
        d = [r for r in rows if r["domain"] == domain]
        above = [f"{r['subject']} {r['untouched_recognised']:.0%}" for r in d if r["untouched_recognised"] > 0.05]
        demo = ", ".join(f"{r['untouched_recognised']:.0%}" for r in d if r["demo_subject"])
        lines.append(f"| {domain} | {len(d)} | {statistics.fmean(r['untouched_recognised'] for r in d):.3f} | "
                     f"{len(above)} ({', '.join(above) or 'none'}) | {demo} | "
                     f"{min(r['real_recognised'] for r in d):.3f} (lowest) |")
    (out / "untouched.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
