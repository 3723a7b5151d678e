"""Device actors and pairs: a thin Ray shell over the SpD engine.

An actor owns one device and one session, in one of the roles the mode registry gives a pair
(engine/modes.py: ``Mode.roles``), one actor class per role (``ACTORS``):
  TargetActor  holds an SpDEngine; ``run_shard`` (a messages.ShardRequest) is one
               ``engine.generate`` over a shard's prompts, then it writes the shard's results file
               to the output and returns the shard's record (messages.ShardDone).
  DraftActor   holds the registry's draft proposer (modes.draft_proposer) over its own session; the
               target's engine reaches it through RemoteDraftProposer, one round trip per
               speculative step, token ids only.
A pair is one actor per role: the target, plus a draft actor in draft mode.

Placement: each pair is one Ray placement group (see ``Pair``), so a pair starts whole or waits
whole, never half-placed holding resources.

Devices: ``num_cpus=cpus_per_actor`` always, and torch gets that many threads (``actor_threads``:
the CPU actors of a pair that take turns each get the CPUs their pair holds on their node);
``num_gpus=1`` for
cuda (Ray picks the GPU and sets CUDA_VISIBLE_DEVICES); ``{"qaic": 1}`` for Cloud AI 100, where
the actor locks one id of its role's ``device_ids`` with a per-node lock file held for the
actor's life (released by the OS when the process dies), so two actors on one node never share
a card. Whatever computes in an actor (its load and warm-up, shards, audits, draft calls) runs on
its one device thread (``_DeviceActor.on_device``), never on the threads Ray calls it on.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..engine.modes import DRAFT, TARGET
from . import suffix_cache
from .messages import LiveCounts, ShardDone, ShardRequest, rows_once

EMPTY = np.zeros(0, dtype=np.int64)
# "module:function": function(cfg) -> an engine (generate, proposer, session.vocab_size) that a
# target actor runs instead of loading its model: the orchestration measured alone
# (bench/bench_orchestration.py). Read in the actor's own environment.
ENGINE_HOOK = "SPD_CLUSTER_ENGINE"


# -- device ids --------------------------------------------------------------------------------

def lock_device(kind: str, ids: Sequence[int], lock_dir: str | Path | None = None) -> tuple[int, int]:
    """Take the first free id of ``ids`` on this node; return (id, fd). Closing fd frees it."""
    d = Path(lock_dir or os.environ.get("SPD_CLUSTER_LOCK_DIR") or tempfile.gettempdir()) / "spd_cluster-devices"
    d.mkdir(parents=True, exist_ok=True)
    for i in ids:
        fd = os.open(d / f"{kind}-{i}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return int(i), fd
    raise RuntimeError(f"no free {kind} device on node {socket.gethostname()}: ids {list(ids)} are all taken")


# A pair's placement group: PACK puts target and draft on one node whenever one node can hold
# both (the draft's round trip per speculative step stays on the node), and still places a pair
# across nodes where no single node can (a cluster of one-GPU nodes runs cuda draft mode);
# STRICT_PACK would refuse those pairs outright.
PAIR_STRATEGY = "PACK"


def shares_cpus(cfg, on_node: int) -> bool:
    """Whether a pair's CPU actors take turns on the same cores: a draft pair on CPU whose draft
    does not overlap the verify, both actors on one node, threads not set outright."""
    from ..engine.modes import draft_overlaps

    roles = cfg.roles()
    return (cfg.cluster.threads_per_actor is None and len(roles) > 1 and on_node > 1
            and all(spec.device == "cpu" for _, spec in roles) and not draft_overlaps(cfg.spd))


def actor_threads(cfg, on_node: int) -> int:
    """Torch threads for an actor of a pair that has ``on_node`` actors on this actor's node:
    ``cluster.threads_per_actor`` where given, else ``cpus_per_actor``; but a pair's CPU actors that
    take turns (a draft pair whose draft does not overlap the verify: one computes while the other
    waits for it) each run on every CPU their pair holds on the node, as one process would: the
    draft's forwards and the target's verify each get the cores the other is not using. A pair
    split across nodes keeps cpus_per_actor on each."""
    c = cfg.cluster
    if c.threads_per_actor is not None:
        return c.threads_per_actor
    return c.cpus_per_actor * on_node if shares_cpus(cfg, on_node) else c.cpus_per_actor


def pair_actors_on_node() -> int:
    """How many bundles of this actor's placement group (its pair) Ray placed on this actor's
    node; 1 outside a placement group (an actor built in process: tests, benchmarks)."""
    import ray
    from ray.util import get_current_placement_group, placement_group_table

    pg = get_current_placement_group() if ray.is_initialized() else None
    if pg is None:
        return 1
    node = ray.get_runtime_context().get_node_id()
    return sum(n == node for n in placement_group_table(pg).get("bundles_to_node_id", {}).values())


def bundle(device: str, cpus: int) -> dict[str, int]:
    """What one actor on ``device`` takes: its placement-group bundle, and its Ray resources."""
    need = {"CPU": cpus}
    if device == "cuda":
        need["GPU"] = 1
    elif device == "qaic":
        need["qaic"] = 1
    return need


def actor_options(device: str, cpus: int, max_restarts: int, placement_group=None, bundle_index: int = -1) -> dict:
    need = bundle(device, cpus)
    opts: dict[str, Any] = {"num_cpus": cpus, "max_restarts": max_restarts, "max_task_retries": 0}
    if "GPU" in need:
        opts["num_gpus"] = need["GPU"]
    if "qaic" in need:
        opts["resources"] = {"qaic": need["qaic"]}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, bundle_index)
    return opts


# -- draft over the wire -----------------------------------------------------------------------

def pack_probs(q: Optional[np.ndarray]):
    """A draft distribution [m, V] for the wire, exactly: its non-zero entries only (warped with
    top-k / top-p that is a few per row; plain temperature sends the whole row)."""
    if q is None:
        return None
    flat = np.ascontiguousarray(q).reshape(-1)
    idx = np.flatnonzero(flat)
    return q.shape, idx.astype(np.int32 if flat.size < 2**31 else np.int64), flat[idx]


def unpack_probs(packed) -> Optional[np.ndarray]:
    if packed is None:
        return None
    shape, idx, val = packed
    flat = np.zeros(int(np.prod(shape)), dtype=val.dtype)
    flat[idx] = val
    return flat.reshape(shape)


class DraftServer:
    """The draft actor's side: rebuilds each slot's sequence from the deltas it is sent and asks
    its DraftProposer, which keeps the draft KV and needs nothing else."""

    def __init__(self, proposer):
        self.proposer = proposer
        self.seqs: dict[int, np.ndarray] = {}

    def start(self, slot: int, prompt_ids: np.ndarray, key=None) -> None:
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        self.proposer.start(slot, prompt_ids, key=key)
        self.seqs[slot] = prompt_ids

    def step(self, slots, deltas, resync, limits):
        """Proposals per row, (sampling only) each proposing row's draft distributions, and the
        call's catch-up (``Proposal.catch_up``)."""
        for s, d, full in zip(slots, deltas, resync):
            self.seqs[s] = d if full else np.concatenate([self.seqs.get(s, EMPTY), d])
        out = self.proposer.propose(list(slots), [self.seqs[s] for s in slots], list(limits))
        return (out.tokens, None if out.draft_probs is None else [pack_probs(q) for q in out.draft_probs],
                out.catch_up)


