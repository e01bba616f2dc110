"""The publisher's fine-tuning service (``freezeasguard serve``): where the mask is enforced.

The paper's threat model rests on the publisher running the fine-tuning: users upload data, the
service fine-tunes under the mask (full or LoRA) and releases only results that pass ``verify``.
Embedded default: SQLite state and one in-process worker thread, on the shipped tiny model and
its learned mask. Rooms: settings.py (limits, one dataclass), store.py (SQLite: tenants,
datasets, jobs), uploads.py (safe archive intake), jobs.py (the worker), api.py (HTTP).
"""
