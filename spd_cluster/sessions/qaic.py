"""Cloud AI 100 backend of the device-session contract, through QEfficient (imported lazily).

QEfficient compiles a model into a QPC with fixed specialisations. With continuous batching:
  * prefill: batch 1, ``prefill_seq_len`` columns, logits of the last token only;
  * decode:  batch ``full_batch_size``, ``k + 1`` columns for a target (keeping ``k + 1``
    logits) or 1 column for a draft (keeping 1).
The contract in ``base`` allows any batch/sequence shape, so ``QaicSession.run`` maps each call
onto those: rows are padded to the compiled batch with unused slots at position -1 (no KV
write) and columns are padded/cut into compiled-width chunks, again with -1 positions. From
each row it returns the logits window the contract asks for. Windows wider than one logit
only exist in the target's decode specialisation, so ``num_logits_to_keep > 1`` needs a call
at most ``k + 1`` columns wide.

Nothing here imports QEfficient at module import: machines without the Cloud AI 100 SDK import
this file fine, and only ``load_qaic_session`` needs it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import SessionInputError, argmax_outputs, check_inputs, keep_index

INSTALL_HINT = (
    "install QEfficient beside spd_cluster without its pinned torch wheels: `make setup-qaic` (a venv in "
    ".venv-qaic), or by hand `pip install --no-deps 'qefficient @ git+https://github.com/quic/efficient-transformers'` "
    "plus its pins (constraints/qaic.txt); a card also needs the Cloud AI 100 platform and apps SDKs "
    "(qaicrt and qaic-compile under /opt/qti-aic). Without a card, `qaic: {runtime: onnxruntime}` runs the same "
    "job on QEfficient's exported graph; `device: cpu` or `cuda` needs neither"
)
# Targets QEfficient's SpD transform can turn into a TLM (several logits) or a turbo model; kept
# here so the driver checks a job without importing QEfficient (a test keeps it equal to
# QEfficient's own SpDTransform list).
SPD_MODEL_TYPES = ("llama", "qwen2", "qwen3")
RUNTIMES = ("qaic", "onnxruntime")
TURBO_FILES = ("speculator_config.json", "speculator.safetensors")


class QaicUnavailableError(RuntimeError):
    """QEfficient or the Cloud AI 100 runtime cannot be imported here."""


@dataclass(frozen=True)
class _Spec:
    """One compiled specialisation: rows per run, columns per run, logits kept per row."""

    batch: int
    width: int
    keep: int


class QaicSession:
    """A compiled QPC behind ``DeviceSession``; see the module docstring for the shape mapping."""

    def __init__(self, session: Any, *, full_batch_size: int, ctx_len: int, vocab_size: int, num_heads: int,
                 prefill_seq_len: int, decode_width: int, is_target: bool, eos_token_ids: list[int] | None = None,
                 head_vocab: np.ndarray | None = None, qpc_path: str | None = None):
        """``head_vocab``: the token ids heads trained by us may propose (``TurboHeads.vocab``).
        QEfficient's turbo graph applies the whole lm_head to the heads, so the heads' logits of
        every other token are set to -inf here: their argmax and softmax are then over the same
        tokens as our PyTorch session's, and the card proposes what it would."""
        self.session, self.qpc_path = session, qpc_path
        self.full_batch_size, self.ctx_len = full_batch_size, ctx_len
        self.vocab_size, self.num_heads = vocab_size, num_heads
        self.eos_token_ids = list(eos_token_ids or [])
        self.is_target = is_target
        prefill_batch = full_batch_size if prefill_seq_len == 1 else 1  # QEfficient's CB rule
        self.specs = (
            _Spec(prefill_batch, prefill_seq_len, 1),
            _Spec(full_batch_size, decode_width, decode_width if is_target else 1),
        )
        # KV lives on the device between calls: never copy it in or out.
        session.skip_buffers({n for n in session.input_names if n.startswith("past_")})
        session.skip_buffers({n for n in session.output_names if n.endswith("_RetainedState")})
        self._inputs = set(session.input_names)
        self._buffer_shape: tuple[int, ...] | None = None
        self._off_vocab = None
        if head_vocab is not None and num_heads:
            self._off_vocab = np.ones(vocab_size, dtype=bool)
            self._off_vocab[np.asarray(head_vocab, dtype=np.int64)] = False

    def _pick(self, b: int, s: int, n: int) -> _Spec:
        """The specialisation needing the fewest device runs that can return n logits a row."""
        ok = [sp for sp in self.specs if n == 1 or (s <= sp.width and n <= sp.keep)]
        if not ok:
            raise SessionInputError(
                f"num_logits_to_keep={n} needs a call of at most {self.specs[1].width} columns on this "
                f"compiled {'target' if self.is_target else 'draft'} (got {s}); QAIC prefill keeps 1 logit"
            )
        return min(ok, key=lambda sp: (-(-b // sp.batch)) * (-(-s // sp.width)))

    def _run_one(self, ids: np.ndarray, pos: np.ndarray, slots: np.ndarray, spec: _Spec) -> np.ndarray:
        shape = (spec.batch, spec.keep) + ((self.num_heads + 1,) if self.num_heads else ()) + (self.vocab_size,)
        if shape != self._buffer_shape:  # the logits buffer must match this specialisation's output
            self.session.set_buffers({"logits": np.zeros(shape, np.float32)})
            self._buffer_shape = shape
        feed = {"input_ids": ids, "position_ids": pos, "batch_index": slots.reshape(-1, 1),
                "num_logits_to_keep": np.zeros((spec.keep, 1), np.int64)}
        out = self.session.run({k: v for k, v in feed.items() if k in self._inputs})
        return np.asarray(out["logits"], dtype=np.float32)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        b, s = c.input_ids.shape
        spec = self._pick(b, s, c.num_logits)
        want = keep_index(c.position_ids, c.num_logits)  # [b, n] columns the contract returns
        last = c.position_ids.argmax(axis=1)  # every kept column lies in the chunk holding this one
        tail = (self.num_heads + 1,) if self.num_heads else ()
        logits = np.zeros((b, c.num_logits) + tail + (self.vocab_size,), np.float32)
        for r0 in range(0, b, spec.batch):
            rows = np.arange(r0, min(r0 + spec.batch, b))
            used = set(c.batch_index[rows].tolist())
            free = [x for x in range(self.full_batch_size) if x not in used]  # slots for padding rows
            slots = np.concatenate([c.batch_index[rows], free[: spec.batch - rows.size]]).astype(np.int64)
            for c0 in range(0, s, spec.width):
                hit = rows[(last[rows] >= c0) & (last[rows] < c0 + spec.width)]
                cols = slice(c0, min(c0 + spec.width, s))
                if (c.position_ids[rows, cols] < 0).all():
                    continue  # only padding: nothing to write, nothing to return
                ids = np.zeros((spec.batch, spec.width), np.int64)
                pos = np.full((spec.batch, spec.width), -1, np.int64)
                ids[: rows.size, : cols.stop - c0] = c.input_ids[rows, cols]
                pos[: rows.size, : cols.stop - c0] = c.position_ids[rows, cols]
                out = self._run_one(ids, pos, slots, spec)
                if hit.size == 0:
                    continue
                # QEfficient keeps the `spec.keep` columns ending at each row's last valid column.
                local = hit - r0
                lower = np.maximum(last[hit] - c0 + 1 - spec.keep, 0)
                offset = want[hit] - c0 - lower[:, None]
                logits[hit] = out[local[:, None], offset]
        if self._off_vocab is not None:
            logits[:, :, 1:, self._off_vocab] = -np.inf
        if self.num_heads and not c.head_guesses:
            logits = logits[:, :, 0]
        if c.argmax:  # the card returns logits; the contract's argmax is taken as they arrive
            return argmax_outputs(c, want, logits, self.num_heads)
        return {"logits": logits}


def _turbo_dir(model_dir: str, speculator_path: str) -> str:
    """QEfficient reads the turbo files from the model directory itself (``from_pretrained``
    overwrites ``qaic_config["pretrained_model_name_or_path"]`` with the model path), so heads
    kept elsewhere are joined to the model in a directory of symlinks under the store cache."""
    model, spec = Path(model_dir), Path(speculator_path)
    if str(spec) == model_dir or (model.exists() and spec.resolve() == model.resolve()):
        return model_dir
    if not model.is_dir():
        raise ValueError(f"speculator_path {speculator_path!r} needs a local model directory, got {model_dir!r}")
    missing = [f for f in TURBO_FILES if not (spec / f).is_file()]
    if missing:
        raise FileNotFoundError(f"speculator_path {speculator_path!r} lacks {', '.join(missing)}")
    from ..store import cache_dir

    key = hashlib.sha256(f"{model.resolve()}\0{spec.resolve()}".encode()).hexdigest()[:16]
    out = cache_dir() / "qaic" / f"turbo-{key}"
    out.mkdir(parents=True, exist_ok=True)
    for src in [*(p for p in model.iterdir() if p.name not in TURBO_FILES), *(spec / f for f in TURBO_FILES)]:
        link = out / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(src.resolve(), link)
    return str(out)


def check_qaic_model(model_dir: str, role: str, speculator_path: str | None = None) -> None:
    """Refuse, before any export, what QEfficient would fail on deep inside or compile into
    something other than what our sessions compute. Reads configs only; needs no QEfficient."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if role == "target" and model_type not in SPD_MODEL_TYPES:
        raise ValueError(
            f"QEfficient compiles speculative-decoding targets (several logits per call, turbo heads) for "
            f"{', '.join(SPD_MODEL_TYPES)} only; {model_dir!r} is {model_type!r}. Use it as a draft, or run it "
            "with device cpu/cuda"
        )
    if speculator_path is None:
        return
    from .heads import TurboHeads

    heads = TurboHeads.load(speculator_path)
    if heads.num_layers > 1:
        layers = [[b.linear for b in p] for p in heads.projections]
        same = all(all(lin.weight.equal(row[0].weight) and lin.bias.equal(row[0].bias) for lin in row) for row in layers)
        if not same:
            raise ValueError(
                f"{speculator_path}: heads with turbo_num_layers={heads.num_layers} distinct layers cannot run on "
                "qaic: QEfficient builds each head as one ResBlock repeated turbo_num_layers times, so the card "
                "would apply the last layer's weights at every layer. Train one-layer heads "
                "(`spd-cluster train-heads --layers 1`) or run them on device cpu/cuda"
            )


def check_qaic_runtime(runtime: str) -> None:
    """The software a ``runtime`` needs, checked before anything is exported (an export takes
    seconds to minutes; QEfficient would only fail at ``qaic-compile`` or at session open)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"qaic runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    try:
        import QEfficient  # noqa: F401
        from QEfficient.utils import constants
    except ImportError as e:
        raise QaicUnavailableError(f"device qaic needs QEfficient, which does not import here ({e}): {INSTALL_HINT}") from e
    if runtime == "onnxruntime":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise QaicUnavailableError(f"qaic runtime onnxruntime needs onnx and onnxruntime ({e}): "
                                       "`pip install 'spd-cluster[qaic]'`") from e
        return
    compiler = Path(constants.COMPILER[0])
    from QEfficient.generation import cloud_infer

    missing = [what for what, ok in (
        (f"the compiler {compiler}", compiler.is_file()),
        ("the runtime (qaicrt, QAicApi_pb2)", cloud_infer.is_qaicrt_imported and cloud_infer.is_aicapi_imported),
    ) if not ok]
    if missing:
        raise QaicUnavailableError(
            f"qaic runtime 'qaic' needs the Cloud AI 100 SDKs; missing {' and '.join(missing)}. Install the platform "
            "and apps SDKs (/opt/qti-aic), or set `qaic: {runtime: onnxruntime}` to run QEfficient's exported "
            "graph on onnxruntime instead of a card"
        )


def compile_root(model_dir: str, role: str, speculator_path: str | None) -> Path:
    """Where exports and QPCs of a model go by default: under our cache, not ~/.cache/qeff_models.
    QEfficient adds a hash of the export and compile parameters below it."""
    from ..store import cache_dir

    key = hashlib.sha256(f"{Path(model_dir).resolve()}\0{role}\0{speculator_path or ''}".encode()).hexdigest()[:16]
    return cache_dir() / "qaic" / f"{Path(model_dir).name}-{role}-{key}"


def load_qaic_session(model_name: str, role: str, *, full_batch_size: int, ctx_len: int, prefill_seq_len: int,
                      num_speculative_tokens: int, device_ids: list[int], speculator_path: str | None = None,
                      runtime: str = "qaic", aic_num_cores: int = 16, mxfp6_matmul: bool = False,
                      mxint8_kv_cache: bool = False, compile_dir: str | None = None,
                      num_threads: int | None = None) -> QaicSession:
    """Compile ``model_name`` for ``role`` ("target" | "draft") with QEfficient and open it on
    ``device_ids``. A target with ``speculator_path`` compiles as a turbo (multi-projection)
    model, whose head count fixes its speculation length. ``runtime`` "qaic" runs the QPC on
    Cloud AI 100 cards; "onnxruntime" records the compiler call and runs the exported graph in
    the stand-in (sessions/qaic_standin.py). The compile knobs are QEfficient's own, with its
    defaults. Raises QaicUnavailableError when what ``runtime`` needs is missing."""
    if role not in ("target", "draft"):
        raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
    if speculator_path is not None and role != "target":
        raise ValueError("speculator_path (multi-projection heads) applies to a target only")
    from ..store import resolve_model  # aliases and .gguf files become HF directories QEfficient can load

    check_qaic_runtime(runtime)
    name = resolve_model(model_name)
    if speculator_path == model_name:  # heads kept in the model's own directory
        speculator_path = name
    check_qaic_model(name, role, speculator_path)
    from QEfficient import QEFFAutoModelForCausalLM

    root = Path(compile_dir) if compile_dir else compile_root(name, role, speculator_path)
    qaic_config = None
    head_vocab = None
    if role == "target":
        qaic_config = {"speculative_model_type": "target"}
        if speculator_path is not None:
            from .heads import TurboHeads

            head_vocab = TurboHeads.load(speculator_path).vocab
            name = _turbo_dir(name, speculator_path)
            qaic_config = {"speculative_model_type": "turbo"}
    qeff = QEFFAutoModelForCausalLM.from_pretrained(name, continuous_batching=True, qaic_config=qaic_config)
    config = qeff.model.config
    num_heads = int(config.speculative_config["num_speculative_tokens"]) if speculator_path is not None else 0
    compile_args: dict[str, Any] = dict(
        compile_dir=str(root), num_cores=aic_num_cores, num_devices=len(device_ids), prefill_seq_len=prefill_seq_len,
        ctx_len=ctx_len, full_batch_size=full_batch_size, mxfp6_matmul=mxfp6_matmul, mxint8_kv_cache=mxint8_kv_cache,
        aic_enable_depth_first=True,
    )
    if role == "target" and not num_heads:  # a turbo model's k is its head count, fixed in its config
        compile_args["num_speculative_tokens"] = num_speculative_tokens
    onnx_path = qeff.export(export_dir=str(root / "onnx"))
    if runtime == "onnxruntime":
        from .qaic_standin import OrtQpcSession, recording_compiler

        with recording_compiler():
            qpc_path = qeff.compile(onnx_path=onnx_path, **compile_args)
        device = OrtQpcSession(qpc_path, device_ids=device_ids, num_threads=num_threads)
    else:
        from QEfficient.generation.cloud_infer import QAICInferenceSession

        qpc_path = qeff.compile(onnx_path=onnx_path, **compile_args)
        device = QAICInferenceSession(qpc_path, device_ids=device_ids)
    k = num_heads or num_speculative_tokens
    eos = getattr(getattr(qeff.model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return QaicSession(
        device, full_batch_size=full_batch_size, ctx_len=ctx_len,
        vocab_size=int(config.vocab_size), num_heads=num_heads, prefill_seq_len=prefill_seq_len,
        decode_width=k + 1 if role == "target" else 1, is_target=role == "target",
        eos_token_ids=[int(i) for i in eos], head_vocab=None if head_vocab is None else head_vocab.numpy(),
        qpc_path=str(qpc_path),
    )
