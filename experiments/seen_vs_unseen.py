"""Is a weak Full FT a drawing problem or a generalisation problem? For each illegal-user
fine-tune of a finished synthetic-world experiment, generate portraits from captions the user
trained on (seen) and from the evaluation prompts (unseen), at several guidance scales, and
count how many the recogniser names as the subject. Seen ~ unseen, both low: the model cannot
draw the person even for its own training captions. Seen >> unseen: it memorised but does not
generalise to new captions.

    python experiments/seen_vs_unseen.py --experiment tiny-long-finetune-out --out seen_vs_unseen.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # print_table

from _common import print_table  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True, help="a finished `freezeasguard experiment` folder")
    ap.add_argument("--method", default="full", help="method tag of the fine-tunes to test (default full)")
    ap.add_argument("--images", type=int, default=16, help="portraits per seed and caption set")
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5])
    ap.add_argument("--out", default="seen_vs_unseen.json")
    a = ap.parse_args()

    from PIL import Image

    from freezeasguard.experiment.synthetic_world import SyntheticWorld
    from freezeasguard.models.generate import generate_images, load_pipeline

    root = Path(a.experiment)
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("people_data"):
        raise SystemExit("this check needs a synthetic-world experiment (people_data is set)")
    world = SyntheticWorld(cfg["cast_seed"])
    recogniser = world.recogniser()
    runs = sorted(root.glob(f"finetunes/{a.method}-*-people-*"))
    runs = [r for r in runs if not r.name.endswith((".work", ".partial"))]
    if not runs:
        raise SystemExit(f"no {a.method} people fine-tunes under {root / 'finetunes'}")
    rows = []
    for run in runs:
        manifest = json.loads((run / "freezeasguard_manifest.json").read_text())
        seed, data = manifest["config"]["seed"], Path(manifest["data"])
        meta = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
        subject = manifest["subject"] or meta[0]["name"]    # the runner exports one subject per folder
        meta = [m for m in meta if m["name"] == subject][:a.images]
        seen = [m["text"] for m in meta]
        unseen, _ = world.people_prompts(subject, a.images, seed)
        real = [Image.open(data / m["file_name"]).convert("RGB") for m in meta]
        real_rate = sum(p["identity"] == subject for p in recogniser.predict(real)) / len(real)
        pipe = load_pipeline(run)
        for name, prompts in (("seen", seen), ("unseen", unseen)):
            for g in a.guidance:
                images = generate_images(pipe, prompts, steps=cfg["generate_steps"], seed=seed * 1000, guidance=g)
                names = collections.Counter(p["identity"] for p in recogniser.predict(images))
                rows.append({"run": run.name, "seed": seed, "captions": name, "guidance": g,
                             "recognised": names[subject] / len(images), "n": len(images),
                             "most_common": names.most_common(1)[0][0], "real_renders_recognised": real_rate})
    print_table(rows, ["run", "captions", "guidance", "recognised", "n", "most_common", "real_renders_recognised"])
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
