"""The coordinator: dataset shards -> free pairs -> Parquet, with retries and resume.

Before anything loads: the dataset is scanned (bad files fail here), the output path is proven
writable, and an existing output is checked (resume only with the same config; see
JobConfig.output_identity). Then each pair takes the next shard as soon as it is free, so a
faster pair takes more. A shard whose pair died (or failed) goes back to the front of the queue
for any pair, up to ``cluster.max_retries`` times; Ray restarts the dead actors (max_restarts)
and the pair rejoins once a probe answers. A shard is written by the driver once, atomically,
when its result arrives, so every prompt appears exactly once. Shards already on disk are skipped.

The audit (cluster/audit.py) rides along: its sample is picked before anything runs, each shard
goes out with the positions of its audited prompts, and their audit rows come back with the
shard, are kept in the shard's record (so a resume keeps them) and OUT/audit.parquet is rewritten
from all records (at most every AUDIT_WRITE_EVERY_S while the job runs, and at its end).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..config import JobConfig
from ..engine.metrics import CloudAI100ExecInfo
from ..io import results as rio
from ..io.dataset import Shard, iter_shards, scan
from . import audit as audit_mod
from .reduce import aggregate_exec_info, first_batch_ttft, metrics_from_record, reduce_metrics

log = logging.getLogger("spd_cluster.cluster")

RECOVER_TIMEOUT_S = 600.0  # give up when every live pair has been recovering this long
AUDIT_WRITE_EVERY_S = 30.0  # audit.parquet is rewritten at most this often while a job runs, and at its end


class JobError(RuntimeError):
    """The job could not finish (every pair failed, or a shard failed past its retries)."""


@dataclass
class JobResult:
    exec_info: CloudAI100ExecInfo
    output_path: Path
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


def _prompt_text(p: Any) -> Optional[str]:
    if p is None or isinstance(p, str):
        return p
    return repr(p)


def prepare_output(out: Path, cfg: JobConfig, ident: str, dataset_sha: str, num_shards: int) -> tuple[dict, dict]:
    """Check an existing output against this job. Returns (records of shards already written,
    the previous job.json or {}). Raises OutputError for a changed config without overwrite."""
    prev = rio.read_job_json(out)
    on_disk = rio.written_shards(out)
    if cfg.output.overwrite:
        rio.clear_output(out)
        return {}, {}
    if prev is None:
        if on_disk or any((out / n).exists() for n in rio.OUR_FILES):
            raise rio.OutputError(f"output path {out} holds results without a readable job.json; "
                                  "set output.overwrite=true to replace them")
        return {}, {}
    if prev.get("config_hash") != ident:
        old, new = _flat(prev.get("identity", {})), _flat(cfg.output_identity())
        changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if prev.get("dataset", {}).get("sha256") != dataset_sha:
            changes.append("dataset file contents changed")
        raise rio.OutputError(
            f"output path {out} holds a job with a different config ({'; '.join(changes) or 'config changed'}); "
            "use another output.path or set output.overwrite=true")
    records = {}
    for sid, path in on_disk.items():
        rec = rio.read_shard_record(path)
        if rec is None or sid >= num_shards:
            log.warning("re-running shard %d: %s is unreadable", sid, path)
            path.unlink(missing_ok=True)
            continue
        records[sid] = rec
    return records, prev


def check_job_models(cfg: JobConfig) -> None:
    """Resolve the models here, once per job, before any actor starts: an unknown or missing
    model, a draft with another vocabulary or multiproj without heads fails now (ConfigError),
    and a packaged model is converted once on this node rather than by every actor at once."""
    from ..config import ConfigError
    from ..engine.build import check_models

    draft = cfg.draft.model if cfg.mode == "draft" and cfg.draft else None
    try:
        check_models(cfg.mode, cfg.target.model, draft, cfg.speculator_path)
        _check_qaic_models(cfg)
    except (ValueError, OSError) as e:
        raise ConfigError(f"models (target.model={cfg.target.model!r}"
                          + (f", draft.model={draft!r}" if draft else "") + f"): {e}") from None


def local_qaic_resources(cfg: JobConfig) -> dict[str, float]:
    """The ``qaic`` resource of a local Ray: one per card the job's specs name (``device_ids``),
    else one per qaic actor the job starts (the onnxruntime stand-in has no cards to count)."""
    specs = [cfg.target] + ([cfg.draft] if cfg.mode == "draft" else [])
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

    roles = [("target", cfg.target)] + ([("draft", cfg.draft)] if cfg.mode == "draft" else [])
    for role, spec in roles:
        if spec.device != "qaic":
            continue
        path = resolve_model(spec.model)
        heads = TurboHeads.find(path, cfg.speculator_path) if role == "target" and cfg.mode == "multiproj" else None
        check_qaic_model(path, role, None if heads is None else str(heads))


class _Run:
    def __init__(self, cfg: JobConfig, info, records: dict, on_event, progress: bool,
                 audit_picks: Optional[dict[int, list[int]]] = None):
        self.cfg, self.info, self.records = cfg, info, records
        self.audit_picks = audit_picks or {}
        self.audit_written = float("-inf")
        self.out = Path(cfg.output.path)
        self.on_event = on_event or (lambda kind, **kw: None)
        c = cfg.cluster
        self.shards: Iterator[Shard] = (s for s in iter_shards(info, c.shard_size, cfg.dataset.prompt_column,
                                                               cfg.dataset.id_column) if s.shard_id not in records)
        self.exhausted = False
        self.retry: deque[tuple[Shard, int]] = deque()
        self.inflight: dict = {}
        self.failed: dict[int, str] = {}
        self.first_shards: dict[int, tuple[float, float]] = {}
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.tokens = 0
        self.shards_run = 0
        self.pairs: list = []
        from tqdm import tqdm

        done = sum(r["num_prompts"] for r in records.values())
        tty = sys.stderr.isatty()  # in a log file (ray job logs) one line per ~10 s, not a redraw per shard
        self.bar = tqdm(total=info.num_rows, initial=done, unit="prompt", desc=cfg.name, file=sys.stderr,
                        disable=not progress, mininterval=0.5 if tty else 10.0, dynamic_ncols=tty)
        self._postfix()

    def _warn(self, msg: str) -> None:
        if self.bar.disable:
            log.warning(msg)
        else:
            self.bar.write(msg, file=sys.stderr)

    def _postfix(self) -> None:
        recs = self.records.values()
        steps = sum(r.get("num_row_steps", 0) for r in recs)
        acc = sum(r.get("mean_num_accepted_tokens", 0.0) * r.get("num_row_steps", 0) for r in recs) / steps if steps else 0.0
        elapsed = (time.perf_counter() - self.t_first) if self.t_first else 0.0
        self.bar.set_postfix_str(f"{self.tokens / elapsed if elapsed > 0 else 0.0:.1f} tok/s, acc {acc:.2f}", refresh=False)

    def _next_shard(self) -> Optional[tuple[Shard, int]]:
        if self.retry:
            return self.retry.popleft()
        if self.exhausted:
            return None
        s = next(self.shards, None)
        if s is None:
            self.exhausted = True
            return None
        return s, 1

    def _dispatch(self, pair, shard: Shard, attempt: int) -> None:
        todo = [i for i, r in enumerate(shard.rows) if r.error is None]
        picked = set(self.audit_picks.get(shard.shard_id, ()))
        audit = [j for j, i in enumerate(todo) if i in picked]  # positions among the prompts sent
        rows = [shard.rows[i] for i in todo]
        ref = pair.run(shard.shard_id, [r.prompt for r in rows], [r.prompt_id for r in rows], audit)
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        pair.state = "busy"
        self.inflight[ref] = ("shard", pair, shard, attempt, now)
        self.on_event("dispatch", shard_id=shard.shard_id, pair_id=pair.pair_id, node_id=pair.node_id, attempt=attempt)

    def _probe(self, pair) -> None:
        self.inflight[pair.probe()] = ("probe", pair)

    def check_feasible(self) -> None:
        """Fail now, not hang, when no node could ever host an actor of this job."""
        import ray

        from .actors import actor_options

        c = self.cfg.cluster
        specs = [self.cfg.target] + ([self.cfg.draft] if self.cfg.mode == "draft" else [])
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for spec in specs:
            o = actor_options(spec.device, c.cpus_per_actor, 0)
            need = {"CPU": o["num_cpus"], **({"GPU": o["num_gpus"]} if "num_gpus" in o else {}), **o.get("resources", {})}
            if not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
                raise JobError(f"no node of this Ray cluster can host a {spec.device} actor needing {need}; "
                               f"nodes offer {[{k: v for k, v in n.items() if k in need} for n in nodes]}")

    def start_pairs(self) -> None:
        from .actors import Pair

        self.check_feasible()
        c, job = self.cfg.cluster, self.cfg.model_dump(mode="json")
        # no more pairs than shards left to run (a resume of one shard starts one pair)
        todo = self.info.num_shards(c.shard_size) - len(self.records)
        for i in range(max(1, min(c.num_pairs, todo))):
            pair = Pair(i, job, self.cfg.mode, self.cfg.target.device,
                        self.cfg.draft.device if self.cfg.draft else None, c.cpus_per_actor, c.max_retries)
            self.pairs.append(pair)
            self._probe(pair)

    def loop(self) -> None:
        import ray

        while True:
            for pair in self.pairs:
                if pair.state == "ready":
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
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                item = self.inflight.pop(ref)
                if item[0] == "probe":
                    self._on_probe(ref, item[1])
                else:
                    self._on_shard(ref, *item[1:])

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
        pair.node_id, pair.state, pair.probe_failures, pair.recovering_since = info["node_id"], "ready", 0, None
        self.on_event("ready", pair_id=pair.pair_id, node_id=pair.node_id, info=info)

    def _on_shard(self, ref, pair, shard: Shard, attempt: int, t0: float) -> None:
        import ray

        try:
            res = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - actor/node death or a failed run: re-queue the shard
            msg = _short(e)
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
        now = time.perf_counter()
        self.t_last = now
        pair.state = "ready"
        m = res["metrics"]
        rows = _merge_rows(shard, res["rows"], pair.pair_id)
        rec = {"shard_id": shard.shard_id, "first_row": shard.first_row, "num_prompts": len(rows),
               "num_errors": sum(r["finish_reason"] == "error" for r in rows), "pair_id": pair.pair_id,
               "node_id": res.get("node_id"), "attempts": attempt, "wall_s": now - t0, "finished_at": _now(),
               **rio.metrics_record(m), "audit": _audit_rows(shard, res.get("audit", []), pair.pair_id)}
        rio.write_shard(self.out, shard.shard_id, rows, rec)
        self.records[shard.shard_id] = rec
        if rec["audit"] and now - self.audit_written > AUDIT_WRITE_EVERY_S:
            rio.write_audit(self.out, all_audit_rows(self.records))
            self.audit_written = now
        if pair.shards_done == 0 and pair.pair_id not in self.first_shards:
            self.first_shards[pair.pair_id] = (t0 - self.t_first, m.batch_ttft)
        pair.shards_done += 1
        self.shards_run += 1
        self.tokens += m.num_generated_tokens
        self._postfix()
        self.bar.update(len(rows))
        self.on_event("done", shard_id=shard.shard_id, pair_id=pair.pair_id, node_id=res.get("node_id"))

    def close(self) -> None:
        for p in self.pairs:
            p.kill()
        self.bar.close()


def _ray_info(started: bool) -> dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"started_locally": started, "gcs_address": getattr(ctx, "gcs_address", None),
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "version": ray.__version__}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] if text else []
    return f"{type(e).__name__}: {tail[0] if tail else ''}"[:500]


def _audit_rows(shard: Shard, rows: list[dict], pair_id: int) -> list[dict]:
    by_id = {r.prompt_id: r.row for r in shard.rows if r.error is None}
    return [{**r, "row": by_id.get(r["prompt_id"]), "shard_id": shard.shard_id, "pair_id": pair_id} for r in rows]


def all_audit_rows(records: dict) -> list[dict]:
    return [a for k in sorted(records) for a in records[k].get("audit") or []]


def _audit_failure(rows: list[dict]) -> str:
    bad = [r for r in rows if r.get("match") is False]
    shown = "; ".join(f"prompt {r['prompt_id']!r} (row {r['row']}) at token {r['first_diff_position']}: "
                      f"SpD {r['spd_token']} vs baseline {r['baseline_token']}" for r in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"audit: {len(bad)} of {sum(r.get('match') is not None for r in rows)} audited prompts differ "
            f"from the target alone (audit.fail_on_mismatch is set): {shown}{more}")


def _merge_rows(shard: Shard, engine_rows: list[dict], pair_id: int) -> list[dict]:
    """Dataset rows in order: driver error rows in place, the engine's rows for the rest."""
    it = iter(engine_rows)
    rows = []
    for r in shard.rows:
        row = {"prompt_id": r.prompt_id, "row": r.row, "prompt": _prompt_text(r.prompt),
               "shard_id": shard.shard_id, "pair_id": pair_id}
        if r.error is not None:
            row.update(generated_text="", generated_ids=[], num_prompt_tokens=0, num_generated_tokens=0,
                       finish_reason="error", error=r.error, ttft_s=0.0, num_decode_iterations=0,
                       mean_num_accepted_tokens=0.0)
        else:
            e = dict(next(it))
            e.pop("prompt_id", None)
            row.update(e)
        rows.append(row)
    return rows


