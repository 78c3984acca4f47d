"""Stable identities: a stage's fingerprint, and the identity of a local directory or file it depends on.

A fingerprint is a SHA-256 over a canonical JSON form of the stage's configuration (sorted keys, no whitespace,
tuples as lists) plus its upstream fingerprint, so it is the same in every process, on every machine and for every
dict order, and any change upstream changes everything downstream.

A local directory's identity is a hash of its files' names and contents, not of its location or its own name: a
copy elsewhere, under any name, is the same.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

# Bump to invalidate every stored artifact when an on-disk format changes incompatibly.
FINGERPRINT_VERSION = 1
FINGERPRINT_LENGTH = 16  # hex digits: 64 bits, ample for the number of configurations one project sees

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Documentation files, which say nothing about a model's weights.
_DOCS = re.compile(r"(^|/)(\.[^/]*|README[^/]*|LICENSE[^/]*|[^/]*\.md)$", re.IGNORECASE)


def is_commit(revision: str | None) -> bool:
    """Whether a Hub ``revision`` is a commit hash (a branch or tag may move; a commit names one version)."""
    return bool(revision) and _COMMIT.match(revision) is not None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that every process produces (raises ``TypeError`` naming odd values)."""
    return json.dumps(_plain(value, "config"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(config: Mapping, upstream: str | None = None) -> str:
    """Short hex hash of ``config`` and the ``upstream`` stage's fingerprint."""
    text = f"bitnet-distill/{FINGERPRINT_VERSION}\n{canonical_json(config)}\n{upstream or ''}"
    return sha256_hex(text.encode())[:FINGERPRINT_LENGTH]


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON types; ``where`` names it in errors."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, PurePath):
        return value.as_posix()
    if hasattr(value, "model_dump"):  # pydantic models
        return _plain(value.model_dump(mode="json"), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"cannot fingerprint {where}: key {key!r} is a {type(key).__name__}, not a string")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(item, where) for item in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():  # numpy scalars
        return value.item()
    raise TypeError(f"cannot fingerprint {where}: a {type(value).__name__} has no stable text form; "
                    "pass numbers, strings, lists or mappings")


# ---- local files -----------------------------------------------------------------------------------

_FILE_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: hash each big weight file once per process


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed (weights need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(path)
    return _FILE_HASHES[key]


def directory_sha256(directory: Path, names: Iterable[str]) -> str:
    """One hash over the named files (relative paths) of ``directory``: their names and contents."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{_file_sha256(directory / name)}\n".encode())
    return digest.hexdigest()


def _local_files(directory: Path, wanted: re.Pattern | None, docs: bool = False) -> list[str]:
    """The files under ``directory`` (relative names), hidden ones never, documentation only with ``docs``."""
    names = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    names = [n for n in names if (docs or not _DOCS.search(n)) and not any(part.startswith(".")
                                                                                   for part in n.split("/"))]
    return [n for n in names if wanted is None or wanted.search(n)]


def directory_identity(directory: Path, wanted: re.Pattern | None = None, docs: bool = False) -> dict:
    """``{sha256, files}`` of a local directory: a hash of the names (relative to it) and contents of its files
    (those matching ``wanted``), and how many there are. Not its location or its own name: a copy elsewhere, under
    any name, is the same. ``docs`` keeps README*, LICENSE* and *.md files in (a local dataset's card can define its
    configurations and splits)."""
    files = _local_files(directory, wanted, docs)
    return {"sha256": directory_sha256(directory, files), "files": len(files)}
