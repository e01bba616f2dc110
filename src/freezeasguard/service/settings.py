"""The service's settings: the publisher's limits, defined once (CLI flags are generated)."""
from __future__ import annotations

from dataclasses import dataclass

from freezeasguard.settings import setting


@dataclass
class ServiceConfig:
    root: str = setting("freezeasguard-service", "folder for the database, datasets and job outputs (created)")
    model: str | None = setting(None, "the base pipeline users fine-tune; none: the shipped tiny model")
    mask: str | None = setting(None, "the mask every job runs under; none: the shipped tiny model's learned mask")
    max_steps: int = setting(2000, "most steps a job may ask for")
    max_batch: int = setting(16, "largest batch a job may ask for")
    max_lr: float = setting(1e-3, "largest learning rate a job may ask for")
    max_lora_rank: int = setting(128, "largest LoRA rank a job may ask for")
    max_upload_mb: float = setting(200.0, "largest upload (compressed), MB")
    max_unpacked_mb: float = setting(1000.0, "most bytes an upload may unpack to, MB (decompression bombs)")
    max_files: int = setting(20000, "most files in an upload")
    max_image_pixels: int = setting(4096 * 4096, "largest image (width x height) in an upload")
    max_active_jobs: int = setting(2, "queued + running jobs per tenant")
    max_storage_mb: float = setting(2000.0, "datasets and results per tenant, MB")
    checkpoint_every: int = setting(25, "steps between a job's resumable checkpoints")
    queue: str | None = setting(None, "redis://host:port/db: jobs go to this Redis queue (RQ) for `freezeasguard "
                                      "worker` processes, on this or other machines sharing --root; none: one "
                                      "worker thread in the server")
    reconcile_every: float = setting(20.0, "with --queue: seconds between checks that Redis still holds every "
                                           "queued and running job (one it lost, e.g. restarted without "
                                           "persistence, is queued again, never twice)")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
