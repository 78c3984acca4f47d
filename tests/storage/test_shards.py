"""Token shards: round trip through our reader, and through pyarrow, datasets and duckdb without our code."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import IntegrityError, StoreError
from storage.shards import TokenShardDataset, TokenShardWriter, iter_token_shards, read_token_shards

SEQ_LEN = 8


def _rows(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    ids = (np.arange(n * SEQ_LEN, dtype=np.int64).reshape(n, SEQ_LEN) + offset * SEQ_LEN) % 70_000
    return {"input_ids": ids, "length": (np.arange(n) + offset) % SEQ_LEN + 1, "doc_id": np.arange(n) + offset}


def _write(store, path="tokens/fp/train", batches=(7, 5, 11), rows_per_shard=10) -> dict:
    writer = TokenShardWriter(store, path, SEQ_LEN, rows_per_shard)
    offset = 0
    for n in batches:
        writer.write(_rows(n, offset))
        offset += n
    assert writer.rows == offset
    return writer.close()


def test_round_trip_and_manifest(store):
    manifest = _write(store)
    assert manifest["rows"] == 23 and [s["rows"] for s in manifest["shards"]] == [10, 10, 3]
    assert store.is_complete("tokens/fp/train") and store.read_manifest("tokens/fp/train") == manifest
    table = read_token_shards(store, "tokens/fp/train")
    expected = _rows(23)
    assert table["input_ids"].dtype == np.int32 and table["input_ids"].shape == (23, SEQ_LEN)
    for name in ("input_ids", "length", "doc_id"):
        np.testing.assert_array_equal(table[name], expected[name])
    assert [len(s["length"]) for s in iter_token_shards(store, "tokens/fp/train")] == [10, 10, 3]
    dataset = TokenShardDataset(store, "tokens/fp/train")
    assert len(dataset) == 23
    row = dataset[12]
    assert row["input_ids"].tolist() == expected["input_ids"][12].tolist()
    assert row["attention_mask"].tolist() == [1] * 5 + [0] * 3 and row["doc_id"] == 12


def test_readable_without_our_code(local_store, tmp_path):
    manifest = _write(local_store)
    directory = local_store.local_path("tokens/fp/train")
    files = sorted(str(p) for p in directory.glob("*.parquet"))
    assert [f.rsplit("/", 1)[-1] for f in files] == [s["file"] for s in manifest["shards"]]

    table = pq.read_table(files[0])  # plain pyarrow
    ids_type = table.schema.field("input_ids").type
    assert ids_type.list_size == SEQ_LEN and str(ids_type.value_type) == "int32"
    assert table.column("input_ids").to_pylist()[1] == _rows(2)["input_ids"][1].tolist()

    import datasets  # the Hugging Face loader, as a user would call it

    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 23 and loaded[22]["doc_id"] == 22
    assert loaded[3]["input_ids"] == _rows(4)["input_ids"][3].tolist()

    import duckdb

    query = f"SELECT count(*), max(length) FROM read_parquet('{directory}/*.parquet')"
    count, longest = duckdb.connect().execute(query).fetchone()
    assert (count, longest) == (23, SEQ_LEN)


def test_readable_by_pyarrow_from_s3(s3_store):
    _write(s3_store)
    data = s3_store.read_bytes("tokens/fp/train/shard-00001.parquet")  # any S3 client would do
    assert pq.read_table(io.BytesIO(data)).column("doc_id").to_pylist() == list(range(10, 20))


def test_corrupt_shard_is_named(store):
    _write(store)
    store.write_bytes("tokens/fp/train/shard-00001.parquet", b"PAR1 damaged")
    with pytest.raises(IntegrityError, match=r"shard-00001\.parquet does not match its manifest checksum"):
        read_token_shards(store, "tokens/fp/train")


def test_bad_input_and_complete_splits(local_store):
    writer = TokenShardWriter(local_store, "t", SEQ_LEN, 4)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[n, 8\]"):
        writer.write({"input_ids": np.zeros((2, 5)), "length": [1, 1], "doc_id": [0, 0]})
    with pytest.raises(ValueError, match=r"doc_id must have shape \[2\]"):
        writer.write({"input_ids": np.zeros((2, SEQ_LEN)), "length": [1, 1], "doc_id": [0]})
    writer.write(_rows(1))
    writer.close()
    with pytest.raises(StoreError, match="already complete"):
        TokenShardWriter(local_store, "t", SEQ_LEN)


def test_interrupted_split_is_restarted_clean(local_store):
    writer = TokenShardWriter(local_store, "t", SEQ_LEN, 4)
    writer.write(_rows(9))  # two shards written, never closed: a crash
    assert local_store.list("t") == ["t/shard-00000.parquet", "t/shard-00001.parquet"]
    assert not local_store.is_complete("t")
    assert _write(local_store, "t", batches=(3,), rows_per_shard=4)["rows"] == 3
    assert local_store.list("t") == ["t/_COMPLETE.json", "t/shard-00000.parquet"]
