"""Self-distilled multi-projection heads on a tiny random model: training lowers the loss, saved
heads reload bit-identically, multiproj with them stays token-identical to HF greedy `generate`,
and bad input (hidden size, empty dataset, existing output) fails clearly."""

import argparse
import json

import numpy as np
import pytest
import torch
from engine_world import ModelledTime, verify_cost
from tiny import VOCAB, tiny_model

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.sessions.packed import PackedLinear
from spd_cluster.sessions.heads import CONFIG_FILE, WEIGHTS_FILE, TurboHeads
from spd_cluster.sessions.torch_session import TorchSession
from spd_cluster.training import TrainingError, TrainSettings, add_cli, distill, read_prompts, train_heads

EOS = 2
TARGET = tiny_model("llama", seed=0)
G = np.random.default_rng(11)
PROMPTS = [G.integers(3, VOCAB, size=int(n)).tolist() for n in G.integers(3, 12, size=24)]
SETTINGS = dict(num_heads=3, steps=120, batch_size=64, lr=3e-3, warmup_steps=5, max_new_tokens=20, ctx_len=64,
                prefill_seq_len=8, gen_batch_size=4, eval_every=30, eval_fraction=0.2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one thread than on two busy ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "out"
    heads, report = train_heads(TARGET, None, PROMPTS, out, TrainSettings(**SETTINGS), model_name="tiny",
                                eos_token_ids=[EOS], progress=False)
    return heads, report, out


def test_training_lowers_loss_and_records_config(trained):
    heads, report, out = trained
    first, last = np.mean(report["losses"][:5]), np.mean(report["losses"][-10:])
    assert last < 0.75 * first, (first, last)  # ~0.5 over seeds and both tiny architectures
    assert report["accuracy_split"] == "heldout" and report["eval_rows"] > 0
    assert len(report["top1_accuracy"]) == 3 and all(0 <= a <= 1 for a in report["top1_accuracy"])
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["turbo_num_heads"] == 3 and cfg["turbo_num_layers"] == 1
    assert cfg["base_model"] == "tiny" and cfg["hidden_size"] == 64
    assert cfg["top1_accuracy"] == report["top1_accuracy"]
    assert cfg["training"]["steps"] == 120 and cfg["training"]["num_prompts"] == len(PROMPTS)


def test_recorded_hidden_states_match_a_plain_forward():
    """The rows captured during batched generation are the model's own final-norm hidden states
    at prompt_len - 1 .. len - 2, and the targets are the continuation shifted by 1 + h."""
    s = TrainSettings(**{**SETTINGS, "max_new_tokens": 10})
    data = distill(TARGET, None, PROMPTS[:6], s, eos_token_ids=[EOS], progress=False)
    # float32 on CPU generates on packed linears, and the model gets its own back for training
    assert all(type(m) is not PackedLinear for m in TARGET.modules())
    try:
        for i, p in enumerate(PROMPTS[:6]):
            rows = np.flatnonzero(data.seq == i)
            seq = p + hf_greedy(p, 10)
            with torch.no_grad():
                h = TARGET.base_model(torch.tensor([seq])).last_hidden_state[0].numpy()
            t = np.arange(len(p) - 1, len(seq) - 1)
            assert len(rows) == len(t)
            np.testing.assert_allclose(data.hidden[rows], h[t], atol=1e-4)
            for k in range(4):
                ok = t + 1 + k < len(seq)
                assert data.targets[rows[ok], k].tolist() == [seq[j] for j in t[ok] + 1 + k]
                assert (data.targets[rows[~ok], k] == -100).all()
    finally:
        data.rows.close()


def test_saved_heads_reload_with_identical_logits(trained):
    heads, _, out = trained
    loaded = TurboHeads.load(out, hidden_size=64)
    ids = np.array([PROMPTS[0][:8] + [0] * (8 - len(PROMPTS[0][:8]))])
    pos = np.where(np.arange(8) < len(PROMPTS[0][:8]), np.arange(8), -1)[None]
    inputs = {"input_ids": ids, "position_ids": pos, "batch_index": np.zeros((1, 1), dtype=np.int64),
              "num_logits_to_keep": np.arange(8).reshape(-1, 1)}
    a = TorchSession(TARGET, 1, 32, heads=heads).run(inputs)["logits"]
    b = TorchSession(TARGET, 1, 32, heads=loaded).run(inputs)["logits"]
    assert a.shape[2] == 4 and np.array_equal(a, b)


def hf_greedy(prompt, max_new=20):
    with torch.no_grad():
        out = TARGET.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("k,fbs", [(3, 1), (2, 3)])
def test_multiproj_with_trained_heads_is_lossless(trained, k, fbs, monkeypatch):
    """Adaptive k on a device's modelled time (engine_world.ModelledTime): its choices do not
    follow this host's load, which on a busy host priced every width out (1.0 tokens a step)."""
    heads = TurboHeads.load(trained[2])
    g = np.random.default_rng(5)
    prompts = [g.integers(3, VOCAB, size=n).tolist() for n in (4, 9, 6, 13)]
    settings = SpDSettings(num_speculative_tokens=k, prefill_seq_len=8, ctx_len=64, max_new_tokens=20,
                           full_batch_size=fbs)
    target = ModelledTime(monkeypatch).priced(TorchSession(TARGET, fbs, 64, heads=heads), verify_cost())
    info = SpDEngine("multiproj", target, None, settings, eos_token_ids=[EOS]).generate(prompts)
    assert [x.tolist() for x in info.generated_ids] == [hf_greedy(p) for p in prompts]
    assert info.perf_metrics.mean_num_accepted_tokens > 1.0  # the heads learned something


def test_wrong_hidden_size_fails_clearly(trained):
    out = trained[2]
    with pytest.raises(ValueError, match="hidden size 64 but the model's hidden size is 32"):
        TurboHeads.load(out, hidden_size=32)
    small = tiny_model("llama", seed=1, hidden=32)
    with pytest.raises(ValueError, match="hidden size"):
        TorchSession(small, 1, 32, heads=TurboHeads.load(out))
    with pytest.raises(ValueError, match="hidden size"):  # continuing training from those heads
        train_heads(small, None, PROMPTS, None, TrainSettings(**SETTINGS), init_heads=out, progress=False)


def test_kl_memmap_and_full_vocab(tmp_path):
    """The on-disk cache (budget 0), the KL loss and the full-vocabulary softmax run end to end."""
    s = TrainSettings(**{**SETTINGS, "steps": 8, "eval_every": 4, "kl_weight": 0.5, "vocab": "full",
                         "memory_budget_mb": 0, "max_new_tokens": 8})
    _, report = train_heads(TARGET, None, PROMPTS[:6], None, s, eos_token_ids=[EOS], cache_dir=str(tmp_path),
                            progress=False)
    assert report["hidden_on_disk"] and report["softmax_vocab"] == VOCAB
    assert np.isfinite(report["losses"]).all()
    assert list(tmp_path.iterdir()) == []  # the temp cache is gone


def test_dataset_formats_and_empty(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("def f(x):\n\n   \nclass A:\n")
    assert read_prompts(txt) == ["def f(x):", "class A:"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(jl) == ["a", "b"]
    csv = tmp_path / "p.csv"
    csv.write_text("id,prompt\n1,x\n2,y\n")
    assert read_prompts(csv) == ["x", "y"]
    for name, text in (("empty.txt", ""), ("blank.txt", "\n  \n"), ("e.jsonl", '{"prompt": ""}\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(TrainingError, match="no prompts"):
            read_prompts(tmp_path / name)
    with pytest.raises(TrainingError, match="empty dataset"):
        train_heads(TARGET, None, [], None, TrainSettings(**SETTINGS), progress=False)


def cli(argv):
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_existing_out_and_empty_dataset_through_cli(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f():\n")
    out = tmp_path / "out"
    out.mkdir()
    # both fail before any model loads (the model name is not even looked at)
    assert cli(["train-heads", "--model", "nope", "--dataset", str(prompts), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert cli(["train-heads", "--model", "nope", "--dataset", str(tmp_path / "empty.txt"),
                "--out", str(tmp_path / "new")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert cli(["train-heads", "--model", "nope", "--out", str(tmp_path / "new")]) == 2
    assert "give one of --dataset" in capsys.readouterr().err
    assert cli(["train-heads", "--model", "nope", "--out", str(tmp_path / "new"), "--dataset", str(prompts),
                "--distilled", "rows.npz"]) == 2
    assert "give one of --dataset" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="already exists"):
        train_heads(TARGET, None, PROMPTS, out, TrainSettings(**SETTINGS), progress=False)
    assert not (out / WEIGHTS_FILE).exists()


def test_cli_end_to_end_on_a_model_directory(tmp_path, capsys):
    """`train-heads` on a tiny model saved with a word-level tokenizer; then --overwrite."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(model_dir)
    TARGET.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(f"w{t}" for t in p) for p in PROMPTS[:12]) + "\n")
    out = tmp_path / "heads"
    argv = ["train-heads", "--model", str(model_dir), "--dataset", str(prompts), "--out", str(out),
            "--heads", "2", "--steps", "10", "--batch-size", "32", "--max-new-tokens", "10", "--ctx-len", "64",
            "--gen-batch-size", "3", "--threads", "1", "--no-progress", "--device", "cpu"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1 accuracy (heldout" in printed and "head2=" in printed
    # what more data would give, and how to use the heads: flags that exist
    assert "too few to be useful" in printed and "--distilled" in printed and "docs/heads.md" in printed
    assert "--mode" not in printed
    assert f"--set mode=multiproj --set speculator_path={out}" in printed
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["base_model"] == str(model_dir) and cfg["turbo_num_heads"] == 2
    assert cli(argv) == 2  # exists now
    assert cli(argv + ["--overwrite", "--heads", "3"]) == 0
    assert TurboHeads.load(out).num_heads == 3


def test_distilled_rows_saved_and_reused(tmp_path):
    """--save-distilled writes the rows; --distilled trains on them (several files concatenated,
    sequences apart) without generating, and refuses rows of another model or too few heads."""
    s = TrainSettings(**{**SETTINGS, "steps": 20, "max_new_tokens": 10})
    saved = tmp_path / "rows.npz"
    _, first = train_heads(TARGET, None, PROMPTS[:8], None, s, eos_token_ids=[EOS], progress=False,
                           save_distilled=saved)
    _, again = train_heads(TARGET, None, [], None, s, progress=False, distilled=[saved, saved])
    assert again["num_prompts"] == 16 and again["hidden_rows"] == 2 * first["hidden_rows"]
    assert again["generated_tokens"] == 2 * first["generated_tokens"] and again["distilled_from"] == [str(saved)] * 2
    _, same = train_heads(TARGET, None, [], None, s, progress=False, distilled=[saved])
    assert same["top1_accuracy"] == first["top1_accuracy"]  # same rows, same seed: same heads
    with pytest.raises(TrainingError, match="hidden size"):
        train_heads(tiny_model("llama", hidden=32), None, [], None, s, progress=False, distilled=[saved])
    with pytest.raises(TrainingError, match="needs targets for 6"):
        train_heads(TARGET, None, [], None, TrainSettings(**{**SETTINGS, "num_heads": 6}), progress=False,
                    distilled=[saved])


def test_distil_bar_counts_tokens_to_its_total(monkeypatch):
    """The distillation bar counts tokens (each prompt's budget), so its ETA holds from the first
    steps; a prompt ended early at EOS hands over what it left, and the bar ends at its total."""
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total, self.n, self.updates = total, 0, []
            bars.append(self)

        def update(self, k=1):
            self.n += k
            self.updates.append(k)

        def set_postfix_str(self, *a, **kw):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    s = TrainSettings(**{**SETTINGS, "max_new_tokens": 10})
    eos = [EOS, *range(3, 40)]  # many ids end a sequence: some end early
    data = distill(TARGET, None, PROMPTS[:6], s, eos_token_ids=eos, progress=True)
    (bar,) = bars
    assert bar.total == 6 * 10 and bar.n == bar.total
    assert data.num_tokens < bar.total  # some ended before their budget, and the bar still ends full
    assert len(bar.updates) > 6  # moved within prompts, not once per prompt


def test_advice_says_what_more_data_gives():
    from spd_cluster.training import advice

    few = advice({"generated_tokens": 1243})
    assert "1,243" in few and "too few" in few and "25k tokens: 0.72" in few and "--save-distilled" in few
    assert "too few" not in advice({"generated_tokens": 60_000})

