"""Job config: the YAML a user writes for `spd-cluster run`, validated before any model loads.

```yaml
name: demo
mode: pld                    # draft | pld | multiproj | baseline
target: {model: smollm2-135m, dtype: float32, device: cpu}
draft: {model: qwen2.5-coder-0.5b, dtype: bfloat16, device: cpu}   # draft mode only
speculator_path: null
dataset: {path: data/sample_prompts.jsonl, prompt_column: prompt, id_column: id}
output: {path: out/demo, overwrite: false}
spd: {num_speculative_tokens: 4, max_ngram_size: 3, prefill_seq_len: 32, ctx_len: 1024, ...}
cluster: {address: null, num_pairs: 1, shard_size: null, cpus_per_actor: 1, max_retries: 3}   # null: auto
audit: {fraction: 0.02, min_prompts: 4, seed: 0, fail_on_mismatch: false}   # fraction 0: off
```

Relative paths (dataset, output, speculator) are taken from the working directory, which is the
uploaded working dir under `ray job submit`. Overrides `a.b=value` parse `value` as a YAML scalar
(`true`, `3`, `null`, `[0, 1]`, plain text). A `draft:` section outside draft mode and a
`speculator_path` outside multiproj mode are ignored (so `--set mode=baseline` works on any config).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .engine.settings import Mode, SpDSettings


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the bad value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QaicSpec(_Strict):
    """How a ``device: qaic`` model is compiled and run (QEfficient's compile knobs, its defaults)."""

    runtime: Literal["qaic", "onnxruntime"] = Field(
        "qaic", description="qaic: Cloud AI 100 cards; onnxruntime: QEfficient's exported graph on the CPU, "
        "the compiler call recorded, not run (a dry run of a card job)")
    aic_num_cores: int = Field(16, ge=1, description="AI cores per card (qaic-compile -aic-num-cores)")
    mxfp6_matmul: bool = Field(False, description="MXFP6-compressed weights")
    mxint8_kv_cache: bool = Field(False, description="MXINT8-compressed KV cache")
    compile_dir: Optional[str] = Field(None, description="exports and QPCs; default: under the spd_cluster cache")


class ModelSpec(_Strict):
    model: str = Field(min_length=1, description="HF id, local dir, .gguf file or store alias")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda", "qaic"] = "cpu"
    # Per node, the devices this role may take (qaic only: Ray itself assigns CUDA GPUs). Each
    # actor locks one id for its lifetime, so two actors on a node never share a device.
    device_ids: Optional[list[int]] = None
    # CPU only: run linears on kernels made for the few rows of a decode or verify step (float32:
    # prepacked oneDNN weights; bfloat16: our batch-invariant AVX2 kernel on any AVX2 CPU).
    # false: PyTorch's own F.linear, bit for bit what HF `generate` computes, and slower.
    cpu_kernels: bool = True
    qaic: Optional[QaicSpec] = None  # device qaic only; null: QaicSpec's defaults

    @model_validator(mode="after")
    def _ids(self) -> "ModelSpec":
        if self.device == "qaic":
            if self.qaic is None:
                self.qaic = QaicSpec()
            if self.dtype != "float32":
                raise ValueError(f"device qaic loads float32 weights and the compiler converts them to fp16 "
                                 f"(QEfficient's way); dtype {self.dtype!r} does not apply there")
        elif self.qaic is not None:
            raise ValueError(f"a qaic section is for device qaic only (device is {self.device!r})")
        if self.device_ids is not None:
            if self.device != "qaic":
                raise ValueError(f"device_ids is for device qaic only (device is {self.device!r}); "
                                 "Ray assigns CUDA GPUs itself")
            if not self.device_ids or len(set(self.device_ids)) != len(self.device_ids) or min(self.device_ids) < 0:
                raise ValueError(f"device_ids must be distinct non-negative ints, got {self.device_ids}")
        return self


class DatasetSpec(_Strict):
    path: str = Field(min_length=1)
    prompt_column: str = "prompt"
    # null: ids are row numbers (0, 1, ...). A named column that the file lacks is an error.
    id_column: Optional[str] = None
    format: Optional[Literal["parquet", "jsonl", "csv", "text"]] = None  # default: from each file's suffix (text: one prompt a line)
    # path: a file, a directory or a glob (data/**/*.parquet), local or a URI pyarrow.fs reaches
    # (s3://, gs://, hdfs://, file://). filesystem: that filesystem's options (pyarrow.fs
    # S3FileSystem(**filesystem), ...); null: from the URI and the environment (AWS_* variables).
    filesystem: Optional[dict[str, Any]] = None


class OutputSpec(_Strict):
    # a directory, local or a URI pyarrow.fs reaches (s3://bucket/prefix, ...); every pair writes
    # its shards' files there itself. filesystem: that filesystem's options, as dataset.filesystem.
    path: str = Field(min_length=1)
    overwrite: bool = False
    filesystem: Optional[dict[str, Any]] = None


class ClusterSpec(_Strict):
    address: Optional[str] = None  # null: start a local Ray on 127.0.0.1; else join ("auto", "ray://…")
    num_pairs: int = Field(1, ge=1)
    # prompts per shard; null: shard_size_for's choice. A shard is what a pair runs as one call,
    # what a death costs again, and one results file.
    shard_size: Optional[int] = Field(None, ge=1)
    cpus_per_actor: int = Field(1, ge=1)  # Ray num_cpus per actor (and its torch threads: threads_per_actor)
    # torch threads per actor; null: cpus_per_actor, except where a pair's CPU actors take turns (a
    # draft pair not overlapping its draft): each then runs on the CPUs its pair holds on its node
    threads_per_actor: Optional[int] = Field(None, ge=1)
    max_retries: int = Field(3, ge=0)  # re-runs of a shard (and restarts of an actor) after a death


    def shard_size_for(self, num_rows: int, spd: SpDSettings) -> int:
        """``shard_size``, or the default: the dataset in at least MIN_SHARDS shards (pairs stay
        balanced to the end, a death re-runs little), no shard above TOKENS_PER_SHARD expected
        tokens (max_new_tokens each: minutes of one pair, not hours), and never fewer prompts
        than full_batch_size (a shard fills the session's slots)."""
        if self.shard_size is not None:
            return self.shard_size
        by_work = max(1, TOKENS_PER_SHARD // spd.max_new_tokens)
        return max(min(-(-num_rows // MIN_SHARDS), by_work), spd.full_batch_size)


MIN_SHARDS = 64
TOKENS_PER_SHARD = 1 << 17


class AuditSpec(_Strict):
    """Re-run a sample of prompts in baseline mode inside the job (cluster/audit.py)."""

    fraction: float = Field(0.02, ge=0.0, le=1.0, description="share of prompts audited; 0 turns the audit off")
    min_prompts: int = Field(4, ge=0, description="audit at least this many prompts (when fraction > 0)")
    seed: int = 0
    fail_on_mismatch: bool = False  # a prompt whose output differs from the baseline fails the job


class JobConfig(_Strict):
    name: str = "job"
    mode: Mode
    target: ModelSpec
    draft: Optional[ModelSpec] = None
    speculator_path: Optional[str] = None
    dataset: DatasetSpec
    output: OutputSpec
    spd: SpDSettings = Field(default_factory=SpDSettings)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    # error rows (finish_reason "error") above this share of the dataset fail the job (exit 1)
    max_error_fraction: float = Field(0.1, ge=0.0, le=1.0)

    @property
    def method(self):
        """The mode's entry in the registry (engine/modes.py)."""
        from .engine.modes import mode

        return mode(self.mode)

    def roles(self) -> list[tuple[str, ModelSpec]]:
        """(role, its model spec) for each actor of a pair, target first: the registry says
        which roles the mode has, each role's spec is the config section of its name."""
        return [(role, getattr(self, role)) for role in self.method.roles]

    @model_validator(mode="after")
    def _mode(self) -> "JobConfig":
        if self.method.needs_draft:
            if self.draft is None:
                raise ValueError(f"mode {self.mode!r} needs a 'draft' section (draft: {{model: ...}})")
            t, d = self.target, self.draft
            if t.device == d.device == "qaic" and t.device_ids and d.device_ids:
                shared = sorted(set(t.device_ids) & set(d.device_ids))
                if shared:
                    raise ValueError(f"target.device_ids and draft.device_ids share {shared}")
        return self

    # -- identity of the outputs, for resume -------------------------------------------------
    def output_identity(self) -> dict[str, Any]:
        """What decides the rows of the output: resuming with any of it changed is refused.
        Cluster placement (address, num_pairs, cpus_per_actor, max_retries), device ids, the
        name and the output section do not change a row and may differ between runs. The audit's
        sample (fraction, min_prompts, seed) decides audit.parquet's rows, so it counts too."""
        d = self.model_dump(mode="json")
        ident = {
            "mode": d["mode"],
            "target": _spec_identity(d["target"]),
            "draft": _spec_identity(d["draft"]) if self.method.needs_draft else None,
            "speculator_path": d["speculator_path"] if self.method.uses_heads else None,
            "dataset": d["dataset"],
            "spd": d["spd"],
            "shard_size": d["cluster"]["shard_size"],
            "audit": {k: d["audit"][k] for k in ("fraction", "min_prompts", "seed")},
        }
        return ident

    def identity_hash(self, dataset_digest: str = "") -> str:
        blob = json.dumps({"config": self.output_identity(), "dataset_sha256": dataset_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _spec_identity(spec: dict) -> dict:
    """What of a model spec decides its outputs: the model, dtype and device, and on qaic how it
    is compiled and run (not where the QPC is kept)."""
    out = {k: spec[k] for k in ("model", "dtype", "device")}
    if spec.get("qaic"):
        out["qaic"] = {k: v for k, v in spec["qaic"].items() if k != "compile_dir"}
    return out


def _format_errors(err: ValidationError, data: Any) -> str:
    import difflib
    import typing

    def keys_at(path) -> list[str]:  # the valid keys of the section at ``path`` (a model's fields)
        model = JobConfig
        for part in path:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            cands = [field.annotation, *typing.get_args(field.annotation)]
            model = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if model is None:
                return []
        return list(model.model_fields)

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        elif e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(e["loc"][-1]), keys_at(e["loc"][:-1]), n=1)
            hint = f"; did you mean {'.'.join(map(str, (*e['loc'][:-1], near[0])))!r}?" if near else ""
            lines.append(f"{loc}: unknown key (value {e['input']!r}){hint}")
        else:
            lines.append(f"{loc}: {msg} (got {e['input']!r})")
    return "invalid job config:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not a YAML scalar: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is {child!r}, not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: Any, overrides: Optional[list[str]] = None) -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a job config is a YAML mapping, got {type(data).__name__}: {data!r}")
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, data)) from None


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> JobConfig:
    """Read a YAML job config, apply `a.b=value` overrides, validate. Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    try:
        return config_from_dict(data if data is not None else {}, overrides)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
