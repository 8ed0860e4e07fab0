"""`train-sae` as users run it: from shards, sweeps reading the shards once, one-line errors."""

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from forked_cli import run_python
from test_loader import write_store

from pipeline.errors import CrosscodersError, Interrupted
from pipeline.loader import LoaderConfig, ShardLoader
from pipeline.sae import load
from pipeline.store import Store
from pipeline.train import TrainConfig, train_on_store

REPO = Path(__file__).resolve().parents[1]
D_MODEL = 8


@pytest.fixture
def store_path(tmp_path) -> Path:
    write_store(tmp_path / "shards", [1500, 1200, 900])
    return tmp_path / "shards"


def cli(*args, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_python("train_sae.py", *args, fresh=fresh)


def test_a_sweep_trains_every_combination_reading_each_chunk_once(store_path, tmp_path, monkeypatch):
    reads = []
    original = ShardLoader._read_chunk
    monkeypatch.setattr(ShardLoader, "_read_chunk", lambda self, chunk: reads.append(chunk) or original(self, chunk))
    base = TrainConfig(batch_size=256, expansion=2, k=2, val_every=5, save_every=5, warmup_steps=2)
    results = train_on_store(LoaderConfig(shards=str(store_path)), base, tmp_path / "runs", ["k=2,4", "expansion=2,3"],
                             torch.device("cpu"), resume=False, progress=False)
    assert sorted(Path(p).name for p in results) == ["k2-expansion2", "k2-expansion3", "k4-expansion2", "k4-expansion3"]
    n_chunks = len(ShardLoader(Store(store_path), 256).chunks)
    assert sorted(reads) == list(range(n_chunks))  # one epoch, four SAEs, every chunk read once
    for run_dir in results:
        sae = load(run_dir)
        assert sae.cfg.k == int(Path(run_dir).name[1]) and sae.cfg.d_model == D_MODEL
        assert json.loads((Path(run_dir) / "data.json").read_text())["shards"] == str(store_path.resolve())
        assert (Path(run_dir) / "loss.png").stat().st_size > 1000


def test_a_sweep_over_seed_equals_separate_runs_of_each_seed(store_path, tmp_path):
    base = TrainConfig(batch_size=256, expansion=2, k=2, steps=4, warmup_steps=1)
    loader, cpu = LoaderConfig(shards=str(store_path)), torch.device("cpu")
    train_on_store(loader, base, tmp_path / "sweep", ["seed=0,1"], cpu, resume=False, progress=False)
    train_on_store(loader, replace(base, seed=1), tmp_path / "alone", [], cpu, resume=False, progress=False)
    assert torch.equal(load(tmp_path / "sweep" / "seed1").W_enc, load(tmp_path / "alone").W_enc)
    assert not torch.equal(load(tmp_path / "sweep" / "seed0").W_enc, load(tmp_path / "alone").W_enc)


def test_resume_refuses_another_row_order_or_validation_and_takes_a_moved_store(store_path, tmp_path):
    base = TrainConfig(batch_size=256, expansion=2, k=2, steps=6, save_every=3, warmup_steps=1)
    loader, cpu = LoaderConfig(shards=str(store_path), window_chunks=2), torch.device("cpu")
    train_on_store(loader, replace(base, steps=3), tmp_path / "run", [], cpu, resume=False, progress=False)
    saved = json.loads((tmp_path / "run" / "data.json").read_text())
    assert saved["loader"]["window_chunks"] == 2 and saved["model"]["d_model"] == D_MODEL
    for changed, message in ((dict(window_chunks=3), "window_chunks=2 (now 3)"), (dict(shuffle_seed=1), "shuffle_seed=0 (now 1)"),
                             (dict(val_rows=100), "val_rows=65536 (now 100)")):  # the validation records would change
        with pytest.raises(CrosscodersError, match=re.escape(message)):
            train_on_store(replace(loader, **changed), replace(base, steps=3), tmp_path / "run", [], cpu, resume=True,
                           progress=False)
    data_file = tmp_path / "run" / "data.json"  # as a run from before the row order had its own seed saved it
    data = json.loads(data_file.read_text())
    del data["loader"]["shuffle_seed"]
    data_file.write_text(json.dumps(data))
    moved = tmp_path / "moved"
    store_path.rename(moved)
    relaxed = replace(loader, shards=str(moved), workers=1)  # where the rows are read from, and how
    [result] = train_on_store(relaxed, replace(base, steps=3), tmp_path / "run", [], cpu, resume=True, progress=False).values()
    assert result["step"] == 3


def test_a_run_resumed_after_its_store_grew_reads_the_rows_it_started_on(tmp_path, monkeypatch):
    """A grown store with as many batches per epoch passed the old check, and the epoch's order changed: of its rows,
    some were trained on twice and others never."""
    write_store(tmp_path / "store", [1500, 1200, 900])
    write_store(tmp_path / "grown", [1500, 1200, 900, 20])  # 3,600 and 3,620 training rows: 15 batches of 256 either way
    base, cpu = TrainConfig(batch_size=256, expansion=2, k=2, steps=12, save_every=4, val_every=4, warmup_steps=1), torch.device("cpu")
    train_on_store(LoaderConfig(shards=str(tmp_path / "store")), base, tmp_path / "whole", [], cpu, resume=False, progress=False)
    batches = ShardLoader.train_batches

    def stopped_at_step_6(self, epoch, start_batch=0):
        for number, batch in enumerate(batches(self, epoch, start_batch), start_batch):
            if number == 6:
                raise Interrupted
            yield batch

    monkeypatch.setattr(ShardLoader, "train_batches", stopped_at_step_6)
    with pytest.raises(Interrupted):
        train_on_store(LoaderConfig(shards=str(tmp_path / "store")), base, tmp_path / "run", [], cpu, resume=False, progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / "data.json").read_text())["store_shards"] == [
        ["shard-00000000", 1500, 50], ["shard-00000001", 1200, 50], ["shard-00000002", 900, 50]]
    train_on_store(LoaderConfig(shards=str(tmp_path / "grown")), base, tmp_path / "run", [], cpu, resume=True, progress=False)
    assert torch.equal(load(tmp_path / "run").W_enc, load(tmp_path / "whole").W_enc)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    write_store(tmp_path / "other", [1500, 1200, 800])
    with pytest.raises(CrosscodersError, match=r"shard-00000002 holds other rows than the run was trained on; resume on the store"):
        train_on_store(LoaderConfig(shards=str(tmp_path / "other")), base, tmp_path / "run", [], cpu, resume=True, progress=False)
    with pytest.raises(CrosscodersError, match=r"no longer holds shard-00000002, which the run was trained on"):
        train_on_store(LoaderConfig(shards=str(write_store(tmp_path / "less", [1500, 1200]).url)), base, tmp_path / "run", [], cpu,
                       resume=True, progress=False)