class RemoteDraftProposer:
    """The Proposer protocol over a draft actor (any handle with ``draft_start``/``draft_step``).

    ``start`` is sent without waiting (Ray runs one caller's calls to an actor in order), so the
    draft prefill overlaps the target's, and ``learn`` (which the engine calls when the target's
    prefill is done) waits for it: a step's ``propose`` is then only its one round trip, and
    adaptive k prices the draft by its steps, not by its prefill. With ``overlap_start`` False (a
    pair whose actors take turns on the same cores) ``start`` waits for the draft's prefill, so the
    two prefills do not share the cores each was given whole. Per slot it
    mirrors what the remote has seen and sends only the new tail; a sequence that does not extend
    the mirror (it never happens with the engine, whose rows only grow) is sent whole. Token ids
    go both ways; with sampling the draft's distributions come back too (sparse, exact), since
    the verifier needs them."""

    forwards_per_token = 1

    def __init__(self, actor, overlap_start: bool = True):
        self.actor = actor
        self.overlap_start = overlap_start
        self.sent: dict[int, np.ndarray] = {}
        self._starts: list = []
        self.round_trips = 0

    def reset(self) -> None:
        """Forget everything (a new shard; after a failed one, stale start calls included)."""
        self.sent.clear()
        self._starts = []

    def start(self, slot: int, prompt_ids: np.ndarray, key=None) -> None:
        ids = np.array(prompt_ids, dtype=np.int64).reshape(-1)
        self._starts.append(self.actor.draft_start.remote(slot, ids, key))
        self.sent[slot] = ids
        if not self.overlap_start:
            self._settle()

    def _settle(self) -> None:
        if self._starts:  # a failed start surfaces here
            import ray

            starts, self._starts = self._starts, []
            ray.get(starts)

    def learn(self, slots, verified) -> None:
        self._settle()  # the rest it finds by comparing with the next sequence

    def propose(self, slots, seqs, limits):
        import ray

        self._settle()
        deltas, resync = [], []
        for s, seq in zip(slots, seqs):
            seq = np.asarray(seq, dtype=np.int64)
            base = self.sent.get(s, EMPTY)
            n = base.shape[0]
            if seq.shape[0] >= n and np.array_equal(seq[:n], base):
                deltas.append(seq[n:].copy())
                resync.append(False)
            else:
                deltas.append(seq.copy())
                resync.append(True)
            self.sent[s] = seq.copy()
        self.round_trips += 1
        out, qs, catch_up = ray.get(self.actor.draft_step.remote(list(slots), deltas, resync,
                                                                 [int(x) for x in limits]))
        from ..engine.proposers import Proposal

        return Proposal(out, None if qs is None else [unpack_probs(q) for q in qs], catch_up)


