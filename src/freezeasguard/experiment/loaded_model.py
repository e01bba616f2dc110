"""The one pipeline an experiment keeps loaded: the model it is evaluating. Its named and unnamed
portraits, each subject's prompts and the held-out loss all read the same folder (a third of the
quick demo's time was reloading it)."""
from __future__ import annotations

from pathlib import Path

from freezeasguard.models.generate import load_pipeline


def model_key(model_dir) -> tuple:
    """What identifies a model folder's weights on disk: its path and each weight file's size and
    modification time (a fine-tune replaces its folder whole, so a new model gets a new key)."""
    folder = Path(model_dir).resolve()
    return (str(folder),) + tuple(sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                                         for f in folder.rglob("*.safetensors")))


class LoadedModel:
    """At most one pipeline, keyed by ``model_key``: a folder replaced by a new fine-tune is loaded
    again; ``drop()`` frees it before a fine-tune needs the memory."""

    def __init__(self):
        self._loaded: tuple[tuple, object] | None = None

    def get(self, model_dir):
        key = model_key(model_dir)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None      # the previous model's memory goes before the next loads
            self._loaded = (key, load_pipeline(model_dir))
        return self._loaded[1]

    def drop(self):
        self._loaded = None
