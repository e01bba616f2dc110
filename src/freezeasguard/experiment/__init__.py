"""Experiments: the runner (methods x ratios x subjects x seeds, resumable), its config and
presets, the worlds it runs in (the built-in synthetic one, folders of real data) and the reports."""
from freezeasguard.experiment.config import DEMO, EXPERIMENT_PRESETS, ExperimentConfig  # noqa: F401
from freezeasguard.experiment.runner import Runner  # noqa: F401
