"""A store array's shard file without zarr: its rows read with one pread, checksum and blosc call per chunk, and
its bytes made with one blosc call per chunk on a pool of threads.

zarr's synchronous API runs every read on its one event-loop thread, so the loader's reader threads do not
add up there, and it compresses a shard's chunks one after another (docs/BENCHMARKS.md). For the layout the store
writes (docs/FORMAT.md: each array one shard file, its chunk index at the end, chunks bytes -> blosc -> crc32c) this
reads the index once, then each chunk with calls that release the GIL. Store.read falls back to zarr for anything
else; the tests compare the two, and the bytes encode_file makes with those zarr writes.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import google_crc32c
import numpy as np
from numcodecs import Blosc, blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.metadata import ArrayV3Metadata

from pipeline.devices import usable_cpus

MISSING = 2**64 - 1  # the index's offset and length of a chunk that was never written
CHECKSUM_BYTES = 4


def little_endian(codec: BytesCodec) -> bool:
    return codec.endian is None or codec.endian.value == "little"


class ChunkFile:
    """One array stored as a single shard file whose chunks split its rows."""

    def __init__(self, path: str, shape: tuple[int, ...], chunk_rows: int, n_chunks: int, dtype: np.dtype):
        self.path, self.shape, self.chunk_rows, self.dtype = path, shape, chunk_rows, dtype
        index_bytes = 16 * n_chunks  # (offset, length) as two little-endian uint64 per chunk
        self.index = np.frombuffer(self._checked(os.path.getsize(path) - index_bytes - CHECKSUM_BYTES, index_bytes,
                                                 "the chunk index"), "<u8").reshape(n_chunks, 2)

    @staticmethod
    def handles(metadata: ArrayV3Metadata) -> bool:
        """Whether the array metadata describes (its zarr.json, parsed) has exactly the layout this module reads and
        encode_file writes."""
        codecs, shape = metadata.codecs, metadata.shape
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not shape or not shape[0]:
            return False
        sharding, shard_shape = codecs[0], metadata.shards
        inner, index = [type(codec) for codec in sharding.codecs], [type(codec) for codec in sharding.index_codecs]
        return (inner == [BytesCodec, BloscCodec, Crc32cCodec] and index == [BytesCodec, Crc32cCodec]
                and all(little_endian(codec) for codec in (sharding.codecs[0], sharding.index_codecs[0]))
                and sharding.index_location == ShardingCodecIndexLocation.end
                and shard_shape[0] >= shape[0] and tuple(shard_shape[1:]) == tuple(shape[1:])
                and tuple(sharding.chunk_shape[1:]) == tuple(shape[1:]))

    @classmethod
    def of(cls, metadata: ArrayV3Metadata, folder: str) -> "ChunkFile | None":
        """A reader for the array metadata describes (zarr.open_array takes a millisecond, most of it waiting on zarr's
        event loop, which every shard of a large store paid three times to sum its statistics), stored in folder, or
        None unless ChunkFile handles its layout."""
        if not cls.handles(metadata):
            return None
        shape, sharding, shard_shape = metadata.shape, metadata.codecs[0], metadata.shards
        chunk_rows = sharding.chunk_shape[0]
        path = os.path.join(folder, metadata.encode_chunk_key((0,) * len(shape)))
        return cls(path, shape, chunk_rows, shard_shape[0] // chunk_rows, np.dtype(metadata.data_type.to_native_dtype()))

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end): a view of the chunk when they lie in one, else a copy of the pieces."""
        start, end = max(start, 0), min(end, self.shape[0])
        if end <= start:
            return np.empty((0, *self.shape[1:]), self.dtype)
        first, last = start // self.chunk_rows, (end - 1) // self.chunk_rows
        if first == last:
            offset = first * self.chunk_rows
            return self.chunk(first)[start - offset : end - offset]
        rows = np.empty((end - start, *self.shape[1:]), self.dtype)
        for chunk in range(first, last + 1):
            offset = chunk * self.chunk_rows
            lo, hi = max(start, offset), min(end, offset + self.chunk_rows)
            rows[lo - start : hi - start] = self.chunk(chunk)[lo - offset : hi - offset]
        return rows

    def chunk(self, chunk: int) -> np.ndarray:
        """All chunk_rows rows of one chunk (the last one padded as zarr pads it)."""
        offset, length = (int(value) for value in self.index[chunk])
        if offset == MISSING:
            raise ValueError(f"chunk {chunk} was never written")
        compressed = self._checked(offset, length - CHECKSUM_BYTES, f"chunk {chunk}")
        rows = np.empty((self.chunk_rows, *self.shape[1:]), self.dtype)
        if int.from_bytes(compressed[4:8], "little") != rows.nbytes:  # the blosc header's uncompressed size
            raise ValueError(f"chunk {chunk} does not hold {rows.shape} values of {self.dtype}")
        blosc.decompress(compressed, rows)
        return rows

    def _checked(self, offset: int, length: int, what: str) -> bytes:
        """length bytes at offset, whose crc32c follows them in the file; ValueError if they do not match."""
        if offset < 0:
            raise ValueError(f"the file is shorter than its chunk index ({what})")
        handle = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(handle, length, offset)
            checksum = os.pread(handle, CHECKSUM_BYTES, offset + length)
        finally:
            os.close(handle)
        if len(data) != length or len(checksum) != CHECKSUM_BYTES:
            raise ValueError(f"{what} is cut short")
        if google_crc32c.value(data) != int.from_bytes(checksum, "little"):
            raise ValueError(f"{what} fails its checksum")
        return data


