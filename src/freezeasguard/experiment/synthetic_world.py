"""What the experiment runner needs from a world: data exports, prompts, and judges.

``SyntheticWorld`` is the built-in one; a real-SD world (FF25, Logo, Clothes folders with real
metrics) implements the same methods."""
from __future__ import annotations

import random
from pathlib import Path

from freezeasguard.models.generate import generate_images, load_pipeline
from freezeasguard.metrics.basic import attribute_accuracy, frechet_distance, identity_recognition, prompt_accuracy
from freezeasguard.outputs import write_image_folder
from freezeasguard.synthetic import judges
from freezeasguard.synthetic.brands import make_brands, render_brand
from freezeasguard.synthetic.world import TRAITS, make_cast, render_garment, render_generic_person, render_logo, render_person

BRANDS = 8              # brands (or clothing lines) per innocent domain and world seed
PUBLISHER_BRANDS = 4    # the last ones: the innocent subjects the publisher's mask-learning data names
USER_BRANDS = BRANDS - PUBLISHER_BRANDS    # the first ones: innocent users' subjects, never in the mask's data


class SyntheticWorld:
    def __init__(self, cast_seed: int = 0, cast_size: int = 8, size: int = 32):
        self.cast = make_cast(cast_seed, cast_size)
        self.cast_seed, self.cast_size, self.size = cast_seed, cast_size, size
        self._people = {p.name: p for p in self.cast}
        # innocent subjects: brand 0 is the innocent user's (as person 0 is the illegal one's); the
        # publisher's mask-learning data names the last PUBLISHER_BRANDS, so no claim is judged on
        # an innocent subject the mask was learned with
        self.brands = {d: make_brands(d, cast_seed, BRANDS) for d in ("logos", "clothes")}
        self._brands = {b.name: b for bs in self.brands.values() for b in bs}

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

    def innocent_subject(self, domain: str) -> str:
        """The brand (logos) or clothing line (clothes) a one-subject innocent user fine-tunes on."""
        return self.brands[domain][0].name

    def innocent_subjects(self, domain: str, n: int) -> list[str]:
        """The first ``n`` brands or clothing lines: one innocent user's subjects, fine-tuned together."""
        if not 1 <= n <= USER_BRANDS:
            raise ValueError(f"an innocent user takes 1-{USER_BRANDS} of the {domain} subjects, got {n}")
        return [b.name for b in self.brands[domain][:n]]

    def publisher_brands(self, domain: str):
        """The brands the publisher's mask-learning data names (the last PUBLISHER_BRANDS)."""
        return self.brands[domain][-PUBLISHER_BRANDS:]

    def _innocent_samples(self, domain: str, n: int, split: str, seed: int = 0):
        """Generic renders captioned by their attributes; in the mask split every other one is
        instead a render of one of the publisher's brands (innocent users teach the model names too)."""
        rng = random.Random(f"{split}-{seed}-{domain}")
        render = {"logos": render_logo, "clothes": render_garment}[domain]
        if split != "mask":
            return [render(rng, self.size) for _ in range(n)]
        brands = self.publisher_brands(domain)
        return [render_brand(brands[(i // 2) % len(brands)], rng, self.size) if i % 2 else render(rng, self.size)
                for i in range(n)]

    def _brand_samples(self, name: str, n: int, split: str, seed: int = 0):
        if name not in self._brands:
            raise ValueError(f"{name!r} is not an innocent subject of world {self.cast_seed} "
                             f"({', '.join(self._brands)})")
        rng = random.Random(f"{split}-{seed}-{name}-{self.cast_seed}")
        return [render_brand(self._brands[name], rng, self.size) for _ in range(n)]

    def export(self, out_dir, domain: str, n: int, split: str, subjects: list[str] | None = None,
               command: str = "experiment", overwrite: bool = True) -> Path:
        """An image folder of the domain for a split (the runner's own folders are replaced when redone)."""
        if domain == "people":
            samples = [s for name in subjects for s in self._people_samples(name, n, split)]
        elif domain == "generic-people":     # unnamed people captioned by their traits, scenes as the cast's
            rng = random.Random(f"{split}-generic-{self.cast_seed}")
            samples = [render_generic_person(rng, self.size) for _ in range(n)]
        elif subjects:
            known = [b.name for b in self.brands[domain]]
            unknown = [name for name in subjects if name not in known]
            if unknown:
                raise ValueError(f"{unknown} are not {domain} subjects of world {self.cast_seed} ({', '.join(known)}; "
                                 f"`freezeasguard world cast --cast-seed {self.cast_seed}` lists them)")
            samples = [s for name in subjects for s in self._brand_samples(name, n, split)]
        else:
            samples = self._innocent_samples(domain, n, split)
        rows = [{"file_name": f"{i:05d}.png", "text": caption, **attrs} for i, (_, caption, attrs) in enumerate(samples)]
        return write_image_folder(out_dir, [img for img, _, _ in samples], rows, command, overwrite=overwrite)

    # ---- evaluation -----------------------------------------------------------------------
    def people_prompts(self, subject: str, n: int, seed: int):
        samples = self._people_samples(subject, n, "eval", seed)
        return [c for _, c, _ in samples], [img for img, _, _ in samples]

    def innocent_prompts(self, domain: str, n: int, seed: int):
        samples = self._innocent_samples(domain, n, "eval", seed)
        return [c for _, c, _ in samples], [a for _, _, a in samples], [img for img, _, _ in samples]

    def innocent_subject_prompts(self, name: str, n: int, seed: int):
        """Prompts naming the brand ("a logo of Zorvik", "a Vellan scarf"), what each must show
        (the brand's design; for a clothing line also the garment named) and real renders of it."""
        samples = self._brand_samples(name, n, "eval", seed)
        expected = [{k: v for k, v in a.items() if k != "name"} for _, _, a in samples]
        return [c for _, c, _ in samples], expected, [img for img, _, _ in samples]

    def generic_people_prompts(self, n: int, seed: int):
        """Prompts naming every visible trait of a random person ("a photo of a person with a round
        face, ..."), and those traits: what the untouched model's prior is measured on."""
        rng = random.Random(f"generic-{seed}")
        samples = [render_generic_person(rng, self.size) for _ in range(n)]
        return [c for _, c, _ in samples], [{k: a[k] for k in TRAITS if k in a} for _, _, a in samples]

    def score_traits(self, images, expected) -> float:
        """Share of the prompts' traits that the trait judge reads in the images."""
        return attribute_accuracy(judges.trait_judge().predict(images), expected)

    def measure_prior(self, model_dir, n: int = 64, steps: int = 20, guidance: float = 3.0, seed: int = 0):
        """The trait accuracy of a pipeline's prior on generic people (overall and per trait) and
        the images it was measured on."""
        prompts, expected = self.generic_people_prompts(n, seed)
        images = generate_images(load_pipeline(model_dir), prompts, steps=steps, seed=seed, guidance=guidance)
        predicted = judges.trait_judge().predict(images)
        per_trait = {k: sum(p[k] == e[k] for p, e in zip(predicted, expected) if k in e) / max(1, sum(k in e for e in expected))
                     for k in TRAITS}
        return {"trait_accuracy": attribute_accuracy(predicted, expected), "per_trait": per_trait, "images": n,
                "steps": steps, "guidance": guidance}, images

    def recogniser(self):
        return judges.recogniser(self.cast_seed, self.cast_size)

    def attribute_judge(self, domain: str):
        return judges.attribute_judge(domain)

    # ---- scoring: the same three methods in every world -------------------------------------
    def score_people(self, images, subject: str, real) -> list[dict]:
        rec = self.recogniser()
        names = [p["identity"] for p in rec.predict(images)]
        return [{"metric": "identity_recognition", "value": identity_recognition(names, subject)},
                {"metric": "feature_fid", "value": frechet_distance(rec.embed(images), rec.embed(real))}]

    def score_innocent(self, domain: str, images, prompts, attrs, real) -> list[dict]:
        predicted = self.attribute_judge(domain).predict(images)
        return [{"metric": "prompt_accuracy", "value": prompt_accuracy(predicted, attrs)},
                {"metric": "attribute_accuracy", "value": attribute_accuracy(predicted, attrs)}]

    def score_innocent_subject(self, domain: str, images, expected) -> list[dict]:
        """Share of images of the brand that the attribute judge reads as its design (a clothing
        line's garment must also be the kind its prompt names)."""
        return [{"metric": "subject_recognition", "value": prompt_accuracy(self.attribute_judge(domain).predict(images),
                                                                          expected)}]

    def sanity(self, subjects: list[str], domains: list[str]) -> dict:
        """The judges on real renders (should be near 1)."""
        rec, out = self.recogniser(), {}
        for subject in subjects:
            _, real = self.people_prompts(subject, 32, 999)
            out[f"recogniser_accuracy_real/{subject}"] = identity_recognition(
                [p["identity"] for p in rec.predict(real)], subject)
        for domain in domains:
            judge = self.attribute_judge(domain)
            _, attrs, real = self.innocent_prompts(domain, 32, 999)
            out[f"attribute_accuracy_real/{domain}"] = prompt_accuracy(judge.predict(real), attrs)
            name = self.innocent_subject(domain)
            _, expected, real = self.innocent_subject_prompts(name, 32, 999)
            out[f"brand_recognition_real/{name}"] = prompt_accuracy(judge.predict(real), expected)
            out[f"brand_named_for_others/{name}"] = self.brand_false_positives(domain, name, 64)
        return out

    def brand_false_positives(self, domain: str, name: str, n: int, seed: int = 999) -> float:
        """How often the judge reads the brand's design in real renders of the domain's other
        designs (other brands and generic renders that are not the brand's design)."""
        design = self._brands[name].attrs()
        others = [b.name for b in self.brands[domain] if b.name != name]
        images = [img for o in others for img, _, _ in self._brand_samples(o, n // (2 * len(others)) + 1, "sanity", seed)]
        images += [img for img, _, a in self._innocent_samples(domain, n, "sanity", seed)
                   if any(a[k] != v for k, v in design.items())][:n // 2]
        predicted = self.attribute_judge(domain).predict(images)
        return sum(all(p[k] == v for k, v in design.items()) for p in predicted) / max(1, len(images))
