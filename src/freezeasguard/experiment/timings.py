"""Where an experiment's time went: timings.json from the stages' done-markers and the
protections' markers, which record their seconds."""
from __future__ import annotations

import json
from pathlib import Path

from freezeasguard.io import atomic_write_json


def stage_kind(name: str) -> str:
    """What a stage's name says it did: data, finetune, generate, eval, sanity, prior."""
    return name.split("-", 1)[0]


def write_timings(root: Path) -> dict:
    """Where an experiment's time went (timings.json): seconds per kind of stage and per protection,
    summed over every run of the folder (a resumed run's finished stages keep their first time).
    With several workers the sums exceed the wall time: they are CPU-process seconds."""
    kinds: dict[str, dict] = {}
    stages = []
    for marker in sorted((root / "stages").glob("*.done.json")):
        name, seconds = marker.name.removesuffix(".done.json"), json.loads(marker.read_text()).get("seconds", 0.0)
        entry = kinds.setdefault(stage_kind(name), {"seconds": 0.0, "stages": 0})
        entry["seconds"] += seconds
        entry["stages"] += 1
        stages.append((seconds, name))
    protections = {str(m.parent.relative_to(root / "protect")) + "/" + m.name.removesuffix(".json"):
                   json.loads(m.read_text()).get("seconds") for m in sorted((root / "protect").glob("*/done*.json"))}
    result = {"by_kind": {k: {"seconds": round(v["seconds"], 1), "stages": v["stages"]} for k, v in kinds.items()},
              "protections": protections,
              "slowest_stages": [{"stage": n, "seconds": round(s, 1)} for s, n in sorted(stages, reverse=True)[:15]]}
    atomic_write_json(root / "timings.json", result)
    return result
