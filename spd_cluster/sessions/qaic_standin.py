"""A Cloud AI 100 stand-in: QEfficient's real exported graph on onnxruntime (``runtime: onnxruntime``).

A card job runs QEfficient's own ``from_pretrained`` / ``export`` / ``compile``. Here the
compiler call is recorded instead of executed (``recording_compiler``, ``qaic_record.py``), and
``OrtQpcSession`` stands in for ``QAICInferenceSession`` over that "QPC": same interface
(``input_names``, ``output_names``, ``skip_buffers``, ``set_buffers``, ``run``), and like the card

  * it keeps the retained state (every ``past_*`` buffer) between calls, in the custom-IO
    dtype the compile asked for (``custom_io.yaml``; float16 for a float32 model);
  * it drops KV writes at position -1. QEfficient's graph sends them to index INT32_MAX, which
    the card ignores; onnxruntime would fail on it, so the state has one extra, always masked
    column (``ctx_len``) and those constants are set to ``ctx_len`` through
    ``SessionOptions.add_initializer``; nothing else of the graph changes;
  * it accepts only the shapes of the compiled specialisations (``specializations.json``) and
    fails on any other, listing the allowed ones;
  * an output whose buffer was set empty (``skip_buffers``, or ``set_buffers`` with an empty
    array, as QAICInferenceSession takes it) stays on the device: it is not returned, and a
    later ``set_buffers`` with a real buffer brings it back. ``bytes_out`` counts the bytes of
    every output that did come back (``last_bytes_out``: of the last run), what crossed from the
    card to the host.

What it cannot reproduce is the card's arithmetic: weights run in float32 (no fp16 conversion,
no MXFP6), and MXINT8 KV is kept as float16.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np

from .qaic_record import RECORD

INVALID_INDEX = np.iinfo(np.int32).max  # where QEfficient's graph sends writes and reads to drop
_DTYPES = {"float16": np.float16, "float32": np.float32, "mxint8": np.float16, "bfloat16": np.float32}


@contextmanager
def recording_compiler():
    """Inside the block QEfficient's ``compile()`` runs ``qaic_record.py`` instead of
    ``qaic-compile``, with the same command line."""
    from QEfficient.utils import constants

    saved = constants.COMPILER
    constants.COMPILER = [sys.executable, str(Path(__file__).with_name("qaic_record.py")), *saved]
    try:
        yield
    finally:
        constants.COMPILER = saved


def _flags(command: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in command if a.startswith("-") and "=" in a)


def compile_record(qpc_path: str | Path) -> dict:
    """What the stand-in's compile recorded in ``qpc_path``: the command, the ONNX path, the
    specialisations (names -> ints) and the custom IO dtypes."""
    import yaml

    path = Path(qpc_path) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{qpc_path}: no {RECORD}; this QPC was not made by the onnxruntime stand-in")
    command = json.loads(path.read_text())["command"]
    flags = _flags(command)
    specs = json.loads(Path(flags["-network-specialization-config"]).read_text())["specializations"]
    custom_io = {}
    if "-custom-IO-list-file" in flags:
        custom_io = {e["IOName"]: e["Precision"] for e in yaml.safe_load(Path(flags["-custom-IO-list-file"]).read_text())}
    return {
        "command": command,
        "onnx": flags["-m"],
        "specializations": [{k: int(v) for k, v in s["symbols"].items() if str(v).isdigit()} for s in specs],
        "custom_io": custom_io,
    }


def _invalid_index_constants(onnx_path: str) -> list[tuple[str, np.ndarray]]:
    """(name, value) of every integer constant or initializer holding INT32_MAX."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path, load_external_data=False)
    found = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            a = numpy_helper.to_array(node.attribute[0].t)
            if a.dtype.kind == "i" and a.size == 1 and int(a.reshape(-1)[0]) == INVALID_INDEX:
                found.append((node.output[0], a))
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and init.data_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            a = numpy_helper.to_array(init)
            if a.size == 1 and int(a.reshape(-1)[0]) == INVALID_INDEX:
                found.append((init.name, a))
    return found


