"""The store on its own: bit-exact dtypes, atomic shards, damage detection, plain-zarr readability."""

import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import CrosscodersError
from pipeline.store import STAGING_DIR, ShardData, SplitRows, Store, create_or_open, from_storage, to_storage

D_MODEL, N_STATES = 16, 3
METADATA = {"model": {"name": "m", "fingerprint": "f", "d_model": D_MODEL, "n_hidden_states": N_STATES}, "dtype": "bf16", "layers": [0, 1, 2]}


def make_shard(rows: int, seed: int, next_doc: int, n_pairs_end: int) -> ShardData:
    rng = np.random.default_rng(seed)
    acts = torch.from_numpy(rng.normal(size=(rows, D_MODEL)).astype(np.float32) * 10)

    def split_rows(n: int, offset: int) -> SplitRows:
        return SplitRows(to_storage(acts[offset : offset + n], "bf16"), rng.integers(0, N_STATES, n), rng.integers(0, 100, n),
                         np.full(n, next_doc - 1), np.arange(1, n + 1))

    return ShardData(
        splits={"train": split_rows(rows - 2, 0), "val": split_rows(2, rows - 2)},
        doc_index=np.array([next_doc - 1]), doc_split=np.array([0]), doc_offsets=np.array([0, rows]),
        doc_tokens=np.arange(rows), stats_count=np.zeros(N_STATES), stats_sum=np.zeros((N_STATES, D_MODEL)),
        stats_sum_sq_norm=np.zeros(N_STATES), next_doc=next_doc, n_pairs_end=n_pairs_end,
    )


@pytest.fixture
def store(tmp_path) -> Store:
    store = create_or_open(tmp_path / "s", METADATA)
    store.write_shard(make_shard(1500, 0, 3, 1500))
    store.write_shard(make_shard(900, 1, 5, 2400))
    return Store(tmp_path / "s")


@pytest.mark.parametrize("dtype", ["bf16", "float16", "float32"])
def test_storage_dtypes_round_trip_bit_exactly(dtype):
    acts = torch.randn(64, 8) * 100
    stored = from_storage(to_storage(acts, dtype), dtype)
    expected = acts.to(stored.dtype)
    assert stored.dtype != torch.float32 or dtype == "float32"
    assert torch.equal(stored.view(torch.int16 if stored.element_size() == 2 else torch.int32),
                       expected.view(torch.int16 if expected.element_size() == 2 else torch.int32))


def test_shards_are_listed_with_their_bookkeeping(store):
    assert [s.index for s in store.shards] == [0, 1]
    assert store.n_pairs == 2400 and store.next_doc == 5
    assert store.n_rows("train") == 1498 + 898 and store.n_rows("val") == 4


def test_rows_read_back_exactly(store):
    expected = make_shard(900, 1, 5, 2400).splits["train"]
    shard = store.shards[1]
    assert np.array_equal(store.read(shard, "train/acts"), expected.acts)
    assert np.array_equal(store.read(shard, "train/layer", 10, 20), expected.layer[10:20])


def test_plain_zarr_reads_the_store_as_documented(store):
    root = zarr.open_group(store.path, mode="r")
    assert root.attrs["crosscoders"]["dtype"] == "bf16"
    bits = root["shard-000000/train/acts"][:]
    acts = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    assert acts.shape == (1498, D_MODEL)
    assert torch.equal(acts, store.read_acts(store.shards[0], "train"))


def test_a_half_written_shard_in_staging_is_invisible_and_removed_on_reopen(store):
    staging = store.path / STAGING_DIR / "shard-000002"
    staging.mkdir(parents=True)
    (staging / "zarr.json").write_text("{")
    assert len(Store(store.path).shards) == 2
    create_or_open(store.path, METADATA)
    assert not (store.path / STAGING_DIR).exists()


def test_a_damaged_chunk_is_a_one_line_error_naming_the_file(store):
    data_file = next((store.path / "shard-000000" / "train" / "acts" / "c").rglob("*"))
    while data_file.is_dir():
        data_file = next(data_file.iterdir())
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(CrosscodersError, match=r"shard-000000/train/acts is damaged") as error:
        Store(store.path).read_acts(Store(store.path).shards[0], "train")
    assert "\n" not in str(error.value)


def test_a_missing_data_file_is_caught_on_open(store):
    import shutil

    shutil.rmtree(store.path / "shard-000001" / "val" / "acts" / "c")
    with pytest.raises(CrosscodersError, match=r"shard-000001/val/acts lost its data file"):
        Store(store.path)


def test_a_truncated_shard_header_is_caught_on_open(store):
    (store.path / "shard-000001" / "zarr.json").write_text('{"attributes": {')
    with pytest.raises(CrosscodersError, match=r"shard .*shard-000001/zarr.json is damaged"):
        Store(store.path)


def test_opening_something_that_is_not_a_store(tmp_path):
    with pytest.raises(CrosscodersError, match="no activation store at"):
        Store(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(CrosscodersError, match="is not an activation store"):
        Store(tmp_path / "other")
    with pytest.raises(CrosscodersError, match="exists and is not an activation store"):
        create_or_open(tmp_path / "other", METADATA)


def test_another_models_metadata_is_refused(store):
    other = json.loads(json.dumps(METADATA))
    other["model"]["fingerprint"] = "g"
    with pytest.raises(CrosscodersError, match=r"different model \(fingerprint: store has 'f', this run has 'g'\)"):
        create_or_open(store.path, other)
    renamed = json.loads(json.dumps(METADATA))
    renamed["model"]["name"] = "/elsewhere/same-model"
    create_or_open(store.path, renamed)


def test_the_same_model_under_another_name_may_extend_a_store(store):
    recipe = {**json.loads(json.dumps(METADATA)), "cache": {"model": "qwen2.5-coder-0.5b-instruct", "n_tokens": 100, "layers": "all"}}
    create_or_open(store.path.parent / "t", recipe)
    renamed = {**recipe, "cache": {**recipe["cache"], "model": "/models/qwen-0.5b", "n_tokens": 200}}
    create_or_open(store.path.parent / "t", renamed)
    with pytest.raises(CrosscodersError, match=r"different cache \(layers: store has 'all', this run has '1-3'\)"):
        create_or_open(store.path.parent / "t", {**renamed, "cache": {**renamed["cache"], "layers": "1-3"}})
