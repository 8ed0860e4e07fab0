"""The store on its own: bit-exact dtypes, committed shards, damage detection, plain-zarr readability, fsspec URLs."""

import json
import os
import re
import shutil
import uuid

import numpy as np
import pytest
import torch
import zarr

from pipeline.chunk_file import ChunkFile
from pipeline.errors import CrosscodersError
from pipeline.storage import Location
from pipeline.store import ShardData, SplitRows, Store, create_or_open, from_storage, layer_sum_tensors, proportional_quota, spread_order, to_storage

D_MODEL, N_STATES = 16, 3
METADATA = {"model": {"name": "m", "fingerprint": "f", "d_model": D_MODEL, "n_hidden_states": N_STATES}, "dtype": "bf16", "layers": [0, 1, 2]}


def make_shard(rows: int, seed: int, window: int) -> ShardData:
    rng = np.random.default_rng(seed)
    acts = torch.from_numpy(rng.normal(size=(rows, D_MODEL)).astype(np.float32) * 10)

    def split_rows(n: int, offset: int) -> SplitRows:
        return SplitRows(to_storage(acts[offset : offset + n], "bf16"), rng.integers(0, N_STATES, n), rng.integers(0, 100, n),
                         np.full(n, window), np.arange(1, n + 1))

    splits = {"train": split_rows(rows - 2, 0), "val": split_rows(2, rows - 2)}
    return ShardData(
        splits=splits,
        doc_index=np.array([window]), doc_split=np.array([0]), doc_offsets=np.array([0, rows]), doc_tokens=np.arange(rows),
        stats_count=np.bincount(splits["train"].layer, minlength=N_STATES), stats_sum=np.zeros((N_STATES, D_MODEL)),
        stats_sum_sq_norm=np.zeros(N_STATES), windows=[window], window_pairs=[rows],
    )


def write_store(url) -> Store:
    store = create_or_open(url, METADATA)
    store.write_shard(make_shard(900, 1, 4))  # written out of corpus order, as another rank may
    store.write_shard(make_shard(1500, 0, 2))
    return Store(url)


@pytest.fixture
def store(tmp_path) -> Store:
    return write_store(tmp_path / "s")


@pytest.fixture(params=["local", "file-url", "memory"])
def any_store(request, tmp_path) -> Store:
    url = {"local": str(tmp_path / "s"), "file-url": f"file://{tmp_path}/s", "memory": f"memory://stores/{uuid.uuid4().hex}"}[request.param]
    return write_store(url)


@pytest.mark.parametrize("dtype", ["bf16", "float16", "float32"])
def test_storage_dtypes_round_trip_bit_exactly(dtype):
    acts = torch.randn(64, 8) * 100
    stored = from_storage(to_storage(acts, dtype), dtype)
    expected = acts.to(stored.dtype)
    assert stored.dtype != torch.float32 or dtype == "float32"
    assert torch.equal(stored.view(torch.int16 if stored.element_size() == 2 else torch.int32),
                       expected.view(torch.int16 if expected.element_size() == 2 else torch.int32))


def test_shards_are_listed_in_corpus_order_with_their_bookkeeping(any_store):
    assert [s.name for s in any_store.shards] == ["shard-00000002", "shard-00000004"]
    assert any_store.n_pairs == 2400 and any_store.window_pairs() == {2: 1500, 4: 900}
    assert any_store.n_rows("train") == 1498 + 898 and any_store.n_rows("val") == 4


def test_rows_read_back_exactly(any_store):
    expected = make_shard(900, 1, 4).splits["train"]
    shard = any_store.shards[1]
    assert np.array_equal(any_store.read(shard, "train/acts"), expected.acts)
    assert np.array_equal(any_store.read(shard, "train/layer", 10, 20), expected.layer[10:20])


def test_plain_zarr_reads_the_store_as_documented(any_store):
    root = zarr.open_group(any_store.url, mode="r")
    assert root.attrs["crosscoders"]["dtype"] == "bf16"
    bits = root["shard-00000002/train/acts"][:]
    acts = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    assert acts.shape == (1498, D_MODEL)
    assert torch.equal(acts, any_store.read_acts(any_store.shards[0], "train"))


