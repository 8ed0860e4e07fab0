"""The trainer: recovers a planted dictionary, sweeps in one pass, resumes exactly, stops on NaN."""

import errno
import json
import os
import re
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import CrosscodersError
from pipeline.files import NEW_FILE_MODE
from pipeline.loader import MemoryLoader
from pipeline.sae import load
from pipeline.storage import Location, exclusive_lock
from pipeline.train import Run, TrainConfig, expand_sweep, latest_checkpoint, lr_at, open_store, run_data, train

N_LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_rows(n_rows: int, seed: int, atoms: torch.Tensor, n_active: int = 4):
    """Rows that are sums of n_active atoms with positive weights, shifted and scaled per layer: (x, layer)."""
    generator = torch.Generator().manual_seed(seed)
    active = torch.rand(n_rows, len(atoms), generator=generator).argsort(1)[:, :n_active]  # [n_rows, n_active]
    weights = 0.5 + torch.rand(n_rows, n_active, generator=generator)
    layer = torch.randint(0, N_LAYERS, (n_rows,), generator=generator)
    per_layer = torch.Generator().manual_seed(7)
    offset = 5 * torch.randn(N_LAYERS, atoms.shape[1], generator=per_layer)
    scale = torch.tensor([1.0, 4.0, 20.0])
    x = (weights[..., None] * atoms[active]).sum(1)
    return x * scale[layer, None] + offset[layer], layer


def planted_source(d_model: int, n_atoms: int, n_rows: int, batch_size: int):
    """A MemoryLoader of planted rows with 1024 validation rows, and the atoms: [n_atoms, d_model] unit norm."""
    atoms = torch.randn(n_atoms, d_model, generator=torch.Generator().manual_seed(123))
    atoms /= atoms.norm(dim=1, keepdim=True)
    x, layer = planted_rows(n_rows, 0, atoms)
    val_x, val_layer = planted_rows(1024, 1, atoms)
    return MemoryLoader(x, layer, N_LAYERS, batch_size, val_acts=val_x, val_layers=val_layer), atoms


def small_source(batch_size: int = 64):
    """9 batches per epoch (the last of 10 rows) of d_model 32, for the exactness tests."""
    return planted_source(d_model=32, n_atoms=64, n_rows=8 * batch_size + 10, batch_size=batch_size)[0]


