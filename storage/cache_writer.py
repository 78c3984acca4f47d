"""``TeacherCacheWriter``: fills a teacher cache chunk by chunk, off the producer's thread, resumably.

The producer (the teacher's forward pass) hands over one chunk's arrays and goes on computing. On the producer's
thread the writer only converts them to their stored dtypes where they live (on a GPU: one kernel, and half the
bytes to copy for float16), takes the per-token norms and starts the copy to host memory (asynchronous from CUDA).
Background threads then checksum, compress and write each chunk, make it durable, and only then write the chunk's
completion record. Several writer threads take chunks from one queue: compression, checksums and fsync release the
GIL, and a GPU teacher produces chunks faster than one thread can store them. A crash at any point leaves the chunk
without a record, so it is "missing" on reopen and a rerun rewrites exactly the missing chunks. One writer at a time
per cache: the constructor takes a lock (local ``flock``) or lease (object stores) and waits up to ``lock_timeout``
seconds for another writer to finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .cache_spec import (ATTRS_KEY, BF16_ENCODING, CHUNK_KEY_ENCODING, FORMAT, GROUP_DIR, RECORDS_DIR, STORED_AS,
                         CHECKSUMS, CacheError, TeacherCacheSpec, check_fingerprint, chunk_label, compressors,
                         damaged_metadata, default_checksum, layer_name, record_path, recorded_chunks, to_stored,
                         torch_dtype)
from .lease import acquire_lock
from .zarr_chunks import ChunkCodec


class CacheWriteError(CacheError):
    """Writing a chunk failed in the writer thread; raised by ``write_chunk`` or ``close``."""


def range_lock_dir(path: str, chunks: range) -> str:
    """Where the lock of a writer of ``chunks`` (a range) of the cache at ``path`` lives."""
    return f"{path}/_ranges/{chunks.start:06d}-{chunks.stop - 1:06d}"


def _chunk_of_object(name: str) -> int | None:
    """The chunk a chunk object's file name holds (``c.<chunk>.0.0``), None for any other file."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "c" and parts[1].isdigit() else None


def _open_group(store, path: str, spec: TeacherCacheSpec):
    """The cache's Zarr group, created if needed; an existing one must have been built for the same spec."""
    import zarr

    zarr_store = store.zarr_store(f"{path}/{GROUP_DIR}")
    try:
        group = zarr.open_group(zarr_store, mode="r+")
        stored = group.attrs.get(ATTRS_KEY, {}).get("spec")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        stored = None
    except ValueError as exc:  # a zarr.json that is not JSON, or not zarr's: torn or overwritten
        raise damaged_metadata(store.url(path), exc) from None
    if stored is not None:  # the spec is written last, so the group is whole
        check_fingerprint(store.url(path), stored.get("fingerprint"), spec.fingerprint)
        # read as a spec, so that a setting added since the cache was begun counts as its default
        known = TeacherCacheSpec.from_dict(stored).to_dict()
        differing = sorted(k for k, v in spec.to_dict().items() if known.get(k) != v)
        if differing:
            raise CacheError(f"the teacher cache at {store.url(path)} has fingerprint {spec.fingerprint!r} but a "
                             f"different {', '.join(differing)}: the fingerprint must cover every cache setting; "
                             "delete the cache or fix the fingerprint")
        return group
    # New, or creation was interrupted before the spec was written (then no chunk can have been recorded).
    store.delete(f"{path}/{RECORDS_DIR}")
    group = zarr.open_group(zarr_store, mode="a")
    for name, (shape, dtype) in spec.arrays().items():
        attributes = {ATTRS_KEY: {"dtype": dtype, **({"encoding": BF16_ENCODING} if dtype == "bfloat16" else {})}}
        group.create_array(name, shape=shape, chunks=(spec.chunk_size, *shape[1:]), dtype=STORED_AS.get(dtype, dtype),
                           compressors=compressors(spec.codec_of(name)), chunk_key_encoding=CHUNK_KEY_ENCODING,
                           fill_value=0, overwrite=True, attributes=attributes)
    group.attrs[ATTRS_KEY] = {"format": FORMAT, "spec": spec.to_dict()}
    # zarr writes its metadata atomically but never fsyncs it: persisted as the chunks and records are, so that a
    # power loss cannot leave a complete-marked cache without its spec
    store.make_durable(f"{path}/{GROUP_DIR}", "zarr.json")
    return group


