"""The suffix mode's job-wide index across pairs: one ``SuffixCache`` actor a job.

Each target actor keeps its own copy of the job-wide index (engine/suffix.py: SuffixProposer.job,
looked up every step, in process). The cache actor only carries finished rows between pairs,
batched: a pair sends the rows its engine finished when a shard ends (``push``) and takes the
rows the other pairs sent since its last look when a shard starts (``pull``). A row travels as
token ids ([prompt tail length, *prompt tail, *output]), never as text, once a shard per pair.

Bounded: the actor keeps the last ``spd.suffix_cache_rows`` rows it was sent (FIFO), and each
pair's index keeps as many (SuffixIndex max_rows, oldest dropped first). A resumed job starts the
actor from the results already written (OUT/results/*.parquet, their ``generated_ids``; the
prompt tail is not stored there, so those rows are outputs without context), the newest shards
first, up to the same bound. The actor is named (``NAME``) in the job's Ray namespace, so the
pairs find it without any change to what the driver sends them, on one machine and on a cluster
alike; the driver holds its handle for the job's life, and a job without it (another mode, or an
engine hook) runs as before.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Optional

log = logging.getLogger("spd_cluster.cluster")

NAME = "spd_cluster.suffix_cache"


class SuffixCache:
    """Rows finished by the pairs of one job, in arrival order; ``pull`` returns those another
    pair sent after a cursor. Created with ``ray.remote(SuffixCache)`` by ``start``."""

    def __init__(self, max_rows: int, out=None, shard_ids=()):
        self.rows: deque = deque(maxlen=max(1, max_rows))  # (serial, pair id, row)
        self.serial = 0
        if out is not None and shard_ids:
            self._rebuild(out, sorted(shard_ids, reverse=True), max_rows)

    def _rebuild(self, out, shard_ids, max_rows: int) -> None:
        """The newest written shards' outputs, up to ``max_rows`` rows, oldest first."""
        import pyarrow.parquet as pq

        from ..io import results as rio

        files = rio.written_shards(out)
        found: list = []
        for sid in shard_ids:
            loc = files.get(sid)
            if loc is None:
                continue
            try:
                with loc.fs.open_input_file(loc.path) as f:
                    ids = pq.ParquetFile(f).read(columns=["generated_ids"]).column(0).to_pylist()
            except Exception as e:  # noqa: BLE001 - an unreadable file only costs its rows' proposals
                log.warning("suffix cache: shard %s not read (%s)", sid, e)
                continue
            found = [[0, *g] for g in ids if g] + found
            if len(found) >= max_rows:
                break
        self.push(-1, found[-max_rows:])

    def push(self, pair_id: int, rows: list) -> int:
        for r in rows:
            self.serial += 1
            self.rows.append((self.serial, pair_id, r))
        return self.serial

    def pull(self, pair_id: int, after: int) -> tuple[int, list]:
        """(the latest serial, the rows after ``after`` that other pairs sent)."""
        return self.serial, [r for s, p, r in self.rows if s > after and p != pair_id]

    def size(self) -> int:
        return len(self.rows)


def start(cfg, out, written=()):
    """The job's cache actor, where the job's mode keeps a job-wide index (suffix, with
    suffix_cache_rows > 0); None otherwise. ``written``: ids of the shards already written
    (a resume), whose outputs it starts from. The driver holds the handle while the job runs."""
    from ..engine.modes import mode

    if not mode(cfg.mode).job_cache or cfg.spd.suffix_cache_rows <= 0:
        return None
    import ray

    try:  # an earlier job of this driver (Ray kept up between jobs, as tests do) left its own
        ray.kill(ray.get_actor(NAME))
    except ValueError:
        pass
    cls = ray.remote(SuffixCache).options(name=NAME, num_cpus=0, max_restarts=0)
    for _ in range(100):
        try:
            return cls.remote(cfg.spd.suffix_cache_rows, out, list(written))
        except ValueError:  # the name is still taken while the killed one goes
            time.sleep(0.05)
    raise RuntimeError(f"the suffix cache actor {NAME!r} could not be created: its name stays taken")


_handle = None


def _cache():
    """The job's cache actor, looked up by name once a process (None: none in this job)."""
    global _handle
    if _handle is None:
        import ray

        try:
            _handle = ray.get_actor(NAME)
        except ValueError:
            return None
    return _handle


def pull(engine, pair_id: int) -> int:
    """At a shard's start: the rows other pairs finished since this pair last looked join its
    engine's job-wide index; how many. A cache that cannot be reached costs proposals only."""
    proposer = getattr(engine, "proposer", None)
    if not hasattr(proposer, "add_rows") or (cache := _cache()) is None:
        return 0
    import ray

    try:
        seen, rows = ray.get(cache.pull.remote(pair_id, proposer.cache_seen))
    except Exception as e:  # noqa: BLE001 - the job goes on without the other pairs' rows
        log.warning("suffix cache: pull failed (%s: %s)", type(e).__name__, e)
        return 0
    proposer.add_rows(rows)
    proposer.cache_seen = seen
    return len(rows)


def push(engine, pair_id: int) -> int:
    """At a shard's end: the rows this pair's engine finished since its last push go to the
    other pairs (sent without waiting: the next pull of any pair sees them); how many."""
    proposer = getattr(engine, "proposer", None)
    if not hasattr(proposer, "take_finished") or (cache := _cache()) is None:
        return 0
    rows = proposer.take_finished()
    if rows:
        try:
            cache.push.remote(pair_id, rows)
        except Exception as e:  # noqa: BLE001 - as in pull
            log.warning("suffix cache: push failed (%s: %s)", type(e).__name__, e)
    return len(rows)
