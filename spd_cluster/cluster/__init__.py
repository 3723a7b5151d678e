"""The Ray layer: device actors, pairs, the shard coordinator, reduction of metrics.

`run_job(cfg)` is the entry point (`spd-cluster run`, `jobs/spd_batch.py`). Importing this
package imports nothing heavy (PEP 562: names resolve on first use); the coordinator imports
Ray when a job starts.
"""

from importlib import import_module

_EXPORTS = {"JobError": "coordinator", "JobResult": "coordinator", "run_job": "coordinator"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
