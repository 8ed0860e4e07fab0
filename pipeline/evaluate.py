"""Stage three: splice the SAE into the model at each layer and measure the next-token loss it costs.

Positions. A hidden state is spliced (and MSE, FVU and L0 measured) exactly at the positions stage one
records: every real token but those the store's `skipped` names (pipeline/positions.py), by default position 0,
special tokens and the chat template's start every document shares. Those keep their clean values: the attention
sinks among them have norms far outside what the SAE was trained on.
Losses score the prediction made at each spliced position of the document's next token; the last token
of a document predicts nothing and padding is never scored.
"""

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch import nn

from pipeline.cache import pack_batches
from pipeline.cli import local_path, option, print_note
from pipeline.devices import resolve_device, resolve_model_dtype
from pipeline.errors import CrosscodersError
from pipeline.files import write_whole
from pipeline.hidden_states import hidden_state_module, hooked, output_tensor
from pipeline.layers import stored_layers
from pipeline.loader import stats_from_sums
from pipeline.models import LoadedModel, ModelInfo, load_model
from pipeline.positions import RECORD_ALL, SkippedPositions
from pipeline.sae import CONFIG_FILE, TopKSAE, load
from pipeline.storage import Location
from pipeline.store import Store
from pipeline.train import CHECKPOINT, DATA_FILE, TRAIN_CONFIG_FILE, finite_or_null, run_data, trained_layers

Reconstruct = Callable[[torch.Tensor, int], torch.Tensor]  # (x: [n, d_model], layer) -> x_hat: [n, d_model]
EVAL_FILE, PLOT_FILE = "eval.json", "recovered.png"


@dataclass(frozen=True)
class EvalConfig:
    """Options of `eval-sae`; saved, with the defaults filled in, inside eval.json."""

    sae: str = option("./runs/sae", "Training run folder (or its checkpoint/) holding the SAE, or a sweep's folder (train-sae "
                                     "--sweep's --out): each of its finished runs, in one pass.")
    model: str | None = option(None, "Model to splice into; default: the one the store was cached from.")
    shards: str | None = option(None, "Activation store whose held-out documents are scored; default: the run's (data.json).")
    layers: str = option("trained", "Hidden states to evaluate: trained (those the SAE was trained on), all (the store's), 0-24, "
                                    "or 4,8,12.")
    n_docs: int = option(64, "Held-out documents to score, evenly spaced over the corpus.")
    batch_tokens: int = option(2048, "Token budget of a forward batch, padding included.")
    device: str = option("auto", "Device for the model and the SAE: auto, cpu, cuda, cuda:1, ...")
    model_dtype: str = option("auto", "Dtype the model runs in: bf16, float16, float32, or auto: the one the store was cached in.")
    out: str | None = option(None, "Folder for eval.json and recovered.png; default: RUN/eval (RUN/eval-checkpoint for RUN/checkpoint). "
                                   "For a sweep, OUT/RUN for each run.")

    def __post_init__(self):
        if self.n_docs < 1 or self.batch_tokens < 2:
            raise CrosscodersError(f"--n-docs must be at least 1 and --batch-tokens at least 2, got {self.n_docs} and {self.batch_tokens}")


@dataclass(frozen=True)
class LayerEval:
    """Metrics of the SAE spliced in at one hidden state; CE and KL in nats per scored token."""

    layer: int
    n_tokens: int  # scored next-token predictions
    ce_clean: float
    ce_sae: float
    ce_zero: float  # hidden state replaced by zeros
    ce_mean: float  # hidden state replaced by its mean over the store's training rows
    kl: float  # KL(clean || SAE-spliced)
    mse: float  # mean over elements of (x_hat - x)^2, raw activations
    fvu: float  # sum ||x_hat - x||^2 / sum ||x - mean of the evaluated x||^2
    l0: float | None  # active latents per row; None when a plain reconstruct function was evaluated

    @property
    def recovered_loss(self) -> float:
        """(CE_zero - CE_sae) / (CE_zero - CE_clean): SAELens' ce_loss_score, 1 when the SAE costs nothing."""
        return _fraction(self.ce_zero - self.ce_sae, self.ce_zero - self.ce_clean)

    @property
    def recovered_loss_mean(self) -> float:
        """The same against mean ablation, a stronger baseline than zeros."""
        return _fraction(self.ce_mean - self.ce_sae, self.ce_mean - self.ce_clean)

    def to_dict(self) -> dict:
        return {**asdict(self), "recovered_loss": self.recovered_loss, "recovered_loss_mean": self.recovered_loss_mean}


