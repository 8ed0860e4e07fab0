"""Stage one: run the model once over the corpus and store (layer, activation) pairs."""

import contextlib
import functools
import itertools
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from pipeline import distributed
from pipeline.background import ahead_in_process, ahead_in_thread
from pipeline.cli import option
from pipeline.corpus import (
    CorpusConfig,
    check_chat_template,
    dataset_files_fingerprint,
    is_validation,
    iter_documents,
    mined_files_fingerprint,
)
from pipeline.devices import resolve_device, resolve_model_dtype, to_device
from pipeline.errors import CrosscodersError, Interrupted, out_of_memory, peer_stopped
from pipeline.hidden_states import capture_rows
from pipeline.layers import parse_layers
from pipeline.models import DEFAULT_MODEL, decoder_layers, load_model
from pipeline.positions import skipped_positions
from pipeline.shard_writer import RecordedBatch, ShardWriter
from pipeline.storage import Location, exclusive_lock
from pipeline.store import ROW_FIELDS, STORAGE_DTYPES, check_same_sources, create_or_open, layer_sum_tensors, recorded_metadata
from pipeline.units import parse_count, size_text
from pipeline.windows import PairLedger, Window, WindowRecipe, planned_windows, window_rounds

PLANNED_IN_A_PROCESS = {"cuda"}  # device types whose runs plan their windows in another process


@dataclass(frozen=True)
class CacheConfig:
    """Options of `cache-acts` (the corpus has its own CorpusConfig)."""

    model: str = option(DEFAULT_MODEL, "Embedded preset name, local Hugging Face folder, local .gguf file, or hub id.")
    out: str = option("./shards", "Store folder or fsspec URL (s3://bucket/shards); re-running the same command resumes it.")
    n_tokens: int = option(1_000_000, "Total (layer, activation) pairs to store, e.g. 20K, 50M.", parse_count, str)
    layers: str = option("all", "Hidden states to sample from: all, 0-28, or 4,8,12 (0 = embeddings).")
    layers_per_token: str = option("1", "Distinct random layers stored per token: a number, or all.")
    max_seq_len: int = option(1024, "Tokens per document; longer documents are truncated.")
    batch_tokens: int = option(16384, "Token budget of a forward batch, padding included.")
    pack_window: int = option(256, "Documents sorted by length together before packing (less padding); shards end on window ends.")
    skip_special: bool = option(True, "Skip the first position and special tokens (attention sinks with outsized norms).")
    skip_chat_prefix: bool = option(True, "Skip the chat template's start every document shares (system prompt, user header): "
                                          "its hidden states are the same in every document.")
    dtype: str = option("bf16", "Storage dtype of activations: bf16, float16 or float32.")
    model_dtype: str = option("auto", "Dtype the model runs in: bf16, float16, float32, or auto: an existing store's, else bf16 "
                                      "on a GPU with bf16 tensor cores or a CPU with bf16 instructions (AVX512-BF16, AMX), "
                                      "else float32.")
    device: str = option("auto", "Device for the forward pass: auto, cpu, cuda, cuda:1, ...")
    shard_rows: int = option(65536, "Training rows per shard, at least (a shard ends with a packing window; it is written whole, then made visible).")

    def __post_init__(self):
        if self.n_tokens < 1:
            raise CrosscodersError(f"--n-tokens must be positive, got {self.n_tokens}")
        if self.dtype not in STORAGE_DTYPES:
            raise CrosscodersError(f"--dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.max_seq_len < 2:
            raise CrosscodersError("--max-seq-len must be at least 2")
        if self.batch_tokens < self.max_seq_len:
            raise CrosscodersError(f"--batch-tokens ({self.batch_tokens}) must be at least --max-seq-len ({self.max_seq_len})")
        if self.pack_window < 1:
            raise CrosscodersError(f"--pack-window {self.pack_window} must be at least 1 (documents per packing window)")
        if self.shard_rows < 1:
            raise CrosscodersError(f"--shard-rows {self.shard_rows} must be at least 1 (training rows per shard)")


@dataclass(frozen=True)
class CacheReport:
    out: str  # the store's folder or URL
    n_pairs_written: int
    n_pairs_total: int
    n_model_tokens: int
    seconds: float

    @property
    def model_tokens_per_s(self) -> float:
        return self.n_model_tokens / max(self.seconds, 1e-9)


def parse_layers_per_token(spec: str, n_layers: int) -> int:
    """'1'..'n' or 'all' -> how many distinct layers each token contributes."""
    if spec == "all":
        return n_layers
    if not spec.isdigit() or not 1 <= int(spec) <= n_layers:
        raise CrosscodersError(f"--layers-per-token {spec!r} must be 'all' or a number from 1 to {n_layers} (the chosen layers)")
    return int(spec)


@dataclass
class Packed:
    """Documents padded into one batch: right padding, never recorded."""

    doc_index: list[int]
    doc_tokens: list[np.ndarray]
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]