@dataclass
class _StagedChunk:
    """One chunk on its way to storage: every array on the host in its stored dtype (still being copied from a GPU
    until the ``copied`` events have happened), and per layer the L2 norm of each token's stored hidden state."""

    chunk: int
    arrays: dict
    token_norms: dict
    copied: list  # torch.cuda.Event per GPU the arrays came from, recorded after their copies

    def wait(self) -> None:
        for event in self.copied:
            event.synchronize()


def _stage(spec: TeacherCacheSpec, chunk: int, arrays: Mapping) -> _StagedChunk:
    """On the producer's thread: each array converted to its stored dtype on its own device, the norms of the
    stored hidden states taken there too, then the copy to host memory; from CUDA the copy is asynchronous (into
    pinned memory), so the producer queues its next forward pass while the bytes travel."""
    import torch

    on_device = {}
    for name, (_, dtype) in spec.arrays().items():
        try:
            on_device[name] = torch.as_tensor(arrays[name]).detach().to(torch_dtype(dtype)).contiguous()
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{chunk_label(spec, chunk)}: {name} cannot be stored as {dtype}: {exc}") from None
    token_norms = {name: torch.linalg.vector_norm(value, dim=-1, dtype=torch.float32)
                   for name, value in on_device.items() if name.startswith("hidden/")}

    def to_host(tensors: dict) -> dict:
        return {name: t.to("cpu", non_blocking=t.is_cuda) for name, t in tensors.items()}

    host, norms = to_host(on_device), to_host(token_norms)
    copied = []
    for device in {t.device for t in on_device.values() if t.is_cuda}:
        copied.append(torch.cuda.Event())
        copied[-1].record(torch.cuda.current_stream(device))
    return _StagedChunk(chunk, host, norms, copied)


def _norm_sums(staged: _StagedChunk, mask: np.ndarray) -> dict[str, float]:
    """Per layer, the sum of the L2 norms of the stored hidden states over real (``mask``) tokens."""
    return {name.removeprefix("hidden/layer_"): float(norms.numpy()[mask].astype(np.float64).sum())
            for name, norms in staged.token_norms.items()}


