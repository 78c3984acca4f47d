"""Where the text comes from: the documents a run tokenizes, and the version of them its fingerprints name.

Three sources (``data.*``): the running interpreter's standard library (the offline quickstart's corpus), a Hugging
Face dataset (from the Hub at the commit ``data.revision`` names when the run starts, or a local dataset
directory), or local ``.txt`` / ``.jsonl`` / ``.parquet`` files. Every document has a split: the standard library
keeps its own (by a hash of each file's path); other sources split by a hash of each document's key, so the
held-out split is deterministic and never overlaps training.

The standard library corpus
    Every ``*.py`` under the stdlib root, in sorted order of their POSIX path relative to it, except installed
    packages (``site-packages/``), test suites (any ``test``, ``tests`` or ``idle_test`` directory: deliberately
    broken files, bulky fixtures, and missing from many distributions' Python, so leaving them out keeps the corpus
    alike across machines) and generated data rather than code (``pydoc_data/``, the charmap codecs in
    ``encodings/`` that define a ``decoding_table``, whose tables would flatter perplexity, and
    ``_sysconfigdata_*.py``). A file is held out when the first 8 bytes of ``sha256(relpath)``, as a big-endian
    integer, fall below ``STDLIB_EVAL_FRACTION`` of 2**64: the same on every machine and Python version, and a
    module is never in both splits. The quickstart teacher never saw the held-out modules.
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.fingerprint import directory_identity, file_sha256, is_commit

from .config import ConfigError, DataConfig


@dataclass
class Document:
    key: str  # what the held-out split hashes (a module path, a file name + row, ...)
    text: str
    split: str  # "train" or "eval"


def hash_split(key: str, eval_fraction: float) -> str:
    """Deterministic split by sha256 of the document key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def pick_text(row: dict, text_field: str | None, where: str) -> str:
    """The configured text column, else ``text``, else the reference's ``instruction`` + ``response``."""
    if text_field is not None:
        if text_field not in row:
            raise ConfigError(f"data.text_field {text_field!r} is not a column of {where}; columns: {sorted(row)}")
        return str(row[text_field] or "")
    if "text" in row:
        return str(row["text"] or "")
    if "instruction" in row and "response" in row:
        return f"{row['instruction'] or ''}\n{row['response'] or ''}"
    raise ConfigError(f"{where} has no 'text' column and no instruction/response pair; set data.text_field "
                      f"to one of {sorted(row)}")


# ---- the standard library corpus -------------------------------------------------------------------------------

STDLIB_EVAL_FRACTION = 0.05
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "pydoc_data"})
_CODEC_TABLE = re.compile(r"^decoding_(table|map) = ", re.MULTILINE)  # a charmap codec's module-level table


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_split(relpath: str) -> str:
    """``"eval"`` for about ``STDLIB_EVAL_FRACTION`` of the files, chosen by a hash of the POSIX relative path."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") < STDLIB_EVAL_FRACTION * 2**64 else "train"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")  # a few files carry Latin-1 bytes in comments


def _generated_or_empty(relpath: str, text: str) -> bool:
    parts = relpath.split("/")
    if parts[-1].startswith("_sysconfigdata") or (parts[0] == "encodings" and _CODEC_TABLE.search(text)):
        return True
    return not text.strip()


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus's files, sorted (see the module docstring)."""
    root = stdlib_root() if root is None else Path(root)
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        # the directory test first, so that site-packages and test suites are never read
        if STDLIB_EXCLUDED_DIRS.intersection(rel.split("/")[:-1]) or not path.is_file():
            continue
        if not _generated_or_empty(rel, _read(path)):
            out.append(rel)
    return sorted(out)


