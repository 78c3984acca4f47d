"""The Zarr v3 teacher cache: the format and spec (``cache_spec``), the resumable threaded writer
(``cache_writer``), the reader / Dataset / verifier (``cache_reader``). Import from here."""

from .cache_reader import TeacherCacheReader, VerifyReport
from .cache_spec import (CacheError, ChunkError, FingerprintMismatchError, TeacherCacheSpec, compressors,
                         layer_name)
from .cache_writer import CacheWriteError, TeacherCacheWriter
from .lease import LockedError

__all__ = ["CacheError", "CacheWriteError", "ChunkError", "FingerprintMismatchError", "LockedError",
           "TeacherCacheReader", "TeacherCacheSpec", "TeacherCacheWriter", "VerifyReport", "compressors",
           "layer_name"]
