"""Shared fixtures: a tiny SD pipeline with the SD v1.5 UNet layout (686 tensors) and small
procedurally drawn datasets, built once per test session in a temp folder (no downloads)."""
import logging
import os
import warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker (pyproject's -n auto runs a worker per core), and for the processes
    # a test starts: oversubscribed cores run torch's small ops many times slower
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("freezeasguard").setLevel(logging.WARNING)

PERSON = {"skin": (200, 150, 110), "hair": (240, 130, 30), "eyes": (30, 30, 120), "mark": "glasses"}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from freezeasguard.models.families.tiny import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", layout="sd15", image_size=16,
                              seed=0, extra_words=["mara", "quell"])


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    from freezeasguard.models.families.tiny import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", layout="mini", image_size=16,
                              seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def people(tmp_path_factory):
    from freezeasguard.toydata import make_people
    return make_people(tmp_path_factory.mktemp("data") / "mara", "Mara Quell", 8, 16, 0, traits=PERSON)


@pytest.fixture(scope="session")
def logos(tmp_path_factory):
    from freezeasguard.toydata import make_logos
    return make_logos(tmp_path_factory.mktemp("data") / "logos", 8, 16, 1)


@pytest.fixture(scope="session")
def warm_start(tiny_sd, people, logos, tmp_path_factory):
    """A short full fine-tune of the tiny model on both domains: theta_ft for mask-learning tests."""
    from freezeasguard import FinetuneConfig, guarded_finetune
    out = tmp_path_factory.mktemp("ws") / "ft"
    guarded_finetune(tiny_sd, people, out, FinetuneConfig(steps=3, batch_size=4, lr=1e-3, device="cpu",
                                                          checkpoint_every=0), full=True)
    return out


@pytest.fixture
def kill_mask_learning_at(monkeypatch):
    """``kill_mask_learning_at(n)``: learn's n-th mask update raises KeyboardInterrupt, as a killed run
    would stop; returns the counter of calls (updates run, also by a later resumed run)."""
    import freezeasguard.guard.learn as learn

    def arm(n: int) -> dict:
        real, calls = learn.mask_update, {"n": 0}

        def dies(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt("simulated kill")
            return real(*a, **k)
        monkeypatch.setattr(learn, "mask_update", dies)
        return calls
    return arm


@pytest.fixture
def run_cli():
    """Run the freezeasguard command in fresh processes, one thread each; ``processes`` > 1 runs it
    under accelerate launch (CPU, gloo), as a user runs data-parallel or sharded work. Asserts its
    exit code (``code``, 0 unless told) and returns its stderr (the log)."""
    import os
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        # accelerate's default rendezvous port (29500) is shared: two such runs at once (pytest -n 2)
        # collided on it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def run(args: list[str], processes: int = 1, code: int = 0) -> str:
        launcher = [sys.executable, "-m", "freezeasguard.cli"] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port()), "-m", "freezeasguard.cli"]
        done = subprocess.run(launcher + args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == code, done.stderr[-3000:]
        return done.stderr
    return run