def run_job(cfg: JobConfig, *, progress: bool = True, on_event: Optional[Callable[..., None]] = None) -> JobResult:
    """Run a job end to end; see the module docstring. Raises DatasetError / OutputError /
    ConfigError (models) before any actor starts, JobError when the job cannot finish (what was
    done stays on disk)."""
    from .runtime import init_ray, shutdown_ray

    ds, c = cfg.dataset, cfg.cluster
    info = scan(ds.path, ds.prompt_column, ds.id_column, ds.format)
    out = rio.check_writable(cfg.output.path)
    ident = cfg.identity_hash(info.sha256)
    num_shards = info.num_shards(c.shard_size)
    records, prev = prepare_output(out, cfg, ident, info.sha256, num_shards)
    if len(records) < num_shards:
        check_job_models(cfg)
    skipped = len(records)
    picks = {}
    if len(records) < num_shards and cfg.mode != "baseline":  # baseline against itself says nothing
        a = cfg.audit
        picks = audit_mod.pick(iter_shards(info, c.shard_size, ds.prompt_column, ds.id_column), a.fraction,
                               a.min_prompts, a.seed, info.num_rows - len(info.row_errors))
    prior_wall = float(prev.get("wall_time_s", 0.0))
    job = {
        "name": cfg.name, "status": "running", "config": cfg.model_dump(mode="json"),
        "identity": cfg.output_identity(), "config_hash": ident,
        "dataset": {"path": str(info.path), "format": info.format, "num_rows": info.num_rows, "sha256": info.sha256},
        "num_shards": num_shards, "versions": versions(),
        "started_at": prev.get("started_at") or _now(), "ended_at": None, "wall_time_s": prior_wall,
        "runs": list(prev.get("runs", [])) + [{"started_at": _now(), "shards_skipped": skipped}],
    }
    rio.write_job_json(out, job)

    run = _Run(cfg, info, records, on_event, progress, picks)
    started, status, error = False, "failed", None
    try:
        if len(records) < num_shards:
            per_pair = 2 if cfg.mode == "draft" else 1
            started = init_ray(c.address, num_cpus=c.num_pairs * per_pair * c.cpus_per_actor,
                               resources=local_qaic_resources(cfg))
            job["ray"] = _ray_info(started)
            rio.write_job_json(out, job)
            run.start_pairs()
            run.loop()
        if run.failed:
            raise JobError(f"{len(run.failed)} shard(s) failed past {c.max_retries} retries: "
                           + "; ".join(f"shard {k}: {v}" for k, v in sorted(run.failed.items())))
        audited = all_audit_rows(run.records)
        if cfg.audit.fail_on_mismatch and any(r.get("match") is False for r in audited):
            raise JobError(_audit_failure(audited))
        status = "completed"
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        run.close()
        shutdown_ray(started)
        wall = prior_wall + ((run.t_last - run.t_first) if run.t_first and run.t_last else 0.0)
        exec_info, num_errors, audit = _finish(cfg, out, run.records, wall,
                                               first_batch_ttft(list(run.first_shards.values())), info.num_rows,
                                               num_shards)
        job.update(status=status, ended_at=_now(), wall_time_s=wall, error=error, num_errors=num_errors,
                   shards_done=len(run.records), failed_shards={str(k): v for k, v in run.failed.items()})
        job["runs"][-1].update(ended_at=job["ended_at"], shards_run=run.shards_run, status=status)
        rio.write_job_json(out, job)
    return JobResult(exec_info, out, status, info.num_rows, num_errors, run.shards_run, skipped, wall, run.failed,
                     audit)


def _finish(cfg: JobConfig, out: Path, records: dict, wall: float, batch_ttft, num_rows: int,
            num_shards: int) -> tuple[CloudAI100ExecInfo, int, dict]:
    recs = [records[k] for k in sorted(records)]
    metrics = reduce_metrics([metrics_from_record(r) for r in recs], wall,
                             num_ran=[r["num_prompts"] - r["num_errors"] for r in recs], batch_ttft=batch_ttft)
    draft_name = cfg.draft.model if cfg.mode == "draft" and cfg.draft else ""
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
        "num_shards": num_shards, "num_pairs": cfg.cluster.num_pairs, **rio.metrics_record(metrics),
        "audit_num_prompts": audit["num_prompts"], "audit_match_rate": audit["match_rate"],
        "audit_speedup": audit["speedup"],
    })
    return exec_info, num_errors, audit
