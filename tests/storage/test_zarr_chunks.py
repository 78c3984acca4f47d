"""Whole-chunk access: the objects ``ChunkCodec`` encodes are byte for byte the ones zarr writes itself, and it
decodes zarr's objects to the values zarr reads, for every codec the cache uses and every stored dtype, edge chunks
included; anything else is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from storage.cache_spec import CHUNK_KEY_ENCODING, compressors
from storage.zarr_chunks import ChunkCodec

CODECS = ["none", "zstd", "zstd:1", "blosc", "blosc:lz4:bitshuffle", "blosc:zstd:noshuffle", "gzip"]
DTYPES = ["float32", "float16", "uint16", "int32", "int8"]


def make_array(tmp_path, codec: str, dtype: str, shape=(7, 5, 3), chunks=(3, 5, 3), keys=CHUNK_KEY_ENCODING,
               **options):
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "group.zarr"), mode="a")
    return group.create_array("a", shape=shape, chunks=chunks, dtype=dtype, compressors=compressors(codec),
                              chunk_key_encoding=keys, **{"fill_value": 0, **options})


def values(dtype: str, shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_objects_are_zarrs_own_both_ways(tmp_path, codec, dtype):
    array = make_array(tmp_path, codec, dtype, fill_value=3)
    data = values(dtype, array.shape)
    array[:] = data  # chunks 0 and 1 whole, chunk 2 the edge: one row of three
    chunk_codec = ChunkCodec(array)
    directory = tmp_path / "group.zarr" / "a"
    for chunk, rows in enumerate((slice(0, 3), slice(3, 6), slice(6, 7))):
        zarrs = (directory / chunk_codec.key(chunk)).read_bytes()
        assert chunk_codec.encode(data[rows]) == zarrs, f"chunk {chunk}"
        decoded = chunk_codec.decode(zarrs, rows.stop - rows.start)
        assert decoded.dtype == data.dtype and np.array_equal(decoded, data[rows]), f"chunk {chunk}"


def test_edge_chunk_is_padded_with_the_fill_value(tmp_path):
    array = make_array(tmp_path, "none", "int32", fill_value=-7)
    chunk_codec = ChunkCodec(array)
    stored = np.frombuffer(chunk_codec.encode(np.ones((1, 5, 3), dtype="int32")), dtype="<i4").reshape(3, 5, 3)
    assert (stored[0] == 1).all() and (stored[1:] == -7).all()


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_follows_the_byte_order_the_bytes_codec_names(tmp_path, codec):
    array = make_array(tmp_path, codec, "float32", serializer=zarr.codecs.BytesCodec(endian="big"))
    data = values("float32", array.shape)
    array[:] = data
    chunk_codec = ChunkCodec(array)
    zarrs = (tmp_path / "group.zarr" / "a" / chunk_codec.key(0)).read_bytes()
    assert chunk_codec.encode(data[:3]) == zarrs
    assert np.array_equal(chunk_codec.decode(zarrs, 3), data[:3]) and chunk_codec.decode(zarrs, 3).dtype == "float32"


def test_refuses_values_that_do_not_fit_a_chunk(tmp_path):
    chunk_codec = ChunkCodec(make_array(tmp_path, "zstd", "float16"))
    with pytest.raises(ValueError, match="float16 values of shape \\[3, 5, 3\\], got float32"):
        chunk_codec.encode(np.zeros((3, 5, 3), dtype="float32"))  # never converted silently
    with pytest.raises(ValueError, match="got float16 of shape \\[4, 5, 3\\]"):
        chunk_codec.encode(np.zeros((4, 5, 3), dtype="float16"))


def test_refuses_objects_of_another_size(tmp_path):
    chunk_codec = ChunkCodec(make_array(tmp_path, "zstd", "float16"))
    other = ChunkCodec(make_array(tmp_path / "other", "zstd", "float16", shape=(7, 5, 2), chunks=(3, 5, 2)))
    with pytest.raises(ValueError, match="the object holds 30 values, a chunk 45"):
        chunk_codec.decode(other.encode(np.zeros((3, 5, 2), dtype="float16")), 3)


def test_refuses_arrays_it_cannot_encode(tmp_path):
    with pytest.raises(ValueError, match="needs the 'bytes' codec first, got \\['transpose', 'bytes'"):
        ChunkCodec(make_array(tmp_path / "t", "zstd", "int32", filters=[zarr.codecs.TransposeCodec(order=(2, 1, 0))]))
    with pytest.raises(ValueError, match="chunked along more than its first axis"):
        ChunkCodec(make_array(tmp_path, "zstd", "float16", chunks=(3, 2, 3)))
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "other.zarr"), mode="a")
    crc = group.create_array("b", shape=(4,), chunks=(2,), dtype="int32", compressors=[zarr.codecs.Crc32cCodec()])
    with pytest.raises(ValueError, match="'crc32c' is not supported"):
        ChunkCodec(crc)


def test_names_objects_by_the_arrays_own_key_encoding(tmp_path):
    """Caches written before chunk keys were flat use zarr's default nested keys; they are read (and resumed) as
    they are."""
    array = make_array(tmp_path, "zstd", "int32", keys={"name": "default", "separator": "/"})
    data = values("int32", array.shape)
    array[:] = data
    chunk_codec = ChunkCodec(array)
    assert chunk_codec.key(2) == "c/2/0/0"
    stored = (tmp_path / "group.zarr" / "a" / "c" / "2" / "0" / "0").read_bytes()
    assert np.array_equal(chunk_codec.decode(stored, 1), data[6:7])
