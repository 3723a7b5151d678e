"""Where datasets and results live: a local path or any URI ``pyarrow.fs`` reaches.

``Location`` is a filesystem and a path on it: ``file://``, ``s3://``, ``gs://``, ``hdfs://``
URIs and plain local paths (relative ones taken from the working directory). Credentials and
endpoints come the usual way (``AWS_*`` environment variables, ``AWS_ENDPOINT_URL`` included,
instance roles, ...) or from filesystem options in the config (``{"endpoint_override": ...}``:
the keyword arguments of ``pyarrow.fs.S3FileSystem`` and friends).

Writes are published whole: a file is written under a temporary name beside its final one,
then moved there (a rename locally, a server-side copy on object storage), so no reader ever
sees a partial object under a final name.
"""

from __future__ import annotations

import fnmatch
import os
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Optional

import pyarrow.fs as pafs

_GLOB = set("*?[")
_FS_CLASSES = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem"}


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # in ``fs``'s own form: "bucket/key" on S3, an absolute path locally
    uri: str = field(compare=False)  # as the user wrote it, for messages

    def join(self, *parts: str) -> "Location":
        path = str(PurePosixPath(self.path, *parts))
        return Location(self.fs, path, self.uri.rstrip("/") + "/" + "/".join(parts))

    def __truediv__(self, part: str) -> "Location":
        return self.join(*str(part).split("/"))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def __fspath__(self) -> str:
        """A local location is a path (``open``, ``pq.read_table``, ``Path`` take it as one)."""
        if not self.local:
            raise TypeError(f"{self.uri} is not on the local filesystem")
        return self.path

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def __str__(self) -> str:
        return self.uri


def is_uri(text: str) -> bool:
    return "://" in text


def resolve(where: str, options: Optional[dict[str, Any]] = None) -> Location:
    """A ``Location`` for a local path or a URI; ``options`` build the filesystem explicitly
    (else ``pyarrow.fs.FileSystem.from_uri`` does, from the URI and the environment)."""
    if not is_uri(where):
        return Location(pafs.LocalFileSystem(), os.path.abspath(where), where)
    scheme, _, rest = where.partition("://")
    if options:
        cls = _FS_CLASSES.get(scheme.lower())
        if cls is None:
            raise ValueError(f"{where}: filesystem options are for {', '.join(sorted(_FS_CLASSES))} URIs")
        if cls == "S3FileSystem" and "endpoint_override" not in options and os.environ.get("AWS_ENDPOINT_URL"):
            # from_uri reads AWS_ENDPOINT_URL, the constructor does not: the same endpoint either way
            options = {**options, "endpoint_override": os.environ["AWS_ENDPOINT_URL"]}
        try:
            fs = getattr(pafs, cls)(**options)
        except TypeError as e:
            raise ValueError(f"{where}: bad filesystem options {sorted(options)}: {e}") from None
        return Location(fs, rest.rstrip("/"), where)
    try:
        fs, path = pafs.FileSystem.from_uri(where)
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}: not a location pyarrow.fs can reach ({e})") from None
    return Location(fs, path.rstrip("/") or path, where)


def has_glob(text: str) -> bool:
    return bool(_GLOB & set(text))


def glob_match(path: str, pattern: str) -> bool:
    """Shell-style, per path segment: ``*`` stays within one directory, ``**`` spans any number."""
    def match(p: list[str], q: list[str]) -> bool:
        if not q:
            return not p
        if q[0] == "**":
            return any(match(p[i:], q[1:]) for i in range(len(p) + 1))
        return bool(p) and fnmatch.fnmatchcase(p[0], q[0]) and match(p[1:], q[1:])

    return match(path.split("/"), pattern.split("/"))


def _visible(path: str) -> bool:
    """Not a hidden or marker file (``.tmp-*`` of a write under way, ``_SUCCESS``)."""
    return not PurePosixPath(path).name.startswith((".", "_"))


def list_files(loc: Location, suffixes: tuple[str, ...]) -> list[Location]:
    """The files a dataset names, sorted by path: the file itself, every file below a
    directory whose name ends in one of ``suffixes`` (hidden and ``_`` files left out), or the
    files a glob matches (``data/*.parquet``, ``data/**/*.jsonl.gz``)."""
    if has_glob(loc.path):
        base = PurePosixPath(loc.path)
        while has_glob(str(base)):
            base = base.parent
        infos = loc.fs.get_file_info(pafs.FileSelector(str(base), recursive=True, allow_not_found=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File and _visible(i.path)
                 and glob_match(i.path, loc.path)]
    else:
        info = loc.info()
        if info.type == pafs.FileType.File:
            return [loc]
        if info.type == pafs.FileType.NotFound:
            return []
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File and _visible(i.path)
                 and i.path.lower().endswith(suffixes)]
    prefix = loc.uri[: len(loc.uri) - len(loc.path)] if loc.uri.endswith(loc.path) else ""
    return [Location(loc.fs, p, prefix + p if prefix else p) for p in sorted(paths)]


TEMP_PREFIX = ".tmp-"


def publish(loc: Location, write: Callable[[pafs.FileSystem, str], None]) -> None:
    """``write(fs, temp_path)`` writes the whole file; then it takes ``loc``'s name."""
    parent = str(PurePosixPath(loc.path).parent)
    tmp = str(PurePosixPath(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{PurePosixPath(loc.path).name}"))
    if loc.local:
        loc.fs.create_dir(parent, recursive=True)
    try:
        write(loc.fs, tmp)
        loc.fs.move(tmp, loc.path)
    except BaseException:
        try:
            loc.fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def remove_temporaries(d: Location) -> int:
    """Delete what ``publish`` left in directory ``d`` when its writer was killed mid-write (its
    cleanup never ran): the temporary names, never a published file. Returns how many."""
    infos = d.fs.get_file_info(pafs.FileSelector(d.path, allow_not_found=True))
    gone = 0
    for i in infos:
        if i.type == pafs.FileType.File and PurePosixPath(i.path).name.startswith(TEMP_PREFIX):
            delete(Location(d.fs, i.path, i.path))
            gone += 1
    return gone


def write_bytes(loc: Location, data: bytes) -> None:
    def put(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_output_stream(path, compression=None) as f:  # bytes as given, whatever the suffix
            f.write(data)

    publish(loc, put)


def delete(loc: Location) -> None:
    """Remove a file; one that is not there is fine."""
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass


def location(where: "str | os.PathLike | Location", options: Optional[dict[str, Any]] = None) -> Location:
    """``where`` as a Location (a Location as it is; a path or URI resolved with ``options``)."""
    return where if isinstance(where, Location) else resolve(os.fspath(where) if not isinstance(where, str) else where,
                                                             options)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()
