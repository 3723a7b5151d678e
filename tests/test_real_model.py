"""The real SmolLM2-135M through the store: every mode token-identical to HF greedy `generate`,
with the seed's tokenization and with the chat template."""

import pytest
import torch

from spd_cluster.engine import SpDSettings, build_engine
from spd_cluster.sessions import load_model, load_tokenizer

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
NEW = 20


@pytest.fixture(scope="module")
def hf():
    return load_model(MODEL), load_tokenizer(MODEL)


def reference(hf, prompt, chat):
    model, tok = hf
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("mode, chat", [("baseline", False), ("pld", False), ("draft", True), ("pld", True)])
def test_smollm2_lossless(hf, mode, chat):
    settings = SpDSettings(num_speculative_tokens=3, prefill_seq_len=16, ctx_len=256, max_new_tokens=NEW,
                           full_batch_size=2, chat_template=chat)
    engine = build_engine(mode, settings, MODEL, draft_model=MODEL if mode == "draft" else None)
    info = engine.generate(PROMPTS)
    assert [g.tolist() for g in info.generated_ids] == [reference(hf, p, chat) for p in PROMPTS]
    assert all(info.generated_texts)
    if mode == "draft":  # the same model as draft: every proposal is accepted (adaptive k picks how many)
        m = info.perf_metrics
        assert m.proposed_per_position[0] > 0
        assert m.accepted_per_position == m.proposed_per_position