SMALL = TrainConfig(
    expansion=4, k=4, lr=3e-3, warmup_steps=5, batch_size=64, steps=30, val_every=10, save_every=10, dead_tokens=5 * 64
)


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C."""


class InterruptAt:
    """A source that crashes at global batch number `at` (Interrupted, or error), or from then on serves its rows times `scale`."""

    def __init__(self, source: MemoryLoader, at: int, scale: float | None = None, error: BaseException | None = None):
        self.source, self.at, self.scale, self.error = source, at, scale, error
        self.d_model, self.n_layers, self.stats = source.d_model, source.n_layers, source.stats
        self.n_train_batches, self.val_batches = source.n_train_batches, source.val_batches

    def train_batches(self, epoch: int, start_batch: int = 0):
        for number, (x, layer) in enumerate(self.source.train_batches(epoch, start_batch), start=start_batch):
            if epoch * self.n_train_batches() + number >= self.at:
                if self.scale is None:
                    raise self.error or Interrupted
                x = x * self.scale
            yield x, layer


def weights(folder):
    return load_file(folder / "sae_weights.safetensors")


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_recovers_a_planted_dictionary(tmp_path):
    source, atoms = planted_source(d_model=64, n_atoms=128, n_rows=100 * 256, batch_size=256)
    cfg = replace(SMALL, warmup_steps=50, batch_size=256, steps=1500, val_every=500, save_every=1000, dead_tokens=5120)
    [final] = train([cfg], source, [tmp_path / "run"], progress=True)
    assert max(final["fvu_by_layer"].values()) < 0.1  # every layer, each against its own mean
    assert final["l0"] == 4 and final["step"] == 1500
    sae = load(tmp_path / "run")
    best_cosine = (atoms @ sae.W_dec.T).max(1).values  # [n_atoms]
    assert (best_cosine > 0.9).float().mean() >= 0.9


def test_writes_metrics_plot_and_saelens_layout(tmp_path):
    [final] = train([SMALL], small_source(), [tmp_path], progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    val_records = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert [r["step"] for r in val_records] == [10, 20, 30]
    # a step's training record comes before its validation, though its metrics come back while the next step runs
    order = [(r["step"], r["split"] == "val") for r in records]
    assert order == sorted(order)
    assert final == {**train_records[-1], **val_records[-1]}  # validation metrics, plus the last step's training ones
    # the records docs/FORMAT.md lists
    assert train_records[0].keys() == {"split", "step", "loss", "mse", "mse_raw", "fvu", "l0", "dead_fraction", "auxk_loss", "lr"}
    assert val_records[0].keys() == {"split", "step", "mse", "mse_raw", "fvu", "l0", "fvu_by_layer", "fvu_layer_mean"}
    assert set(final["fvu_by_layer"]) == {"0", "1", "2"} and final["l0"] == 4
    assert final["fvu_layer_mean"] == pytest.approx(sum(final["fvu_by_layer"].values()) / 3)
    assert any(r["auxk_loss"] > 0 for r in train_records)  # dead_tokens is short enough for latents to die
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "train_config.json").read_text())["k"] == 4
    assert_same_tensors(weights(tmp_path), weights(tmp_path / "checkpoint"))
    assert {p.name for p in tmp_path.iterdir()} == {"train_config.json", "metrics.jsonl", "checkpoint", "cfg.json", "sae_weights.safetensors", "loss.png"}
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert files == {"cfg.json", "sae_weights.safetensors", "optimizer.safetensors"} | {
        "trainer_state.safetensors", "trainer_state.json"
    }


def test_sweep_equals_separate_runs_bit_for_bit(tmp_path):
    runs = expand_sweep(SMALL, ["k=4,8", "layer_encoding=sinusoidal,learned"])
    train([cfg for _, cfg in runs], small_source(), [tmp_path / "sweep" / name for name, _ in runs], progress=False)
    for name, cfg in runs:
        train([cfg], small_source(), [tmp_path / "alone" / name], progress=False)
        assert_same_tensors(weights(tmp_path / "sweep" / name), weights(tmp_path / "alone" / name))
        metrics = [(tmp_path / kind / name / "metrics.jsonl").read_text() for kind in ("sweep", "alone")]
        assert metrics[0] == metrics[1]


def test_resume_equals_uninterrupted_run(tmp_path):
    train([SMALL], small_source(), [tmp_path / "whole"], progress=False)
    with pytest.raises(Interrupted):  # mid-epoch, three steps after the step-20 checkpoint
        train([SMALL], InterruptAt(small_source(), at=23), [tmp_path / "resumed"], progress=False)
    assert json.loads((tmp_path / "resumed/checkpoint/trainer_state.json").read_text())["step"] == 20
    train([SMALL], small_source(), [tmp_path / "resumed"], resume=True, progress=False)
    for file in ("sae_weights.safetensors", "checkpoint/optimizer.safetensors", "checkpoint/trainer_state.safetensors"):
        assert_same_tensors(load_file(tmp_path / "whole" / file), load_file(tmp_path / "resumed" / file))
    assert (tmp_path / "whole/metrics.jsonl").read_text() == (tmp_path / "resumed/metrics.jsonl").read_text()


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_how_often_a_run_validates_and_saves_changes_no_weight(tmp_path, decoder):
    """A validation or a save waits for the step in flight, which tells the exact dead count; AuxK's shapes, and so
    the weights' rounding, must not depend on it, also when a resumed run validates and saves at other steps."""
    base = replace(SMALL, decoder=decoder, steps=60)
    train([base], small_source(), [tmp_path / "whole"], progress=False)
    train([replace(base, val_every=7, save_every=4)], small_source(), [tmp_path / "often"], progress=False)
    assert_same_tensors(weights(tmp_path / "whole"), weights(tmp_path / "often"))
    with pytest.raises(Interrupted):
        train([base], InterruptAt(small_source(), at=23), [tmp_path / "resumed"], progress=False)
    train([replace(base, val_every=3, save_every=7)], small_source(), [tmp_path / "resumed"], resume=True, progress=False)
    assert_same_tensors(weights(tmp_path / "whole"), weights(tmp_path / "resumed"))


