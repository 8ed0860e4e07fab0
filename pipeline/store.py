"""The activation store: a zarr v3 group of immutable, checksummed shards (layout in docs/FORMAT.md)."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import CrosscodersError

FORMAT_VERSION = 1
FORMAT_NAME = "crosscoders-activations"
SHARD_PREFIX = "shard-"
STAGING_DIR = ".staging"
CHUNK_ROWS = 1024  # rows per compressed chunk: the loader's unit of random access (docs/FORMAT.md)
STORAGE_DTYPES = {"bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# bfloat16 has no numpy type: its bits are stored as uint16 and reinterpreted on read.
NUMPY_BITS = {"bf16": np.uint16, "float16": np.float16, "float32": np.float32}
ROW_FIELDS = {"layer": np.int16, "token": np.int32, "doc": np.int64, "pos": np.int32}
SPLITS = ("train", "val")
# Fields that may change between runs into one store: how the model is named (its fingerprint
# must match) and the run's length and where it runs, which change no stored value.
FREE_FIELDS = {"name", "model", "n_tokens", "shard_rows", "out", "device"}


def acts_codecs() -> tuple:
    """Compression for activations: lz4 over bit-shuffled values (measured in docs/FORMAT.md), then a checksum per chunk."""
    return (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec())


def small_codecs() -> tuple:
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """acts: [rows, d_model] any float dtype -> numpy array holding the storage dtype's bits."""
    stored = acts.to(STORAGE_DTYPES[dtype]).cpu()
    if dtype == "bf16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_storage: numpy bits -> torch tensor in the storage dtype (bit-exact)."""
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def layer_sums(acts: torch.Tensor, layers: torch.Tensor, n_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The store's exact statistics of rows (acts: [n, d_model], layers: [n]): count, sum and sum of
    squared norms per layer, in float64 so that shards add up without rounding drift."""
    values, index = acts.double(), layers.long()
    count = torch.bincount(index, minlength=n_layers)
    total = torch.zeros(n_layers, acts.shape[1], dtype=torch.float64).index_add_(0, index, values)
    sq = torch.zeros(n_layers, dtype=torch.float64).index_add_(0, index, values.pow(2).sum(1))
    return count.numpy(), total.numpy(), sq.numpy()


@dataclass
class SplitRows:
    """Rows of one split in one shard: activations and their provenance."""

    acts: np.ndarray  # [rows, d_model] storage bits
    layer: np.ndarray  # [rows]
    token: np.ndarray  # [rows] token id
    doc: np.ndarray  # [rows] document index in the corpus stream
    pos: np.ndarray  # [rows] position in the document

    def __len__(self) -> int:
        return len(self.layer)


@dataclass
class ShardData:
    """Everything one shard holds, built by the cache and written in one piece."""

    splits: dict[str, SplitRows]
    doc_index: np.ndarray  # [n_docs] document indices processed into this shard
    doc_split: np.ndarray  # [n_docs] 1 for held-out documents
    doc_offsets: np.ndarray  # [n_docs + 1] into doc_tokens
    doc_tokens: np.ndarray  # [sum of lengths] token ids of those documents
    stats_count: np.ndarray  # [n_hidden_states] training rows per layer
    stats_sum: np.ndarray  # [n_hidden_states, d_model] float64 sum of training rows
    stats_sum_sq_norm: np.ndarray  # [n_hidden_states] float64 sum of squared norms
    next_doc: int  # the corpus position to resume from after this shard
    n_pairs_end: int  # pairs stored in this shard and all before it


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    index: int
    n_rows: dict  # split -> rows
    next_doc: int
    n_pairs_end: int


def _create(group, name: str, data: np.ndarray, codecs: tuple, chunk_rows: int = CHUNK_ROWS):
    """One array stored as a single sharded file of checksummed chunks."""
    rows = max(len(data), 1)
    chunks = (min(chunk_rows, rows),) + data.shape[1:]
    shard_rows = -(-rows // chunks[0]) * chunks[0]
    array = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=(shard_rows,) + data.shape[1:], compressors=codecs,
        config={"write_empty_chunks": True},  # an all-zero chunk still gets its file, so a lost file is detectable
    )
    if len(data):
        array[...] = data


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:06d}"


def create_or_open(path: str | Path, metadata: dict) -> "Store":
    """Opens the store at path for appending, creating it with metadata if new.

    An existing store must have been made with the same metadata (model, layers, dtype, corpus...);
    `n_tokens` is the one field that may differ, so a re-run can extend a store.
    """
    path = Path(path)
    root_meta = path / "zarr.json"
    if root_meta.exists():
        store = Store(path)
        _check_same_recipe(store, metadata)
        shutil.rmtree(path / STAGING_DIR, ignore_errors=True)
        return store
    if path.exists() and any(p.name != ".gitkeep" for p in path.iterdir()):
        raise CrosscodersError(f"{path} exists and is not an activation store; choose an empty or new --out")
    path.mkdir(parents=True, exist_ok=True)
    zarr.create_group(path, attributes={"crosscoders": {"format": FORMAT_NAME, "version": FORMAT_VERSION, **metadata}})
    return Store(path)


def _check_same_recipe(store: "Store", metadata: dict) -> None:
    existing = store.metadata
    for key, value in metadata.items():
        old, new = existing.get(key), json.loads(json.dumps(value))
        if isinstance(old, dict) and isinstance(new, dict):
            old, new = ({k: v for k, v in d.items() if k not in FREE_FIELDS} for d in (old, new))
        if old != new:
            differing = _first_difference(old, new)
            raise CrosscodersError(
                f"{store.path / 'zarr.json'} was made with a different {key}{differing}; "
                "re-run with the same options or choose another --out"
            )


def _first_difference(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return f" ({k}: store has {old.get(k)!r}, this run has {new.get(k)!r})"
    return f" (store has {old!r}, this run has {new!r})"


class Store:
    """A readable view of a store: metadata, complete shards, statistics and rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        root_meta = self.path / "zarr.json"
        if not self.path.is_dir():
            raise CrosscodersError(f"no activation store at {self.path}; run cache-acts --out {self.path} first")
        if not root_meta.exists():
            raise CrosscodersError(f"{self.path} is not an activation store (no zarr.json); run cache-acts --out {self.path}")
        try:
            attributes = json.loads(root_meta.read_text())["attributes"]
            self.metadata = attributes["crosscoders"]
        except (ValueError, KeyError) as error:
            raise CrosscodersError(f"{root_meta} is damaged or not a crosscoders store ({error!r})") from None
        if self.metadata.get("format") != FORMAT_NAME or self.metadata.get("version") != FORMAT_VERSION:
            raise CrosscodersError(f"{root_meta} holds format {self.metadata.get('format')} v{self.metadata.get('version')}; "
                                   f"this version reads {FORMAT_NAME} v{FORMAT_VERSION}")
        self.dtype: str = self.metadata["dtype"]
        self.d_model: int = self.metadata["model"]["d_model"]
        self.n_hidden_states: int = self.metadata["model"]["n_hidden_states"]
        self.shards = [self._check_shard(p) for p in sorted(self.path.glob(f"{SHARD_PREFIX}*"))]

    def _check_shard(self, folder: Path) -> ShardInfo:
        meta = folder / "zarr.json"
        try:
            attributes = json.loads(meta.read_text())["attributes"]
            info = ShardInfo(folder, attributes["index"], attributes["n_rows"], attributes["next_doc"], attributes["n_pairs_end"])
        except (OSError, ValueError, KeyError) as error:
            raise CrosscodersError(f"shard {meta} is damaged ({error!r}); delete {folder} and re-run cache-acts to rewrite it") from None
        for split in SPLITS:
            for name in ("acts", *ROW_FIELDS):
                self._check_array(folder / split / name, info.n_rows[split])
        return info

    def _check_array(self, folder: Path, rows: int) -> None:
        try:
            shape = json.loads((folder / "zarr.json").read_text())["shape"]
        except (OSError, ValueError, KeyError):
            raise CrosscodersError(f"array {folder} is missing or damaged; delete its shard and re-run cache-acts") from None
        if shape[0] != rows or (folder.name == "acts" and shape[1:] != [self.d_model]):
            raise CrosscodersError(f"array {folder} has shape {shape}, expected {rows} rows of width {self.d_model}")
        if rows and not (folder / "c").is_dir():
            raise CrosscodersError(f"array {folder} lost its data file; delete its shard and re-run cache-acts")

    # Writing ---------------------------------------------------------------------------------

    def write_shard(self, shard: ShardData) -> ShardInfo:
        """Writes a complete shard into staging, then renames it into place: readers never see half a shard."""
        index = len(self.shards)
        staging = self.path / STAGING_DIR / shard_name(index)
        shutil.rmtree(staging, ignore_errors=True)
        attributes = {
            "index": index,
            "n_rows": {split: len(rows) for split, rows in shard.splits.items()},
            "next_doc": shard.next_doc,
            "n_pairs_end": shard.n_pairs_end,
        }
        group = zarr.open_group(staging, mode="w", attributes=attributes)
        for split, rows in shard.splits.items():
            sub = group.create_group(split)
            _create(sub, "acts", rows.acts, acts_codecs())
            for name, dtype in ROW_FIELDS.items():
                _create(sub, name, getattr(rows, name).astype(dtype), small_codecs(), chunk_rows=65536)
        docs = group.create_group("docs")
        _create(docs, "index", shard.doc_index.astype(np.int64), small_codecs(), 65536)
        _create(docs, "split", shard.doc_split.astype(np.uint8), small_codecs(), 65536)
        _create(docs, "offsets", shard.doc_offsets.astype(np.int64), small_codecs(), 65536)
        _create(docs, "tokens", shard.doc_tokens.astype(np.int32), small_codecs(), 65536)
        stats = group.create_group("stats")
        _create(stats, "count", shard.stats_count.astype(np.int64), small_codecs())
        _create(stats, "sum", shard.stats_sum.astype(np.float64), small_codecs())
        _create(stats, "sum_sq_norm", shard.stats_sum_sq_norm.astype(np.float64), small_codecs())
        _fsync_tree(staging)
        final = self.path / shard_name(index)
        os.rename(staging, final)
        info = ShardInfo(final, index, attributes["n_rows"], shard.next_doc, shard.n_pairs_end)
        self.shards.append(info)
        return info

    # Reading ---------------------------------------------------------------------------------

    @property
    def n_pairs(self) -> int:
        return self.shards[-1].n_pairs_end if self.shards else 0

    @property
    def next_doc(self) -> int:
        return self.shards[-1].next_doc if self.shards else 0

    def n_rows(self, split: str) -> int:
        return sum(s.n_rows[split] for s in self.shards)

    def array(self, shard: ShardInfo, name: str) -> zarr.Array:
        """A shard's array by path, e.g. 'train/acts' or 'docs/tokens'."""
        return zarr.open_array(shard.path / name, mode="r")

    def read(self, shard: ShardInfo, name: str, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Rows [start, end) of a shard's array; a damaged chunk is a one-line error naming the file."""
        try:
            return self.array(shard, name)[start:end]
        except (ValueError, RuntimeError, OSError) as error:
            raise CrosscodersError(f"{shard.path / name} is damaged ({error}); delete {shard.path} and re-run cache-acts") from None

    def read_acts(self, shard: ShardInfo, split: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Activations [rows, d_model] in the storage dtype."""
        return from_storage(self.read(shard, f"{split}/acts", start, end), self.dtype)

    def layer_stats_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Totals over all shards of training-row count, sum and squared-norm sum per layer."""
        count = np.zeros(self.n_hidden_states, np.int64)
        total = np.zeros((self.n_hidden_states, self.d_model), np.float64)
        sq = np.zeros(self.n_hidden_states, np.float64)
        for shard in self.shards:
            count += self.read(shard, "stats/count")
            total += self.read(shard, "stats/sum")
            sq += self.read(shard, "stats/sum_sq_norm")
        return count, total, sq

    def shard_documents(self, shard: ShardInfo, split: str | None = None) -> dict[int, np.ndarray]:
        """Token ids by document index of the documents one shard holds, optionally of one split."""
        wanted = None if split is None else SPLITS.index(split)
        index, doc_split = self.read(shard, "docs/index"), self.read(shard, "docs/split")
        offsets, tokens = self.read(shard, "docs/offsets"), self.read(shard, "docs/tokens")
        return {int(doc): tokens[offsets[i] : offsets[i + 1]] for i, doc in enumerate(index) if wanted is None or doc_split[i] == wanted}

    def documents(self, split: str | None = None):
        """Yields (doc_index, token_ids) for the documents the store holds, optionally of one split."""
        for shard in self.shards:
            yield from self.shard_documents(shard, split).items()

    def document_tokens(self) -> dict[int, np.ndarray]:
        """All stored documents' token ids by document index."""
        return dict(self.documents())
