"""Stable identities: a stage's fingerprint, and the identity of a model or tokenizer it depends on.

A fingerprint is a SHA-256 over a canonical JSON form of the stage's configuration (sorted keys, no whitespace,
tuples as lists) plus its upstream fingerprint, so it is the same in every process, on every machine and for every
dict order, and any change upstream changes everything downstream.

A model's identity is what distinguishes its weights without loading them: for a Hub name, the commit hash (from
the given revision when it is one, else from the local Hugging Face cache, without network); for a local directory,
a hash of its files' contents (not of its location, so a copy elsewhere is the same model). A Hub dataset's is the
commit its revision names, asked of the Hub when the revision is not one.
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
# Files of a local model directory that say nothing about the model.
_NOT_MODEL = re.compile(r"(^|/)(\.[^/]*|README[^/]*|LICENSE[^/]*|[^/]*\.md)$", re.IGNORECASE)
_TOKENIZER = re.compile(r"(^|/)(tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.[^/]+|merges\.txt"
                        r"|[^/]*\.model|[^/]*\.tiktoken|chat_template[^/]*)$")


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


# ---- models and tokenizers -----------------------------------------------------------------------------------

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
    names = [n for n in names if (docs or not _NOT_MODEL.search(n)) and not any(part.startswith(".")
                                                                                   for part in n.split("/"))]
    return [n for n in names if wanted is None or wanted.search(n)]


def directory_identity(directory: Path, wanted: re.Pattern | None = None, docs: bool = False) -> dict:
    """``{name, sha256, files}`` of a local directory: its name, and a hash of its files' names and contents (not of
    its location, so a copy elsewhere is the same). ``docs`` keeps README*, LICENSE* and *.md files in (a local
    dataset's card can define its configurations and splits)."""
    files = _local_files(directory, wanted, docs)
    return {"name": directory.name, "sha256": directory_sha256(directory, files), "files": len(files)}


def hub_commit(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """The commit hash ``revision`` (default ``main``) resolved to in the local Hugging Face cache, or None."""
    if is_commit(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts  # .../models--org--name/snapshots/<commit>/config.json
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


def hub_dataset_commit(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                       timeout: float = 10.0) -> str | None:
    """The commit a Hub dataset's ``revision`` (default ``main``) names: the revision itself when it is a commit hash,
    else the Hub's answer, else (offline, or the Hub out of reach) what the local Hugging Face cache's refs say, else
    None; None too when the Hub says there is no such dataset or revision. Unlike a model's, a dataset's files are
    not yet in the cache when a run is planned. The Hub's answer is written to the cache's refs, as
    ``hf_hub_download`` does for a branch or tag: the tokenize stage then loads by commit, which writes no ref, and
    a later run without the Hub still knows the commit (and so finds the shards and everything after them)."""
    if is_commit(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    ref = (Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset") / "refs"
           / (revision or "main"))
    try:
        commit = HfApi().dataset_info(repo_id, revision=revision, timeout=timeout).sha
    except (RepositoryNotFoundError, RevisionNotFoundError):  # the Hub's answer (a deleted branch, no access), which
        return None                                             # a stale ref in the cache must not overrule
    except Exception:  # offline mode, no network, a server error: the cache may know
        try:
            commit = ref.read_text().strip()
        except (OSError, ValueError):
            return None
        return commit if is_commit(commit) else None
    if not is_commit(commit):
        return None
    _write_ref(ref, commit)
    return commit


def _write_ref(ref: Path, commit: str) -> None:
    """``ref`` (a file of the Hugging Face cache's refs) names ``commit``, written as huggingface_hub writes one (a
    torn write reads back as no commit); a read-only cache is left as it is."""
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            ref.write_text(commit)
    except (OSError, ValueError):
        pass


def _identity(name_or_path: str | Path, revision: str | None, cache_dir, wanted: re.Pattern | None) -> dict:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        identity = directory_identity(path, wanted)
        if not identity["files"]:
            raise ValueError(f"{path} has no model or tokenizer files to identify it by")
        return identity
    name = str(name_or_path)
    return {"name": name, "revision": revision or "main", "commit": hub_commit(name, revision, cache_dir)}


def model_identity(name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """``{name, sha256, files}`` for a local directory (every file but docs and hidden ones), or
    ``{name, revision, commit}`` for a Hub name (``commit`` None when the revision is not a commit hash and the model
    is not in the local cache: pin ``revision`` to a commit for strict reproducibility)."""
    return _identity(name_or_path, revision, cache_dir, None)


def tokenizer_identity(name_or_path: str | Path, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> dict:
    """Like ``model_identity`` but a local directory is identified by its tokenizer files only, so retraining the
    weights keeps the token shards."""
    return _identity(name_or_path, revision, cache_dir, _TOKENIZER)