@pytest.mark.parametrize("cut", [1, 30])  # the newline alone, or the record's end too
def test_resume_drops_a_metrics_line_torn_by_a_crash_and_keeps_every_other(tmp_path, cut):
    train([SMALL], small_source(), [tmp_path / "whole"], progress=False)
    with pytest.raises(Interrupted):
        train([SMALL], InterruptAt(small_source(), at=23), [tmp_path / "resumed"], progress=False)
    metrics = tmp_path / "resumed/metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-cut])
    train([SMALL], small_source(), [tmp_path / "resumed"], resume=True, progress=False)
    assert (tmp_path / "whole/metrics.jsonl").read_text() == metrics.read_text()


def test_a_damaged_metrics_line_before_the_last_is_a_one_line_error(tmp_path):
    with pytest.raises(Interrupted):
        train([SMALL], InterruptAt(small_source(), at=23), [tmp_path], progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text("".join([*lines[:3], lines[3][:20] + "\n", *lines[4:]]))
    with pytest.raises(CrosscodersError, match=r"metrics.jsonl is damaged at line 4 \(.*\); restore it, or delete that line$"):
        train([SMALL], small_source(), [tmp_path], resume=True, progress=False)


@pytest.mark.parametrize("val_every", [10, 7])  # 7: the last step is saved, and only then validated, unless it comes first
def test_resuming_a_finished_run_logs_nothing_again_and_reports_its_metrics(tmp_path, val_every):
    cfg = replace(SMALL, val_every=val_every)
    [final] = train([cfg], small_source(), [tmp_path], progress=False)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert train([cfg], small_source(), [tmp_path], resume=True, progress=False) == [final]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_crash_between_the_renames_of_two_saves_in_a_row_keeps_a_checkpoint(tmp_path, monkeypatch):
    rename = Path.rename

    def crash_before_swapping_in(self, target):  # as a kill -9 once the old checkpoint is moved aside
        if Path(target).name == "checkpoint" and json.loads((self / "trainer_state.json").read_text())["step"] == 20:
            raise Interrupted
        return rename(self, target)

    train([SMALL], small_source(), [tmp_path / "whole"], progress=False)
    monkeypatch.setattr(Path, "rename", crash_before_swapping_in)
    for resume in (False, True):  # the resumed run crashes in the same place
        with pytest.raises(Interrupted):
            train([SMALL], small_source(), [tmp_path / "resumed"], resume=resume, progress=False)
        assert json.loads((latest_checkpoint(tmp_path / "resumed") / "trainer_state.json").read_text())["step"] == 10
    monkeypatch.undo()
    train([SMALL], small_source(), [tmp_path / "resumed"], resume=True, progress=False)
    assert_same_tensors(weights(tmp_path / "whole"), weights(tmp_path / "resumed"))
    assert (tmp_path / "whole/metrics.jsonl").read_text() == (tmp_path / "resumed/metrics.jsonl").read_text()


def test_a_full_disk_is_a_one_line_error_that_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import pipeline.train

    def full_disk_at_step_20(tensors, path):
        if path.name == "optimizer.safetensors" and tensors["0.step"].item() == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path)

    train([SMALL], small_source(), [tmp_path / "whole"], progress=False)
    monkeypatch.setattr(pipeline.train, "save_file", full_disk_at_step_20)
    with pytest.raises(CrosscodersError, match=re.escape(f"cannot write the run ([Errno 28] No space left on device); last "
                                                         f"checkpoints: {tmp_path / 'resumed'} step 10; once it can be written, "
                                                         "run the same command with --resume to continue")):
        train([SMALL], small_source(), [tmp_path / "resumed"], progress=False)
    monkeypatch.undo()
    train([SMALL], small_source(), [tmp_path / "resumed"], resume=True, progress=False)
    assert_same_tensors(weights(tmp_path / "whole"), weights(tmp_path / "resumed"))


def test_a_run_that_could_not_write_its_settings_is_started_again_without_resume(tmp_path, monkeypatch):
    """--resume needs train_config.json: advising it for a run that never wrote one sent users into another error."""
    write_text = Path.write_text

    def full_disk(self, text):
        write_text(self, text[:10])  # the disk fills midway
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CrosscodersError, match=r"none yet; once it can be written, run the same command to continue$"):
        train([SMALL], small_source(), [tmp_path / "run"], progress=False)
    monkeypatch.undo()
    train([SMALL], small_source(), [tmp_path / "run"], progress=False)  # the same command, as advised


