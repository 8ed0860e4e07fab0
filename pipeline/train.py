"""Train layer-agnostic TopK SAEs; every run of a sweep reads the same batches, fetched once, in one pass."""

import dataclasses
import json
import math
import os
import typing
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import product
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import distributed
from pipeline.cli import option, print_note
from pipeline.errors import CrosscodersError, Interrupted, one_line, out_of_memory, peer_stopped
from pipeline.files import open_to_all, remove, sync_tree, write_whole
from pipeline.layers import stored_layers
from pipeline.loader import BatchSource, LoaderConfig, ShardLoader
from pipeline.sae import CHECKPOINT, DECODERS, LAYER_ENCODINGS, SAEConfig, TopKSAE, load
from pipeline.storage import Location, exclusive_lock
from pipeline.store import Store
from pipeline.train_step import TrainStep, autocast, check_device
from pipeline.units import parse_count

LR_DECAYS = ("cosine", "linear")
RESUMABLE_CHANGES = ("val_every", "save_every", "wandb", "cuda_graph")  # settings a resumed run may change: not the math
RESUMABLE_LOADER_CHANGES = ("shards", "workers")  # the store may move; not the rows read or validated on
DATA_FILE = "data.json"  # the store a run was trained on; eval-sae and sae-features default to it
TRAIN_CONFIG_FILE = "train_config.json"  # the run's TrainConfig, written when it starts
TRAINER_STATE_FILE = "trainer_state.json"  # in a checkpoint: its step, and the TrainConfig that made it


def counts(flag: str):
    """Parser of counts typed as 20000, 20K or 50M, naming flag in its errors."""
    return partial(parse_count, option=flag)


@dataclass(frozen=True)
class TrainConfig:
    """Options of `train-sae`, one SAE training run; saved as train_config.json."""

    expansion: int = option(4, "Latents per input dimension: n_latents = expansion * d_model.")
    k: int = option(32, "Latents kept per row (TopK).")
    layer_encoding: str = option("sinusoidal", "How the encoder is told the layer: sinusoidal, learned (trained, starting as sinusoidal) or none.")
    normalize: bool = option(True, "Normalize each layer to zero mean and E||x||^2 = d_model, from the cache's stats.")
    decoder: str = option("auto", "Training step: dense (reference), sparse (decoder and encoder gradient touch only the kept latents), triton (sparse, with Triton kernels on CUDA), or auto (dense on CUDA; elsewhere sparse when k / n_latents <= 1/10).")
    lr: float = option(3e-4, "Adam learning rate after warm-up.")
    weight_decay: float = option(0.0, "Decoupled weight decay (AdamW) of the encoder weights; 0: none.")
    warmup_steps: int = option(100, "Steps of linear learning-rate warm-up from 0.")
    lr_decay: str = option("cosine", "After warm-up: cosine (to 10% of lr) or linear (to 0 over the last 20% of the steps, or those after warm-up if fewer).")
    batch_size: int = option(4096, "Rows per step; every run of a sweep shares it.")
    steps: int | None = option(None, "Training steps, e.g. 20K; default: one epoch.", counts("--steps"), str)
    tokens: int | None = option(None, "Training rows instead of steps, e.g. 50M.", counts("--tokens"), str)
    val_every: int = option(200, "Steps between validations.")
    save_every: int = option(1000, "Steps between checkpoints.")
    dead_tokens: int = option(10_000_000, "Rows without firing that make a latent dead.", counts("--dead-tokens"), str)
    auxk_alpha: float = option(1 / 32, "Weight of the AuxK loss (0 turns it off).")
    seed: int = option(0, "Seed of the SAE's initialization (the row order has its own, --shuffle-seed).")
    wandb: bool = option(False, "Also log to Weights & Biases (WANDB_MODE=offline works).")
    cuda_graph: bool | None = option(None, "Replay each step from a CUDA graph: one launch per step instead of hundreds. Default: on for one process on a CUDA device, off elsewhere.")

    def __post_init__(self):
        for name, choices in (("layer_encoding", LAYER_ENCODINGS), ("decoder", DECODERS), ("lr_decay", LR_DECAYS)):
            if getattr(self, name) not in choices:
                raise CrosscodersError(f"{name}={getattr(self, name)!r} is unknown; use one of {choices}")
        for name in ("expansion", "k", "batch_size", "val_every", "save_every", "dead_tokens", "lr"):
            if getattr(self, name) <= 0:
                raise CrosscodersError(f"{name}={getattr(self, name)} must be positive")
        if not 0 <= self.seed < 2**32:
            raise CrosscodersError(f"--seed {self.seed} must be from 0 to {2**32 - 1}")
        if self.warmup_steps < 0:
            raise CrosscodersError(f"warmup_steps={self.warmup_steps} must be at least 0")
        for name in ("lr", "weight_decay", "auxk_alpha"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise CrosscodersError(f"{name}={getattr(self, name)} must be a finite number >= 0")
        if self.steps is not None and self.tokens is not None:
            raise CrosscodersError(f"give steps or tokens, not both (steps={self.steps}, tokens={self.tokens})")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < self.batch_size):
            raise CrosscodersError(f"steps={self.steps}, tokens={self.tokens} train for no step; ask for at least one")

    def sae_config(self, d_model: int, n_layers: int) -> SAEConfig:
        return SAEConfig(d_model, n_layers, self.expansion, self.k, self.layer_encoding, self.normalize, self.decoder)

    def total_steps(self, n_train_batches: int) -> int:
        if self.steps is not None:
            return self.steps
        return n_train_batches if self.tokens is None else self.tokens // self.batch_size


