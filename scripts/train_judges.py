"""Train the judges shipped for the default cast (recogniser), for people's traits (trait judge)
and for the innocent domains (attribute classifiers), report their accuracy on held-out renders,
and save them as safetensors with judges_info.json.

    python scripts/train_judges.py --out src/freezeasguard/assets/judges [--vae-from PIPELINE_DIR]

The recogniser and the trait judge also learn from blurred copies and from copies passed through
the pipeline's VAE (generated images are blurry; a sharp-only recogniser named 34-91% of VAE round
trips correctly, and almost none of the generated portraits). Each is reported on held-out
renders, blurred ones and VAE round trips; the recogniser also on strangers (who should be
"other").
"""
import argparse
import json
import sys
import time
from pathlib import Path

from diffusers import AutoencoderKL
from PIL import ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from freezeasguard.io import atomic_write_json  # noqa: E402
from freezeasguard.metrics.basic import attribute_accuracy, prompt_accuracy  # noqa: E402
from freezeasguard.models.pipelines import load_model  # noqa: E402
from freezeasguard.synthetic import TINY_SD, judges  # noqa: E402
from freezeasguard.synthetic.classifiers import (  # noqa: E402
    OTHER,
    attribute_samples,
    person_samples,
    train_attribute_classifier,
    train_recogniser,
    train_trait_judge,
    trait_samples,
    vae_round_trip,
)
from freezeasguard.synthetic.world import WORLD_VERSION, make_cast  # noqa: E402


def views(images, vae):
    return {"heldout": images, "blur1": [im.filter(ImageFilter.GaussianBlur(1)) for im in images],
            "blur1.5": [im.filter(ImageFilter.GaussianBlur(1.5)) for im in images],
            "vae_round_trip": vae_round_trip(images, vae)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="src/freezeasguard/assets/judges")
    ap.add_argument("--cast-seed", type=int, default=0)
    ap.add_argument("--vae-from", default=str(TINY_SD),
                    help="pipeline folder (or a VAE folder) whose VAE makes the round trips")
    a = ap.parse_args()
    out = Path(a.out)
    vae_dir = Path(a.vae_from)
    vae = (load_model(vae_dir).vae if (vae_dir / "vae").is_dir()
           else AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval())
    info = {"vae_from": a.vae_from, "world_version": WORLD_VERSION}

    t = time.time()
    rec = train_recogniser(a.cast_seed, vae=vae)
    imgs, labels = person_samples(make_cast(a.cast_seed), 40, 0, seed=999)
    strangers, _ = person_samples(make_cast(a.cast_seed), 0, 400, seed=998)
    info["recogniser"] = {"seconds": time.time() - t}
    for view, images in views(imgs, vae).items():
        preds = [p["identity"] for p in rec.predict(images)]
        info["recogniser"][f"{view}_accuracy"] = sum(p == l for p, l in zip(preds, labels)) / len(labels)
    info["recogniser"]["others_named_as_cast"] = (
        sum(p["identity"] != OTHER for p in rec.predict(strangers)) / len(strangers))
    rec.save(out / judges.recogniser_file(a.cast_seed))

    t = time.time()
    traits = train_trait_judge(vae=vae)
    imgs, expected = trait_samples(400, seed=999)
    info["traits"] = {"seconds": time.time() - t}
    for view, images in views(imgs, vae).items():
        predicted = traits.predict(images)
        info["traits"][f"{view}_trait_accuracy"] = attribute_accuracy(predicted, expected)
        info["traits"][f"{view}_all_traits_right"] = prompt_accuracy(predicted, expected)
    traits.save(out / judges.trait_judge_file())

    for domain in ("logos", "clothes"):
        t = time.time()
        judge = train_attribute_classifier(domain, vae=vae)
        imgs, attrs = attribute_samples(domain, 400, seed=999)
        info[domain] = {"seconds": time.time() - t}
        for view, images in views(imgs, vae).items():
            info[domain][f"{view}_all_attributes_right"] = prompt_accuracy(judge.predict(images), attrs)
        judge.save(out / judges.attribute_judge_file(domain))
    atomic_write_json(out / "judges_info.json", info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