def test_a_shard_killed_before_its_commit_is_invisible_and_removed_by_the_next_run(any_store, monkeypatch):
    def killed(self, *parts):
        raise KeyboardInterrupt

    monkeypatch.setattr(Location, "make_durable", killed)
    with pytest.raises(KeyboardInterrupt):
        any_store.write_shard(make_shard(700, 2, 6))
    monkeypatch.undo()
    location = Location(any_store.url)
    assert location.exists("shard-00000006", "train", "acts", "zarr.json")  # the data went out, the commit did not
    reopened = Store(any_store.url)
    assert [s.name for s in reopened.shards] == ["shard-00000002", "shard-00000004"] and reopened.unfinished == ["shard-00000006"]
    create_or_open(any_store.url, METADATA, clean=False)  # another rank of the run: leaves it
    assert location.exists("shard-00000006")
    create_or_open(any_store.url, METADATA)
    assert not location.exists("shard-00000006")
    reopened.write_shard(make_shard(700, 2, 6))
    assert Store(any_store.url).n_pairs == 3100


@pytest.mark.parametrize("content", ["[1, 2]", '{"zarr_format": 3}', "{broken", "null"])
def test_an_arrays_damaged_record_is_a_one_line_error_naming_it(tmp_path, content):
    store = write_store(tmp_path / "s")
    (tmp_path / "s" / "shard-00000002" / "stats" / "count" / "zarr.json").write_text(content)
    with pytest.raises(CrosscodersError, match=r"shard-00000002/stats/count is damaged \(.*\); delete .*shard-00000002 and re-run"):
        Store(store.url).layer_stats_sums()


