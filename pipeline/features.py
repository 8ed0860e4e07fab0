"""What the SAE's latents mean: density, layer profile, activation histogram, top-activating contexts, a random sample of
the rows each fires on and the tokens each promotes and suppresses, from one pass over stored rows."""

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from pipeline.cli import local_path, option, print_note
from pipeline.devices import resolve_device
from pipeline.errors import CrosscodersError
from pipeline.evaluate import (
    check_model_of_store,
    check_output_folder,
    check_trained_alike,
    default_output,
    finished_runs,
    layers_of_run,
    note_unfinished,
    store_of_run,
)
from pipeline.models import LoadedModel, final_norm, load_model, unembedding_matrix
from pipeline.sae import TopKSAE, load
from pipeline.store import SPLITS, Store
from pipeline.token_text import token_texts
from pipeline.train import run_data
from pipeline.units import parse_count

DENSE_FREQUENCY = 0.1  # a latent firing on more rows than this is "dense"
# the bins of each latent's activation histogram: 20 a decade from 0.001 to 10,000 (the first and last also take what
# lies beyond them); float32, as activations are compared with them
ACTIVATION_EDGES = torch.logspace(-3, 4, 141, dtype=torch.float64).float()
BATCH_ROWS = 4096
SPARK = "▁▂▃▄▅▆▇█"


def parse_rows(text: str | int) -> int | None:
    """'200K' -> 200000; 'all' -> None (every row of the split)."""
    return None if str(text).strip().lower() == "all" else parse_count(text, "--n-rows")


@dataclass(frozen=True)
class FeaturesConfig:
    """Options of `sae-features`: which SAE, which stored rows to scan, and what to show."""

    sae: str = option("./runs/sae", "Training run folder (or its checkpoint/) holding the SAE, or a sweep's folder (train-sae "
                                     "--sweep's --out): each of its finished runs, on the same rows, the model loaded once.")
    shards: str | None = option(None, "Activation store to scan; default: the one the run was trained on (RUN/data.json).")
    split: str = option("train", "Rows to scan: train (most rows, so most contexts; fine for density) or val (held out).")
    n_rows: int | None = option(200_000, "Rows of the split to scan, each layer its share, from shards spread over the store, e.g. 200K, or all.",
                                parse_rows, str)
    layers: str = option("trained", "Hidden states whose rows are scanned: trained (those the SAE was trained on), all (the "
                                    "store's), 0-24, or 4,8,12.")
    feature: int | None = option(None, "Print this latent in the terminal: contexts, density, layer profile, activations, promoted "
                                       "and suppressed tokens, similar latents.")
    text: str | None = option(None, "Instead of scanning the store, run the model over this text (as given, or with --prompt in the "
                                    "chat) and print the latents firing most on each token over --layers, or with --feature that "
                                    "latent's activation on each token at each hidden state.")
    text_file: str | None = option(None, "--text read from this file, as it is (its last newline too); -: standard input.")
    prompt: str | None = option(None, "With --text: show the text as the assistant's answer to this user prompt, in the model's chat "
                                      "template after the store's system prompt, as cache-acts renders a corpus's documents.")
    top: int = option(10, "Top-activating contexts kept per latent (with --text: latents shown per token).")
    samples: int = option(10, "Contexts sampled at random from the rows each latent fires on, shown beside its top ones: what it "
                              "does typically, not only at its strongest; 0: none.")
    per_layer: int = option(1, "Top contexts kept per latent at each hidden state, shown layer by layer: whether it means the "
                               "same at every depth; 0: none.")
    context: int = option(12, "Tokens of context shown on each side of the activating token.")
    html: str | None = option(
        None, "HTML report path; default RUN/features.html, RUN/features-checkpoint.html for RUN/checkpoint (with --feature, "
              "written only when given). For a sweep, a folder that gets RUN.html for each run. With --text, a page of the "
              "text's latents, written only when given."
    )
    n_report_features: int = option(50, "Latents in the HTML report: half the most frequent alive ones, half random alive ones.")
    model: str | None = option(None, "Model for the tokenizer and unembedding; default: the store's model.")
    device: str = option("auto", "Device for encoding: auto, cpu, cuda, cuda:1, ...")

    def __post_init__(self):
        if self.text is not None and self.text_file is not None:
            raise CrosscodersError("--text and --text-file both give the text; pass one")
        if self.prompt is not None and not self.reads_text:
            raise CrosscodersError("--prompt is the user's turn before --text's answer; pass --text too")
        if self.split not in SPLITS:
            raise CrosscodersError(f"--split {self.split!r} is unknown; use one of {', '.join(SPLITS)}")
        if min(self.top, self.n_report_features) < 1 or min(self.context, self.samples, self.per_layer) < 0:
            raise CrosscodersError(f"--top and --n-report-features must be positive, --context, --samples and --per-layer at "
                                   f"least 0; got {self.top}, {self.n_report_features}, {self.context}, {self.samples} and "
                                   f"{self.per_layer}")

    @property
    def reads_text(self) -> bool:
        """Whether a text of one's own is shown (--text or --text-file) instead of the store scanned."""
        return self.text is not None or self.text_file is not None


