"""The coordinator: dataset shards -> pairs -> Parquet, with retries and resume.

Before anything loads: the dataset is scanned once (bad files fail here; the audit's sample is
drawn in the same pass), the output is proven writable, and an existing output is checked
(resume only with the same config; see JobConfig.output_identity). Then every pair holds up to
PREFETCH shards (the one it runs and the next, waiting on the actor), so it never idles on the
driver, and a faster pair takes more (a next shard only while no other pair would idle: _may_take). The pair writes each shard's results file itself, whole
and under its final name only once complete (io/results.py), and returns the shard's record
alone: the driver never holds generated text. A shard whose pair died (or failed) goes back to
the front of the queue for any pair, up to ``cluster.max_retries`` times; Ray restarts the dead
actors (max_restarts) and the pair rejoins once a probe answers. A shard re-run after its first
pair wrote it replaces that file whole, so every prompt appears exactly once. Shards already
written are skipped.

Per shard the driver does constant work: running totals for progress, and the records kept for
the summary. shards.parquet (and audit.parquet, whose rows come back in the records) is
rewritten from them at most every CHECKPOINT_EVERY_S and at the end: a resume reads it, one
listing and the footers of the files written since (io/results.load_records).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional

from ..config import JobConfig
from .errors import JobCancelled, JobError  # noqa: F401 - re-exported
from ..engine.metrics import CloudAI100ExecInfo
from ..engine.modes import draft_model
from ..io import results as rio
from ..io.dataset import Shard, iter_shards
from ..io import fs as fsmod
from ..io.fs import Location
from . import audit as audit_mod
from .progress import Progress
from .reduce import aggregate_exec_info, first_batch_ttft, metrics_from_record, reduce_metrics

log = logging.getLogger("spd_cluster.cluster")

RECOVER_TIMEOUT_S = 600.0  # give up when every live pair has been recovering this long
LIVE_EVERY_S = 1.0  # how often the progress bar asks a busy pair what its shard has finished
CHECKPOINT_EVERY_S = 30.0  # shards.parquet and audit.parquet are rewritten at most this often while a job runs
JOB_WRITE_EVERY_S = 1.0  # job.json after a shard at most this often (the heartbeat rewrites it too)
PREFETCH = 2  # shards a pair holds at once: the one it runs and the next


@dataclass
class JobResult:
    exec_info: CloudAI100ExecInfo
    output_path: Location
    status: str
    num_prompts: int
    num_errors: int
    shards_run: int
    shards_skipped: int
    wall_time_s: float
    failed_shards: dict[int, str] = field(default_factory=dict)
    audit: dict = field(default_factory=dict)  # audit.summarize() of the whole job


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("spd-cluster", "ray", "torch", "transformers", "pyarrow", "numpy", "pydantic"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclass
class OutputState:
    """What an existing output means for this job (inspect_output); prepare_output acts on it."""

    records: dict  # shard id -> record of the shards already written (resume skips them)
    prev: dict  # the previous job.json whose runs this job continues, or {}
    stale: list = field(default_factory=list)  # unreadable shard files, re-run
    clear: bool = False  # remove what a previous job wrote first (overwrite, or a job that wrote no shard)
    note: str = "new"


def inspect_output(out: Location, cfg: JobConfig, ident: str, dataset_sha: str, num_shards: int) -> OutputState:
    """Read (never change) an existing output against this job. Raises OutputError when a job
    still runs there, and for a changed config over written shards without overwrite. An output
    whose jobs wrote no shard holds nothing to protect: whatever its job.json says, it is replaced."""
    from ..status import driver_gone

    prev = rio.read_job_json(out)
    on_disk = rio.written_shards(out)
    if prev and prev.get("status") == "running" and not driver_gone(prev) and not _ours(prev):
        d = prev.get("driver") or {}
        raise rio.OutputError(f"output path {out} is in use by a running job (driver pid {d.get('pid')} on "
                              f"{d.get('host')}, started {prev.get('runs', [{}])[-1].get('started_at')}); wait for "
                              "it, stop it (Ctrl-C, `ray job stop`), or use another output.path")
    if cfg.output.overwrite:
        return OutputState({}, {}, clear=True,
                           note=f"overwrite: the {len(on_disk)} shard file(s) there are deleted first" if on_disk else "new")
    if not on_disk:
        if prev is None or prev.get("config_hash") != ident:
            note = "new" if prev is None else f"new (replaces the job.json of a {prev.get('status')} run that wrote no shard)"
            return OutputState({}, {}, clear=prev is not None or any((out / n).exists() for n in rio.OUR_FILES),
                               note=note)
        return OutputState({}, prev, note=f"resumes a {prev.get('status')} job that wrote no shard yet")
    if prev is None:
        raise rio.OutputError(f"output path {out} holds results without a readable job.json; "
                              "set output.overwrite=true to replace them")
    if prev.get("config_hash") != ident:
        old, new = _flat(prev.get("identity", {})), _flat(cfg.output_identity())
        changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if prev.get("dataset", {}).get("sha256") != dataset_sha:
            changes.append("dataset file contents changed")
        raise rio.OutputError(
            f"output path {out} holds a job with a different config ({'; '.join(changes) or 'config changed'}); "
            "use another output.path or set output.overwrite=true")
    records, stale = rio.load_records(out, with_audit=True, on_disk=on_disk)
    stale += [on_disk[sid] for sid in records if sid >= num_shards]
    records = {sid: r for sid, r in records.items() if sid < num_shards}
    todo = num_shards - len(records)
    note = (f"resumes a {prev.get('status')} job: {len(records)} of {num_shards} shards written, {todo} to run"
            if todo else f"complete: all {num_shards} shards written; a run rewrites only the summary files")
    return OutputState(records, prev, stale, note=note + (f"; {len(stale)} unreadable shard file(s) re-run" if stale else ""))


def _ours(job: dict) -> bool:
    """job.json was left by this very process (an earlier job of it), not by another driver."""
    import os

    from ..status import driver_record

    d, me = job.get("driver") or {}, driver_record()
    return all(d.get(k) == me[k] for k in ("host", "pid", "start_time")) and d.get("pid") == os.getpid()


def prepare_output(out: Location, cfg: JobConfig, ident: str, dataset_sha: str, num_shards: int,
                   state: Optional[OutputState] = None) -> tuple[dict, dict]:
    """Check an existing output against this job (inspect_output, unless ``state`` is given) and
    make it ready: clear it (overwrite, or a job that wrote no shard), drop unreadable shard
    files. Returns (records of shards already written, the previous job.json or {})."""
    state = state or inspect_output(out, cfg, ident, dataset_sha, num_shards)
    rio.remove_temporaries(out)  # of writers killed mid-write in an earlier run
    if state.clear:
        rio.clear_output(out)
    for path in state.stale:
        log.warning("re-running shard file %s: unreadable, or not a shard of this job", path)
        fsmod.delete(path)
    return state.records, state.prev


def check_job_models(cfg: JobConfig, prepare: bool = True) -> str:
    """Resolve the models here, once per job, before any actor starts: an unknown or missing
    model, an HF id neither cached nor reachable, a draft whose tokenizer does not match the
    target's or multiproj without heads fails now (ConfigError), and a packaged model is
    converted once on this node rather than by every actor at once. ``prepare=False``
    (validate) converts nothing: a packaged model not yet converted is only found installed.
    Returns what was found, one clause per model."""
    from ..config import ConfigError
    from ..engine.build import check_models
    from .validate import locate_model

    draft = draft_model(cfg)
    try:
        target_path, t_note = locate_model(cfg.target.model, prepare)
        draft_path, d_note = locate_model(draft, prepare) if draft else (None, "")
        notes = [f"target {cfg.target.model}: {t_note}"] + ([f"draft {draft}: {d_note}"] if draft else [])
        if target_path is None or (draft and draft_path is None):
            return "; ".join(notes + ["tokenizer and heads checked when the models are converted (on the first run)"])
        check_models(cfg.mode, target_path, draft_path, cfg.speculator_path)
        _check_qaic_models(cfg)
    except (ValueError, OSError) as e:
        raise ConfigError(f"models (target.model={cfg.target.model!r}"
                          + (f", draft.model={draft!r}" if draft else "") + f"): {e}") from None
    checked = ("draft and target tokenizers match" if draft else
               "heads found" if cfg.method.uses_heads else "")
    return "; ".join(notes + ([checked] if checked else []))


def local_qaic_resources(cfg: JobConfig) -> dict[str, float]:
    """The ``qaic`` resource of a local Ray: one per card the job's specs name (``device_ids``),
    else one per qaic actor the job starts (the onnxruntime stand-in has no cards to count)."""
    specs = [cfg.target] + ([cfg.draft] if cfg.method.needs_draft else [])
    qaic = [s for s in specs if s.device == "qaic"]
    if not qaic:
        return {}
    if all(s.device_ids for s in qaic):
        return {"qaic": float(len({i for s in qaic for i in s.device_ids}))}
    return {"qaic": float(cfg.cluster.num_pairs * len(qaic))}


def _check_qaic_models(cfg: JobConfig) -> None:
    """What a qaic compile would refuse or get wrong (architecture, multi-layer heads), found
    from the configs alone before any actor imports QEfficient and exports."""
    from ..sessions.heads import TurboHeads
    from ..sessions.qaic import check_qaic_model
    from ..store import resolve_model

    roles = [("target", cfg.target)] + ([("draft", cfg.draft)] if cfg.method.needs_draft else [])
    for role, spec in roles:
        if spec.device != "qaic":
            continue
        path = resolve_model(spec.model)
        heads = TurboHeads.find(path, cfg.speculator_path) if role == "target" and cfg.method.uses_heads else None
        check_qaic_model(path, role, None if heads is None else str(heads))


class _Run:
    def __init__(self, cfg: JobConfig, info, records: dict, on_event, progress: bool, out: Location,
                 shard_size: int, audit_picks: Optional[dict[int, list[int]]] = None):
        self.cfg, self.info, self.records, self.out, self.shard_size = cfg, info, records, out, shard_size
        self.audit_picks = audit_picks or {}
        self.checkpointed = self.job_written = time.perf_counter()
        self.on_event = on_event or (lambda kind, **kw: None)
        self.shards: Iterator[Shard] = (s for s in iter_shards(info, shard_size, cfg.dataset.prompt_column,
                                                               cfg.dataset.id_column) if s.shard_id not in records)
        self.exhausted = False
        self.unsent = info.num_shards(shard_size) - len(records)  # shards never dispatched in this run
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
        self.progress = Progress(cfg.name, info.num_rows, records, progress)
        self.live_asked: dict[int, float] = {}  # pair -> when the bar last asked it (_poll_live)
        self.job = None  # results.JobFile: rewritten after every shard written
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
        ref = pair.run(shard, attempt, audit)
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
        roles = [("target", self.cfg.target)] + ([("draft", self.cfg.draft)] if self.cfg.method.needs_draft else [])
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
            pair = Pair(i, job, self.cfg.method, self.cfg.target.device,
                        self.cfg.draft.device if self.cfg.draft else None, c.cpus_per_actor, c.max_retries)
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
            if not busy and len(stalled) == len(live) and time.perf_counter() - min(stalled) > RECOVER_TIMEOUT_S:
                raise JobError(f"no pair recovered within {RECOVER_TIMEOUT_S:.0f} s")
            self._poll_live()
            # wake at least as often as the bar asks busy pairs for their counts
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=min(0.5, LIVE_EVERY_S))
            for ref in ready:
                item = self.inflight.pop(ref)
                if item[0] == "probe":
                    self._on_probe(ref, item[1])
                elif item[0] == "live":
                    self._on_live(ref, *item[1:])
                else:
                    self._on_shard(ref, *item[1:])
            self._checkpoint()
            self.check_errors()

    def _checkpoint(self, force: bool = False) -> None:
        """job.json (a driver killed now still leaves this run's wall time), and at longer
        intervals shards.parquet with audit.parquet, which a resume reads instead of footers."""
        now = time.perf_counter()
        if self.job is not None and (force or now - self.job_written > JOB_WRITE_EVERY_S):
            self.job.write()
            self.job_written = now
        if force or now - self.checkpointed > CHECKPOINT_EVERY_S:
            recs = [self.records[k] for k in sorted(self.records)]
            audited = all_audit_rows(self.records)
            if audited:  # first: a shard in shards.parquet has its audit rows in audit.parquet
                rio.write_audit(self.out, audited)
            rio.write_shards_table(self.out, recs)
            self.checkpointed = now

    def _poll_live(self) -> None:
        """Ask each busy pair (at most every LIVE_EVERY_S) what its shard has finished so far."""
        if self.progress.bar.disable:
            return
        now = time.perf_counter()
        asked = {v[1].pair_id for v in self.inflight.values() if v[0] == "live"}
        for pair in self.pairs:
            if pair.holding and pair.pair_id not in asked and now - self.live_asked.get(pair.pair_id, 0.0) > LIVE_EVERY_S:
                self.live_asked[pair.pair_id] = now
                self.inflight[pair.live()] = ("live", pair)

    def _on_live(self, ref, pair) -> None:
        import ray

        try:
            sid, prompts, tokens, steps, accepted = ray.get(ref)
        except Exception:  # noqa: BLE001 - a dying actor: its shard's own result says what happened
            return
        if sid in pair.holding.values():  # not a shard whose result came in meanwhile
            self.progress.live(pair.pair_id, prompts, tokens, steps, accepted)

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
            rec = ray.get(ref)
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
        self.records[shard.shard_id] = rec
        self.audit_s += float(rec.get("audit_s") or 0.0)
        if pair.shards_done == 0 and pair.pair_id not in self.first_shards:
            self.first_shards[pair.pair_id] = (t0 - self.t_first, float(rec.get("batch_ttft") or 0.0))
        pair.shards_done += 1
        self.shards_run += 1
        self.tokens += int(rec.get("num_generated_tokens") or 0)
        self.progress.settle(pair.pair_id)
        self.progress.shard(rec)
        self.on_event("done", shard_id=shard.shard_id, pair_id=pair.pair_id, node_id=rec.get("node_id"))

    def close(self) -> None:
        for p in self.pairs:
            p.kill()
        self.progress.close()  # tqdm: a second close is a no-op


def _ray_info(started: bool) -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"started_locally": started, "gcs_address": getattr(ctx, "gcs_address", None),
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "version": ray.__version__}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] if text else []
    return f"{type(e).__name__}: {tail[0] if tail else ''}"[:500]


def all_audit_rows(records: dict) -> list[dict]:
    return [a for k in sorted(records) for a in records[k].get("audit") or []]


def _audit_failure(rows: list[dict]) -> str:
    bad = [r for r in rows if r.get("match") is False]
    shown = "; ".join(f"prompt {r['prompt_id']!r} (row {r['row']}) at token {r['first_diff_position']}: "
                      f"SpD {r['spd_token']} vs baseline {r['baseline_token']}" for r in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"audit: {len(bad)} of {sum(r.get('match') is not None for r in rows)} audited prompts differ "
            f"from the target alone (audit.fail_on_mismatch is set): {shown}{more}")


@contextmanager
def _keep_sigterm_handler():
    """ray.init replaces the SIGTERM handler (Python's with sys.exit, then its core worker's C++
    one, which logs and aborts): put back the caller's own handler, if it set one (the CLI's
    turns SIGTERM into a cancel)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _prior_runs(prev: dict) -> list[dict]:
    """The runs a resumed job continues, each with its wall time. A job.json written before runs
    kept theirs has the total only: it goes on the last of them."""
    runs = [dict(r) for r in prev.get("runs", [])]
    if runs and not any("wall_s" in r for r in runs):
        runs[-1]["wall_s"] = float(prev.get("wall_time_s") or 0.0)
    for r in runs:
        if r.get("status") == "running":  # its driver died without a word (SIGKILL, a lost node)
            r["status"] = "interrupted"
    return runs


