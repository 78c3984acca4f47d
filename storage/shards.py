"""Token shards: fixed-length rows of token ids as Parquet files, plus a manifest with row counts and checksums.

Columns of every ``shard-<nnnnn>.parquet``:
    ``input_ids``  fixed_size_list<int32>[seq_len]  one packed (or padded) row
    ``length``     int32   number of real tokens in the row (the attention mask is ``position < length``)
    ``doc_id``     int64   the document the row's first token came from

The split directory is finished by ``_COMPLETE.json`` (see ``ArtifactStore.mark_complete``), which is also the
manifest: ``{format, seq_len, rows, shards: [{file, rows, bytes, sha256}]}``. Plain pyarrow, duckdb and
``datasets.load_dataset("parquet", data_files=".../*.parquet")`` read the shards without this module.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IntegrityError, StoreError
from .fingerprint import sha256_hex

FORMAT = "token-shards/parquet/1"
COLUMNS = ("input_ids", "length", "doc_id")


def schema(seq_len: int) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(pa.int32(), seq_len)), ("length", pa.int32()), ("doc_id", pa.int64())])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class TokenShardWriter:
    """Buffers rows and writes a shard each ``rows_per_shard`` rows; ``close()`` writes the last, partial shard and
    the manifest (marking the split complete) and returns the manifest.

    A writer starts from an empty directory: leftovers of an interrupted earlier attempt are deleted; a complete
    split is never overwritten (delete it first).
    """

    def __init__(self, store, path: str, seq_len: int, rows_per_shard: int = 4096, *, compression: str = "zstd"):
        if seq_len < 1 or rows_per_shard < 1:
            raise ValueError(f"seq_len ({seq_len}) and rows_per_shard ({rows_per_shard}) must be positive")
        if store.is_complete(path):
            raise StoreError(f"token shards at {store.url(path)} are already complete; delete them to rewrite")
        store.delete(path)
        self.store, self.path, self.seq_len = store, path, seq_len
        self.rows_per_shard, self.compression = rows_per_shard, compression
        self.shards: list[dict] = []
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._written_rows = 0

    @property
    def rows(self) -> int:
        """Rows received so far (written or buffered)."""
        return self._written_rows + self._pending_rows

    def write(self, batch: Mapping[str, np.ndarray]) -> None:
        """Add rows: ``input_ids`` [n, seq_len], ``length`` [n], ``doc_id`` [n]."""
        ids = np.asarray(batch["input_ids"])
        n = len(ids)
        if ids.ndim != 2 or ids.shape[1] != self.seq_len:
            raise ValueError(f"input_ids must have shape [n, {self.seq_len}], got {list(ids.shape)}")
        columns = {"input_ids": ids.astype(np.int32, copy=False),
                   "length": np.asarray(batch["length"], dtype=np.int32),
                   "doc_id": np.asarray(batch["doc_id"], dtype=np.int64)}
        for name in ("length", "doc_id"):
            if columns[name].shape != (n,):
                raise ValueError(f"{name} must have shape [{n}] to match input_ids, got {list(columns[name].shape)}")
        if n and (columns["length"].min() < 0 or columns["length"].max() > self.seq_len):
            raise ValueError(f"length must lie in [0, {self.seq_len}]")
        self._pending.append(columns)
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, count: int) -> None:
        merged = {k: np.concatenate([p[k] for p in self._pending]) for k in COLUMNS}
        rest = {k: v[count:] for k, v in merged.items()}
        self._pending, self._pending_rows = ([rest] if len(rest["length"]) else []), len(rest["length"])
        rows = {k: v[:count] for k, v in merged.items()}
        table = pa.Table.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(rows["input_ids"].reshape(-1)), self.seq_len),
             pa.array(rows["length"]), pa.array(rows["doc_id"])], schema=schema(self.seq_len))
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=self.compression)
        data = buffer.getvalue()
        name = shard_name(len(self.shards))
        self.store.write_bytes(f"{self.path}/{name}", data)
        self.shards.append({"file": name, "rows": count, "bytes": len(data), "sha256": sha256_hex(data)})
        self._written_rows += count

    def close(self) -> dict:
        if self._pending_rows:
            self._flush(self._pending_rows)
        manifest = {"format": FORMAT, "seq_len": self.seq_len, "rows": self._written_rows, "shards": self.shards,
                    "columns": list(COLUMNS)}
        self.store.mark_complete(self.path, manifest)
        return manifest


def read_shard(store, path: str, entry: dict) -> dict[str, np.ndarray]:
    """One shard as numpy arrays, after checking its bytes against the manifest entry."""
    data = store.read_bytes(f"{path}/{entry['file']}")
    if sha256_hex(data) != entry["sha256"]:
        raise IntegrityError(f"token shard {store.url(path, entry['file'])} does not match its manifest checksum "
                             "(corrupted or replaced); delete the split and rerun the tokenize stage")
    return table_to_arrays(pq.read_table(io.BytesIO(data)))


def table_to_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    ids = table.column("input_ids").combine_chunks()
    seq_len = ids.type.list_size
    return {"input_ids": ids.flatten().to_numpy().reshape(-1, seq_len),
            "length": table.column("length").to_numpy(), "doc_id": table.column("doc_id").to_numpy()}


def iter_token_shards(store, path: str) -> Iterator[dict[str, np.ndarray]]:
    """The split's shards in order, one at a time (memory stays at one shard)."""
    manifest = store.read_manifest(path)
    for entry in manifest["shards"]:
        yield read_shard(store, path, entry)


def read_token_shards(store, path: str) -> dict[str, np.ndarray]:
    """The whole split: ``input_ids`` [N, T] int32, ``length`` [N] int32, ``doc_id`` [N] int64."""
    seq_len = store.read_manifest(path)["seq_len"]
    parts = list(iter_token_shards(store, path))
    if not parts:
        return {"input_ids": np.zeros((0, seq_len), np.int32), "length": np.zeros(0, np.int32),
                "doc_id": np.zeros(0, np.int64)}
    return {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}


def attention_mask(input_ids: np.ndarray, length: np.ndarray) -> np.ndarray:
    """[N, T] int8 mask: 1 for the first ``length`` positions of each row."""
    return (np.arange(input_ids.shape[1])[None, :] < np.asarray(length)[:, None]).astype(np.int8)


class TokenShardDataset:
    """A map-style PyTorch ``Dataset`` over a split: ``{input_ids, attention_mask, doc_id}`` tensors per row,
    decoding one shard at a time (the most recent is kept)."""

    def __init__(self, store, path: str):
        self.store, self.path = store, path
        self.manifest = store.read_manifest(path)
        self._starts = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self._shard: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        if self._shard is None or self._shard[0] != shard:
            self._shard = (shard, read_shard(self.store, self.path, self.manifest["shards"][shard]))
        rows, row = self._shard[1], index - self._starts[shard]
        ids = rows["input_ids"][row]
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(attention_mask(ids[None], rows["length"][row:row + 1])[0]),
                "doc_id": int(rows["doc_id"][row])}
