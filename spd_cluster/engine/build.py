"""Build an engine from names: what scripts, Ray actors and benchmarks call."""

from __future__ import annotations

from .engine import SpDEngine
from .settings import MODES, SpDSettings


def check_models(mode: str, target_model: str, draft_model: str | None = None,
                 speculator_path: str | None = None) -> None:
    """Fail before any weights load: a draft whose vocabulary differs from the target's, draft
    mode without a draft, multiproj without heads."""
    from transformers import AutoConfig

    from ..sessions.heads import TurboHeads
    from ..sessions.loader import _resolve

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    target_path = _resolve(target_model)
    if mode == "draft":
        if not draft_model:
            raise ValueError("draft mode needs a draft model")
        tv = AutoConfig.from_pretrained(target_path).vocab_size
        dv = AutoConfig.from_pretrained(_resolve(draft_model)).vocab_size
        if tv != dv:
            raise ValueError(
                f"draft {draft_model!r} has a vocabulary of {dv} tokens, target {target_model!r} has {tv}: "
                "a draft must share the target's tokenizer"
            )
    if mode == "multiproj" and TurboHeads.find(target_path, speculator_path) is None:
        raise ValueError(
            f"multiproj needs projection heads for {target_model!r}: none in the model directory and no "
            "speculator_path given (train some with `spd-cluster train-heads`)"
        )


def build_engine(
    mode: str,
    settings: SpDSettings,
    target_model: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    draft_model: str | None = None,
    draft_dtype: str | None = None,
    draft_device: str | None = None,
    speculator_path: str | None = None,
    target_device_ids: list[int] | None = None,
    draft_device_ids: list[int] | None = None,
    cpu_kernels: bool = True,
) -> SpDEngine:
    from ..sessions.loader import load_session, load_tokenizer

    check_models(mode, target_model, draft_model, speculator_path)
    common = dict(full_batch_size=settings.full_batch_size, ctx_len=settings.ctx_len,
                  prefill_seq_len=settings.prefill_seq_len, num_speculative_tokens=settings.num_speculative_tokens,
                  packed_linears=cpu_kernels)
    target = load_session(target_model, role="target", device=device, dtype=dtype,
                          with_heads=mode == "multiproj", speculator_path=speculator_path,
                          device_ids=target_device_ids, **common)
    draft = None
    if mode == "draft":
        draft = load_session(draft_model, role="draft", device=draft_device or device,
                             dtype=draft_dtype or dtype, device_ids=draft_device_ids, **common)
    tokenizer = load_tokenizer(target_model)
    return SpDEngine(mode, target, tokenizer, settings, draft=draft,
                     eos_token_ids=getattr(target, "eos_token_ids", None),
                     target_name=target_model, draft_name=draft_model or "")
