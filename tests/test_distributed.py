"""Many processes under torchrun: stage one stores the same pairs as one process, also across a killed
rank and a restart; stage two trains the same SAE as one process with the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache import cli_args, sorted_rows
from test_loader import write_store

from pipeline import distributed
from pipeline.errors import CrosscodersError, peer_stopped
from pipeline.loader import ShardLoader
from pipeline.sae import load
from pipeline.storage import Location, exclusive_lock
from pipeline.store import Store

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = ["--batch-size", "256", "--expansion", "2", "--k", "2", "--val-every", "5", "--save-every", "10",
        "--dead-tokens", "512", "--warmup-steps", "2", "--val-rows", "120", "--device", "cpu",
        "--window-chunks", "1", "--shuffle-seed", "5"]  # batches that span two windows, read by different processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], n_processes: int) -> list[str]:
    """The command running a script in one process, or under torchrun in several."""
    if n_processes == 1:
        return [sys.executable, str(REPO / script), *args]
    return [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", str(n_processes), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), str(REPO / script), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads everywhere, so activations match bit for bit


def train_sae(out: Path, shards: Path, n_processes: int) -> subprocess.CompletedProcess:
    command = launch("train_sae.py", ["--shards", str(shards), "--out", str(out), *ARGS], n_processes)
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


def cache_acts(model_dir: Path, corpus: Path, out: Path, n_processes: int) -> subprocess.CompletedProcess:
    command = launch("cache_activations.py", cli_args(model_dir, corpus, out, n_tokens="5K"), n_processes)
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


def assert_same_pairs(reference: Path, other: Path):
    ref_keys, ref_acts = sorted_rows(Store(reference))
    keys, acts = sorted_rows(Store(other))
    assert len(np.unique(keys, axis=0)) == len(keys)  # nothing stored twice
    np.testing.assert_array_equal(ref_keys, keys)
    assert torch.equal(ref_acts, acts)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_processes_cache_the_same_pairs_as_one(tiny_model_dir, corpus_file, tmp_path):
    for n in (1, 2):
        result = cache_acts(tiny_model_dir, corpus_file, tmp_path / f"s{n}", n)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("stored 5,000 pairs") == 1  # said by the first process alone
    one, two = Store(tmp_path / "s1"), Store(tmp_path / "s2")
    assert one.n_pairs == two.n_pairs == 5000  # --n-tokens cuts inside the corpus, at the same pair
    assert {w % 2 for s in two.shards for w in s.windows} == {0, 1} and all(len({w % 2 for w in s.windows}) == 1 for s in two.shards)
    assert_same_pairs(tmp_path / "s1", tmp_path / "s2")
    for stats in zip(one.layer_stats_sums(), two.layer_stats_sums()):
        np.testing.assert_allclose(*stats, rtol=1e-12)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return found


def rank_process(torchrun_pid: int, rank: int) -> int | None:
    for pid in children(torchrun_pid):
        try:
            if f"RANK={rank}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    return None


@pytest.mark.skipif(not TORCHRUN.exists() or not Path("/proc/self/stat").exists(), reason="needs torchrun and /proc")
def test_a_killed_rank_and_a_restart_lose_and_duplicate_nothing(tiny_model_dir, corpus_file, tmp_path):
    reference = cache_acts(tiny_model_dir, corpus_file, tmp_path / "reference", 1)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    job = subprocess.Popen(launch("cache_activations.py", cli_args(tiny_model_dir, corpus_file, out, n_tokens="5K"), 2),
                           cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        if (out / "zarr.json").exists() and any(s.windows[0] % 2 == 1 for s in Store(out).shards):
            break  # rank 1 (odd windows) has committed a shard
        time.sleep(0.02)
    victim = rank_process(job.pid, 1)
    assert victim is not None and job.poll() is None, "the job ended before rank 1 could be killed"
    os.kill(victim, signal.SIGKILL)
    stderr = job.communicate(timeout=120)[1]
    assert job.returncode != 0  # torchrun stops the other rank and fails
    # the other rank says in one line what the store kept, whether torchrun's SIGTERM or gloo's failure reaches it first
    assert f"{out} keeps its complete shards; run the same command to continue" in stderr and "[rank0]" not in stderr, stderr
    assert 0 < Store(out).n_pairs < 5000
    restarted = cache_acts(tiny_model_dir, corpus_file, out, 2)
    assert restarted.returncode == 0, restarted.stderr
    assert Store(out).n_pairs == 5000 and not Store(out).unfinished
    assert_same_pairs(tmp_path / "reference", out)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_processes_train_the_same_sae_as_one(tmp_path):
    write_store(tmp_path / "shards", [1500, 1200, 885])  # 14 full batches and a last one of 1 row: one process gets none
    for n in (1, 2):
        result = train_sae(tmp_path / f"run{n}", tmp_path / "shards", n)
        assert result.returncode == 0, result.stderr
    one, two = load(tmp_path / "run1"), load(tmp_path / "run2")
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    records = [[json.loads(line) for line in (tmp_path / f"run{n}" / "metrics.jsonl").read_text().splitlines()] for n in (1, 2)]
    assert len(records[0]) == len(records[1])  # only rank 0 writes
    for single, parallel in zip(*records):
        assert single.keys() == parallel.keys() and single["step"] == parallel["step"]
        for name in single:
            if isinstance(single[name], float):
                assert parallel[name] == pytest.approx(single[name], rel=1e-4, abs=1e-5, nan_ok=True), name
    assert any(r.get("auxk_loss", 0) > 0 for r in records[0])  # AuxK, a batch-wide ratio, was exercised
    assert (tmp_path / "run2" / "checkpoint" / "trainer_state.json").exists()


class ThreadExchange:
    """distributed.all_to_all_rows among threads, one per rank, for testing the loader in one process."""

    def __init__(self, world_size: int):
        self.world_size, self.barrier, self.local, self.outbox = world_size, threading.Barrier(world_size), threading.local(), {}

    def __call__(self, tensors: list[torch.Tensor], destination: torch.Tensor) -> list[torch.Tensor]:
        rank = self.local.rank
        self.outbox[rank] = (tensors, destination)
        self.barrier.wait()
        received = [torch.cat([self.outbox[sender][0][i][self.outbox[sender][1] == rank] for sender in range(self.world_size)])
                    for i in range(len(tensors))]
        self.barrier.wait()
        return received


@pytest.mark.parametrize("start_batch", [0, 3])
@pytest.mark.parametrize("layers", [None, [1, 2]])  # [1, 2]: chunks of half their rows, the windows of uneven sizes
def test_ranks_read_disjoint_chunks_and_get_their_shares_of_the_one_process_batches(tmp_path, monkeypatch, start_batch, layers):
    store = write_store(tmp_path / "s", [3000, 700, 1100])
    single = list(ShardLoader(store, 256 if layers else 512, seed=1, window_chunks=1, layers=layers).train_batches(0, start_batch))
    exchange, reads, world_size = ThreadExchange(4), [], 4
    monkeypatch.setattr(distributed, "all_to_all_rows", exchange)
    original = ShardLoader._read_chunk
    monkeypatch.setattr(ShardLoader, "_read_chunk", lambda self, chunk: reads.append((self.rank, chunk)) or original(self, chunk))
    shares = [[] for _ in range(world_size)]
    step = threading.Barrier(world_size, timeout=30)  # each step's gradient all_reduce, which every rank must reach

    def run(rank: int):
        exchange.local.rank = rank
        loader = ShardLoader(store, 256 if layers else 512, seed=1, window_chunks=1, rank=rank, world_size=world_size, layers=layers)
        try:
            for batch in loader.train_batches(0, start_batch):
                shares[rank].append(batch)
                step.wait()
        except threading.BrokenBarrierError:  # ranks waiting in different collectives: a hang under torchrun
            step.abort()
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not step.broken, "the ranks' batches and row exchanges interleave differently"
    assert all(len(s) == len(single) for s in shares) and len(single) >= 4
    for b, (whole, layers) in enumerate(single):
        assert torch.equal(whole, torch.cat([s[b][0] for s in shares])) and torch.equal(layers, torch.cat([s[b][1] for s in shares]))
    chunks = [chunk for _, chunk in reads]
    assert len(chunks) == len(set(chunks))  # no chunk read twice, by any process
    if start_batch == 0:
        assert sorted(chunks) == list(range(len(ShardLoader(store, 512).chunks)))
        assert {rank for rank, _ in reads} == set(range(world_size))


def test_under_torchrun_cuda_is_each_processs_own_gpu_and_one_named_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(CrosscodersError, match=r"--device cuda:0 would put every process of this torchrun job on one GPU"):
        distributed.local_device(torch.device("cuda", 0))


def test_a_batch_size_not_divisible_by_the_processes_is_a_clear_error(tmp_path):
    with pytest.raises(CrosscodersError, match="batch_size=255 must be a multiple of the 2 training processes"):
        ShardLoader(write_store(tmp_path / "s", [1000]), 255, rank=0, world_size=2)


def exchange_bf16_rows(rank: int, port: int, results):
    """One process of test_rows_reach_their_processes_bit_exactly."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rows = (torch.arange(12, dtype=torch.float32).view(6, 2) + 100 * rank).bfloat16() / 3
    destination = torch.tensor([1, 0, 1, 1, 0, 0]) if rank == 0 else torch.tensor([0, 0, 1, 0, 1, 1])
    acts, ids = distributed.all_to_all_rows([rows, torch.arange(6) + 10 * rank], destination)
    results[rank] = (acts.view(torch.int16).tolist(), acts.dtype, ids.tolist())
    dist.destroy_process_group()


