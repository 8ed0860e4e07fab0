"""Direct reads of a local array's shard file against zarr's own reads, the damage they must catch, and the bytes
encode_file makes against those zarr writes."""

import numpy as np
import pytest
import zarr
from test_store import write_store

from pipeline.chunk_file import ChunkFile, GatheredRows, encode_file
from pipeline.errors import CrosscodersError
from pipeline.store import _create, acts_codecs, small_codecs

ARRAYS = ["train/acts", "train/layer", "train/doc", "val/acts", "docs/tokens", "stats/sum"]


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "s")  # shards of 1,498 and 898 training rows: chunks of 1,024 and a partial one


def acts_file(store, shard: int = 1) -> str:
    return store.location.path(store.shards[shard].name, "train", "acts", "c", "0", "0")


@pytest.mark.parametrize("name", ARRAYS)
def test_direct_reads_equal_zarr_reads_for_any_range(store, name):
    rng = np.random.default_rng(0)
    for shard in store.shards:
        array = store.array(shard, name)
        reader = ChunkFile.of(array.metadata, store.location.path(shard.name, name))
        assert reader is not None and store.chunk_file(shard, name) is not None
        n = array.shape[0]
        ranges = [(0, n), (0, 1), (n - 1, n), (1020, 1030), (1024, 2048), (5, 5), (0, n + 10)]
        ranges += [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(20)]
        for start, end in ranges:
            expected = array[start:end]
            got = reader.read(start, end)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (name, start, end)


@pytest.mark.parametrize("rows", [1, 1023, 1024, 3000, 4096])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int64])
def test_encoded_files_are_the_bytes_zarr_writes(tmp_path, rows, dtype):
    data = (np.random.default_rng(rows).standard_normal((rows, 24)) * 1000).astype(dtype)
    data[:7] = 0  # an all-zero stretch, as padding makes
    for codecs in (acts_codecs(), small_codecs()):
        group = zarr.open_group(tmp_path / f"{rows}-{np.dtype(dtype).name}-{codecs[0].cname.value}", mode="w")
        _create(group, "array", data, codecs)  # zarr compresses and writes
        metadata = group["array"].metadata
        with open(f"{group.store.root}/array/c/0/0", "rb") as handle:
            written = handle.read()
        assert ChunkFile.handles(metadata)
        assert b"".join(encode_file(data, metadata)) == written
        assert b"".join(encode_file(np.asfortranarray(data), metadata)) == written  # rows in any memory order


def gathered_pieces(seed: int) -> tuple[GatheredRows, np.ndarray]:
    """Rows of batches of several sizes, some kept whole, some through a mask (one keeping nothing), and the same rows
    gathered by numpy."""
    rng = np.random.default_rng(seed)
    pieces, expected = [], []
    for size, keep in ((700, 1.0), (1500, 0.9), (3, 0.0), (1024, 1.0), (900, 0.5), (1, 1.0)):
        rows = rng.integers(0, 2**16, (size, 24)).astype(np.uint16)
        kept = rng.random(size) < keep
        if kept.any():
            pieces.append((rows, None if kept.all() else np.flatnonzero(kept)))
        expected.append(rows[kept])
    return GatheredRows(pieces), np.concatenate(expected)


def test_gathered_rows_read_as_the_rows_they_stand_for():
    gathered, expected = gathered_pieces(0)
    n = len(expected)
    assert gathered.shape == expected.shape and gathered.dtype == expected.dtype and len(gathered) == n
    assert np.array_equal(np.asarray(gathered), expected)
    rng = np.random.default_rng(1)
    bounds = [0, 700, 699, 701, 1024, 2048, n - 1, n]  # about the first batch, kept whole, and the ends
    ranges = [(a, b) for a in bounds for b in bounds] + [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(50)]
    for start, stop in ranges + [(0, n + 100), (n, n + 5)]:
        got = gathered[start:stop]
        assert got.flags.c_contiguous and np.array_equal(got, expected[start:stop]), (start, stop)
    assert np.shares_memory(gathered[10:600], gathered.pieces[0][0])  # inside one batch kept whole: no copy


def test_encoded_gathered_rows_are_the_bytes_zarr_writes(tmp_path):
    gathered, expected = gathered_pieces(2)
    group = zarr.open_group(tmp_path / "g", mode="w")
    _create(group, "array", expected, acts_codecs())
    with open(f"{group.store.root}/array/c/0/0", "rb") as handle:
        assert b"".join(encode_file(gathered, group["array"].metadata)) == handle.read()


def test_stores_on_object_storage_read_through_zarr(tmp_path):
    memory = write_store("memory://stores/chunk-file-test")
    assert memory.chunk_file(memory.shards[0], "train/acts") is None
    local = write_store(tmp_path / "s")
    for shard_in_memory, shard in zip(memory.shards, local.shards):
        assert np.array_equal(memory.read(shard_in_memory, "train/acts"), local.read(shard, "train/acts"))


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = zarr.create_array(tmp_path / "plain", shape=(4096, 8), chunks=(1024, 8), dtype="float32")
    assert ChunkFile.of(plain.metadata, str(tmp_path / "plain")) is None  # not sharded
    other_codec = zarr.create_array(tmp_path / "zstd", shape=(4096, 8), chunks=(1024, 8), shards=(4096, 8),
                                    dtype="float32", compressors=zarr.codecs.ZstdCodec())
    assert ChunkFile.of(other_codec.metadata, str(tmp_path / "zstd")) is None  # no blosc, no checksum
    many_shards = zarr.create_array(tmp_path / "shards", shape=(4096, 8), chunks=(1024, 8), shards=(2048, 8),
                                    dtype="float32", compressors=(zarr.codecs.BloscCodec(), zarr.codecs.Crc32cCodec()))
    assert ChunkFile.of(many_shards.metadata, str(tmp_path / "shards")) is None  # two shard files


def damage(path: str, position: int):
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("part, message", [("chunk", "chunk 0 fails its checksum"),
                                           ("index", "the chunk index fails its checksum")])
def test_a_flipped_byte_is_a_one_line_error(store, part, message):
    path = acts_file(store)
    damage(path, 100 if part == "chunk" else len(open(path, "rb").read()) - 10)
    with pytest.raises(CrosscodersError, match=rf"{store.shards[1].name}/train/acts is damaged \({message}\)") as error:
        store.read(store.shards[1], "train/acts", 0, 1024)
    assert "\n" not in str(error.value)


def test_a_cut_file_is_a_one_line_error(store):
    with open(acts_file(store), "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(CrosscodersError, match=r"train/acts is damaged \(the chunk index fails its checksum\)"):
        store.read(store.shards[1], "train/acts", 0, 1024)
