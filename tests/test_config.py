"""Job config: keys, overrides, and errors that name the field and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spd_cluster.config import ConfigError, JobConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "mode": "pld",
    "target": {"model": "smollm2-135m", "dtype": "float32", "device": "cpu"},
    "dataset": {"path": "data/sample_prompts.jsonl", "prompt_column": "prompt", "id_column": "id"},
    "output": {"path": "out/t"},
}


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_issue_example_keys_load(tmp_path):
    text = """
name: demo
mode: pld
target: {model: smollm2-135m, dtype: float32, device: cpu}
draft: {model: qwen2.5-coder-0.5b, dtype: bfloat16, device: cpu}
speculator_path: null
dataset: {path: data/prompts.jsonl, prompt_column: prompt, id_column: id}
output: {path: out/demo}
spd: {num_speculative_tokens: 4, max_ngram_size: 3, prefill_seq_len: 32, ctx_len: 1024, max_new_tokens: 128, full_batch_size: 4, ignore_eos: false, chat_template: false}
cluster: {address: null, num_pairs: 1, shard_size: 16, cpus_per_actor: 1}
"""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert cfg.mode == "pld" and cfg.spd.max_new_tokens == 128 and cfg.cluster.max_retries == 3
    assert cfg.output.overwrite is False and cfg.target.device_ids is None


def test_overrides_are_yaml_scalars(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["cluster.num_pairs=2", "spd.ignore_eos=true", "output.path=out/x",
                                              "cluster.address=auto", "name=has spaces = ok", "spd.ctx_len=256"])
    assert cfg.cluster.num_pairs == 2 and cfg.spd.ignore_eos is True and cfg.output.path == "out/x"
    assert cfg.cluster.address == "auto" and cfg.name == "has spaces = ok" and cfg.spd.ctx_len == 256
    # a new section can be made by an override
    cfg = load_config(write(tmp_path, BASE), ["mode=draft", "draft.model=qwen2.5-coder-0.5b"])
    assert cfg.draft.model == "qwen2.5-coder-0.5b"


@pytest.mark.parametrize("overrides, needles", [
    (["mode=sampling"], ["mode", "'sampling'"]),
    (["spd.num_speculative_tokens=0"], ["spd.num_speculative_tokens", "0"]),
    (["spd.ctx_len=16", "spd.prefill_seq_len=32"], ["ctx_len (16)", "prefill_seq_len (32)"]),
    (["cluster.num_pairs=0"], ["cluster.num_pairs", "0"]),
    (["cluster.shard_size=-3"], ["cluster.shard_size", "-3"]),
    (["target.dtype=int8"], ["target.dtype", "'int8'"]),
    (["cluster.bogus=1"], ["cluster.bogus", "unknown key"]),
    (["mode=draft"], ["draft", "needs a 'draft' section"]),
    (["target.device_ids=[0, 1]"], ["target", "qaic only"]),
    (["spd.max_new_tokens=many"], ["spd.max_new_tokens", "'many'"]),
])
def test_errors_name_field_and_value(tmp_path, overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_missing_sections_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="dataset: required field is missing"):
        config_from_dict({k: v for k, v in BASE.items() if k != "dataset"})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [pld\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(write(tmp_path, BASE), ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(write(tmp_path, BASE), ["mode.x=1"])


def test_qaic_device_ids_must_not_overlap():
    data = dict(BASE, mode="draft",
                target={"model": "a", "device": "qaic", "device_ids": [0, 1]},
                draft={"model": "b", "device": "qaic", "device_ids": [1, 2]})
    with pytest.raises(ConfigError, match=r"share \[1\]"):
        config_from_dict(data)
    data["draft"]["device_ids"] = [2, 3]
    assert config_from_dict(data).draft.device_ids == [2, 3]


def test_identity_ignores_placement_but_not_outputs():
    a = config_from_dict(dict(BASE))
    b = config_from_dict(dict(BASE), ["cluster.num_pairs=4", "cluster.cpus_per_actor=2", "name=other",
                                      "output.overwrite=true", "draft.model=unused-in-pld",
                                      "audit.fail_on_mismatch=true"])
    assert a.identity_hash("x") == b.identity_hash("x")
    assert a.identity_hash("x") != a.identity_hash("y")  # dataset contents
    for o in ("spd.max_new_tokens=7", "cluster.shard_size=3", "target.dtype=bfloat16", "mode=baseline",
              "audit.fraction=0.5", "audit.min_prompts=1", "audit.seed=3"):
        assert config_from_dict(dict(BASE), [o]).identity_hash("x") != a.identity_hash("x"), o


def test_audit_section_is_validated():
    assert config_from_dict(dict(BASE)).audit.fraction == 0.02  # on by default
    with pytest.raises(ConfigError, match=r"audit.fraction: .*less than or equal to 1"):
        config_from_dict(dict(BASE), ["audit.fraction=2"])
    with pytest.raises(ConfigError, match=r"audit.sample: unknown key"):
        config_from_dict(dict(BASE), ["audit.sample=3"])


def test_shipped_configs_validate():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"demo", "qwen_draft", "pld", "multiproj", "baseline"}
    for p in paths:
        cfg = load_config(p)
        assert isinstance(cfg, JobConfig)
        assert (REPO / cfg.dataset.path).is_file(), f"{p.name}: {cfg.dataset.path}"
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.target.model == "smollm2-135m" and demo.mode == "pld" and demo.target.dtype == "float32"
    assert load_config(REPO / "configs" / "qwen_draft.yaml").mode == "draft"


@pytest.mark.parametrize("overrides, hint", [
    (["cluster.num_pair=2"], "cluster.num_pair: unknown key (value 2); did you mean 'cluster.num_pairs'?"),
    (["spd.max_new_token=8"], "did you mean 'spd.max_new_tokens'?"),
    (["dataset.prompt_col=text"], "did you mean 'dataset.prompt_column'?"),
    (["target.cpu_kernel=false"], "did you mean 'target.cpu_kernels'?"),
    (["clustr.num_pairs=2"], "clustr: unknown key (value {'num_pairs': 2}); did you mean 'cluster'?"),
    (["audit.fraktion=0.1"], "did you mean 'audit.fraction'?"),
])
def test_a_typo_gets_the_nearest_key(tmp_path, overrides, hint):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides)
    assert hint in str(e.value), str(e.value)


def test_an_unknown_key_far_from_any_gets_no_guess(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), ["cluster.zzzzqqq=1"])
    assert "cluster.zzzzqqq: unknown key" in str(e.value) and "did you mean" not in str(e.value)


def _model_dir(path: Path, vocab: dict) -> str:
    """A model directory with a config and a tokenizer and no weights: all check_models reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(path)
    LlamaConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(path)
    return str(path)


