"""What the job tests share that is not a fixture (fixtures are in conftest.py): the tiny
model's tokenizer, prompts, a job config, the undisturbed answer, an in-process stand-in pair."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from spd_cluster.config import config_from_dict
from spd_cluster.io.dataset import iter_shards, scan


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b\n",
              "speculative decoding on ray, one device per actor"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


GOOD = ["the quick brown fox", "def add(a, b):\n    return a + b\n\ndef add(a, b):", "hello world",
        "speculative decoding on ray with the quick brown fox jumps over the lazy dog", "one device per actor",
        "the lazy dog", "return a + b", "on ray, on ray, on ray", "fox fox fox", "def"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tiny: str, dataset: Path, out: Path, **over):
    data = {
        "name": "t", "mode": "pld", "target": {"model": tiny},
        "dataset": {"path": str(dataset), "id_column": "id"}, "output": {"path": str(out)},
        "spd": {"num_speculative_tokens": 3, "max_new_tokens": 24, "ctx_len": 128, "prefill_seq_len": 16,
                "full_batch_size": 2},
        "cluster": {"num_pairs": 2, "shard_size": 4, "cpus_per_actor": 1, "max_retries": 2},
    }
    return config_from_dict(data, [f"{k}={v}" for k, v in over.items()])


def reference(tiny: str, cfg) -> dict[int, list[int]]:
    """The undisturbed answer: the in-process engine over each shard, row -> generated ids."""
    from spd_cluster.engine.engine import SpDEngine
    from spd_cluster.sessions import load_session, load_tokenizer

    s = cfg.spd
    session = load_session(tiny, full_batch_size=s.full_batch_size, ctx_len=s.ctx_len)
    engine = SpDEngine(cfg.mode, session, load_tokenizer(tiny), s, eos_token_ids=session.eos_token_ids)
    info = scan(cfg.dataset.path, "prompt", cfg.dataset.id_column)
    out = {}
    for shard in iter_shards(info, cfg.cluster.shard_size, "prompt", cfg.dataset.id_column):
        todo = [r for r in shard.rows if r.error is None]
        res = engine.generate([r.prompt for r in todo]).results
        out.update({r.row: list(x.generated_ids) for r, x in zip(todo, res) if x.finish_reason != "error"})
    return out


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results").sort_values("row").reset_index(drop=True)


class InProcessPair:
    """A stand-in for actors.Pair: the real DeviceActor (engine, audit, shard file) in the driver
    process, one per model, kept across jobs (the output is each job's). Subclasses change
    ``run``."""

    actors: dict = {}

    def __init__(self, pair_id, job, *args):
        from spd_cluster.cluster.actors import TargetActor
        from spd_cluster.io import fs

        model = job["target"]["model"]
        if model not in self.actors:
            self.actors[model] = TargetActor(job, pair_id)
        self.actor = self.actors[model]
        self.actor.out = fs.resolve(job["output"]["path"], job["output"].get("filesystem"))
        self.pair_id, self.node_id, self.state, self.holding = pair_id, None, "starting", {}
        self.probe_failures, self.recovering_since, self.shards_done, self.last_error = 0, None, 0, None

    def probe(self):
        import ray

        return ray.put({"node_id": "driver"})

    def run(self, request):
        import ray

        self.actor.pair_id = self.pair_id
        return ray.put(self.actor.run_shard(request))

    def live(self):
        import ray

        from spd_cluster.cluster.messages import LiveCounts

        return ray.put(LiveCounts())

    def kill(self):
        pass
