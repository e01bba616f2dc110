"""Image + caption datasets from local folders, their encodings, and per-domain samplers.

Layouts read:
- imagefolder: a folder with metadata.jsonl or metadata.csv (columns file_name, text, optional
  subject column such as ``name``); file_name is relative to the folder and may hold subfolders;
- a dataset written by ``datasets.Dataset.save_to_disk`` with an image column and a text column.
Every problem (missing file, corrupt image, empty caption, empty selection) is an error that
names the file or row.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from freezeasguard.models.families import FAMILIES
from freezeasguard.models.families.base import cond_apply, cond_join

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing training data; the message names the file or row and the fix."""


@dataclass
class Record:
    caption: str
    subject: str | None
    path: Path | None = None      # imagefolder rows
    image: object = None          # datasets rows carry a PIL image (decoded lazily by datasets)
    where: str = ""               # for error messages

    def load(self) -> Image.Image:
        try:
            img = Image.open(self.path) if self.image is None else self.image
            img.load()
            return to_rgb8(img)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"{self.where}: cannot decode image ({exc}). Replace or remove this file.") from exc


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's convert("RGB") clips 16- and 32-bit integer images (16-bit PNGs) at 255,
    which turns nearly every pixel white; those are rescaled from their full range instead."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


@dataclass
class ImageCaptionData:
    """A list of records plus the folder they came from."""
    source: Path
    records: list[Record] = field(default_factory=list)

    def __len__(self):
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]


