"""A world made of the user's own data folders, for real Stable Diffusion evaluation.

The same interface as SyntheticWorld (subjects, export, prompts, score_people, score_innocent,
sanity), so the experiment runner drives real models with real metrics:

- people: an FF25-style folder, ``ROOT/metadata.csv`` (or .jsonl) with file_name (e.g.
  ``Person_Name/img.png``), text and name. Per subject, rows are split in file order: the first
  ``mask_images`` for mask learning, the rest for the illegal user's fine-tuning (the paper's
  Appendix F: the two never overlap); evaluation prompts are captions of the fine-tuning rows
  and FID compares generated images with those training images (as the paper does).
- innocent domains: image folders or datasets saved with save_to_disk (Logo, Clothes); the
  first ``mask_images`` rows for mask learning, the next for fine-tuning, the rest held out for
  evaluation prompts.
- metrics (optional, ``face_identity: true``, the faces extra): the share of generated portraits
  whose face matches the person's photos, and the share with no detectable face.
- metrics: FID and KID with the standard FID Inception-v3 (``fid_inception``: its weights as
  .safetensors; metrics ``fid``, ``kid``, comparable with the paper), or in the feature space of
  a local transformers vision model folder (``fid_features``, e.g. CLIP or DINOv2; metrics
  ``fid_features``, ``kid_features``), and the CLIP score of innocent images against their
  prompts (``clip_weights``).
- metric (optional, ``topiq_fr``: pyiqa's TOPIQ-FR weights as .safetensors): mean TOPIQ-FR of
  each generated image against the real image whose caption prompted it (people: the fine-tuning
  image; innocent: the held-out image), the paper's TOPIQ column in both domains.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from freezeasguard.training.data import load_image_captions, preprocess
from freezeasguard.metrics.faces import FaceEmbedder, face_identity
from freezeasguard.metrics.nets.topiq import load_topiq_fr, topiq_fr_scores
from freezeasguard.metrics.real import clip_scores, fid_and_kid_of_images, fid_extractor, load_clip
from freezeasguard.outputs import write_image_folder


class FolderWorld:
    def __init__(self, people_dir, innocent_dirs: dict[str, str], mask_images: int = 100,
                 clip_weights=None, fid_features=None, resolution: int | None = None, face_identity: bool = False,
                 fid_inception=None, topiq_fr=None):
        self.people = load_image_captions(people_dir, check_images=False)
        self.innocent = {d: load_image_captions(p, check_images=False) for d, p in innocent_dirs.items()}
        self.mask_images = mask_images
        self.clip_weights, self.fid_features, self.resolution = clip_weights, fid_features, resolution
        self.fid_inception, self.topiq_fr = fid_inception, topiq_fr
        if not (fid_inception or fid_features):
            fid_extractor()     # raises, saying what to set
        self._names = list(dict.fromkeys(r.subject for r in self.people.records if r.subject))
        if not self._names:
            raise ValueError(f"{people_dir}: no 'name' column values; the people data needs one per row")
        self.face_identity = face_identity
        self._clip = self._features = self._faces = self._topiq = None

    def subjects(self, n: int) -> list[str]:
        return self._names[:n]

    def check_subject(self, name: str):
        if name not in self._names:
            raise ValueError(f"subject {name!r} is not in the people data ({', '.join(self._names[:10])}...)")

    def _rows(self, domain: str, split: str, subject: str | None = None):
        if domain == "people":
            rows = [r for r in self.people.records if r.subject == subject]
            cut = [self.mask_images, len(rows), len(rows)]
        else:
            if domain not in self.innocent:
                raise ValueError(f"innocent domain {domain!r} has no data folder; known: {', '.join(self.innocent)}")
            rows = self.innocent[domain].records
            rest = len(rows) - self.mask_images
            cut = [self.mask_images, self.mask_images + rest // 2, len(rows)]
        start = {"mask": 0, "finetune": cut[0], "eval": cut[1]}[split]
        end = {"mask": cut[0], "finetune": cut[1], "eval": cut[2]}[split]
        chosen = rows[start:end]
        if not chosen and domain == "people" and split == "eval":
            chosen = rows[cut[0]:]          # FF25: the fine-tuning images are also FID's reference
        if not chosen:
            raise ValueError(f"{domain} {subject or ''}: no rows for the {split} split (have {len(rows)}, "
                             f"mask_images {self.mask_images}); lower mask_images or add data")
        return chosen

    def export(self, out_dir, domain: str, n: int, split: str, subjects: list[str] | None = None) -> Path:
        rows = [r for s in (subjects or [None]) for r in self._rows(domain, split, s)[:n]]
        meta = [{"file_name": f"{i:05d}.png", "text": r.caption, "name": r.subject} for i, r in enumerate(rows)]
        return write_image_folder(out_dir, [r.load() for r in rows], meta, "experiment", overwrite=True)

    def _sample(self, rows, n, seed):
        rng = random.Random(seed)
        return [rows[rng.randrange(len(rows))] for _ in range(n)]

    def people_prompts(self, subject: str, n: int, seed: int):
        rows = self._sample(self._rows("people", "eval", subject), n, seed)
        return [r.caption for r in rows], [self._sized(r.load()) for r in rows]

    def innocent_prompts(self, domain: str, n: int, seed: int):
        rows = self._sample(self._rows(domain, "eval"), n, seed)
        return [r.caption for r in rows], [None] * n, [self._sized(r.load()) for r in rows]

    def _sized(self, img):
        if not self.resolution:
            return img
        arr = ((preprocess(img, self.resolution).permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        return Image.fromarray(arr)

    def score_people(self, images, subject: str, real) -> list[dict]:
        if self._features is None:
            self._features, _ = fid_extractor(self.fid_inception, self.fid_features)
        real = [r.resize(images[0].size) for r in real]      # the face metric below compares these too
        m = fid_and_kid_of_images(real, images, self._features)
        suffix = "" if self.fid_inception else "_features"
        rows = [{"metric": "fid" + suffix, "value": m["fid"]}, {"metric": "kid" + suffix, "value": m["kid"]}]
        if self.face_identity:
            self._faces = self._faces or FaceEmbedder()
            f = face_identity(images, real, self._faces)
            rows += [{"metric": "identity_match", "value": f["identity_match"]},
                     {"metric": "detection_failure", "value": f["detection_failure"]}]
        return rows + self._topiq_rows(images, real)

    def _topiq_rows(self, images, real) -> list[dict]:
        if not self.topiq_fr:
            return []
        self._topiq = self._topiq or load_topiq_fr(self.topiq_fr, flag="topiq_fr")
        scores = topiq_fr_scores(images, real, self._topiq)
        return [{"metric": "topiq_fr", "value": sum(scores) / len(scores)}]

    def score_innocent(self, domain: str, images, prompts, attrs, real) -> list[dict]:
        if self._clip is None:
            self._clip = load_clip(self.clip_weights)
        scores = clip_scores(images, prompts, *self._clip)
        return [{"metric": "clip_score", "value": sum(scores) / len(scores)}] + self._topiq_rows(images, real)

    def sanity(self, subjects: list[str], domains: list[str]) -> dict:
        """CLIP score of the real innocent images against their own captions (the ceiling)."""
        if self._clip is None:
            self._clip = load_clip(self.clip_weights)
        out = {}
        for d in domains:
            prompts, _, real = self.innocent_prompts(d, 16, 999)
            out[f"clip_score_real/{d}"] = sum(clip_scores(real, prompts, *self._clip)) / len(prompts)
        return out