def run_job(cfg: JobConfig, *, progress: bool = True, on_event: Optional[Callable[..., None]] = None,
            command: Optional[str] = None) -> JobResult:
    """Run a job end to end; see the module docstring. The checks of `spd-cluster validate`
    come first (cluster/validate.py) and raise DatasetError / OutputError / ConfigError before
    any actor starts; JobError when the job cannot finish, JobCancelled / KeyboardInterrupt
    when it is stopped (what was done stays on disk either way). ``command``: how to run this
    job again (job.json keeps it with the run, `status` shows it to resume)."""
    from ..status import HEARTBEAT_S, driver_record
    from .runtime import init_ray, shutdown_ray
    from .validate import preflight

    pf = preflight(cfg, for_run=True)
    info, out, num_shards, shard_size = pf.info, pf.out, pf.num_shards, pf.shard_size
    records, prev = prepare_output(out, cfg, pf.ident, info.sha256, num_shards, pf.output)
    c = cfg.cluster
    skipped = len(records)
    picks = {}
    if len(records) < num_shards and pf.sample is not None:
        a = cfg.audit
        picks = pf.sample.picks(a.fraction, a.min_prompts, info.num_rows - len(info.row_errors), shard_size)
    runs = _prior_runs(prev)
    prior_wall = sum(float(r.get("wall_s") or 0.0) for r in runs)
    driver = driver_record()
    placement = {"address": c.address, "num_pairs": c.num_pairs, "cpus_per_actor": c.cpus_per_actor}
    job = rio.JobFile(out, {
        "name": cfg.name, "status": "running", "config": cfg.model_dump(mode="json"),
        "identity": cfg.output_identity(), "config_hash": pf.ident,
        "dataset": {"path": str(info.path), "format": info.format, "num_rows": info.num_rows, "sha256": info.sha256},
        "num_shards": num_shards, "shard_size": shard_size, "versions": versions(),
        "started_at": prev.get("started_at") or _now(), "ended_at": None, "wall_time_s": prior_wall,
        "driver": driver,
        "runs": runs + [{"started_at": _now(), "status": "running", "shards_skipped": skipped, "driver": driver,
                         "placement": placement, "command": command}],
    }, every_s=HEARTBEAT_S)

    run = _Run(cfg, info, records, on_event, progress, out, shard_size, picks)
    job.progress, run.job = run.snapshot, job
    job.write()
    job.start_heartbeat()
    started, status, error = False, "failed", None
    try:
        if len(records) < num_shards:
            per_pair = cfg.method.actors_per_pair
            with _keep_sigterm_handler():
                started = init_ray(c.address, num_cpus=c.num_pairs * per_pair * c.cpus_per_actor,
                                   resources=local_qaic_resources(cfg))
            job.data["ray"] = placement["ray"] = _ray_info(started)
            job.write()
            run.start_pairs()
            run.loop()
        if run.failed:
            raise JobError(f"{len(run.failed)} shard(s) failed past {c.max_retries} retries: "
                           + "; ".join(f"shard {k}: {v}" for k, v in sorted(run.failed.items())))
        run.check_errors()
        audited = all_audit_rows(run.records)
        if cfg.audit.fail_on_mismatch and any(r.get("match") is False for r in audited):
            raise JobError(_audit_failure(audited))
        status = "completed"
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            import signal

            status, error = "cancelled", f"cancelled by {signal.Signals(JobCancelled.signal_of(e)).name}"
        else:
            error = f"{type(e).__name__}: {e}"
        raise
    finally:
        # a signal now is noted, not raised: these records say how the job ended
        with JobCancelled.held():
            # the output first, Ray after: `ray job stop` SIGKILLs 3 s after its SIGTERM, and Ray's
            # teardown may wait on processes the same signal ended
            job.stop_heartbeat()
            run.progress.close()
            wall = prior_wall + run.wall_s()
            exec_info, num_errors, audit = _finish(cfg, out, run.records, wall,
                                                   first_batch_ttft(list(run.first_shards.values())), info.num_rows,
                                                   num_shards, actor_startup_s=run.startup_s() + sum(
                                                       float(r.get("actor_startup_s") or 0.0) for r in runs))
            job.run.update(ended_at=_now(), status=status, error=error)
            job.write(status=status, ended_at=job.run["ended_at"], wall_time_s=wall, error=error, num_errors=num_errors,
                      shards_done=len(run.records), failed_shards={str(k): v for k, v in run.failed.items()})
            if not (started and status == "cancelled"):  # a local Ray of ours goes down whole with its shutdown,
                run.close()  # and after a signal to the process group its GCS may be gone (ray.kill would wait on it)
            shutdown_ray(started)
            if status == "completed":
                rio.remove_temporaries(out)  # a pair killed mid-write during this run left its temporary
    if JobCancelled.received and status == "completed":
        import signal

        print(f"{signal.Signals(JobCancelled.received).name} came as the job completed: nothing was cancelled",
              file=sys.stderr)
    return JobResult(exec_info, out, status, info.num_rows, num_errors, run.shards_run, skipped, wall, run.failed,
                     audit)


