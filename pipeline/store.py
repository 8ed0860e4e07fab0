"""The activation store: a zarr v3 group of immutable, checksummed shards (layout in docs/FORMAT.md)."""

import json
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.metadata import ArrayV3Metadata

from pipeline.chunk_file import ChunkFile, GatheredRows, encode_file
from pipeline.errors import CrosscodersError
from pipeline.storage import Location

FORMAT_VERSION = 3
FORMAT_NAME = "crosscoders-activations"
SHARD_PREFIX = "shard-"
CHUNK_ROWS = 1024  # rows per compressed chunk: the loader's unit of random access (docs/FORMAT.md)
STORAGE_DTYPES = {"bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROW_FIELDS = {"layer": np.int16, "token": np.int32, "doc": np.int64, "pos": np.int32}
SPLITS = ("train", "val")
# Fields that may change between runs into one store: how the model is named (its fingerprint
# must match) and the run's length and where it runs, which change no stored value.
FREE_FIELDS = {"name", "model", "n_tokens", "shard_rows", "out", "device"}
# cache-acts options compared by what they resolve to, the store's own model_dtype, layers and
# layers_per_token: --model-dtype auto is float32 on some CPUs, bf16 elsewhere; --layers all is 0-4 on a 5-state model.
RESOLVED_OPTIONS = {"model_dtype", "layers", "layers_per_token"}
# Fields no option sets, and why one can differ: the store would mix two document streams.
SOURCE_FIELDS = {
    "mined_files": "the default corpus changed since the store was made (packages installed, removed or upgraded, another "
                   "Python, or prompts laid out by another version of this package), so its documents would differ; choose a new --out",
    "dataset_files": "the --dataset files changed since the store was made (rows added, removed or edited, another file of "
                     "the same name, or csv files that another version of this package read otherwise), so its documents "
                     "would differ; restore them or choose a new --out",
}


def acts_codecs() -> tuple:
    """Compression for activations: lz4 over bit-shuffled values (measured in docs/FORMAT.md), then a checksum per chunk."""
    return (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec())


def small_codecs() -> tuple:
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())


def storage_bits(acts: torch.Tensor) -> np.ndarray:
    """The stored bits of a CPU tensor in a storage dtype (bf16 as uint16), as a numpy view: writes go through."""
    if acts.dtype == torch.bfloat16:
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """acts: [rows, d_model] any float dtype -> numpy array holding the storage dtype's bits."""
    return storage_bits(acts.to(STORAGE_DTYPES[dtype]).cpu())


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_storage: numpy bits -> torch tensor in the storage dtype (bit-exact)."""
    if dtype == "bf16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def layer_sums(acts: torch.Tensor, layers: torch.Tensor, n_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The store's statistics of rows (acts: [n, d_model], layers: [n]): count, sum and sum of squared norms per
    layer, in float64 so that shards add up without rounding drift."""
    return tuple(t.cpu().numpy() for t in layer_sum_tensors(acts, layers, n_layers))


def layer_sum_tensors(acts: torch.Tensor, layers: torch.Tensor, n_layers: int, kept: torch.Tensor | None = None,
                      block_rows: int = 16384) -> tuple[torch.Tensor, ...]:
    """layer_sums on acts' device without reading back, of the rows kept ([n] bool; all by default): count [n_layers]
    int64, sum [n_layers, d_model] and sum of squared norms [n_layers] float64. Products with the rows' one-hot
    layers, so a GPU sums in a fixed order (atomic adds would not) and without a data-dependent shape; block_rows rows
    at a time, so float64 copies stay small when a batch records every layer of its tokens."""
    one_hot = layers[None, :] == torch.arange(n_layers, device=layers.device)[:, None]  # [n_layers, n] (F.one_hot reads back)
    if kept is not None:
        one_hot &= kept
    total = torch.zeros(n_layers, acts.shape[1], dtype=torch.float64, device=acts.device)
    sum_sq = torch.zeros(n_layers, dtype=torch.float64, device=acts.device)
    for start in range(0, len(acts), block_rows):
        block, values = one_hot[:, start : start + block_rows].double(), acts[start : start + block_rows].double()
        total += block @ values
        sum_sq += block @ values.square().sum(1)
    return one_hot.sum(1), total, sum_sq


@dataclass
class SplitRows:
    """Rows of one split in one shard: activations and their provenance."""

    acts: np.ndarray | GatheredRows  # [rows, d_model] storage bits
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
    windows: list[int]  # the packing windows this shard completes, in order
    window_pairs: list[int]  # pairs stored from each of them (both splits)