# -- the actor ---------------------------------------------------------------------------------

def _result_row(r) -> dict:
    return {
        "prompt_id": None if r.prompt_id is None else str(r.prompt_id),
        "generated_text": r.generated_text,
        "generated_ids": [int(t) for t in r.generated_ids],
        "num_prompt_tokens": int(r.num_prompt_tokens),
        "num_generated_tokens": int(r.num_generated_tokens),
        "finish_reason": r.finish_reason,
        "error": r.error,
        "ttft_s": float(r.ttft_s),
        "num_decode_iterations": int(r.num_decode_iterations),
        "num_accepted_tokens": int(r.num_accepted_tokens),
        "mean_num_accepted_tokens": float(r.mean_num_accepted_tokens),
    }


class _DeviceActor:
    """One device, one session, in the role ``role`` (a pair's actors: ``ACTORS``). Created with
    ``ray.remote(cls).options(...)``; a load error is kept and raised by every call, so the
    coordinator sees it without Ray restarting the actor to fail the same way again."""

    role: str = ""

    def __init__(self, job: dict, pair_id: int):
        from ..config import JobConfig

        role = self.role
        self.pair_id = pair_id
        self.error: Optional[str] = None
        self.device_id: Optional[int] = None
        self.threads = 1
        self.shares_cpus = False  # takes turns with its pair's other actor on the same cores (actor_threads)
        self._lock_fd: Optional[int] = None
        self._device = ThreadPoolExecutor(1, thread_name_prefix=f"{role}-device")  # see on_device
        t0 = time.perf_counter()
        try:
            cfg = JobConfig.model_validate(job)
            spec = dict(cfg.roles())[role]
            self._setup(cfg)
            on_node = pair_actors_on_node()
            self.threads, self.shares_cpus = actor_threads(cfg, on_node), shares_cpus(cfg, on_node)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bars in the driver log
            if spec.device == "qaic" and spec.device_ids:
                self.device_id, self._lock_fd = lock_device("qaic", spec.device_ids)
            self.on_device(self._load, cfg, spec)
        except Exception as e:  # noqa: BLE001 - reported through info()/run_shard
            self.error = f"{role} actor of pair {pair_id} failed to load: {type(e).__name__}: {e}"
            self.traceback = traceback.format_exc()
        self.load_s = time.perf_counter() - t0

    def _setup(self, cfg) -> None:
        """What the role needs before its model loads."""

    def _load(self, cfg, spec) -> None:
        raise NotImplementedError

    def _session(self, cfg, spec, **extra):
        """This role's session, as the registry says it is built (heads on the target in a
        heads mode); ``extra``: what the role's own class adds (the draft's readout)."""
        from ..sessions import load_session

        s, mode = cfg.spd, cfg.method
        kwargs = dict(role=self.role, device=spec.device, dtype=spec.dtype, full_batch_size=s.full_batch_size,
                      ctx_len=s.ctx_len, prefill_seq_len=s.prefill_seq_len,
                      num_speculative_tokens=s.num_speculative_tokens)
        if self.device_id is not None:
            kwargs["device_ids"] = [self.device_id]
        kwargs["packed_linears"] = spec.cpu_kernels  # CPU only; other devices ignore it
        if spec.qaic is not None:
            kwargs["qaic"] = spec.qaic.model_dump()
        if mode.loads_heads(self.role):
            kwargs.update(with_heads=True, speculator_path=cfg.speculator_path)
        return load_session(spec.model, **kwargs, **extra)

    def _check(self) -> None:
        if self.error:
            raise RuntimeError(self.error)

    def on_device(self, fn, *args):
        """``fn(*args)`` on the actor's device thread, the one thread that ever computes in it
        (the load and warm-up, every shard, audit and draft call). Ray runs the constructor and
        the calls of each concurrency group on threads of its own; each thread that runs torch
        gets a team of OpenMP threads of its own, and once a process holds more of them than it
        has CPUs, libgomp stops spinning between parallel regions (its throttled spin), so every
        region of every forward paid a wake-up, and a job's forwards cost more than the same
        forwards in one thread (docs/step-path.md, "One device thread")."""
        return self._device.submit(self._computing, fn, args).result()

    def _computing(self, fn, args):
        self._threads()
        return fn(*args)

    def _threads(self) -> int:
        """The actor's thread count for torch on the calling thread (Ray's workers start with
        OMP_NUM_THREADS at num_cpus)."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return torch.get_num_threads()

    def info(self, draft=None) -> dict:
        """Ready probe: where the actor runs and what it loaded."""
        import ray

        self._check()
        return {"role": self.role, "pair_id": self.pair_id, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "device_id": self.device_id, "vocab_size": int(self.session.vocab_size),
                "load_s": self.load_s, "threads": self.on_device(self._threads)}


class TargetActor(_DeviceActor):
    """The pair's target: its engine runs the shards; with a draft actor it also probes it."""

    role = TARGET
    _live = LiveCounts()  # see live()
    remote_draft: Optional[RemoteDraftProposer] = None  # draft mode: the target's way to its draft
    baseline = None  # the audit's target-only engine, built at the first audit

    def _setup(self, cfg) -> None:
        from ..io import fs

        self.out = fs.resolve(cfg.output.path, cfg.output.filesystem)  # where its shards' files go

    def _load(self, cfg, spec) -> None:
        hook = os.environ.get(ENGINE_HOOK)
        if hook:
            import importlib

            module, _, fn = hook.partition(":")
            self.engine = getattr(importlib.import_module(module), fn)(cfg)
            self.session = self.engine.session
            return
        from ..engine.engine import SpDEngine
        from ..engine.modes import draft_model
        from ..sessions import load_tokenizer

        s = cfg.spd
        self.session = self._session(cfg, spec)
        # In draft mode the draft actor's handle comes with every call (not with the constructor:
        # a restarted target then needs nothing that may be gone, and a restarted draft is just
        # the same handle).
        # where the draft takes turns with the target on the same cores, its prefill does too
        self.remote_draft = (RemoteDraftProposer(None, overlap_start=not self.shares_cpus)
                             if DRAFT in cfg.method.roles else None)
        self.engine = SpDEngine(cfg.mode, self.session, load_tokenizer(spec.model), s, proposer=self.remote_draft,
                                eos_token_ids=self.session.eos_token_ids, target_name=spec.model,
                                draft_name=draft_model(cfg) or "")

    def info(self, draft=None) -> dict:
        """Ready probe; with a draft it also probes the draft and checks vocabularies."""
        import ray

        out = super().info()
        if draft is not None:
            d = ray.get(draft.info.options(max_task_retries=-1).remote())  # a read: retried while it restarts
            if d["vocab_size"] != out["vocab_size"]:
                raise ValueError(f"draft and target vocabularies differ: {d['vocab_size']} vs "
                                 f"{out['vocab_size']} tokens")
            out[DRAFT] = d
        return out

    def run_shard(self, request: ShardRequest, draft=None) -> ShardDone:
        """Run a shard (io.dataset.Shard: its rows, the driver's error rows among them), audit
        the prompts at positions ``request.audit`` among those it ran (see cluster/audit.py),
        write the shard's results file to the output and return its record (no rows: the driver
        never holds generated text). ``audit_s``: the seconds of the audit's re-runs, kept apart
        from the shard's own busy time (its metrics are those of its one ``generate``)."""
        self._check()
        return self.on_device(self._run_shard, request, draft)

    def _run_shard(self, request: ShardRequest, draft) -> ShardDone:
        import ray

        from ..io import results as rio

        shard, attempt, audit = request.shard, request.attempt, request.audit
        t0 = time.perf_counter()
        if self.remote_draft is not None:
            self.remote_draft.reset()
            self.remote_draft.actor = draft
        self._live = LiveCounts(shard.shard_id)
        todo = [r for r in shard.rows if r.error is None]
        prompts, ids = [r.prompt for r in todo], [r.prompt_id for r in todo]
        suffix_cache.pull(self.engine, self.pair_id)  # suffix: the other pairs' finished rows join its index
        info = self.engine.generate(prompts, ids, on_result=self._count)
        suffix_cache.push(self.engine, self.pair_id)  # and this shard's go to them
        rows_once(shard, ids, [r.prompt_id for r in info.results])
        audit_rows, audit_s = [], 0.0
        if audit:
            t1 = time.perf_counter()
            audit_rows = self._audit(shard.shard_id, [info.results[i] for i in audit], [prompts[i] for i in audit],
                                     [ids[i] for i in audit])
            audit_s = time.perf_counter() - t1
        node = ray.get_runtime_context().get_node_id()
        rows = rio.result_rows(shard, [_result_row(r) for r in info.results], self.pair_id)
        by_id = {r.prompt_id: r.row for r in todo}
        rec = rio.shard_record(shard, rows, info.perf_metrics, pair_id=self.pair_id, node_id=node, attempts=attempt,
                               wall_s=time.perf_counter() - t0, audit_s=audit_s,
                               audit=[{**a, "row": by_id.get(a["prompt_id"]), "shard_id": shard.shard_id,
                                       "pair_id": self.pair_id} for a in audit_rows])
        rio.write_shard(self.out, shard.shard_id, rows, rec)
        return ShardDone(rec)

    def _count(self, r) -> None:
        live = self._live
        self._live = LiveCounts(live.shard_id, live.prompts + 1, live.tokens + r.num_generated_tokens,
                                live.steps + len(r.accepted_per_step), live.accepted + sum(r.accepted_per_step))

    def live(self) -> LiveCounts:
        """What the shard running now has finished: answered while ``run_shard`` runs (``live``
        has a concurrency group of its own), so the driver's progress moves per prompt."""
        return self._live

    def _audit(self, shard_id: int, job_results: list, prompts: list, prompt_ids: list) -> list[dict]:
        from .audit import baseline_engine, run_audit

        if self.baseline is None:
            self.baseline = baseline_engine(self.engine)
        return run_audit(self.engine, self.baseline, shard_id, job_results, prompts, prompt_ids)