def test_resuming_a_run_begun_before_runs_recorded_their_shards_says_it_reads_them_all(tmp_path, capsys):
    write_store(tmp_path / "store", [1500, 1200])
    base, cpu = TrainConfig(batch_size=256, expansion=2, k=2, steps=4, save_every=2, val_every=2, warmup_steps=1), torch.device("cpu")
    train_on_store(LoaderConfig(shards=str(tmp_path / "store")), base, tmp_path / "run", [], cpu, resume=False, progress=False)
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    del data["store_shards"]
    (tmp_path / "run" / "data.json").write_text(json.dumps(data))
    capsys.readouterr()
    train_on_store(LoaderConfig(shards=str(tmp_path / "store")), base, tmp_path / "run", [], cpu, resume=True, progress=False)
    assert "began before runs recorded their store's shards, so it reads all 2 the store holds now" in capsys.readouterr().err
    with pytest.raises(CrosscodersError, match="holds no training run to resume"):  # a mistyped --out is no older run
        train_on_store(LoaderConfig(shards=str(tmp_path / "store")), base, tmp_path / "typo", [], cpu, resume=True, progress=False)
    assert "began before" not in capsys.readouterr().err


def test_training_on_some_layers_reads_only_their_rows_and_resumes_only_on_them(store_path, tmp_path):
    base = TrainConfig(batch_size=128, expansion=2, k=2, steps=8, save_every=4, val_every=4, warmup_steps=1)
    loader, cpu = LoaderConfig(shards=str(store_path), layers="1-2"), torch.device("cpu")
    train_on_store(loader, replace(base, steps=4), tmp_path / "run", [], cpu, resume=False, progress=False)
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert (data["train_layers"], data["layers"], data["loader"]["layers"]) == ([1, 2], [0, 1, 2, 3], "1-2")
    with pytest.raises(CrosscodersError, match=re.escape("train_layers=[1, 2] (now [1])")):
        train_on_store(replace(loader, layers="1"), replace(base, steps=4), tmp_path / "run", [], cpu, resume=True, progress=False)
    [result] = train_on_store(replace(loader, layers="2,1"), replace(base, steps=4), tmp_path / "run", [], cpu, resume=True,
                              progress=False).values()  # the same layers, spelt otherwise
    assert result["step"] == 4 and set(result["fvu_by_layer"]) == {"1", "2"}
    rows = ShardLoader(Store(store_path), 128, layers=[1, 2])
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["n_train_batches"] == rows.n_train_batches()
    assert load(tmp_path / "run").cfg.n_layers == 4  # the encoding of every hidden state: the SAE still applies to all
    for layers, message in (("2-5", "--layers '2-5': layer 4 is out of range; the model has 4 hidden states (0..3)"),
                            ("1,x", "--layers '1,x': 'x' is not a layer list")):
        with pytest.raises(CrosscodersError, match=re.escape(message)):
            train_on_store(replace(loader, layers=layers), base, tmp_path / "new", [], cpu, resume=False, progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_sweep_table_names_each_run_and_shows_its_validation_metrics(store_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # --out=~/sweep: the shell leaves ~ after = to the command
    result = cli("--shards", str(store_path), "--out=~/sweep", "--sweep", "k=2,4", "--batch-size", "256",
                 "--steps", "2", "--expansion", "2", "--val-every", "2")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2:-1] for line in result.stdout.splitlines() if line.startswith("│")}
    assert set(rows) == {"k2", "k4"}  # the runs' folders in --out
    assert "fvu_layer_mean" in result.stdout
    # the runs share the note their settings share, in one line
    assert [line for line in result.stderr.splitlines() if "--warmup-steps" in line] == [
        "note: k2, k4: --warmup-steps 100 is more than the 2 steps, so the learning rate peaks at 6e-06, not --lr 0.0003; "
        "lower --warmup-steps or train longer"]
    for name, cells in rows.items():
        val = [json.loads(line) for line in (tmp_path / "sweep" / name / "metrics.jsonl").read_text().splitlines()][-1]
        assert val["split"] == "val"
        assert [float(cell) for cell in cells[:3]] == pytest.approx([val["fvu"], val["fvu_layer_mean"], val["mse"]], rel=1e-3)