@dataclass(frozen=True)
class ShardInfo:
    name: str  # folder name inside the store
    n_rows: dict  # split -> rows
    windows: tuple[int, ...]
    window_pairs: tuple[int, ...]


def _create(group, name: str, data: np.ndarray | GatheredRows, codecs: tuple, chunk_rows: int = CHUNK_ROWS, location: Location | None = None):
    """One array stored as a single sharded file of checksummed chunks. With the store's location, its file's bytes are
    made here, the chunks compressed in parallel (chunk_file.encode_file, the bytes zarr writes), and written whole;
    zarr writes it where its layout is not one ChunkFile handles."""
    rows = max(len(data), 1)
    chunks = (min(chunk_rows, rows),) + data.shape[1:]
    shard_rows = -(-rows // chunks[0]) * chunks[0]
    array = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=(shard_rows,) + data.shape[1:], compressors=codecs,
        config={"write_empty_chunks": True},  # an all-zero chunk still gets its file, so a lost file is detectable
    )
    if not len(data):
        return
    if location is None or not ChunkFile.handles(array.metadata):
        array[...] = np.asarray(data)
    else:
        location.write_file(encode_file(data, array.metadata), array.path, array.metadata.encode_chunk_key((0,) * len(data.shape)))


def shard_name(first_window: int) -> str:
    """Shards are named by their first packing window: unique across ranks, ordered like the corpus."""
    return f"{SHARD_PREFIX}{first_window:08d}"


def create_or_open(url: str | os.PathLike, metadata: dict, clean: bool = True, sources: bool = True) -> "Store":
    """Opens the store at url (a folder or fsspec URL) for appending, creating it with metadata if new.

    An existing store must have been made with the same metadata (model, layers, dtype, corpus...)
    except FREE_FIELDS, with the cache options in RESOLVED_OPTIONS compared resolved, and SOURCE_FIELDS
    left to check_same_sources when not `sources`. With `clean`, shards a killed run left unfinished
    are deleted; only one process of a multi-process run may clean, before any process writes.
    """
    location = Location(url)
    if location.exists("zarr.json"):
        store = Store(location)
        _check_same_recipe(store, metadata if sources else {k: v for k, v in metadata.items() if k not in SOURCE_FIELDS})
        if clean:
            for name in store.unfinished:
                location.remove(name)
            store.unfinished = []
        return store
    if location.fs.isfile(location.root) or any(name != ".gitkeep" for name in location.entries()):
        raise CrosscodersError(f"{location} exists and is not an activation store; choose an empty or new --out")
    attributes = {"crosscoders": {"format": FORMAT_NAME, "version": FORMAT_VERSION, **metadata}}
    try:
        zarr.create_group(store=location.zarr_store(), attributes=json.loads(json.dumps(attributes)))
    except OSError as error:  # a parent that is a file, no permission, a missing bucket
        raise CrosscodersError(f"cannot create a store at {location}: {error.strerror or error}; choose another --out") from None
    return Store(location)


def recorded_metadata(url: str | os.PathLike) -> dict | None:
    """What the store at url records of how it was made, or None where none is readable (create_or_open then says why)."""
    location = Location(url)
    try:
        return location.read_json("zarr.json")["attributes"]["crosscoders"] if location.exists("zarr.json") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_same_sources(store: "Store", metadata: dict) -> None:
    """Refuses to extend a store whose documents came from other files than metadata's (SOURCE_FIELDS)."""
    _check_same_recipe(store, {key: value for key, value in metadata.items() if key in SOURCE_FIELDS})


def _check_same_recipe(store: "Store", metadata: dict) -> None:
    existing = store.metadata
    for key, value in metadata.items():
        if key in SOURCE_FIELDS and key not in existing:  # a store made before the field was recorded
            continue
        old, new = existing.get(key), json.loads(json.dumps(value))
        if isinstance(old, dict) and isinstance(new, dict):
            free = FREE_FIELDS | RESOLVED_OPTIONS if key == "cache" else FREE_FIELDS
            if key == "corpus" and existing.get("dataset_files"):  # a local --dataset: not its path as typed, from some folder,
                free = free | {"dataset"}  # but its files' fingerprint tells (check_same_sources)
            old, new = ({k: v for k, v in d.items() if k not in free} for d in (old, new))
        if old == new:
            continue
        if key in SOURCE_FIELDS:
            raise CrosscodersError(f"{store.location.path('zarr.json')}: {SOURCE_FIELDS[key]}")
        raise CrosscodersError(
            f"{store.location.path('zarr.json')} was made with a different {key}{_first_difference(old, new)}; "
            "re-run with the same options or choose another --out"
        )


