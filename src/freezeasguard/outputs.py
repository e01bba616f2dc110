"""Where a command may write: nothing a user owns is ever deleted or overwritten.

An output folder is usable when it does not exist, is empty, or holds this command's own earlier
output (a marker file it wrote there) and the user passed ``--overwrite`` (or resumes). The base
model and the data are never valid outputs, nor any folder inside or around them. Output files
(a mask) follow the same rule: a file that exists is replaced only with ``--overwrite``, and only
if freezeasguard wrote it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from freezeasguard.io import atomic_write_json

MARKER = ".freezeasguard-output.json"


class OutputError(ValueError):
    """An output path that would lose something the user owns."""


def _contains(out: Path, inp: Path) -> bool:
    """Replacing ``out`` would remove ``inp``. (An output inside an input folder removes nothing:
    a new folder there is allowed, an existing one is refused below unless it is our own.)"""
    return out == inp or out in inp.parents


def check_not_an_input(out, inputs: dict[str, object]) -> Path:
    """``inputs``: flag -> path of what the command reads (--model, --data, ...)."""
    out = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        for p in ([path] if isinstance(path, (str, Path)) else list(path)):
            p = Path(p).resolve()
            if _contains(out, p):
                raise OutputError(f"--out {out} is or holds {flag} {p}: writing there would destroy an input. "
                                  f"Choose a new path for --out.")
    return out


def is_own_output(path: Path, command: str) -> bool:
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("command") == command
    except (OSError, ValueError):
        return False


def prepare_output_dir(out, command: str, inputs: dict[str, object], overwrite: bool = False,
                       resume: bool = False) -> Path:
    """Check that ``out`` may receive this command's output folder (see the module doc)."""
    out = check_not_an_input(out, inputs)
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {out} is an existing file; give a folder path that does not exist yet.")
        if any(out.iterdir()):
            if not is_own_output(out, command):
                raise OutputError(f"--out {out} already holds files that `freezeasguard {command}` did not write; "
                                  f"nothing there is touched. Choose a new folder for --out.")
            if not (overwrite or resume):
                raise OutputError(f"--out {out} holds an earlier result of `freezeasguard {command}`; pass "
                                  f"--overwrite to replace it, or choose a new folder.")
    return out


def mark_output(folder: Path, command: str, **info) -> None:
    atomic_write_json(Path(folder) / MARKER, {"command": command, **info})


def partial_dir(out, command: str, create: bool = True) -> Path:
    """The folder an output is written in before it is moved to ``out``: ``out``.partial, removed
    first if a killed run of this command left it (anything else there is refused)."""
    tmp = Path(out).with_name(Path(out).name + ".partial")
    if tmp.exists():
        if not is_own_output(tmp, command):
            raise OutputError(f"{tmp} exists and was not written by freezeasguard; move it away and rerun.")
        shutil.rmtree(tmp)
    if create:
        tmp.mkdir(parents=True)
        mark_output(tmp, command)
    return tmp


def replace_dir(tmp: Path, out: Path) -> Path:
    """Move a finished ``tmp`` folder to ``out``; an ``out`` already there must be this command's
    own output (checked by prepare_output_dir) and is removed only once ``tmp`` is complete."""
    out = Path(out)
    if out.exists():
        old = out.with_name(out.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def prepare_output_file(out, inputs: dict[str, object], overwrite: bool = False, flag: str = "--out") -> Path:
    """A file output (a mask, a report): never an input, never a folder, and an existing file is
    replaced only with ``--overwrite``."""
    path = check_not_an_input(out, inputs)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file path.")
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another path.")
    return path


PROVENANCE = "provenance.json"


def check_provenance(work_dir, record: dict, flag: str = "--work-dir") -> None:
    """A work folder (checkpoints, warm starts) records what it was made from: model fingerprint,
    data hashes, settings. Reusing it for anything else is refused, naming what differs."""
    path = Path(work_dir) / PROVENANCE
    record = json.loads(json.dumps(record))       # as it reads back from JSON (tuples -> lists)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if saved != record:
            saved = saved if isinstance(saved, dict) else {}
            differ = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
            raise OutputError(f"{work_dir} holds checkpoints made from other inputs (they differ in: "
                              f"{', '.join(differ)}). Use another {flag}, or delete {work_dir} to start over.")
        return
    atomic_write_json(path, record)


def write_image_folder(out, images, rows: list[dict], command: str, inputs: dict | None = None,
                       overwrite: bool = False, extra=None) -> Path:
    """The one writer of image folders: each image saved as its row's ``file_name``, the rows as
    metadata.jsonl, then ``extra(folder)`` (a grid, an index), all in a temporary folder that is
    moved into place when complete (so a stale image of an earlier run never survives)."""
    out = prepare_output_dir(out, command, inputs or {}, overwrite)
    tmp = partial_dir(out, command)
    for img, row in zip(images, rows, strict=True):
        img.save(tmp / row["file_name"])
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if extra is not None:
        extra(tmp)
    return replace_dir(tmp, out)
