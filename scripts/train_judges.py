"""Train the judges shipped for the default cast (recogniser) and the innocent domains
(attribute classifiers), report held-out accuracy, and save them as safetensors.

    python scripts/train_judges.py --out src/freezeasguard/assets/judges [--recogniser-only]

The recogniser also learns from blurred copies and from copies passed through the shipped
pipeline's VAE (generated images are blurry; a sharp-only recogniser named 34-91% of VAE
round trips correctly, and almost none of the generated portraits), and is reported on held-out
renders, on blurred ones, on VAE round trips and on strangers (who should be "other").
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
    ap.add_argument("--recogniser-only", action="store_true", help="keep the attribute judges as they are")
    a = ap.parse_args()
    from PIL import ImageFilter

    from freezeasguard.models import load_sd
    from freezeasguard.synthetic import TINY_SD
    from freezeasguard.synthetic.classifiers import OTHER, vae_round_trip

    out = Path(a.out)
    info = json.loads((out / "judges_info.json").read_text()) if a.recogniser_only else {}
    t = time.time()
    vae = load_sd(TINY_SD).vae
    rec = train_recogniser(a.cast_seed, vae=vae)
    imgs, labels = person_samples(make_cast(a.cast_seed), 40, 0, seed=999)

    def acc(images):
        preds = [p["identity"] for p in rec.predict(images)]
        return sum(p == l for p, l in zip(preds, labels)) / len(labels)

    strangers, _ = person_samples([], 0, 400, seed=998)
    info["recogniser"] = {
        "seconds": time.time() - t, "heldout_accuracy": acc(imgs),
        "heldout_blur1_accuracy": acc([im.filter(ImageFilter.GaussianBlur(1)) for im in imgs]),
        "heldout_blur1.5_accuracy": acc([im.filter(ImageFilter.GaussianBlur(1.5)) for im in imgs]),
        "heldout_vae_round_trip_accuracy": acc(vae_round_trip(imgs, vae)),
        "others_named_as_cast": sum(p["identity"] != OTHER for p in rec.predict(strangers)) / len(strangers)}
    rec.save(out / f"recogniser-v2-cast{a.cast_seed}-8.safetensors")
    for domain in ([] if a.recogniser_only else ["logos", "clothes"]):
        t = time.time()
        judge = train_attribute_classifier(domain)
        im, at = attribute_samples(domain, 400, seed=999)
        info[domain] = {"seconds": time.time() - t, "heldout_all_attributes_accuracy": accuracy(judge, im, at)}
        judge.save(out / f"attributes-{domain}.safetensors")
    (out / "judges_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
