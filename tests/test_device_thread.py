"""An actor computes on one thread: its load and warm-up, every shard and every draft call.

Ray runs an actor's constructor and the calls of each concurrency group on threads of its own;
torch run from several of them gives the process an OpenMP team per thread, more threads than
CPUs, and libgomp then sleeps between parallel regions (actors.py: ``on_device``)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from spd_cluster.cluster.actors import DraftActor, TargetActor
from spd_cluster.cluster.messages import ShardRequest
from spd_cluster.io.dataset import iter_shards, scan
from spd_cluster.sessions.torch_session import TorchSession

from helpers import GOOD, make_cfg, write_jsonl


def _on_a_thread(fn, *args):
    """Call ``fn`` on a new thread, as Ray calls an actor's method on a thread of its pool; what it
    raises is raised here."""
    with ThreadPoolExecutor(1) as caller:
        return caller.submit(fn, *args).result()


def test_every_forward_of_a_pairs_actors_runs_on_the_actors_one_device_thread(tiny, local_ray, tmp_path, monkeypatch):
    seen: list[tuple[str, int]] = []
    run = TorchSession.run

    def recorded(self, inputs):
        seen.append((threading.current_thread().name, threading.get_ident()))
        return run(self, inputs)

    monkeypatch.setattr(TorchSession, "run", recorded)
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(GOOD[:3])])
    cfg = make_cfg(tiny, data, tmp_path / "out", mode="draft", **{"draft.model": tiny, "cluster.num_pairs": 1})
    job = cfg.model_dump(mode="json")

    draft = _on_a_thread(DraftActor, job, 0)  # its warm-up runs forwards while it loads
    assert draft.error is None, draft.error
    loaded = list(seen)
    assert loaded, "the draft actor warms its session up as it loads"
    _on_a_thread(draft.draft_start, 0, list(range(1, 6)))
    _on_a_thread(draft.draft_step, [0], [list(range(6, 8))], [False], [2])
    assert len({t for _, t in seen}) == 1, f"forwards ran on {sorted({n for n, _ in seen})}"
    assert seen[-1][0].startswith("draft-device")
    assert len(seen) > len(loaded), "the calls ran forwards too"

    seen.clear()
    pld = make_cfg(tiny, data, tmp_path / "out", **{"cluster.num_pairs": 1}).model_dump(mode="json")
    target = _on_a_thread(TargetActor, pld, 0)
    assert target.error is None, target.error
    shard = next(iter_shards(scan(str(data), "prompt", "id"), 4, "prompt", "id"))
    _on_a_thread(target.run_shard, ShardRequest(shard, 1, []), None)
    assert seen and len({t for _, t in seen}) == 1 and seen[0][0].startswith("target-device"), \
        sorted({n for n, _ in seen})