def expand_sweep(base: TrainConfig, sweep: list[str]) -> list[tuple[str, TrainConfig]]:
    """["k=16,32", "expansion=4,8"] -> (run name like "k16-expansion8", config) per combination; [] -> [("", base)]."""
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    axes: dict[str, list[tuple[str, object]]] = {}
    for option_text in sweep:
        name, equals, values = (part.strip() for part in option_text.partition("="))
        if not equals or name not in fields or name in axes:
            raise CrosscodersError(
                f"sweep {option_text!r} must be FIELD=V1,V2,..., each FIELD once, one of {list(fields)}"
            )
        axes[name] = [(text.strip(), parse_value(fields[name], text.strip())) for text in values.split(",")]
        parsed = [value for _, value in axes[name]]
        if len(set(parsed)) < len(parsed):
            raise CrosscodersError(f"sweep {option_text!r} repeats a value ({parsed}); give each value once")
    runs = []
    for combination in product(*axes.values()):
        run_name = "-".join(f"{name}{text}" for name, (text, _) in zip(axes, combination))
        runs.append((run_name, replace(base, **{name: value for name, (_, value) in zip(axes, combination)})))
    return runs


def parse_value(field: dataclasses.Field, text: str):
    """A sweep value from its text, as the CLI would parse it."""
    kind = typing.get_type_hints(TrainConfig)[field.name]
    try:
        if field.metadata.get("parse") is not None:
            return field.metadata["parse"](text)
        if kind in (bool, bool | None):
            return {"true": True, "false": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        raise CrosscodersError(f"sweep value {field.name}={text!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of step (0-based) of total_steps: linear warm-up, then cfg.lr_decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    decay_start = max(cfg.warmup_steps, int(0.8 * total_steps))  # not before warm-up ends: no jump down
    return cfg.lr * min(1.0, (total_steps - step) / max(1, total_steps - decay_start))


class Run:
    """One SAE being trained: its model, its TrainStep (optimizer, dead-latent counter), step count and output folder."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, source: BatchSource, device: torch.device, resume: bool):
        self.cfg, self.dir, self.device = cfg, Path(out_dir), device
        self.n_train_batches = source.n_train_batches()
        self.total_steps = cfg.total_steps(self.n_train_batches)
        sae_cfg = cfg.sae_config(source.d_model, source.n_layers)
        self.resumed_from = latest_checkpoint(self.dir) if resume else None  # every process loads it
        if self.resumed_from is None:
            torch.manual_seed(cfg.seed)
            self.sae = TopKSAE(sae_cfg, source.stats).to(device)
        else:
            self.sae = load(self.resumed_from, device).train().requires_grad_(True)
            self.sae.check_compatible(source.d_model, source.n_layers)
        self.trainer = TrainStep(self.sae, cfg, device)
        self.step, self.checkpoint_step = 0, None  # checkpoint_step: step of the checkpoint on disk
        if self.resumed_from is not None:
            self.load_trainer_state(self.resumed_from)
        self.metrics_file = self.dir / "metrics.jsonl"
        self.wandb = None
        self.last_train: dict = {}
        self.last_val: dict | None = None

    def begin(self, data: dict | None):
        """Write the run's settings (train_config.json, data.json: what its batches are) and its metrics so far,
        once every run of the sweep could be set up; a folder left without them takes a corrected command."""
        if not distributed.is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / TRAIN_CONFIG_FILE, asdict(self.cfg))
        if data is not None:
            write_json(self.dir / DATA_FILE, data)
        self.keep_metrics()

    def start_wandb(self):
        if self.cfg.wandb and distributed.is_main():
            self.wandb = start_wandb(self.cfg, self.dir)

    def keep_metrics(self):
        """Cut metrics.jsonl after the records of the steps the resumed checkpoint has done (a checkpoint waits for
        them all; what follows, a line torn by a crash included, is logged again) and take up the last ones; empty
        it if the run starts afresh. Truncation, not a rewrite: a crash while it runs loses no kept record."""
        kept = metric_lines(self.metrics_file) if self.resumed_from else []
        kept = kept[: next((i for i, (record, _) in enumerate(kept) if record["step"] > self.step), len(kept))]
        with self.metrics_file.open("a") as file:
            file.truncate(kept[-1][1] if kept else 0)
        for record, _ in kept:
            if record["split"] == "train":
                self.last_train = record
            else:
                self.last_val = record

    def train_step(self, x: torch.Tensor, layer: torch.Tensor):
        """Queue one optimizer step on x: [batch, d_model] of layers layer: [batch] (this process's share of the
        batch), and log the step before it, whose metrics come back while this one runs."""
        metrics = self.trainer(x, layer, lr_at(self.cfg, self.step, self.total_steps))
        self.step += 1
        if metrics is not None:
            self.log_train(self.step - 1, metrics)

    def sync(self):
        """Wait for the step in flight and log it: before validating, saving or finishing."""
        metrics = self.trainer.drain()
        if metrics is not None:
            self.log_train(self.step, metrics)

    def log_train(self, step: int, metrics: dict):
        """Log step's metrics; stop if its loss is not finite (they are global, so every process stops alike)."""
        if not math.isfinite(metrics["loss"]):  # checkpoints wait for their last step's metrics: none holds this step
            where = latest_checkpoint(self.dir) or "nowhere (none was saved yet)"
            raise CrosscodersError(f"loss became {metrics['loss']} at step {step}; last good checkpoint kept at {where}")
        self.log({"split": "train", "step": step, **metrics})

    def validate(self, source: BatchSource):
        """Metrics on the held-out rows, logged and kept as last_val; nothing when there are none."""
        self.sync()
        metrics = validation_metrics(self.sae, source, self.device)
        if metrics is not None:
            self.last_val = {"split": "val", "step": self.step, **metrics}
            self.log(self.last_val)

    def log(self, record: dict):
        """Append a record to metrics.jsonl (and wandb)."""
        if record["split"] == "train":
            self.last_train = record
        if not distributed.is_main():
            return
        record = finite_or_null(record)  # plain JSON has no NaN or Infinity (an FVU over rows that do not vary)
        with self.metrics_file.open("a") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb is not None:
            split, step = record["split"], record["step"]
            values = {f"{split}/{name}": value for name, value in record.items() if name not in ("split", "step") and value is not None}
            self.wandb.log(values, step=step)

    def save_checkpoint(self):
        """Write <run>/checkpoint/ atomically: build it beside, then swap it in, so a crash keeps the previous one."""
        self.sync()
        if not distributed.is_main():  # the others hold the same state
            self.checkpoint_step = self.step
            return
        temporary, final, old = (self.dir / f"{CHECKPOINT}{suffix}" for suffix in (".tmp", "", ".old"))
        remove(temporary)  # left by a crash
        self.sae.save(temporary)
        optimizer_state = self.trainer.optimizer.state_dict()["state"]  # {param index: {"step", "exp_avg", "exp_avg_sq"}}
        tensors = {f"{i}.{name}": t.contiguous() for i, state in optimizer_state.items() for name, t in state.items()}
        save_file(tensors, temporary / "optimizer.safetensors")
        save_file(
            {"tokens_since_fired": self.trainer.tokens_since_fired, "cpu_rng_state": torch.get_rng_state()},
            temporary / "trainer_state.safetensors",
        )
        epoch, batch = divmod(self.step, self.n_train_batches)
        state = {"step": self.step, "epoch": epoch, "batch": batch, "n_train_batches": self.n_train_batches,
                 "dead_capacities": [self.trainer.dead_capacity, self.trainer.dead_capacity_after]}
        (temporary / TRAINER_STATE_FILE).write_text(json.dumps({**state, "train_config": asdict(self.cfg)}, indent=2))
        open_to_all(temporary)  # a teammate resuming the run reads it too
        sync_tree(temporary)  # on disk before the swap: else a power cut may leave it swapped in but empty
        if final.exists():  # if not, the save before stopped between its renames: old is the only checkpoint
            remove(old)
            final.rename(old)
        temporary.rename(final)
        self.checkpoint_step = self.step
        remove(old)

    def load_trainer_state(self, checkpoint: Path):
        """Restore the optimizer, step, dead-latent counter and RNG saved by save_checkpoint."""
        try:
            state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
            step, n_train_batches = state["step"], state["n_train_batches"]
            capacities = state.get("dead_capacities")  # older checkpoints lack them
            if capacities is not None and not (len(capacities) == 2 and all(type(c) is int and c >= 0 for c in capacities)):
                raise ValueError(f"dead_capacities {capacities!r}")
            tensors = load_file(checkpoint / "trainer_state.safetensors")
            tokens_since_fired, rng_state = tensors["tokens_since_fired"], tensors["cpu_rng_state"]
            optimizer_state: dict[int, dict] = {}  # {param index: {"step", "exp_avg", "exp_avg_sq"}}
            for key, tensor in load_file(checkpoint / "optimizer.safetensors").items():
                index, name = key.split(".")
                optimizer_state.setdefault(int(index), {})[name] = tensor
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            raise CrosscodersError(f"{checkpoint} is damaged ({error!r}); restore it, or delete it to train "
                                   "from the start") from None
        if n_train_batches != self.n_train_batches:
            raise CrosscodersError(
                f"{checkpoint} was trained on {n_train_batches} batches per epoch, the cache now has "
                f"{self.n_train_batches}; resume on the same cache and batch_size"
            )
        self.step = self.checkpoint_step = step
        self.trainer.load_state(optimizer_state, tokens_since_fired, capacities)
        torch.set_rng_state(rng_state)

    def finish(self) -> dict:
        """Save the final SAE in the run folder, plot the losses; returns the final metrics."""
        if not distributed.is_main():
            return {**self.last_train, **(self.last_val or {})}
        self.sae.save(self.dir)
        plot_losses(read_metrics(self.metrics_file), self.dir / "loss.png")
        if self.wandb is not None:
            self.wandb.finish()
        return {**self.last_train, **(self.last_val or {})}


def train(
    configs: list[TrainConfig],
    source: BatchSource,
    out_dirs: list[Path],
    device: torch.device | str = "cpu",
    resume: bool = False,
    progress: bool = True,
    data: dict | None = None,
) -> list[dict]:
    """Train one SAE per config into its folder, all from the same batches; returns each run's final metrics.

    data describes the batches (store, model, loader settings): saved as each run's data.json, and a resumed run
    must read the same row order."""
    device = torch.device(device)
    if len(configs) != len(out_dirs) or len({Path(d).resolve() for d in out_dirs}) < len(out_dirs):
        raise CrosscodersError(f"give one distinct folder per config ({len(configs)} configs, {len(out_dirs)} folders)")
    if len({cfg.batch_size for cfg in configs}) > 1:
        raise CrosscodersError("runs of a sweep share batches, so batch_size cannot be swept; train them separately")
    if source.n_train_batches() < 1:
        raise CrosscodersError(f"the cache holds less than one batch of {configs[0].batch_size} rows; lower batch_size")
    with ExitStack() as held:
        with distributed.refused_together():  # another job's folder: no process checks what that job writes
            if distributed.is_main():  # the one process that writes the runs' files holds their folders
                for out_dir in out_dirs:
                    held.enter_context(run_folder_held(Path(out_dir)))
        with distributed.refused_together():  # every process has checked the folders before the first writes to them
            started = [(Path(out_dir) / TRAIN_CONFIG_FILE).exists() for out_dir in out_dirs]
            # a sweep stopped while it wrote its runs' settings: under --resume, the runs it had not reached start afresh
            resumes = [resume and (run_started or not any(started)) for run_started in started]
            for cfg, out_dir, run_resumes in zip(configs, out_dirs, resumes):  # every config and folder error before any training
                cfg.sae_config(source.d_model, source.n_layers)
                check_device(cfg, device)
                check_run_folder(cfg, Path(out_dir), run_resumes, data)
                if cfg.wandb:
                    import_wandb()
        with torch.random.fork_rng(devices=[]):  # seeded per run (cfg.seed); the caller's RNG is left as it was
            return _train(configs, out_dirs, resumes, source, device, progress, data)


@contextmanager
def run_folder_held(run_dir: Path) -> typing.Iterator[None]:
    """Holds run_dir for this job (an exclusive flock, as cache-acts holds its store), so that a second train-sae on it,
    which would interleave its metrics and checkpoints with this one's, is refused."""
    run_dir = os.path.realpath(run_dir)  # the folder the run writes: a literal "~" (Location would expand it)
    with exclusive_lock(Location(run_dir), f"another train-sae job is writing {run_dir}; wait for it to end, or "
                                          "choose another --out"):
        yield


def _train(configs: list[TrainConfig], out_dirs: list[Path], resumes: list[bool], source: BatchSource, device: torch.device,
           progress: bool, data: dict | None) -> list[dict]:
    runs = [Run(cfg, out_dir, source, device, run_resumes) for cfg, out_dir, run_resumes in zip(configs, out_dirs, resumes)]
    try:
        return train_runs(runs, source, device, progress, data)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; last checkpoints: {last_checkpoints(runs)}; run the same command{with_resume(runs)} "
                          "to continue") from None
    except (OSError, SafetensorError) as error:  # writing the run folders: a full disk, a folder made read-only
        raise CrosscodersError(f"cannot write the run ({error}); last checkpoints: {last_checkpoints(runs)}; once it can "
                               f"be written, run the same command{with_resume(runs)} to continue") from None
    except (RuntimeError, MemoryError) as error:
        if memory := out_of_memory(error):
            raise CrosscodersError(f"out of memory ({memory}); last checkpoints: {last_checkpoints(runs)}; train with a lower "
                                   "--batch-size or --expansion, or fewer --sweep values, into a new --out (--resume takes a "
                                   f"run's own settings), or run the same command{with_resume(runs)} where there is more memory") from None
        if reason := peer_stopped(error):  # after out_of_memory: NCCL reports a GPU's failed allocation as its own error
            raise CrosscodersError(f"another process of this torchrun job stopped ({reason}); last checkpoints: "
                                   f"{last_checkpoints(runs)}; run the same command{with_resume(runs)} to continue") from None
        raise


def with_resume(runs: list[Run]) -> str:
    """" with --resume" once a run of the sweep has written its settings (what --resume needs), else nothing."""
    return " with --resume" if any((run.dir / TRAIN_CONFIG_FILE).exists() for run in runs) else ""


def last_checkpoints(runs: list[Run]) -> str:
    """Each run's folder and the step of the checkpoint it last finished saving, whole as saves are atomic."""
    return ", ".join(f"{run.dir} {'none yet' if run.checkpoint_step is None else f'step {run.checkpoint_step}'}" for run in runs)


def note_settings_the_runs_never_reach(runs: list[Run]):
    """A note for the runs still to train that are too short for their --dead-tokens (their dead_fraction of 0
    would read as "no dead latents") or for their --warmup-steps (their learning rate stops short of --lr); the runs
    of a sweep that share a note share its line."""
    notes: dict[str, list[str]] = {}
    for run in (run for run in runs if run.step < run.total_steps):
        rows = run.total_steps * run.cfg.batch_size
        if rows < run.cfg.dead_tokens:
            notes.setdefault(f"--dead-tokens {run.cfg.dead_tokens:,} is more than the {rows:,} rows trained on, so no latent "
                             "can count as dead and AuxK never runs; lower --dead-tokens to see them", []).append(run.dir.name)
        if run.total_steps < run.cfg.warmup_steps:
            peak = lr_at(run.cfg, run.total_steps - 1, run.total_steps)
            notes.setdefault(f"--warmup-steps {run.cfg.warmup_steps:,} is more than the {run.total_steps:,} steps, so the learning "
                             f"rate peaks at {peak:.3g}, not --lr {run.cfg.lr:g}; lower --warmup-steps or train longer", []).append(run.dir.name)
    for note, names in notes.items():
        print_note(f"{', '.join(names)}: {note}")


def train_runs(runs: list[Run], source: BatchSource, device: torch.device, progress: bool, data: dict | None) -> list[dict]:
    """train's loop: write each run's settings, train them all from the same batches, finish each."""
    for run in runs:
        run.begin(data)
    for run in runs:  # after every run's settings are written: wandb takes seconds, in which a Ctrl-C may land
        run.start_wandb()
    if distributed.is_main():
        note_settings_the_runs_never_reach(runs)
    start, end = min(run.step for run in runs), max(run.total_steps for run in runs)
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())  # a name
    batch_size, world_size = runs[0].cfg.batch_size, distributed.world_size()
    per_process = " per process" if world_size > 1 else ""
    with Progress(*columns, disable=not progress or not distributed.is_main()) as bar:
        tasks = [bar.add_task(run.dir.name, total=run.total_steps, completed=run.step) for run in runs]
        for step, (x, layer) in zip(range(start, end), batches_from(source, start)):
            if len(x) != batch_size // world_size and (step + 1) % source.n_train_batches():  # an epoch's last may be short
                raise CrosscodersError(f"the cache yields batches of {len(x)} rows{per_process}, not batch_size={batch_size}")
            x, layer = x.to(device), layer.to(device)
            for run, task in zip(runs, tasks):
                if run.step != step or step >= run.total_steps:
                    continue  # resumed ahead of the others, or already done
                run.train_step(x, layer)
                # the last step too is validated, then saved: a run resumed from any checkpoint has all its records
                done = run.step == run.total_steps
                if run.step % run.cfg.val_every == 0 or done:
                    run.validate(source)
                if run.step % run.cfg.save_every == 0 or done:
                    run.save_checkpoint()
                bar.update(task, completed=run.step, description=describe(run))
        return [run.finish() for run in runs]


