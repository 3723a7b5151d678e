"""The Ray layer: device actors, pairs, the shard coordinator, reduction of metrics.

`run_job(cfg)` is the entry point (`spd-cluster run`, `jobs/spd_batch.py`). Importing this
package does not import Ray; the coordinator does when a job starts.
"""

from .coordinator import JobError, JobResult, run_job

__all__ = ["JobError", "JobResult", "run_job"]
