"""The teacher cache's format: what it holds (``TeacherCacheSpec``), how values are encoded, where records live.

A cache is a Zarr v3 group. Arrays (N samples, T positions, D hidden size, k top-k, V vocabulary):

    input_ids            [N, T]     int32
    attention_mask       [N, T]     int8
    hidden/layer_<i>     [N, T, D]  the storage dtype, for each cached layer i (an index into hidden_states)
    topk_values          [N, T, k]  float16   (when topk > 0 and logits is "topk": the k largest logits)
    topk_indices         [N, T, k]  int32     (their token ids)
    sampled_counts       [N, T, k]  uint8     (when topk > 0 and logits is "sampled": how often each of k draws from
    sampled_indices      [N, T, k]  int32      the teacher's distribution picked the token; 0 on the slots of repeats)
    logits               [N, T, V]  the storage dtype (when full_logits; small vocabularies only)

Every array is chunked along N only, ``chunk_size`` samples per chunk (the writer's batch), so chunk ``c`` holds
samples ``[c * chunk_size, (c + 1) * chunk_size)`` of every array and is written once, whole, by one writer.

bfloat16: numpy has no bfloat16 and Zarr v3 has no core bfloat16 type, so bf16 values are stored as their exact
16-bit patterns in a ``uint16`` array (a bf16 value is the upper half of a float32; no rounding happens in storage).
The array's attributes say so: ``{"bitnet_distill": {"dtype": "bfloat16", "encoding": "bfloat16-bits-in-uint16"}}``;
any reader gets the values back with ``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`` (or
``a.view(ml_dtypes.bfloat16)``). float32/float16 are stored natively.

On disk, the cache directory holds the group ``data.zarr/`` and, beside it (so that Zarr sees a clean hierarchy):
``_chunks/chunk-<c>.json`` (the completion record of chunk ``c``: its rows, a checksum of each array's stored
values under the key of its algorithm, ``crc32c`` or ``sha256`` (``CHECKSUMS``), per-layer norm sums), ``_lock`` or ``_lease.json`` (the writer's lock) and, once every chunk is recorded,
``_COMPLETE.json``. The group's attributes hold the spec and the per-layer mean norms.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import StoreError

FORMAT = "teacher-cache/zarr/1"
ATTRS_KEY = "bitnet_distill"
BF16_ENCODING = "bfloat16-bits-in-uint16"
# Top-k values and indices: bit-shuffled LZ4 is smaller than zstd on them (the indices' high bits are zero with a
# vocabulary under 2^24, the fp16 values share exponents) and much faster to write and read (docs/RESULTS.md,
# "Teacher cache"). Hidden states keep ``codec`` (zstd): their mantissas are near random bits, and LZ4 finds nothing
# in them.
TOPK_CODEC = "blosc:lz4:bitshuffle"
# Chunk c of an array is the file ``<array>/c.<c>.0.0``, beside every other chunk of it, not Zarr's default
# ``<array>/c/<c>/0/0``: a new chunk then creates no directories, so fsync of the file and of the array's directory
# makes it durable (a new directory would need its parents synced too), and the writer skips two mkdirs per file.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}
RECORDS_DIR = "_chunks"
GROUP_DIR = "data.zarr"

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
# numpy dtype each logical dtype is stored as
STORED_AS = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


class CacheError(StoreError):
    """The teacher cache cannot be used as asked."""


class FingerprintMismatchError(CacheError):
    """The cache at a path was built from another configuration."""


class ChunkError(CacheError):
    """A chunk is missing or corrupt; ``chunk`` says which, ``problem`` what."""

    def __init__(self, message: str, chunk: int, problem: str = ""):
        super().__init__(message)
        self.chunk, self.problem = chunk, problem


def check_fingerprint(url: str, stored: str, wanted: str) -> None:
    if stored != wanted:
        raise FingerprintMismatchError(
            f"the teacher cache at {url} was built for fingerprint {stored!r}, not the requested {wanted!r} (another "
            "teacher, tokenizer, sequence length, layer set or cache setting); it is never reused for another "
            "configuration: use the path of the new fingerprint, or delete the old cache")


def damaged_metadata(url: str, exc: Exception) -> CacheError:
    return CacheError(f"the teacher cache at {url} has damaged Zarr metadata (a zarr.json: {type(exc).__name__}: "
                      f"{exc}), so its layout and spec are unknown; delete the cache and rerun the cache stage")


def record_path(chunk: int) -> str:
    return f"{RECORDS_DIR}/chunk-{chunk:06d}.json"


def recorded_chunks(store, path: str) -> set[int]:
    """Chunks with a completion record."""
    names = store.list(f"{path}/{RECORDS_DIR}")
    return {int(n.rsplit("chunk-", 1)[1].split(".")[0]) for n in names if n.endswith(".json")}


def chunk_label(spec: TeacherCacheSpec, chunk: int) -> str:
    start, stop = spec.chunk_rows(chunk)
    return f"chunk {chunk} (samples {start}-{stop - 1})"


TORCH_DTYPES = ("float32", "float16", "bfloat16", "int32", "int8", "uint8")
LOGIT_ARRAYS = {"topk": ("topk_values", "topk_indices"), "sampled": ("sampled_counts", "sampled_indices")}
MAX_SAMPLED = 255  # draws per position: their counts are stored in 8 bits


def torch_dtype(dtype: str):
    """The torch dtype of a logical dtype (``"float16"`` -> ``torch.float16``)."""
    import torch

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"no stored dtype {dtype!r}")
    return getattr(torch, dtype)


def to_stored(tensor) -> np.ndarray:
    """A contiguous CPU tensor already in its logical dtype as the numpy values stored (bf16 as its uint16 bits);
    no copy."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def to_tensor(values: np.ndarray, dtype: str):
    """Stored values as a torch tensor of the logical dtype (bf16 bits viewed as torch.bfloat16, no copy)."""
    import torch

    values = np.ascontiguousarray(values)
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def array_sha256(values: np.ndarray) -> str:
    """Checksum of an array's stored values (C order, as written), independent of compression."""
    return hashlib.sha256(_bytes_of(values)).hexdigest()