def test_rows_reach_their_processes_bit_exactly():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(exchange_bf16_rows, args=(free_port(), results), nprocs=2)
    sent = [(torch.arange(12, dtype=torch.float32).view(6, 2) + 100 * rank).bfloat16() / 3 for rank in range(2)]
    for rank, (ids_from_0, ids_from_1) in enumerate([([1, 4, 5], [10, 11, 13]), ([0, 2, 3], [12, 14, 15])]):
        acts, dtype, ids = results[rank]
        assert dtype == torch.bfloat16 and ids == ids_from_0 + ids_from_1  # by sender, each in its order
        expected = torch.cat([sent[0][ids_from_0], sent[1][[i - 10 for i in ids_from_1]]])
        assert acts == expected.view(torch.int16).tolist()


def compare_settings(rank: int, port: int, results):
    """One process of test_processes_given_different_settings_are_refused_in_one_line."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    base = {"train": {"lr": 1e-3, "k": 32}, "sweep": ["k=16,32"], "out": "runs/a"}
    cases = {
        "same": base,
        "lr": {**base, "train": {"lr": 1e-3 * (1 + rank), "k": 32}},
        "two fields": {**base, "out": f"runs/{rank}", "train": {"lr": 1e-3, "k": 32 + rank}},
        "sweep": {**base, "sweep": ["k=16,32"] + ["expansion=4,8"] * rank},
    }
    for case, settings in cases.items():
        try:
            distributed.check_same_settings(settings)
            results[(rank, case)] = None
        except CrosscodersError as error:
            results[(rank, case)] = str(error)
    dist.destroy_process_group()


def test_processes_given_different_settings_are_refused_in_one_line():
    """Each node of a job runs its own command: a process with another --n-tokens hung stage one's exchange, and one
    with another --lr trained a different SAE than its record says."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(compare_settings, args=(free_port(), results), nprocs=2)
    for rank in range(2):  # every process refuses, so none waits for the others
        assert results[(rank, "same")] is None
        assert results[(rank, "lr")] == "the processes of this job were given different --lr; start every process with the same options"
        assert results[(rank, "two fields")].startswith("the processes of this job were given different --k, --out;")
        assert results[(rank, "sweep")].startswith("the processes of this job were given different settings (such as --sweep)")