def batches_from(source: BatchSource, step: int):
    """Training batches from global step on, epoch after epoch."""
    epoch, start_batch = divmod(step, source.n_train_batches())
    while True:
        yield from source.train_batches(epoch=epoch, start_batch=start_batch)
        epoch, start_batch = epoch + 1, 0


@torch.no_grad()
def validation_metrics(sae: TopKSAE, source: BatchSource, device: torch.device) -> dict | None:
    """MSE (normalized and raw), FVU (pooled, per layer and their mean) and L0 over the validation rows; None if there are none."""
    n_layers, d_model = sae.cfg.n_layers, sae.cfg.d_model
    count = torch.zeros(n_layers, dtype=torch.float64, device=device)
    sum_x = torch.zeros(n_layers, d_model, dtype=torch.float64, device=device)
    sum_sq, sum_error = torch.zeros_like(count), torch.zeros_like(count)  # [n_layers]: sum ||x||^2, sum ||x - x_hat||^2
    sum_error_normalized, n_fired = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.float64, device=device)
    for x, layer in source.val_batches():
        x, layer = x.to(device), layer.to(device)
        with autocast(device):
            out = sae(x, layer)
        x64 = x.double()
        count.index_add_(0, layer, torch.ones_like(x64[:, 0]))
        sum_x.index_add_(0, layer, x64)
        sum_sq.index_add_(0, layer, x64.pow(2).sum(1))
        sum_error.index_add_(0, layer, (out.x_hat.double() - x64).pow(2).sum(1))
        sum_error_normalized += (out.x_hat_normalized.double() - out.x_normalized.double()).pow(2).sum()
        n_fired = n_fired + (out.top_values > 0).sum()
    sums = distributed.all_reduce_sum([count, sum_x, sum_sq, sum_error, sum_error_normalized, n_fired])  # over the processes' shares
    count, sum_x, sum_sq, sum_error, sum_error_normalized, n_fired = sums
    n_rows = count.sum()
    if n_rows == 0:
        return None
    deviation = sum_sq - sum_x.pow(2).sum(1) / count.clamp(min=1)  # [n_layers]: sum ||x - mean of its layer||^2
    fvu_by_layer = {str(i): (sum_error[i] / deviation[i]).item() for i in range(n_layers) if deviation[i] > 0}  # 2+ distinct rows
    return {
        "mse": (sum_error_normalized / (n_rows * d_model)).item(),
        "mse_raw": (sum_error.sum() / (n_rows * d_model)).item(),
        "fvu": (sum_error.sum() / (sum_sq.sum() - sum_x.sum(0).pow(2).sum() / n_rows)).item(),
        "l0": (n_fired / n_rows).item(),
        "fvu_by_layer": fvu_by_layer,
        # each layer weighs the same; the pooled fvu, in raw space, is mostly the late layers' of large norm
        "fvu_layer_mean": sum(fvu_by_layer.values()) / len(fvu_by_layer) if fvu_by_layer else None,
    }