def pack_batches(docs: Iterable[tuple[int, np.ndarray]], batch_tokens: int, pad_id: int, window: int | None = None) -> Iterator[Packed]:
    """Batches of documents: rows x longest row stays within `batch_tokens`.

    Each window of `window` documents is sorted by length before packing, so rows of a batch have
    similar lengths and little padding; batches never span windows. `window=None` packs in corpus order.
    """
    docs = iter(docs)
    if window is None:
        groups = [docs]
    else:
        groups = (sorted(group, key=lambda doc: len(doc[1])) for group in iter(lambda: list(itertools.islice(docs, window)), []))
    for group in groups:
        for batch in _greedy(group, batch_tokens):
            yield _pad(batch, pad_id)


def _greedy(docs: Iterable[tuple[int, np.ndarray]], batch_tokens: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    group, longest = [], 0
    for doc in docs:
        if group and (len(group) + 1) * max(longest, len(doc[1])) > batch_tokens:
            yield group
            group, longest = [], 0
        group.append(doc)
        longest = max(longest, len(doc[1]))
    if group:
        yield group


def _pad(group: list[tuple[int, np.ndarray]], pad_id: int) -> Packed:
    longest = max(len(t) for _, t in group)
    input_ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(group), longest), dtype=torch.long)
    for row, (_, tokens) in enumerate(group):
        input_ids[row, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
        attention_mask[row, : len(tokens)] = 1
    return Packed([d for d, _ in group], [t for _, t in group], input_ids, attention_mask)


def cache_activations(config: CacheConfig, corpus: CorpusConfig, console: Console | None = None, progress: bool = True) -> CacheReport:
    """Caches activations into config.out until it holds config.n_tokens pairs; resumes a partial store.

    Under torchrun, each process takes every N-th packing window not yet stored (pipeline.windows)
    and writes its own shards into the same store.
    """
    console = console or Console(stderr=True)
    device = distributed.local_device(resolve_device(config.device))
    rank, world_size = distributed.init_from_env(device, backend="gloo")  # stage one only exchanges a few counts
    try:
        distributed.check_same_settings({"cache": asdict(config), "corpus": corpus.to_dict()})
        with contextlib.ExitStack() as held:
            return _cache(config, corpus, console, progress and rank == 0, device, rank, world_size, held)
    finally:
        distributed.close()


def _cache(config: CacheConfig, corpus: CorpusConfig, console: Console, progress: bool, device, rank: int, world_size: int,
           held: contextlib.ExitStack) -> CacheReport:
    recorded = recorded_metadata(config.out) or {}  # of the store this run extends, if any
    model_dtype = resolve_model_dtype(config.model_dtype, device, recorded.get("model_dtype"))
    loaded = load_model(config.model, device=device, dtype=model_dtype)
    check_chat_template(corpus, loaded.tokenizer, config.model)
    info = loaded.info
    layers = parse_layers(config.layers, info.n_hidden_states)
    per_token = parse_layers_per_token(config.layers_per_token, len(layers))
    system_prompt = corpus.system_prompt if corpus.text_field is None else None
    skipped = skipped_positions(loaded.tokenizer, config.skip_special, config.skip_chat_prefix, system_prompt, recorded.get("skipped"))
    if len(skipped.shared_prefix) >= config.max_seq_len:  # else every document is cut inside it: a whole corpus read for no pair
        raise CrosscodersError(f"--max-seq-len {config.max_seq_len} ends inside the chat template's shared start "
                               f"({len(skipped.shared_prefix)} tokens, never recorded); raise it or pass --no-skip-chat-prefix")
    metadata = {
        "model": info.to_dict(),
        "dtype": config.dtype,
        "layers": layers,
        "layers_per_token": per_token,
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "cache": asdict(config),
        "skipped": skipped.to_dict(),
        "corpus": corpus.to_dict(),
        "mined_files": mined_files_fingerprint() if corpus.dataset is None else None,
        "dataset_files": dataset_files_fingerprint(corpus),
    }
    if next(iter_documents(corpus), None) is None:  # a bad --dataset fails here, before any store exists
        raise CrosscodersError("the corpus yields no documents; check --dataset and its fields")
    with distributed.refused_together():
        if rank == 0:  # one process holds the store for the job, creates it and clears what a killed run left, before anyone writes
            busy = f"another cache-acts job is writing {config.out}; wait for it to end, or choose another --out"
            out = Location(config.out)
            held.enter_context(exclusive_lock(out, busy))  # its clean-up would delete the shards this one writes
            if not out.exists("zarr.json"):  # refused before a new store records this run's options
                check_disk_space(out, config.n_tokens, info.d_model, config.dtype)
            store = create_or_open(config.out, metadata, sources=False)
    with distributed.refused_together():
        if rank != 0:  # opened once rank 0 has cleaned it (each opening reads every shard's record)
            store = create_or_open(config.out, metadata, clean=False, sources=False)
    stored = store.window_pairs()
    ledger = PairLedger(stored, config.n_tokens)
    if ledger.budget(next(window_rounds(stored, 1))[0]) == 0:  # a store already whole is done, whatever its corpus became
        if rank == 0:
            console.print(Text(f"{store.url} already holds {store.n_pairs:,} pairs (asked for {config.n_tokens:,}); nothing to do"), soft_wrap=True)
        return CacheReport(store.url, 0, store.n_pairs, 0, 0.0)
    with distributed.refused_together():
        check_same_sources(store, metadata)  # documents are about to be added: they must come from the same stream
        check_disk_space(store.location, config.n_tokens - store.n_pairs, info.d_model, config.dtype)

    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recipe = WindowRecipe(corpus, tokenizer, config.max_seq_len, config.pack_window, layers, per_token, skipped,
                          frozenset(stored), rank, world_size)
    planned = _planned_ahead(recipe, device)
    rounds = window_rounds(stored, world_size)
    writer = ShardWriter(store, config.shard_rows)
    n_model_tokens, corpus_ended, start_time = 0, False, time.perf_counter()
    with _progress_bar(console, progress) as bar:
        task = bar.add_task("caching", total=config.n_tokens, completed=ledger.total)
        try:
            for windows in rounds:
                if corpus_ended or ledger.budget(windows[0]) == 0:
                    break
                window, plans = next(planned)
                if window.index != windows[rank]:  # a window lost on its way from the process that planned it
                    raise RuntimeError(f"planned window {window.index} arrived in place of window {windows[rank]}")
                counts = distributed.all_gather_ints([len(window.docs), sum(len(p[0]) for p in plans)])
                ledger.record(windows, [count for _, count in counts])
                corpus_ended = any(n_docs == 0 for n_docs, _ in counts)
                budget = ledger.budget(window.index)
                if window.docs and budget:
                    advance = functools.partial(bar.advance, task)
                    n_model_tokens += _cache_window(loaded.model, window, plans, budget, config, corpus, pad_id, device, writer, advance)
                bar.update(task, completed=ledger.total)  # with the other processes' windows
            writer.close()
            n_model_tokens = sum(tokens for (tokens,) in distributed.all_gather_ints([n_model_tokens]))
            distributed.barrier()  # every process's shards are committed
        except BaseException as error:  # Ctrl-C or an error, said in one line before the clean-up, which a second
            stopped = stopped_caching(error, store.url)  # stop may interrupt (errors.first_stop)
            if stopped is error:
                raise
            raise stopped from None
        finally:
            with contextlib.suppress(Exception):  # the writer's own failure, if it is the error, is raised above
                writer.close(flush=False)  # after a stop, complete shards only, so a rerun resumes exactly; else closed
            planned.close()  # waits for the window being prepared: no thread outlives the run
    report = CacheReport(store.url, ledger.n_new, ledger.total, n_model_tokens, time.perf_counter() - start_time)
    if rank == 0 and ledger.total < config.n_tokens:
        console.print(f"[yellow]the corpus ran out after {ledger.total:,} pairs (asked for {config.n_tokens:,})[/]")
    if progress:  # the summary, once: progress is asked for, and rank 0's alone
        console.print(Text(  # text: the store's path may hold brackets or :codes:
            f"stored {report.n_pairs_written:,} pairs in {report.seconds:.1f} s ({report.model_tokens_per_s:,.0f} model "
            f"tokens/s); {report.out} holds {report.n_pairs_total:,} pairs"
        ), soft_wrap=True)
    return report


def _planned_ahead(recipe: WindowRecipe, device: torch.device):
    """The windows, each read, tokenized and planned while the model runs on the one before: on a GPU in a process of
    its own, since in a thread this Python work holds the GIL that the main thread needs to queue the model's kernels
    (docs/BENCHMARKS.md); on a CPU, whose forward pass is the bound by far, in a thread, which starts in no time
    (a process takes seconds to start and to receive the tokenizer)."""
    if device.type in PLANNED_IN_A_PROCESS:
        return ahead_in_process(planned_windows, recipe, name="corpus")
    return ahead_in_thread(planned_windows(recipe))


def stopped_caching(error: BaseException, url: str) -> BaseException:
    """What stopped stage one, said in one line with what the store kept and how to go on; other errors as they are."""
    kept = f"{url} keeps its complete shards"
    if isinstance(error, KeyboardInterrupt):
        return Interrupted(f"interrupted; {kept}; run the same command to continue")
    if memory := out_of_memory(error):
        return CrosscodersError(f"out of memory ({memory}); {kept}; cache with a lower --batch-tokens into a new --out (a store "
                                "goes on with its own), or run the same command where there is more memory")
    if reason := peer_stopped(error):  # after out_of_memory: NCCL reports a GPU's failed allocation as its own error
        return CrosscodersError(f"another process of this torchrun job stopped ({reason}); {kept}; run the same command "
                                "to continue")
    if isinstance(error, OSError):  # a full disk, a store made read-only
        return CrosscodersError(f"cannot write {url} ({error.strerror or error}); {kept}; once it can be written, run the same "
                                "command to continue")
    return error


def _cache_window(model, window: Window, plans, budget: int, config: CacheConfig, corpus: CorpusConfig, pad_id: int, device, writer: ShardWriter,
                  advance: Callable[[int], None]) -> int:
    """Runs the model over one window's batches, recording up to `budget` pairs and calling advance(pairs) after each
    batch (a window takes minutes on a CPU); returns the model tokens."""
    docs, plans = _within_budget(window.docs, plans, budget)
    plan_of = {doc: plan for (doc, _), plan in zip(docs, plans)}
    n_model_tokens = 0
    batches = list(pack_batches(docs, config.batch_tokens, pad_id, window=len(docs)))
    for i, packed in enumerate(batches):
        recorded = _record_batch(model, packed, [plan_of[d] for d in packed.doc_index], config, corpus, device)
        n_model_tokens += int(packed.attention_mask.sum())
        recorded.window, recorded.ends_window = window.index, i == len(batches) - 1
        writer.submit(recorded)
        advance(len(recorded.layer))
    return n_model_tokens


def _within_budget(docs: list[tuple[int, np.ndarray]], plans: list[tuple[np.ndarray, np.ndarray]], budget: int) -> tuple[list, list]:
    """The documents, in corpus order, up to the one that spends the budget, with their plans cut there.

    The cut comes before packing, which sorts by length: the stored sample stays a corpus-order prefix.
    """
    kept_docs, kept_plans = [], []
    for doc, (positions, chosen) in zip(docs, plans):
        if budget == 0:
            break
        kept_docs.append(doc)
        kept_plans.append((positions[:budget], chosen[:budget]))
        budget -= len(kept_plans[-1][0])
    return kept_docs, kept_plans


def _record_batch(model, packed: Packed, plans: list[tuple[np.ndarray, np.ndarray]], config: CacheConfig, corpus: CorpusConfig, device) -> RecordedBatch:
    """Gathers the planned pairs of one batch by running the model up to the last needed layer."""
    rows = {name: [] for name in ("batch", *ROW_FIELDS, "split")}
    doc_split = np.array([is_validation(d, corpus) for d in packed.doc_index], dtype=np.uint8)
    for b, (doc, tokens, (positions, chosen)) in enumerate(zip(packed.doc_index, packed.doc_tokens, plans)):
        for name, values in (("batch", b), ("layer", chosen), ("token", tokens[positions]), ("doc", doc), ("pos", positions), ("split", doc_split[b])):
            rows[name].append(np.broadcast_to(values, positions.shape))
    columns = {name: np.concatenate(parts) for name, parts in rows.items()}
    order = np.argsort(columns["layer"], kind="stable")  # rows grouped by layer, as the hooks gather them
    columns = {name: values[order] for name, values in columns.items()}

    # sent without waiting: the GPU would idle while the next batch is formed (devices.to_device)
    batch_index, position = (to_device(torch.from_numpy(columns[name].astype(np.int64)), device) for name in ("batch", "pos"))
    selections = {}
    for layer in np.unique(columns["layer"]):
        where = np.flatnonzero(columns["layer"] == layer)
        selections[int(layer)] = (batch_index[where[0] : where[-1] + 1], position[where[0] : where[-1] + 1])
    storage_dtype = STORAGE_DTYPES[config.dtype]
    if selections:
        captured = capture_rows(model, to_device(packed.input_ids, device), to_device(packed.attention_mask, device), selections)
        acts = torch.cat([captured[layer] for layer in sorted(selections)]).to(storage_dtype)
    else:
        acts = torch.zeros((0, model.config.hidden_size), dtype=storage_dtype, device=device)
    layer, kept = (to_device(torch.from_numpy(values), device) for values in (columns["layer"].astype(np.int64), columns["split"] == 0))
    stats = layer_sum_tensors(acts, layer, len(decoder_layers(model)) + 1, kept)
    (acts, *stats), copied = _to_host(acts, *stats)
    return RecordedBatch(
        acts=acts,
        layer=columns["layer"],
        token=columns["token"],
        doc=columns["doc"],
        pos=columns["pos"],
        split=columns["split"],
        doc_index=np.asarray(packed.doc_index, dtype=np.int64),
        doc_split=doc_split,
        doc_tokens=packed.doc_tokens,
        stats=tuple(stats),
        copied=copied,
    )


def _to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], "torch.cuda.Event | None"]:
    """Starts the device-to-host copies without waiting for them; the writer thread waits on the event."""
    device = tensors[0].device
    if device.type != "cuda":
        return list(tensors), None
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors):
        host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return hosts, event


def check_disk_space(location: Location, n_pairs: int, d_model: int, dtype: str) -> None:
    """Refuses a run the disk cannot hold (uncompressed bound: compression only helps)."""
    bytes_per_pair = d_model * STORAGE_DTYPES[dtype].itemsize + sum(np.dtype(t).itemsize for t in ROW_FIELDS.values()) + 4
    needed = n_pairs * bytes_per_pair
    free = location.free_bytes()
    if free is not None and needed > free:
        raise CrosscodersError(
            f"{n_pairs:,} more pairs need up to {size_text(needed)} but {location} has {size_text(free)} free; "
            "lower --n-tokens or choose another --out"
        )


class RateColumn(ProgressColumn):
    """Pairs per second, as measured by rich over the recent updates."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed or 0
        return Text(f"{speed:,.0f} pairs/s", style="cyan")


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} pairs"),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
