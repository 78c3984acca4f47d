"""The teacher cache in one process: round trips for every storage dtype and codec, plain-zarr readability, resume,
integrity checks naming the damaged chunk, fingerprint checks, the reader's access patterns and memory bound."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.cache import (CacheError, CacheWriteError, ChunkError, FingerprintMismatchError, LockedError,
                           TeacherCacheReader, TeacherCacheSpec, TeacherCacheWriter)
from storage.cache_spec import ATTRS_KEY

from .helpers import build_cache, chunk_arrays, expected_stored, small_spec

SPEC = small_spec()  # 10 samples, chunks of 3: 4 chunks, the last holding one sample


def assert_reads_back(reader: TeacherCacheReader, spec: TeacherCacheSpec) -> None:
    everything = reader.get_batch(range(spec.num_samples))
    assert set(everything) == set(spec.arrays()), sorted(everything)  # every array the spec stores, no more
    for name, tensor in everything.items():
        expected = torch.cat([expected_stored(spec, c)[name] for c in range(spec.num_chunks)])
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_per_storage_dtype(local_store, dtype):
    spec = small_spec(dtype=dtype)
    build_cache(local_store, "cache", spec)
    assert_reads_back(TeacherCacheReader(local_store, "cache", fingerprint=spec.fingerprint), spec)


def test_round_trip_on_s3_with_full_logits(s3_store):
    spec = small_spec(full_logits=True, vocab_size=12, topk=0)
    build_cache(s3_store, "cache", spec)
    reader = TeacherCacheReader(s3_store, "cache")
    assert reader.complete and "logits" in reader.get_batch([0])
    assert_reads_back(reader, spec)


@pytest.mark.parametrize("codec", ["zstd:1", "blosc", "blosc:lz4:bitshuffle", "gzip", "none"])
def test_codecs(local_store, codec):
    spec = small_spec(codec=codec, topk_codec=codec)
    build_cache(local_store, "cache", spec)
    assert_reads_back(TeacherCacheReader(local_store, "cache"), spec)


def test_top_k_has_its_own_codec_in_the_zarr_metadata(local_store):
    import zarr

    build_cache(local_store, "cache", SPEC)
    group = zarr.open_group(str(local_store.local_path("cache/data.zarr")), mode="r")
    for name in ("topk_values", "topk_indices"):  # default: bit-shuffled LZ4, typesize of the array's dtype
        (codec,) = group[name].compressors
        assert (codec.cname.value, codec.shuffle.value, codec.typesize) == ("lz4", "bitshuffle",
                                                                            group[name].dtype.itemsize)
    for name in ("hidden/layer_0", "input_ids"):
        (codec,) = group[name].compressors
        assert type(codec).__name__ == "ZstdCodec" and codec.level == 3


def test_chunks_are_files_beside_each_other_in_their_arrays_directory(local_store):
    # a new chunk creates no directory: syncing the file and the array's directory makes it durable
    build_cache(local_store, "cache", SPEC)
    for name in SPEC.arrays():
        array_dir = local_store.local_path(f"cache/data.zarr/{name}")
        entries = sorted(p.name for p in array_dir.iterdir())
        trailing = ".0" * (len(SPEC.arrays()[name][0]) - 1)
        assert entries == [f"c.{c}{trailing}" for c in range(SPEC.num_chunks)] + ["zarr.json"], name


def test_a_spec_stored_before_topk_codec_existed_says_its_top_k_used_codec():
    old = {k: v for k, v in small_spec(codec="gzip").to_dict().items() if k != "topk_codec"}
    assert TeacherCacheSpec.from_dict(old).topk_codec == "gzip"
    assert TeacherCacheSpec.from_dict(SPEC.to_dict()) == SPEC


def test_a_cache_begun_before_a_setting_existed_resumes_with_its_default(local_store):
    """A cache whose stored spec predates ``logits`` (the top-k was all there was) is finished, not refused."""
    import zarr

    with TeacherCacheWriter(local_store, "cache", SPEC) as writer:
        writer.write_chunk(0, chunk_arrays(SPEC, 0))
    group = zarr.open_group(local_store.zarr_store("cache/data.zarr"), mode="r+")
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["spec"] = {k: v for k, v in attrs["spec"].items() if k != "logits"}
    group.attrs[ATTRS_KEY] = attrs
    assert build_cache(local_store, "cache", SPEC) == SPEC.num_chunks - 1
    with pytest.raises(CacheError, match="different logits"):
        TeacherCacheWriter(local_store, "cache", small_spec(logits="sampled"))


def test_sampled_logits_round_trip_with_the_logits_codec(local_store):
    spec = small_spec(logits="sampled", topk_codec="gzip")
    assert {"sampled_counts": ((10, 6, 4), "uint8"), "sampled_indices": ((10, 6, 4), "int32")}.items() \
        <= spec.arrays().items() and "topk_values" not in spec.arrays()
    build_cache(local_store, "cache", spec)
    reader = TeacherCacheReader(local_store, "cache", arrays=["sampled_counts", "sampled_indices"])
    want = chunk_arrays(spec, 1)
    got = reader[3]
    assert torch.equal(got["sampled_counts"], want["sampled_counts"][0])
    assert torch.equal(got["sampled_indices"], want["sampled_indices"][0])
    assert spec.codec_of("sampled_counts") == "gzip" and spec.codec_of("hidden/layer_0") == "zstd"
    with pytest.raises(ValueError, match="sampled: topk <= 255"):
        small_spec(logits="sampled", topk=300)


def test_unknown_codec_and_dtype_fail_at_once():
    with pytest.raises(ValueError, match="cache codec 'lzma' is not one of"):
        small_spec(codec="lzma")
    with pytest.raises(ValueError, match="cache codec 'blosc:lz4:sideways': .*bitshuffle"):
        small_spec(topk_codec="blosc:lz4:sideways")
    with pytest.raises(ValueError, match="cache dtype 'int4' is not one of"):
        small_spec(dtype="int4")


def test_bfloat16_round_trips_bit_for_bit(local_store):
    spec = small_spec(num_samples=2, chunk_size=2, seq_len=4, hidden_size=4, layers=[0], topk=0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.4e38, 1 / 3] * 2)
    hidden = torch.cat([special, torch.randn(16)]).reshape(2, 4, 4).to(torch.bfloat16)
    with TeacherCacheWriter(local_store, "cache", spec) as writer:
        writer.write_chunk(0, {"input_ids": torch.zeros(2, 4, dtype=torch.int32),
                               "attention_mask": torch.ones(2, 4, dtype=torch.int8), "hidden/layer_0": hidden})
    back = TeacherCacheReader(local_store, "cache")[1]["hidden/layer_0"]
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), hidden[1].view(torch.int16))  # the bits, NaN included


def test_plain_zarr_reads_the_cache(local_store):
    build_cache(local_store, "cache", SPEC)
    import zarr  # no project code from here on

    group = zarr.open_group(str(local_store.local_path("cache/data.zarr")), mode="r")
    meta = group.attrs["bitnet_distill"]
    assert meta["spec"]["layers"] == [0, 2] and set(meta["layer_stats"]) == {"hidden/layer_0", "hidden/layer_2"}
    hidden = group["hidden/layer_2"]
    assert hidden.shape == (10, 6, 8) and hidden.chunks == (3, 6, 8) and hidden.dtype == np.uint16
    assert hidden.attrs["bitnet_distill"] == {"dtype": "bfloat16", "encoding": "bfloat16-bits-in-uint16"}
    values = torch.from_numpy(hidden[3:6].view(np.int16)).view(torch.bfloat16)
    assert torch.equal(values, expected_stored(SPEC, 1)["hidden/layer_2"])
    # every array whole, the one-row edge chunk included: the objects were written without zarr
    for name in SPEC.arrays():
        expected = torch.cat([expected_stored(SPEC, c)[name] for c in range(SPEC.num_chunks)])
        stored = group[name][:]
        if expected.dtype == torch.bfloat16:
            stored = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
        else:
            stored = torch.from_numpy(stored)
        assert torch.equal(stored, expected), name


def test_layer_statistics_are_mean_norms_over_real_tokens(local_store):
    build_cache(local_store, "cache", SPEC)
    stats = TeacherCacheReader(local_store, "cache").layer_stats
    chunks = [expected_stored(SPEC, c) for c in range(SPEC.num_chunks)]
    mask = torch.cat([c["attention_mask"] for c in chunks]).bool()
    for layer in SPEC.layers:
        hidden = torch.cat([c[f"hidden/layer_{layer}"] for c in chunks]).double()
        expected = hidden.norm(dim=-1)[mask].mean().item()
        assert stats[f"hidden/layer_{layer}"]["mean_norm"] == pytest.approx(expected, rel=1e-6)
        assert stats[f"hidden/layer_{layer}"]["tokens"] == int(mask.sum())


def test_resume_writes_only_missing_chunks(store):
    with TeacherCacheWriter(store, "cache", SPEC) as writer:
        assert writer.missing_chunks() == [0, 1, 2, 3]
        for chunk in (0, 2):
            writer.write_chunk(chunk, chunk_arrays(SPEC, chunk))
    reader = TeacherCacheReader(store, "cache")
    assert not reader.complete and reader.layer_stats is None
    with pytest.raises(ChunkError, match=r"chunk 1 \(samples 3-5\) of the teacher cache at .* is missing") as error:
        reader.get_batch([0, 4])
    assert error.value.chunk == 1
    report = reader.verify()
    assert report.missing == [1, 3] and not report.corrupt and "2 missing (chunks 1, 3)" in str(report)
    assert build_cache(store, "cache", SPEC) == 2
    assert_reads_back(TeacherCacheReader(store, "cache"), SPEC)


def test_corrupt_chunk_is_named_by_verify_and_reader_then_repaired(store):
    build_cache(store, "cache", SPEC)
    chunk_object = "cache/data.zarr/hidden/layer_2/c.1.0.0"
    original = store.read_bytes(chunk_object)
    store.write_bytes(chunk_object, original[: len(original) // 2] + b"\x00garbage")  # damaged bytes
    # and well-formed bytes with the wrong values: chunk 2's data in place of chunk 0's
    store.write_bytes("cache/data.zarr/topk_values/c.0.0.0", store.read_bytes("cache/data.zarr/topk_values/c.2.0.0"))

    reader = TeacherCacheReader(store, "cache")
    report = reader.verify()
    assert sorted(report.corrupt) == [0, 1] and not report.missing and not report.ok
    assert "chunk 1 (samples 3-5) corrupt: hidden/layer_2 cannot be read" in report.corrupt[1]
    assert "chunk 0 (samples 0-2) corrupt: topk_values does not match the checksum" in report.corrupt[0]
    with pytest.raises(ChunkError, match=r"chunk 1 \(samples 3-5\) .* corrupt: hidden/layer_2"):
        reader[4]
    with pytest.raises(ChunkError, match=r"chunk 0 \(samples 0-2\) .* topk_values does not match"):
        reader.get_batch([5, 1])  # a batch across chunks
    assert torch.equal(reader[7]["input_ids"], chunk_arrays(SPEC, 2)["input_ids"][1])  # the rest still reads

    reader.verify(repair=True)
    with TeacherCacheWriter(store, "cache", SPEC) as writer:
        assert writer.missing_chunks() == [0, 1]
        for chunk in writer.missing_chunks():
            writer.write_chunk(chunk, chunk_arrays(SPEC, chunk))
    assert TeacherCacheReader(store, "cache").verify().ok and store.read_bytes(chunk_object) == original


def test_zarr_metadata_is_durable_before_the_cache_is_marked_complete(local_store, fsyncs):
    """zarr writes its zarr.json files atomically but never fsyncs them; the writer does, the group's last rewrite
    (the layer statistics) before the completion marker."""
    synced = fsyncs()
    build_cache(local_store, "cache", SPEC)
    root = Path(local_store.full_path("cache")).resolve()
    metadata = sorted(str(p.resolve()) for p in (root / "data.zarr").rglob("zarr.json"))
    assert len(metadata) >= 1 + len(SPEC.arrays()) and set(metadata) <= set(synced)
    group = str(root / "data.zarr" / "zarr.json")
    marker = max(i for i, p in enumerate(synced) if "._COMPLETE.json." in p)
    assert max(i for i, p in enumerate(synced) if p == group) < marker


@pytest.mark.parametrize("metadata", ["data.zarr/zarr.json", "data.zarr/hidden/layer_2/zarr.json"],
                         ids=["group", "array"])
def test_damaged_zarr_metadata_is_a_clear_error_for_writer_and_reader(local_store, metadata):
    build_cache(local_store, "cache", SPEC)
    local_store.unmark_complete("cache")  # as if the damage came before the marker
    torn = Path(local_store.full_path(f"cache/{metadata}"))
    torn.write_bytes(torn.read_bytes()[:100])
    message = "the teacher cache at .* has damaged Zarr metadata .* delete the cache and rerun the cache stage"
    for _ in range(2):  # and the failed writer released its lock: the second sees the damage, not a LockedError
        with pytest.raises(CacheError, match=message):
            TeacherCacheWriter(local_store, "cache", SPEC, lock_timeout=0)
    with pytest.raises(CacheError, match=message if metadata == "data.zarr/zarr.json" else "array hidden/layer_2"):
        TeacherCacheReader(local_store, "cache").read_chunk(0)


def test_damaged_chunk_records_are_corrupt_chunks_for_verify_and_reader_then_repaired(store):
    build_cache(store, "cache", SPEC)
    record = "cache/_chunks/chunk-{:06d}.json"
    store.write_bytes(record.format(1), store.read_bytes(record.format(1))[:40])  # torn: not JSON
    store.write_bytes(record.format(2), b'{"chunk": 2}')  # JSON, but no checksums
    reader = TeacherCacheReader(store, "cache")
    report = reader.verify()
    assert sorted(report.corrupt) == [1, 2] and not report.missing
    assert "chunk 1 (samples 3-5) corrupt: its record cannot be read (JSONDecodeError" in report.corrupt[1]
    assert "chunk 2 (samples 6-8) corrupt: its record cannot be read (KeyError" in report.corrupt[2]
    with pytest.raises(ChunkError, match=r"chunk 1 \(samples 3-5\) .* its record cannot be read"):
        reader[4]
    with TeacherCacheWriter(store, "cache", SPEC):  # a writer at work: a repair must not delete records under it
        with pytest.raises(LockedError, match="the teacher cache at .* is being written by process"):
            reader.verify(repair=True)
    assert store.exists(record.format(1)) and store.is_complete("cache")
    reader.verify(repair=True)
    assert build_cache(store, "cache", SPEC) == 2  # exactly the two chunks rewritten
    assert TeacherCacheReader(store, "cache").verify().ok


def test_reader_of_some_arrays_never_touches_the_others_but_verify_checks_all(local_store):
    build_cache(local_store, "cache", SPEC)
    local_store.write_bytes("cache/data.zarr/topk_values/c.1.0.0", b"\x00garbage")  # damaged, and never read below
    local_store.delete("cache/data.zarr/hidden/layer_0/c.1.0.0")
    wanted = ["input_ids", "attention_mask", "hidden/layer_2"]
    reader = TeacherCacheReader(local_store, "cache", arrays=wanted)
    batch = reader.get_batch([4, 0, 5])
    assert list(batch) == wanted
    for name in wanted:
        expected = torch.cat([expected_stored(SPEC, c)[name] for c in range(2)])[[4, 0, 5]]
        assert torch.equal(batch[name], expected), name
    assert sorted(reader.verify().corrupt) == [1]  # verify still reads everything
    with pytest.raises(ChunkError, match=r"chunk 1 \(samples 3-5\) .* corrupt: hidden/layer_0"):
        TeacherCacheReader(local_store, "cache")[4]


def test_reader_asked_for_an_array_the_cache_lacks_says_what_it_holds(local_store):
    build_cache(local_store, "cache", SPEC)
    with pytest.raises(CacheError, match="holds no hidden/layer_1: it holds input_ids, .*hidden/layer_2, topk_values"):
        TeacherCacheReader(local_store, "cache", arrays=["input_ids", "hidden/layer_1"])


def test_an_array_whose_metadata_is_gone_is_named(local_store):
    build_cache(local_store, "cache", SPEC)
    local_store.delete("cache/data.zarr/hidden/layer_2/zarr.json")
    with pytest.raises(CacheError, match=r"teacher cache at \S+/cache: array hidden/layer_2 cannot be opened .*; "
                                         "delete the cache to rebuild it"):
        TeacherCacheReader(local_store, "cache")[0]


def test_deleted_chunk_object_is_not_read_as_zeros(store):
    build_cache(store, "cache", SPEC)
    store.delete("cache/data.zarr/input_ids/c.3.0")
    with pytest.raises(ChunkError, match=r"chunk 3 \(samples 9-9\) .* input_ids cannot be read \(its object "
                                         r"\S+/cache/data.zarr/input_ids/c.3.0 is missing\)"):
        TeacherCacheReader(store, "cache")[9]


def test_fingerprint_mismatch_is_refused(store):
    build_cache(store, "cache", SPEC)
    other = small_spec(fingerprint="fp-other")
    message = (rf"the teacher cache at {store.url('cache')} was built for fingerprint 'fp-test', not the requested "
               r"'fp-other'")
    with pytest.raises(FingerprintMismatchError, match=message):
        TeacherCacheWriter(store, "cache", other)
    with pytest.raises(FingerprintMismatchError, match=message):
        TeacherCacheReader(store, "cache", fingerprint="fp-other")
    with pytest.raises(CacheError, match="different chunk_size"):  # same fingerprint, other settings: a bug upstream
        TeacherCacheWriter(store, "cache", small_spec(chunk_size=5))
    TeacherCacheWriter(store, "cache", SPEC, lock_timeout=0).close()  # the failed attempts released the lock


def test_no_cache_at_path(store):
    with pytest.raises(CacheError, match=f"no teacher cache at {store.url('nowhere')}; run the cache stage"):
        TeacherCacheReader(store, "nowhere")


def test_write_chunk_checks_its_input_at_once(local_store):
    with TeacherCacheWriter(local_store, "cache", SPEC) as writer:
        good = chunk_arrays(SPEC, 0)
        with pytest.raises(ValueError, match=r"arrays must be exactly .* missing \['topk_values'\]"):
            writer.write_chunk(0, {k: v for k, v in good.items() if k != "topk_values"})
        with pytest.raises(ValueError, match=r"hidden/layer_0 has shape \[3, 6, 7\], expected \[3, 6, 8\]"):
            writer.write_chunk(0, {**good, "hidden/layer_0": torch.zeros(3, 6, 7)})
        with pytest.raises(IndexError, match="chunk 4 out of range"):
            writer.write_chunk(4, good)
        writer.write_chunk(0, good)
        with pytest.raises(ValueError, match="already written"):
            writer.write_chunk(0, good)


def test_close_reports_errors_from_the_writer_thread(local_store):
    writer = TeacherCacheWriter(local_store, "cache", SPEC)
    # a directory where chunk 1's file must go: the writer thread's write fails, not the hand-over
    (local_store.local_path("cache/data.zarr/hidden/layer_0/c.1.0.0") / "in-the-way").mkdir(parents=True)
    writer.write_chunk(1, chunk_arrays(SPEC, 1))
    with pytest.raises(CacheWriteError, match=r"writing chunk 1 \(samples 3-5\) of the teacher cache at .* failed"):
        writer.close()
    with TeacherCacheWriter(local_store, "cache", SPEC, lock_timeout=0) as again:
        assert again.missing_chunks() == [0, 1, 2, 3]


def test_write_chunk_refuses_values_it_cannot_store_at_once(local_store):
    with TeacherCacheWriter(local_store, "cache", SPEC) as writer:
        bad = {**chunk_arrays(SPEC, 1), "hidden/layer_0": np.full((3, 6, 8), "text", dtype=object)}
        with pytest.raises(ValueError, match=r"chunk 1 \(samples 3-5\): hidden/layer_0 cannot be stored as bfloat16"):
            writer.write_chunk(1, bad)
        writer.write_chunk(1, chunk_arrays(SPEC, 1))  # the refused chunk can still be written
    with TeacherCacheWriter(local_store, "cache", SPEC) as again:
        assert again.missing_chunks() == [0, 2, 3]


def test_write_chunk_hands_over_without_waiting_for_io(local_store):
    spec = small_spec(num_samples=8, chunk_size=4, seq_len=64, hidden_size=512, dtype="float32", codec="zstd:9")
    with TeacherCacheWriter(local_store, "cache", spec, queue_size=2) as writer:
        started = time.perf_counter()
        writer.write_chunk(0, chunk_arrays(spec, 0))
        handed_over = time.perf_counter() - started
        assert not local_store.exists("cache/_chunks/chunk-000000.json")  # still being compressed and written
        writer.write_chunk(1, chunk_arrays(spec, 1))
    assert handed_over < 0.05 and local_store.is_complete("cache")


def test_parallel_writer_threads_build_the_same_cache_as_one(local_store):
    """Chunks finish out of order on several threads; the stored bytes and records are those of one thread."""
    from .helpers import tree_bytes

    spec = small_spec(num_samples=40, chunk_size=2, hidden_size=64)
    build_cache(local_store, "one", spec, threads=1)
    build_cache(local_store, "four", spec, threads=4, queue_size=8)
    relative = {path: {name.split("/", 1)[1]: data for name, data in tree_bytes(local_store, path).items()}
                for path in ("one", "four")}
    assert relative["four"] == relative["one"] and len(relative["one"]) > spec.num_chunks
    assert TeacherCacheReader(local_store, "four").verify().ok
    with pytest.raises(ValueError, match="threads must be at least 1"):
        TeacherCacheWriter(local_store, "none", spec, threads=0)


def test_reader_random_access_and_bounded_memory(store):
    build_cache(store, "cache", SPEC)
    reader = TeacherCacheReader(store, "cache", cached_chunks=2)
    assert len(reader) == 10
    assert torch.equal(reader[-1]["hidden/layer_0"], expected_stored(SPEC, 3)["hidden/layer_0"][0])
    everything = torch.cat([chunk_arrays(SPEC, c)["input_ids"] for c in range(4)])
    order = np.random.default_rng(1).permutation(10)
    for start in range(0, 10, 4):
        batch = reader.get_batch(order[start:start + 4])
        assert batch["input_ids"][:, 0].tolist() == everything[order[start:start + 4], 0].tolist()
        assert len(reader._chunks) <= 2  # never the whole cache in memory
    clone = pickle.loads(pickle.dumps(reader))  # DataLoader workers get their own copy
    loader = torch.utils.data.DataLoader(clone, batch_size=5)
    assert torch.equal(next(iter(loader))["input_ids"], everything[:5])


def test_writer_that_lost_its_lease_records_nothing_more(s3_store):
    writer = TeacherCacheWriter(s3_store, "cache", SPEC, lease_ttl=1.0)  # renewed every 0.25 s
    writer.write_chunk(0, chunk_arrays(SPEC, 0))
    deadline = time.monotonic() + 30
    while not s3_store.exists("cache/_chunks/chunk-000000.json"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    intruder = b'{"owner": "someone else", "host": "elsewhere", "pid": 1, "expires": 1e12}'
    s3_store.write_bytes("cache/_lease.json", intruder)  # as a contender does once it believes the lease expired
    time.sleep(0.5)  # the next renewal finds the lease changed
    writer.write_chunk(1, chunk_arrays(SPEC, 1))
    with pytest.raises(CacheWriteError, match="lost the lease on the teacher cache at .* stop writing and rerun"):
        writer.close()
    assert not s3_store.exists("cache/_chunks/chunk-000001.json")
    assert s3_store.read_bytes("cache/_lease.json") == intruder  # the new holder's lease is left alone


def test_writer_whose_lease_went_unrenewed_records_nothing_more(s3_store):
    """A hang (here: the heartbeat stopped) lets the lease run out before anyone has taken it over: the writer must
    stop recording anyway, since a contender may take it at any moment."""
    writer = TeacherCacheWriter(s3_store, "cache", SPEC, lease_ttl=1.0)
    writer.write_chunk(0, chunk_arrays(SPEC, 0))
    deadline = time.monotonic() + 30
    while not s3_store.exists("cache/_chunks/chunk-000000.json"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    writer._lock._stop.set()  # the heartbeat hangs: no renewal from now on
    writer._lock._thread.join()
    time.sleep(1.0)
    writer.write_chunk(1, chunk_arrays(SPEC, 1))
    with pytest.raises(CacheWriteError, match="the lease on the teacher cache at .* was last renewed more than 0.9 s "
                                              "ago, near its ttl of 1 s .* stop writing and rerun"):
        writer.close()
    assert not s3_store.exists("cache/_chunks/chunk-000001.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_arrays_handed_over_on_cuda_are_stored_exactly(local_store, dtype):
    """From a GPU the writer converts on the device and copies asynchronously: what is stored is what was handed
    over, even if the producer overwrites its tensors at once (the copy is ordered before on the same stream)."""
    spec = small_spec(dtype=dtype)
    with TeacherCacheWriter(local_store, "cache", spec) as writer:
        for chunk in writer.missing_chunks():
            on_gpu = {name: value.cuda() for name, value in chunk_arrays(spec, chunk).items()}
            writer.write_chunk(chunk, on_gpu)
            for value in on_gpu.values():
                value.zero_()
    assert_reads_back(TeacherCacheReader(local_store, "cache"), spec)


def test_records_name_their_checksum_and_caches_of_sha256_records_still_verify(store):
    """New records hold CRC-32C checksums; caches written with sha256 records (every cache before) read and verify
    as before, corruption included, and a cache resumed by the new writer holds records of both."""
    import json

    import google_crc32c

    assert f"{google_crc32c.value(b'123456789'):08x}" == "e3069283"  # CRC-32C's published check value
    record = "cache/_chunks/chunk-{:06d}.json"
    # chunks 0-1 written with sha256 records, as by earlier code, then the rest by the current writer
    with TeacherCacheWriter(store, "cache", SPEC, checksum="sha256") as writer:
        for chunk in (0, 1):
            writer.write_chunk(chunk, chunk_arrays(SPEC, chunk))
    assert build_cache(store, "cache", SPEC) == 2
    keys = [set(json.loads(store.read_bytes(record.format(c)))) & {"sha256", "crc32c"} for c in range(4)]
    assert keys == [{"sha256"}, {"sha256"}, {"crc32c"}, {"crc32c"}]
    reader = TeacherCacheReader(store, "cache")
    assert reader.verify().ok
    assert_reads_back(reader, SPEC)
    for chunk in (1, 2):  # well-formed bytes with the wrong values, under each algorithm
        store.write_bytes(f"cache/data.zarr/topk_values/c.{chunk}.0.0",
                          store.read_bytes("cache/data.zarr/topk_values/c.0.0.0"))
    report = TeacherCacheReader(store, "cache").verify()
    assert sorted(report.corrupt) == [1, 2] and all("topk_values does not match the checksum" in report.corrupt[c]
                                                    for c in (1, 2))


def test_a_record_with_both_checksums_or_an_unknown_one_is_corrupt(store):
    import json

    build_cache(store, "cache", SPEC)
    record = "cache/_chunks/chunk-{:06d}.json"
    both = json.loads(store.read_bytes(record.format(0)))
    store.write_json(record.format(0), {**both, "sha256": both["crc32c"]})
    store.write_json(record.format(1), {k: v for k, v in json.loads(store.read_bytes(record.format(1))).items()
                                        if k != "crc32c"} | {"md5": {}})
    report = TeacherCacheReader(store, "cache").verify()
    assert sorted(report.corrupt) == [0, 1]
    assert "one checksum algorithm of ['crc32c', 'sha256'] expected, found ['sha256', 'crc32c']" in report.corrupt[0]
    assert "found []" in report.corrupt[1]
    with pytest.raises(ValueError, match="checksum 'md5' is not one of sha256, crc32c"):
        TeacherCacheWriter(store, "other", SPEC, checksum="md5")


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])
def test_a_chunks_objects_are_durable_before_its_record(local_store, fsyncs, concurrent):
    """Written concurrently or one after another, every object of a chunk is fsynced, renamed and its directory
    fsynced before the chunk's record is written: a killed run never leaves a record of a chunk whose objects could
    be lost."""
    synced = fsyncs()
    build_cache(local_store, "cache", SPEC, concurrent_writes=concurrent)
    for chunk in range(SPEC.num_chunks):
        record = min(i for i, p in enumerate(synced) if f"/.chunk-{chunk:06d}.json." in p)
        objects = [i for i, p in enumerate(synced) if f"/.c.{chunk}.0" in p]
        assert len(objects) == len(SPEC.arrays()) and max(objects) < record
        for name in SPEC.arrays():  # each object's directory synced after the object (after its rename)
            directory = str(Path(local_store.full_path(f"cache/data.zarr/{name}")).resolve())
            mine = max(i for i, p in enumerate(synced) if f"/{name}/.c.{chunk}.0" in p)
            assert any(mine < i < record for i, p in enumerate(synced) if p == directory), name
    assert TeacherCacheReader(local_store, "cache").verify().ok
