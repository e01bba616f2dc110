"""The HTTP API (FastAPI; OpenAPI docs at /docs). Every call carries ``Authorization: Bearer
<key>``; every dataset and job belongs to the tenant whose key made it, and another tenant's ids
answer 404, as unknown ones do.

    POST /datasets               upload a zip/tar of an image folder with metadata.jsonl/csv (file=...),
                                 or the images and the metadata file themselves (files=..., repeated)
    GET  /datasets, GET /datasets/{id}   the tenant's datasets (newest first) with image counts and sizes
    POST /jobs                   {"dataset", "steps", "batch_size", "lr", "lora_rank", "seed"}
    GET  /jobs, GET /jobs/{id}   kind, mask, state, progress, recent losses, verdict and verify report, links
    GET  /jobs/{id}/events       server-sent events: the job as JSON until it ends
    POST /jobs/{id}/cancel
    GET  /jobs/{id}/result       a zip of the verified output (weights or LoRA, manifest, verify report)
    GET  /jobs/{id}/samples?prompt=...   a PNG grid of 4 samples from a finished job's model
    POST /audit                  .safetensors / .gguf checkpoints or adapters (files=..., repeated): a verdict each
                                 against the service's mask (the hub's batch audit, verify --candidates)
    GET  /audits/{id}/report.csv the audit's report as CSV
    GET  /                       the web page: datasets, jobs with progress and verdicts, the audit box
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import secrets
import shutil
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, File, Header, HTTPException, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from freezeasguard.audit.batch import audit_folder, counts
from freezeasguard.models.generate import generate_images, grid_image, load_pipeline
from freezeasguard.io import atomic_write_json
from freezeasguard.guard.mask import Mask
from freezeasguard.models.pipelines import fingerprint, load_denoiser_state
from freezeasguard.synthetic import TINY_SD
from freezeasguard.service.jobs import (SETTINGS_FILE, Reconciler, Worker, enqueue, file_hashes, reconcile, redis_queue,
                                        verify_output)
from freezeasguard.service.settings import ServiceConfig
from freezeasguard.service.store import ACTIVE, TERMINAL, Store
from freezeasguard.service.uploads import UploadError, check_dataset, dataset_root, unpack, write_loose

SHIPPED_MASK = Path(TINY_SD).parent / "tiny-sd-mask.safetensors"


class JobRequest(BaseModel):
    dataset: str
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    lora_rank: int = Field(0, ge=0, description="0: full fine-tuning of what the mask leaves trainable")
    seed: int = 0


def _public(job: dict, mask: str = "") -> dict:
    result = job["result"] or {}
    report = result.get("verify")
    rank = job["request"].get("lora_rank", 0)
    done = job["state"] == "done"
    return {"id": job["id"], "dataset": job["dataset"], "kind": f"LoRA rank {rank}" if rank else "full",
            "mask": mask, "state": job["state"], "step": job["step"], "steps": job["steps"],
            "progress": job["step"] / job["steps"], "recent_losses": job["losses"], "error": job["error"],
            "request": job["request"], "verify": report,
            "verdict": None if report is None else "compliant" if report.get("compliant") else "violations",
            "links": {"result": f"/jobs/{job['id']}/result", "samples": f"/jobs/{job['id']}/samples"} if done else {}}


@dataclass
class Service:
    """What every route needs: the settings, the state store, the model and its mask, the queue."""
    settings: ServiceConfig
    root: Path
    model: Path
    mask_path: Path
    store: Store
    queue: object | None
    mask_label: str = ""        # the mask's file name and the start of its digest, shown beside every job

    def tenant(self, authorization: str | None = Header(None)) -> int:
        """The tenant whose API key the call carries (a FastAPI dependency)."""
        key = (authorization or "").removeprefix("Bearer ").strip()
        found = self.store.tenant_for_key(key) if key else None
        if found is None:
            raise HTTPException(401, "missing or unknown API key (Authorization: Bearer <key>)")
        return found

    def own_job(self, job_id: str, who: int) -> dict:
        job = self.store.job(job_id, who)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def enqueue(self, job_id: str):
        if self.queue is not None:
            enqueue(self.queue, self.root, job_id)


def create_app(settings: ServiceConfig | None = None, start_worker: bool = True) -> FastAPI:
    """setup (the mask checked against the model, the store, jobs a killed server left), then one
    router per resource: datasets, jobs, results, the page."""
    s = settings or ServiceConfig()
    root = Path(s.root)
    model = Path(s.model) if s.model else TINY_SD
    mask_path = Path(s.mask) if s.mask else SHIPPED_MASK
    # the mask must belong to the model before anything is accepted
    Mask.load(mask_path).check_matches(list(load_denoiser_state(model).items()),
                                       fingerprint(load_denoiser_state(model).items()), what=str(model),
                                       state_dict=True)
    store = Store(root / "service.db")
    atomic_write_json(root / SETTINGS_FILE, {"model": str(model), "mask": str(mask_path),
                                             "checkpoint_every": s.checkpoint_every})
    svc = Service(s, root, model, mask_path, store, redis_queue(s.queue) if s.queue else None,
                  f"{mask_path.name} ({hashlib.blake2b(mask_path.read_bytes(), digest_size=6).hexdigest()})")
    requeued = store.requeue_interrupted()
    if svc.queue is not None:       # the jobs a killed server left running go to the workers again
        reconcile(store, svc.queue, root)
    worker = Worker(store, model, mask_path, root, s.checkpoint_every)
    reconciler = Reconciler(store, svc.queue, root, s.reconcile_every) if svc.queue is not None else None

    @asynccontextmanager
    async def lifespan(app):
        if start_worker and svc.queue is None:
            worker.start()
        if reconciler is not None:
            reconciler.start()
        yield
        worker.stop()
        if reconciler is not None:
            reconciler.stop()

    app = FastAPI(title="freezeasguard fine-tuning service", lifespan=lifespan,
                  description="Guarded fine-tuning of the publisher's model under its mask; only results that "
                              "pass verification are released.")
    app.state.store, app.state.worker, app.state.settings, app.state.requeued = store, worker, s, requeued
    for router in (datasets_router(svc), jobs_router(svc), results_router(svc), audit_router(svc), page_router()):
        app.include_router(router)
    return app


def datasets_router(svc: Service) -> APIRouter:
    router, s = APIRouter(), svc.settings

    @router.post("/datasets", status_code=201)
    async def upload(file: UploadFile | None = File(None), files: list[UploadFile] | None = File(None),
                     who: int = Depends(svc.tenant)):
        """One archive (``file``), or loose ``files``: the images and a metadata.jsonl/.csv naming them."""
        limit = int(s.max_upload_mb * 2**20)
        if (file is None) == (not files):
            raise HTTPException(400, "send one archive as 'file', or the images and metadata.jsonl as 'files'")
        parts = {}
        for part in ([file] if file is not None else files):
            parts[part.filename] = await part.read(limit + 1)
            if sum(len(d) for d in parts.values()) > limit:
                raise HTTPException(413, f"the upload is larger than {s.max_upload_mb:g} MB")
        dataset_id = "ds_" + secrets.token_hex(8)
        folder = svc.root / "datasets" / dataset_id
        try:
            if file is not None:
                size = unpack(parts[file.filename], folder, int(s.max_unpacked_mb * 2**20), s.max_files)
            else:
                size = write_loose(parts, folder, s.max_files)
            if svc.store.storage_bytes(who) + size > s.max_storage_mb * 2**20:
                raise UploadError(f"this upload would take the tenant past its {s.max_storage_mb:g} MB", 413)
            images = check_dataset(folder, s.max_image_pixels)
        except UploadError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(exc.status, str(exc)) from None
        svc.store.add_dataset(who, dataset_id, str(dataset_root(folder)), images, size)
        return {"id": dataset_id, "images": images, "bytes": size}

    @router.get("/datasets")
    def list_datasets(who: int = Depends(svc.tenant)):
        return [{"id": d["id"], "images": d["images"], "bytes": d["bytes"], "created": d["created"]}
                for d in svc.store.datasets(who)]

    @router.get("/datasets/{dataset_id}")
    def get_dataset(dataset_id: str, who: int = Depends(svc.tenant)):
        found = svc.store.dataset(who, dataset_id)
        if found is None:
            raise HTTPException(404, f"no dataset {dataset_id}")
        return {"id": found["id"], "images": found["images"], "bytes": found["bytes"]}

    return router


def jobs_router(svc: Service) -> APIRouter:
    router, s, store = APIRouter(), svc.settings, svc.store

    @router.post("/jobs", status_code=201)
    def create_job(req: JobRequest, who: int = Depends(svc.tenant)):
        if store.dataset(who, req.dataset) is None:
            raise HTTPException(404, f"no dataset {req.dataset}")
        limits = [("steps", req.steps, s.max_steps), ("batch_size", req.batch_size, s.max_batch),
                  ("lr", req.lr, s.max_lr), ("lora_rank", req.lora_rank, s.max_lora_rank)]
        over = [f"{name} {value:g} > {limit:g}" for name, value, limit in limits if value > limit]
        if over:
            raise HTTPException(422, "over the publisher's limits: " + ", ".join(over))
        if store.active_jobs(who) >= s.max_active_jobs:
            raise HTTPException(429, f"{s.max_active_jobs} jobs already queued or running; wait for one to end")
        job_id = "job_" + secrets.token_hex(8)
        store.add_job(who, job_id, req.dataset, req.model_dump())
        svc.enqueue(job_id)
        return _public(store.job(job_id), svc.mask_label)

    @router.get("/jobs")
    def list_jobs(who: int = Depends(svc.tenant)):
        return [_public(j, svc.mask_label) for j in store.jobs(who)]

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str, who: int = Depends(svc.tenant)):
        return _public(svc.own_job(job_id, who), svc.mask_label)

    @router.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str, who: int = Depends(svc.tenant)):
        job = svc.own_job(job_id, who)
        if job["state"] in ACTIVE:
            store.update_job(job_id, state="cancelled")
        return _public(store.job(job_id), svc.mask_label)

    @router.get("/jobs/{job_id}/events")
    async def events(job_id: str, who: int = Depends(svc.tenant)):
        svc.own_job(job_id, who)

        async def stream():
            last = None
            while True:
                job = _public(store.job(job_id), svc.mask_label)
                if job != last:
                    yield f"data: {json.dumps(job)}\n\n"
                    last = job
                if job["state"] in TERMINAL:
                    return
                await asyncio.sleep(0.3)
        return StreamingResponse(stream(), media_type="text/event-stream")

    return router


def results_router(svc: Service) -> APIRouter:
    router = APIRouter()

    @router.get("/jobs/{job_id}/result")
    def result(job_id: str, who: int = Depends(svc.tenant)):
        job = svc.own_job(job_id, who)
        if job["state"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['state']}; only a finished, verified result is released")
        out = Path(job["result"]["path"])
        # released only as verified: the files must still be the ones that passed, and pass again
        if file_hashes(out) != job["result"]["hashes"]:
            raise HTTPException(409, "the result changed on disk since it was verified; it is not released")
        report = verify_output(svc.model, svc.mask_path, out)
        if not report["compliant"]:
            raise HTTPException(409, "the result no longer passes verification; it is not released")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(out.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(out))
            z.writestr("verify_report.json", json.dumps(report, indent=2))
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})

    @router.get("/jobs/{job_id}/samples")
    def samples(job_id: str, prompt: str = "a photo of a person", who: int = Depends(svc.tenant)):
        job = svc.own_job(job_id, who)
        if job["state"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['state']}; samples come from a finished job")
        images = generate_images(load_pipeline(job["result"]["path"]), [prompt[:300]], steps=20, seed=0,
                                 guidance=3.0, per_prompt=4)
        buf = io.BytesIO()
        grid_image(images).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    return router


SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def audit_router(svc: Service) -> APIRouter:
    """The hub's audit on the page: uploads checked against the service's mask and model, as
    `verify --candidates` checks a folder. The uploads are deleted once audited; the report stays."""
    router, s = APIRouter(), svc.settings

    def folder(who: int, audit_id: str) -> Path:
        return svc.root / "audits" / f"tenant-{who}" / audit_id

    @router.post("/audit")
    def audit(files: list[UploadFile] | None = File(None), who: int = Depends(svc.tenant)):
        if not files:
            raise HTTPException(400, "send one or more .safetensors or .gguf checkpoints or adapters as 'files'")
        names = [SAFE_NAME.sub("_", Path(f.filename or "").name) for f in files]
        wrong = [f.filename for f, n in zip(files, names) if not n.endswith((".safetensors", ".gguf"))]
        if wrong:
            raise HTTPException(400, f"{wrong[0]}: not a .safetensors or .gguf file; the audit reads safetensors "
                                     f"checkpoints and adapters and GGUF files only (never pickles)")
        if len(set(names)) < len(names):
            raise HTTPException(400, "two uploads have the same file name; rename one")
        limit = int(s.max_upload_mb * 2**20)
        audit_id = "audit_" + secrets.token_hex(8)
        where = folder(who, audit_id)
        where.mkdir(parents=True)
        total = 0
        try:
            for f, name in zip(files, names):
                data = f.file.read(limit + 1 - total)
                total += len(data)
                if total > limit:
                    raise HTTPException(413, f"the uploads are larger than {s.max_upload_mb:g} MB together")
                (where / name).write_bytes(data)
            rows = audit_folder(where, svc.mask_path, svc.model, report_path=where / "report.json")
        except HTTPException:
            shutil.rmtree(where, ignore_errors=True)
            raise
        finally:
            for name in names:                  # the uploads are not kept, only what was found
                (where / name).unlink(missing_ok=True)
        return {"id": audit_id, "uploads": rows, "counts": counts(rows), "csv": f"/audits/{audit_id}/report.csv"}

    @router.get("/audits/{audit_id}/report.csv")
    def report_csv(audit_id: str, who: int = Depends(svc.tenant)):
        path = folder(who, SAFE_NAME.sub("_", audit_id)) / "report.csv"
        if not path.is_file():
            raise HTTPException(404, f"no audit {audit_id}")
        return Response(path.read_text(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{audit_id}.csv"'})

    return router


def page_router() -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page():
        return FileResponse(Path(__file__).parent / "static" / "index.html")

    return router