def _first_difference(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return f" ({k}: store has {old.get(k)!r}, this run has {new.get(k)!r})"
    return f" (store has {old!r}, this run has {new!r})"


def _files_by_folder(files: list[str]) -> dict[str, set[str]]:
    """Paths in the store grouped by their top folder (a shard's name)."""
    grouped: dict[str, set[str]] = {}
    for path in files:
        grouped.setdefault(path.split("/", 1)[0], set()).add(path)
    return grouped


def _lost_array(shard: ShardInfo, files: set[str]) -> str | None:
    """The first array of a committed shard missing from `files` (its paths in the store), or None.

    An array that holds rows must have a data file: zarr would read a lost one as zeros.
    """
    with_data = {f.split("/c/")[0] for f in files if "/c/" in f}
    for array, has_rows in _shard_arrays(shard).items():
        folder = f"{shard.name}/{array}"
        if f"{folder}/zarr.json" not in files or (has_rows and folder not in with_data):
            return folder
    return None


def _shard_arrays(shard: ShardInfo) -> dict[str, bool]:
    """A committed shard's arrays, each with whether it holds rows."""
    has_rows = sum(shard.n_rows.values()) > 0  # rows are tokens of stored documents
    arrays = {f"{split}/{array}": shard.n_rows[split] > 0 for split in SPLITS for array in ("acts", *ROW_FIELDS)}
    arrays.update({"docs/index": has_rows, "docs/split": has_rows, "docs/tokens": has_rows, "docs/offsets": True})
    arrays.update({f"stats/{name}": True for name in ("count", "sum", "sum_sq_norm")})
    return arrays


def spread_order(n: int) -> list[int]:
    """0 .. n-1 in bit-reversed order (van der Corput's), each prefix spread evenly over them: 0, n/2, n/4, 3n/4, ..."""
    bits = max(n - 1, 0).bit_length()
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def proportional_quota(available: np.ndarray, n_rows: int | None) -> np.ndarray:
    """n_rows (all when None or more than there are) apportioned over layers in proportion to their available rows,
    [n_layers] int64, by largest remainder: the quotas sum to n_rows exactly and none exceeds what its layer has."""
    counts = [int(count) for count in available]  # Python ints: count * n_rows may pass 2**63
    total = sum(counts)
    if n_rows is None or n_rows >= total:
        return np.array(counts, np.int64)
    quota = np.array([count * n_rows // total for count in counts], np.int64)
    remainder = np.array([count * n_rows % total for count in counts], np.float64)  # ties go to the lower layer
    quota[np.argsort(-remainder, kind="stable")[: n_rows - int(quota.sum())]] += 1
    return quota


def _metadata_problem(metadata: dict) -> str | None:
    """What is missing or malformed among the fields every reader of a store relies on; None when all are sound."""
    model, layers = metadata.get("model"), metadata.get("layers")
    if metadata.get("dtype") not in STORAGE_DTYPES:
        return f"dtype {metadata.get('dtype')!r} is none of {sorted(STORAGE_DTYPES)}"
    if not isinstance(model, dict) or not all(isinstance(model.get(key), str) for key in ("name", "fingerprint")):
        return "its model entry lacks a name or fingerprint"
    if not all(isinstance(model.get(key), int) and model[key] > 0 for key in ("d_model", "n_hidden_states")):
        return "its model entry lacks a positive d_model or n_hidden_states"
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and 0 <= x < model["n_hidden_states"] for x in layers):
        return f"its layers {layers!r} are not hidden states of the model"
    return None


class Store:
    """A readable view of a store: metadata, complete shards, statistics and rows."""

    def __init__(self, url: "str | os.PathLike | Location"):
        self.location = url if isinstance(url, Location) else Location(url)
        root_meta = self.location.path("zarr.json")
        try:
            attributes = self.location.read_json("zarr.json")["attributes"]
        except (FileNotFoundError, NotADirectoryError):
            if not self.location.entries():
                raise CrosscodersError(f"no activation store at {self.location}; run cache-acts --out {self.location} first") from None
            if any(name.startswith(SHARD_PREFIX) for name in self.location.entries()):  # a store that lost its record
                raise CrosscodersError(f"{root_meta} is missing: the store's record of its model and recipe; restore it, "
                                       f"or delete {self.location} and re-run cache-acts") from None
            raise CrosscodersError(f"{self.location} is not an activation store (no zarr.json); pass the folder cache-acts "
                                   "wrote (its --out)") from None
        except OSError as error:  # no permission, a network file system's hiccup
            raise CrosscodersError(f"cannot read {root_meta} ({error.strerror or error}); check its permissions and the disk") from None
        except (ValueError, KeyError, TypeError) as error:  # not JSON, or JSON of another shape
            raise CrosscodersError(f"{root_meta} is damaged or not a crosscoders store ({error!r}); restore it, or "
                                   "re-cache into a new --out") from None
        self.metadata = attributes.get("crosscoders", {}) if isinstance(attributes, dict) else None
        if not isinstance(self.metadata, dict):
            raise CrosscodersError(f"{root_meta} is damaged or not a crosscoders store (its attributes are not a record); "
                                   "restore it, or re-cache into a new --out")
        if "n_rows" in attributes:  # a shard's commit
            raise CrosscodersError(f"{self.location} is one shard of an activation store; pass the store, the folder above it")
        if self.metadata.get("format") != FORMAT_NAME or self.metadata.get("version") != FORMAT_VERSION:
            raise CrosscodersError(f"{root_meta} holds format {self.metadata.get('format')} v{self.metadata.get('version')}; "
                                   f"this version reads {FORMAT_NAME} v{FORMAT_VERSION}: re-cache into a new --out")
        if problem := _metadata_problem(self.metadata):
            raise CrosscodersError(f"{root_meta} is damaged ({problem}); restore it, or re-cache into a new --out")
        self.dtype: str = self.metadata["dtype"]
        self.d_model: int = self.metadata["model"]["d_model"]
        self.n_hidden_states: int = self.metadata["model"]["n_hidden_states"]
        self.zarr_store = self.location.zarr_store()
        self._arrays: dict[str, zarr.Array] = {}
        self._chunk_files: dict[str, ChunkFile | None] = {}  # local arrays' shard files, read without zarr
        files_of = _files_by_folder(self.location.files())
        self.shards: list[ShardInfo] = []
        self._shards_lock = threading.Lock()
        self.unfinished: list[str] = []  # shard folders without their commit: being written, or left by a killed run
        for name in sorted(n for n in self.location.entries() if n.startswith(SHARD_PREFIX)):
            path = self.location.path(name)
            if self.location.is_local and os.path.islink(path) and not os.path.exists(path):  # else unfinished, and cleared
                raise CrosscodersError(f"{path} links to {os.readlink(path)}, which is missing; mount it, or remove the link "
                                       "and run cache-acts to cache its rows again")
            info = self._read_shard(name, files_of.get(name, set()))
            if info is None:
                self.unfinished.append(name)
            else:
                self.shards.append(info)

    @property
    def url(self) -> str:
        return self.location.url

    def _read_shard(self, name: str, files: set[str]) -> ShardInfo | None:
        """A shard's bookkeeping, or None while it lacks its commit (the attributes, written last); `files` are its paths."""
        if f"{name}/zarr.json" not in files:
            return None
        try:
            attributes = self.location.read_json(name, "zarr.json").get("attributes", {})
            if "n_rows" not in attributes:
                return None
            info = ShardInfo(name, attributes["n_rows"], tuple(attributes["windows"]), tuple(attributes["window_pairs"]))
        except FileNotFoundError:  # listed, then removed: an unfinished shard that a starting cache-acts cleared
            return None
        except OSError as error:  # no permission, a network file system's hiccup: perhaps intact, so not to be deleted
            raise CrosscodersError(f"cannot read {self.location.path(name, 'zarr.json')} ({error.strerror or error}); "
                                   "check its permissions and the disk") from None
        except (ValueError, KeyError, AttributeError) as error:
            raise CrosscodersError(f"shard {self.location.path(name, 'zarr.json')} is damaged ({error!r}); "
                                   f"delete {self.location.path(name)} and re-run cache-acts to rewrite it") from None
        # The store's listing may predate this shard's commit (a writer runs alongside): list it again before calling it damaged.
        lost = _lost_array(info, files) and _lost_array(info, set(self.location.files(name)))
        if lost:
            raise CrosscodersError(f"array {self.location.path(lost)} lost its files; delete {self.location.path(name)} and re-run cache-acts")
        return info

    # Writing ---------------------------------------------------------------------------------

    def write_shard(self, shard: ShardData) -> ShardInfo:
        """Writes a complete shard, then commits it by writing its attributes: readers skip a shard
        until then, so none ever sees half of one. Works the same on a local disk and object stores."""
        name = shard_name(shard.windows[0])
        self.location.remove(name)  # what a killed attempt at this shard left
        group = zarr.open_group(store=self.zarr_store, path=name, mode="w")
        for split, rows in shard.splits.items():
            sub = group.create_group(split)
            _create(sub, "acts", rows.acts, acts_codecs(), location=self.location)
            for field, dtype in ROW_FIELDS.items():
                _create(sub, field, getattr(rows, field).astype(dtype), small_codecs(), chunk_rows=65536)
        docs = group.create_group("docs")
        _create(docs, "index", shard.doc_index.astype(np.int64), small_codecs(), 65536)
        _create(docs, "split", shard.doc_split.astype(np.uint8), small_codecs(), 65536)
        _create(docs, "offsets", shard.doc_offsets.astype(np.int64), small_codecs(), 65536)
        _create(docs, "tokens", shard.doc_tokens.astype(np.int32), small_codecs(), 65536)
        stats = group.create_group("stats")
        _create(stats, "count", shard.stats_count.astype(np.int64), small_codecs())
        _create(stats, "sum", shard.stats_sum.astype(np.float64), small_codecs())
        _create(stats, "sum_sq_norm", shard.stats_sum_sq_norm.astype(np.float64), small_codecs())
        self.location.make_durable(name)
        info = ShardInfo(name, {split: len(rows) for split, rows in shard.splits.items()},
                         tuple(int(w) for w in shard.windows), tuple(int(p) for p in shard.window_pairs))
        group.update_attributes({"n_rows": info.n_rows, "windows": list(info.windows), "window_pairs": list(info.window_pairs)})
        with self._shards_lock:  # shards are written from several threads (shard_writer)
            self.shards = sorted([*self.shards, info], key=lambda s: s.name)
        return info

    # Reading ---------------------------------------------------------------------------------

    def shard_rows(self) -> list[list]:
        """[name, training rows, held-out rows] of each shard, as a training run's data.json records them."""
        return [[s.name, s.n_rows["train"], s.n_rows["val"]] for s in self.shards]

    def keep_shards(self, recorded: list[list]) -> None:
        """Narrows the store to the shards a training run started on (shard_rows as its data.json records them), so
        that a resumed run reads the rows it read, however the store grew since."""
        here = {s.name: s for s in self.shards}
        for name, n_train, n_val in recorded:
            if name not in here:
                raise CrosscodersError(f"{self.url} no longer holds {name}, which the run was trained on; resume on "
                                       "the store it was trained on")
            if (here[name].n_rows["train"], here[name].n_rows["val"]) != (n_train, n_val):
                raise CrosscodersError(f"{self.location.path(name)} holds other rows than the run was trained on; resume "
                                       "on the store it was trained on")
        self.shards = [here[name] for name, _, _ in recorded]

    @property
    def n_pairs(self) -> int:
        return sum(sum(s.window_pairs) for s in self.shards)

    def window_pairs(self) -> dict[int, int]:
        """Pairs stored from each completed packing window."""
        return {w: pairs for s in self.shards for w, pairs in zip(s.windows, s.window_pairs)}

    def n_rows(self, split: str) -> int:
        return sum(s.n_rows[split] for s in self.shards)

    def array(self, shard: ShardInfo, name: str) -> zarr.Array:
        """A shard's array by path, e.g. 'train/acts' or 'docs/tokens' (opened once, then reused)."""
        key = f"{shard.name}/{name}"
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(store=self.zarr_store, path=key, mode="r")
        return self._arrays[key]

    def chunk_file(self, shard: ShardInfo, name: str) -> ChunkFile | None:
        """The fast reader of a shard's array on a local disk (see pipeline/chunk_file.py), None elsewhere."""
        key = f"{shard.name}/{name}"
        if key not in self._chunk_files:
            local = self.location.is_local
            self._chunk_files[key] = ChunkFile.of(self._array_metadata(key), self.location.path(key)) if local else None
        return self._chunk_files[key]

    def _array_metadata(self, key: str) -> ArrayV3Metadata:
        """An array's zarr.json, parsed; ValueError if it is not an array's."""
        record = self.location.read_json(key, "zarr.json")
        try:
            return ArrayV3Metadata.from_dict(record)
        except Exception as error:  # zarr's parsing raises what it meets: KeyError, TypeError, AttributeError, ZeroDivisionError
            raise ValueError(f"zarr.json is not an array's: {error!r}") from None

    def read(self, shard: ShardInfo, name: str, start: int | None = None, end: int | None = None) -> np.ndarray:
        """Rows [start, end) of a shard's array; a damaged chunk is a one-line error naming the file."""
        try:
            chunk_file = self.chunk_file(shard, name)
            if chunk_file is None:
                return self.array(shard, name)[start:end]
            return chunk_file.read(*slice(start, end).indices(chunk_file.shape[0])[:2])
        except (ValueError, RuntimeError, KeyError, FileNotFoundError) as error:  # a failed checksum or decode, a lost file
            where = self.location.path(shard.name)
            raise CrosscodersError(f"{where}/{name} is damaged ({error}); delete {where} and re-run cache-acts") from None
        except OSError as error:  # no permission, a network file system's hiccup: perhaps intact, so not to be deleted
            raise CrosscodersError(f"cannot read {self.location.path(shard.name, name)} ({error.strerror or error}); "
                                   "check its permissions and the disk") from None

    def read_acts(self, shard: ShardInfo, split: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Activations [rows, d_model] in the storage dtype."""
        return from_storage(self.read(shard, f"{split}/acts", start, end), self.dtype)

    def kept_layers(self, layers: list[int] | None) -> list[int] | None:
        """layers as a row filter: None (keep every row) when they cover every layer the store holds."""
        return None if layers is None or set(self.metadata["layers"]) <= set(layers) else list(layers)

    def rows_of_layers(self, split: str, n_rows: int | None = None, layers: list[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per shard, (offsets, layer ids) of n_rows rows of the split (all when None) of the given layers (all when
        None): each layer gives as many rows as its share of the split's rows, each shard its first ones, the shards
        taken in spread_order, so that a few shards' rows come from all over the corpus, not from its first documents
        alone (a corpus may be grouped by language or source), while each shard is still read from its start.

        Not simply the split's first n_rows rows: a forward batch's rows are sorted by layer, so those could hold
        none of the late layers (with --layers-per-token all, whenever one batch holds more than n_rows rows).
        """
        layers, n_layers = self.kept_layers(layers), self.n_hidden_states
        held_out_ids = {}  # shard name -> the held-out split's layer ids, read once for both passes
        if split == "train":  # the shards' statistics count their training rows by layer
            available = sum((self.read(shard, "stats/count") for shard in self.shards), np.zeros(n_layers, np.int64))
        else:
            held_out_ids = {shard.name: self.read(shard, f"{split}/layer") for shard in self.shards}
            available = sum((np.bincount(ids, minlength=n_layers) for ids in held_out_ids.values()), np.zeros(n_layers, np.int64))
        if layers is not None:
            available = np.where(np.isin(np.arange(n_layers), layers), available, 0)
        quota = proportional_quota(available, n_rows)  # [n_layers] rows still to take of each layer
        picked = [(np.zeros(0, np.int64), np.zeros(0, np.int64))] * len(self.shards)
        for number in spread_order(len(self.shards)):
            shard = self.shards[number]
            if quota.any() and shard.n_rows[split]:
                ids = held_out_ids[shard.name] if held_out_ids else self.read(shard, f"{split}/layer")
                rows = np.sort(np.concatenate([np.flatnonzero(ids == layer)[: quota[layer]] for layer in np.flatnonzero(quota)]))
                layer_ids = ids[rows]
                picked[number] = (rows, layer_ids)
                quota -= np.bincount(layer_ids, minlength=n_layers)
        return picked

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

    def spread_documents(self, split: str, n: int) -> list[tuple[int, np.ndarray]]:
        """(doc_index, token_ids) of n of the split's documents (all, if it holds no more), evenly spaced in corpus
        order, the middle one of each n-th of them: not its first n, which a corpus grouped by language or source may
        give from one group alone, nor the store's first, as a packing window's documents are stored sorted by length."""
        wanted = SPLITS.index(split)
        held = sorted((index, shard_number) for shard_number, shard in enumerate(self.shards)
                      for index, doc_split in zip(self.read(shard, "docs/index").tolist(), self.read(shard, "docs/split").tolist())
                      if doc_split == wanted)
        n = min(n, len(held))
        chosen = [held[(2 * i + 1) * len(held) // (2 * n)] for i in range(n)]
        documents = {number: self.shard_documents(self.shards[number], split) for number in sorted({number for _, number in chosen})}
        return [(index, documents[number][index]) for index, number in chosen]

    def document_tokens(self) -> dict[int, np.ndarray]:
        """All stored documents' token ids by document index."""
        return dict(self.documents())
