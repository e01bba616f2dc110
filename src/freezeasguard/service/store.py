"""The service's state in SQLite: tenants (API keys stored as SHA-256), datasets and jobs, each
owned by one tenant. Every call opens its own connection (the API and the worker thread share
the file; SQLite serialises writers)."""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, key_hash TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (id TEXT PRIMARY KEY, tenant INTEGER NOT NULL, path TEXT NOT NULL,
    images INTEGER NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, tenant INTEGER NOT NULL, dataset TEXT NOT NULL,
    request TEXT NOT NULL, state TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, steps INTEGER NOT NULL,
    losses TEXT NOT NULL DEFAULT '[]', error TEXT, result TEXT, created REAL NOT NULL, updated REAL NOT NULL);
"""
ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def connect(self):
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            yield db
            db.commit()
        finally:
            db.close()

    # tenants
    def add_tenant(self, name: str) -> str:
        """A new tenant; returns its API key (shown once, stored only as a hash)."""
        key = "fag_" + secrets.token_urlsafe(24)
        with self.connect() as db:
            try:
                db.execute("INSERT INTO tenants (name, key_hash) VALUES (?, ?)", (name, key_hash(key)))
            except sqlite3.IntegrityError:
                raise ValueError(f"tenant {name!r} exists already") from None
        return key

    def tenant_for_key(self, key: str) -> int | None:
        with self.connect() as db:
            row = db.execute("SELECT id FROM tenants WHERE key_hash = ?", (key_hash(key),)).fetchone()
        return row["id"] if row else None

    # datasets
    def add_dataset(self, tenant: int, dataset_id: str, path: str, images: int, size: int):
        with self.connect() as db:
            db.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?)", (dataset_id, tenant, path, images, size,
                                                                        time.time()))

    def dataset(self, tenant: int, dataset_id: str) -> dict | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM datasets WHERE id = ? AND tenant = ?", (dataset_id, tenant)).fetchone()
        return dict(row) if row else None

    def datasets(self, tenant: int) -> list[dict]:
        """The tenant's datasets, newest first."""
        with self.connect() as db:
            rows = db.execute("SELECT * FROM datasets WHERE tenant = ? ORDER BY created DESC", (tenant,)).fetchall()
        return [dict(r) for r in rows]

    def storage_bytes(self, tenant: int) -> int:
        with self.connect() as db:
            return int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM datasets WHERE tenant = ?",
                                  (tenant,)).fetchone()[0])

    # jobs
    def add_job(self, tenant: int, job_id: str, dataset: str, request: dict):
        now = time.time()
        with self.connect() as db:
            db.execute("INSERT INTO jobs (id, tenant, dataset, request, state, steps, created, updated) "
                       "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                       (job_id, tenant, dataset, json.dumps(request), request["steps"], now, now))

    def job(self, job_id: str, tenant: int | None = None) -> dict | None:
        with self.connect() as db:
            if tenant is None:
                row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            else:
                row = db.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return _job(row) if row else None

    def jobs(self, tenant: int) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE tenant = ? ORDER BY created", (tenant,)).fetchall()
        return [_job(r) for r in rows]

    def active_jobs(self, tenant: int) -> int:
        with self.connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN ('queued', 'running')",
                                  (tenant,)).fetchone()[0])

    def queued(self) -> list[dict]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created").fetchall()
        return [_job(r) for r in rows]

    def active(self) -> list[dict]:
        """Queued and running jobs, oldest first."""
        with self.connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created").fetchall()
        return [_job(r) for r in rows]

    def next_queued(self) -> dict | None:
        with self.connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
        return _job(row) if row else None

    def update_job(self, job_id: str, **fields):
        fields["updated"] = time.time()
        if "losses" in fields:
            fields["losses"] = json.dumps(fields["losses"])
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def requeue_interrupted(self) -> int:
        """Jobs a killed server left running go back to the queue (they resume from their checkpoint)."""
        with self.connect() as db:
            return db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount


def _job(row) -> dict:
    job = dict(row)
    job["request"] = json.loads(job["request"])
    job["losses"] = json.loads(job["losses"])
    job["result"] = json.loads(job["result"]) if job["result"] else None
    return job
