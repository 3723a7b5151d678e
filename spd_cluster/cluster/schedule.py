"""Stage 3 of a job's way, schedule: shards onto pairs, with placement, prefetch and retries.

In: the plan (cluster/plan.py: the shards to run, the audit's picks) and a sink (the commit stage,
cluster/commit.py, given by the coordinator: this stage never imports a later one) that takes
each shard written (messages.ShardDone) and is ticked to checkpoint. Out: the run's figures (the
scheduler's snapshot, wall and start-up time, the shards that failed past their retries).

Every pair holds up to PREFETCH shards (the one it runs and the next, waiting on the actor), so
it never idles on the driver, and a faster pair takes more (a next shard only while no other pair
would idle: ``_may_take``). The pair writes each shard's results file itself, whole and under
its final name only once complete (io/results.py), and returns the shard's record alone: the
driver never holds generated text. A shard whose pair died (or failed) goes back to the front of
the queue for any pair, up to ``cluster.max_retries`` times; Ray restarts the dead actors
(max_restarts) and the pair rejoins once a probe answers. A shard re-run after its first pair
wrote it replaces that file whole, so every prompt appears exactly once. Per shard the driver
does constant work: running totals for progress, and the record handed to the sink.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

from ..io.dataset import Shard
from .errors import JobError
from .messages import LiveCounts, ShardDone, ShardRequest
from .plan import Plan
from .progress import Progress

log = logging.getLogger("spd_cluster.cluster")

PREFETCH = 2  # shards a pair holds at once: the one it runs and the next


@dataclass(frozen=True)
class Timings:
    """How often the driver loop asks and how long it waits (the coordinator's knobs)."""

    live_every_s: float = 1.0  # how often the progress bar asks a busy pair what its shard has finished
    recover_timeout_s: float = 600.0  # give up when every live pair has been recovering this long


class Sink(Protocol):
    """Where the shards written go (the commit stage: cluster/commit.Checkpoint). ``records``:
    shard id -> record of every shard written, before this run and in it."""

    records: dict[int, dict]

    def commit(self, done: ShardDone) -> None: ...

    def tick(self, force: bool = False) -> None: ...


class _NoSink:
    def __init__(self, records: dict[int, dict]):
        self.records = records

    def commit(self, done: ShardDone) -> None:
        self.records[done.shard_id] = done.record

    def tick(self, force: bool = False) -> None:
        pass


class Scheduler:
    """One run's scheduling: the pairs, the queue of shards, what is in flight."""

    def __init__(self, plan: Plan, sink: Optional[Sink] = None, on_event=None, progress: bool = True,
                 timings: Timings = Timings()):
        cfg, info = plan.cfg, plan.info
        self.sink = sink or _NoSink(dict(plan.records))
        self.cfg, self.info, self.out, self.shard_size = cfg, info, plan.out, plan.shard_size
        self.records = self.sink.records  # read only here: the sink commits
        self.audit_picks = plan.audit_picks
        self.timings = timings
        self.on_event = on_event or (lambda kind, **kw: None)
        self.shards: Iterator[Shard] = plan.shards()
        self.exhausted = False
        self.unsent = plan.todo  # shards never dispatched in this run
        self.retry: deque[tuple[Shard, int]] = deque()
        self.inflight: dict = {}
        self.failed: dict[int, str] = {}
        self.first_shards: dict[int, tuple[float, float]] = {}
        self.t_start = time.perf_counter()  # the run's start (job.json runs[-1].started_at)
        self.t_first: Optional[float] = None  # first shard dispatch
        self.t_last: Optional[float] = None  # last shard result
        self.audit_s = 0.0  # pair-seconds in the audit's re-runs, this run
        self.tokens = 0
        self.shards_run = 0
        self.pairs: list = []
        self.progress = Progress(cfg.name, info.num_rows, self.records, progress)
        self.live_asked: dict[int, float] = {}  # pair -> when the bar last asked it (_poll_live)
        self.max_errors = cfg.max_error_fraction * info.num_rows

    def _warn(self, msg: str) -> None:
        if self.progress.bar.disable:
            log.warning(msg)
        else:
            self.progress.bar.write(msg, file=sys.stderr)

    def wall_s(self) -> float:
        """This run's wall time: the run's start (Ray and actor start-up included) to the last
        shard written; 0 for a run that wrote no shard (a no-op resume adds nothing)."""
        return (self.t_last - self.t_start) if self.t_last is not None else 0.0

    def startup_s(self) -> float:
        """Actor start-up: the run's start to its first shard dispatch (Ray start, placement
        groups, model loading until the first pair answered its probe); 0 if nothing ran."""
        return (self.t_first - self.t_start) if self.t_first is not None else 0.0

    def snapshot(self) -> dict:
        """This run's figures as job.json's ``runs`` keeps them (rewritten with every heartbeat)."""
        return {"shards_run": self.shards_run, "prompts_run": self.progress.prompts_run, "tokens": self.tokens,
                "wall_s": round(self.wall_s(), 3), "actor_startup_s": round(self.startup_s(), 3),
                "audit_s": round(self.audit_s, 3),
                "pairs": [{"pair_id": p.pair_id, "node_id": p.node_id, "state": p.state, "shards": p.shards_done}
                          for p in self.pairs]}

    def check_errors(self) -> None:
        """More error rows than max_error_fraction allows fails the job, as soon as it is certain."""
        n = self.progress.errors
        if n > self.max_errors:
            rows = self.info.num_rows
            raise JobError(f"{n} of {rows} rows are errors ({n / rows:.1%}), more than max_error_fraction "
                           f"{self.cfg.max_error_fraction} allows ({int(self.max_errors)} rows); first: "
                           f"{self.progress.first_error or 'in a shard written before'}; the rows are in "
                           f"{self.out / 'results'} (finish_reason 'error')")

    def _next_shard(self) -> Optional[tuple[Shard, int]]:
        if self.retry:
            return self.retry.popleft()
        if self.exhausted:
            return None
        s = next(self.shards, None)
        if s is None:
            self.exhausted = True
            return None
        self.unsent -= 1
        return s, 1

    def _may_take(self, pair) -> bool:
        """A pair takes a shard when it holds none; a next one (up to PREFETCH) only while more
        shards wait than the other pairs with nothing to run, so at the tail of a job the last
        shards go to pairs that would idle, not behind a busy one."""
        if pair.state not in ("ready", "busy") or len(pair.holding) >= PREFETCH:
            return False
        if not pair.holding:
            return True
        empty = sum(1 for q in self.pairs if q is not pair and q.state != "dead" and not q.holding)
        return self.unsent + len(self.retry) > empty

    def _dispatch(self, pair, shard: Shard, attempt: int) -> None:
        picked = set(self.audit_picks.get(shard.shard_id, ()))
        todo = [i for i, r in enumerate(shard.rows) if r.error is None]
        audit = [j for j, i in enumerate(todo) if i in picked]  # positions among the prompts it runs
        ref = pair.run(ShardRequest(shard, attempt, tuple(audit)))
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
            self.progress.started()
        pair.state = "busy"
        pair.holding[ref] = shard.shard_id
        self.inflight[ref] = ("shard", pair, shard, attempt, now)
        self.on_event("dispatch", shard_id=shard.shard_id, pair_id=pair.pair_id, node_id=pair.node_id, attempt=attempt)

    def _probe(self, pair) -> None:
        self.inflight[pair.probe()] = ("probe", pair)

    def check_feasible(self) -> None:
        """Fail now, not hang, when this Ray cluster could never host one pair: each actor on
        some node, and the pair's bundles together (one placement group, actors.PAIR_STRATEGY)."""
        import ray

        from .actors import PAIR_STRATEGY, bundle

        c = self.cfg.cluster
        roles = self.cfg.roles()
        need = [bundle(spec.device, c.cpus_per_actor) for _, spec in roles]
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        keys = {k for b in need for k in b}
        offer = [{k: v for k, v in n.items() if k in keys} for n in nodes]
        for (_, spec), b in zip(roles, need):
            if not any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes):
                raise JobError(f"no node of this Ray cluster can host a {spec.device} actor needing {b}; "
                               f"nodes offer {offer}")

        def fits(i: int, free: list[dict]) -> bool:  # bundles i.. onto nodes with `free` left (PACK: any nodes)
            if i == len(need):
                return True
            for j, n in enumerate(free):
                if all(n.get(k, 0) >= v for k, v in need[i].items()):
                    rest = [dict(m) for m in free]
                    rest[j] = {k: v - need[i].get(k, 0) for k, v in n.items()}
                    if fits(i + 1, rest):
                        return True
            return False

        if not fits(0, offer):
            parts = " + ".join(f"{role} {b}" for (role, _), b in zip(roles, need))
            raise JobError(f"this Ray cluster cannot host one pair: a pair is placed as one unit ({PAIR_STRATEGY} "
                           f"placement group) and needs {parts}; nodes offer {offer}. Lower cluster.cpus_per_actor "
                           "or give the cluster more")

    def start_pairs(self, place_wait_s: float = 5.0) -> None:
        """One placement group per pair (actors.Pair). Pairs Ray cannot place within
        ``place_wait_s`` are reported (a warning and a ``waiting`` event) and the job runs with
        the placed ones; a waiting pair joins when Ray places it (its probe answers then)."""
        import ray

        from .actors import Pair

        self.check_feasible()
        c, job = self.cfg.cluster, self.cfg.model_dump(mode="json")
        # no more pairs than shards left to run (a resume of one shard starts one pair)
        todo = self.info.num_shards(self.shard_size) - len(self.records)
        for i in range(max(1, min(c.num_pairs, todo))):
            pair = Pair(i, job, [(role, spec.device) for role, spec in self.cfg.roles()], c.cpus_per_actor,
                        c.max_retries)
            self.pairs.append(pair)
            self._probe(pair)
        refs = [p.placed for p in self.pairs if getattr(p, "placed", None) is not None]
        placed, _ = ray.wait(refs, num_returns=len(refs), timeout=place_wait_s) if refs else ([], [])
        waiting = [p for p in self.pairs if getattr(p, "placed", None) is not None and p.placed not in placed]
        if waiting:
            keys = {k for b in waiting[0].bundles for k in b}
            free = {k: v for k, v in ray.available_resources().items() if k in keys}
            ids, n_placed = [p.pair_id for p in waiting], len(self.pairs) - len(waiting)
            runs = f"the job runs with the {n_placed} placed" if n_placed else "the job starts when Ray places one"
            self._warn(f"{len(waiting)} of {len(self.pairs)} pairs wait for resources (pairs {ids}): a pair needs "
                       f"{' + '.join(map(str, waiting[0].bundles))}, the cluster has {free} free; {runs}, "
                       "a waiting pair joins once Ray places it")
            self.on_event("waiting", pair_ids=ids, num_waiting=len(waiting), num_pairs=len(self.pairs),
                          needs=waiting[0].bundles, available=free)

    def loop(self) -> None:
        import ray

        while True:
            for pair in self.pairs:
                while self._may_take(pair):
                    item = self._next_shard()
                    if item is None:
                        break
                    self._dispatch(pair, *item)
            busy = any(v[0] == "shard" for v in self.inflight.values())
            if not busy and not self.retry and self.exhausted:
                return
            live = [p for p in self.pairs if p.state != "dead"]
            if not live:
                errors = "; ".join(f"pair {p.pair_id}: {p.last_error}" for p in self.pairs)
                raise JobError(f"every pair failed, {len(self.records)} shards written: {errors}")
            stalled = [p.recovering_since for p in live if p.state == "recovering"]
            if not busy and len(stalled) == len(live) and time.perf_counter() - min(stalled) > self.timings.recover_timeout_s:
                raise JobError(f"no pair recovered within {self.timings.recover_timeout_s:.0f} s")
            self._poll_live()
            # wake at least as often as the bar asks busy pairs for their counts
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=min(0.5, self.timings.live_every_s))
            for ref in ready:
                item = self.inflight.pop(ref)
                if item[0] == "probe":
                    self._on_probe(ref, item[1])
                elif item[0] == "live":
                    self._on_live(ref, *item[1:])
                else:
                    self._on_shard(ref, *item[1:])
            self.sink.tick()
            self.check_errors()

    def _poll_live(self) -> None:
        """Ask each busy pair (at most every ``timings.live_every_s``) what its shard has finished."""
        if self.progress.bar.disable:
            return
        now = time.perf_counter()
        asked = {v[1].pair_id for v in self.inflight.values() if v[0] == "live"}
        for pair in self.pairs:
            if pair.holding and pair.pair_id not in asked and now - self.live_asked.get(pair.pair_id, 0.0) > self.timings.live_every_s:
                self.live_asked[pair.pair_id] = now
                self.inflight[pair.live()] = ("live", pair)

    def _on_live(self, ref, pair) -> None:
        import ray

        try:
            c: LiveCounts = ray.get(ref)
        except Exception:  # noqa: BLE001 - a dying actor: its shard's own result says what happened
            return
        if c.shard_id in pair.holding.values():  # not a shard whose result came in meanwhile
            self.progress.live(pair.pair_id, c.prompts, c.tokens, c.steps, c.accepted)

    def _on_probe(self, ref, pair) -> None:
        import ray

        try:
            info = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - any failure: retry the probe, then give up
            pair.probe_failures += 1
            pair.last_error = _short(e)
            if pair.probe_failures > self.cfg.cluster.max_retries:
                pair.state = "dead"
                pair.kill()
                self._warn(f"pair {pair.pair_id} is out: {pair.last_error}")
                self.on_event("pair_dead", pair_id=pair.pair_id, error=pair.last_error)
            else:
                self._probe(pair)
            return
        pair.node_id, pair.probe_failures, pair.recovering_since = info["node_id"], 0, None
        pair.state = "busy" if pair.holding else "ready"
        self.on_event("ready", pair_id=pair.pair_id, node_id=pair.node_id, info=info)

    def _on_shard(self, ref, pair, shard: Shard, attempt: int, t0: float) -> None:
        import ray

        pair.holding.pop(ref, None)
        try:
            done: ShardDone = ray.get(ref).check(ShardRequest(shard, attempt))
        except Exception as e:  # noqa: BLE001 - actor/node death or a failed run: re-queue the shard
            self.progress.settle(pair.pair_id)
            msg = _short(e)
            if pair.state != "recovering":
                pair.state, pair.last_error, pair.recovering_since = "recovering", msg, time.perf_counter()
                self._probe(pair)
            if attempt > self.cfg.cluster.max_retries:
                self.failed[shard.shard_id] = msg
                self._warn(f"shard {shard.shard_id} failed {attempt} times, giving up: {msg}")
            else:
                self.retry.appendleft((shard, attempt + 1))
                self._warn(f"shard {shard.shard_id} lost on pair {pair.pair_id} (attempt {attempt}): {msg}; re-queued")
            self.on_event("retry", shard_id=shard.shard_id, pair_id=pair.pair_id, attempt=attempt, error=msg)
            return
        self.t_last = time.perf_counter()
        if pair.state == "busy" and not pair.holding:
            pair.state = "ready"
        self.sink.commit(done)
        self.audit_s += done.audit_s
        if pair.shards_done == 0 and pair.pair_id not in self.first_shards:
            self.first_shards[pair.pair_id] = (t0 - self.t_first, done.batch_ttft)
        pair.shards_done += 1
        self.shards_run += 1
        self.tokens += done.num_generated_tokens
        self.progress.settle(pair.pair_id)
        self.progress.shard(done.record)
        self.on_event("done", shard_id=shard.shard_id, pair_id=pair.pair_id, node_id=done.node_id)

    def close(self) -> None:
        for p in self.pairs:
            p.kill()
        self.progress.close()  # tqdm: a second close is a no-op

def schedule(sched: Scheduler) -> None:
    """The stage's entry point, with Ray up: place the pairs and run the plan's shards on them
    until every one is written or has failed past its retries (``sched.failed``). Raises JobError
    when the job cannot go on (no pair can be placed, every pair failed, no pair recovers)."""
    sched.start_pairs()
    sched.loop()


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] if text else []
    return f"{type(e).__name__}: {tail[0] if tail else ''}"[:500]