def array_crc32c(values: np.ndarray) -> str:
    """CRC-32C of an array's stored values (C order, as written), as 8 hex digits."""
    import google_crc32c

    return f"{google_crc32c.value(_bytes_of(values)):08x}"


def _bytes_of(values: np.ndarray) -> np.ndarray:
    # a numpy array, not a memoryview of it: google_crc32c's C function rejects memoryviews
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


# The checksums a chunk's record may hold, by the record's key for them. A record names its algorithm, so caches
# written with sha256 (every cache before crc32c) still verify, and one cache may hold records of both.
#
# Why CRC-32C suffices: a record's checksum is there to catch accidental damage (a torn or truncated object, flipped
# bits on a disk or in transit, an object of another chunk or run left in place), never tampering: whoever can
# rewrite a chunk can rewrite its record too, so sha256 gave no protection against that either. Against accidental
# damage CRC-32C detects every error burst up to 32 bits and any other corruption of an object but with probability
# 2^-32, per damaged array. It is also hardware-accelerated, where sha256 was a sizeable share of the writer's CPU
# time (docs/RESULTS.md, "Teacher cache").
CHECKSUMS = {"sha256": array_sha256, "crc32c": array_crc32c}


def default_checksum() -> str:
    """``crc32c`` where google-crc32c (a dependency of zarr) has its compiled implementation; else ``sha256``: its
    pure-Python fallback would be slower than sha256 by orders of magnitude."""
    try:
        import google_crc32c
    except ImportError:
        return "sha256"
    return "crc32c" if google_crc32c.implementation == "c" else "sha256"


def layer_name(layer: int) -> str:
    return f"hidden/layer_{layer}"


