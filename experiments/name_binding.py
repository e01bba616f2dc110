"""Does an illegal fine-tune bind the person to the name, or rewrite what "a person" looks like?
For each illegal user's fine-tune of a finished built-in-world experiment, generate the evaluation
portraits twice: prompted with the name, and with the name replaced by "a person" (same prompts
otherwise, same seeds), and count how many the recogniser names as the subject. Named ~ neutral:
the fine-tune learned the person unconditionally, and an objective that measures only what the
name adds cannot see it.

    python experiments/name_binding.py --experiment runs/guard/tune-objectives \\
        [--out experiments/results/guard-name-binding]

Writes name_binding.json and name_binding.md (16 prompts per fine-tune, 20 DDIM steps, guidance as
the experiment's)."""
import argparse
import json
import logging
from pathlib import Path

from freezeasguard.experiment.synthetic_world import SyntheticWorld
from freezeasguard.io import atomic_write_json, atomic_write_text
from freezeasguard.metrics.basic import identity_recognition
from freezeasguard.models.generate import generate_images, load_pipeline
from freezeasguard.training.data import neutral_caption

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True, help="a finished experiment folder (its config.json and finetunes/)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "guard-name-binding"))
    ap.add_argument("--images", type=int, default=16)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    exp = Path(a.experiment)
    cfg = json.loads((exp / "config.json").read_text())
    world = SyntheticWorld(cfg["cast_seed"])
    recogniser = world.recogniser()
    rows = []
    for ft in sorted((exp / "finetunes").iterdir()):
        subject = next((s for s in world.subjects(8) if f"-people-{s.replace(' ', '_')}" in ft.name), None)
        if subject is None or not (ft / "model_index.json").exists():
            continue
        seed = int(ft.name.split("-s")[-1].split("-")[0])
        prompts, _ = world.people_prompts(subject, a.images, seed)
        neutral = [neutral_caption(p, subject, "a person") for p in prompts]
        pipe = load_pipeline(ft)
        row = {"finetune": ft.name, "subject": subject}
        for kind, texts in (("named", prompts), ("neutral", neutral)):
            images = generate_images(pipe, texts, steps=cfg["generate_steps"], seed=seed * 1000, guidance=cfg["guidance"])
            row[kind] = identity_recognition([p["identity"] for p in recogniser.predict(images)], subject)
        rows.append(row)
        print(f"{ft.name}: named {row['named']:.3f}, neutral {row['neutral']:.3f}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "name_binding.json", {"experiment": str(exp), "images": a.images, "rows": rows})
    lines = [f"Illegal fine-tunes of {exp.name} (cast {cfg['cast_seed']}): portraits recognised as the subject, "
             f"prompted with the name and with \"a person\" instead ({a.images} each).", "",
             "| fine-tune | named | \"a person\" |", "|---|---|---|"]
    lines += [f"| {r['finetune']} | {r['named']:.3f} | {r['neutral']:.3f} |" for r in rows]
    atomic_write_text(out / "name_binding.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
