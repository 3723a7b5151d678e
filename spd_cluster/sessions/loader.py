"""Build a session from a model name (store alias, directory, .gguf file or HF id)."""

from __future__ import annotations

from functools import lru_cache

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(model: str) -> str:
    from ..store import resolve_model  # the store converts packaged GGUF models once

    return resolve_model(model)


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(model: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device here")
    path = _resolve(model)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), attn_implementation="sdpa")
    return m.to(device).eval()


@lru_cache(maxsize=8)
def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_resolve(model))


def eos_token_ids(model_or_config, tokenizer=None) -> list[int]:
    """The ids that end generation, as HF ``generate`` sees them: the generation config's
    ``eos_token_id`` (an int or a list), else the tokenizer's."""
    gen = getattr(model_or_config, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def load_session(
    model: str,
    *,
    role: str = "target",
    device: str = "cpu",
    dtype: str = "float32",
    full_batch_size: int,
    ctx_len: int,
    prefill_seq_len: int = 32,
    num_speculative_tokens: int = 4,
    with_heads: bool = False,
    speculator_path: str | None = None,
    device_ids: list[int] | None = None,
    packed_linears: bool | None = None,
    qaic: dict | None = None,
    draft_vocab: int | None = None,
):
    """A session for ``model`` in ``role`` (target | draft) on ``device`` (cpu | cuda[:N] | qaic).
    ``with_heads`` attaches multi-projection heads (multiproj targets): from ``speculator_path``,
    else from the model directory. The session carries ``eos_token_ids`` for the engine.
    ``packed_linears`` (default: on, on CPU) runs linears on kernels that make a k+1-token verify
    nearly as cheap as one decode step: float32 on prepacked oneDNN weights (sessions/packed.py),
    bfloat16 on our batch-invariant AVX2 kernel (sessions/bf16.py).
    ``qaic``: how a qaic model is compiled and run (``QaicSpec`` of the job config, as a dict).
    ``draft_vocab``: a draft's logits over the first that many ids and each slot's fed ids
    (sessions/readout.py); None: the whole vocabulary."""
    if device == "qaic":
        if draft_vocab is not None:
            raise ValueError("spd.draft_vocab applies to cpu and cuda drafts: a qaic draft runs the lm_head its "
                             "program was compiled with (set spd.draft_vocab: null)")
        from .qaic import load_qaic_session

        return load_qaic_session(
            model, role, full_batch_size=full_batch_size, ctx_len=ctx_len, prefill_seq_len=prefill_seq_len,
            num_speculative_tokens=num_speculative_tokens, device_ids=device_ids or [0],
            speculator_path=(speculator_path or model) if with_heads else None,
            num_threads=torch.get_num_threads(), **(qaic or {}),
        )
    from .heads import TurboHeads
    from .torch_session import TorchSession

    if device == "cuda" and device_ids:
        device = f"cuda:{device_ids[0]}"
    m = load_model(model, dtype, device)
    heads = None
    if with_heads:
        where = TurboHeads.find(_resolve(model), speculator_path)
        if where is None:
            raise FileNotFoundError(
                f"multiproj needs projection heads for {model!r}: none in the model directory and no "
                "speculator_path given (train some with `spd-cluster train-heads`)"
            )
        heads = TurboHeads.load(where, hidden_size=m.config.hidden_size)
    if packed_linears is None:
        packed_linears = device == "cpu"
    return TorchSession(m, full_batch_size, ctx_len, heads=heads, pack=packed_linears, eos_token_ids=eos_token_ids(m),
                        draft_vocab=draft_vocab)