class OrtQpcSession:
    """``QAICInferenceSession`` over a stand-in QPC; see the module docstring."""

    def __init__(self, qpc_path: str | Path, device_ids: list[int] | None = None, num_threads: int | None = None):
        import onnxruntime as ort

        rec = compile_record(qpc_path)
        self.qpc_path, self.device_ids = str(qpc_path), list(device_ids or [0])
        self.command, self.specializations = rec["command"], rec["specializations"]
        ctx = {s["ctx_len"] for s in self.specializations}
        fbs = {s.get("full_batch_size", s.get("batch_size")) for s in self.specializations}
        if len(ctx) != 1 or len(fbs) != 1:
            raise ValueError(f"{qpc_path}: specialisations disagree on ctx_len {ctx} or full_batch_size {fbs}")
        self.ctx_len, self.full_batch_size = ctx.pop(), fbs.pop()
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self._pinned = []  # the OrtValues must outlive the session
        for name, value in _invalid_index_constants(rec["onnx"]):
            v = ort.OrtValue.ortvalue_from_numpy(np.full(value.shape, self.ctx_len, value.dtype))
            options.add_initializer(name, v)
            self._pinned.append(v)
        self._ort = ort.InferenceSession(rec["onnx"], options, providers=["CPUExecutionProvider"])
        self._in = {i.name: i for i in self._ort.get_inputs()}
        self._out = [o.name for o in self._ort.get_outputs()]
        self.state: dict[str, np.ndarray] = {}
        for name, i in self._in.items():
            if name.startswith("past_"):
                dims = [self._dim(d, {"full_batch_size": self.full_batch_size, "batch_size": self.full_batch_size,
                                      "ctx_len": self.ctx_len + 1}) for d in i.shape]
                dtype = _DTYPES[rec["custom_io"].get(f"{name}_RetainedState", rec["custom_io"].get(name, "float32"))]
                self.state[name] = np.zeros(dims, dtype)
        self._skipped: set[str] = set()
        self._buffers: dict[str, tuple[int, ...]] = {}
        self.bytes_out = 0
        self.last_bytes_out = 0
        self.spec_runs = [0] * len(self.specializations)  # runs per compiled specialisation

    @staticmethod
    def _dim(d, symbols: dict[str, int]) -> int:
        return d if isinstance(d, int) else symbols[d]

    @property
    def input_names(self) -> list[str]:
        return list(self._in)

    @property
    def output_names(self) -> list[str]:
        return list(self._out)

    def skip_buffers(self, names: Iterable[str]) -> None:
        self.set_buffers({n: np.array([]) for n in names})

    def set_buffers(self, buffers: dict[str, np.ndarray]) -> None:
        for name, buf in buffers.items():
            if buf.size == 0:  # QAICInferenceSession: an empty buffer is not transferred
                self._skipped.add(name)
                self._buffers.pop(name, None)
            elif name in self._out:
                self._skipped.discard(name)
                self._buffers[name] = tuple(buf.shape)

    def _allowed(self) -> str:
        return "; ".join(json.dumps(s) for s in self.specializations)

    def _match(self, inputs: dict[str, np.ndarray]) -> dict[str, int]:
        """The specialisation every fed input's shape fits, or ValueError (as the card fails)."""
        for i, spec in enumerate(self.specializations):
            if all(name not in self._in or name.startswith("past_")
                   or list(arr.shape) == [self._dim(d, spec) if isinstance(d, int) or d in spec else -1
                                          for d in self._in[name].shape]
                   for name, arr in inputs.items()):
                self.spec_runs[i] += 1
                return spec
        passed = {k: list(v.shape) for k, v in inputs.items()}
        raise ValueError(f"no compiled specialisation matches the inputs: passed {passed}; allowed {self._allowed()}")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = set(inputs) - set(self._in)
        if unknown:
            raise ValueError(f"inputs {sorted(unknown)} are not inputs of this QPC ({self.input_names})")
        kept = [n for n in self.state if n not in self._skipped]
        if kept:
            raise ValueError(f"the stand-in keeps the retained state on the device: skip_buffers {kept[:2]}... "
                             "(past_* inputs and *_RetainedState outputs), as a card run does")
        missing = [n for n in self._in if n not in self.state and n not in inputs]
        if missing:
            raise ValueError(f"missing inputs {missing}")
        self._match(inputs)
        feed = {n: np.asarray(inputs[n], dtype=np.int64) for n in inputs}
        feed.update({n: s.astype(np.float32) for n, s in self.state.items()})
        # the retained state always (it stays here), of the rest what the host asked for
        names = [n for n in self._out if n.endswith("_RetainedState") or n not in self._skipped]
        out = dict(zip(names, self._ort.run(names, feed)))
        for n in self.state:
            self.state[n] = out.pop(f"{n}_RetainedState").astype(self.state[n].dtype)
        for name, value in out.items():
            want = self._buffers.get(name)
            if want is not None and want != value.shape:
                raise ValueError(f"output buffer {name} was set to shape {want}; this specialisation gives "
                                 f"{value.shape} (allowed: {self._allowed()})")
        out = {n: v for n, v in out.items() if n not in self._skipped}
        self.last_bytes_out = sum(v.nbytes for v in out.values())
        self.bytes_out += self.last_bytes_out
        return out