def _fraction(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


@contextmanager
def splice(model: nn.Module, layer: int, positions: torch.Tensor, reconstruct: Reconstruct):
    """Within the block, hidden state `layer` at positions ([batch, seq] bool) is replaced by reconstruct(x, layer)."""

    def hook(module, args, output):
        hidden = output_tensor(output)  # [batch, seq, d_model]
        spliced = hidden.clone()
        spliced[positions] = reconstruct(hidden[positions], layer).to(hidden.dtype)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    with hooked([(hidden_state_module(model, layer), hook)]):
        yield


def next_token_log_probs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] float32 of the predictions at scored ([batch, seq - 1] bool) positions."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[:, :-1][scored])  # the unembedding only where it is scored
    return F.log_softmax(logits.float(), dim=-1)


@dataclass
class _Sums:
    """Running float64 sums over the evaluated tokens of one SAE spliced in at one layer."""

    ce: float = 0.0  # summed next-token loss
    kl: float = 0.0
    n_rows: int = 0
    sum_x: torch.Tensor | float = 0.0  # [d_model] once rows are added
    sum_sq: float = 0.0  # sum ||x||^2
    sum_error: float = 0.0  # sum ||x_hat - x||^2
    n_active: int = 0  # latents that fired, over all rows

    def add_rows(self, x: torch.Tensor, x_hat: torch.Tensor):
        x64 = x.double()
        self.sum_x = self.sum_x + x64.sum(0)
        self.n_rows += len(x)
        self.sum_sq += x64.pow(2).sum().item()
        self.sum_error += (x_hat.double() - x64).pow(2).sum().item()


@torch.no_grad()
def evaluate(
    sae: TopKSAE | Reconstruct,
    model: nn.Module,
    docs: Iterable[tuple[int, np.ndarray]],
    layers: list[int],
    means: torch.Tensor,
    skipped: SkippedPositions = RECORD_ALL,
    batch_tokens: int = 2048,
    progress: Progress | None = None,
) -> list[LayerEval]:
    """Clean, SAE-spliced, zero- and mean-ablated next-token loss, KL, MSE, FVU and L0 per hidden state.

    docs: (doc_index, token ids) pairs, e.g. `Store.documents("val")`; means: [n_hidden_states, d_model], the
    mean-ablation values; skipped: the positions stage one did not record, left clean; `sae` may also be any
    reconstruct(x, layer) -> x_hat function (then l0 is None).
    The model runs clean once per batch and three times per layer (SAE, zeros, mean), on its own device.
    """
    return evaluate_all([sae], model, docs, layers, means, skipped, batch_tokens, progress)[0]