def _finish(cfg: JobConfig, out: Location, records: dict, wall: float, batch_ttft, num_rows: int,
            num_shards: int, actor_startup_s: float = 0.0) -> tuple[CloudAI100ExecInfo, int, dict]:
    """The summary files from the shard records. ``wall``: the job wall time (summed over runs);
    ``actor_startup_s``: the runs' start-up seconds (in ``wall`` too, reported apart)."""
    recs = [records[k] for k in sorted(records)]
    metrics = reduce_metrics([metrics_from_record(r) for r in recs], wall,
                             num_ran=[r["num_prompts"] - r["num_errors"] for r in recs], batch_ttft=batch_ttft)
    draft_name = draft_model(cfg) or ""
    exec_info = aggregate_exec_info(metrics, mode=cfg.mode, settings=cfg.spd, target_name=cfg.target.model,
                                    draft_name=draft_name)
    num_errors = sum(r["num_errors"] for r in recs)
    audited = all_audit_rows(records)
    audit = audit_mod.summarize(audited)
    exec_info.audit_match_rate, exec_info.audit_speedup = audit["match_rate"], audit["speedup"]
    if audited:
        rio.write_audit(out, audited)
    rio.write_shards_table(out, recs)
    s = cfg.spd
    rio.write_exec_info(out, {
        "name": cfg.name, "mode": cfg.mode, "target_model_name": cfg.target.model, "draft_model_name": draft_name,
        "num_speculative_tokens": s.num_speculative_tokens, "prefill_seq_len": s.prefill_seq_len,
        "ctx_len": s.ctx_len, "full_batch_size": s.full_batch_size, "prefill_bsz": 1,
        "batch_size": s.full_batch_size, "num_prompts": num_rows, "num_errors": num_errors,
        "num_shards": num_shards, "num_pairs": len({r["pair_id"] for r in recs if r.get("pair_id") is not None}),
        "num_pairs_configured": cfg.cluster.num_pairs, "actor_startup_s": actor_startup_s,
        "audit_time_s": sum(float(r.get("audit_s") or 0.0) for r in recs), **rio.metrics_record(metrics),
        "audit_num_prompts": audit["num_prompts"], "audit_match_rate": audit["match_rate"],
        "audit_speedup": audit["speedup"],
    })
    return exec_info, num_errors, audit