def test_a_checkpoint_is_on_disk_before_it_is_swapped_in(tmp_path, monkeypatch):
    synced, swapped, fsync, rename = set(), [], os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: synced.add(os.fstat(fd).st_ino) or fsync(fd))

    def swap_in(self, target):
        if Path(target).name == "checkpoint":
            swapped.append({file.stat().st_ino for file in self.iterdir()} <= synced)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", swap_in)
    train([replace(SMALL, steps=20)], small_source(), [tmp_path], progress=False)
    assert swapped == [True, True]


@pytest.mark.parametrize("leftover", ["link", "file"])
def test_a_save_replaces_what_holds_the_temporary_checkpoints_name_and_writes_nothing_through_it(tmp_path, leftover):
    """rmtree refuses a link or a file, silently with ignore_errors: the save wrote through the link, or failed."""
    with pytest.raises(Interrupted):
        train([SMALL], InterruptAt(small_source(), at=23), [tmp_path / "run"], progress=False)
    (tmp_path / "elsewhere").mkdir()
    if leftover == "link":
        (tmp_path / "run/checkpoint.tmp").symlink_to(tmp_path / "elsewhere")
    else:
        (tmp_path / "run/checkpoint.tmp").write_text("not a folder")
    train([SMALL], small_source(), [tmp_path / "run"], resume=True, progress=False)
    assert json.loads((tmp_path / "run/checkpoint/trainer_state.json").read_text())["step"] == 30
    assert not any((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "run/checkpoint.tmp").exists()


def test_checkpoint_round_trips_through_load(tmp_path):
    train([SMALL], small_source(), [tmp_path], progress=False)
    assert {path.stat().st_mode & 0o777 for path in (tmp_path / "checkpoint").iterdir()} == {NEW_FILE_MODE}  # shared runs
    state = json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (30, 3, 3)
    assert state["train_config"] == json.loads((tmp_path / "train_config.json").read_text())
    x, layer = next(small_source().val_batches())
    assert torch.equal(load(tmp_path / "checkpoint")(x, layer).x_hat, load(tmp_path)(x, layer).x_hat)
    optimizer = load_file(tmp_path / "checkpoint/optimizer.safetensors")
    assert optimizer["0.step"].item() == 30 and optimizer["2.exp_avg"].shape == (128, 32)


@pytest.mark.parametrize("bad_step, save_every", [(16, 10), (15, 5)])  # (15, 5): the first bad step is one to save
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad_step, save_every):
    message = re.escape(f"at step {bad_step}; last good checkpoint kept at {tmp_path / 'checkpoint'}")
    with pytest.raises(CrosscodersError, match=message) as error:
        cfg = replace(SMALL, save_every=save_every, val_every=100)
        train([cfg], InterruptAt(small_source(), at=bad_step - 1, scale=float("inf")), [tmp_path], progress=False)
    assert re.match(rf"loss became (nan|inf) at step {bad_step}", str(error.value))
    assert json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())["step"] == 10
    assert all(tensor.isfinite().all() for tensor in weights(tmp_path / "checkpoint").values())
    assert not (tmp_path / "sae_weights.safetensors").exists()


def test_tokens_set_the_length_and_epochs_wrap(tmp_path):
    cfg = replace(SMALL, steps=None, tokens=64 * 20 + 5)
    [final] = train([cfg], small_source(), [tmp_path], progress=False)
    assert final["step"] == 20  # over two epochs of 9 batches