def describe(run: Run) -> str:
    """Progress bar label: run name, latest train and validation MSE."""
    val = f"{run.last_val['mse']:.4f}" if run.last_val else "-"
    return f"{run.dir.name} train {run.last_train.get('mse', float('nan')):.4f} val {val}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint folder; the previous one if a crash hit between the two renames of a save."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (run_dir / name / TRAINER_STATE_FILE).exists():
            return run_dir / name
    return None


def check_run_folder(cfg: TrainConfig, run_dir: Path, resume: bool, data: dict | None = None):
    """Raise if run_dir cannot hold a run, holds none to resume or other files, holds a run that is not to be resumed,
    or one saved with settings that change training or the batches it reads."""
    existing = next(folder for folder in (run_dir, *run_dir.resolve().parents) if folder.exists())
    if not existing.is_dir():
        raise CrosscodersError(f"{run_dir} cannot be a run folder: {existing} is a file; train into another one")
    saved_cfg = run_dir / TRAIN_CONFIG_FILE
    if not saved_cfg.exists():
        sweep_runs = sorted(p.parent.name for p in run_dir.glob(f"*/{TRAIN_CONFIG_FILE}")) if run_dir.is_dir() else []
        if resume and sweep_runs:  # the sweep's own folder, given without its --sweep (or with other values)
            raise CrosscodersError(f"{run_dir} holds the runs of a sweep ({', '.join(sweep_runs)}), not one run; "
                                   "resume them with the --sweep options they were started with")
        if resume:
            raise CrosscodersError(f"{run_dir} holds no training run to resume (no train_config.json); train without "
                                   "--resume to start one")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise CrosscodersError(f"{run_dir} holds files but no training run; train into a new or empty folder")
        return
    if not resume:
        raise CrosscodersError(f"{run_dir} already holds a training run; continue it with --resume or train into a new --out")
    if (run_dir / CHECKPOINT).exists() and latest_checkpoint(run_dir) is None:
        raise CrosscodersError(f"{run_dir / CHECKPOINT} is damaged (no trainer_state.json); restore it, or delete it "
                               "to train from the start")
    saved, current = read_json(saved_cfg), asdict(cfg)
    changed = [name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]]
    saved_data = read_json(run_dir / DATA_FILE) if data is not None and (run_dir / DATA_FILE).exists() else None
    if saved_data is not None:
        saved_data.setdefault("loader", {}).setdefault("shuffle_seed", saved.get("seed"))  # once the order's seed
        saved_order, current_order = flatten_data(saved_data), flatten_data(data)
        changed += [name for name in current_order if saved_order.get(name) != current_order[name]]
        saved.update(saved_order)
        current.update(current_order)
    if changed:
        differences = ", ".join(f"{name}={saved.get(name)!r} (now {current[name]!r})" for name in changed)
        raise CrosscodersError(f"cannot resume {run_dir} with other settings: {differences}; use the saved ones")


