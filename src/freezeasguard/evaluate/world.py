"""What the experiment runner needs from a world: data exports, prompts, and judges.

``SyntheticWorld`` is the built-in one; a real-SD world (FF25, Logo, Clothes folders with real
metrics) implements the same methods."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..synthetic import judges
from ..synthetic.world import make_cast, render_garment, render_logo, render_person

SPLITS = {"mask": 1, "finetune": 2, "eval": 3}   # disjoint render seeds: mask learning never sees fine-tune data


class SyntheticWorld:
    def __init__(self, cast_seed: int = 0, cast_size: int = 8, size: int = 32):
        self.cast = make_cast(cast_seed, cast_size)
        self.cast_seed, self.cast_size, self.size = cast_seed, cast_size, size
        self._people = {p.name: p for p in self.cast}

    def subjects(self, n: int) -> list[str]:
        return [p.name for p in self.cast[:n]]

    def check_subject(self, name: str):
        if name not in self._people:
            raise ValueError(f"subject {name!r} is not in cast {self.cast_seed} ({', '.join(self._people)})")

    # ---- data ---------------------------------------------------------------------------
    def _people_samples(self, subject: str, n: int, split: str, seed: int = 0):
        self.check_subject(subject)
        rng = random.Random(f"{split}-{seed}-{subject}-{self.cast_seed}")
        return [render_person(self._people[subject], rng, self.size) for _ in range(n)]

    def _innocent_samples(self, domain: str, n: int, split: str, seed: int = 0):
        rng = random.Random(f"{split}-{seed}-{domain}")
        render = {"logos": render_logo, "clothes": render_garment}[domain]
        return [render(rng, self.size) for _ in range(n)]

    def export(self, out_dir, domain: str, n: int, split: str, subjects: list[str] | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if domain == "people":
            samples = [s for name in subjects for s in self._people_samples(name, n, split)]
        else:
            samples = self._innocent_samples(domain, n, split)
        rows = []
        for i, (img, caption, attrs) in enumerate(samples):
            img.save(out_dir / f"{i:05d}.png")
            rows.append({"file_name": f"{i:05d}.png", "text": caption, **attrs})
        (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return out_dir

    # ---- evaluation -----------------------------------------------------------------------
    def people_prompts(self, subject: str, n: int, seed: int):
        samples = self._people_samples(subject, n, "eval", seed)
        return [c for _, c, _ in samples], [img for img, _, _ in samples]

    def innocent_prompts(self, domain: str, n: int, seed: int):
        samples = self._innocent_samples(domain, n, "eval", seed)
        return [c for _, c, _ in samples], [a for _, _, a in samples], [img for img, _, _ in samples]

    def recogniser(self):
        return judges.recogniser(self.cast_seed, self.cast_size)

    def attribute_judge(self, domain: str):
        return judges.attribute_judge(domain)

    # ---- scoring: the same three methods in every world -------------------------------------
    def score_people(self, images, subject: str, real) -> list[dict]:
        from .metrics import frechet_distance, identity_recognition
        rec = self.recogniser()
        names = [p["identity"] for p in rec.predict(images)]
        return [{"metric": "identity_recognition", "value": identity_recognition(names, subject)},
                {"metric": "feature_fid", "value": frechet_distance(rec.embed(images), rec.embed(real))}]

    def score_innocent(self, domain: str, images, prompts, attrs, real) -> list[dict]:
        from .metrics import attribute_accuracy, prompt_accuracy
        predicted = self.attribute_judge(domain).predict(images)
        return [{"metric": "prompt_accuracy", "value": prompt_accuracy(predicted, attrs)},
                {"metric": "attribute_accuracy", "value": attribute_accuracy(predicted, attrs)}]

    def sanity(self, subjects: list[str], domains: list[str]) -> dict:
        """The judges on real renders (should be near 1)."""
        from .metrics import identity_recognition, prompt_accuracy
        rec, out = self.recogniser(), {}
        for subject in subjects:
            _, real = self.people_prompts(subject, 32, 999)
            out[f"recogniser_accuracy_real/{subject}"] = identity_recognition(
                [p["identity"] for p in rec.predict(real)], subject)
        for domain in domains:
            _, attrs, real = self.innocent_prompts(domain, 32, 999)
            out[f"attribute_accuracy_real/{domain}"] = prompt_accuracy(self.attribute_judge(domain).predict(real), attrs)
        return out
