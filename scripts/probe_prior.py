"""How well does a pipeline draw people from their traits? The trait accuracy of its prior: the
share of a generic prompt's traits ("a photo of a person with a long face, brown skin, curly red
hair, ...") that the trait judge reads in its samples; also a grid to look at.

    python scripts/probe_prior.py PIPELINE_DIR [--images 64 --guidance 3 --steps 20] [--out probe.json]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from freezeasguard.experiment.synthetic_world import SyntheticWorld  # noqa: E402
from freezeasguard.models.generate import save_grid  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", help="JSON file for the numbers (the grid goes beside it, .png)")
    a = ap.parse_args()
    result, images = SyntheticWorld(0).measure_prior(a.model, a.images, a.steps, a.guidance)
    result["model"] = a.model
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
        save_grid(images, Path(a.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
