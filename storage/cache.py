"""The Zarr v3 teacher cache: the format and spec (``cache_spec``), the resumable threaded writer
(``cache_writer``), the reader / Dataset / verifier (``cache_reader``). Import from here."""

from .cache_reader import TeacherCacheReader, VerifyReport, prefetched
from .cache_spec import (CacheError, ChunkError, FingerprintMismatchError, TeacherCacheSpec, compressors,
                         layer_name)
from .cache_writer import CacheWriteError, TeacherCacheWriter
from .lease import LockedError


def verify_cache(store, path: str, repair: bool = False) -> VerifyReport:
    """``TeacherCacheReader(store, path).verify(repair)``: which chunks are missing or corrupt."""
    return TeacherCacheReader(store, path).verify(repair=repair)


__all__ = ["CacheError", "CacheWriteError", "ChunkError", "FingerprintMismatchError", "LockedError",
           "TeacherCacheReader", "TeacherCacheSpec", "TeacherCacheWriter", "VerifyReport", "compressors",
           "layer_name", "prefetched", "verify_cache"]