def test_a_damaged_chunk_is_a_one_line_error_naming_the_file(store):
    data_file = store.location.fs.find(store.location.path("shard-00000002", "train", "acts", "c"))[0]
    with open(data_file, "r+b") as handle:
        raw = bytearray(handle.read())
        raw[len(raw) // 2] ^= 0xFF
        handle.seek(0)
        handle.write(bytes(raw))
    with pytest.raises(CrosscodersError, match=r"shard-00000002/train/acts is damaged") as error:
        Store(store.url).read_acts(Store(store.url).shards[0], "train")
    assert "\n" not in str(error.value)


def test_a_missing_data_file_is_caught_on_open(store):
    import shutil

    shutil.rmtree(store.location.path("shard-00000004", "val", "acts", "c"))
    with pytest.raises(CrosscodersError, match=r"shard-00000004/val/acts lost its files"):
        Store(store.url)


@pytest.mark.parametrize("array", ["docs/tokens", "docs/offsets", "stats/sum"])
def test_a_lost_documents_or_statistics_file_is_caught_on_open(any_store, array):
    location = any_store.location
    for path in location.fs.find(location.path("shard-00000002", *array.split("/"), "c")):
        location.fs.rm(path)
    with pytest.raises(CrosscodersError, match=f"shard-00000002/{array} lost its files"):
        Store(any_store.url)


def test_a_shard_committed_while_the_store_is_listed_opens(any_store, monkeypatch):
    """A reader lists the store while a writer is at a shard, which it commits before the reader reads its commit."""
    any_store.write_shard(make_shard(700, 2, 6))
    listing = Location.files

    def listed_before_the_commit(self, *parts):  # the store's listing then held the new shard's group, not its arrays
        files = listing(self, *parts)
        return files if parts else [f for f in files if not f.startswith("shard-00000006/") or f == "shard-00000006/zarr.json"]

    monkeypatch.setattr(Location, "files", listed_before_the_commit)
    assert [s.name for s in Store(any_store.url).shards] == ["shard-00000002", "shard-00000004", "shard-00000006"]


def test_a_truncated_shard_header_is_caught_on_open(store):
    with open(store.location.path("shard-00000004", "zarr.json"), "w") as handle:
        handle.write('{"attributes": {')
    with pytest.raises(CrosscodersError, match=r"shard .*shard-00000004/zarr.json is damaged"):
        Store(store.url)


@pytest.mark.parametrize("damage, message", [
    (lambda meta: meta["attributes"]["crosscoders"].pop("model"), "its model entry lacks a name or fingerprint"),
    (lambda meta: meta["attributes"]["crosscoders"]["model"].pop("d_model"), "lacks a positive d_model or n_hidden_states"),
    (lambda meta: meta["attributes"]["crosscoders"].pop("layers"), "its layers None are not hidden states of the model"),
    (lambda meta: meta["attributes"]["crosscoders"].update(layers=[0, 7]), "its layers [0, 7] are not hidden states"),
    (lambda meta: meta["attributes"]["crosscoders"].update(dtype="int8"), "dtype 'int8' is none of"),
    (lambda meta: meta["attributes"].update(crosscoders=5), "is damaged or not a crosscoders store (its attributes are not a record)"),
])
def test_a_store_record_missing_a_field_is_a_one_line_error(store, damage, message):
    """A zarr.json that parses but lacks a field gave a KeyError from deep inside train-sae."""
    path = store.location.path("zarr.json")
    with open(path) as handle:
        meta = json.load(handle)
    damage(meta)
    with open(path, "w") as handle:
        json.dump(meta, handle)
    with pytest.raises(CrosscodersError, match=re.escape(message)) as error:
        Store(store.url)
    assert "\n" not in str(error.value)


def test_opening_something_that_is_not_a_store(tmp_path):
    with pytest.raises(CrosscodersError, match="no activation store at"):
        Store(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CrosscodersError, match=r"other is not an activation store \(no zarr.json\); pass the folder cache-acts wrote"):
        Store(tmp_path / "other")
    with pytest.raises(CrosscodersError, match="exists and is not an activation store"):
        create_or_open(tmp_path / "other", METADATA)
    with pytest.raises(CrosscodersError, match="exists and is not an activation store"):
        create_or_open(tmp_path / "other" / "notes.txt", METADATA)
    with pytest.raises(CrosscodersError, match=r"cannot create a store at .*notes.txt/store: Not a directory; choose another --out$"):
        create_or_open(tmp_path / "other" / "notes.txt" / "store", METADATA)


def test_another_models_metadata_is_refused(store):
    other = json.loads(json.dumps(METADATA))
    other["model"]["fingerprint"] = "g"
    with pytest.raises(CrosscodersError, match=r"different model \(fingerprint: store has 'f', this run has 'g'\)"):
        create_or_open(store.url, other)
    renamed = json.loads(json.dumps(METADATA))
    renamed["model"]["name"] = "/elsewhere/same-model"
    create_or_open(store.url, renamed)


def test_the_same_model_under_another_name_may_extend_a_store(tmp_path):
    recipe = {**json.loads(json.dumps(METADATA)), "cache": {"model": "qwen2.5-coder-0.5b-instruct", "n_tokens": 100, "skip_special": True}}
    create_or_open(tmp_path / "t", recipe)
    renamed = {**recipe, "cache": {**recipe["cache"], "model": "/models/qwen-0.5b", "n_tokens": 200}}
    create_or_open(tmp_path / "t", renamed)
    with pytest.raises(CrosscodersError, match=r"different cache \(skip_special: store has True, this run has False\)"):
        create_or_open(tmp_path / "t", {**renamed, "cache": {**renamed["cache"], "skip_special": False}})


def test_options_are_compared_by_what_they_resolve_to(tmp_path):
    """A store cached with --model-dtype auto on a CPU without bf16 instructions (float32) is extended on a GPU with --model-dtype float32."""
    cache = {"model_dtype": "auto", "layers": "all", "layers_per_token": "3", "dtype": "bf16"}
    recipe = {**json.loads(json.dumps(METADATA)), "model_dtype": "float32", "layers_per_token": 3, "cache": cache}
    create_or_open(tmp_path / "t", recipe)
    create_or_open(tmp_path / "t", {**recipe, "cache": {**cache, "model_dtype": "float32", "layers": "0-2", "layers_per_token": "all"}})
    with pytest.raises(CrosscodersError, match=r"different model_dtype \(store has 'float32', this run has 'bfloat16'\)"):
        create_or_open(tmp_path / "t", {**recipe, "model_dtype": "bfloat16"})
    with pytest.raises(CrosscodersError, match=r"different layers \(store has \[0, 1, 2\], this run has \[1, 2\]\)"):
        create_or_open(tmp_path / "t", {**recipe, "layers": [1, 2], "cache": {**cache, "layers": "1-2"}})
    with pytest.raises(CrosscodersError, match=r"different cache \(dtype: store has 'bf16', this run has 'float16'\)"):
        create_or_open(tmp_path / "t", {**recipe, "cache": {**cache, "dtype": "float16"}})


def test_changed_mined_files_are_refused_unless_the_store_predates_their_record(tmp_path):
    create_or_open(tmp_path / "old", METADATA)  # made before mined_files was recorded: nothing to compare with
    create_or_open(tmp_path / "old", {**METADATA, "mined_files": "sha256:abc"})
    create_or_open(tmp_path / "new", {**METADATA, "mined_files": "sha256:abc"})
    with pytest.raises(CrosscodersError, match="zarr.json: the default corpus changed since the store was made"):
        create_or_open(tmp_path / "new", {**METADATA, "mined_files": "sha256:def"})


def test_a_shard_with_no_rows_opens(tmp_path):
    store = create_or_open(tmp_path / "z", METADATA)
    shard = make_shard(10, 0, 0)
    for split, r in shard.splits.items():
        shard.splits[split] = SplitRows(r.acts[:0], r.layer[:0], r.token[:0], r.doc[:0], r.pos[:0])
    shard.doc_index, shard.doc_split, shard.doc_offsets, shard.doc_tokens = (np.zeros(0, int),) * 2 + (np.array([0]), np.zeros(0, int))
    shard.window_pairs = [0]
    store.write_shard(shard)
    assert [s.name for s in Store(tmp_path / "z").shards] == ["shard-00000000"]


def test_documents_read_back_by_split(tmp_path):
    store = create_or_open(tmp_path / "d", METADATA)
    shard = make_shard(10, 0, 0)
    shard.doc_index, shard.doc_split = np.array([3, 5, 8]), np.array([0, 1, 0])
    shard.doc_offsets, shard.doc_tokens = np.array([0, 2, 5, 6]), np.array([10, 11, 20, 21, 22, 30])
    store.write_shard(shard)
    store = Store(tmp_path / "d")
    assert {k: v.tolist() for k, v in store.documents()} == {3: [10, 11], 5: [20, 21, 22], 8: [30]}
    assert [k for k, _ in store.documents("val")] == [5] and [k for k, _ in store.documents("train")] == [3, 8]


def test_row_fields_have_the_documented_dtypes(tmp_path):
    store = write_store(tmp_path / "s")
    got = {f: store.read(store.shards[0], f"train/{f}").dtype for f in ("layer", "token", "doc", "pos")}
    assert got == {"layer": np.int16, "token": np.int32, "doc": np.int64, "pos": np.int32}


def test_a_shard_without_val_rows_opens(tmp_path):
    store = create_or_open(tmp_path / "v", METADATA)
    shard = make_shard(10, 0, 0)
    v = shard.splits["val"]
    shard.splits["val"] = SplitRows(v.acts[:0], v.layer[:0], v.token[:0], v.doc[:0], v.pos[:0])
    store.write_shard(shard)
    assert Store(tmp_path / "v").n_rows("val") == 0


def test_another_format_version_is_refused(tmp_path):
    write_store(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "zarr.json").read_text())
    meta["attributes"]["crosscoders"]["version"] = 2
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CrosscodersError, match="re-cache"):
        Store(tmp_path / "s")