def take_rank_0s_value(rank: int, port: int, results):
    """One process of test_every_process_takes_rank_0s_listing."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results[rank] = distributed.from_main([["shard-00000000", 100 + rank, 5]])
    dist.destroy_process_group()


def test_every_process_takes_rank_0s_listing():
    """A store that cache-acts is adding to may hold more shards for a process that lists it later: all train on
    the shards rank 0 listed."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(take_rank_0s_value, args=(free_port(), results), nprocs=2)
    assert results[0] == results[1] == [["shard-00000000", 100, 5]]



def refuse_in_turn(rank: int, port: int, results):
    """One process of test_a_refusal_in_one_process_is_raised_in_every_one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for case, refusing in {"none": [], "rank 0": [0], "rank 1": [1], "both": [0, 1], "unforeseen": [0]}.items():
        try:
            with distributed.refused_together():
                if rank in refusing:
                    raise (OSError(13, "Permission denied") if case == "unforeseen" else CrosscodersError(f"refused by rank {rank}"))
            results[(rank, case)] = None
        except (CrosscodersError, OSError) as error:
            results[(rank, case)] = f"{type(error).__name__}: {error}"
    dist.destroy_process_group()


def test_a_refusal_in_one_process_is_raised_in_every_one():
    """Rank 0 alone holds a job's store or run folder: when it is refused, the others must stop with its reason
    instead of waiting in the next collective until torchrun kills them."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(refuse_in_turn, args=(free_port(), results), nprocs=2)
    refused = "CrosscodersError: refused by rank"
    expected = {"none": [None, None], "rank 0": [f"{refused} 0"] * 2, "rank 1": [f"{refused} 1"] * 2, "both": [f"{refused} 0"] * 2,
                "unforeseen": ["PermissionError: [Errno 13] Permission denied", "CrosscodersError: [Errno 13] Permission denied"]}
    assert {case: [results[(rank, case)] for rank in range(2)] for case in expected} == expected


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_train_sae_on_a_run_folder_another_job_holds_is_refused_by_every_process(tmp_path):
    write_store(tmp_path / "shards", [600])
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the other job's")  # which the other processes must not judge as this job's folder
    with exclusive_lock(Location(str(out)), "held by the test"):
        result = train_sae(out, tmp_path / "shards", 2)
    assert result.returncode != 0
    refusal = f"error: another train-sae job is writing {out}; wait for it to end, or choose another --out"
    assert result.stderr.count(refusal) == 2 and "[rank" not in result.stderr, result.stderr  # no rank's traceback
    assert [path.name for path in out.iterdir()] == ["notes.txt"]  # nothing written into the other job's folder


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_cache_acts_into_a_store_another_job_holds_is_refused_by_every_process(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "store"
    with exclusive_lock(Location(str(out)), "held by the test"):
        result = cache_acts(tiny_model_dir, corpus_file, out, 2)
    assert result.returncode != 0
    refusal = f"error: another cache-acts job is writing {out}; wait for it to end, or choose another --out"
    assert result.stderr.count(refusal) == 2 and "[rank" not in result.stderr, result.stderr  # no rank's traceback
    assert not out.exists()  # the test's lock made it and removed it empty: the job wrote nothing there


def outlive_a_peer(rank: int, port: int, results):
    """One process of test_a_collective_failed_by_a_stopped_process_is_told_apart: rank 1 dies after the first sum."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    distributed.all_reduce_sum([torch.ones(2)])
    if rank == 1:
        os._exit(0)
    try:
        distributed.all_reduce_sum([torch.ones(2)])
    except RuntimeError as error:
        results["reason"] = peer_stopped(error)
    results["other"] = peer_stopped(RuntimeError("shape '[2]' is invalid for input of size 3"))
    os._exit(0)  # the group cannot be left cleanly without its peer


def test_a_collective_failed_by_a_stopped_process_is_told_apart():
    """train-sae and cache-acts then say in one line what was kept and how to go on, not gloo's traceback."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    context = mp.start_processes(outlive_a_peer, args=(free_port(), results), nprocs=2, join=False, start_method="spawn")
    for process in context.processes:
        process.join(60)
    assert results["reason"].startswith("Connection closed by peer") or "reset by peer" in results["reason"], results["reason"]
    assert results["other"] is None
    assert peer_stopped(RuntimeError("[pair.cc:1]")) is None and peer_stopped(RuntimeError()) is None