class DraftActor(_DeviceActor):
    """The pair's draft: the registry's draft proposer over its own session, served to the target."""

    role = DRAFT

    def _load(self, cfg, spec) -> None:
        from ..engine.modes import draft_proposer
        from ..engine.warmup import warm_up

        self.session = self._session(cfg, spec, draft_vocab=cfg.spd.draft_vocab)
        warm_up(self.session, cfg.spd.full_batch_size, 2, last_only=True)  # a draft's calls: 1 or 2 tokens a row
        # with spd.overlap_draft the draft actor drafts the next window while the target verifies
        self.server = DraftServer(draft_proposer(cfg.spd, self.session))

    def draft_start(self, slot: int, prompt_ids: np.ndarray, key=None) -> None:
        self._check()
        self.on_device(self.server.start, slot, prompt_ids, key)

    def draft_step(self, slots, deltas, resync, limits):
        self._check()
        return self.on_device(self.server.step, slots, deltas, resync, limits)


ACTORS: dict[str, type[_DeviceActor]] = {TARGET: TargetActor, DRAFT: DraftActor}


def DeviceActor(role: str, job: dict, pair_id: int) -> _DeviceActor:  # noqa: N802 - the class it was
    """The actor of ``role`` (in process: tests, benchmarks)."""
    return ACTORS[role](job, pair_id)


