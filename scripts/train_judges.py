"""Train the judges shipped for the default cast (recogniser) and the innocent domains
(attribute classifiers), report held-out accuracy, and save them as safetensors.

    python scripts/train_judges.py --out src/freezeasguard/assets/judges
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main():
    from freezeasguard.synthetic.classifiers import (accuracy, attribute_samples, person_samples, train_attribute_classifier,
                                                     train_recogniser)
    from freezeasguard.synthetic.world import make_cast

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="src/freezeasguard/assets/judges")
    ap.add_argument("--cast-seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    info = {}
    t = time.time()
    rec = train_recogniser(a.cast_seed)
    imgs, labels = person_samples(make_cast(a.cast_seed), 40, 200, seed=999)
    preds = [p["identity"] for p in rec.predict(imgs)]
    info["recogniser"] = {"seconds": time.time() - t,
                          "heldout_accuracy": sum(p == l for p, l in zip(preds, labels)) / len(labels)}
    rec.save(out / f"recogniser-cast{a.cast_seed}-8.safetensors")
    for domain in ("logos", "clothes"):
        t = time.time()
        judge = train_attribute_classifier(domain)
        im, at = attribute_samples(domain, 400, seed=999)
        info[domain] = {"seconds": time.time() - t, "heldout_all_attributes_accuracy": accuracy(judge, im, at)}
        judge.save(out / f"attributes-{domain}.safetensors")
    (out / "judges_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
