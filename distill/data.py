"""Text sources -> documents -> token rows: what the tokenize stage writes as shards.

Sources: the interpreter's standard library (offline quickstart), a Hugging Face dataset by name, or local
.txt / .jsonl / .parquet files. Documents are split into train / eval by a hash of their key, so the held-out
split is deterministic and never overlaps training. Rows are fixed-length: documents are packed end to end
separated by EOS (no compute wasted on padding), or padded / truncated one per row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage import layout, stdlib_corpus
from storage.fingerprint import directory_identity, file_sha256, hub_dataset_commit, is_commit
from storage.lease import holding_lock

from .artifacts import stage_finished
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
        root = stdlib_corpus.stdlib_root()
        for relpath in stdlib_corpus.list_files(root):
            yield Document(relpath, (root / relpath).read_text(encoding="utf-8", errors="replace"),
                           stdlib_corpus.split_of(relpath))
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


@dataclass
class RowBuffer:
    """Accumulates token rows of one split: ``input_ids`` [n, T] int32, ``length`` [n], ``doc_id`` [n]."""

    seq_len: int
    ids: list[np.ndarray] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)

    def add(self, row: np.ndarray, length: int, doc_id: int) -> None:
        self.ids.append(row.astype(np.int32))
        self.lengths.append(length)
        self.doc_ids.append(doc_id)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self) -> dict[str, np.ndarray]:
        batch = {
            "input_ids": np.stack(self.ids) if self.ids else np.zeros((0, self.seq_len), np.int32),
            "length": np.asarray(self.lengths, dtype=np.int32),
            "doc_id": np.asarray(self.doc_ids, dtype=np.int64),
        }
        self.ids, self.lengths, self.doc_ids = [], [], []
        return batch


class Packer:
    """Concatenates documents separated by EOS and cuts the stream into full rows of ``seq_len`` tokens.

    A row's ``doc_id`` is the document its first token came from; the trailing partial row is dropped.
    """

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len, self.eos_id = seq_len, eos_id
        self.stream: list[int] = []
        self.stream_doc = 0
        self.rows = RowBuffer(seq_len)

    def add(self, tokens: list[int], doc_id: int) -> None:
        if not self.stream:
            self.stream_doc = doc_id
        self.stream.extend(tokens)
        self.stream.append(self.eos_id)
        while len(self.stream) >= self.seq_len:
            self.rows.add(np.asarray(self.stream[: self.seq_len]), self.seq_len, self.stream_doc)
            self.stream = self.stream[self.seq_len:]
            self.stream_doc = doc_id


class Padder:
    """One document per row: truncated to ``seq_len``, right-padded with ``pad_id`` (the reference's way)."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.rows = RowBuffer(seq_len)

    def add(self, tokens: list[int], doc_id: int) -> None:
        tokens = tokens[: self.seq_len]
        row = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        row[: len(tokens)] = tokens
        self.rows.add(row, len(tokens), doc_id)


def special_ids(tokenizer, packing: str) -> tuple[int | None, int]:
    """(eos, pad) ids for ``data.packing``: packing separates documents with EOS; a tokenizer without a pad token
    pads with EOS (padding is masked anyway)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if packing == "pack" and eos is None:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token to separate packed documents "
                          "with; set data.packing: pad, or use a tokenizer with an eos_token")
    pad = pad if pad is not None else eos
    if pad is None:
        raise ConfigError(f"the tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token to pad rows "
                          "with; use a tokenizer that defines one of them")
    return eos, pad


def token_rows(cfg: DataConfig, tokenizer, batch_rows: int = 1024,
               documents: Iterable[Document] | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield ``(split, rows)`` batches of at most ``batch_rows`` rows as documents are tokenized."""
    eos, pad = special_ids(tokenizer, cfg.packing)
    make = (lambda: Packer(cfg.seq_len, eos)) if cfg.packing == "pack" else (lambda: Padder(cfg.seq_len, pad))
    builders = {"train": make(), "eval": make()}
    limits = {"train": cfg.max_train_rows, "eval": cfg.max_eval_rows}
    emitted = {"train": 0, "eval": 0}
    def produced(split: str) -> int:
        return emitted[split] + len(builders[split].rows)

    def full(split: str) -> bool:
        return limits[split] is not None and produced(split) >= limits[split]

    for doc_id, doc in enumerate(iter_documents(cfg) if documents is None else documents):
        if full(doc.split):
            if all(full(s) for s in builders):
                break
            continue
        # Whole documents: packing cuts them into seq_len rows, so "longer than the maximum" does not apply.
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        builders[doc.split].add(ids, doc_id)
        rows = builders[doc.split].rows
        if len(rows) >= batch_rows:
            batch = _limit(rows.take(), limits[doc.split], emitted[doc.split])
            emitted[doc.split] += len(batch["length"])
            yield doc.split, batch
    for split, builder in builders.items():
        batch = _limit(builder.rows.take(), limits[split], emitted[split])
        if len(batch["length"]):
            yield split, batch


def _limit(batch: dict[str, np.ndarray], limit: int | None, already: int) -> dict[str, np.ndarray]:
    if limit is None:
        return batch
    keep = max(0, limit - already)
    return {k: v[:keep] for k, v in batch.items()}


TOKENIZE_LOCK_TIMEOUT_S = 3600.0  # how long a second run waits for the one building the same token shards


def run_tokenize(cfg, store, stage: dict, reporter) -> dict:
    """The tokenize stage: token shards of both splits under ``stage["path"]``; returns the manifest.

    Runs of different flows share ``tokens/<fp>`` (the fingerprint covers only the data and the tokenizer), so the
    build holds a lock: a second run waits for the first and then reuses its shards instead of deleting them as
    debris under it."""
    path = stage["path"]
    if stage_finished(store, path):
        return store.read_manifest(path)
    what = f"the token shards at {store.url(path)}"
    with holding_lock(store, layout.lock_dir(path), what, TOKENIZE_LOCK_TIMEOUT_S, on_wait=reporter.log) as lock:
        if stage_finished(store, path):  # built by the run this one waited for
            return store.read_manifest(path)
        return _build_tokens(cfg, store, stage, reporter, lock)


def _build_tokens(cfg, store, stage: dict, reporter, lock) -> dict:
    from storage import shards

    from .teacher import load_tokenizer

    path = stage["path"]
    tokenizer = load_tokenizer(cfg.teacher)
    store.delete(path)  # debris of an interrupted attempt (a split may be complete while the other is not)
    writers = {split: shards.TokenShardWriter(store, f"{path}/{split}", cfg.data.seq_len, cfg.data.rows_per_shard)
               for split in ("train", "eval")}
    def counted(documents):
        for doc in documents:
            reporter.advance(1)
            yield doc

    reporter.start(cfg.data.max_documents, "tokenize (documents)")
    for split, rows in token_rows(cfg.data, tokenizer, documents=counted(iter_documents(cfg.data))):
        writers[split].write(rows)
    reporter.close()
    lock.ensure_held()  # on S3 a lease lost to another run (this one hung) must not mark anything complete
    manifest = {"stage": "tokenize", "fingerprint": stage["fingerprint"], "path": path,
                "seq_len": cfg.data.seq_len, "packing": cfg.data.packing,
                "splits": {split: w.close() for split, w in writers.items()}}
    for split in ("train", "eval"):
        if not manifest["splits"][split]["rows"]:
            # the built-in corpus has its own fixed split (storage/stdlib_corpus.py); other sources split by hash
            more = ("raise data.max_documents" if cfg.data.builtin
                    else f"{'raise' if split == 'eval' else 'lower'} data.eval_fraction ({cfg.data.eval_fraction})")
            raise ConfigError(f"tokenize produced no {split} rows from the configured data: add documents, lower "
                              f"data.seq_len ({cfg.data.seq_len}) or {more}")
    store.mark_complete(path, manifest)
    return manifest


def load_split(store, tokens: dict, split: str):
    """All rows of one tokenized split as a ``Rows`` (token ids are small next to the teacher cache)."""
    from storage import shards

    from .rows import rows_from_arrays

    table = shards.read_token_shards(store, f"{tokens['path']}/{split}")
    return rows_from_arrays(table["input_ids"], table["length"])
