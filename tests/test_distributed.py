"""Data parallelism: torchrun on 2 processes trains the same SAE as 1 process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import CrosscodersError
from pipeline.loader import ShardLoader
from pipeline.sae import load
from test_loader import write_store

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = ["--batch-size", "256", "--expansion", "2", "--k", "2", "--val-every", "5", "--save-every", "10",
        "--dead-tokens", "512", "--warmup-steps", "2", "--val-rows", "120", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sae(out: Path, shards: Path, n_processes: int) -> subprocess.CompletedProcess:
    script = [str(REPO / "train_sae.py"), "--shards", str(shards), "--out", str(out), *ARGS]
    if n_processes > 1:
        launcher = [str(TORCHRUN), "--nnodes", "1", "--nproc-per-node", str(n_processes), "--master-addr", "127.0.0.1",
                    "--master-port", str(free_port())]
    else:
        launcher = [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + script, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_two_processes_train_the_same_sae_as_one(tmp_path):
    write_store(tmp_path / "shards", [1500, 1200, 900])  # 14 full batches and a short last one of 16 rows
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
                assert parallel[name] == pytest.approx(single[name], rel=1e-4, abs=1e-5), name
    assert any(r.get("auxk_loss", 0) > 0 for r in records[0])  # AuxK, a batch-wide ratio, was exercised
    assert (tmp_path / "run2" / "checkpoint" / "trainer_state.json").exists()


def test_ranks_split_every_batch_into_the_one_process_batch(tmp_path):
    store = write_store(tmp_path / "s", [3000, 700])
    single = ShardLoader(store, 512, seed=1, window_chunks=2)
    ranks = [ShardLoader(store, 512, seed=1, window_chunks=2, rank=r, world_size=4) for r in range(4)]
    for whole, *shares in zip(single.train_batches(0), *(loader.train_batches(0) for loader in ranks)):
        assert torch.equal(whole[0], torch.cat([x for x, _ in shares]))
    val = [np.concatenate([x[:, 0].numpy() for x, _ in loader.val_batches()]) for loader in (single, *ranks)]
    assert np.array_equal(np.sort(val[0]), np.sort(np.concatenate(val[1:])))


def test_a_batch_size_not_divisible_by_the_processes_is_a_clear_error(tmp_path):
    with pytest.raises(CrosscodersError, match="batch_size=255 must be a multiple of the 2 training processes"):
        ShardLoader(write_store(tmp_path / "s", [1000]), 255, rank=0, world_size=2)
