"""Cloud AI 100 backend of the device-session contract, through QEfficient (imported lazily).

QEfficient compiles a model into a QPC with fixed specialisations. With continuous batching:
  * prefill: batch 1, ``prefill_seq_len`` columns, logits of the last token only;
  * decode:  batch ``full_batch_size``, ``w`` columns keeping ``w`` logits for a target, one per
    compiled verify width ``w`` (QEfficient's ``num_speculative_tokens`` list: ``w - 1`` each;
    ``QaicSession.widths``), or 1 column keeping 1 for a draft.
The contract in ``base`` allows any batch/sequence shape, so ``QaicSession.run`` maps each call
onto those: rows are padded to the compiled batch with unused slots at position -1 (no KV
write) and columns are padded/cut into compiled-width chunks, again with -1 positions, on the
specialisation needing the fewest device runs (the narrowest of those). From each row it returns
the window the contract asks for. Windows wider than one logit only exist in the target's decode
specialisations, so ``num_logits_to_keep > 1`` needs a call at most ``max(widths)`` columns wide.

Only ids cross where no logits are needed: the exported graph gets the contract's ``argmax``
outputs beside its ``logits`` (``add_device_argmax``: the base argmax at each kept column, and a
turbo graph's heads' argmax and probability at the column where the row's verified prefix ends).
Per call the host asks the card for one or the other (``set_buffers`` / ``skip_buffers``, the way
QEfficient leaves the KV on the card): greedy calls bring back int32 ids, sampled calls (and the
rare greedy call whose window the graph's rule cannot serve) the logits. One QPC serves both.
``QaicSession.bytes_off_device`` counts what came back.

Nothing here imports QEfficient at module import: machines without the Cloud AI 100 SDK import
this file fine, and only ``load_qaic_session`` needs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
ARGMAX_OUTPUTS = ("tokens", "head_tokens", "head_probs")  # what add_device_argmax adds to the graph
# What `import QEfficient` logs wherever qaicrt does not import: noise on a machine where no card
# was asked for (the onnxruntime stand-in), kept where one was (runtime qaic).
SDK_NOTICE = "QAIC SDK is not installed"


class QaicUnavailableError(RuntimeError):
    """QEfficient or the Cloud AI 100 runtime cannot be imported here."""


@dataclass(frozen=True)
class _Spec:
    """One compiled specialisation: rows per run, columns per run, logits kept per row."""

    batch: int
    width: int
    keep: int


class QaicSession:
    """A compiled QPC behind ``DeviceSession``; see the module docstring for the shape mapping.

    ``widths``: the decode widths compiled (a target's verify widths, k' + 1 for each k' of the
    QPC; (1,) for a draft): a call of another width runs padded to the next one, so adaptive k
    gains nothing between them. ``device_argmax``: the graph has the contract's argmax outputs.
    ``bytes_off_device``: bytes of every output that came back from the device, in total;
    ``last_call_bytes``: those of the last ``run`` call (one engine step's verify)."""

    def __init__(self, session: Any, *, full_batch_size: int, ctx_len: int, vocab_size: int, num_heads: int,
                 prefill_seq_len: int, decode_widths: int | Sequence[int], is_target: bool,
                 eos_token_ids: list[int] | None = None, head_vocab: np.ndarray | None = None,
                 qpc_path: str | None = None):
        """``head_vocab``: the token ids heads trained by us may propose (``TurboHeads.vocab``).
        QEfficient's turbo graph applies the whole lm_head to the heads, so the heads' logits of
        every other token are set to -inf here (in the graph, for its argmax outputs): their argmax
        and softmax are then over the same tokens as our PyTorch session's, and the card proposes
        what it would."""
        self.session, self.qpc_path = session, qpc_path
        self.full_batch_size, self.ctx_len = full_batch_size, ctx_len
        self.vocab_size, self.num_heads = vocab_size, num_heads
        self.eos_token_ids = list(eos_token_ids or [])
        self.is_target = is_target
        widths = [decode_widths] if isinstance(decode_widths, int) else list(decode_widths)
        self.widths = tuple(sorted(set(int(w) for w in widths))) if is_target else (1,)
        prefill_batch = full_batch_size if prefill_seq_len == 1 else 1  # QEfficient's CB rule
        self.specs = (_Spec(prefill_batch, prefill_seq_len, 1),) + tuple(
            _Spec(full_batch_size, w, w if is_target else 1) for w in self.widths)
        # KV lives on the device between calls: never copy it in or out.
        session.skip_buffers({n for n in session.input_names if n.startswith("past_")})
        session.skip_buffers({n for n in session.output_names if n.endswith("_RetainedState")})
        self._inputs = set(session.input_names)
        outputs = set(session.output_names)
        self._argmax_names = [n for n in ARGMAX_OUTPUTS if n in outputs]
        self.device_argmax = "tokens" in outputs and (not num_heads or {"head_tokens", "head_probs"} <= outputs)
        self._buffers: tuple | None = None
        self.bytes_off_device = 0
        self.device_runs = 0
        self.last_call_bytes = 0
        self._off_vocab = None
        if head_vocab is not None and num_heads:
            self._off_vocab = np.ones(vocab_size, dtype=bool)
            self._off_vocab[np.asarray(head_vocab, dtype=np.int64)] = False

    def _pick(self, b: int, s: int, n: int) -> _Spec:
        """The specialisation needing the fewest device runs that can return n logits a row; of
        those, the one moving the fewest rows x columns."""
        ok = [sp for sp in self.specs if n == 1 or (s <= sp.width and n <= sp.keep)]
        if not ok:
            raise SessionInputError(
                f"num_logits_to_keep={n} needs a call of at most {max(sp.width for sp in self.specs[1:])} columns on "
                f"this compiled {'target' if self.is_target else 'draft'} (got {s}); QAIC prefill keeps 1 logit"
            )

        def runs(sp: _Spec) -> int:
            return (-(-b // sp.batch)) * (-(-s // sp.width))

        return min(ok, key=lambda sp: (runs(sp), runs(sp) * sp.batch * sp.width))

    def _set_outputs(self, spec: _Spec, mode: str) -> None:
        """What the device hands back for ``spec``: "logits", "tokens", or "heads" (tokens and the
        heads' guesses). An empty buffer leaves an output on the card (``skip_buffers``)."""
        if (spec, mode) == self._buffers:
            return
        none = np.zeros(0, np.float32)
        tail = (self.num_heads + 1,) if self.num_heads else ()
        shapes = {"logits": ((spec.batch, spec.keep) + tail + (self.vocab_size,), np.float32),
                  "tokens": ((spec.batch, spec.keep), np.int32),
                  "head_tokens": ((spec.batch, self.num_heads), np.int32),
                  "head_probs": ((spec.batch, self.num_heads), np.float32)}
        wanted = {"logits": ("logits",), "tokens": ("tokens",), "heads": ARGMAX_OUTPUTS}[mode]
        self.session.set_buffers({n: np.zeros(*shapes[n]) if n in wanted else none for n in ["logits", *self._argmax_names]})
        self._buffers = (spec, mode)

    def _run_one(self, ids: np.ndarray, pos: np.ndarray, slots: np.ndarray, spec: _Spec, mode: str) -> dict:
        self._set_outputs(spec, mode)
        feed = {"input_ids": ids, "position_ids": pos, "batch_index": slots.reshape(-1, 1),
                "num_logits_to_keep": np.zeros((spec.keep, 1), np.int64)}
        out = self.session.run({k: v for k, v in feed.items() if k in self._inputs})
        got = sum(a.nbytes for a in {id(v): np.asarray(v) for v in out.values()}.values())
        self.bytes_off_device += got
        self.last_call_bytes += got
        self.device_runs += 1
        return out

    def _graph_window(self, c, spec: _Spec, want: np.ndarray, last: np.ndarray) -> bool:
        """Whether the graph's heads' guesses are the contract's for every row of this call: the
        graph finds the verified column among the ``spec.keep`` columns it keeps, the contract
        among the ``n`` it asks for; the same if both windows start at one column and the graph's
        wider one holds no valid column past the contract's (always so for the engine's calls)."""
        s, n = c.input_ids.shape[1], c.num_logits
        for r in np.flatnonzero((c.position_ids >= 0).any(axis=1)):
            c0 = last[r] // spec.width * spec.width
            start = c0 + max(last[r] - c0 + 1 - spec.keep, 0)
            beyond = want[r, 0] + n
            if start != want[r, 0] or (n < spec.keep and beyond < min(c0 + spec.width, s)
                                       and c.position_ids[r, beyond] >= 0):
                return False
        return True

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        b, s = c.input_ids.shape
        spec = self._pick(b, s, c.num_logits)
        want = keep_index(c.position_ids, c.num_logits)  # [b, n] columns the contract returns
        last = c.position_ids.argmax(axis=1)  # every kept column lies in the chunk holding this one
        heads = bool(self.num_heads and c.head_guesses)
        on_device = c.argmax and self.device_argmax and (not heads or self._graph_window(c, spec, want, last))
        mode = ("heads" if heads else "tokens") if on_device else "logits"
        tail = (self.num_heads + 1,) if self.num_heads else ()
        if mode == "logits":
            logits = np.zeros((b, c.num_logits) + tail + (self.vocab_size,), np.float32)
        else:
            tokens = np.zeros((b, c.num_logits), np.int64)
            head_tokens = np.zeros((b, self.num_heads), np.int64)
            head_probs = np.zeros((b, self.num_heads), np.float32)
        self.last_call_bytes = 0
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
                out = self._run_one(ids, pos, slots, spec, mode)
                if hit.size == 0:
                    continue
                # QEfficient keeps the `spec.keep` columns ending at each row's last valid column.
                local = hit - r0
                lower = np.maximum(last[hit] - c0 + 1 - spec.keep, 0)
                offset = want[hit] - c0 - lower[:, None]
                if mode == "logits":
                    logits[hit] = np.asarray(out["logits"], np.float32)[local[:, None], offset]
                    continue
                tokens[hit] = out["tokens"][local[:, None], offset]
                if heads:
                    head_tokens[hit] = out["head_tokens"][local]
                    head_probs[hit] = out["head_probs"][local]
        if mode != "logits":
            return {"tokens": tokens, **({"head_tokens": head_tokens, "head_probs": head_probs} if heads else {})}
        if self._off_vocab is not None:
            logits[:, :, 1:, self._off_vocab] = -np.inf
        if self.num_heads and not c.head_guesses:
            logits = logits[:, :, 0]
        if c.argmax:  # logits came back (a graph without argmax outputs): the argmax is taken as they arrive
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


class _NoSdkNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return SDK_NOTICE not in record.getMessage()


def import_qefficient(runtime: str):
    """``import QEfficient``, without its "QAIC SDK is not installed" warning where no card was
    asked for (``runtime`` onnxruntime: the stand-in needs no SDK, the warning is only noise).
    Only that record of QEfficient's logger, only during the import that logs it; ``runtime``
    qaic imports as is (there the SDK's absence matters, and check_qaic_runtime says what to do)."""
    log = logging.getLogger("QEfficient")  # the logger QEfficient's logging_utils sets up
    quiet = _NoSdkNotice() if runtime != "qaic" else None
    if quiet:
        log.addFilter(quiet)
    try:
        import QEfficient
    finally:
        if quiet:
            log.removeFilter(quiet)
    return QEfficient


def add_device_argmax(onnx_path: str | Path, num_heads: int, vocab_size: int,
                      head_vocab: np.ndarray | None = None) -> Path:
    """A copy of QEfficient's exported graph beside it (sharing its external weight files) with
    the contract's ``argmax`` outputs added to its ``logits``, so that a greedy call brings only
    ids (and the heads' ids and probabilities) off the card:

      tokens       [batch, keep] int32: the base logits' argmax at each kept column;
      head_tokens  [batch, heads] int32, head_probs [batch, heads] float32 (turbo graphs): each
                   head's argmax and softmax probability at the kept column where the row's
                   greedily verified prefix ends (``base.verified_column``: kept columns 1..a hold
                   the base argmax of the column before, and a valid position), over
                   ``head_vocab`` only where the heads have one (an additive -inf mask).

    ``logits`` stays an output: per call the host asks for one or the other (``set_buffers`` /
    ``skip_buffers``), so one QPC serves greedy calls (ids) and sampled ones (logits). The nodes
    are plain ONNX at the graph's opset (ArgMax, ReduceMax, Exp, ReduceSum, GatherElements, Pad,
    ...), the kind QEfficient's own on-device sampler puts into the graphs qaic-compile takes.
    Written once (tmp file + rename), named by what it adds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    onnx_path = Path(onnx_path)
    tag = "argmax1"  # the pass's version: a changed pass writes a new file beside an exported graph
    if num_heads and head_vocab is not None:
        tag += "-" + hashlib.sha256(np.asarray(head_vocab, np.int64).tobytes()).hexdigest()[:12]
    out_path = onnx_path.with_name(f"{onnx_path.stem}-{tag}{onnx_path.suffix}")
    if out_path.is_file():
        return out_path
    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    if "logits" not in {o.name for o in g.output}:
        raise ValueError(f"{onnx_path}: no 'logits' output to take the argmax of")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), f"spd_argmax/{name}"))
        return f"spd_argmax/{name}"

    def node(op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out or f"spd_argmax/{name}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"spd_argmax/{name}", **attrs))
        return out

    def i64(*v) -> np.ndarray:
        return np.array(v, np.int64)

    base = node("Gather", ["logits", const("zero", np.int64(0))], "base", axis=2) if num_heads else "logits"
    ids = node("ArgMax", [base], "tokens64", axis=-1, keepdims=0)  # [B, K]
    node("Cast", [ids], "tokens", out="tokens", to=TensorProto.INT32)
    outputs = [helper.make_tensor_value_info("tokens", TensorProto.INT32, None)]
    if num_heads:
        heads = node("Slice", ["logits", const("h0", i64(1)), const("h1", i64(np.iinfo(np.int64).max)),
                               const("h_axis", i64(2))], "heads")  # [B, K, H, V]
        if head_vocab is not None:
            mask = np.full(vocab_size, -np.inf, np.float32)
            mask[np.asarray(head_vocab, np.int64)] = 0.0
            heads = node("Add", [heads, const("head_vocab_mask", mask)], "heads_in_vocab")
        h_ids = node("ArgMax", [heads], "head_ids", axis=-1, keepdims=0)  # [B, K, H]
        if opset >= 18:
            h_max = node("ReduceMax", [heads, const("v_axis", i64(-1))], "head_max", keepdims=1)
        else:
            h_max = node("ReduceMax", [heads], "head_max", axes=[-1], keepdims=1)
        z = node("Exp", [node("Sub", [heads, h_max], "head_shift")], "head_exp")
        h_probs = node("Reciprocal", [node("ReduceSum", [z, const("v_axis_sum", i64(-1))], "head_sum", keepdims=0)],
                       "head_top_probs")  # [B, K, H]: softmax at the argmax, as greedy_guesses
        # The kept columns (QEfficient's gather rule: K ending at each row's largest position) ...
        shape = node("Shape", [h_ids], "head_shape")
        keep = node("Gather", [shape, const("one", np.int64(1))], "keep")  # K, a scalar
        pos32 = node("Cast", ["position_ids"], "pos32", to=TensorProto.INT32)  # as QEfficient's ArgMax
        last = node("ArgMax", [pos32], "last", axis=1, keepdims=1)  # [B, 1]
        lower = node("Where", [node("Less", [last, keep], "short"), const("zero_l", np.int64(0)),
                               node("Sub", [node("Add", [last, const("one_l", np.int64(1))], "last1"), keep],
                                    "from")], "lower")
        cols = node("Range", [const("zero_r", np.int64(0)), keep, const("one_r", np.int64(1))], "cols")  # [K]
        kept = node("Add", [lower, node("Unsqueeze", [cols, const("u0", i64(0))], "cols_row")], "kept")  # [B, K]
        kid = node("GatherElements", ["input_ids", kept], "kept_ids", axis=1)
        kpos = node("GatherElements", ["position_ids", kept], "kept_pos", axis=1)
        # ... and where each row's verified prefix ends: column j >= 1 follows when it is valid and
        # holds the base argmax of column j - 1 (prev: the tokens shifted right, -1 first)
        prev = node("Slice", [node("Pad", [ids, const("pad_front", i64(0, 1, 0, 0)), const("minus1", np.int64(-1))],
                                   "tokens_shifted"), const("s0", i64(0)),
                              node("Unsqueeze", [keep, const("u0b", i64(0))], "keep_1d"), const("s_axis", i64(1))],
                    "prev")
        follows = node("And", [node("Equal", [kid, prev], "same"),
                               node("GreaterOrEqual", [kpos, const("zero_p", np.int64(0))], "valid")], "follows")
        runs = node("Or", [follows, node("Equal", [cols, const("zero_c", np.int64(0))], "first")], "runs")
        stops = node("Pad", [node("Cast", [node("Not", [runs], "stop")], "stop32", to=TensorProto.INT32),
                             const("pad_back", i64(0, 0, 0, 1)), const("one_pad", np.int32(1))], "stops")  # [B, K+1]
        col = node("Sub", [node("ArgMax", [stops], "first_stop", axis=1, keepdims=1), const("one_c", np.int64(1))],
                   "verified")  # [B, 1]: the first column that does not follow, less one
        pick_shape = node("Concat", [node("Slice", [shape, const("b0", i64(0)), const("b1", i64(1))], "batch_dim"),
                                     const("one_d", i64(1)),
                                     node("Slice", [shape, const("b2", i64(2)), const("b3", i64(3))], "heads_dim")],
                          "pick_shape", axis=0)
        pick = node("Expand", [node("Unsqueeze", [col, const("u2", i64(2))], "col3"), pick_shape], "pick")  # [B, 1, H]
        axis1 = const("sq1", i64(1))
        node("Cast", [node("Squeeze", [node("GatherElements", [h_ids, pick], "head_ids_at", axis=1), axis1],
                           "head_ids_row")], "head_tokens", out="head_tokens", to=TensorProto.INT32)
        node("Squeeze", [node("GatherElements", [h_probs, pick], "head_probs_at", axis=1), axis1], "head_probs",
             out="head_probs")
        outputs += [helper.make_tensor_value_info("head_tokens", TensorProto.INT32, None),
                    helper.make_tensor_value_info("head_probs", TensorProto.FLOAT, None)]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.output.extend(outputs)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out_path)
    return out_path


def check_qaic_runtime(runtime: str) -> None:
    """The software a ``runtime`` needs, checked before anything is exported (an export takes
    seconds to minutes; QEfficient would only fail at ``qaic-compile`` or at session open)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"qaic runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    try:
        import_qefficient(runtime)
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
                      num_threads: int | None = None, widths: Sequence[int] | None = None,
                      device_argmax: bool = True) -> QaicSession:
    """Compile ``model_name`` for ``role`` ("target" | "draft") with QEfficient and open it on
    ``device_ids``. A target with ``speculator_path`` compiles as a turbo (multi-projection)
    model, whose head count fixes its speculation length. ``runtime`` "qaic" runs the QPC on
    Cloud AI 100 cards; "onnxruntime" records the compiler call and runs the exported graph in
    the stand-in (sessions/qaic_standin.py). The compile knobs are QEfficient's own, with its
    defaults. Raises QaicUnavailableError when what ``runtime`` needs is missing.

    ``widths``: the verify widths a plain target's QPC gets a decode specialisation for
    (QEfficient's ``num_speculative_tokens`` list, ``w - 1`` each); default every width
    1..k+1, so adaptive k runs each width it picks unpadded; k + 1 is always among them. A turbo
    QPC has one, heads + 1 (QEfficient keeps the heads' count there and drops a list). A draft
    decodes 1. ``device_argmax``: add the contract's argmax outputs to the graph
    (``add_device_argmax``) so greedy calls bring ids, not logits, off the card."""
    if role not in ("target", "draft"):
        raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
    k_widths = sorted(set(range(1, num_speculative_tokens + 2) if widths is None else [int(w) for w in widths]))
    if k_widths and (k_widths[0] < 1 or k_widths[-1] > num_speculative_tokens + 1):
        raise ValueError(f"widths must lie in 1..num_speculative_tokens + 1 = {num_speculative_tokens + 1}, "
                         f"got {k_widths}")
    k_widths = sorted(set(k_widths) | {num_speculative_tokens + 1})
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
        compile_args["num_speculative_tokens"] = [w - 1 for w in k_widths]  # one decode specialisation each
    onnx_path = qeff.export(export_dir=str(root / "onnx"))
    if device_argmax:
        onnx_path = add_device_argmax(onnx_path, num_heads, int(config.vocab_size),
                                      None if head_vocab is None else head_vocab.numpy())
    if runtime == "onnxruntime":
        from .qaic_standin import OrtQpcSession, recording_compiler

        with recording_compiler():
            qpc_path = qeff.compile(onnx_path=onnx_path, **compile_args)
        device = OrtQpcSession(qpc_path, device_ids=device_ids, num_threads=num_threads)
    else:
        from QEfficient.generation.cloud_infer import QAICInferenceSession

        qpc_path = qeff.compile(onnx_path=onnx_path, **compile_args)
        device = QAICInferenceSession(qpc_path, device_ids=device_ids)
    eos = getattr(getattr(qeff.model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return QaicSession(
        device, full_batch_size=full_batch_size, ctx_len=ctx_len,
        vocab_size=int(config.vocab_size), num_heads=num_heads, prefill_seq_len=prefill_seq_len,
        decode_widths=[num_heads + 1] if num_heads else k_widths, is_target=role == "target",
        eos_token_ids=[int(i) for i in eos], head_vocab=None if head_vocab is None else head_vocab.numpy(),
        qpc_path=str(qpc_path),
    )
