"""Build an engine from names: what scripts, Ray actors and benchmarks call."""

from __future__ import annotations

import logging
from pathlib import Path

from .engine import SpDEngine
from .modes import mode as mode_of
from .settings import SpDSettings

log = logging.getLogger("spd_cluster.engine")


def check_models(mode: str, target_model: str, draft_model: str | None = None,
                 speculator_path: str | None = None) -> None:
    """Fail before any weights load: a draft whose tokenizer differs from the target's (the
    token -> id maps themselves, read from the tokenizer files, and the models' vocabulary
    sizes), draft mode without a draft, multiproj without heads."""
    from transformers import AutoConfig

    from ..sessions.heads import TurboHeads
    from ..sessions.loader import _resolve

    spec = mode_of(mode)
    target_path = _resolve(target_model)
    if spec.needs_draft:
        if not draft_model:
            raise ValueError("draft mode needs a draft model")
        draft_path = _resolve(draft_model)
        tv = AutoConfig.from_pretrained(target_path).vocab_size
        dv = AutoConfig.from_pretrained(draft_path).vocab_size
        if tv != dv:
            raise ValueError(
                f"draft {draft_model!r} has a vocabulary of {dv} tokens, target {target_model!r} has {tv}: "
                "a draft must share the target's tokenizer"
            )
        if Path(draft_path).resolve() != Path(target_path).resolve():
            _check_same_tokenizer(target_model, target_path, draft_model, draft_path)
    if spec.uses_heads and TurboHeads.find(target_path, speculator_path) is None:
        where = (f"no heads at speculator_path {speculator_path!r}" if speculator_path
                 else "none in the model directory and no speculator_path given")
        raise ValueError(
            f"multiproj needs projection heads for {target_model!r}: {where}; train them with: spd-cluster "
            f"train-heads --model {target_model} --dataset PROMPTS --out {speculator_path or 'DIR'} (docs/heads.md)"
        )


def _check_same_tokenizer(target_model: str, target_path: str, draft_model: str, draft_path: str) -> None:
    """The draft proposes token ids that the target verifies: the same id must be the same token."""
    from transformers import AutoTokenizer

    try:
        tgt = AutoTokenizer.from_pretrained(target_path).get_vocab()
    except Exception as e:  # noqa: BLE001 - the job cannot tokenize without it anyway
        raise ValueError(f"target {target_model!r}: cannot read its tokenizer ({type(e).__name__}: {e})") from None
    try:
        drf = AutoTokenizer.from_pretrained(draft_path).get_vocab()
    except Exception as e:  # noqa: BLE001 - a draft's tokenizer files are only needed for this check
        log.warning("draft %r has no readable tokenizer (%s); only the vocabulary sizes were compared",
                    draft_model, f"{type(e).__name__}: {e}")
        return
    if tgt == drf:
        return
    moved = sorted(t for t in tgt.keys() & drf.keys() if tgt[t] != drf[t])
    only_t, only_d = sorted(tgt.keys() - drf.keys()), sorted(drf.keys() - tgt.keys())
    shown = [f"{t!r} is {drf[t]} in the draft, {tgt[t]} in the target" for t in moved[:3]]
    shown += [f"{t!r} ({tgt[t]}) is only in the target" for t in only_t[: max(0, 3 - len(shown))]]
    shown += [f"{t!r} ({drf[t]}) is only in the draft" for t in only_d[: max(0, 3 - len(shown))]]
    raise ValueError(
        f"draft {draft_model!r} and target {target_model!r} have different tokenizers "
        f"({len(drf)} and {len(tgt)} tokens; {len(moved)} map to other ids, {len(only_t)} only in the target, "
        f"{len(only_d)} only in the draft; e.g. {'; '.join(shown)}): a draft must share the target's tokenizer"
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
    spec = mode_of(mode)
    common = dict(full_batch_size=settings.full_batch_size, ctx_len=settings.ctx_len,
                  prefill_seq_len=settings.prefill_seq_len, num_speculative_tokens=settings.num_speculative_tokens,
                  packed_linears=cpu_kernels)
    target = load_session(target_model, role="target", device=device, dtype=dtype,
                          with_heads=spec.uses_heads, speculator_path=speculator_path,
                          device_ids=target_device_ids, **common)
    draft = None
    if spec.needs_draft:
        draft = load_session(draft_model, role="draft", device=draft_device or device,
                             dtype=draft_dtype or dtype, device_ids=draft_device_ids,
                             draft_vocab=settings.draft_vocab, **common)
    tokenizer = load_tokenizer(target_model)
    return SpDEngine(mode, target, tokenizer, settings, draft=draft,
                     eos_token_ids=target.eos_token_ids,
                     target_name=target_model, draft_name=draft_model or "")