def test_a_draft_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    from spd_cluster.cluster.coordinator import check_job_models

    words = ["<unk>", "the", "quick", "brown", "fox", "jumps"]
    target = _model_dir(tmp_path / "target", {w: i for i, w in enumerate(words)})
    same = _model_dir(tmp_path / "same", {w: i for i, w in enumerate(words)})
    swapped = {w: i for i, w in enumerate(words)}
    swapped["quick"], swapped["brown"] = swapped["brown"], swapped["quick"]
    other = _model_dir(tmp_path / "other", swapped)
    cfg = lambda draft: config_from_dict(dict(BASE, mode="draft", target={"model": target},  # noqa: E731
                                              draft={"model": draft}))
    check_job_models(cfg(same))  # the same tokenizer in another directory passes
    with pytest.raises(ConfigError) as e:
        check_job_models(cfg(other))
    msg = str(e.value)
    assert f"draft {other!r} and target {target!r} have different tokenizers" in msg, msg
    assert "2 map to other ids" in msg and "'brown' is 2 in the draft, 3 in the target" in msg, msg
    assert "a draft must share the target's tokenizer" in msg


def test_actor_threads_share_a_pairs_cpus_only_where_its_actors_take_turns(tmp_path):
    from spd_cluster.cluster.actors import actor_threads

    def cfg(mode="draft", **cluster):
        data = {"name": "t", "mode": mode, "target": {"model": "m"}, "draft": {"model": "d"},
                "dataset": {"path": "x.jsonl"}, "output": {"path": str(tmp_path)},
                "cluster": {"cpus_per_actor": 2, **cluster}}
        return config_from_dict(data, [])

    assert actor_threads(cfg(), on_node=2) == 4  # target and draft take turns on the pair's 4 CPUs
    assert actor_threads(cfg(), on_node=1) == 2  # a pair split across nodes: each its own
    assert actor_threads(cfg("pld"), on_node=1) == 2  # one actor a pair
    assert actor_threads(cfg(threads_per_actor=3), on_node=2) == 3
    over = config_from_dict({**cfg().model_dump(mode="json"), "spd": {"overlap_draft": True}}, [])
    assert actor_threads(over, on_node=2) == 2  # the draft drafts while the target verifies