def flatten_data(data: dict) -> dict:
    """The parts of a data.json that fix a run's batches, as {name: value}: the model, its layers and the loader's
    settings but for those that leave the row order alone."""
    # the loader's --layers as typed may change ("2,1" for "1-2"): train_layers, the list, is compared instead
    loader = {name: value for name, value in data.get("loader", {}).items() if name not in (*RESUMABLE_LOADER_CHANGES, "layers")}
    return {"model": data.get("model"), "layers": data.get("layers"), "train_layers": trained_layers(data), **loader}


def trained_layers(data: dict) -> list[int]:
    """The hidden states a run's data.json says it trained on (all the store's, for runs before train-sae --layers)."""
    return data.get("train_layers", data.get("layers"))


def finite_or_null(value):
    """value with every float that is not finite, inside dicts and lists too, replaced by None."""
    if isinstance(value, dict):
        return {name: finite_or_null(item) for name, item in value.items()}
    if isinstance(value, list):
        return [finite_or_null(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_json(path: Path) -> dict:
    """A JSON object the trainer wrote; a one-line error if it was cut short or altered."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CrosscodersError(f"{path} is damaged ({error}); restore it, or train into a new folder") from None
    if not isinstance(value, dict):
        raise CrosscodersError(f"{path} is damaged (not a JSON object); restore it, or train into a new folder")
    return value


def write_json(path: Path, value: dict) -> None:
    """Write a JSON file whole or not at all (no half file left behind, which would make a new run's folder non-empty)."""
    write_whole(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2)))


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; none if it does not exist."""
    return [record for record, _ in metric_lines(path)]


def metric_lines(path: Path) -> list[tuple[dict, int]]:
    """(record, offset just past its line) of each line of a metrics.jsonl, but for a last line without its newline:
    a record and its newline are one write, so a crash (or a full disk) cut that one short."""
    content = path.read_bytes() if path.exists() else b""
    lines, start = [], 0
    while (end := content.find(b"\n", start)) >= 0:
        if end > start:
            try:
                record = json.loads(content[start:end])
                if not isinstance(record, dict) or not {"split", "step"} <= record.keys():
                    raise ValueError("not a metrics record")
            except ValueError as error:
                line = content.count(b"\n", 0, start) + 1
                raise CrosscodersError(f"{path} is damaged at line {line} ({error}); restore it, or delete that line") from None
            lines.append((record, end + 1))
        start = end + 1
    return lines


def plot_losses(records: list[dict], path: Path):
    """Train and validation MSE (normalized space) over steps, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's plotting backend alone

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    for split, style in (("train", "-"), ("val", "o-")):
        points = [(r["step"], r["mse"]) for r in records if r["split"] == split]
        if points:
            axes.plot(*zip(*points), style, label=split)
    axes.set(xlabel="step", ylabel="MSE (normalized)", yscale="log", title=path.parent.name)
    axes.legend()
    write_whole(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))


