"""The runner's jobs in worker processes: one thread each, forked from a server process that only
imported (spawned where there is none), protections first. The Runner class is passed in (runner.py
imports this module, not the other way round)."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from multiprocessing import forkserver
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from freezeasguard.experiment.config import ExperimentConfig
from freezeasguard.experiment.jobs import job_cost

# ---- jobs in worker processes ----------------------------------------------------------------
_WORKER_RUNNER = None        # this worker process's Runner

# What a worker needs before its first job: the runner and the built-in world's pipeline (SD,
# CLIP). Imported once, by the fork server, instead of once per spawned worker: ~9 s of imports on
# a 2-core CPU, a sixth of the quick demo. Another family's pipeline is imported by each worker
# when it first loads one, as before.
WORKER_PRELOAD = ["freezeasguard.experiment.runner",
                  "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
                  "transformers.models.clip.modeling_clip"]


def worker_context():
    """forkserver where the platform has it, else spawn; never a plain fork: a process forked
    after torch ran an OpenMP parallel region can hang in the child. The fork server only imports
    (no tensor work), so its children start from a clean runtime with the imports already done."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def start_worker_server() -> None:
    """Start the fork server now, without waiting for it: its imports run while the caller does
    its first stages (the first worker waits for them when it is forked)."""
    if worker_context().get_start_method() == "forkserver":
        forkserver.ensure_running()


def _init_worker(cfg_dict: dict, runner_cls):
    """A worker's own output (per-step bars, loading bars, log lines) goes to a log file of its
    own, so the terminal shows the run's one bar and not several processes' bars interleaved."""
    global _WORKER_RUNNER
    torch.set_num_threads(1)
    cfg = ExperimentConfig(**cfg_dict)
    log_dir = Path(cfg.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"worker-{os.getpid()}.log", "a", buffering=1)
    os.dup2(log.fileno(), 2)               # also what C extensions and warnings write to fd 2
    sys.stderr = log
    logging.basicConfig(level=logging.INFO, stream=log, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    _WORKER_RUNNER = runner_cls(cfg)


def _worker_job(job) -> list[dict]:
    return _WORKER_RUNNER.run_job(*job)


def _worker_protections(group) -> None:
    for method, ratio in group:
        _WORKER_RUNNER.protection(method, ratio)


def run_jobs_in_processes(cfg: ExperimentConfig, jobs, groups, runner_cls) -> list[dict]:
    """Jobs in ``cfg.workers`` worker processes (worker_context), rows in job order. Protections are tasks too: a job is queued once its protection
    group is made, so Full FT and Random fine-tunes and the untouched model's evaluation run
    while another process learns a mask. Every stage keeps its done-marker, so a killed run
    resumes as usual."""
    group_of = {pair: g for g, group in enumerate(groups) for pair in group}
    waiting: dict[int, list[int]] = {}
    results: dict[int, list[dict]] = {}
    with cf.ProcessPoolExecutor(cfg.workers, mp_context=worker_context(), initializer=_init_worker,
                                initargs=(asdict(cfg), runner_cls)) as pool:
        # protections first: they gate the jobs, and a mask learning is the longest single task
        pending = {pool.submit(_worker_protections, group): ("group", g) for g, group in enumerate(groups)}
        # the longest jobs first, so that no process is left alone with one at the end
        for i, job in sorted(enumerate(jobs), key=lambda ij: -job_cost(ij[1], cfg.attack_recipes)):
            g = group_of.get((job[0], job[1]))
            if g is None:
                pending[pool.submit(_worker_job, job)] = ("job", i)
            else:
                waiting.setdefault(g, []).append(i)
        bar = tqdm(total=len(groups) + len(jobs), desc=f"protections and jobs ({cfg.workers} processes; their "
                                                           f"detail: {Path(cfg.out) / 'logs'})")
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done:
                kind, index = pending.pop(f)
                result = f.result()
                bar.set_postfix_str(("made " + "+".join(m for m, _ in groups[index])) if kind == "group" else
                                    "done " + " ".join(str(x) for x in jobs[index][:5] if x is not None))
                if kind == "group":
                    for i in waiting.pop(index, []):
                        pending[pool.submit(_worker_job, jobs[i])] = ("job", i)
                else:
                    results[index] = result
                bar.update()
        bar.close()
    return [r for i in range(len(jobs)) for r in results[i]]
