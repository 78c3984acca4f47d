"""The tokenize stage: every document of the configured source (``distill/data.py``) tokenized by the teacher's
tokenizer into fixed-length rows, written as Parquet token shards of two splits, train and eval.

Rows are packed (documents end to end, separated by EOS: no compute spent on padding) or padded (one document per
row, truncated). Runs of both flows share ``tokenize/<fp>``: the fingerprint covers only the data and the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from storage import shards

from ..config import ConfigError, DataConfig, PipelineConfig
from ..data import Document, check_source, files_identity, iter_documents, local_dataset_identity
from ..stage import Context, Manifest, Preflight, Split, Stage
from ..teacher import TeacherFacts


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


class TokenizeManifest(Manifest):
    seq_len: int
    packing: str
    splits: dict[str, Split]

    def parts(self) -> list[str]:
        return [split.path for split in self.splits.values()]


class Tokenize(Stage):
    name = "tokenize"
    Manifest = TokenizeManifest
    shared = True

    def check(self, pre: Preflight) -> None:
        check_source(pre.config.data)
        special_ids(pre.teacher.tokenizer, pre.config.data.packing)

    def settings(self, cfg: PipelineConfig, teacher: TeacherFacts) -> dict:
        own = {"data": cfg.data.fingerprinted(), "tokenizer": teacher.tokenizer_identity}
        # local data by content, not only by name; a Hub dataset by the commit data.revision names (the flow pins it)
        if cfg.data.files:
            own["files"] = files_identity(cfg.data)
        if (local := local_dataset_identity(cfg.data)) is not None:
            own["dataset_files"] = local
        return own

    def run(self, ctx: Context) -> TokenizeManifest:
        cfg, store, path = ctx.config.data, ctx.store, ctx.path
        store.delete(path)  # what an interrupted attempt left (a split may be complete while the other is not)
        writers = {split: shards.TokenShardWriter(store, f"{path}/{split}", cfg.seq_len, cfg.rows_per_shard)
                   for split in ("train", "eval")}

        def counted(documents):
            for doc in documents:
                ctx.reporter.advance(1)
                yield doc

        ctx.reporter.start(cfg.max_documents, "tokenize (documents)")
        for split, rows in token_rows(cfg, ctx.teacher.tokenizer, documents=counted(iter_documents(cfg))):
            writers[split].write(rows)
        ctx.reporter.close()
        ctx.ensure_held()  # on S3 a lease lost to another run (this one hung) must not mark anything complete
        splits = {split: Split(path=f"{path}/{split}", rows=writer.close()["rows"]) for split, writer in writers.items()}
        for split, written in splits.items():
            if not written.rows:
                # the built-in corpus has its own fixed split (distill/data.py); other sources split by hash
                more = ("raise data.max_documents" if cfg.builtin
                        else f"{'raise' if split == 'eval' else 'lower'} data.eval_fraction ({cfg.eval_fraction})")
                raise ConfigError(f"tokenize produced no {split} rows from the configured data: add documents, lower "
                                  f"data.seq_len ({cfg.seq_len}) or {more}")
        return ctx.manifest(TokenizeManifest, self.name, seq_len=cfg.seq_len, packing=cfg.packing, splits=splits)