def test_cli_trains_checkpoints_and_reports(store_path, tmp_path):
    run = tmp_path / "[red]run[/]"  # no markup: it hid itself, and [/] alone ended the command in a traceback
    result = cli("--shards", str(store_path), "--out", str(run), "--batch-size", "256", "--steps", "12",
                 "--expansion", "2", "--k", "2", "--val-every", "4", "--save-every", "6")
    assert result.returncode == 0, result.stderr
    assert "final metrics" in result.stdout and "fvu" in result.stdout
    assert "--dead-tokens 10,000,000 is more than the 3,072 rows trained on, so no latent can count as dead" in result.stderr
    assert "--warmup-steps 100 is more than the 12 steps, so the learning rate peaks at 3.6e-05, not --lr 0.0003" in result.stderr
    assert "".join(line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")) == str(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if r.get("split") == "val"} >= {4, 8, 12}
    assert (run / "checkpoint" / "sae_weights.safetensors").exists()
    longer = cli("--shards", str(store_path), "--out", str(run), "--batch-size", "256", "--steps", "16",
                 "--expansion", "2", "--k", "2", "--resume")
    assert longer.returncode == 2 and "steps=12 (now 16)" in longer.stderr  # the LR schedule depends on the length


@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_says_what_it_kept_in_one_line_and_resume_goes_on_from_there(store_path, tmp_path, stop, status):
    run = tmp_path / "run"
    args = ["--shards", str(store_path), "--out", str(run), "--batch-size", "256", "--steps", "300", "--expansion", "2",
            "--k", "2", "--save-every", "5", "--val-every", "50", "--dead-tokens", "5K"]
    process = subprocess.Popen([sys.executable, str(REPO / "train_sae.py"), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None and not (run / "checkpoint").exists():
        time.sleep(0.01)
    process.send_signal(stop)
    stderr = process.communicate()[1]
    assert process.returncode == status, stderr
    step = json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 0 < step < 300 and step % 5 == 0
    assert stderr == f"interrupted; last checkpoints: {run} step {step}; run the same command with --resume to continue\n"
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 301))  # each step once


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shards", "{tmp}/nowhere"], "no activation store at"),
        (["--shards", "{tmp}/[b]:smile:"], "no activation store at {tmp}/[b]:smile:"),  # printed as typed
        (["--shards", "{tmp}/empty"], "holds no complete shard yet; run cache-acts"),
        (["--k", "99", "--expansion", "2"], "k=99 is larger than n_latents=16"),
        (["--sweep", "kk=1,2"], "sweep 'kk=1,2' must be FIELD=V1,V2"),
        (["--steps", "ten"], "--steps 'ten' is not a count"),
        (["--cuda-graph", "--device", "cpu"], "cuda_graph needs a CUDA device, not cpu; train without --cuda-graph"),
        (["--device", "gpu"], "--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:99"], "--device cuda:99: this machine has"),  # no CUDA GPU, or fewer than 100
        (["--lr", "nan"], "lr=nan must be a finite number >= 0"),
        (["--batch-size", "1.5"], "Invalid value for '--batch-size'"),  # click's own errors: one line too, not its usage box
        (["--bogus", "3"], "No such option: --bogus"),
        (["--weight-decay", "-1"], "weight_decay=-1.0 must be a finite number >= 0"),
        (["--window-chunks", "0"], "--window-chunks 0 must be at least 1"),
        (["--out", "s3://bucket/runs/k32"], "--out s3://bucket/runs/k32 must be a local path; only stores"),  # was ./s3:/bucket/...
        (["--val-rows", "-1"], "--val-rows -1 must be at least 0"),
        (["--shuffle-seed", "20000000000000"], "--shuffle-seed 20000000000000 must be from 0 to 4294967295"),
        (["--batch-size", "5000"], "training rows, fewer than one batch of 5,000; lower --batch-size"),
        (["--batch-size", "2048", "--layers", "1"], "training rows of hidden states 1, fewer than one batch of 2,048"),
    ],
)
def test_bad_inputs_give_one_line_errors(store_path, tmp_path, args, message):
    from pipeline.store import create_or_open

    create_or_open(tmp_path / "empty", {"model": {"name": "m", "fingerprint": "f", "d_model": D_MODEL, "n_hidden_states": 4}, "dtype": "float32",
                                     "layers": [0, 1, 2, 3]})
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = cli("--shards", str(store_path), "--out", str(tmp_path / "run"), "--batch-size", "256", "--steps", "3", *args)
    assert result.returncode == 2, result.stdout
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run's folder was made