class Pair:
    """Driver-side handle of one pair, placed as one unit: a placement group of one bundle per
    actor (the roles in order, target at 0; PAIR_STRATEGY), each actor scheduled into its bundle.
    Ray starts the actors once the group is placed, restarts a dead actor in its own bundle, and
    places the bundles of a dead node again; ``kill`` removes the group, freeing what it held."""

    def __init__(self, pair_id: int, job: dict, roles: Sequence[tuple[str, str]], cpus: int, max_restarts: int):
        """``roles``: (role, device) of each actor, as ``JobConfig.roles()`` gives them."""
        import ray
        from ray.util import placement_group

        self.pair_id = pair_id
        self.bundles = [bundle(device, cpus) for _, device in roles]
        self.pg = placement_group(self.bundles, strategy=PAIR_STRATEGY)
        self.placed = self.pg.ready()  # resolves once Ray has reserved every bundle
        self.actors: dict[str, Any] = {}
        # the draft first: its handle goes with the target's calls
        for i, (role, device) in reversed(list(enumerate(roles))):
            # `live` answers in a concurrency group of its own while shards run one at a time, in the
            # order sent, in the default group (so the next shard can wait on the actor: PREFETCH)
            cls = ray.remote(concurrency_groups={"live": 1})(ACTORS[role])
            self.actors[role] = cls.options(**actor_options(device, cpus, max_restarts, self.pg, i)).remote(
                job, pair_id)
        self.target, self.draft = self.actors[TARGET], self.actors.get(DRAFT)
        self.node_id: Optional[str] = None
        self.state = "starting"  # starting | ready | busy | recovering | dead
        self.probe_failures = 0
        self.recovering_since: Optional[float] = None
        self.shards_done = 0
        self.holding: dict = {}  # result ref -> shard id of the shards sent and not yet answered
        self.last_error: Optional[str] = None

    def probe(self):
        # A read, safe to repeat: Ray retries it while the actor restarts (in its bundle), so a
        # restart answers when the actor is back rather than burning the probe's retries at once.
        return self.target.info.options(max_task_retries=-1).remote(self.draft)

    def run(self, request: ShardRequest):
        return self.target.run_shard.remote(request, self.draft)

    def live(self):
        return self.target.live.options(concurrency_group="live").remote()

    def kill(self) -> None:
        import ray

        for a in self.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.pg is not None:
            from ray.util import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed, or Ray is gone
                pass
            self.pg = None