def test_a_folder_holding_only_gitkeep_becomes_a_store(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".gitkeep").write_text("")
    assert create_or_open(tmp_path / "shards", METADATA).shards == []


def test_a_chunk_of_another_size_is_refused(tmp_path):
    store = write_store(tmp_path / "s")
    good = store.chunk_file(store.shards[0], "train/acts")
    wrong = ChunkFile(good.path, (good.shape[0], good.shape[1] * 2), good.chunk_rows, len(good.index), good.dtype)
    with pytest.raises(ValueError, match="does not hold"):
        wrong.chunk(0)


@pytest.mark.parametrize("block_rows", [16384, 7])  # one block, or many with a last short one
def test_layer_sums_are_the_kept_rows_count_sum_and_sum_of_squared_norms_per_layer(block_rows):
    generator = torch.Generator().manual_seed(0)
    acts = (10 * torch.randn(50, 6, generator=generator)).bfloat16()
    layers, kept = torch.randint(0, 4, (50,), generator=generator), torch.rand(50, generator=generator) > 0.3
    count, total, sum_sq = layer_sum_tensors(acts, layers, 5, kept, block_rows)
    for layer in range(5):
        rows = acts[kept & (layers == layer)].double()
        assert count[layer] == len(rows)
        torch.testing.assert_close(total[layer], rows.sum(0), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(sum_sq[layer], rows.square().sum(), rtol=1e-12, atol=1e-9)
    assert count[4] == 0 and not total[4].any()


def test_proportional_quota_sums_to_the_rows_asked_for_and_never_exceeds_a_layer():
    rng = np.random.default_rng(0)
    for _ in range(200):
        available = rng.integers(0, 50, rng.integers(1, 30)) * rng.integers(0, 2)  # all empty at times
        n_rows = int(rng.integers(0, available.sum() + 5))
        quota = proportional_quota(available, n_rows)
        assert quota.sum() == min(n_rows, available.sum()) and (quota <= available).all() and (quota >= 0).all()
        exact = available * min(n_rows, available.sum()) / max(available.sum(), 1)
        assert (np.abs(quota - exact) < 1).all()  # each layer its share, rounded
    assert proportional_quota(np.array([5, 0, 7]), None).tolist() == [5, 0, 7]
    assert proportional_quota(np.array([10**12, 3 * 10**12]), 4 * 10**12 - 1).tolist() == [10**12, 3 * 10**12 - 1]  # no overflow


def test_every_layer_gives_its_share_of_rows_even_when_rows_are_sorted_by_layer(tmp_path):
    """A forward batch's rows are sorted by layer: the split's first rows would be the early layers' alone."""
    store = create_or_open(tmp_path / "s", METADATA)
    for window, sizes in ((0, (600, 500, 400)), (1, (30, 20, 10))):
        shard = make_shard(sum(sizes) + 2, window, window)
        for split in shard.splits.values():  # every layer's rows, layer by layer, as _record_batch stores them
            split.layer[:] = np.sort(np.repeat(np.arange(N_STATES), sizes) if len(split.layer) > 2 else split.layer)
        shard.stats_count[:] = sizes
        store.write_shard(shard)
    store = Store(tmp_path / "s")
    picked = store.rows_of_layers("train", 300)
    kept = np.concatenate([ids for _, ids in picked])
    assert np.bincount(kept, minlength=N_STATES).tolist() == [121, 100, 79]  # 630 : 520 : 410 of 1,560: 121.2, 100.0, 78.8
    first, ids = picked[0]
    assert [rows.tolist() for rows, _ in picked[1:]] == [[]]  # the first shard holds enough of each layer
    assert np.array_equal(first, np.concatenate([np.arange(121), 600 + np.arange(100), 1100 + np.arange(79)]))
    assert np.array_equal(ids, store.read(store.shards[0], "train/layer")[first])
    assert np.bincount(np.concatenate([ids for _, ids in store.rows_of_layers("train", 300, [1, 2])])).tolist() == [0, 168, 132]
    every = store.rows_of_layers("train")
    assert [len(rows) for rows, _ in every] == [1500, 60] and all(np.array_equal(rows, np.arange(len(rows))) for rows, _ in every)


def test_spread_order_s_every_prefix_is_spread_evenly():
    for n in range(1, 40):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
        for taken in range(1, n + 1):  # no gap between those taken (the last wraps round) is twice the even spacing
            gaps = np.diff(sorted(order[:taken]) + [n + order[0]])
            assert gaps.max() < 2 * n / taken, (n, taken, order)


def test_rows_of_a_few_shards_come_from_all_over_the_store(tmp_path):
    """The first shards hold the corpus's first documents, which may all be of one language or source."""
    store = create_or_open(tmp_path / "s", METADATA)
    for window in range(9):
        shard = make_shard(102, window, window)  # 100 training rows each, 34, 33 and 33 of the 3 hidden states
        shard.splits["train"].layer[:] = np.arange(100) % N_STATES
        shard.stats_count[:] = np.bincount(shard.splits["train"].layer)
        store.write_shard(shard)
    store = Store(tmp_path / "s")
    picked = store.rows_of_layers("train", 300)
    assert [len(rows) for rows, _ in picked] == [100, 0, 0, 0, 100, 0, 0, 0, 100]  # spread_order(9) begins 0, 8, 4
    assert all(np.array_equal(rows, np.arange(100)) for rows, _ in picked if len(rows))  # each read from its start


def test_a_shard_given_as_the_store_names_the_store(store):
    with pytest.raises(CrosscodersError, match="shard-00000002 is one shard of an activation store; pass the store, the folder above it$"):
        Store(store.location.path("shard-00000002"))


def test_a_shard_removed_between_listing_and_reading_is_unfinished_not_damaged(store, monkeypatch):
    """A reader opening the store as a starting cache-acts clears what a killed run left: that shard goes away
    between the listing and the read of its zarr.json."""
    read_json = Location.read_json

    def cleared(self, *parts):
        if parts == ("shard-00000004", "zarr.json"):
            raise FileNotFoundError(2, "No such file or directory")
        return read_json(self, *parts)

    monkeypatch.setattr(Location, "read_json", cleared)
    reopened = Store(store.url)
    assert [s.name for s in reopened.shards] == ["shard-00000002"] and reopened.unfinished == ["shard-00000004"]


def test_a_shard_linked_from_elsewhere_is_read_and_only_its_link_removed(tmp_path):
    """fsspec's find does not enter linked folders: a linked shard counted as unfinished, and a run's clean-up failed."""
    write_store(tmp_path / "s")
    (tmp_path / "s" / "shard-00000004").rename(tmp_path / "elsewhere")
    (tmp_path / "s" / "shard-00000004").symlink_to(tmp_path / "elsewhere")
    linked = Store(tmp_path / "s")
    assert [s.name for s in linked.shards] == ["shard-00000002", "shard-00000004"] and linked.n_pairs == 2400
    assert np.array_equal(linked.read(linked.shards[1], "train/layer"), make_shard(900, 1, 4).splits["train"].layer)
    linked.location.remove("shard-00000004")
    assert not (tmp_path / "s" / "shard-00000004").exists() and (tmp_path / "elsewhere" / "zarr.json").exists()


def test_a_linked_shard_whose_target_is_missing_is_refused_not_cleared(tmp_path):
    write_store(tmp_path / "s")
    (tmp_path / "s" / "shard-00000004").rename(tmp_path / "disk")
    (tmp_path / "s" / "shard-00000004").symlink_to(tmp_path / "unmounted")
    with pytest.raises(CrosscodersError, match=r"shard-00000004 links to .*unmounted, which is missing; mount it, or remove the link"):
        create_or_open(tmp_path / "s", METADATA)
    assert (tmp_path / "s" / "shard-00000004").is_symlink()


def test_a_local_path_holding_double_colons_is_that_folder(tmp_path):
    """fsspec reads a::b as a chain of file systems: the store went to ./a."""
    store = create_or_open(tmp_path / "a::b" / "s", METADATA)
    assert store.url == str(tmp_path / "a::b" / "s") and (tmp_path / "a::b" / "s" / "zarr.json").exists()


def test_a_folder_removed_while_the_store_is_listed_is_left_out(tmp_path, monkeypatch):
    """An unfinished shard that a starting cache-acts clears: its folders vanish between listing and reading."""
    write_store(tmp_path / "s")
    (tmp_path / "s" / "shard-00000009" / "train" / "acts").mkdir(parents=True)
    walk = os.walk

    def cleared_once_listed(top, **options):
        for parent, folders, names in walk(top, **options):
            if parent.endswith("shard-00000009"):
                shutil.rmtree(parent)
            yield parent, folders, names

    monkeypatch.setattr(os, "walk", cleared_once_listed)
    store = Store(tmp_path / "s")
    assert [s.name for s in store.shards] == ["shard-00000002", "shard-00000004"] and store.unfinished == []  # gone


def test_a_file_system_that_fails_to_start_is_a_one_line_error():
    with pytest.raises(CrosscodersError, match=r"cannot open ftp://127.0.0.1:9/x: .*refused"):
        Store("ftp://127.0.0.1:9/x")  # the discard port: nothing listens


@pytest.mark.parametrize("target", ["..", "../shard-00000004"])
def test_a_link_that_loops_or_doubles_a_shards_files_is_refused(tmp_path, target):
    """os.walk follows such a loop without end, doubling its work at each level."""
    write_store(tmp_path / "s")
    (tmp_path / "s" / "shard-00000002" / "again").symlink_to(target)
    with pytest.raises(CrosscodersError, match=r"shard-00000002/again.* leads to .*, a folder already listed there: a link loops"):
        Store(tmp_path / "s")


def test_a_store_that_lost_its_record_is_not_sent_to_cache_acts_which_refuses_it(store):
    os.remove(store.location.path("zarr.json"))
    message = rf"{re.escape(store.location.path('zarr.json'))} is missing: .* restore it, or delete .* and re-run cache-acts$"
    with pytest.raises(CrosscodersError, match=message):
        Store(store.url)
    with pytest.raises(CrosscodersError, match="exists and is not an activation store"):  # hence not "run cache-acts --out" there
        create_or_open(store.url, METADATA)


@pytest.mark.parametrize("content", ["[1, 2]", '"text"'])
def test_a_store_record_of_another_json_shape_is_a_one_line_error(store, content):
    with open(store.location.path("zarr.json"), "w") as handle:
        handle.write(content)
    with pytest.raises(CrosscodersError, match=r"zarr.json is damaged or not a crosscoders store .*; restore it, or re-cache into a new --out$"):
        Store(store.url)


def test_a_file_that_cannot_be_read_is_not_called_damaged(store, monkeypatch):
    """Denied or failing reads may meet intact files: the error must not advise deleting a shard."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    read_json = Location.read_json
    monkeypatch.setattr(Location, "read_json", lambda self, *parts: denied() if parts[0].startswith("shard-") else read_json(self, *parts))
    with pytest.raises(CrosscodersError, match=r"cannot read .*shard-00000002/zarr.json \(Permission denied\); check its permissions and the disk$"):
        Store(store.url)
    monkeypatch.setattr(Location, "read_json", lambda self, *parts: denied())
    with pytest.raises(CrosscodersError, match=r"cannot read .*s/zarr.json \(Permission denied\); check its permissions and the disk$"):
        Store(store.url)
    monkeypatch.undo()
    opened = Store(store.url)
    monkeypatch.setattr(ChunkFile, "read", denied)
    with pytest.raises(CrosscodersError, match=r"cannot read .*shard-00000002/train/acts \(Permission denied\); check its permissions and the disk$"):
        opened.read_acts(opened.shards[0], "train")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a descriptor's file through /proc")
def test_a_shard_is_flushed_with_the_folders_naming_its_files_before_its_commit(tmp_path, monkeypatch):
    """A file flushed but not the folder entry naming it may be gone after a power cut, under a commit that survived."""
    flushed, fsync = [], os.fsync

    def recording_fsync(descriptor):
        flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    store = create_or_open(tmp_path / "s", METADATA)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.write_shard(make_shard(100, 0, 2))
    shard = tmp_path / "s" / "shard-00000002"
    files = {str(p) for p in shard.rglob("*") if p.is_file()}
    folders = {str(p) for p in [tmp_path / "s", shard, *shard.rglob("*")] if p.is_dir()}
    assert files | folders <= set(flushed)

