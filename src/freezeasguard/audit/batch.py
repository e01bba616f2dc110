"""A hub's audit: every upload in a folder against one mask, a verdict each, one report.

`freezeasguard verify --mask M --candidates DIR [--model BASE] --report R.json` reads every
``.safetensors`` file and every model folder in DIR (checkpoints and adapters mixed; a file is an
adapter when its keys are LoRA/LyCORIS keys), and writes R.json and R.csv: per upload its format,
verdict, the frozen tensors it changes (with the largest change, when the base is at hand), bytes
read and seconds. One bad upload never stops the batch: it is reported as unreadable. Exit 0 only
when every upload is compliant, 1 when any violates, 2 when any is unreadable or uncertified
(and none violates).
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from freezeasguard.io import atomic_write_json, atomic_write_text
from freezeasguard.audit.original_layouts import LayoutError
from freezeasguard.guard.mask import MaskError
from freezeasguard.models.pipelines import ModelError
from freezeasguard.audit.tensorfile import TensorFile, TensorFileError
from freezeasguard.audit.adapters import AdapterError, audit_adapter_file, split_key
from freezeasguard.audit.verify import Reference, audit_checkpoint, reference

logger = logging.getLogger(__name__)

VERDICTS = ("compliant", "violations", "uncertified", "unreadable")
COLUMNS = ["file", "format", "verdict", "frozen_changed", "largest_change", "first_violation", "quantized", "bytes_read",
           "seconds", "message"]


def uploads(folder) -> list[Path]:
    """The uploads in a folder: its .safetensors and .gguf files and its sub-folders, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--candidates {folder}: not a folder")
    found = sorted(p for p in folder.iterdir() if p.is_dir() or p.suffix in (".safetensors", ".gguf"))
    if not found:
        raise ValueError(f"--candidates {folder}: no .safetensors or .gguf files or model folders in it")
    return found


def is_adapter(path: Path) -> bool:
    """A file whose keys all end as LoRA / LyCORIS keys do (verify.SUFFIXES), some of them a factor
    rather than a scale (read from its header only)."""
    if not path.is_file() or path.suffix == ".gguf":
        return False
    parts = [split_key(k) for k in TensorFile(path).keys()]
    return bool(parts) and all(parts) and any(p[1] != "meta" for p in parts)


def audit_one(path: Path, ref: Reference, mode: str, atol: float) -> dict:
    t0 = time.time()
    row = {"file": path.name, "format": "", "verdict": "unreadable", "frozen_changed": 0, "largest_change": None,
           "first_violation": "", "quantized": "", "bytes_read": 0, "message": ""}
    try:
        if is_adapter(path):
            report = audit_adapter_file(ref, path)
            row.update(format="adapter", frozen_changed=len(report.frozen_changed),
                       first_violation=report.frozen_changed[0] if report.frozen_changed else "",
                       bytes_read=TensorFile(path).header_bytes)
            row["verdict"] = ("violations" if report.frozen_changed else
                              "uncertified" if report.unknown else "compliant")
            if report.unknown:
                row["message"] = f"{len(report.unknown)} keys of no known pattern (first: {report.unknown[0]})"
        else:
            report = audit_checkpoint(ref, path, mode, atol)
            diffs = [v.max_abs_diff for v in report.violations if v.max_abs_diff is not None]
            row.update(verdict="compliant" if report.compliant else "violations",
                       frozen_changed=len(report.violations), largest_change=max(diffs) if diffs else None,
                       first_violation=(f"{report.violations[0].name}: {report.violations[0].reason}"
                                        if report.violations else ""), bytes_read=report.bytes_read,
                       format=report.layout + (" (gguf)" if path.suffix == ".gguf" else ""),
                       quantized=quantized_summary(report.quantized))
    except (ModelError, LayoutError, TensorFileError, AdapterError, MaskError, OSError, ValueError) as exc:
        row["message"] = str(exc)
    row["seconds"] = round(time.time() - t0, 3)
    return row


def quantized_summary(quantized: dict) -> str:
    """Per GGUF type in an upload: how many tensors, the rule, and for a bound the largest bound and
    the largest difference found ("Q4_K: 38 tensors within bound <= 0.0123 (largest difference 0.0041)")."""
    by_type: dict[str, list[dict]] = {}
    for entry in quantized.values():
        by_type.setdefault(entry["type"], []).append(entry)
    parts = []
    for kind, entries in sorted(by_type.items()):
        bounds = [e["bound"] for e in entries if e.get("rule") == "bound"]
        if bounds:
            diffs = [e["max_abs_diff"] for e in entries if e.get("rule") == "bound"]
            parts.append(f"{kind}: {len(entries)} tensors within bound <= {max(bounds):.3g} (largest difference "
                         f"{max(diffs):.3g})")
        else:
            parts.append(f"{kind}: {len(entries)} tensors compared exactly")
    return "; ".join(parts)


def audit_folder(folder, mask_path, model_dir=None, mode: str = "exact", atol: float = 0.0,
                 report_path=None) -> list[dict]:
    """Every upload in ``folder`` audited; the report written to ``report_path`` (.json, and .csv beside it)."""
    ref = reference(model_dir, mask_path)         # the mask, and the base's fingerprint, read once for the batch
    rows = [audit_one(p, ref, mode, atol) for p in tqdm(uploads(folder), desc="audit", unit="file")]
    if report_path:
        report_path = Path(report_path)
        atomic_write_json(report_path, {"mask": str(mask_path), "base": str(model_dir) if model_dir else None,
                                        "mode": mode, "uploads": rows, "counts": counts(rows)})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(report_path.with_suffix(".csv"), buf.getvalue())
    return rows


def counts(rows: list[dict]) -> dict[str, int]:
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def exit_code(rows: list[dict]) -> int:
    """0 every upload compliant; 1 any violates; 2 any unreadable or uncertified (none violating)."""
    c = counts(rows)
    if c["violations"]:
        return 1
    return 2 if c["unreadable"] or c["uncertified"] else 0