class GatheredRows:
    """Rows of several arrays, the kept ones of each in order, gathered only as slices of them are read: stage one's
    writer hands a split's rows of several batches to encode_file this way, so that each chunk is gathered by the
    thread that compresses it, where gathering the whole split first took a serial copy into fresh memory."""

    def __init__(self, pieces: list[tuple[np.ndarray, np.ndarray | None]]):
        self.pieces = pieces  # (rows, the indices of those kept, or None for all)
        lengths = [len(rows) if kept is None else len(kept) for rows, kept in pieces]
        self.starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.shape = (int(self.starts[-1]), *pieces[0][0].shape[1:])
        self.dtype = pieces[0][0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        """Rows [start, stop) as one contiguous array: a view where they lie in one batch kept whole, else a copy."""
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("GatheredRows are read in runs of consecutive rows")
        stop = max(stop, start)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        if first < len(self.pieces) and self.pieces[first][1] is None and stop <= self.starts[first + 1]:
            return self.pieces[first][0][start - self.starts[first] : stop - self.starts[first]]
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        for piece in range(first, len(self.pieces)):
            lo, hi = max(start, self.starts[piece]), min(stop, self.starts[piece + 1])
            if lo >= hi:
                break
            rows, kept = self.pieces[piece]
            where, at = slice(lo - start, hi - start), self.starts[piece]
            if kept is None:
                out[where] = rows[lo - at : hi - at]
            else:
                np.take(rows, kept[lo - at : hi - at], axis=0, out=out[where], mode="clip")  # "raise" would copy twice
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def encode_file(rows: "np.ndarray | GatheredRows", metadata: ArrayV3Metadata) -> list[bytes]:
    """The pieces of the shard file zarr writes for an array of these rows laid out as metadata says (a layout
    ChunkFile handles, its shard holding just the chunks the rows fill): each chunk (the last one padded with zeros)
    through blosc then crc32c, then the checksummed index; the chunks compressed in parallel. rows: an array, or
    GatheredRows, each chunk gathered by the thread that compresses it."""
    sharding = metadata.codecs[0]
    chunk_rows, blosc_config = sharding.chunk_shape[0], sharding.codecs[1].to_dict()["configuration"]  # as zarr.json has it
    compressor = Blosc(cname=blosc_config["cname"], clevel=blosc_config["clevel"], shuffle=_SHUFFLES[blosc_config["shuffle"]],
                       blocksize=blosc_config["blocksize"], typesize=blosc_config["typesize"])

    def encoded(start: int) -> tuple[bytes, bytes]:
        chunk = np.ascontiguousarray(rows[start : start + chunk_rows])  # blosc takes whole buffers
        if len(chunk) < chunk_rows:
            chunk = np.concatenate([chunk, np.zeros((chunk_rows - len(chunk), *rows.shape[1:]), rows.dtype)])
        compressed = compressor.encode(chunk)
        return compressed, google_crc32c.value(compressed).to_bytes(CHECKSUM_BYTES, "little")

    chunks = list(compression_pool().map(encoded, range(0, len(rows), chunk_rows)))
    lengths = np.array([len(compressed) + CHECKSUM_BYTES for compressed, _ in chunks], np.uint64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    index = np.stack([offsets, lengths], axis=1).astype("<u8").tobytes()
    return [*(piece for chunk in chunks for piece in chunk), index, google_crc32c.value(index).to_bytes(CHECKSUM_BYTES, "little")]


_SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


@cache
def compression_pool() -> ThreadPoolExecutor:
    """One thread per CPU this process may use, shared by every shard it writes (blosc releases the GIL)."""
    return ThreadPoolExecutor(usable_cpus(), thread_name_prefix="compress")
