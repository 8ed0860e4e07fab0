"""The benchmarks of docs/BENCHMARKS.md still run: each script at a tiny size on the CPU, and every command of
bench/gpu.sh takes its options, so the one GPU run a session may get is not lost to a renamed option."""

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_cli import run_python
from test_loader import write_store

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return run_python(*args)


def printed_rows(stdout: str, columns: list[str]) -> list[dict[str, str]]:
    """The rows a bench prints as it measures them: "column value | column value | ..." lines."""
    def column_and_value(cell: str) -> tuple[str, str]:
        column = max((c for c in columns if cell.startswith(c + " ")), key=len)
        return column, cell[len(column) + 1 :]

    return [dict(map(column_and_value, line.split(" | "))) for line in stdout.splitlines() if " | " in line]


def rate(text: str) -> float:
    return float(text.replace(",", ""))


def shown_ratio(shown: str, numerator: str, denominator: str) -> bool:
    """Whether a printed ratio (2 decimals) is that of two printed rates (rounded to integers)."""
    ratio = rate(numerator) / rate(denominator)
    rounding = ratio * (0.5 / rate(numerator) + 0.5 / rate(denominator))
    return abs(float(shown.rstrip("x")) - ratio) <= 0.005 + rounding + 1e-9


def gpu_script_steps() -> dict[str, list[str]]:
    """Each `step NAME SECONDS COMMAND...` of bench/gpu.sh: its name and command, the variables filled in."""
    script = (REPO / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    variables = {**dict(re.findall(r"^(\w+)=(\S+)$", script, re.MULTILINE)), "python": sys.executable}
    steps = {}
    for line in script.splitlines():
        if line.strip().startswith("step "):
            name, _, *command = shlex.split(line)[1:]
            if command[0] == "py-spy":  # the command it profiles
                command = command[command.index("--") + 1 :]
            steps[name] = [variables.get(word[1:], word) if word.startswith("$") else word for word in command]
    return steps


def test_gpu_script_runs_every_measure_the_performance_issue_needs():
    assert gpu_script_steps().keys() == {"kernels", "sae_step", "cache", "host", "writer", "cache_gil", "cache_gil_threads",
                                         "cache_idle", "cache_idle_threads", "train", "train_host", "sae_step_profile", "train_graph",
                                         "sae_step_no_dead"}


@pytest.mark.parametrize("step", gpu_script_steps())
def test_gpu_script_commands_take_their_options(step):
    command = gpu_script_steps()[step]
    if command[1:3] == ["-m", "pytest"]:  # the tests it names exist
        result = run(*command[1:], "--collect-only")
        assert result.returncode == 0, result.stdout[-2000:]
        assert re.search(r"\d+ tests collected", result.stdout)
    else:  # an unknown option is refused before --help is answered
        result = run(*command[1:], "--help")
        assert result.returncode == 0, result.stdout + result.stderr


def test_sae_step_bench_measures_each_shape_and_step():
    result = run("-m", "bench.sae_step", "--device", "cpu", "--d-model", "32", "--shapes", "4x4,2x8", "--batch-size", "64",
                 "--decoders", "dense,sparse", "--steps", "2", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["expansion", "k", "k / n_latents", "k_aux", "dense rows/s", "sparse rows/s", "sparse speed-up"])
    assert [(row["expansion"], row["k"], row["k / n_latents"]) for row in rows] == [("4", "4", "1/32"), ("2", "8", "1/8")]
    for row in rows:
        assert rate(row["dense rows/s"]) > 0 and rate(row["sparse rows/s"]) > 0
        assert row["sparse speed-up"].endswith("x") and shown_ratio(row["sparse speed-up"], row["sparse rows/s"], row["dense rows/s"])


def test_train_throughput_bench_times_loader_training_from_memory_and_shards_and_the_step():
    result = run("-m", "bench.train_throughput", "--synthetic-rows", "12K", "--d-model", "32", "--batch-size", "256", "--steps", "6",
                 "--repeats", "1", "--workers", "1,2", "--layers", "3-5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["measure", "expansion", "k", "step", "rows/s", "ratio", "first batch s"])
    assert [row["measure"] for row in rows[:4]] == [  # 6 steps in one window of 64 chunks: no steady state
        "loader alone, 1 threads, start included", "loader alone, 2 threads, start included",
        "loader alone, 1 threads, layers 3-5, start included", "loader alone, 2 threads, layers 3-5, start included"]
    for expansion, k in (("4", "32"), ("16", "64")):
        shape = [row for row in rows if row.get("expansion") == expansion and row.get("k") == k]
        assert [(row["measure"], row["step"]) for row in shape] == [
            ("train from memory", "auto"), ("train from shards", "auto"),
            ("SAE step alone", "dense"), ("SAE step alone", "sparse"), ("SAE step alone", "auto")]
        assert shown_ratio(shape[1]["ratio"], shape[1]["rows/s"], shape[0]["rows/s"])  # shards over memory
    assert all(rate(row["rows/s"]) > 0 for row in rows)


def test_cache_throughput_bench_compares_stage_one_with_the_bare_forward_pass(tiny_model_dir):
    result = run("-m", "bench.cache_throughput", "--model", str(tiny_model_dir), "--n-tokens", "400", "--batch-tokens", "256",
                 "--max-seq-len", "128", "--repeats", "1", "--device", "cpu", "--model-dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "torch.float32" in result.stdout  # the table names the dtype both passes ran in
    [row] = printed_rows(result.stdout, ["repeat", "bare fwd tok/s", "cache-acts tok/s", "ratio", "windows tok/s", "windows ratio",
                                         "start+end s", "bytes/pair", "compression"])
    assert shown_ratio(row["ratio"], row["cache-acts tok/s"], row["bare fwd tok/s"])
    assert shown_ratio(row["windows ratio"], row["windows tok/s"], row["bare fwd tok/s"])
    assert rate(row["windows tok/s"]) > rate(row["cache-acts tok/s"]) and float(row["start+end s"]) > 0  # the windows lie within the run
    assert rate(row["bytes/pair"]) > 64 * 2 / 1.5  # 64-wide bf16 rows compress a little, not to nothing
    assert 1 < rate(row["compression"]) < 1.5


def test_the_bare_pass_runs_over_the_batches_cache_acts_formed(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    from bench.cache_throughput import cached_batches
    from pipeline import cache
    from pipeline.cache import CacheConfig, cache_activations
    from pipeline.corpus import CorpusConfig
    from pipeline.store import Store

    formed, pack = [], cache.pack_batches
    monkeypatch.setattr(cache, "pack_batches", lambda *args, **kwargs: (formed.append(b) or b for b in pack(*args, **kwargs)))
    config = CacheConfig(model=str(tiny_model_dir), out=str(tmp_path / "s"), n_tokens=2000, batch_tokens=512, max_seq_len=128,
                         pack_window=5, device="cpu")
    cache_activations(config, CorpusConfig(dataset=str(corpus_file)), progress=False)
    bare = cached_batches(Store(tmp_path / "s"), config, pad_id=0)
    assert len({doc // 5 for b in formed for doc in b.doc_index}) > 2  # several packing windows
    assert [b.doc_index for b in bare] == [b.doc_index for b in formed]
    assert all(torch.equal(a.input_ids, b.input_ids.masked_fill(~b.attention_mask.bool(), 0)) for a, b in zip(bare, formed))


def test_sweep_eval_bench_times_both_ways_and_counts_their_passes(tiny_model_dir):
    result = run("-m", "bench.sweep_eval", "--model", str(tiny_model_dir), "--n-tokens", "3000", "--sweep", "k=2,4,8",
                 "--layers", "1,3", "--n-docs", "1", "--max-seq-len", "128", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "3 SAEs evaluated at hidden states 1,3 on" in result.stdout
    rows = {cells[0]: cells[1:] for cells in ([cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()
                                             if line.startswith("│"))}
    assert list(rows) == ["eval-sae on each of the 3 runs", "eval-sae on the sweep's folder", "speed-up"]
    (alone_s, alone_passes), (sweep_s, sweep_passes) = rows["eval-sae on each of the 3 runs"], rows["eval-sae on the sweep's folder"]
    assert (int(alone_passes), int(sweep_passes)) == (3 * (1 + 2 * 3), 1 + 2 * (2 + 3))  # one document: one batch
    assert rows["speed-up"][1] == f"{21 / 11:.2f}x"
    assert float(rows["speed-up"][0].rstrip("x")) == pytest.approx(float(alone_s) / float(sweep_s), abs=0.01 + 0.2 / float(sweep_s))


def test_seed_vs_pipeline_bench_times_both_ways(tiny_model_dir):
    result = run("-m", "bench.seed_vs_pipeline", "--model", str(tiny_model_dir), "--n-tokens", "600", "--sweep", "k=2,4",
                 "--batch-size", "64", "--max-seq-len", "128", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "2 SAEs on 600 pairs" in result.stdout
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line.startswith("│")]
    seconds = {(way, stage): value for way, stage, value in rows}
    assert list(seconds) == [("seed", "forward + train k2"), ("seed", "forward + train k4"), ("seed", "total"),
                             ("pipeline", "cache-acts once"), ("pipeline", "train-sae sweep of 2"), ("pipeline", "total"),
                             ("", "speed-up")]
    seed, pipeline = float(seconds["seed", "total"]), float(seconds["pipeline", "total"])
    speed_up = float(seconds["", "speed-up"].rstrip("x"))
    assert abs(speed_up * pipeline - seed) <= 0.05 * speed_up + 0.05 + 0.005 * pipeline  # totals rounded to 0.1 s, the ratio to 0.01


def test_shard_writer_bench_times_the_statistics_and_the_writer_thread():
    result = run("-m", "bench.shard_writer", "--d-model", "32", "--n-rows", "5000", "--batch-rows", "1000", "--shard-rows", "2000")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["measure", "seconds", "rows/s"])
    # 4,750 training rows: a shard after the third batch of 1,000 passes 2,000 of them, the rest on close
    assert [row["measure"] for row in rows] == ["per-layer statistics on cpu", "writer thread: 2 shards gathered, compressed, written"]
    for row in rows:  # 5,000 rows in the time shown, rounded to the millisecond
        seconds = float(row["seconds"])
        assert 5000 / (seconds + 0.0005) - 1 <= rate(row["rows/s"]) <= 5000 / max(seconds - 0.0005, 1e-9) + 1


def test_store_codecs_bench_reads_a_store(tmp_path):
    write_store(tmp_path / "shards", [3000])
    result = run("-m", "bench.store_codecs", "--shards", str(tmp_path / "shards"))
    assert result.returncode == 0, result.stderr
    for codec in ("blosc lz4 shuffle", "blosc zstd-3 bitshuffle", "zstd-3 (no shuffle)"):
        assert codec in result.stdout


def test_model_dtype_bench_compares_bf16_hidden_states_and_predictions_with_float32(tiny_model_dir):
    result = run("-m", "bench.model_dtype", "--model", str(tiny_model_dir), "--n-docs", "3", "--max-seq-len", "96", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    states = printed_rows("\n".join(line for line in lines if line.startswith("hidden state ")),
                          ["hidden state", "relative error", "share of variance"])
    assert [row["hidden state"] for row in states] == ["0", "1", "2", "3", "4"]
    assert 0 < float(states[0]["relative error"]) < 2**-8  # the embeddings: bf16's rounding alone
    assert all(0 < float(row["relative error"]) < 0.1 and 0 < float(row["share of variance"]) < 0.01 for row in states)
    models = printed_rows("\n".join(line for line in lines if line.startswith("model dtype ")), ["model dtype", "tok/s", "next-token loss"])
    assert [row["model dtype"] for row in models] == ["float32", "bf16"]
    assert abs(float(models[0]["next-token loss"]) - float(models[1]["next-token loss"])) < 0.05
    [kl] = [float(line.split()[1]) for line in lines if line.startswith("KL ")]
    assert 0 < kl < 0.01


def test_store_startup_bench_times_each_measure_for_each_store_size():
    result = run("-m", "bench.store_startup", "--n-shards", "2,5")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["shards", "rows", "measure", "seconds", "ms per shard"])
    assert [(row["shards"], row["rows"]) for row in rows] == [("2", "4,096")] * 5 + [("5", "10,240")] * 5
    assert [row["measure"] for row in rows[:5]] == ["open the store", "sum its statistics", "set up the loader (statistics included)",
                                                   "the same, one hidden state kept", "pick 65,536 held-out rows"]
    for row in rows:  # the time shown, per shard
        assert float(row["ms per shard"]) == pytest.approx(float(row["seconds"]) * 1e3 / int(row["shards"]), abs=0.01 + 5 / int(row["shards"]))


def test_host_contention_bench_times_the_main_thread_beside_each_setting():
    result = run("-m", "bench.host_contention", "--ops", "50", "--seconds", "0.3", "--rest", "0.01", "--warm-up", "0.2",
                 "--pack-window", "8", "--writer-rows", "2048", "--d-model", "16", "--switch-interval", "0.001")
    assert result.returncode == 0, result.stderr
    assert "GIL switch interval 1 ms" in result.stdout
    rows = printed_rows(result.stdout, ["beside", "batches", "median ms", "p90 ms"])
    assert [row["beside"] for row in rows] == ["alone", "corpus and writer threads, another process", "corpus and writer threads",
                                               "corpus thread", "writer thread"]
    for row in rows:
        assert int(row["batches"]) >= 1 and 0 < float(row["median ms"]) <= float(row["p90 ms"])


def test_stage_one_host_bench_runs_cache_acts_with_a_stand_in_for_the_model():
    result = run("-m", "bench.stage_one_host", "--n-tokens", "3000", "--d-model", "16", "--n-layers", "3", "--batch-tokens", "512",
                 "--max-seq-len", "128", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["planned in", "repeat", "seconds", "pairs/s", "model tokens/s", "CPU s", "CPU us/pair",
                                        "page faults/pair"])
    assert [row["planned in"] for row in rows] == ["process", "thread"]
    for row in rows:
        seconds = float(row["seconds"])
        assert 3000 / (seconds + 0.005) - 1 <= rate(row["pairs/s"]) <= 3000 / max(seconds - 0.005, 1e-9) + 1  # every pair stored
        assert rate(row["model tokens/s"]) >= rate(row["pairs/s"])  # skipped positions are run, not stored
        assert float(row["CPU us/pair"]) == pytest.approx(float(row["CPU s"]) / 3000 * 1e6, abs=0.05 + 0.005 / 3000 * 1e6)


def test_thread_profile_sums_each_threads_samples_by_function(tmp_path):
    profile = tmp_path / "profile.txt"
    profile.write_text(
        "thread (0x1): MainThread;<module> (x.py:1);main (x.py:2);_cache (c.py:3);step (c.py:9) 6\n"
        "thread (0x1): MainThread;<module> (x.py:1);main (x.py:2);_cache (c.py:3) 2\n"
        "thread (0x1): MainThread;<module> (x.py:1);import_torch (x.py:5) 50\n"  # outside _cache: left out
        "thread (0x2): compress_0;Thread.run (t.py:1);encoded (f.py:4) 3\n"
        "thread (0x3): compress_1;Thread.run (t.py:1);encoded (f.py:4);take (n.py:2) 1\n"
        "thread (0x3): compress_1;Thread.run (t.py:1);wait (t.py:7) 4\n"
        'process 9:"python -m bench";process 12:"python -c import a; a.main()";thread (12): MainThread;produce (b.py:3) 5\n'
    )
    result = run("-m", "bench.thread_profile", str(profile), "--within", "_cache")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["thread", "samples", "share", "function", "function samples", "of thread"])
    assert [(row["thread"], row["samples"], row["share"]) for row in rows if "samples" in row] == [
        ("MainThread", "8", "38.1%"), ("compress", "8", "38.1%"), ("subprocess 12 MainThread", "5", "23.8%")]
    assert [(row["thread"], row["function"], row["function samples"]) for row in rows if "function" in row] == [
        ("MainThread", "step", "6"), ("compress", "encoded", "4"), ("compress", "wait", "4"), ("compress", "take", "1")]


def test_stage_two_host_bench_trains_at_most_at_the_stand_in_steps_rate():
    steps, step_ms, batch = 24, 20, 256
    result = run("-m", "bench.stage_two_host", "--synthetic-rows", "12K", "--d-model", "32", "--batch-size", str(batch),
                 "--steps", str(steps), "--step-ms", str(step_ms), "--repeats", "1", "--workers", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = printed_rows(result.stdout, ["step ms", "measure", "rows/s", "ratio", "idle ms/step", "at window starts", "elsewhere",
                                        "CPU us/row", "page faults/row"])
    assert [(row.get("step ms"), row["measure"]) for row in rows] == [(None, "loader alone"), ("20", "train from memory"),
                                                                       ("20", "train from shards")]
    step_rate = batch / (step_ms / 1000)
    # timed from the 3rd batch to the last, whose step need not have run: n - 3 batches in at least n - 4 steps
    ceiling = step_rate * (steps - 3) / (steps - 4)
    memory, shards = rate(rows[1]["rows/s"]), rate(rows[2]["rows/s"])
    assert 0.7 * step_rate < memory <= ceiling and shards <= ceiling
    assert shown_ratio(rows[2]["ratio"], rows[2]["rows/s"], rows[1]["rows/s"])
    assert 0 <= float(rows[1]["idle ms/step"]) < step_ms / 4  # from memory the host queues each step while one runs
    assert float(rows[0]["CPU us/row"]) > 0 and float(rows[0]["page faults/row"]) >= 0


def test_stand_in_step_gives_the_step_befores_metrics_when_that_step_would_end_and_notes_the_device_idle():
    from bench.stage_two_host import StandInStep
    from pipeline.train_step import METRICS

    step = StandInStep(real=None, seconds=0.2)  # long beside a loaded machine's pauses
    start = time.perf_counter()
    assert step(None, None, lr=0.1) is None and time.perf_counter() - start < 0.15  # queued, nothing to read yet
    assert step(None, None, lr=0.2) == {**dict.fromkeys(METRICS, 0.0), "lr": 0.1}
    assert 0.2 <= time.perf_counter() - start < 0.35  # the first step's end; the second runs until 0.4
    time.sleep(0.6 - (time.perf_counter() - start))  # the device waits from 0.4 to 0.6 for the third step
    assert step(None, None, lr=0.3) == {**dict.fromkeys(METRICS, 0.0), "lr": 0.2}
    assert step.drain() == {**dict.fromkeys(METRICS, 0.0), "lr": 0.3} and time.perf_counter() - start >= 0.8
    assert step.drain() is None
    assert step.idle[:2] == [0.0, 0.0] and step.idle[2] == pytest.approx(0.2, abs=0.08)


def test_idle_ms_splits_the_devices_waits_between_steps_that_begin_a_window_and_the_others():
    from bench.stage_two_host import idle_ms

    idle = np.array([0, 0, 0, 0, 0.005, 0, 0, 0.008])  # the steps of batches 4 and 7 were queued 5 and 8 ms late
    begins = np.array([True, False, False, False, True, False, False, True])
    assert idle_ms(idle, begins) == pytest.approx((13 / 5, 6.5, 0))
    assert idle_ms(idle, np.zeros(8, bool))[1:] == (None, pytest.approx(13 / 5))


def test_window_starts_marks_each_batch_that_takes_a_new_shuffled_window(tmp_path):
    from bench.stage_two_host import window_starts
    from pipeline.loader import ShardLoader

    loader = ShardLoader(write_store(tmp_path / "s", [3000, 2500, 4100, 700]), batch_size=500, window_chunks=3)
    window_of = {}  # a row's global id (its first feature) -> its window
    for window, chunk_ids in enumerate(loader._windows(epoch=2)):
        for chunk_id in chunk_ids:
            chunk = loader.chunks[chunk_id]
            first_id = sum(shard.n_rows["train"] for shard in loader.store.shards[: loader.store.shards.index(chunk.shard)])
            window_of.update(dict.fromkeys(range(first_id + chunk.start, first_id + chunk.end), window))
    windows_of_batches = [{window_of[i] for i in x[:, 0].long().tolist()} for x, _ in loader.train_batches(epoch=2)]
    seen, expected = set(), []
    for windows in windows_of_batches:
        expected.append(not windows <= seen)
        seen |= windows
    begins = window_starts(loader, epoch=2, n_batches=len(windows_of_batches))
    assert begins.tolist() == expected and 1 < sum(expected) < len(expected)


def test_the_loader_alone_is_timed_between_window_starts_past_its_read_ahead_and_not_its_close(monkeypatch):
    from types import SimpleNamespace

    from bench import train_throughput

    clock = SimpleNamespace(now=0.0)

    class FourWindows:  # 4 windows of 4 batches of 10 rows; a window's first batch waits 100 s for its read, others 1 s
        batch_size, chunks = 10, [SimpleNamespace(n_rows=20)] * 8

        def _windows(self, epoch):
            return [[0, 1], [2, 3], [4, 5], [6, 7]]

        def train_batches(self, epoch):
            try:
                for batch in range(16):
                    clock.now += 100 if batch % 4 == 0 else 1
                    yield torch.zeros(10, 3), torch.zeros(10)
            finally:
                clock.now += 10**6  # the close waits for the windows read ahead

    monkeypatch.setattr(train_throughput, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    cpu = torch.device("cpu")
    # windows 2 and 3 begin at batches 8 and 12: batches 9-12 came in 1 + 1 + 1 + 100 s
    assert train_throughput.loader_rows_per_s(FourWindows(), 16, cpu) == (40 / 103, True)
    # batch 9 reaches window 2 only: all 10 batches from the request, three window reads included
    assert train_throughput.loader_rows_per_s(FourWindows(), 10, cpu) == (100 / 307, False)