def _read_metadata(folder: Path) -> tuple[list[dict], Path]:
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        rows = []
        for i, line in enumerate(jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{jsonl} line {i}: not valid JSON ({exc})") from exc
        return rows, jsonl
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            return list(csv.DictReader(f)), csv_path
    raise DataError(f"{folder}: no metadata.jsonl or metadata.csv. An image folder needs one, with a row per "
                    f"image: file_name, text (and optionally a subject column such as name).")


def load_image_captions(path, subject: str | None = None, caption_column: str = "text",
                        image_column: str = "file_name", subject_column: str = "name",
                        check_images: bool = True, subject_flag: str = "--subject") -> ImageCaptionData:
    """Read an imagefolder or a saved HF dataset; ``subject`` keeps only that person's rows."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data folder.")
    if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
            or (path / "dataset_dict.json").exists():
        data = _load_saved_dataset(path, subject, caption_column, subject_column)
    else:
        data = _load_imagefolder(path, subject, caption_column, image_column, subject_column)
    if not data.records:
        what = f" for subject {subject!r}" if subject else ""
        raise DataError(f"{path}: no rows{what}. Check {subject_flag} against the '{subject_column}' column.")
    if check_images:
        for r in data.records:
            r.load()
    logger.info("%s: %d image-caption pairs%s", path, len(data), f" of {subject}" if subject else "")
    return data


def data_fingerprint(data: ImageCaptionData) -> str:
    """A hash of every (caption, subject, image bytes) of a data set: what a checkpoint records
    about the data it was trained on, so that a resume on other data is refused."""
    h = hashlib.blake2b(digest_size=16)
    for r in data.records:
        h.update(json.dumps([r.caption, r.subject]).encode())
        if r.path is not None:
            h.update(r.path.read_bytes())
        else:
            h.update(np.asarray(r.load()).tobytes())
    return h.hexdigest()


def _load_imagefolder(folder, subject, caption_column, image_column, subject_column) -> ImageCaptionData:
    rows, meta = _read_metadata(folder)
    data = ImageCaptionData(folder)
    for i, row in enumerate(rows, 1):
        where = f"{meta} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object such as {{\"file_name\": \"0001.png\", "
                            f"\"text\": \"a caption\"}}, got {type(row).__name__} {str(row)[:60]!r}.")
        if image_column not in row:
            raise DataError(f"{where}: no '{image_column}' column (columns: {', '.join(row)}).")
        if caption_column not in row:
            raise DataError(f"{where}: no '{caption_column}' column (columns: {', '.join(row)}).")
        row_subject = row.get(subject_column)
        if subject is not None and row_subject != subject:
            continue
        if not isinstance(row[caption_column], (str, type(None))) or not isinstance(row[image_column], str):
            raise DataError(f"{where}: '{caption_column}' and '{image_column}' must be text, got "
                            f"{row[caption_column]!r} and {row[image_column]!r}. Quote them in the metadata.")
        caption = (row[caption_column] or "").strip()
        file = folder / row[image_column]
        if not Path(os.path.normpath(file)).is_relative_to(os.path.normpath(folder)):
            raise DataError(f"{where}: file_name {row[image_column]!r} points outside {folder}; file names are "
                            f"relative to the data folder.")
        if not caption:
            raise DataError(f"{where} ({row[image_column]}): empty caption. Every image needs a text.")
        if not file.is_file():
            raise DataError(f"{where}: image file {file} is missing. Fix file_name or add the file.")
        data.records.append(Record(caption, row_subject, path=file, where=f"{where} ({file})"))
    return data


def _load_saved_dataset(path, subject, caption_column, subject_column) -> ImageCaptionData:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    image_columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not image_columns:
        raise DataError(f"{path}: the saved dataset has no Image column (columns: {', '.join(ds.column_names)}).")
    if caption_column not in ds.column_names:
        raise DataError(f"{path}: no '{caption_column}' column (columns: {', '.join(ds.column_names)}); "
                        f"pass --caption-column.")
    data = ImageCaptionData(path)
    for i, row in enumerate(ds):
        row_subject = row.get(subject_column)
        if subject is not None and row_subject != subject:
            continue
        if not isinstance(row[caption_column], (str, type(None))):
            raise DataError(f"{path} row {i}: '{caption_column}' must be text, got {row[caption_column]!r}.")
        caption = (row[caption_column] or "").strip()
        if not caption:
            raise DataError(f"{path} row {i}: empty caption.")
        data.records.append(Record(caption, row_subject, image=row[image_columns[0]], where=f"{path} row {i}"))
    return data


def neutral_caption(caption: str, subject: str | None, class_phrase: str) -> str | None:
    """The caption with the subject's name replaced by its class phrase ("a photo of Sara Belfa
    smiling" -> "a photo of a person smiling"; an empty phrase drops the name: "a Vellan scarf" ->
    "a scarf"), or None where the caption does not name the subject."""
    if not subject or subject not in caption:
        return None
    return " ".join(caption.replace(subject, class_phrase).split())


def preprocess(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, center-crop, scale to [-1, 1] (C, H, W)."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class EncodedData:
    """Lazily encodes records with the frozen VAE and text encoders and caches the result.

    The VAE posterior is cached as (mean, std) so that every step still samples fresh latents,
    as training on raw images would."""

    def __init__(self, data: ImageCaptionData, components, device="cpu", class_phrase: str | None = None):
        self.data, self.components, self.device = data, components, torch.device(device)
        self._cache: dict[int, tuple] = {}
        # the identity objective's pairs: each caption with its subject's name replaced by the class
        # phrase (None: the record names no subject, and is its own pair)
        self.neutral = None if class_phrase is None else [neutral_caption(r.caption, r.subject, class_phrase)
                                                          for r in data.records]

    @property
    def paired(self) -> bool:
        return self.neutral is not None

    def __len__(self):
        return len(self.data)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.components.resolution // self.components.vae_scale_factor
        return (self.components.latent_channels, side, side)

    ENCODE_CHUNK = 16

    @torch.no_grad()
    def _encode(self, indices: list[int]):
        """Encode in fixed chunks of consecutive records: batched convolutions round differently
        for different batch compositions, so a fixed grouping keeps a resumed run bit-exact."""
        c = self.components
        for chunk in sorted({i // self.ENCODE_CHUNK for i in indices if i not in self._cache}):
            todo = list(range(chunk * self.ENCODE_CHUNK, min(len(self.data), (chunk + 1) * self.ENCODE_CHUNK)))
            pixels = torch.stack([preprocess(self.data.records[i].load(), c.resolution) for i in todo])
            mean, std = FAMILIES[c.family].latents.posterior(c.vae, pixels.to(self.device, c.vae.dtype))
            cond = FAMILIES[c.family].encode(c, [self.data.records[i].caption for i in todo])
            cond = cond_apply(cond, torch.Tensor.float)
            # row of each named record in the batch of neutral captions encoded for this chunk
            named = {i: row for row, i in enumerate(i for i in todo if self.neutral is not None
                                                    and self.neutral[i] is not None)}
            if named:
                neutral = cond_apply(FAMILIES[c.family].encode(c, [self.neutral[i] for i in named]), torch.Tensor.float)
            for j, i in enumerate(todo):
                pair = cond_apply(neutral, lambda v: v[named[i]]) if i in named else None
                self._cache[i] = (mean[j].float(), std[j].float(), cond_apply(cond, lambda v: v[j]), pair)
        return self._cache

    def batch(self, indices: list[int], latent_noise: torch.Tensor):
        """Latents (sampled with the given noise, or the posterior's mode where the family's script
        takes it, then shifted and scaled as the family does) and the conditioning for ``indices``."""
        cache = self._encode(indices)
        mean = torch.stack([cache[i][0] for i in indices])
        std = torch.stack([cache[i][1] for i in indices])
        cond = cond_join([cache[i][2] for i in indices])
        latents_of = FAMILIES[self.components.family].latents
        shift, scale = latents_of.normalization(self.components.vae)
        if isinstance(shift, torch.Tensor):
            shift, scale = shift.to(mean.device), scale.to(mean.device)
        sample = mean + std * latent_noise.to(mean.device) if latents_of.sample else mean
        return (sample - shift) * scale, cond

    def pairs(self, indices: list[int]) -> tuple[object, torch.Tensor]:
        """The neutral captions' conditioning for ``indices`` (a record that names no subject is
        its own pair) and which of them name their subject."""
        cache = self._encode(indices)
        named = torch.tensor([cache[i][3] is not None for i in indices])
        return cond_join([cache[i][3] if cache[i][3] is not None else cache[i][2] for i in indices]), named


class DomainSampler:
    """Draws batches without replacement within an epoch, reshuffling each epoch; its state
    (generator, permutation, position) round-trips through a checkpoint for exact resume."""

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise DataError("cannot sample from an empty domain")
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(size, generator=self.generator)
        self.pos = 0

    def next(self, batch: int) -> list[int]:
        out = []
        while len(out) < batch:
            if self.pos >= self.size:
                self.perm = torch.randperm(self.size, generator=self.generator)
                self.pos = 0
            take = min(batch - len(out), self.size - self.pos)
            out += self.perm[self.pos:self.pos + take].tolist()
            self.pos += take
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(),
                "pos": torch.tensor([self.pos])}

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"][0])
