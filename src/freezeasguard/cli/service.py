"""The service side of the freezeasguard command: serve, tenant. (cli.py adds these parsers and
dispatches here; the service's modules, and FastAPI, load only when a service command runs.)"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from freezeasguard.service.settings import ServiceConfig
from freezeasguard.settings import add_flags, from_args


def add_parsers(sub):
    p = sub.add_parser("serve", help="the publisher's fine-tuning service (HTTP API; jobs run under the mask)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Users upload datasets and create fine-tuning jobs (full or LoRA) over HTTP; every "
                                   "job runs guarded by the publisher's mask, and only results that pass verify are "
                                   "released. State in SQLite under --root; one worker thread in this process. "
                                   "Without --model/--mask: the shipped tiny model and its learned mask.\n\n"
                                   "API docs: http://HOST:PORT/docs once it runs. Make a tenant's key first:\n"
                                   "  freezeasguard tenant add alice --root freezeasguard-service")
    add_flags(p.add_argument_group("service (each flag is a field of ServiceConfig)"), ServiceConfig)
    p = sub.add_parser("tenant", help="manage the service's tenants (API keys)")
    tsub = p.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    t = tsub.add_parser("add", help="add a tenant and print its API key (stored only as a hash; shown once)")
    t.add_argument("name")
    t.add_argument("--root", default=ServiceConfig().root, help="the service's folder (as serve --root)")


    p = sub.add_parser("worker", help="run the service's queued jobs (with serve --queue redis://...)",
                       description="An RQ worker for the jobs `freezeasguard serve --queue URL` puts in Redis. Run one "
                                   "per GPU (pin it with CUDA_VISIBLE_DEVICES), on any machine that shares --root "
                                   "(the datasets, outputs and state live there).")
    p.add_argument("--root", default=ServiceConfig().root, help="the service's folder (as serve --root)")
    p.add_argument("--queue", required=True, help="the Redis URL serve was given, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty (tests, batch runs)")


def cmd_worker(args) -> int:
    from rq import Worker

    from freezeasguard.service.jobs import redis_queue
    queue = redis_queue(args.queue)
    Worker([queue], connection=queue.connection, serializer=queue.serializer).work(burst=args.burst)
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from freezeasguard.service.api import create_app
    settings = from_args(ServiceConfig, args)
    app = create_app(settings)
    logging.getLogger(__name__).info("serving on http://%s:%d (docs at /docs); %d interrupted jobs requeued",
                                     settings.host, settings.port, app.state.requeued)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def cmd_tenant(args) -> int:
    from freezeasguard.service.store import Store
    key = Store(Path(args.root) / "service.db").add_tenant(args.name)
    print(f"tenant {args.name}: API key {key}\n(send it as 'Authorization: Bearer {key}'; it is not shown again)")
    return 0


COMMANDS = {"serve": cmd_serve, "tenant": cmd_tenant, "worker": cmd_worker}