def import_wandb():
    """The wandb module; a one-line error if it is not installed."""
    try:
        import wandb
    except ImportError:
        raise CrosscodersError("wandb is not installed: pip install 'crosscoders[wandb]' or train without it") from None
    return wandb


def start_wandb(cfg: TrainConfig, run_dir: Path):
    """A Weights & Biases run for this SAE (one per SAE of a sweep)."""
    wandb = import_wandb()
    try:
        return wandb.init(project="crosscoders", name=run_dir.name, dir=run_dir, config=asdict(cfg), reinit="create_new")
    except Exception as error:  # not logged in, no network: wandb's own exception types
        raise CrosscodersError(f"wandb could not start a run for {run_dir} ({one_line(error)}); log in with `wandb login`, set "
                               "WANDB_MODE=offline, or train without --wandb, then run the same command with --resume") from None


def run_data(run_dir: Path) -> dict | None:
    """A run's data.json (store, model, layers), also found from its checkpoint/ folder; None if absent."""
    for folder in (run_dir, run_dir.parent) if run_dir.name == CHECKPOINT else (run_dir,):
        if (folder / DATA_FILE).is_file():
            return read_json(folder / DATA_FILE)
    return None


def started_shards(run_dirs: list[Path]) -> list[list] | None:
    """The store's shards when the runs started ([name, training rows, held-out rows] each), from the first data.json
    that records them; None for runs begun before data.json did."""
    for run_dir in run_dirs:
        data = run_data(run_dir) or {}
        if "store_shards" in data:
            return data["store_shards"]
    return None