@torch.no_grad()
def evaluate_all(
    saes: list[TopKSAE | Reconstruct],
    model: nn.Module,
    docs: Iterable[tuple[int, np.ndarray]],
    layers: list[int],
    means: torch.Tensor,
    skipped: SkippedPositions = RECORD_ALL,
    batch_tokens: int = 2048,
    progress: Progress | None = None,
) -> list[list[LayerEval]]:
    """`evaluate` of each SAE of a sweep on the same documents, the results each would have alone: the model runs clean
    and ablated once per batch and layer for them all, so n SAEs cost 1 + layers x (2 + n) passes, not n x (1 + 3 x layers)."""
    device = next(model.parameters()).device
    sums = [{layer: _Sums() for layer in layers} for _ in saes]
    ablated = {layer: {"zero": 0.0, "mean": 0.0} for layer in layers}  # summed next-token loss with the state ablated
    ce_clean, n_scored = 0.0, 0
    batches = list(pack_batches(docs, batch_tokens, pad_id=0))  # padding is masked, so its id does not matter
    task = progress.add_task("evaluating", total=len(batches) * len(layers)) if progress else None
    for packed in batches:
        recorded = torch.zeros_like(packed.attention_mask, dtype=torch.bool)  # [batch, seq]: what stage one records
        for row, tokens in enumerate(packed.doc_tokens):
            recorded[row, : len(tokens)] = torch.from_numpy(~skipped.mask(tokens))
        input_ids, attention_mask = packed.input_ids.to(device), packed.attention_mask.to(device)
        recorded = recorded.to(device)
        scored = recorded[:, :-1] & attention_mask[:, 1:].bool()  # [batch, seq - 1]: has a next token to predict
        targets = input_ids[:, 1:][scored]  # [n]

        def loss_with(layer: int, reconstruct: Reconstruct) -> tuple[float, torch.Tensor]:
            with splice(model, layer, recorded, reconstruct):
                log_probs = next_token_log_probs(model, input_ids, attention_mask, scored)
            return F.nll_loss(log_probs, targets, reduction="sum").item(), log_probs

        clean = next_token_log_probs(model, input_ids, attention_mask, scored)  # [n, vocab]
        ce_clean += F.nll_loss(clean, targets, reduction="sum").item()
        n_scored += len(targets)
        for layer in layers:
            for sae, of_sae in zip(saes, sums):
                loss, log_probs = loss_with(layer, _measured(sae, of_sae[layer]))
                of_sae[layer].ce += loss
                of_sae[layer].kl += F.kl_div(log_probs, clean, log_target=True, reduction="sum").item()
            ablated[layer]["zero"] += loss_with(layer, lambda x, _: torch.zeros_like(x))[0]
            ablated[layer]["mean"] += loss_with(layer, lambda x, h: means[h].to(x).expand_as(x))[0]
            if progress:
                progress.advance(task)
    if n_scored == 0:
        raise CrosscodersError("the documents have no scored positions (each needs a recorded token followed by another)")
    return [[_layer_eval(layer, of_sae[layer], ablated[layer], ce_clean, n_scored, isinstance(sae, TopKSAE)) for layer in layers]
            for sae, of_sae in zip(saes, sums)]


def _measured(sae: TopKSAE | Reconstruct, sums: _Sums) -> Reconstruct:
    """The reconstruct function of an SAE (float32) or a plain function, adding each batch's rows to sums."""

    def reconstruct(x: torch.Tensor, layer: int) -> torch.Tensor:
        if isinstance(sae, TopKSAE):
            layer_ids = torch.full((len(x),), layer, device=x.device)
            top_values, top_indices = sae.encode(x.to(sae.W_enc.dtype), layer_ids)
            x_hat = sae.decode(top_values, top_indices, layer_ids)
            sums.n_active += int((top_values > 0).sum())
        else:
            x_hat = sae(x, layer)
        sums.add_rows(x, x_hat)
        return x_hat

    return reconstruct


def _layer_eval(layer: int, sums: _Sums, ablated: dict, ce_clean: float, n_scored: int, is_sae: bool) -> LayerEval:
    deviation = sums.sum_sq - sums.sum_x.pow(2).sum().item() / sums.n_rows  # sum ||x - mean||^2
    return LayerEval(
        layer=layer,
        n_tokens=n_scored,
        ce_clean=ce_clean / n_scored,
        ce_sae=sums.ce / n_scored,
        ce_zero=ablated["zero"] / n_scored,
        ce_mean=ablated["mean"] / n_scored,
        kl=sums.kl / n_scored,
        mse=sums.sum_error / (sums.n_rows * len(sums.sum_x)),
        fvu=_fraction(sums.sum_error, deviation),
        l0=sums.n_active / sums.n_rows if is_sae else None,
    )


def layer_means(store: Store) -> torch.Tensor:
    """Mean of each hidden state over the store's training rows: [n_hidden_states, d_model] float32 (0 where unseen)."""
    return stats_from_sums(*store.layer_stats_sums()).mean.float()