def test_config_errors_come_before_any_training(tmp_path):
    with pytest.raises(CrosscodersError, match="k=200 is larger than n_latents=128"):
        train([SMALL, replace(SMALL, k=200)], small_source(), [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(CrosscodersError, match="not both"):
        TrainConfig(steps=10, tokens=10_000)
    with pytest.raises(CrosscodersError, match="^batch_size=0 must be positive$"):  # the field, not the whole config
        TrainConfig(batch_size=0)
    with pytest.raises(CrosscodersError, match="^warmup_steps=-1 must be at least 0$"):
        TrainConfig(warmup_steps=-1)
    for seed in (-1, 2**64):  # torch.manual_seed would overflow on the second, a traceback
        with pytest.raises(CrosscodersError, match=f"^--seed {seed} must be from 0 to 4294967295$"):
            replace(SMALL, seed=seed)  # as a sweep makes each run's config
    with pytest.raises(CrosscodersError, match="batches of 64 rows, not batch_size=32"):
        train([replace(SMALL, batch_size=32)], small_source(), [tmp_path / "c"], progress=False)


def test_wandb_missing_is_refused_before_any_folder_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(CrosscodersError, match="wandb is not installed"):
        train([SMALL, replace(SMALL, wandb=True)], small_source(), [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_refuses_other_settings_and_fresh_runs_refuse_used_folders(tmp_path):
    train([SMALL], small_source(), [tmp_path], progress=False)
    with pytest.raises(CrosscodersError, match="already holds a training run; continue it with --resume or train into a new --out$"):
        train([SMALL], small_source(), [tmp_path], progress=False)
    with pytest.raises(CrosscodersError, match=r"cannot resume .* k=4 \(now 8\)"):
        train([replace(SMALL, k=8)], small_source(), [tmp_path], resume=True, progress=False)
    relaxed = replace(SMALL, save_every=7, val_every=3)  # changes no weight
    assert train([relaxed], small_source(), [tmp_path], resume=True, progress=False)[0]["step"] == 30


def test_resume_needs_a_run_and_a_new_run_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    refusals = [("empty", True, "empty holds no training run to resume (no train_config.json); train without --resume"),
                ("missing", True, "missing holds no training run to resume"),
                ("other", False, "other holds files but no training run; train into a new or empty folder"),
                ("file", False, f"file cannot be a run folder: {tmp_path / 'file'} is a file"),
                ("file/run", True, f"run cannot be a run folder: {tmp_path / 'file'} is a file"),
                ("missing/../run", True, "run holds no training run to resume")]
    for name, resume, message in refusals:
        with pytest.raises(CrosscodersError, match=re.escape(message)):
            train([SMALL], small_source(), [tmp_path / name], resume=resume, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty", "file", "notes.txt", "other"]  # nothing written
    assert train([replace(SMALL, steps=2)], small_source(), [tmp_path / "empty"], progress=False)[0]["step"] == 2


def test_a_second_job_on_a_run_folder_being_trained_is_refused_before_it_writes(tmp_path):
    """Two jobs on one folder interleaved their metrics and checkpoints; a refused fresh run died halfway instead."""
    source, run, first_batch_asked, go_on = small_source(), tmp_path / "run", threading.Event(), threading.Event()
    batches = source.train_batches

    def slow_batches(*args, **kwargs):
        first_batch_asked.set()
        go_on.wait(60)
        return batches(*args, **kwargs)

    source.train_batches = slow_batches
    first = ThreadPoolExecutor(1).submit(train, [SMALL], source, [run], progress=False)
    assert first_batch_asked.wait(60)  # the first job has written its settings and waits for its batches
    written = sorted(path.name for path in run.iterdir())
    for resume in (False, True):
        with pytest.raises(CrosscodersError, match=re.escape(f"another train-sae job is writing {run}; wait for it to end")):
            train([SMALL], small_source(), [run], resume=resume, progress=False)
    assert sorted(path.name for path in run.iterdir()) == written
    go_on.set()
    assert first.result(60)[0]["step"] == 30
    assert train([SMALL], small_source(), [run], resume=True, progress=False)[0]["step"] == 30  # free again: nothing left to do


def test_a_job_refused_a_run_folder_leaves_it_to_the_job_that_holds_it(tmp_path, monkeypatch):
    import pipeline.train as train_module

    run, other_job = tmp_path / "runs" / "run", ExitStack()

    def another_job_gets_there_first(location, busy):  # after this job saw no folder, before it locks one
        other_job.enter_context(exclusive_lock(Location(run), "held"))
        return exclusive_lock(location, busy)

    monkeypatch.setattr(train_module, "exclusive_lock", another_job_gets_there_first)
    with other_job:
        with pytest.raises(CrosscodersError, match="another train-sae job is writing"):
            train([SMALL], small_source(), [run], progress=False)
        assert run.is_dir()  # the other job's folder, empty still, is left to it


def test_a_run_folder_given_with_a_tilde_is_locked_where_the_run_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train([replace(SMALL, steps=2)], small_source(), [Path("~/run")], progress=False)
    assert (tmp_path / "~" / "run" / "cfg.json").exists() and not (tmp_path / "home").exists()


def test_resuming_a_sweeps_folder_without_its_sweep_names_the_sweeps_runs(tmp_path):
    runs = expand_sweep(replace(SMALL, steps=2), ["k=4,8"])
    train([cfg for _, cfg in runs], small_source(), [tmp_path / "sweep" / name for name, _ in runs], progress=False)
    with pytest.raises(CrosscodersError, match=re.escape("sweep holds the runs of a sweep (k4, k8), not one run; resume them with the --sweep options")):
        train([replace(SMALL, steps=2)], small_source(), [tmp_path / "sweep"], resume=True, progress=False)


def test_a_sweep_stopped_while_writing_its_runs_settings_resumes(tmp_path, monkeypatch):
    runs = expand_sweep(replace(SMALL, steps=12), ["k=4,8"])
    configs, folders = [cfg for _, cfg in runs], [tmp_path / "sweep" / name for name, _ in runs]
    begin = Run.begin
    monkeypatch.setattr(Run, "begin", lambda run, data: (_ for _ in ()).throw(Interrupted()) if run.cfg.k == 8 else begin(run, data))
    with pytest.raises(Interrupted):  # the first run's settings are written, the second's not
        train(configs, small_source(), folders, progress=False)
    monkeypatch.setattr(Run, "begin", begin)
    assert [(folder / "train_config.json").exists() for folder in folders] == [True, False]
    train(configs, small_source(), folders, resume=True, progress=False)
    train(configs, small_source(), [tmp_path / "whole" / name for name, _ in runs], progress=False)
    for name, _ in runs:
        assert_same_tensors(weights(tmp_path / "sweep" / name), weights(tmp_path / "whole" / name))


@pytest.mark.parametrize("file, content", [("train_config.json", "null"), ("metrics.jsonl", "1\n"),
                                           ("checkpoint/trainer_state.json", "[]")])
def test_run_files_of_the_wrong_shape_are_one_line_errors(tmp_path, file, content):
    train([replace(SMALL, steps=10)], small_source(), [tmp_path], progress=False)
    (tmp_path / file).write_text(content)
    with pytest.raises(CrosscodersError, match=r"is damaged .*; restore it"):
        train([replace(SMALL, steps=10)], small_source(), [tmp_path], resume=True, progress=False)


def test_a_checkpoint_without_auxk_capacities_resumes_and_one_with_bad_ones_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        train([SMALL], InterruptAt(small_source(), at=13), [tmp_path], progress=False)
    state_file = tmp_path / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert len(state["dead_capacities"]) == 2
    state_file.write_text(json.dumps({**state, "dead_capacities": [3]}))
    with pytest.raises(CrosscodersError, match=r"checkpoint is damaged .*dead_capacities \[3\].*; restore it"):
        train([SMALL], small_source(), [tmp_path], resume=True, progress=False)
    del state["dead_capacities"]  # as checkpoints written before they were saved
    state_file.write_text(json.dumps(state))
    assert train([SMALL], small_source(), [tmp_path], resume=True, progress=False)[0]["step"] == 30


def test_metrics_of_rows_that_do_not_vary_are_null_not_nan_in_plain_json(tmp_path):
    source = small_source()
    source.val_acts, source.val_layers = source.val_acts[:1], source.val_layers[:1]  # one held-out row: no variance
    train([replace(SMALL, steps=10)], source, [tmp_path], progress=False)
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [record for record in records if record["split"] == "val"]
    assert val and all(r["fvu"] is None and r["fvu_by_layer"] == {} and r["fvu_layer_mean"] is None for r in val)
    assert all(isinstance(r["mse"], float) for r in val)


@pytest.mark.parametrize("damage", ["truncate optimizer.safetensors", "truncate trainer_state.json",
                                    "delete trainer_state.json"])
def test_resuming_from_a_damaged_checkpoint_is_refused_in_one_line_and_changes_nothing(tmp_path, damage):
    train([replace(SMALL, steps=10)], small_source(), [tmp_path], progress=False)
    verb, name = damage.split()
    file = tmp_path / "checkpoint" / name
    if verb == "truncate":
        file.write_bytes(file.read_bytes()[:20])
    else:
        file.unlink()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CrosscodersError, match=rf"^{re.escape(str(tmp_path / 'checkpoint'))}.* is damaged .*; restore it, "
                                               "or delete it to train from the start$"):
        train([replace(SMALL, steps=10)], small_source(), [tmp_path], resume=True, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_damaged_data_json_is_a_one_line_error(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "data.json").write_text('{"shards": ')
    with pytest.raises(CrosscodersError, match=r"data.json is damaged \(.*\); restore it, or train into a new folder$"):
        run_data(tmp_path / "checkpoint")  # found from the checkpoint as from the run


def test_expand_sweep_names_runs_and_checks_values():
    runs = expand_sweep(TrainConfig(), ["k=16,32", "expansion=4,8", "normalize=false"])
    assert [name for name, _ in runs] == [
        "k16-expansion4-normalizefalse", "k16-expansion8-normalizefalse",
        "k32-expansion4-normalizefalse", "k32-expansion8-normalizefalse",
    ]
    assert (runs[1][1].k, runs[1][1].expansion, runs[1][1].normalize) == (16, 8, False)
    assert expand_sweep(TrainConfig(), []) == [("", TrainConfig())]
    assert [cfg.tokens for _, cfg in expand_sweep(TrainConfig(), ["tokens=20K,1M"])] == [20_000, 1_000_000]
    bad_sweeps = (["depth=2"], ["k=16", "k=32"], ["k"], ["k=1.5"], ["normalize=maybe"], ["k=0"], ["lr_decay=no"],
                  ["k=4,04"], ["lr=0.001,1e-3"])  # the same value twice, written two ways
    for bad in (*bad_sweeps, ["steps=1x"]):
        with pytest.raises(CrosscodersError):
            expand_sweep(TrainConfig(), bad)


def test_lr_warms_up_then_decays():
    cosine = TrainConfig(lr=1.0, warmup_steps=10)
    assert [lr_at(cosine, step, 100) for step in (0, 9)] == [0.1, 1.0]
    assert lr_at(cosine, 10, 100) == 1.0 and lr_at(cosine, 100, 100) == pytest.approx(0.1)
    assert lr_at(cosine, 55, 100) == pytest.approx(0.55) and lr_at(cosine, 32.5, 100) == pytest.approx(0.1 + 0.45 * (1 + 0.5 ** 0.5))
    linear = TrainConfig(lr=1.0, warmup_steps=10, lr_decay="linear")
    assert lr_at(linear, 79, 100) == 1.0 and lr_at(linear, 90, 100) == pytest.approx(0.5)
    assert lr_at(linear, 99, 100) == pytest.approx(0.05)
    long_warmup = TrainConfig(lr=1.0, warmup_steps=100, lr_decay="linear")  # past 80% of the run: decays after it
    assert [lr_at(long_warmup, step, 110) for step in (99, 100, 105)] == [1.0, 1.0, pytest.approx(0.5)]


def test_wandb_failing_to_start_is_a_one_line_error_and_resume_goes_on(tmp_path, monkeypatch):
    def init(**options):
        raise RuntimeError("api_key not configured\n(no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(CrosscodersError, match=r"^wandb could not start a run for .*a \(api_key not configured \(no-tty\)\); log in"):
        train([replace(SMALL, steps=4, wandb=True)], small_source(), [tmp_path / "a"], progress=False)
    assert train([replace(SMALL, steps=4)], small_source(), [tmp_path / "a"], resume=True, progress=False)[0]["step"] == 4


@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\n(details)"),
                                     RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_is_one_line_naming_the_checkpoint_and_what_to_lower(tmp_path, failure):
    with pytest.raises(CrosscodersError) as error:
        train([SMALL], InterruptAt(small_source(), at=12, error=failure), [tmp_path / "run"], progress=False)
    text = str(error.value)
    assert text.startswith(f"out of memory ({str(failure).splitlines()[0]}); last checkpoints: {tmp_path / 'run'} step 10; "
                           "train with a lower --batch-size or --expansion") and "\n" not in text


def test_wandb_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    configs = [replace(SMALL, wandb=True), replace(SMALL, k=8, wandb=True)]
    train(configs, small_source(), [tmp_path / "a", tmp_path / "b"], progress=False)
    assert list((tmp_path / "a").glob("wandb/offline-run-*")) and list((tmp_path / "b").glob("wandb/offline-run-*"))


def test_a_training_run_given_as_shards_names_the_store_it_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    with pytest.raises(CrosscodersError, match=f"^{run} is a training run, not an activation store; pass the store it was trained on$"):
        open_store(str(run))
    (run / "data.json").write_text(json.dumps({"shards": "/data/store"}))
    with pytest.raises(CrosscodersError, match=f"^{run} is a training run, .*; pass the store it was trained on, --shards /data/store$"):
        open_store(str(run))


def test_training_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(7)
    expected = torch.randn(3)
    torch.manual_seed(7)
    train([SMALL], small_source(), [tmp_path / "run"], progress=False)
    assert torch.equal(torch.randn(3), expected)