def test_damaged_chunk_is_a_one_line_error(store_path, tmp_path):
    data = next(p for p in (store_path / "shard-00000001" / "train" / "acts").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(data.read_bytes())
    raw[50] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = cli("--shards", str(store_path), "--out", str(tmp_path / "run"), "--batch-size", "256", "--steps", "20", fresh=True)
    assert result.returncode == 2
    assert "shard-00000001/train/acts is damaged" in result.stderr and "Traceback" not in result.stderr


def test_resuming_from_a_checkpoint_of_another_hidden_size_is_refused(store_path, tmp_path):
    from pipeline.sae import SAEConfig, TopKSAE

    run = tmp_path / "run"
    ok = cli("--shards", str(store_path), "--out", str(run), "--batch-size", "256", "--steps", "4", "--expansion", "2", "--k", "2", "--save-every", "2")
    assert ok.returncode == 0, ok.stderr
    TopKSAE(SAEConfig(d_model=D_MODEL * 2, n_layers=4, expansion=2, k=2)).save(run / "checkpoint")
    result = cli("--shards", str(store_path), "--out", str(run), "--batch-size", "256", "--steps", "4", "--expansion", "2", "--k", "2",
                 "--save-every", "2", "--resume")
    assert result.returncode == 2
    assert "d_model=16" in result.stderr and "Traceback" not in result.stderr
