"""Whole Zarr v3 chunks encoded into, and decoded from, the objects zarr stores, without zarr's read and write paths.

The teacher cache writes each chunk of each array exactly once, whole, and reads whole chunks back. Through
zarr-python 3 every such access is a round trip through zarr's event loop and its thread pool (selection, a
read-modify-write check, one thread hop per codec and one for the store), CPU time the writer cannot spare where it
has no core of its own (docs/RESULTS.md, "Teacher cache"), and made the reader fetch a chunk's arrays one after
another. A chunk object of a
``bytes``-then-compressor array is just its C-order bytes, in the byte order the ``bytes`` codec names, through that
compressor, and the compressor is the numcodecs codec zarr itself calls, configured from the array's own metadata;
so the bytes are exactly the ones zarr writes and reads (tests/storage/test_zarr_chunks.py compares them), and the
cache stays an ordinary zarr group.
"""

from __future__ import annotations

import numpy as np

_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _numcodec(codec: dict):
    """The numcodecs codec a zarr v3 bytes-to-bytes codec's metadata describes, configured as zarr configures it."""
    import numcodecs

    name, config = codec["name"], codec.get("configuration", {})
    if name == "zstd":
        return numcodecs.Zstd(level=config["level"], checksum=config["checksum"])
    if name == "blosc":
        return numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"],
                               shuffle=_BLOSC_SHUFFLE[config["shuffle"]], blocksize=config["blocksize"],
                               typesize=config["typesize"])
    if name == "gzip":
        return numcodecs.GZip(level=config["level"])
    raise ValueError(f"zarr codec {name!r} is not supported for whole-chunk access")


class ChunkCodec:
    """Encodes and decodes whole chunks of one zarr v3 array chunked along its first axis only (a ``bytes`` codec,
    then compressors that ``_numcodec`` knows), and names their objects."""

    def __init__(self, array):
        metadata = array.metadata
        codecs = [c.to_dict() for c in metadata.codecs]
        if not codecs or codecs[0]["name"] != "bytes":
            raise ValueError(f"zarr array {array.path!r}: whole-chunk access needs the 'bytes' codec first, "
                             f"got {[c['name'] for c in codecs]}")
        if tuple(array.chunks[1:]) != tuple(array.shape[1:]):
            raise ValueError(f"zarr array {array.path!r} is chunked along more than its first axis: {array.chunks}")
        self.chunk_shape = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype)
        endian = codecs[0].get("configuration", {}).get("endian")  # absent for one-byte types
        self._stored_dtype = self.dtype.newbyteorder(">" if endian == "big" else "<")
        self._fill_value = metadata.fill_value
        self._compressors = [_numcodec(c) for c in codecs[1:]]
        self._encode_key = metadata.encode_chunk_key

    def key(self, chunk: int) -> str:
        """The name of chunk ``chunk``'s object inside the array's directory, e.g. ``c.3.0.0``."""
        return self._encode_key((chunk,) + (0,) * (len(self.chunk_shape) - 1))

    def encode(self, values: np.ndarray) -> bytes:
        """The stored object of one chunk holding ``values``: the whole chunk, or the rows that exist of the last
        one along the first axis (zarr stores edge chunks at full size, padded with the fill value)."""
        if values.dtype != self.dtype or values.shape[1:] != self.chunk_shape[1:] or len(values) > self.chunk_shape[0]:
            raise ValueError(f"a chunk of this array holds {self.dtype} values of shape {list(self.chunk_shape)}, got "
                             f"{values.dtype} of shape {list(values.shape)}")
        if len(values) < self.chunk_shape[0]:
            padded = np.full(self.chunk_shape, self._fill_value, dtype=self.dtype)
            padded[:len(values)] = values
            values = padded
        data = np.ascontiguousarray(values, dtype=self._stored_dtype)
        for compressor in self._compressors:
            data = compressor.encode(data)
        return bytes(data)

    def decode(self, data: bytes, rows: int) -> np.ndarray:
        """The first ``rows`` rows of the chunk stored as ``data``: a read-only view of the decoded bytes (a copy
        when their byte order is not the machine's); ``ValueError`` or the codec's own error if ``data`` is not such
        a chunk."""
        for compressor in reversed(self._compressors):
            data = compressor.decode(data)
        values = np.frombuffer(data, dtype=self._stored_dtype)
        if values.size != int(np.prod(self.chunk_shape)):
            raise ValueError(f"the object holds {values.size} values, a chunk {int(np.prod(self.chunk_shape))}")
        return values.reshape(self.chunk_shape)[:rows].astype(self.dtype, copy=False)
