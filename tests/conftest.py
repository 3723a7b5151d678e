import os

# Ray must use loopback for every address in tests (never the machine's outward IP).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests use tiny models: one intra-op thread avoids OpenMP spin contention on a busy 2-core box.
torch.set_num_threads(1)

# The QEfficient lane (`make test-qaic`, .venv-qaic) runs the tests of QEfficient's real graphs;
# the current-releases lane (.venv) has no QEfficient and does not collect them. The lane sets
# SPD_CLUSTER_QEFF_LANE=1 so that a broken QEfficient install fails instead of running less.
import importlib.util  # noqa: E402

HAVE_QEFFICIENT = importlib.util.find_spec("QEfficient") is not None
if os.environ.get("SPD_CLUSTER_QEFF_LANE") == "1" and not HAVE_QEFFICIENT:
    raise RuntimeError("SPD_CLUSTER_QEFF_LANE=1 but QEfficient is not installed here: run `make setup-qaic`")
collect_ignore = [] if HAVE_QEFFICIENT else ["test_qeff_standin.py", "test_accept_paths.py"]

# -- fixtures the test modules share (a test module never imports another's) --------------------
import pytest  # noqa: E402

from s3server import s3  # noqa: E402,F401 - the fixture: a moto S3 server on 127.0.0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny random llama with its own BPE tokenizer, saved as an HF model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import build_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharp logits: no greedy near-ties between thread counts
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def ray2():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             logging_level="WARNING")
    yield
    ray.shutdown()  # a Ray as small as this machine: 2 CPUs


@pytest.fixture(scope="module")
def local_ray():
    """Ray on 127.0.0.1 with 4 CPUs, for the module's tests."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, logging_level="WARNING")
    yield
    ray.shutdown()