def average(results: list[LayerEval]) -> dict:
    """Each metric averaged over the evaluated layers (every layer scores the same tokens)."""
    records = [r.to_dict() for r in results]
    keys = [k for k in records[0] if k not in ("layer", "n_tokens") and records[0][k] is not None]
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def plot_recovered(results: list[LayerEval], path: Path, title: str):
    """Fraction of CE loss recovered per hidden state, against zero and mean ablation, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's plotting backend alone

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    layers = [r.layer for r in results]
    axes.plot(layers, [r.recovered_loss for r in results], "o-", label="vs zero ablation")
    axes.plot(layers, [r.recovered_loss_mean for r in results], "s-", label="vs mean ablation")
    axes.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    axes.set(xlabel="hidden state (0 = embeddings)", ylabel="fraction of CE loss recovered", title=title)
    axes.legend()
    write_whole(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))


def resolve(config: EvalConfig, data: dict | None) -> tuple[EvalConfig, Store]:
    """The store, opened, and the config with it, the model and the output folder filled in from the run's data.json
    (data), every path absolute (config.sae already is): eval.json records them, to be found from any folder."""
    run = Path(config.sae)
    store = store_of_run(run, config.shards, data)
    model = config.model or store.metadata["model"]["name"]
    return replace(config, shards=store.url, model=model, out=str(output_folder(config))), store


def output_folder(config: EvalConfig) -> Path:
    """--out, or RUN/eval (RUN/eval-checkpoint for RUN/checkpoint)."""
    return local_path(config.out, "--out") if config.out else default_output(Path(config.sae), "eval")


def default_output(sae_dir: Path, name: str) -> Path:
    """RUN/name, or RUN/stem-checkpoint.suffix for RUN/checkpoint: never inside it, as the trainer replaces it wholesale."""
    if sae_dir.name != CHECKPOINT:
        return sae_dir / name
    return sae_dir.parent / f"{Path(name).stem}-{CHECKPOINT}{Path(name).suffix}"


def check_output_folder(folder: Path, option: str) -> None:
    """Fails now, in one line, where folder cannot be written (or made), rather than after the long computation. Makes
    nothing: the outputs make their folder when written, so a run that fails leaves none."""
    try:
        existing = folder
        while True:  # up to what is there: lstat says why a name cannot be (too long, under a file), exists() does not
            try:
                os.lstat(existing)
                break
            except FileNotFoundError:
                existing = existing.parent
        if existing.is_symlink() and not existing.exists():
            raise FileNotFoundError(2, f"{existing} is a link that leads nowhere")
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        if existing == folder:
            tempfile.TemporaryFile(dir=folder).close()
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, f"Permission denied in {existing}")
    except OSError as error:
        raise CrosscodersError(f"cannot write to {folder} ({error.strerror}); pass a writable path as {option}") from None


def store_of_run(run: Path, shards: str | None, data: dict | None) -> Store:
    """The store given (--shards), else the one the run's data.json (data) names; refused unless it holds activations
    of the model the SAE was trained on."""
    if shards is None and data is None:
        raise CrosscodersError(f"{run} has no {DATA_FILE} saying which store it was trained on; pass --shards")
    if shards is None and not Location(data["shards"]).entries():
        raise CrosscodersError(f"the store {run / DATA_FILE} names, {data['shards']}, is not there; if it has moved, pass "
                               "--shards with its new place")
    store = Store(shards or data["shards"])
    cached = store.metadata["model"]
    if data is not None and data["model"]["fingerprint"] != cached["fingerprint"]:
        raise CrosscodersError(
            f"{store.url} holds activations of {cached['name']!r}, but the SAE was trained on {data['model']['name']!r}; "
            "pass a store of that model as --shards"
        )
    return store


def layers_of_run(spec: str, store: Store, data: dict | None, sae: TopKSAE) -> list[int]:
    """The hidden states --layers names: trained (those of the run's data.json; the store's without one), all (the
    store's) or a layer list, each checked to be in the store and normalized by the SAE."""
    held = store.metadata["layers"]
    if spec.strip() == "trained" and data is not None:
        missing = [layer for layer in trained_layers(data) if layer not in held]
        if missing:
            raise CrosscodersError(f"{store.url} was not cached at hidden state {missing[0]}, which the SAE was trained on; "
                                   f"pick from {held} with --layers")
        layers = trained_layers(data)
    else:
        layers = stored_layers("all" if spec.strip() == "trained" else spec, held, store.n_hidden_states)
    sae.check_normalized(layers)
    return layers


def load_model_of_store(store: Store, model: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """--model (model), else the model the store was cached from, checked to be the store's."""
    try:
        loaded = load_model(model or store.metadata["model"]["name"], device=device, dtype=dtype)
    except CrosscodersError as error:
        if model is not None:
            raise
        raise CrosscodersError(f"{error} (the model {store.url} was cached from; if it has moved, pass --model)") from None
    check_model_of_store(loaded.info, store)
    return loaded


def check_model_of_store(info: ModelInfo, store: Store):
    """Raise unless the model is the one the store was cached from: another model of the same shape would pass unnoticed."""
    fingerprint = store.metadata["model"]["fingerprint"]
    if fingerprint.startswith("config-sha256:"):  # the config alone: no model's fingerprint matches it now
        raise CrosscodersError(f"{store.url} was cached before a model's fingerprint covered its weights ({fingerprint}); "
                               "cache it again with cache-acts into a new --out")
    if info.fingerprint != fingerprint:
        raise CrosscodersError(
            f"model {info.name!r} ({info.fingerprint}) is not the model the store was cached from ({fingerprint}); "
            "pass that model as --model"
        )


@dataclass(frozen=True)
class Evaluated:
    """One SAE's evaluation, as eval-sae wrote it."""

    config: EvalConfig  # resolved: its paths absolute, recorded in eval.json
    results: list[LayerEval]
    eval_path: Path
    plot_path: Path


def run_eval(config: EvalConfig, console: Console | None = None, progress: bool = True) -> tuple[list[LayerEval], Path, Path]:
    """`eval-sae`: evaluates a trained SAE on the store's held-out documents; returns results, eval.json and the plot."""
    (evaluated,) = evaluate_runs([replace(config, sae=str(local_path(config.sae, "--sae")))], console, progress)
    return evaluated.results, evaluated.eval_path, evaluated.plot_path


def sweep_runs(folder: Path) -> list[Path]:
    """The runs of a sweep's folder that hold their final SAE, by name; none when folder is no sweep's (an SAE's
    folder, a run still training, anything else)."""
    if not folder.is_dir() or (folder / CONFIG_FILE).is_file() or (folder / CHECKPOINT).is_dir():
        return []
    return sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}") if (p.parent / TRAIN_CONFIG_FILE).is_file())


def finished_runs(sweep: Path) -> list[Path]:
    """sweep_runs, refused in one line when there is none."""
    runs = sweep_runs(sweep)
    if not runs:
        raise CrosscodersError(f"{sweep} holds no finished run of a sweep; pass a sweep's --out, a training run or its checkpoint/")
    return runs


def note_unfinished(sweep: Path, finished: list[Path], console: Console, verbs: tuple[str, str]):
    """Names in a note the sweep's runs that hold a checkpoint but no final SAE yet, as not done (verbs: ("evaluated",
    "evaluate"), what the command does to a run)."""
    unfinished = sorted({p.parent.parent.name for p in sweep.glob(f"*/{CHECKPOINT}/{CONFIG_FILE}")} - {run.name for run in finished})
    if unfinished:
        done, do = verbs
        print_note(f"{', '.join(unfinished)}: no final SAE yet (still training, or stopped): not {done}; pass RUN/{CHECKPOINT} "
                   f"to {do} one", console)


def evaluate_runs(configs: list[EvalConfig], console: Console | None, progress: bool) -> list[Evaluated]:
    """Evaluates the SAE of each config (its sae an absolute path, its other options the same) on the same documents,
    and writes each one's eval.json and plot. The runs must have been trained on the same store and hidden states."""
    console = console or Console(stderr=True)
    device = resolve_device(configs[0].device)
    saes = [load(config.sae, device) for config in configs]
    datas = [run_data(Path(config.sae)) for config in configs]
    for config, data in zip(configs[1:], datas[1:]):
        check_trained_alike(Path(configs[0].sae), datas[0], Path(config.sae), data)
    given_model = configs[0].model
    first, store = resolve(configs[0], datas[0])
    configs = [first] + [replace(first, sae=config.sae, out=str(output_folder(config))) for config in configs[1:]]
    for config in configs:  # before the model loads: an --out that cannot be written fails at once
        check_output_folder(Path(config.out), "--out")
    model_dtype = resolve_model_dtype(first.model_dtype, device, store.metadata.get("model_dtype"))
    loaded = load_model_of_store(store, given_model, device, model_dtype)
    info = loaded.info
    for sae in saes:
        sae.check_compatible(info.d_model, info.n_hidden_states)
    layers = layers_of_run(first.layers, store, datas[0], saes[0])
    for sae in saes[1:]:  # the same hidden states (check_trained_alike), which each SAE must have statistics for
        sae.check_normalized(layers)
    docs = store.spread_documents("val", first.n_docs)
    if not docs:
        raise CrosscodersError(f"{store.url} holds no held-out documents; cache more tokens or raise --val-fraction")
    if len(docs) < first.n_docs:
        console.print(Text(f"{store.url} holds {len(docs)} held-out documents, fewer than --n-docs {first.n_docs}: scoring those"),
                      soft_wrap=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=not progress) as bar:
        all_results = evaluate_all(saes, loaded.model, docs, layers, layer_means(store).to(device),
                                   SkippedPositions.from_dict(store.metadata["skipped"]), first.batch_tokens, bar)
    model = {"model": info.to_dict(), "model_dtype": str(model_dtype).removeprefix("torch."), "n_docs": len(docs)}
    return [write_eval(config, results, model) for config, results in zip(configs, all_results)]


def check_trained_alike(run: Path, data: dict | None, other: Path, its_data: dict | None):
    """Raise unless two runs of a sweep were trained on the same store, model and hidden states (their data.json)."""
    def trained(data: dict | None):
        return None if data is None else (data["shards"], data["model"]["fingerprint"], trained_layers(data))

    if trained(its_data) != trained(data):
        raise CrosscodersError(f"{other} and {run} were not trained on the same store, model and hidden states "
                               f"({DATA_FILE}); pass them one at a time")


def write_eval(config: EvalConfig, results: list[LayerEval], model: dict) -> Evaluated:
    """Writes eval.json (config, the model's record, results, their average) and recovered.png into config.out."""
    report = {"config": asdict(config), **model, "n_tokens": results[0].n_tokens, "layers": [r.to_dict() for r in results],
              "average": average(results)}
    title = f"{Path(config.sae).resolve().name} on {model['model']['name']}"
    eval_path, plot_path = write_record_and_plot(Path(config.out), EVAL_FILE, report, PLOT_FILE,
                                                 lambda path: plot_recovered(results, path, title))
    return Evaluated(config, results, eval_path, plot_path)


def write_record_and_plot(out: Path, record_name: str, record: dict, plot_name: str, plot: Callable[[Path], None]) -> tuple[Path, Path]:
    """record as out/record_name (a figure that is not finite, such as a 0/0 fraction, as null) and plot(out/plot_name),
    each whole; a failure in one line. Returns both paths."""
    record_path, plot_path = out / record_name, out / plot_name
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_whole(record_path, lambda path: path.write_text(json.dumps(finite_or_null(record), indent=2)))
        plot(plot_path)
    except OSError as error:  # a full disk: the files before stay whole
        raise CrosscodersError(f"cannot write {out} ({error.strerror or error}); free space or pass another --out") from None
    return record_path, plot_path