def stdlib_documents(split: str | None = None, root: Path | None = None) -> Iterator[Document]:
    """The corpus's documents (of one ``split``, or both interleaved in path order), keyed by relative path."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    root = stdlib_root() if root is None else Path(root)
    for rel in stdlib_files(root):
        if split is None or stdlib_split(rel) == split:
            yield Document(rel, _read(root / rel), stdlib_split(rel))


# ---- Hugging Face datasets ---------------------------------------------------------------------------------------

def _hub_rows(cfg: DataConfig) -> Iterable[dict]:
    """The rows of ``data.dataset``: a local directory (``~`` expanded), or a Hub dataset at ``data.revision``."""
    import datasets

    local = _local_dataset(cfg)
    try:
        rows = datasets.load_dataset(str(local or cfg.dataset), cfg.dataset_config, split=cfg.split,
                                     streaming=cfg.streaming, revision=cfg.revision)
    except Exception as exc:  # datasets raises many types for "not found" / "offline"
        if local is not None:
            raise ConfigError(f"cannot load the dataset directory {local} (data.dataset; config "
                              f"{cfg.dataset_config!r}, split {cfg.split!r}): {exc}") from None
        raise ConfigError(
            f"cannot load dataset {cfg.dataset!r} (config {cfg.dataset_config!r}, split {cfg.split!r}, revision "
            f"{cfg.revision or 'main'!r}): {exc}. It needs the Hugging Face Hub (or its local cache); offline, pass "
            "local files with data.files"
        ) from None
    if local is None:
        check_commit_read(cfg, rows)
    return rows


def check_commit_read(cfg: DataConfig, rows) -> None:
    """Raise unless a Hub dataset pinned to a commit was read at that commit (the shards' fingerprint names it).
    Online, ``datasets`` reads the revision it is given. Offline it reads the newest copy in its cache whatever the
    revision, and a prepared copy's directory is named by the commit it came from, which is what this checks
    (streamed rows have no copy: offline, streaming fails)."""
    files = getattr(rows, "cache_files", None)
    if not files or not is_commit(cfg.revision):
        return
    read = Path(files[0]["filename"]).parent.name
    if read != cfg.revision:
        copy = f"commit {read}" if is_commit(read) else f"of unknown version ({read})"
        use_it = f", or set data.revision: {read} to tokenize that copy" if is_commit(read) else ""
        raise ConfigError(f"dataset {cfg.dataset!r}: the datasets library read its cached copy {copy}, not commit "
                          f"{cfg.revision} that the run's fingerprints name (offline, it reads the newest copy in its "
                          f"cache whatever the revision): connect to the Hub (unset HF_HUB_OFFLINE and "
                          f"HF_DATASETS_OFFLINE) to read that commit{use_it}")


def _local_dataset(cfg: DataConfig) -> Path | None:
    """``data.dataset`` when it names a local directory (``datasets.load_dataset`` reads one) rather than the Hub."""
    path = Path(cfg.dataset).expanduser() if cfg.dataset else None
    return path if path is not None and path.is_dir() else None


def hub_dataset(cfg: DataConfig) -> str | None:
    """``data.dataset`` when it names a Hub dataset, else None (the built-in corpus, ``data.files``, a local
    directory)."""
    return cfg.dataset if cfg.dataset and _local_dataset(cfg) is None else None


def hub_dataset_commit(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                       timeout: float = 10.0) -> str | None:
    """The commit a Hub dataset's ``revision`` (default ``main``) names: the revision itself when it is a commit hash,
    else the Hub's answer, else (offline, or the Hub out of reach) what the local Hugging Face cache's refs say, else
    None; None too when the Hub says there is no such dataset or revision. The Hub's answer is written to the cache's
    refs, as ``hf_hub_download`` does for a branch or tag: the tokenize stage then loads by commit, which writes no
    ref, and a later run without the Hub still knows the commit (and so finds the shards and everything after)."""
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


def pin_dataset_revision(cfg: DataConfig) -> DataConfig:
    """``cfg`` with a Hub dataset's ``revision`` replaced by the commit it names now, so that the token shards'
    fingerprint covers the data's version (a new upstream commit rebuilds them, an unchanged one reuses them) and the
    tokenize stage reads exactly that commit. Unchanged for other sources, and where the commit cannot be known
    (offline and not in the local cache; then the shards are fingerprinted by name and revision only)."""
    if hub_dataset(cfg) is None:
        return cfg
    commit = hub_dataset_commit(cfg.dataset, cfg.revision)
    return cfg if commit is None else cfg.model_copy(update={"revision": commit})


def unknown_dataset_version(cfg: DataConfig) -> bool:
    """Whether the tokens of ``cfg`` come from a Hub dataset whose version is not known: its revision is not a
    commit, even after ``pin_dataset_revision``."""
    return hub_dataset(cfg) is not None and not is_commit(cfg.revision)


def local_dataset_identity(cfg: DataConfig) -> dict | None:
    """For ``data.dataset`` naming a local directory, a hash of its files' names and contents (what the tokens
    depend on, as for ``data.files``); None for a Hub dataset."""
    path = _local_dataset(cfg)
    return None if path is None else directory_identity(path, docs=True)



# ---- local files ---------------------------------------------------------------------------------------------

def check_data_file(path: Path) -> None:
    if not path.is_file():
        what = "is a directory: list its files" if path.is_dir() else "does not exist"
        raise ConfigError(f"data.files: {path} {what}")
    if path.stat().st_size == 0:
        raise ConfigError(f"data.files: {path} is empty")


def _file_rows(path: Path) -> Iterator[dict]:
    check_data_file(path)
    if path.suffix in (".txt", ".md", ".py"):
        yield {"text": path.read_text(encoding="utf-8", errors="replace")}
        return
    import datasets

    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if builder is None:
        raise ConfigError(f"data.files: {path} has an unsupported type; use .txt, .jsonl or .parquet")
    try:
        yield from datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    except Exception as exc:  # pyarrow's or datasets' own parse errors, whose types vary by format and version
        raise ConfigError(f"data.files: cannot read {path} as {path.suffix.lstrip('.')}: {type(exc).__name__}: "
                          f"{exc}") from None


def files_identity(cfg: DataConfig) -> list[list[str]]:
    """``[name, sha256]`` of each of ``data.files``: what the tokens depend on (documents are keyed by file name), so
    that a file edited in place, or another file of the same name, rebuilds them."""
    identity = []
    for name in cfg.files:
        path = Path(name).expanduser()
        check_data_file(path)
        identity.append([path.name, file_sha256(path)])
    return identity


# ---- every source ---------------------------------------------------------------------------------------------

def check_source(cfg: DataConfig) -> None:
    """Fail fast on an unreadable source or a missing text column: read up to the first document (a Hub dataset
    that is not streamed is downloaded first, and the built-in corpus lists its files first)."""
    if cfg.revision is not None and _local_dataset(cfg) is not None:
        raise ConfigError(f"data.revision {cfg.revision!r} names a Hub revision, but data.dataset {cfg.dataset!r} is a "
                          "local directory, which has none (its files are the data, fingerprinted by content); remove "
                          "data.revision")
    next(iter(_raw_documents(cfg)), None)


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every usable document of the configured source, with its split, in a deterministic order."""
    count = 0
    for doc in _raw_documents(cfg):
        if len(doc.text.strip()) < max(cfg.min_chars, 1):
            continue
        yield doc
        count += 1
        if cfg.max_documents is not None and count >= cfg.max_documents:
            return


def _raw_documents(cfg: DataConfig) -> Iterator[Document]:
    if cfg.builtin == "stdlib":
        # the corpus's own split, so that the quickstart teacher never saw the eval modules; both splits are
        # interleaved in path order so that data.max_documents keeps some of each
        yield from stdlib_documents()
    elif cfg.dataset:
        for i, row in enumerate(_hub_rows(cfg)):
            text = pick_text(row, cfg.text_field, f"dataset {cfg.dataset!r}")
            yield Document(f"{cfg.dataset}:{i}:{text[:64]}", text, hash_split(f"{i}:{text}", cfg.eval_fraction))
    else:
        for name in cfg.files:
            path = Path(name).expanduser()
            for i, row in enumerate(_file_rows(path)):
                text = pick_text(row, cfg.text_field, str(path))
                yield Document(f"{path.name}:{i}", text, hash_split(f"{path.name}:{i}:{text}", cfg.eval_fraction))