def open_store(shards: str) -> Store:
    """The store --shards names; a training run given in its place is named as such, with the store it read."""
    folder = Path(shards)
    if Location(shards).is_local and (folder / TRAIN_CONFIG_FILE).is_file():
        data = run_data(folder)
        named = f", --shards {data['shards']}" if data else ""
        raise CrosscodersError(f"{shards} is a training run, not an activation store; pass the store it was trained on{named}")
    return Store(shards)


def train_on_store(
    loader_cfg: LoaderConfig, base: TrainConfig, out: Path, sweep: list[str], device: torch.device, resume: bool, progress: bool = True
) -> dict[str, dict]:
    """`train-sae`: one SAE, or every combination of a sweep, trained in one pass over a store's shards."""
    runs = expand_sweep(base, sweep)
    store = open_store(loader_cfg.shards)
    device = distributed.local_device(device)
    rank, world_size = distributed.init_from_env(device)
    try:
        loader_settings = {name: value for name, value in asdict(loader_cfg).items() if name != "workers"}  # each its own
        distributed.check_same_settings({"loader": loader_settings, "train": asdict(base), "sweep": sweep, "out": str(out), "resume": resume})
        layers = stored_layers(loader_cfg.layers, store.metadata["layers"], store.n_hidden_states)
        out_dirs = [out / name if name else out for name, _ in runs]
        # the shards a resumed run started on, else those rank 0 lists: a store that cache-acts is adding to may have
        # grown since, or between the processes' listings
        listed = store.shard_rows()
        started = started_shards(out_dirs) if resume else None
        if resume and started is None and any(run_data(run_dir) for run_dir in out_dirs) and distributed.is_main():
            print_note(f"{out} began before runs recorded their store's shards, so it reads all {len(listed)} the store "
                       "holds now: rows cache-acts added since it began change its batches")
        shards = distributed.from_main(started or listed)
        if not {name for name, _, _ in shards} <= {name for name, _, _ in listed}:  # listed before rank 0 did
            store = open_store(loader_cfg.shards)
        store.keep_shards(shards)
        source = ShardLoader(store, base.batch_size, loader_cfg.shuffle_seed, device, loader_cfg.window_chunks,
                             loader_cfg.workers, loader_cfg.val_rows, rank, world_size, layers)
        if source.n_rows < base.batch_size:  # else every step would train on the whole store, a batch smaller than asked
            kept = "" if loader_cfg.layers.strip() == "all" else f" of hidden states {loader_cfg.layers}"
            raise CrosscodersError(f"{store.url} holds {source.n_rows:,} training rows{kept}, fewer than one batch of "
                                   f"{base.batch_size:,}; lower --batch-size")
        # which store (and so which model and held-out split) made these SAEs, and in which order they read it
        data = {"shards": store.url, "model": store.metadata["model"], "layers": store.metadata["layers"],
                "train_layers": layers, "loader": asdict(loader_cfg),
                "store_shards": shards}
        results = train([cfg for _, cfg in runs], source, out_dirs, device, resume, progress, data)
    finally:
        distributed.close()
    if rank > 0:
        return {}
    return {str(d): r for d, r in zip(out_dirs, results)}
