"""The worker: runs queued jobs one at a time, in a thread of the server (the embedded default).

A job is a guarded fine-tune (full or LoRA) of the publisher's model under the publisher's mask,
with resumable checkpoints in the job's folder; its progress and recent losses go to the store
as it runs. When it finishes, the output is verified against the mask, and the hashes of its
files are recorded: a result is released only if it passed and its files still hash the same.
A killed server leaves its running job "running"; the next start puts it back in the queue and
it resumes from its last checkpoint (bit-exact on CPU, as ``finetune --resume``)."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from freezeasguard.training.finetune import FinetuneConfig, guarded_finetune
from freezeasguard.training.lora import LoraSettings
from freezeasguard.guard.mask import Mask
from freezeasguard.audit.adapters import verify_adapter
from freezeasguard.audit.verify import verify_checkpoint
from freezeasguard.service.store import Store

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    pass


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def verify_output(model, mask_path, out: Path) -> dict:
    """The verify report of a job's output (a LoRA folder's adapter, or a pipeline's denoiser)."""
    lora_file = out / "pytorch_lora_weights.safetensors"
    if lora_file.exists():
        report = verify_adapter(model, mask_path, lora_file)
        return {"kind": "lora", "compliant": report.compliant, **report.to_dict()}
    report = verify_checkpoint(model, mask_path, out)
    return {"kind": "full", **report.to_dict()}


def run_job(store: Store, job: dict, model, mask_path, root: Path, checkpoint_every: int) -> None:
    req = job["request"]
    out = root / "jobs" / job["id"] / "out"
    dataset = store.dataset(job["tenant"], job["dataset"])
    cfg = FinetuneConfig(steps=req["steps"], batch_size=req["batch_size"], lr=req["lr"], seed=req.get("seed", 0),
                         device="auto", checkpoint_every=checkpoint_every)    # a worker's GPU if it has one
    lora = LoraSettings(rank=req["lora_rank"]) if req.get("lora_rank") else None
    losses: list[float] = []

    def on_step(step, total, record):
        losses.append(record["loss_data"])
        if store.job(job["id"])["state"] == "cancelled":
            raise Cancelled()
        store.update_job(job["id"], step=step, losses=losses[-50:])

    store.update_job(job["id"], state="running")
    try:
        guarded_finetune(model, dataset["path"], out, cfg, mask=Mask.load(mask_path), lora=lora, resume=True,
                         on_step=on_step)
        report = verify_output(model, mask_path, out)
        if not report["compliant"]:
            store.update_job(job["id"], state="failed", error="the result failed verification against the mask; "
                                                             "it is not released", result={"verify": report})
            return
        store.update_job(job["id"], state="done", step=req["steps"],
                         result={"verify": report, "hashes": file_hashes(out), "path": str(out)})
    except Cancelled:
        logger.info("job %s cancelled", job["id"])
    except Exception as exc:       # a job's failure is the job's, never the server's
        logger.exception("job %s failed", job["id"])
        store.update_job(job["id"], state="failed", error=f"{exc.__class__.__name__}: {exc}")


QUEUE_NAME = "freezeasguard"
SETTINGS_FILE = "service.json"     # what a worker process needs to know of the server that queued the job


def redis_queue(url: str):
    """The RQ queue, its payloads serialised as JSON (job ids only; nothing is unpickled)."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer
    return Queue(QUEUE_NAME, connection=Redis.from_url(url), serializer=JSONSerializer)


def rq_job_id(job_id: str) -> str:
    """The job's id in Redis, fixed by the service's id: a job is in the queue at most once."""
    return f"freezeasguard-{job_id}"


def enqueue(queue, root: Path, job_id: str) -> bool:
    """Put the job in the Redis queue unless Redis already holds it (checked and written in one
    atomic step by RQ's unique enqueue); True when it was put there now."""
    from rq.exceptions import DuplicateJobError

    try:
        queue.enqueue_call(run_queued_job, args=(str(root), job_id), timeout=-1, job_id=rq_job_id(job_id), unique=True)
    except DuplicateJobError:
        return False
    return True


def reconcile(store: Store, queue, root: Path) -> list[str]:
    """Queued and running jobs of the service's database that Redis no longer holds (it restarted
    without persistence, a failover reached an empty replica) go to the queue again; each at most
    once, since Redis refuses a second job of the same id. Returns the ids put back."""
    back = [job["id"] for job in store.active() if enqueue(queue, root, job["id"])]
    if back:
        logger.warning("Redis had lost %d queued or running job(s); put back in the queue: %s", len(back),
                       ", ".join(back))
    return back


class Reconciler(threading.Thread):
    """Runs reconcile() every ``period`` seconds while the server runs."""

    def __init__(self, store: Store, queue, root: Path, period: float):
        super().__init__(daemon=True, name="freezeasguard-reconciler")
        self.store, self.queue, self.root, self.period = store, queue, Path(root), period
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.period):
            try:
                reconcile(self.store, self.queue, self.root)
            except Exception as exc:      # Redis down for a while: say so and try again next period
                logger.warning("could not reconcile the queue with Redis (%s); trying again in %gs", exc, self.period)

    def stop(self):
        self.stopping.set()


def run_queued_job(root: str, job_id: str) -> str:
    """What an RQ worker runs: the job by id, with the model, mask and checkpointing the server
    recorded in ROOT/service.json. A job cancelled while queued is skipped."""
    root_path = Path(root)
    conf = json.loads((root_path / SETTINGS_FILE).read_text())
    store = Store(root_path / "service.db")
    job = store.job(job_id)
    if job is None or job["state"] not in ("queued", "running"):
        return job["state"] if job else "missing"
    run_job(store, job, conf["model"], conf["mask"], root_path, conf["checkpoint_every"])
    return store.job(job_id)["state"]


class Worker(threading.Thread):
    """Takes queued jobs in order until stopped."""

    def __init__(self, store: Store, model, mask_path, root: Path, checkpoint_every: int, poll: float = 0.2):
        super().__init__(daemon=True, name="freezeasguard-worker")
        self.store, self.model, self.mask_path, self.root = store, model, mask_path, Path(root)
        self.checkpoint_every, self.poll = checkpoint_every, poll
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            job = self.store.next_queued()
            if job is None:
                self.stopping.wait(self.poll)
                continue
            run_job(self.store, job, self.model, self.mask_path, self.root, self.checkpoint_every)

    def stop(self):
        self.stopping.set()