@dataclass(frozen=True)
class LatentRows:
    """Scanned rows kept for each latent, [n_latents, m] each, sorted by activation (largest first; FeatureScan.by_layer:
    by layer, then activation), an empty place holding activation 0 and -1 everywhere else."""

    values: torch.Tensor  # the latent's activation on the row
    rows: torch.Tensor  # int64 index among the scanned rows (scan order)
    shard: torch.Tensor  # the row's provenance: shard index,
    layer: torch.Tensor  # hidden state,
    token: torch.Tensor  # token id,
    doc: torch.Tensor  # document index
    pos: torch.Tensor  # and position in the document


@dataclass(frozen=True)
class FeatureScan:
    """Per-latent statistics over the scanned rows of one split."""

    split: str
    n_rows: int  # rows scanned
    layer_counts: torch.Tensor  # [n_latents, n_layers] int64 rows of each layer a latent fired on
    n_rows_by_layer: torch.Tensor  # [n_layers] int64 scanned rows of each layer
    top: LatentRows  # the rows of each latent's largest activations (of equal ones, the first scanned)
    sampled: LatentRows  # a uniform random sample of the rows each latent fired on (sample_priority)
    by_layer: LatentRows  # [n_latents, n_layers * m]: each latent's top m rows of hidden state 0, then 1, ...
    activation_counts: torch.Tensor  # [n_latents, len(ACTIVATION_EDGES) - 1] int64 firings in each activation bin

    @property
    def counts(self) -> torch.Tensor:
        """[n_latents] rows each latent fired on."""
        return self.layer_counts.sum(1)

    @property
    def frequency(self) -> torch.Tensor:
        """[n_latents] fraction of scanned rows each latent fired on."""
        return self.counts.double() / max(self.n_rows, 1)  # float64: exactly 10% is not above DENSE_FREQUENCY

    @property
    def layer_frequency(self) -> torch.Tensor:
        """[n_latents, n_layers] firing rate among each layer's rows, so layers sampled less often compare fairly."""
        return self.layer_counts.double() / self.n_rows_by_layer.clamp(min=1)

    @property
    def scanned_layers(self) -> list[bool]:
        """[n_layers]: whether any of a layer's rows were scanned; a layer rate of 0 means nothing where it is False."""
        return (self.n_rows_by_layer > 0).tolist()

    @property
    def dead(self) -> torch.Tensor:
        """[n_latents] bool: never fired in the scanned rows."""
        return self.counts == 0

    @property
    def dense(self) -> torch.Tensor:
        """[n_latents] bool: fired on more than DENSE_FREQUENCY of the rows."""
        return self.frequency > DENSE_FREQUENCY

    def peak_layer(self, feature: int) -> int:
        """The layer on whose rows the latent fires most often."""
        return int(self.layer_frequency[feature].argmax())

    def activation_histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The latent's activation histogram from its lowest occupied bin to its highest (log-spaced bins): (counts, their
        edges, one more); None for a dead latent."""
        counts = self.activation_counts[feature]
        occupied = torch.nonzero(counts).flatten()
        if not len(occupied):
            return None
        first, last = int(occupied[0]), int(occupied[-1])
        return counts[first : last + 1].numpy(), ACTIVATION_EDGES[first : last + 2].numpy()

    def median_activation(self, feature: int) -> float:
        """The latent's median activation to its histogram's precision: the geometric middle of the bin holding it
        (within 6% of the median, for activations inside the bins' range)."""
        cumulative = self.activation_counts[feature].cumsum(0)
        middle = int(torch.searchsorted(cumulative, (cumulative[-1] + 1) // 2))
        return float((ACTIVATION_EDGES[middle].double() * ACTIVATION_EDGES[middle + 1].double()).sqrt())

    @property
    def layer_breadth(self) -> torch.Tensor:
        """[n_latents] float64: the effective number of layers a latent fires on, exp of the entropy of its layer
        profile (layer_frequency, made to sum to 1): 1 for a latent of one layer, the number of scanned layers for one
        that fires alike on all of them; 0 for a dead latent."""
        rates = self.layer_frequency
        profile = rates / rates.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
        entropy = -torch.special.xlogy(profile, profile).sum(1)  # 0 log 0 = 0
        return torch.where(self.dead, 0.0, entropy.exp())


class Kept(NamedTuple):
    """Each latent's kept firings while scanning, [n_latents, m] each, by key (largest first); -1 rows where empty."""

    keys: torch.Tensor
    rows: torch.Tensor  # int64 index among the scanned rows
    values: torch.Tensor  # activations

    @classmethod
    def empty(cls, n_latents: int, m: int, key_dtype: torch.dtype, device: torch.device | str) -> "Kept":
        return cls(torch.zeros(n_latents, m, dtype=key_dtype, device=device), torch.full((n_latents, m), -1, device=device),
                   torch.zeros(n_latents, m, device=device))


@torch.no_grad()
def scan_features(
    sae: TopKSAE,
    store: Store,
    split: str = "train",
    n_rows: int | None = None,
    top: int = 10,
    device: torch.device | str = "cpu",
    batch_rows: int = BATCH_ROWS,
    progress: Progress | None = None,
    layers: list[int] | None = None,
    samples: int = 10,
    per_layer: int = 1,
) -> FeatureScan:
    """Encodes n_rows rows of a split (all when None) of the given layers (all when None), each layer its share, from
    shards spread over the store (Store.rows_of_layers), scanned in store order: firing counts, each latent's top rows,
    a uniform sample of `samples` of the rows it fires on, and its top `per_layer` rows of each hidden state."""
    sae.check_compatible(store.d_model, store.n_hidden_states)
    n_latents, n_layers = sae.cfg.n_latents, sae.cfg.n_layers
    picked = store.rows_of_layers(split, n_rows, layers)
    total = sum(len(rows) for rows, _ in picked)
    if total == 0:
        held = "" if layers is None else f" of hidden states {layers}"
        raise CrosscodersError(f"{store.url} has no {split} rows{held}; scan the other --split, other --layers or cache more tokens")
    layer_counts = torch.zeros(n_latents * n_layers, dtype=torch.int64, device=device)
    n_rows_by_layer = torch.zeros(n_layers, dtype=torch.int64, device=device)
    top_kept = Kept.empty(n_latents, top, torch.float32, device)
    sampled_kept = Kept.empty(n_latents, samples, torch.int64, device)
    layer_kept = Kept.empty(n_latents * n_layers, per_layer, torch.float32, device)  # by (latent, layer)
    n_bins = len(ACTIVATION_EDGES) - 1
    inner_edges = ACTIVATION_EDGES[1:-1].to(device)
    activation_counts = torch.zeros(n_latents * n_bins, dtype=torch.int64, device=device)
    task = progress.add_task("scanning", total=total) if progress is not None else None
    seen = 0  # rows scanned before this batch
    for shard, (rows, layer_ids) in zip(store.shards, picked):
        if not len(rows):
            continue
        span = int(rows[-1]) + 1  # the shard's rows [0, span) hold the picked ones
        shard_layers = torch.from_numpy(layer_ids.astype(np.int64)).to(device)  # [picked rows]
        for start in range(0, span, batch_rows):  # whole stored ranges, read once each, of which the picked rows
            first, last = np.searchsorted(rows, [start, start + batch_rows])
            if first == last:
                continue
            offsets = torch.from_numpy(rows[first:last] - start).to(device)
            layer = shard_layers[first:last]  # [batch]
            x = store.read_acts(shard, split, start, min(start + batch_rows, span)).to(device)[offsets]
            values, indices = sae.encode(x.to(sae.W_enc.dtype), layer)  # [batch, k]
            fired = values > 0
            layer_counts += torch.bincount((indices * n_layers + layer[:, None])[fired], minlength=n_latents * n_layers)
            n_rows_by_layer += torch.bincount(layer, minlength=n_layers)
            row, slot = fired.nonzero(as_tuple=True)  # in scan order: row by row
            latents, activations, scanned = indices[row, slot], values[row, slot].float(), row + seen
            top_kept = merge_top(top_kept, latents, activations, scanned, activations)
            bins = torch.bucketize(activations, inner_edges, right=True)  # edges[i] <= activation < edges[i + 1]
            activation_counts += torch.bincount(latents * n_bins + bins, minlength=n_latents * n_bins)
            if samples:
                sampled_kept = merge_top(sampled_kept, latents, sample_priority(scanned, latents), scanned, activations)
            if per_layer:
                layer_kept = merge_top(layer_kept, latents * n_layers + layer[row], activations, scanned, activations)
            seen += len(layer)
            if task is not None:
                progress.update(task, advance=len(layer))
    by_value = sampled_kept.values.argsort(dim=1, descending=True, stable=True)  # the sample shown largest first, empty last
    kept = [top_kept, Kept(*(t.gather(1, by_value) for t in sampled_kept)), Kept(*(t.view(n_latents, -1) for t in layer_kept))]
    sizes = [k.rows.shape[1] for k in kept]  # one provenance pass for all three: each shard's columns read once
    found = _provenance(store, split, picked, torch.cat([k.values for k in kept], 1).cpu(), torch.cat([k.rows for k in kept], 1).cpu())
    top_rows, sampled_rows, layer_rows = (LatentRows(*parts) for parts in zip(*(getattr(found, f.name).split(sizes, 1) for f in fields(found))))
    return FeatureScan(split, total, layer_counts.view(n_latents, n_layers).cpu(), n_rows_by_layer.cpu(), top_rows, sampled_rows,
                       layer_rows, activation_counts.view(n_latents, n_bins).cpu())


def merge_top(held: Kept, latents: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> Kept:
    """Each latent's firings of largest key of its held ones and new firings (latents, keys, rows, values: [firings],
    rows later than any held), as [n_latents, m]. Of equal keys the earliest row wins, so the rows a report shows
    depend neither on the scan's batch size nor on the device (torch.topk leaves ties in any order). It sorts the
    firings only, not a dense [rows, n_latents] code."""
    taken = held.rows >= 0
    latents = torch.cat([taken.nonzero()[:, 0], latents])
    keys, rows, values = (torch.cat([kept[taken], new]) for kept, new in zip(held, (keys, rows, values)))
    order = rows.argsort(stable=True)  # by latent, then key (largest first), then row: stable sorts, last key first
    order = order[keys[order].argsort(descending=True, stable=True)]
    order = order[latents[order].argsort(stable=True)]
    latents = latents[order]
    rank = torch.arange(len(latents), device=latents.device) - torch.searchsorted(latents, latents)  # place in its latent
    kept = rank < held.rows.shape[1]
    merged = Kept(torch.zeros_like(held.keys), torch.full_like(held.rows, -1), torch.zeros_like(held.values))
    for target, source in zip(merged, (keys, rows, values)):
        target[latents[kept], rank[kept]] = source[order][kept]
    return merged


PRIORITY_BITS = 31  # the hash's state: products of two 31-bit numbers fit in int64 on every device


def sample_priority(rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A pseudo-random key in [0, 2**31) of each (scanned row, latent), int64: a latent's firings of largest key are a
    uniform random sample of them, the same whatever the scan's batches or device. Per latent a bijection of the row
    mod 2**31 (xor-shifts and odd multipliers, as integer hash finalizers do), so no two of its firings tie in a scan of
    fewer than 2**31 rows."""
    mask = (1 << PRIORITY_BITS) - 1
    h = (rows + latents * 0x5BD1E995) & mask
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (13, 0x297A2D39)):
        h = ((h ^ (h >> shift)) * multiplier) & mask
    return h ^ (h >> 16)


def _provenance(store: Store, split: str, picked: list[tuple[np.ndarray, np.ndarray]], values: torch.Tensor,
                kept_rows: torch.Tensor) -> LatentRows:
    """The kept rows kept_rows: [n_latents, m] (scan indices, -1 where empty) with their activations and their shard,
    layer, token, doc and pos; picked: each shard's scanned (offsets, layer ids), from Store.rows_of_layers."""
    names = ("layer", "token", "doc", "pos")
    valid = kept_rows >= 0
    scanned = kept_rows[valid].numpy()  # indices into the scan's rows, shard after shard
    starts = np.cumsum([0, *(len(rows) for rows, _ in picked)])
    shard_of = np.searchsorted(starts, scanned, side="right") - 1
    found = {"shard": shard_of, **{name: np.zeros(len(scanned), np.int64) for name in names}}
    for index in np.unique(shard_of):  # only the shards holding a kept row: a mask per shard cost shards x latents x m
        mine, rows = shard_of == index, picked[index][0]
        offsets = rows[scanned[mine] - starts[index]]
        for name in names:
            found[name][mine] = store.read(store.shards[index], f"{split}/{name}", 0, int(offsets.max()) + 1)[offsets]
    provenance = {}
    for name, column in found.items():
        provenance[name] = torch.full_like(kept_rows, -1)
        provenance[name][valid] = torch.from_numpy(column.astype(np.int64))
    return LatentRows(values, kept_rows, **provenance)


def breadth_quartiles(scan: FeatureScan) -> list[float] | None:
    """The quartiles of the alive latents' layer breadth; None when none fired."""
    breadth = scan.layer_breadth[~scan.dead]
    return torch.quantile(breadth, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist() if len(breadth) else None


def breadth_summary(scan: FeatureScan) -> str:
    """The quartiles of the alive latents' layer breadth, in words."""
    quartiles = breadth_quartiles(scan)
    if quartiles is None:
        return "no latent fired"
    return (f"alive latents spread over {quartiles[1]:.1f} of {sum(scan.scanned_layers)} layers (median; quartiles "
            f"{quartiles[0]:.1f} and {quartiles[2]:.1f})")


def density_histogram(scan: FeatureScan, n_bins: int = 40) -> tuple[np.ndarray, np.ndarray, int]:
    """(counts [n_bins] of alive latents by log10 firing frequency, bin edges [n_bins + 1], number of dead latents)."""
    frequency = scan.counts[~scan.dead].numpy() / scan.n_rows  # float64, so a single firing lands on the first edge
    counts, edges = np.histogram(np.log10(frequency), bins=n_bins, range=(np.log10(1 / scan.n_rows), 0))
    return counts, edges, int(scan.dead.sum())


def report_features(scan: FeatureScan, n: int, seed: int = 0) -> list[int]:
    """Alive latents to report: the n // 2 most frequent (largest first), then random others, for a fair sample."""
    alive = torch.nonzero(~scan.dead).flatten()
    by_count = alive[scan.counts[alive].argsort(descending=True, stable=True)]
    frequent, rest = by_count[: n // 2], by_count[n // 2 :]
    random = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[: n - len(frequent)]]
    return frequent.tolist() + sorted(random.tolist())


@dataclass(frozen=True)
class Context:
    """One top activation of a latent: document tokens around it, the activating one at `center`."""

    value: float
    layer: int
    doc: int
    pos: int  # position of the activating token in the document
    token_ids: list[int]  # the window, clipped to the document
    tokens: list[str]  # each token's text, as token_texts shows it
    center: int  # index of the activating token in the window


def feature_contexts(kept: LatentRows, store: Store, tokenizer, feature: int, context: int = 12,
                     documents: dict | None = None) -> list[Context]:
    """The latent's kept rows (a scan's top or sampled ones) as token windows of `context` tokens each side, from the
    store's documents; documents: shard index -> its documents' tokens, read once per dict (one per call if None)."""
    documents = {} if documents is None else documents
    contexts = []
    for j in torch.nonzero(kept.rows[feature] >= 0).flatten().tolist():
        shard, doc, pos = (int(t[feature, j]) for t in (kept.shard, kept.doc, kept.pos))
        if shard not in documents:
            documents[shard] = store.shard_documents(store.shards[shard])
        document = documents[shard][doc]
        start, end = max(0, pos - context), min(len(document), pos + context + 1)
        ids = document[start:end].tolist()
        contexts.append(Context(float(kept.values[feature, j]), int(kept.layer[feature, j]), doc, pos, ids, token_texts(tokenizer, ids), pos - start))
    return contexts


@dataclass(frozen=True)
class LatentContexts:
    """What a latent's report shows of the rows it fired on: its top contexts, a random sample of them, and its top
    contexts at each hidden state, layer by layer."""

    top: list[Context]
    sampled: list[Context]
    by_layer: list[Context]

    @classmethod
    def of(cls, scan: FeatureScan, store: Store, tokenizer, feature: int, context: int = 12) -> "LatentContexts":
        documents = {}  # shared: a shard holding rows of several kinds is read once
        return cls(*(feature_contexts(kept, store, tokenizer, feature, context, documents)
                     for kept in (scan.top, scan.sampled, scan.by_layer)))

    def sample_caption(self, n_fired: int) -> str:
        """What the sample is: "10 of the 2,139 rows it fired on, drawn uniformly"."""
        return f"{len(self.sampled):,} of the {n_fired:,} rows it fired on, drawn uniformly"


@dataclass(frozen=True)
class Lens:
    """The model's readout, for the logit lens: tokenizer, unembedding and final-norm weight."""

    tokenizer: object
    unembedding: torch.Tensor  # [vocab, d_model]
    norm_weight: torch.Tensor  # [d_model]
    final_layer: int  # hidden state that is already the final norm's output


    @classmethod
    def of(cls, loaded: LoadedModel) -> "Lens":
        """The readout of a model loaded with load_model."""
        model = loaded.model
        return cls(loaded.tokenizer, unembedding_matrix(model).detach(), final_norm(model).weight.detach(), loaded.info.n_layers)


class LogitEffects(NamedTuple):
    """The tokens a latent's decoder direction raises and lowers most through the logit lens at one layer: (text, logit
    per unit activation), the largest rise first, then the largest fall first."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


@torch.no_grad()
def logit_effects(sae: TopKSAE, lens: Lens, feature: int, layer: int, n_tokens: int = 10) -> LogitEffects:
    """The latent's promoted and suppressed tokens at layer, leaving out the final norm's division by the state's rms, as
    logit-lens weights do: it ranks tokens the same."""
    direction = (sae.W_dec[feature] / sae.norm_scale[layer]).to(lens.unembedding)  # [d_model] in the layer's raw space
    if layer != lens.final_layer:  # earlier states still pass through the final norm, whose weight scales each dimension
        direction = direction * lens.norm_weight
    logits = lens.unembedding @ direction  # [vocab]

    def shown(largest: bool) -> list[tuple[str, float]]:
        values, ids = logits.topk(n_tokens, largest=largest)
        texts = [token_texts(lens.tokenizer, [i])[0] for i in ids.tolist()]  # each on its own: ranked tokens are no text
        return list(zip(texts, values.tolist()))

    return LogitEffects(shown(True), shown(False))


@torch.no_grad()
def similar_latents(sae: TopKSAE, alive: torch.Tensor, feature: int, n: int = 8) -> list[tuple[int, float]]:
    """The n alive latents (other than feature) whose decoder directions are closest to the latent's, with their cosine,
    closest first: where a concept split into several latents, or a latent's neighbours in meaning. One decoder serves
    every layer, each layer's normalization a scalar, so the cosine is the same at every layer."""
    W_dec = sae.W_dec.float()
    cosine = (W_dec @ W_dec[feature]) / (W_dec.norm(dim=1) * W_dec[feature].norm()).clamp_min(1e-12)
    candidates = alive.to(cosine.device).clone()
    candidates[feature] = False
    cosine = cosine.masked_fill(~candidates, -float("inf"))
    values, indices = cosine.topk(min(n, int(candidates.sum())))
    return list(zip(indices.tolist(), values.tolist()))


def highlighted(console: Console, token: str, fraction: float) -> Text:
    """An activating token, its background pale to orange as its activation nears the latent's maximum (fraction of it);
    marked ⟦ ⟧ on a console without colour, so that it still shows."""
    style = f"bold black on rgb(255,{round(235 - 115 * fraction)},{round(200 - 200 * fraction)})"
    return Text(token if console.color_system else f"⟦{token}⟧", style=style)


def sparkline(values: list[float], measured: list[bool]) -> str:
    """One block character per value, scaled to the largest; blank for zero, a dot where nothing was measured."""
    top = max(values, default=0) or 1
    return "".join("·" if not seen else SPARK[min(len(SPARK) - 1, int(len(SPARK) * v / top))] if v > 0 else " "
                   for v, seen in zip(values, measured))


def print_feature(console: Console, scan: FeatureScan, feature: int, contexts: LatentContexts, effects: LogitEffects | None,
                  similar: list[tuple[int, float]] | None = None):
    """The latent in the terminal: density, layer profile and activation histogram as sparklines, promoted and suppressed
    tokens, the latents of the closest decoder directions (similar_latents), contexts with the activating token highlighted."""
    count, frequency = int(scan.counts[feature]), float(scan.frequency[feature])
    kind = " [red]dead[/]" if count == 0 else " [yellow]dense[/]" if frequency > DENSE_FREQUENCY else ""
    console.print(f"[bold]feature {feature}[/]{kind}: fires on {count:,} of {scan.n_rows:,} {scan.split} rows ({frequency:.3%})")
    rates = scan.layer_frequency[feature].tolist()
    if count:  # a dead latent has no peak layer
        peak = scan.peak_layer(feature)
        line = sparkline(rates, scan.scanned_layers)  # a dot: a hidden state not scanned, unlike a blank
        console.print(f"layers 0-{len(rates) - 1} [cyan]{line}[/]  peak layer {peak} ({rates[peak]:.3%} of its rows), "
                      f"spread over {float(scan.layer_breadth[feature]):.1f} of {sum(scan.scanned_layers)} layers")
        fired, edges = scan.activation_histogram(feature)
        console.print(f"activations {edges[0]:.3g} [cyan]{sparkline(fired.tolist(), [True] * len(fired))}[/] {edges[-1]:.3g} "
                      f"(log-spaced bins), median about {scan.median_activation(feature):.3g}")
    if effects is not None:
        # quoted as token_texts shows them: repr would double the backslash of an escape such as \xf0
        for verb, tokens in (("promotes", effects.promoted), ("suppresses", effects.suppressed)):
            console.print(Text(f"{verb} " + "  ".join(f"'{text}' {value:+.3g}" for text, value in tokens)))
    if similar:
        console.print("similar decoder directions (cosine): " + "  ".join(f"{latent} {cosine:+.3f}" for latent, cosine in similar))
    top = max((c.value for c in contexts.top), default=1.0)  # the sample's highlights on the same scale: paler when weaker
    for title, shown in (("top activations", contexts.top), (f"random activations: {contexts.sample_caption(count)}", contexts.sampled),
                         ("top activations at each layer", contexts.by_layer)):
        if shown:
            console.print(Text(title, style="bold"))
        for c in shown:
            print_context(console, c, top)


def print_context(console: Console, c: Context, top: float):
    """One context on one line, the activating token highlighted by its activation relative to top."""
    line = Text.assemble((f"{c.value:8.3f}  L{c.layer:<3d} doc {c.doc} pos {c.pos}  ", "dim"))  # the context itself not dim
    active = highlighted(console, c.tokens[c.center], c.value / top)
    # at most half the room left of the activating token, so a long left context never pushes it off the line
    line.append(left_cropped("".join(c.tokens[: c.center]), (console.width - line.cell_len - active.cell_len) // 2))
    line.append_text(active)
    line.append("".join(c.tokens[c.center + 1 :]))
    console.print(line, no_wrap=True, overflow="ellipsis")


def left_cropped(text: str, width: int) -> str:
    """The end of text that fits in width terminal cells, "…" marking where it was cut."""
    if cell_len(text) <= width:
        return text
    while text and cell_len(text) > width - 1:
        text = text[1:]
    return "…" + text if width > 0 else ""


def report_path(cfg: FeaturesConfig, sae_dir: Path) -> Path | None:
    """Where the HTML report goes (None when --feature alone is printed), its folder checked before the scan."""
    if cfg.feature is not None and cfg.html is None:
        return None
    return html_path(cfg.html, default_output(sae_dir, "features.html"))


def html_path(html: str | None, default: Path) -> Path:
    """--html's file (default where not given), its folder checked to be writable; a folder or another kind of file,
    which the page would replace, refused."""
    if html is not None and html.endswith("/"):
        raise CrosscodersError(f"--html {html} names a folder; pass a file path such as {html}{default.name}")
    path = local_path(html, "--html") if html is not None else default
    check_output_folder(path.parent, "--html")
    if path.is_dir():  # its folder is readable: checked above
        raise CrosscodersError(f"--html {path} is a folder; pass a file path such as {path / default.name}")
    if path.suffix.lower() not in (".html", ".htm"):  # a slip such as --html RUN/cfg.json would replace that file
        raise CrosscodersError(f"--html {html} is not an .html file, and the report replaces what it names; pass a path "
                               "ending in .html")
    return path


@dataclass(frozen=True)
class OpenedRun:
    """A run's SAE with the store and the hidden states to scan, checked to fit each other."""

    folder: Path
    sae: TopKSAE
    data: dict | None  # its data.json
    store: Store
    layers: list[int]


def open_run(cfg: FeaturesConfig, folder: Path, device: torch.device) -> OpenedRun:
    """The run's SAE on device, its store (--shards, else data.json's) and the hidden states --layers names; --feature
    checked against its latents."""
    sae = load(folder, device)
    data = run_data(folder)
    store = store_of_run(folder, cfg.shards, data)  # first: a store of another model is named as such, whatever its shape
    sae.check_compatible(store.d_model, store.n_hidden_states)
    if cfg.feature is not None and not 0 <= cfg.feature < sae.cfg.n_latents:
        raise CrosscodersError(f"--feature {cfg.feature} is out of range: the SAE has latents 0 to {sae.cfg.n_latents - 1}")
    return OpenedRun(folder, sae, data, store, layers_of_run(cfg.layers, store, data, sae))


def load_lens(cfg: FeaturesConfig, store: Store, console: Console) -> Lens | None:
    """The model's tokenizer and unembedding, loaded before the scan (a wrong model stops it at once); None, with a
    note, where the model does not load."""
    spec = cfg.model or store.metadata["model"]["name"]
    try:
        loaded = load_model(spec)
    except (CrosscodersError, OSError) as error:
        print_note(f"model {spec!r} did not load ({error}): no promoted or suppressed tokens, contexts shown as token ids "
                   "(--model names it)", console)
        return None
    check_model_of_store(loaded.info, store)
    return Lens.of(loaded)


def scan_run(cfg: FeaturesConfig, run: OpenedRun, device: torch.device, console: Console, progress: bool) -> FeatureScan:
    """scan_features with the options, under a progress bar."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        return scan_features(run.sae, run.store, cfg.split, cfg.n_rows, cfg.top, device, progress=bar, layers=run.layers,
                             samples=cfg.samples, per_layer=cfg.per_layer)


def summary_line(scan: FeatureScan) -> str:
    """Latents alive, dead and dense, and the layers they spread over, in words."""
    return (f"{int((~scan.dead).sum()):,} of {len(scan.dead):,} latents alive, {int(scan.dead.sum()):,} dead, "
            f"{int(scan.dense.sum()):,} dense (> {DENSE_FREQUENCY:.0%} of rows); {breadth_summary(scan)}")


def write_report(cfg: FeaturesConfig, run: OpenedRun, scan: FeatureScan, lens: Lens | None, path: Path) -> Path:
    """The HTML report of the scan: --feature (if given), then the latents report_features picks."""
    from pipeline.report import write_html_report  # here, not at the top: report.py builds on this module

    tokenizer = lens.tokenizer if lens is not None else None
    features = list(dict.fromkeys(([cfg.feature] if cfg.feature is not None else []) + report_features(scan, cfg.n_report_features)))
    contexts = {f: LatentContexts.of(scan, run.store, tokenizer, f, cfg.context) for f in features}
    effects = {f: effects_of(run.sae, lens, scan, f) for f in features}
    similar = {f: similar_latents(run.sae, ~scan.dead, f) for f in features}
    settings = {**asdict(cfg), "sae": str(run.folder), "shards": run.store.url, "html": str(path), "layers": run.layers}  # absolute
    return write_html_report(path, scan, contexts, effects, title=f"{run.folder} on {run.store.url}", settings=settings, similar=similar)


def effects_of(sae: TopKSAE, lens: Lens | None, scan: FeatureScan, feature: int) -> LogitEffects | None:
    """The latent's promoted and suppressed tokens at its peak layer; none without the model, or for a dead latent (no
    peak layer)."""
    return None if lens is None or scan.dead[feature] else logit_effects(sae, lens, feature, scan.peak_layer(feature))


def explore_features(cfg: FeaturesConfig, console: Console, progress: bool = True) -> Path | None:
    """`sae-features`: scan the store, print --feature, write the HTML report; returns the report's path (None if not written)."""
    device = resolve_device(cfg.device)
    run = open_run(cfg, local_path(cfg.sae, "--sae"), device)
    path = report_path(cfg, run.folder)
    lens = load_lens(cfg, run.store, console)
    scan = scan_run(cfg, run, device, console, progress)
    if cfg.feature is not None:
        contexts = LatentContexts.of(scan, run.store, lens.tokenizer if lens is not None else None, cfg.feature, cfg.context)
        print_feature(console, scan, cfg.feature, contexts, effects_of(run.sae, lens, scan, cfg.feature),
                      similar_latents(run.sae, ~scan.dead, cfg.feature))
    console.print(f"scanned {scan.n_rows:,} {scan.split} rows: {summary_line(scan)}")
    if path is None:
        return None
    write_report(cfg, run, scan, lens, path)
    console.print(Text(f"wrote {path}"))
    return path


@dataclass(frozen=True)
class SweepFeatures:
    """One run's scan and report, of `sae-features --sae SWEEP`."""

    run: Path
    scan: FeatureScan
    report: Path


def explore_sweep(cfg: FeaturesConfig, console: Console, progress: bool = True) -> list[SweepFeatures]:
    """`sae-features --sae SWEEP`: each finished run of a sweep's folder scanned on the same rows, with the model loaded
    once, and its report written to RUN/features.html, or HTML/RUN.html when --html names a folder."""
    sweep = local_path(cfg.sae, "--sae")
    runs = finished_runs(sweep)
    if cfg.feature is not None:
        raise CrosscodersError(f"--feature names a latent of one SAE, and the runs of a sweep share none; pass one run, e.g. "
                               f"--sae {runs[0]}")
    note_unfinished(sweep, runs, console, ("scanned", "scan"))
    device = resolve_device(cfg.device)
    opened = [open_run(cfg, run, device) for run in runs]
    for run in opened[1:]:
        check_trained_alike(opened[0].folder, opened[0].data, run.folder, run.data)
    paths = [sweep_report_path(cfg, run) for run in runs]
    lens = load_lens(cfg, opened[0].store, console)
    found = []
    for run, path in zip(opened, paths):
        scan = scan_run(cfg, run, device, console, progress)
        found.append(SweepFeatures(run.folder, scan, write_report(cfg, run, scan, lens, path)))
    return found


def sweep_report_path(cfg: FeaturesConfig, run: Path) -> Path:
    """RUN/features.html, or HTML/RUN.html for --html HTML, a folder; checked before the scans."""
    if cfg.html is None:
        path = run / "features.html"
    else:
        folder = local_path(cfg.html, "--html")
        if folder.suffix.lower() in (".html", ".htm"):
            raise CrosscodersError(f"--html {cfg.html} names a file, and a sweep writes one report per run; pass a folder, "
                                   "which gets RUN.html for each run")
        path = folder / f"{run.name}.html"
    check_output_folder(path.parent, "--html")
    return path
