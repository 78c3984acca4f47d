"""``TeacherCacheReader``: random access to a teacher cache as a PyTorch ``Dataset``, and ``verify()``.

Memory stays bounded: the reader decodes whole chunks (the unit Zarr stores) and keeps only the ``cached_chunks``
most recent. Every chunk is checked against its completion record when loaded, so a missing or corrupt chunk raises
``ChunkError`` naming it instead of returning fill values or garbage.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache_spec import (ATTRS_KEY, CHECKSUMS, GROUP_DIR, STORED_AS, CacheError, ChunkError, TeacherCacheSpec,
                         check_fingerprint, chunk_label, damaged_metadata, record_path, recorded_chunks, to_tensor)
from .lease import holding_lock
from .zarr_chunks import ChunkCodec

_REBUILD = ("repair it (python -m flows verify <flow> --config ... --repair) and rerun the flow, which rewrites just "
            "the damaged chunks, or delete the cache to rebuild it")


@dataclass
class VerifyReport:
    """Outcome of ``verify()``: which chunks are missing, which are corrupt (and why)."""

    url: str
    num_chunks: int
    missing: list[int] = field(default_factory=list)
    corrupt: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    def __str__(self) -> str:
        if self.ok:
            return f"teacher cache at {self.url}: all {self.num_chunks} chunks present and intact"
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (chunks {', '.join(map(str, self.missing))})")
        if self.corrupt:
            parts.append(f"{len(self.corrupt)} corrupt ({'; '.join(self.corrupt.values())})")
        return f"teacher cache at {self.url}, {self.num_chunks} chunks: {' and '.join(parts)}"


class TeacherCacheReader(torch.utils.data.Dataset):
    """Reads the cache at ``path``. With ``fingerprint``, refuses a cache built for another configuration.

    ``reader[i]`` is sample ``i`` as ``{name: tensor}`` (hidden states in their stored dtype, bf16 as
    ``torch.bfloat16``); ``get_batch(indices)`` stacks several.
    ``arrays`` names the arrays to read (default: all of ``spec.arrays()``); the others are never fetched, decoded
    or checked, except by ``verify()``, which checks everything.
    """

    def __init__(self, store, path: str, fingerprint: str | None = None, *, arrays: Iterable[str] | None = None,
                 cached_chunks: int = 4, check_checksums: bool = True):
        self.store, self.path, self.url = store, path, store.url(path)
        self.cached_chunks, self.check_checksums = max(1, cached_chunks), check_checksums
        attrs = dict(self._open_group().attrs).get(ATTRS_KEY, {})
        if "spec" not in attrs:
            raise CacheError(f"{self.url} holds no teacher-cache spec: its creation was interrupted; rerun the "
                             "cache stage")
        self.spec = TeacherCacheSpec.from_dict(attrs["spec"])
        self.layer_stats: dict | None = attrs.get("layer_stats")
        if fingerprint is not None:
            check_fingerprint(self.url, self.spec.fingerprint, fingerprint)
        stored = self.spec.arrays()
        wanted = list(stored) if arrays is None else list(dict.fromkeys(arrays))
        absent = [name for name in wanted if name not in stored]
        if absent:
            raise CacheError(f"the teacher cache at {self.url} holds no {', '.join(absent)}: it holds "
                             f"{', '.join(stored)}; cache what the consumer reads (cache.layers, cache.topk, "
                             "cache.logits) and rerun the cache stage")
        self._arrays = {name: stored[name] for name in wanted}
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _open_group(self):
        import zarr

        try:
            self._group = zarr.open_group(self.store.zarr_store(f"{self.path}/{GROUP_DIR}", read_only=True), mode="r")
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            raise CacheError(f"no teacher cache at {self.url}; run the cache stage to build it") from None
        except ValueError as exc:  # a zarr.json that is not JSON, or not zarr's: torn or overwritten
            raise damaged_metadata(self.url, exc) from None
        self._codecs: dict[str, ChunkCodec] = {}  # arrays opened on first use: each open costs requests on S3
        return self._group

    def _codec(self, name: str) -> ChunkCodec:
        if name not in self._codecs:
            try:
                self._codecs[name] = ChunkCodec(self._group[name])
            except Exception as exc:  # its metadata gone or damaged: no chunk of it can be read
                raise CacheError(f"the teacher cache at {self.url}: array {name} cannot be opened "
                                 f"({type(exc).__name__}: {exc}); delete the cache to rebuild it") from exc
        return self._codecs[name]

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: each reopens the group
        state = self.__dict__.copy()
        for name in ("_group", "_codecs", "_chunks", "_cache_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._chunks, self._cache_lock = OrderedDict(), threading.Lock()
        self._open_group()

    @property
    def complete(self) -> bool:
        return self.store.is_complete(self.path)

    def __len__(self) -> int:
        return self.spec.num_samples

    # ---- chunks --------------------------------------------------------------------------------------------

    def read_chunk(self, chunk: int, arrays: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Stored values of the reader's arrays (or of ``arrays``) for one chunk, checked against its record (no
        caching; read-only arrays over the decoded bytes)."""
        names = list(self._arrays if arrays is None else arrays)
        record_file = f"{self.path}/{record_path(chunk)}"
        objects = {name: f"{self.path}/{GROUP_DIR}/{name}/{self._codec(name).key(chunk)}" for name in names}
        data = self.store.read_many([record_file, *objects.values()])  # one round of requests for the whole chunk
        if data[record_file] is None:
            raise self._chunk_error(chunk, "missing: it was never written (an interrupted build)",
                                    "rerun the cache stage to write the missing chunks")
        algorithm, checksums = self._recorded_checksums(chunk, data[record_file], names)
        start, stop = self.spec.chunk_rows(chunk)
        values = {}
        for name, path in objects.items():
            if data[path] is None:
                raise self._chunk_error(chunk, f"corrupt: {name} cannot be read (its object {self.store.url(path)} "
                                               "is missing)")
            try:
                values[name] = self._codec(name).decode(data[path], stop - start)
            except Exception as exc:  # a codec error on damaged bytes, a truncated object...
                raise self._chunk_error(chunk, f"corrupt: {name} cannot be read ({type(exc).__name__}: {exc})") from exc
            if self.check_checksums and CHECKSUMS[algorithm](values[name]) != checksums[name]:
                raise self._chunk_error(chunk, f"corrupt: {name} does not match the checksum recorded when it was "
                                               "written")
        return values

    def _recorded_checksums(self, chunk: int, record: bytes, names: list[str]) -> tuple[str, dict[str, str]]:
        """The checksum algorithm of a chunk's record (``CHECKSUMS``) and each array's checksum under it; a damaged
        record makes the chunk corrupt, like its data."""
        try:
            record = json.loads(record)
            found = [algorithm for algorithm in CHECKSUMS if algorithm in record]
            if len(found) != 1:
                raise KeyError(f"one checksum algorithm of {sorted(CHECKSUMS)} expected, found {found}")
            checksums = record[found[0]]
            return found[0], {name: checksums[name] for name in names}
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, not an object, a checksum missing
            problem = f"corrupt: its record cannot be read ({type(exc).__name__}: {exc})"
            raise self._chunk_error(chunk, problem) from None

    def _chunk_error(self, chunk: int, problem: str, fix: str = _REBUILD) -> ChunkError:
        return ChunkError(f"{chunk_label(self.spec, chunk)} of the teacher cache at {self.url} is {problem}; {fix}",
                          chunk, problem)

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        with self._cache_lock:
            if chunk in self._chunks:
                self._chunks.move_to_end(chunk)
                return self._chunks[chunk]
        values = self.read_chunk(chunk)  # outside the lock: the prefetch thread and the caller may load in parallel
        with self._cache_lock:
            self._chunks[chunk] = values
            while len(self._chunks) > self.cached_chunks:
                self._chunks.popitem(last=False)
        return values

    # ---- samples and batches -------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.get_batch(np.asarray([index]))
        return {name: tensor[0] for name, tensor in batch.items()}

    def get_batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        """Samples ``indices`` (any order, repeats allowed) stacked along dim 0; each chunk involved is read once."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.spec.num_samples
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"sample indices must lie in [0, {n}) for the teacher cache at {self.url}")
        indices = indices % n
        out = {name: np.empty((len(indices), *shape[1:]), STORED_AS.get(dtype, dtype))
               for name, (shape, dtype) in self._arrays.items()}
        chunk_of = indices // self.spec.chunk_size
        for chunk in np.unique(chunk_of):
            where = np.nonzero(chunk_of == chunk)[0]
            rows = indices[where] - int(chunk) * self.spec.chunk_size
            for name, data in self._chunk(int(chunk)).items():
                out[name][where] = data[rows]
        return {name: to_tensor(out[name], self._arrays[name][1]) for name in self._arrays}

    # ---- integrity -----------------------------------------------------------------------------------------

    def verify(self, repair: bool = False, lock_timeout: float = 0.0) -> VerifyReport:
        """Re-read every chunk and compare it with its record. With ``repair``, forget the corrupt chunks (delete
        their records and the cache's completion marker) so that the next writer run rewrites exactly them; a repair
        holds the writers' lock (waiting up to ``lock_timeout`` s, else ``LockedError``), so that it never deletes
        records under a writer."""
        if repair:
            with holding_lock(self.store, self.path, f"the teacher cache at {self.url}", lock_timeout):
                return self._verify(repair)
        return self._verify(repair)

    def _verify(self, repair: bool) -> VerifyReport:
        report = VerifyReport(self.url, self.spec.num_chunks)
        recorded = recorded_chunks(self.store, self.path)
        for chunk in range(self.spec.num_chunks):
            if chunk not in recorded:
                report.missing.append(chunk)
                continue
            try:
                self.read_chunk(chunk, self.spec.arrays())
            except ChunkError as exc:
                report.corrupt[chunk] = f"{chunk_label(self.spec, chunk)} {exc.problem}"
        if repair and report.corrupt:
            self.store.unmark_complete(self.path)
            for chunk in report.corrupt:
                self.store.delete(f"{self.path}/{record_path(chunk)}")
            with self._cache_lock:
                self._chunks.clear()
        return report