class TeacherCacheWriter:
    """Writes the cache at ``path`` described by ``spec``. Use as a context manager, or call ``close()``::

        with TeacherCacheWriter(store, path, spec) as writer:
            for chunk in writer.missing_chunks():
                writer.write_chunk(chunk, {"input_ids": ..., "attention_mask": ..., "hidden/layer_3": ..., ...})

    ``threads`` writer threads store chunks in parallel (each chunk is written by exactly one of them);
    ``queue_size`` chunks may wait for them; only when that many are waiting does ``write_chunk`` block.
    ``on_wait(message)`` is called once if another writer holds the cache's lock, before waiting for it.
    ``checksum`` (a key of ``CHECKSUMS``; default ``default_checksum()``) is the records' checksum, and
    ``concurrent_writes`` writes a chunk's objects concurrently (``ArtifactStore.write_many``); both exist to time
    the earlier choices beside the current ones (bench/writer_cpu.py).

    With ``chunks`` (a range), the writer owns only those chunks: several such writers, on other processes or
    machines, fill disjoint ranges of one cache at once. Each holds a lock of its own range (the cache's lock only
    while it opens, or creates, the group) and never finishes the cache: a writer of the whole cache, once no chunk
    is missing, writes the statistics and the completion marker. Chunks are independent objects with records of
    their own, so disjoint writers cannot disturb each other.
    """

    def __init__(self, store, path: str, spec: TeacherCacheSpec, *, chunks: range | None = None, threads: int = 4,
                 queue_size: int | None = None, lock_timeout: float = 3600.0, lease_ttl: float = 120.0, on_wait=None,
                 checksum: str | None = None, concurrent_writes: bool = True):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        checksum = checksum or default_checksum()
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum {checksum!r} is not one of {', '.join(CHECKSUMS)}")
        self._checksum, self._concurrent_writes = checksum, concurrent_writes
        if chunks is not None and (chunks.step != 1 or not 0 <= chunks.start < chunks.stop <= spec.num_chunks):
            raise ValueError(f"chunks {chunks} is not a range of the cache's chunks 0..{spec.num_chunks - 1}")
        self.store, self.path, self.spec, self.chunks = store, path, spec, chunks
        self.url = store.url(path)
        what = f"the teacher cache at {self.url}"
        self._lock = acquire_lock(store, path, what, lock_timeout, lease_ttl, on_wait)
        try:
            self._group = _open_group(store, path, spec)  # created once, under the cache's lock
            if chunks is not None:
                self._lock.release()
                self._lock = acquire_lock(store, range_lock_dir(path, chunks), f"chunks {chunks.start}-"
                                          f"{chunks.stop - 1} of {what}", lock_timeout, lease_ttl, on_wait)
            # a killed writer's unrenamed chunk objects (of this writer's chunks): rewritten, never read
            store.remove_temporaries(path, None if chunks is None else lambda name: _chunk_of_object(name) in chunks)
            # The arrays are opened once (each open costs requests on S3). Every chunk gets an object, even an
            # all-zero one that zarr's own writes would skip, so each has an object to check.
            try:
                self._codecs = {name: ChunkCodec(self._group[name]) for name in spec.arrays()}
            except ValueError as exc:  # an array's zarr.json damaged
                raise damaged_metadata(self.url, exc) from None
            self._done = recorded_chunks(store, path)
        except BaseException:
            self._lock.release()
            raise
        self._handed_over: set[int] = set()
        self._done_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size or 2 * threads)
        self._error: tuple[int, BaseException] | None = None
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"teacher-cache-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # the body failed: still record the chunks already handed over, but raise the body's error
            self.close()
        except Exception:  # secondary to the body's error, which propagates
            pass

    def missing_chunks(self) -> list[int]:
        """This writer's chunks without a completion record (in order): exactly what a rerun must write."""
        with self._done_lock:
            return [c for c in (self.chunks or range(self.spec.num_chunks)) if c not in self._done]

    def write_chunk(self, chunk: int, arrays: Mapping) -> None:
        """Hand over chunk ``chunk``: one array (numpy, or a torch tensor on any device) per name of
        ``spec.arrays()``, each with the chunk's rows first. Returns once the arrays are converted and their copy
        to host memory is under way, unless the queue is full. CPU arrays already in their stored dtype are not
        copied: they must not be modified afterwards (the writer thread reads them later)."""
        self._raise_failure()
        if self._closed:
            raise CacheError(f"the writer of {self.url} is closed")
        start, stop = self.spec.chunk_rows(chunk)
        expected = self.spec.arrays()
        if set(arrays) != set(expected):
            raise ValueError(f"{chunk_label(self.spec, chunk)}: arrays must be exactly {sorted(expected)}; missing "
                             f"{sorted(set(expected) - set(arrays))}, unexpected {sorted(set(arrays) - set(expected))}")
        for name, (shape, _) in expected.items():
            want = (stop - start, *shape[1:])
            if tuple(arrays[name].shape) != want:
                raise ValueError(f"{chunk_label(self.spec, chunk)}: {name} has shape {list(arrays[name].shape)}, "
                                 f"expected {list(want)}")
        if self.chunks is not None and chunk not in self.chunks:
            raise ValueError(f"{chunk_label(self.spec, chunk)} is not among this writer's chunks {self.chunks.start}-"
                             f"{self.chunks.stop - 1}")
        with self._done_lock:
            if chunk in self._done or chunk in self._handed_over:
                raise ValueError(f"{chunk_label(self.spec, chunk)} of {self.url} was already written; each chunk is "
                                 "written once (write only missing_chunks())")
            self._handed_over.add(chunk)
        try:
            staged = _stage(self.spec, chunk, arrays)
        except BaseException:
            with self._done_lock:
                self._handed_over.discard(chunk)
            raise
        self._queue.put(staged)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after a failure, keep draining so the producer never blocks
                try:
                    self._store_chunk(item)
                except BaseException as exc:  # reported to the producer by write_chunk/close
                    self._error = (item.chunk, exc)

    def _store_chunk(self, staged: _StagedChunk) -> None:
        chunk = staged.chunk
        start, stop = self.spec.chunk_rows(chunk)
        staged.wait()
        stored = {name: to_stored(tensor) for name, tensor in staged.arrays.items()}
        # the chunk's objects, each whole, atomically and durably (storage/zarr_chunks.py says why not through zarr)
        self.store.write_many({f"{self.path}/{GROUP_DIR}/{name}/{self._codecs[name].key(chunk)}":
                               self._codecs[name].encode(values) for name, values in stored.items()},
                              concurrent=self._concurrent_writes)
        self._lock.ensure_held()  # never record a chunk after losing the lease to another writer
        real = stored["attention_mask"].astype(bool)
        checksum = CHECKSUMS[self._checksum]
        record = {"chunk": chunk, "rows": [start, stop], self._checksum: {n: checksum(v) for n, v in stored.items()},
                  "tokens": int(real.sum()), "norm_sums": _norm_sums(staged, real)}
        self.store.write_json(f"{self.path}/{record_path(chunk)}", record)
        with self._done_lock:
            self._done.add(chunk)

    def _raise_failure(self) -> None:
        if self._error is not None:
            chunk, exc = self._error
            raise CacheWriteError(f"writing {chunk_label(self.spec, chunk)} of the teacher cache at {self.url} failed: "
                                  f"{type(exc).__name__}: {exc}; that chunk and later ones stay missing (rerun to "
                                  "fill them)") from exc

    def close(self) -> None:
        """Wait for every handed-over chunk to be written, finish the cache if no chunk is missing, release the
        lock; raise the writer thread's error if it had one."""
        if self._closed:
            return
        self._closed = True
        for thread in self._threads:
            self._queue.put(None)  # one stop sign per thread, after every chunk handed over
        for thread in self._threads:
            thread.join()
        try:
            self._raise_failure()
            if self.chunks is None and not self.missing_chunks() and not self.store.is_complete(self.path):
                self._finish()
        finally:
            self._lock.release()

    def _finish(self) -> None:
        """Per-layer mean norms into the attributes, then the completion marker (last)."""
        records = self.store.read_json_many([f"{self.path}/{record_path(c)}" for c in range(self.spec.num_chunks)])
        tokens = sum(r["tokens"] for r in records)
        stats = {layer_name(i): {"mean_norm": sum(r["norm_sums"][str(i)] for r in records) / max(tokens, 1),
                                 "tokens": tokens} for i in self.spec.layers}
        self._group.attrs[ATTRS_KEY] = {**self._group.attrs[ATTRS_KEY], "layer_stats": stats}
        self.store.make_durable(f"{self.path}/{GROUP_DIR}", "zarr.json")  # the group's, rewritten by zarr
        self.store.mark_complete(self.path, {"format": FORMAT, "spec": self.spec.to_dict(), "layer_stats": stats,
                                             "chunks": self.spec.num_chunks, "samples": self.spec.num_samples})