@dataclass(frozen=True)
class TeacherCacheSpec:
    """Everything that determines a cache's shape and encoding. ``fingerprint`` names the configuration that
    produced it (teacher, tokenizer, data, layers...): a cache is only ever reused for the same fingerprint."""

    num_samples: int
    seq_len: int
    layers: tuple[int, ...]
    hidden_size: int
    dtype: str = "float16"
    codec: str = "zstd"  # hidden states, full logits, token ids and masks
    chunk_size: int = 8
    topk: int = 0
    fingerprint: str = ""
    full_logits: bool = False
    vocab_size: int = 0
    topk_codec: str = TOPK_CODEC  # the cached logits' arrays (top-k values and indices, or sampled counts and indices)
    logits: str = "topk"  # how the topk logits per position are chosen: the largest, or "sampled" (LOGIT_ARRAYS)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        dtype = DTYPE_ALIASES.get(str(self.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"cache dtype {self.dtype!r} is not one of float32, float16, bfloat16")
        object.__setattr__(self, "dtype", dtype)
        for name in ("num_samples", "seq_len", "hidden_size", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TeacherCacheSpec.{name} must be positive, got {getattr(self, name)}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"TeacherCacheSpec.layers must be distinct and non-empty, got {list(self.layers)}")
        if self.topk < 0 or (self.full_logits and self.vocab_size < 1):
            raise ValueError("topk must be >= 0, and full_logits needs vocab_size")
        if self.logits not in LOGIT_ARRAYS or (self.logits == "sampled" and self.topk > MAX_SAMPLED):
            raise ValueError(f"logits must be one of {', '.join(LOGIT_ARRAYS)} (sampled: topk <= {MAX_SAMPLED}), got "
                             f"{self.logits!r} with topk {self.topk}")
        compressors(self.codec), compressors(self.topk_codec)  # validate now, not in the writer thread

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        if not 0 <= chunk < self.num_chunks:
            raise IndexError(f"chunk {chunk} out of range: the cache has {self.num_chunks} chunks")
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def chunk_of(self, sample: int) -> int:
        return sample // self.chunk_size

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{name: (shape, logical dtype)}`` of every array in the cache."""
        n, t = self.num_samples, self.seq_len
        out = {"input_ids": ((n, t), "int32"), "attention_mask": ((n, t), "int8")}
        out |= {layer_name(i): ((n, t, self.hidden_size), self.dtype) for i in self.layers}
        if self.topk:
            weights, indices = LOGIT_ARRAYS[self.logits]
            out |= {weights: ((n, t, self.topk), "float16" if self.logits == "topk" else "uint8"),
                    indices: ((n, t, self.topk), "int32")}
        if self.full_logits:
            out["logits"] = ((n, t, self.vocab_size), self.dtype)
        return out

    def codec_of(self, name: str) -> str:
        """The codec array ``name`` is stored with."""
        return self.topk_codec if name in LOGIT_ARRAYS[self.logits] else self.codec

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict) -> TeacherCacheSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        # caches written before topk_codec existed stored their top-k with ``codec``
        return cls(**{"topk_codec": data.get("codec", "zstd"), **{k: v for k, v in data.items() if k in known}})


def compressors(codec: str) -> list:
    """Zarr v3 codecs for ``codec``: ``zstd`` (level 3), ``zstd:<level>``, ``blosc[:<cname>[:<shuffle>]]`` (blosc
    with ``cname`` zstd (the default), lz4, lz4hc, blosclz, zlib or snappy, after ``shuffle``: ``shuffle`` (bytes,
    the default), ``bitshuffle`` or ``noshuffle``), ``gzip[:<level>]`` or ``none``."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    name, _, options = str(codec).partition(":")
    try:
        if name == "zstd":
            return [ZstdCodec(level=int(options or 3))]
        if name == "blosc":
            cname, _, shuffle = options.partition(":")
            return [BloscCodec(cname=cname or "zstd", clevel=5, shuffle=shuffle or "shuffle")]
        if name == "gzip":
            return [GzipCodec(level=int(options or 5))]
        if name == "none":
            return []
    except ValueError as exc:
        raise ValueError(f"cache codec {codec!r}: {exc}") from None
    raise ValueError(f"cache codec {codec!r} is not one of zstd, zstd:<level>, blosc[:<cname>[:<shuffle>]], gzip, "
                     "none")
