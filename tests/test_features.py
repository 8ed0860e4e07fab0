"""sae-features on a tiny store: scan statistics against brute force, contexts, the HTML report and the CLI."""

import copy
import html as html_module
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_cli import run_python
from rich.cells import cell_len
from rich.console import Console
from transformers import AutoTokenizer

import pipeline.evaluate
from pipeline import features
from pipeline.cache import CacheConfig, cache_activations
from pipeline.corpus import CorpusConfig, Document, chat_messages, tokenize_document
from pipeline.errors import CrosscodersError
from pipeline.features import (
    Context,
    FeatureScan,
    FeaturesConfig,
    Kept,
    LatentContexts,
    LatentRows,
    Lens,
    LogitEffects,
    breadth_quartiles,
    breadth_summary,
    density_histogram,
    explore_features,
    explore_sweep,
    feature_contexts,
    logit_effects,
    merge_top,
    print_feature,
    sample_priority,
    scan_features,
    similar_latents,
)
from pipeline.layers import layer_ranges
from pipeline.loader import layer_stats_of
from pipeline.models import load_model
from pipeline.positions import SkippedPositions
from pipeline.report import context_html, write_html_report
from pipeline.sae import SAEConfig, TopKSAE, load
from pipeline.store import Store, create_or_open, proportional_quota
from pipeline.text_latents import TextLatents, explore_text, print_text_feature, text_latents
from pipeline.token_text import token_texts
from pipeline.train import CHECKPOINT, DATA_FILE, TRAIN_CONFIG_FILE

QUIET = Console(file=open(os.devnull, "w"))
N_LATENTS = 128


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Store:
    """2000 rows over all 5 hidden states in two shards, from code full of < > &."""
    folder = tmp_path_factory.mktemp("features")
    corpus = folder / "pairs.jsonl"
    rng = np.random.default_rng(0)
    with corpus.open("w") as handle:
        for i in range(300):
            body = "\n".join(f"    if x{j} < {i} && y > x{j}: return '<b>' & x{j}" for j in range(int(rng.integers(2, 12))))
            handle.write(json.dumps({"prompt": f"Compare <{i}> & more.", "response": f"def f{i}(y):\n{body}\n"}) + "\n")
    for n_tokens in (1000, 2000):  # the second run resumes the store: a second shard
        config = CacheConfig(model=str(tiny_model_dir), out=str(folder / "store"), n_tokens=n_tokens, batch_tokens=1024, max_seq_len=128, dtype="float32")
        cache_activations(config, CorpusConfig(dataset=str(corpus)), console=QUIET, progress=False)
    return Store(folder / "store")


@pytest.fixture(scope="module")
def sae(store) -> TopKSAE:
    """A random SAE normalizing by the store's statistics, with latent 0 made dense and latent 1 dead."""
    rows = all_rows(store, "train")
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=64, n_layers=5, expansion=2, k=4), layer_stats_of(rows["acts"], torch.from_numpy(rows["layer"].astype(np.int64)), 5))
    with torch.no_grad():
        sae.b_enc[0] = 1e6  # in every row's top k: dense
        sae.b_enc[1] = -1e6  # never positive: dead
    return sae


@pytest.fixture(scope="module")
def run_dir(store, sae, tmp_path_factory) -> Path:
    """A training-run folder as train-sae leaves it: the SAE plus data.json naming the store."""
    folder = tmp_path_factory.mktemp("run")
    sae.save(folder)
    data = {"shards": store.url, "model": store.metadata["model"], "layers": store.metadata["layers"]}
    (folder / DATA_FILE).write_text(json.dumps(data))
    return folder


def all_rows(store: Store, split: str) -> dict:
    columns = {name: np.concatenate([store.read(s, f"{split}/{name}") for s in store.shards]) for name in ("layer", "token", "doc", "pos")}
    return {**columns, "acts": torch.cat([store.read_acts(s, split).float() for s in store.shards])}


def with_few_candidates(sae: TopKSAE) -> TopKSAE:
    """The SAE with all but latents 0-5 silenced: many rows have fewer than k positive pre-acts, so top-k keeps zeros."""
    few = TopKSAE(sae.cfg)
    few.load_state_dict(sae.state_dict())
    with torch.no_grad():
        few.b_enc[6:] = -1e6
    return few


# n_rows: all rows, or part of the second shard (300 of hidden state 2 end there too)
@pytest.mark.parametrize("n_rows, candidates, layers", [(None, "all", None), (1500, "all", None), (None, "few", None),
                                                        (None, "all", [1, 3]), (300, "all", [2])])
def test_scan_agrees_with_brute_force(store, sae, n_rows, candidates, layers):
    assert len(store.shards) > 1
    sae = sae if candidates == "all" else with_few_candidates(sae)
    scan = scan_features(sae, store, "train", n_rows, top=5, batch_rows=256, layers=layers, samples=4, per_layer=2)
    rows = all_rows(store, "train")
    picked = np.isin(rows["layer"], layers if layers is not None else range(5))
    if n_rows is not None:  # each layer's first rows in store order (spread_order of two shards), as many as its share of n_rows
        assert picked[: store.shards[0].n_rows["train"]].sum() < n_rows < picked.sum()
        quota = proportional_quota(np.bincount(rows["layer"][picked], minlength=5), n_rows)
        for l in range(5):
            of_layer = np.flatnonzero(picked & (rows["layer"] == l))
            picked[of_layer[quota[l] :]] = False
    rows = {name: column[torch.from_numpy(picked) if name == "acts" else picked] for name, column in rows.items()}
    n = len(rows["layer"])
    assert n == (n_rows or n)
    layer = torch.from_numpy(rows["layer"].astype(np.int64))
    with torch.no_grad():
        values, indices = sae.encode(rows["acts"], layer)
    code = torch.zeros(n, N_LATENTS).scatter_(1, indices, values)  # [rows, n_latents]
    fired = code > 0
    assert scan.n_rows == n
    assert torch.equal(scan.counts, fired.sum(0))
    for l in range(5):
        assert torch.equal(scan.layer_counts[:, l], fired[layer == l].sum(0))
        assert scan.n_rows_by_layer[l] == (layer == l).sum() and (scan.n_rows_by_layer[l] > 0) == (layers is None or l in layers)
    assert torch.equal(scan.layer_counts.sum(1), scan.counts)
    if candidates == "few":
        assert (fired.sum(1) < sae.cfg.k).float().mean() > 0.2 and int(fired[:, 6:].sum()) == 0
    rates = torch.stack([fired[layer == l].float().mean(0).nan_to_num() for l in range(5)], 1)  # [n_latents, layers]
    torch.testing.assert_close(scan.layer_frequency, rates.double(), check_dtype=False)
    assert torch.equal(scan.top.values, code.T.topk(5, dim=1).values)
    row, latent = fired.nonzero(as_tuple=True)  # each firing's activation bin, counted per latent
    bins = np.searchsorted(features.ACTIVATION_EDGES.numpy()[1:-1], code[row, latent].numpy(), side="right")
    expected = np.zeros(scan.activation_counts.shape, np.int64)
    np.add.at(expected, (latent.numpy(), bins), 1)
    assert torch.equal(scan.activation_counts, torch.from_numpy(expected)) and int(scan.activation_counts[0, -1]) == n  # dense: 1e6
    for feature in [0, 2, 5, 17, 100]:
        expected = code[:, feature].topk(5).values
        assert torch.equal(scan.top.values[feature], expected)
        live = expected > 0
        rows_found = scan.top.rows[feature][live]  # of equal activations (repeated prefixes), the first rows scanned
        assert torch.equal(rows_found, code[:, feature].argsort(descending=True, stable=True)[:5][live])
        assert (scan.top.rows[feature][~live] == -1).all()
        # the sample: of the rows the latent fired on, those of largest priority, shown by activation
        firing = fired[:, feature].nonzero().flatten()
        priority = sample_priority(firing, torch.full_like(firing, feature))
        sampled = firing[priority.argsort(descending=True)[:4]]
        sampled = sampled[code[sampled, feature].argsort(descending=True, stable=True)]
        n_sampled = len(sampled)
        assert n_sampled == min(4, len(firing))
        assert torch.equal(scan.sampled.rows[feature][:n_sampled], sampled) and (scan.sampled.rows[feature][n_sampled:] == -1).all()
        assert torch.equal(scan.sampled.values[feature][:n_sampled], code[sampled, feature])
        # at each hidden state, its top 2 rows of that state, state after state
        for l in range(5):
            of_layer = (layer == l).nonzero().flatten()
            expected = code[of_layer, feature].topk(min(2, len(of_layer))).values if len(of_layer) else torch.zeros(0)
            live = expected > 0
            found = of_layer[code[of_layer, feature].argsort(descending=True, stable=True)[: len(expected)][live]]
            place = slice(2 * l, 2 * l + 2)
            assert torch.equal(scan.by_layer.rows[feature][place][: len(found)], found)
            assert (scan.by_layer.rows[feature][place][len(found) :] == -1).all()
            assert torch.equal(scan.by_layer.values[feature][place][: len(found)], expected[live])
            assert (scan.by_layer.layer[feature][place][: len(found)] == l).all()
        for kept, found in ((scan.top, rows_found), (scan.sampled, sampled)):
            for name in ("layer", "token", "doc", "pos"):
                stored = torch.from_numpy(rows[name][found.numpy()].astype(np.int64))
                assert torch.equal(getattr(kept, name)[feature][: len(found)], stored)


def test_the_scan_is_the_same_whatever_its_batch_size(store, sae):
    scans = [scan_features(sae, store, "train", None, top=5, batch_rows=batch_rows) for batch_rows in (4096, 97)]
    assert torch.equal(scans[0].counts, scans[1].counts)
    for kept in ("top", "sampled", "by_layer"):
        for name in ("values", "rows", "doc", "pos"):
            assert torch.equal(getattr(getattr(scans[0], kept), name), getattr(getattr(scans[1], kept), name)), (kept, name)


def test_merge_top_keeps_the_largest_and_of_equal_values_the_earliest_rows():
    latents, values = torch.tensor([0, 0, 2, 0, 0, 2, 0]), torch.tensor([1.0, 2, 5, 2, 2, 4, 3])
    held = merge_top(Kept.empty(3, 3, torch.float32, "cpu"), latents, values, torch.arange(7), values * 10)
    assert held.keys.tolist() == [[3, 2, 2], [0, 0, 0], [5, 4, 0]]
    assert held.rows.tolist() == [[6, 1, 3], [-1, -1, -1], [2, 5, -1]]
    assert held.values.tolist() == [[30, 20, 20], [0, 0, 0], [50, 40, 0]]  # each row's value travels with its key
    new = torch.tensor([2.0, 4, 1])
    merged = merge_top(held, torch.tensor([0, 2, 1]), new, torch.tensor([7, 8, 9]), new * 10)
    assert merged.keys.tolist() == [[3, 2, 2], [1, 0, 0], [5, 4, 4]]  # row 7 ties rows 1 and 3, and comes later
    assert merged.rows.tolist() == [[6, 1, 3], [9, -1, -1], [2, 5, 8]]
    assert merged.values.tolist() == [[30, 20, 20], [10, 0, 0], [50, 40, 40]]
    generator = torch.Generator().manual_seed(0)
    latents, values = torch.randint(0, 8, (400,), generator=generator), torch.randperm(400, generator=generator).float() + 1
    code = torch.zeros(400, 8).index_put_((torch.arange(400), latents), values)  # [rows, latents], one firing a row
    expected = code.T.topk(7, dim=1)
    found = merge_top(Kept.empty(8, 7, torch.float32, "cpu"), latents, values, torch.arange(400), values)
    assert torch.equal(found.keys, expected.values) and torch.equal(found.rows, expected.indices)


def test_the_sample_is_uniform_over_the_rows_a_latent_fires_on_and_differs_between_latents():
    """Every latent fires on all 1000 rows: its 10 sampled rows should fall evenly over them, as a random draw's would,
    and two latents' samples should share no more rows than chance."""
    n_latents, n_rows, samples = 2000, 1000, 10
    rows = torch.arange(n_rows).repeat_interleave(n_latents)
    latents = torch.arange(n_latents).repeat(n_rows)
    found = merge_top(Kept.empty(n_latents, samples, torch.int64, "cpu"), latents, sample_priority(rows, latents), rows,
                      torch.ones(len(rows)))
    assert (found.rows >= 0).all() and all(len(set(row)) == samples for row in found.rows.tolist())
    by_tenth = torch.bincount(found.rows.flatten() // 100, minlength=10)  # 2000 expected in each, sd about 42
    assert (by_tenth - 2000).abs().max() < 200, by_tenth
    shared = sum(len(set(a) & set(b)) for a, b in zip(found.rows[::2].tolist(), found.rows[1::2].tolist()))
    assert shared < 200  # chance: 1000 pairs x 10 x 10 / 1000 = 100 expected
    far = sample_priority(torch.tensor([2**40, 2**40 + 1]), torch.tensor([10**6, 10**6]))  # no overflow, in range
    assert ((far >= 0) & (far < 2**31)).all() and far[0] != far[1]


def empty_rows(n_latents: int, m: int) -> LatentRows:
    """No row kept for any latent: activations 0, everything else -1."""
    return LatentRows(torch.zeros(n_latents, m), *[torch.full((n_latents, m), -1) for _ in range(6)])


def firing_at(layer_counts: torch.Tensor, activation: float = 1.0) -> torch.Tensor:
    """A scan's activation_counts where every firing had this activation."""
    counts = torch.zeros(len(layer_counts), len(features.ACTIVATION_EDGES) - 1, dtype=torch.int64)
    counts[:, int(np.searchsorted(features.ACTIVATION_EDGES.numpy(), activation, side="right")) - 1] = layer_counts.sum(1)
    return counts


def hand_made_scan() -> FeatureScan:
    """Latent 0 fires on 40 of 120 rows, most of them on layer 1, yet at the higher rate on layer 0 (20 rows);
    latent 1 never fires; latent 2 on 65, at the higher rate on layer 1."""
    layer_counts = torch.tensor([[10, 30], [0, 0], [5, 60]])
    return FeatureScan("train", 120, layer_counts, torch.tensor([20, 100]), empty_rows(3, 1), empty_rows(3, 1), empty_rows(3, 2),
                       firing_at(layer_counts))


def test_the_peak_layer_is_the_one_with_the_highest_rate_not_the_most_rows():
    scan = hand_made_scan()
    torch.testing.assert_close(scan.layer_frequency, torch.tensor([[0.5, 0.3], [0.0, 0.0], [0.25, 0.6]], dtype=torch.float64))
    assert (scan.peak_layer(0), scan.peak_layer(2)) == (0, 1)
    assert scan.dead.tolist() == [False, True, False] and scan.dense.tolist() == [True, False, True]


def test_layer_breadth_counts_the_layers_a_latent_fires_on_by_their_rates(tmp_path):
    """One layer: 1. Layers at the same rate, however many rows each holds: their number, hidden states not scanned
    left out. Dead: 0. Between, the exp of the entropy of the rates made to sum to 1."""
    rows_by_layer = torch.tensor([20, 0, 100, 40])  # hidden state 1 not scanned
    counts = torch.tensor([[0, 0, 7, 0], [2, 0, 10, 4], [0, 0, 0, 0], [10, 0, 30, 0]])
    scan = FeatureScan("train", 160, counts, rows_by_layer, empty_rows(4, 1), empty_rows(4, 1), empty_rows(4, 4), firing_at(counts))
    mixed = torch.tensor([0.5, 0.3], dtype=torch.float64) / 0.8
    torch.testing.assert_close(scan.layer_breadth, torch.tensor([1.0, 3.0, 0.0, float((-(mixed * mixed.log()).sum()).exp())],
                                                                dtype=torch.float64))
    console = recording_console()
    print_feature(console, scan, 3, LatentContexts([], [], []), None)
    assert "peak layer 0 (50.000% of its rows), spread over 1.9 of 3 layers" in console.file.getvalue()
    assert breadth_summary(scan) == "alive latents spread over 1.9 of 3 layers (median; quartiles 1.5 and 2.5)"
    page = write_html_report(tmp_path / "r.html", scan, {1: LatentContexts([], [], []), 2: LatentContexts([], [], [])}, {1: None, 2: None},
                             "breadth", {}).read_text()
    assert "<td>0</td><td>3.0</td><td>" in page  # latent 1: peak layer 0 (the first of equal rates), 3.0 layers
    assert '<td><a href="#f2">2</a></td><td>dead</td><td>0</td><td>-</td><td>-</td>' in page
    assert "spread over 3.0 of 3 layers." in page and "alive latents spread over 1.9 of 3 layers" in page
    assert 'alt="layer breadth and peak layers of the alive latents"' in page


def test_a_latent_firing_on_exactly_a_tenth_of_the_rows_is_not_dense_anywhere(tmp_path):
    """Dense is more than 10%: in float32, 100 / 1000 came out above 0.1 in the terminal and the report."""
    counts = torch.tensor([[100], [1]])
    scan = FeatureScan("train", 1000, counts, torch.tensor([1000]), empty_rows(2, 1), empty_rows(2, 1), empty_rows(2, 1), firing_at(counts))
    assert scan.dense.tolist() == [False, False] and float(scan.frequency[0]) == 0.1
    console = recording_console()
    print_feature(console, scan, 0, LatentContexts([], [], []), None)
    assert "dense" not in console.file.getvalue()
    page = write_html_report(tmp_path / "r.html", scan, {0: LatentContexts([], [], [])}, {0: None}, "exact", {}).read_text()
    assert 'class="dense">10.000%' not in page and "10.000%" in page


def test_a_hidden_state_not_scanned_is_marked_apart_from_one_where_the_latent_is_silent(tmp_path):
    """Scanned with --layers 0,2 (or trained on them): layer 1's rate of 0 is no finding, and layer 3's is."""
    scan = FeatureScan("train", 160, torch.tensor([[10, 0, 30, 0]]), torch.tensor([20, 0, 100, 40]), empty_rows(1, 1),
                       empty_rows(1, 1), empty_rows(1, 4), firing_at(torch.tensor([[10, 0, 30, 0]])))
    console = recording_console()
    print_feature(console, scan, 0, LatentContexts([], [], []), None)
    assert "layers 0-3 █·▅   peak layer 0" in console.file.getvalue()
    page = write_html_report(tmp_path / "r.html", scan, {0: LatentContexts([], [], [])}, {0: None}, "part", {}).read_text()
    assert "<title>layer 1 (not scanned): 0</title>" in page and "<title>layer 3 (%): 0</title>" in page


def test_a_dead_latents_report_says_so_and_shows_no_peak_layer(tmp_path):
    """Its section read "most often on layer 0 (0.000% of its rows)" under promoted tokens at layer 0: argmax of zeros."""
    page = write_html_report(tmp_path / "r.html", hand_made_scan(), {1: LatentContexts([], [], [])}, {1: None}, "hand-made", {}).read_text()
    section = page[page.index('<section class="feature" id="f1">') :].split("</section>")[0]
    assert "dead: fires on none of the 120 train rows scanned" in section
    assert "layer" not in section and "Promoted" not in section and "Top activations" not in section
    assert '<td><a href="#f1">1</a></td><td>dead</td><td>0</td><td>-</td>' in page


def test_html_report_numbers_are_the_scans(tmp_path):
    scan = hand_made_scan()
    page = write_html_report(tmp_path / "r.html", scan, {0: LatentContexts([], [], []), 2: LatentContexts([], [], [])}, {0: None, 2: None}, "hand-made", {}).read_text()
    for feature, density, count, peak, rate in ((0, "33.333%", 40, 0, "50.000%"), (2, "54.167%", 65, 1, "60.000%")):
        assert f'<td><a href="#f{feature}">{feature}</a></td><td><span class="dense">{density}</span></td><td>{count}</td><td>{peak}</td>' in page
        section = page[page.index(f'<section class="feature" id="f{feature}">') :].split("</section>")[0]
        assert f"fires on {count} of 120 rows" in section and f"most often on layer {peak} ({rate} of its rows)" in section
        (low, high), = re.findall(r'fill="#d33"><title>frequency 10\^(-?[\d.]+) to 10\^(-?[\d.]+)', section)
        assert float(low) <= np.log10(count / 120) <= float(high)  # the latent's own bin in red, and only it


def test_dead_dense_and_density_histogram(store, sae):
    scan = scan_features(sae, store, "train", None, top=3)
    assert scan.dense[0] and scan.counts[0] == scan.n_rows
    for kept in (scan.top, scan.sampled):
        assert scan.dead[1] and (kept.rows[1] == -1).all() and (kept.values[1] == 0).all()
    assert int(scan.dense.sum()) == int((scan.frequency > 0.1).sum()) and int(scan.dead.sum()) == int((scan.counts == 0).sum())
    counts, edges, n_dead = density_histogram(scan)
    assert counts.sum() + n_dead == N_LATENTS and n_dead == int(scan.dead.sum())
    assert len(edges) == len(counts) + 1


def test_contexts_are_the_stored_documents_around_the_row(store, sae, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scan = scan_features(sae, store, "train", None, top=4)
    documents = store.document_tokens()
    checked = 0
    for feature in torch.nonzero(~scan.dead).flatten()[:4].tolist():
        for kept in (scan.top, scan.sampled):
            contexts = feature_contexts(kept, store, tokenizer, feature, context=5)
            assert [c.value for c in contexts] == kept.values[feature][kept.rows[feature] >= 0].tolist()
            for j, c in enumerate(contexts):
                document = documents[c.doc]
                assert c.token_ids[c.center] == document[c.pos] == kept.token[feature, j]
                assert c.token_ids == document[max(0, c.pos - 5) : c.pos + 6].tolist()
                assert c.tokens == token_texts(tokenizer, c.token_ids) and "\n" not in "".join(c.tokens)
                checked += 1
    assert checked > 16


def test_a_latents_top_and_sampled_contexts_read_each_shard_once(store, sae, tiny_model_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scan = scan_features(sae, store, "train", None, top=4)
    reads = []
    read = store.shard_documents
    monkeypatch.setattr(store, "shard_documents", lambda shard: reads.append(shard.name) or read(shard))
    feature = int(scan.counts.argmax())  # fires nearly everywhere: its rows lie in both shards
    shown = LatentContexts.of(scan, store, tokenizer, feature, context=5)
    assert len(shown.top) == 4 and len(shown.sampled) == 10
    held = {int(shard) for kept in (scan.top, scan.sampled) for shard in kept.shard[feature].tolist()}
    assert len(held) == 2 and sorted(reads) == sorted(store.shards[i].name for i in held)


def test_the_scan_reads_each_shards_provenance_columns_once(store, sae, monkeypatch):
    """The top, sampled and per-layer rows of the latents lie in both shards; their provenance is read in one pass."""
    reads = []
    read = store.read
    monkeypatch.setattr(store, "read", lambda shard, column, *args: reads.append((shard.name, column)) or read(shard, column, *args))
    scan = scan_features(sae, store, "train", None, top=4)
    columns = [(shard, column) for shard, column in reads if column.split("/")[1] in ("token", "doc", "pos")]  # read only for provenance
    assert sorted(columns) == sorted((shard.name, f"train/{name}") for shard in store.shards for name in ("token", "doc", "pos"))
    assert {int(s) for kept in (scan.top, scan.sampled, scan.by_layer) for s in kept.shard[kept.rows >= 0].tolist()} == {0, 1}


def test_promoted_and_suppressed_tokens_are_the_logit_lens_of_the_decoder_direction(sae, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    lens = Lens.of(loaded)
    assert lens.final_layer == 4 and torch.equal(lens.unembedding, loaded.model.lm_head.weight)
    assert torch.equal(lens.norm_weight, loaded.model.model.norm.weight)
    lens = replace(lens, norm_weight=torch.rand(64) + 0.5)  # the tiny model's is all ones
    feature, lm_head = 5, loaded.model.lm_head
    assert sae.norm_scale[4] != 1 and sae.norm_scale[2] != sae.norm_scale[4]
    with torch.no_grad():
        expected = {
            4: lm_head(sae.W_dec[feature] / sae.norm_scale[4]),  # the final layer's state is already the norm's output
            2: lm_head(sae.W_dec[feature] / sae.norm_scale[2] * lens.norm_weight),  # earlier ones still pass its weight
        }
    for layer, logits in expected.items():
        effects = logit_effects(sae, lens, feature, layer, n_tokens=7)
        for shown, (values, ids) in ((effects.promoted, logits.topk(7)), (effects.suppressed, (-logits).topk(7))):
            assert [text for text, _ in shown] == [token_texts(loaded.tokenizer, [i])[0] for i in ids.tolist()]
            assert [value for _, value in shown] == pytest.approx([float(logits[i]) for i in ids], rel=1e-5)
        assert effects.promoted[-1][1] > 0 > effects.suppressed[-1][1]  # a random direction raises some tokens, lowers others


def test_ranked_tokens_are_each_shown_on_their_own(sae, tiny_model_dir):
    """Ranked tokens are no text: the bytes of 中 ranked in a row must not be drawn as the character."""
    loaded = load_model(str(tiny_model_dir))
    ids = loaded.tokenizer.encode("中")  # three one-byte tokens in the tiny vocabulary
    assert len(ids) == 3
    lens = Lens.of(loaded)
    direction = sae.W_dec[5] / sae.norm_scale[lens.final_layer]
    unembedding = torch.zeros_like(lens.unembedding)
    for i, logit in zip(ids, (3.0, 2.5, 2.0)):
        unembedding[i] = direction * logit / direction.pow(2).sum()
    effects = logit_effects(sae, replace(lens, unembedding=-unembedding), 5, lens.final_layer, n_tokens=3)
    assert [text for text, _ in effects.suppressed] == ["\\xe4", "\\xb8", "\\xad"]


class ReportParser(HTMLParser):
    """Collects what the report tests check: sections, index links, images, contexts and their highlighted token."""

    def __init__(self):
        super().__init__()
        self.sections, self.links, self.similar, self.images, self.charts, self.contexts = [], [], [], [], [], []
        self.stack, self.heading = [], None  # the last h3 read, with its text: "Top activations" or "Random activations"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "a" and attrs.get("href", "").startswith("#f"):
            (self.similar if attrs.get("class") == "sim" else self.links).append(attrs["href"][1:])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "svg":
            self.charts.append(self.sections[-1])
        if attrs.get("class") == "ctx":
            self.contexts.append({"text": "", "active": "", "section": self.sections[-1], "heading": self.heading})
        if tag in ("div", "span", "h3"):
            self.stack.append(attrs.get("class") if tag != "h3" else "h3")
        if tag == "h3":
            self.heading = ""

    def handle_endtag(self, tag):
        if tag in ("div", "span", "h3"):
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "h3":
            self.heading += data
        if "ctx" in self.stack and "where" not in self.stack:
            self.contexts[-1]["text"] += data
            if self.stack[-1] == "act":
                self.contexts[-1]["active"] += data


def test_context_html_escapes_code():
    context = Context(2.0, 3, 7, 2, [1, 2, 3, 4], ["if a ", "<", "&b>", " '\"x"], 1)
    parser = ReportParser()
    parser.sections.append("f0")
    parser.feed(context_html(context, 4.0))
    assert parser.contexts == [{"text": "if a <&b> '\"x", "active": "<", "section": "f0", "heading": None}]


def recording_console() -> Console:
    return Console(file=io.StringIO(), width=300, color_system=None)


def test_tokens_that_look_like_rich_markup_print_as_text(store, sae):
    scan = scan_features(sae, store, "train", None, top=3)
    console = recording_console()
    context = Context(2.0, 3, 7, 2, [1, 2, 3], ["a[/", "[bold]", "x][/y:smile:"], 1)
    effects = LogitEffects([("[/", 1.5), ("[bold]x", 0.5), ("][/", 0.25), (":smile:", 0.125), ("\\xf0", 0.0625)], [("[red]", -2.0)])
    print_feature(console, scan, 2, LatentContexts([context], [], []), effects)
    shown = console.file.getvalue()
    assert "promotes '[/' +1.5  '[bold]x' +0.5  '][/' +0.25  ':smile:' +0.125  '\\xf0' +0.0625\nsuppresses '[red]' -2\n" in shown
    assert "a[/⟦[bold]⟧x][/y:smile:" in shown


@pytest.mark.parametrize("width", [60, 80, 120])
def test_a_long_left_context_never_pushes_the_activating_token_off_the_line(store, sae, width):
    scan = scan_features(sae, store, "train", None, top=3)
    console = Console(file=io.StringIO(), width=width, color_system=None)
    left = ["    return self._name"] * 12  # a docstring's worth of wide tokens, as in real code
    context = Context(2.0, 3, 7, 12, list(range(25)), left + ["ACT"] + ["x"] * 12, 12)
    print_feature(console, scan, 2, LatentContexts([context, replace(context, tokens=["a"] * 12 + ["ACT"] + ["b"] * 12)], [], []), None)
    lines = console.file.getvalue().splitlines()[-2:]
    assert "…" in lines[0] and "_name⟦ACT⟧xx" in lines[0] and "aaaaaaaaaaaa⟦ACT⟧bb" in lines[1]  # cut only where it does not fit
    assert all(cell_len(line) <= width for line in lines)


def test_html_report_structure(store, sae, run_dir, tiny_model_dir, tmp_path):
    html = tmp_path / "[b]:smile:" / "report.html"  # printed as text, not rich markup or emoji codes
    console = recording_console()
    path = explore_features(FeaturesConfig(sae=str(run_dir), html=str(html), n_report_features=6, top=4, context=4), console, progress=False)
    assert path == html and f"wrote {html}" in console.file.getvalue()
    page = path.read_text()
    parser = ReportParser()
    parser.feed(page)
    scan = scan_features(sae, store, "train", 200_000, top=4)
    features = [int(s[1:]) for s in parser.sections]
    assert len(features) == 6 and parser.links == parser.sections and 0 in features and not scan.dead[features].any()
    assert "http://" not in page and "https://" not in page
    settings = json.loads(html_module.unescape(page.split('<pre id="settings">')[1].split("</pre>")[0]))
    assert settings == {**asdict(FeaturesConfig(sae=str(run_dir), html=str(html), n_report_features=6, top=4, context=4)),
                        "shards": store.url, "layers": [0, 1, 2, 3, 4]}  # what made the report, resolved
    assert len(parser.images) == 2 and all(i.startswith("data:image/png;base64,") for i in parser.images)  # density, layers
    assert parser.charts == [section for section in parser.sections for _ in range(3)]  # layer profile, activations, density
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lens = Lens.of(load_model(str(tiny_model_dir)))
    documents = store.document_tokens()
    for feature in features:
        for heading, kept in (("Top activations", scan.top), ("Random activations", scan.sampled),
                              ("Top activations at each layer", scan.by_layer)):
            shown = [c for c in parser.contexts if c["section"] == f"f{feature}" and c["heading"] == heading]
            places = (kept.rows[feature] >= 0).nonzero().flatten().tolist()  # by_layer: empty where a layer has no firing
            assert len(shown) == len(places) > 0
            for j, c in zip(places, shown):
                doc, pos = int(kept.doc[feature, j]), int(kept.pos[feature, j])
                window = token_texts(tokenizer, documents[doc][max(0, pos - 4) : pos + 5].tolist())
                assert c["active"] == window[min(pos, 4)] and c["text"] == "".join(window)
        n_fired, n_sampled = int(scan.counts[feature]), int((scan.sampled.rows[feature] >= 0).sum())
        assert f"{n_sampled} of the {n_fired:,} rows it fired on, drawn uniformly, largest first" in page
        section = page.split(f'id="f{feature}"')[1].split("</section>")[0]
        effects = logit_effects(sae, lens, feature, scan.peak_layer(feature))
        for heading, tokens in ((f"Promoted tokens (logit lens at layer {scan.peak_layer(feature)})", effects.promoted),
                                ("Suppressed tokens", effects.suppressed)):
            shown = re.findall(r'<span class="tok" title="logit ([^"]+)">(.*?)</span>', section.split(f"<h3>{heading}</h3><p>")[1].split("</p>")[0])
            assert shown == [(f"{value:+.3f}", html_module.escape(text)) for text, value in tokens]
        similar = similar_latents(sae, ~scan.dead, feature)
        shown = section.split("<h3>Similar decoder directions</h3><p>")[1].split("</p>")[0]
        assert re.findall(r"(\d+)(?:</a>)? ([+-][\d.]+)", shown) == [(str(latent), f"{cosine:+.3f}") for latent, cosine in similar]
        assert re.findall(r'href="#f(\d+)"', shown) == [str(latent) for latent, _ in similar if latent in features]
    assert parser.similar and set(parser.similar) <= set(parser.sections)  # linked where the report has the latent
    assert any(ch in c["text"] for c in parser.contexts for ch in "<>&")  # code tokens survived escaping


def test_similar_latents_are_the_closest_alive_decoder_directions(store, sae):
    alive = torch.ones(N_LATENTS, dtype=torch.bool)
    alive[[1, 7]] = False
    W = sae.W_dec.detach().double().numpy()
    for feature in (0, 5, 7):
        cosine = W @ W[feature] / (np.linalg.norm(W, axis=1) * np.linalg.norm(W[feature]))
        want = [int(i) for i in np.argsort(-cosine) if i != feature and alive[i]][:8]
        found = similar_latents(sae, alive, feature)
        assert [latent for latent, _ in found] == want
        np.testing.assert_allclose([value for _, value in found], cosine[want], atol=1e-5)
    assert similar_latents(sae, alive, 0, n=N_LATENTS) == similar_latents(sae, alive, 0, n=N_LATENTS - 3)  # all alive others
    twin = copy.deepcopy(sae)
    with torch.no_grad():
        twin.W_dec[9] = -3 * twin.W_dec[4]  # opposite: the last; a scaled copy would be the first
        twin.W_dec[11] = 2 * twin.W_dec[4]
    assert similar_latents(twin, alive, 4)[0] == (11, pytest.approx(1.0)) and similar_latents(twin, alive, 4, n=N_LATENTS)[-1] == (9, pytest.approx(-1.0))
    console = recording_console()
    print_feature(console, scan_features(sae, store, "train", None, top=3), 0, LatentContexts([], [], []), None, [(5, 0.5), (3, -0.25)])
    assert "similar decoder directions (cosine): 5 +0.500  3 -0.250\n" in console.file.getvalue()


def test_errors_are_one_line(store, sae, run_dir, tmp_path):
    sae.save(tmp_path / "no-data")
    with pytest.raises(CrosscodersError, match="pass --shards"):
        explore_features(FeaturesConfig(sae=str(tmp_path / "no-data")), QUIET)
    TopKSAE(SAEConfig(d_model=64, n_layers=3, expansion=2, k=4)).save(tmp_path / "other")
    with pytest.raises(CrosscodersError, match="n_layers=3"):
        explore_features(FeaturesConfig(sae=str(tmp_path / "other"), shards=store.url), QUIET)
    with pytest.raises(CrosscodersError, match="out of range"):
        explore_features(replace(FeaturesConfig(sae=str(run_dir)), feature=N_LATENTS), QUIET)
    with pytest.raises(CrosscodersError, match="^--top and --n-report-features must be positive, --context, --samples and "
                                               "--per-layer at least 0; got 0, 50, 12, 10 and 1$"):
        FeaturesConfig(top=0)
    with pytest.raises(CrosscodersError, match="got 10, 50, 12, -1 and 1$"):
        FeaturesConfig(samples=-1)
    with pytest.raises(CrosscodersError, match="got 10, 50, 12, 10 and -1$"):
        FeaturesConfig(per_layer=-1)
    (tmp_path / "file").write_text("")
    with pytest.raises(CrosscodersError, match="cannot write to .*file .*; pass a writable path as --html"):
        explore_features(FeaturesConfig(sae=str(run_dir), html=str(tmp_path / "file" / "report.html")), QUIET)
    with pytest.raises(CrosscodersError, match="is a folder; pass a file path such as"):
        explore_features(FeaturesConfig(sae=str(run_dir), html=str(tmp_path)), QUIET)


def test_a_model_or_store_other_than_the_sae_was_trained_on_is_refused(run_dir, other_tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "scan_features", lambda *args, **kwargs: pytest.fail("scanned before checking the model"))
    with pytest.raises(CrosscodersError, match="is not the model the store was cached from.*pass that model as --model"):
        explore_features(FeaturesConfig(sae=str(run_dir), model=str(other_tiny_model_dir), n_rows=100), QUIET, progress=False)
    corpus = tmp_path / "pairs.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i} = {i}"}) + "\n" for i in range(10)))
    config = CacheConfig(model=str(other_tiny_model_dir), out=str(tmp_path / "store"), n_tokens=100, batch_tokens=512, max_seq_len=64, dtype="float32")
    cache_activations(config, CorpusConfig(dataset=str(corpus)), console=QUIET, progress=False)
    with pytest.raises(CrosscodersError, match="but the SAE was trained on.*pass a store of that model as --shards"):
        explore_features(FeaturesConfig(sae=str(run_dir), shards=str(tmp_path / "store")), QUIET, progress=False)
    wider = {"name": "wide", "fingerprint": "f", "d_model": 128, "n_layers": 4, "n_hidden_states": 5, "vocab_size": 400}
    create_or_open(tmp_path / "wide", {"model": wider, "dtype": "float32", "layers": [0]})  # another model, of another shape
    with pytest.raises(CrosscodersError, match="holds activations of 'wide', but the SAE was trained on"):
        explore_features(FeaturesConfig(sae=str(run_dir), shards=str(tmp_path / "wide")), QUIET, progress=False)


def test_the_scan_defaults_to_the_layers_the_sae_was_trained_on(store, sae, run_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    sae.save(run)
    data = json.loads((run_dir / DATA_FILE).read_text())
    (run / DATA_FILE).write_text(json.dumps({**data, "train_layers": [2]}))  # train-sae --layers 2
    scanned = []

    def scan_features(*args, layers, **kwargs):
        scanned.append(layers)
        raise KeyboardInterrupt  # what was asked for is all this test needs

    monkeypatch.setattr(features, "scan_features", scan_features)
    for layers, expected in (("trained", [2]), ("all", [0, 1, 2, 3, 4]), ("3,1", [1, 3]), ("0-4", [0, 1, 2, 3, 4])):
        with pytest.raises(KeyboardInterrupt):
            explore_features(FeaturesConfig(sae=str(run), layers=layers), QUIET, progress=False)
        assert scanned.pop() == expected
    with pytest.raises(CrosscodersError, match=r"--layers '5': layer 5 is out of range"):
        explore_features(FeaturesConfig(sae=str(run), layers="5"), QUIET, progress=False)


def test_report_of_a_checkpoint_goes_beside_it(sae, run_dir, tmp_path):
    run = tmp_path / "run"
    sae.save(run / CHECKPOINT)
    shutil.copy(run_dir / DATA_FILE, run)
    path = explore_features(FeaturesConfig(sae=str(run / CHECKPOINT), n_rows=100, n_report_features=2), QUIET, progress=False)
    assert path == run / "features-checkpoint.html" and path.exists()  # the trainer replaces checkpoint/


@pytest.mark.parametrize("html, message", [("newdir/", r"--html newdir/ names a folder; pass a file path such as newdir/features.html"),
                                           ("s3://b/f.html", r"--html s3://b/f.html must be a local path"),
                                           ("report", r"^--html report is not an \.html file, and the report replaces what it names")])
def test_an_html_path_that_is_no_local_file_is_refused_before_the_scan(run_dir, tmp_path, monkeypatch, html, message):
    """newdir/ was written as a file named newdir; s3://b/f.html as a local folder named s3:"""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CrosscodersError, match=message):
        explore_features(FeaturesConfig(sae=str(run_dir), html=html, n_rows=300), QUIET)
    assert list(tmp_path.iterdir()) == []


def test_an_html_path_naming_a_file_of_the_run_is_refused_and_the_file_kept(run_dir):
    config = (run_dir / "cfg.json").read_bytes()
    with pytest.raises(CrosscodersError, match=r"cfg\.json is not an \.html file"):
        explore_features(FeaturesConfig(sae=str(run_dir), html=str(run_dir / "cfg.json"), n_rows=300), QUIET)
    assert (run_dir / "cfg.json").read_bytes() == config


def test_a_model_that_does_not_load_is_a_note(run_dir, tmp_path):
    console = recording_console()
    missing = tmp_path / "[b]:smile:model"
    explore_features(FeaturesConfig(sae=str(run_dir), model=str(missing), feature=2, n_rows=300), console, progress=False)
    assert f"note: model '{missing}' did not load" in console.file.getvalue()


def test_a_full_disk_leaves_the_last_report_whole_and_says_so_in_one_line(store, run_dir, tmp_path, monkeypatch):
    html = tmp_path / "report.html"
    explore_features(FeaturesConfig(sae=str(run_dir), html=str(html), n_rows=300), QUIET)
    before = html.read_text()

    def half_written_then_full(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_written_then_full)
    with pytest.raises(CrosscodersError, match=r"^cannot write .*report.html \(No space left on device\); free space or pass another --html$"):
        explore_features(FeaturesConfig(sae=str(run_dir), html=str(html), n_rows=600), QUIET)
    assert html.read_text() == before and [p.name for p in tmp_path.glob("report*")] == ["report.html"]


def cli(*args: str, fresh: bool = False) -> subprocess.CompletedProcess:
    return run_python("sae_features.py", *args, env={**os.environ, "COLUMNS": "250"}, fresh=fresh)


def test_cli_prints_a_feature_and_rejects_an_unknown_one(store, sae, run_dir, tiny_model_dir):
    result = cli("--sae", str(run_dir), "--feature", "0", "--top", "3", "--context", "2")
    assert result.returncode == 0, result.stderr
    scan = scan_features(sae, store, "train", 200_000, top=3)
    assert "feature 0" in result.stdout and "dense" in result.stdout
    effects = logit_effects(sae, Lens.of(load_model(str(tiny_model_dir))), 0, scan.peak_layer(0))
    assert "promotes " + "  ".join(f"'{text}' {value:+.3g}" for text, value in effects.promoted) in result.stdout
    assert "suppresses " + "  ".join(f"'{text}' {value:+.3g}" for text, value in effects.suppressed) in result.stdout
    similar = "  ".join(f"{latent} {cosine:+.3f}" for latent, cosine in similar_latents(sae, ~scan.dead, 0))
    assert f"similar decoder directions (cosine): {similar}\n" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    top, sampled = result.stdout.split("random activations: ")
    sampled, by_layer = sampled.split("top activations at each layer")
    assert "top activations" in top and sampled.startswith(f"10 of the {int(scan.counts[0]):,} rows it fired on, drawn uniformly")
    assert [int(layer) for layer in re.findall(r" L(\d+) +doc", by_layer)] == list(range(5))  # latent 0 fires on every row
    for shown, kept, n in ((top, scan.top, 3), (sampled, scan.sampled, 10), (by_layer, scan.by_layer, 5)):
        for j in range(n):
            active = token_texts(tokenizer, [int(kept.token[0, j])])[0]
            assert f"doc {int(kept.doc[0, j])} pos {int(kept.pos[0, j])}" in shown and f"⟦{active}⟧" in shown
    assert not (run_dir / "features.html").exists()  # --feature alone prints, and writes no report

    result = cli("--sae", str(run_dir), "--feature", str(N_LATENTS), fresh=True)  # and as a new interpreter starts
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "out of range" in result.stderr and "Traceback" not in result.stderr


def test_an_sae_in_bf16_scans_as_its_float32_copy(store, sae):
    """From a notebook: the scan fed float32 rows to a bf16 SAE and failed."""
    half = copy.deepcopy(sae).to(torch.bfloat16)
    scan = scan_features(half, store, "train", 500, top=3)
    same = scan_features(copy.deepcopy(half).float(), store, "train", 500, top=3)
    assert scan.n_rows == 500 and (scan.counts - same.counts).abs().sum() <= 0.05 * same.counts.sum()


@pytest.fixture(scope="module")
def sweep_dir(store, sae, tmp_path_factory) -> Path:
    """A sweep's folder as train-sae --sweep leaves it: runs k=4 (the fixture's SAE) and k=2 (other weights), and a run
    still training (a checkpoint alone)."""
    folder = tmp_path_factory.mktemp("sweep")
    rows = all_rows(store, "train")
    torch.manual_seed(1)
    other = TopKSAE(SAEConfig(d_model=64, n_layers=5, expansion=2, k=2), layer_stats_of(rows["acts"], torch.from_numpy(rows["layer"].astype(np.int64)), 5))
    data = {"shards": store.url, "model": store.metadata["model"], "layers": store.metadata["layers"]}
    for name, run_sae in (("k=4", sae), ("k=2", other)):
        run_sae.save(folder / name)
        (folder / name / TRAIN_CONFIG_FILE).write_text("{}")
        (folder / name / DATA_FILE).write_text(json.dumps(data))
    other.save(folder / "k=8" / CHECKPOINT)
    return folder


def test_a_sweep_gets_each_runs_report_as_it_alone_would(sweep_dir, store, sae):
    console = recording_console()
    found = explore_sweep(FeaturesConfig(sae=str(sweep_dir), n_rows=600, n_report_features=4, top=3, samples=2), console, progress=False)
    assert [f.run.name for f in found] == ["k=2", "k=4"] and [f.report for f in found] == [sweep_dir / n / "features.html" for n in ("k=2", "k=4")]
    assert "note: k=8: no final SAE yet (still training, or stopped): not scanned" in console.file.getvalue()
    alone = scan_features(sae, store, "train", 600, top=3, samples=2)
    assert torch.equal(found[1].scan.layer_counts, alone.layer_counts) and torch.equal(found[1].scan.top.rows, alone.top.rows)
    pages = [f.report.read_text() for f in found]
    for f, page in zip(found, pages):
        f.report.unlink()
        assert explore_features(FeaturesConfig(sae=str(f.run), n_rows=600, n_report_features=4, top=3, samples=2), QUIET, progress=False) == f.report
        assert f.report.read_text() == page  # settings included: the run's own folder and report
    out = sweep_dir.parent / "reports"
    found = explore_sweep(FeaturesConfig(sae=str(sweep_dir), n_rows=600, n_report_features=4, top=3, samples=2, html=str(out)), QUIET, progress=False)
    assert [f.report for f in found] == [out / "k=2.html", out / "k=4.html"]


def test_a_sweep_refuses_a_feature_a_report_file_and_runs_trained_apart(sweep_dir, tmp_path):
    with pytest.raises(CrosscodersError, match=r"--feature names a latent of one SAE.*pass one run, e\.g\. --sae .*k=2$"):
        explore_sweep(FeaturesConfig(sae=str(sweep_dir), feature=3), QUIET)
    with pytest.raises(CrosscodersError, match=r"names a file, and a sweep writes one report per run; pass a folder"):
        explore_sweep(FeaturesConfig(sae=str(sweep_dir), html=str(tmp_path / "r.html")), QUIET)
    apart = tmp_path / "apart"
    shutil.copytree(sweep_dir, apart, ignore=shutil.ignore_patterns("*.html"))
    data = json.loads((apart / "k=4" / DATA_FILE).read_text())
    (apart / "k=4" / DATA_FILE).write_text(json.dumps({**data, "train_layers": [0, 1]}))
    with pytest.raises(CrosscodersError, match="were not trained on the same store, model and hidden states"):
        explore_sweep(FeaturesConfig(sae=str(apart)), QUIET)
    assert not list(apart.glob("*/features.html"))


def test_cli_prints_a_row_per_run_of_a_sweep(sweep_dir, tmp_path):
    out = tmp_path / "reports"
    result = cli("--sae", str(sweep_dir), "--n-rows", "600", "--n-report-features", "2", "--html", str(out))
    assert result.returncode == 0, result.stderr
    found = {run: scan_features(load(sweep_dir / run), Store(json.loads((sweep_dir / run / DATA_FILE).read_text())["shards"]),
                                "train", 600, top=10, samples=0) for run in ("k=2", "k=4")}
    for run, scan in found.items():
        cells = (run, str(N_LATENTS), str(int((~scan.dead).sum())), str(int(scan.dead.sum())), str(int(scan.dense.sum())),
                 " / ".join(f"{q:.1f}" for q in breadth_quartiles(scan)))
        assert re.search(r"\s+".join(map(re.escape, cells)), result.stdout), cells
        assert f"wrote {out / (run + '.html')}" in result.stderr


TEXT = "<|im_start|>user\nAdd them.<|im_end|>\n<|im_start|>assistant\ndef add(a, b):\n    return a + b\n"


def test_text_latents_are_the_sae_on_the_models_own_hidden_states(store, sae, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    skipped = SkippedPositions.from_dict(store.metadata["skipped"])
    found = text_latents(loaded, sae, skipped, TEXT, [0, 2, 4])
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    recorded = ~skipped.mask(np.asarray(ids))
    assert found.token_ids == ids and found.recorded == recorded.tolist() and 0 < recorded.sum() < len(ids) - 2  # specials skipped
    with torch.no_grad():
        states = loaded.model.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for i, layer in enumerate([0, 2, 4]):
        values, indices = sae.encode(states[layer][0, torch.from_numpy(recorded)], layer)
        want = torch.zeros(len(ids), N_LATENTS)
        want[torch.from_numpy(recorded)] = torch.zeros(int(recorded.sum()), N_LATENTS).scatter(1, indices, values)
        got = torch.zeros(len(ids), N_LATENTS).scatter_add(1, found.indices[i].clamp(min=0), found.values[i])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (found.indices[i, ~torch.from_numpy(recorded)] == -1).all() and (found.values[i, ~torch.from_numpy(recorded)] == 0).all()
        torch.testing.assert_close(found.activations(5)[i], want[:, 5])


def test_the_strongest_latents_of_a_token_are_those_of_largest_activation_over_the_layers(store, sae, tiny_model_dir):
    found = text_latents(load_model(str(tiny_model_dir)), sae, SkippedPositions.from_dict(store.metadata["skipped"]), TEXT, list(range(5)))
    dense = torch.stack([found.activations(latent) for latent in range(N_LATENTS)], -1)  # [layers, seq, latents]
    for position in [p for p, kept in enumerate(found.recorded) if kept]:
        best, order = dense[:, position].max(0)[0].sort(descending=True, stable=True)
        want = [(int(latent), float(value), [layer for layer in range(5) if dense[layer, position, latent] > 0])
                for value, latent in zip(best[:6], order[:6]) if value > 0]
        assert found.strongest(position, 6) == want
    assert found.strongest(0, 6) == []  # not recorded: nothing encoded


def test_a_text_without_a_recorded_position_or_too_long_is_refused(store, sae, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    skipped = SkippedPositions.from_dict(store.metadata["skipped"])
    for text, message in ((" \n", r"^--text is empty; pass the text"), ("<|im_start|>", r"^--text has no position the store records"),
                          ("def f(x):\n    return x\n" * 200, r"^--text is [\d,]+ tokens, over the model's 512; shorten it$")):
        with pytest.raises(CrosscodersError, match=message):
            text_latents(loaded, sae, skipped, text, [2])


def test_text_latents_print_per_token_and_for_one_latent_per_layer(store, sae, run_dir, sweep_dir):
    console = recording_console()
    found = explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, top=3), console)
    shown = console.file.getvalue()
    assert "over hidden states 0-4" in shown and shown.count("not recorded by the store, not encoded") == found.recorded.count(False)
    for position in (p for p, kept in enumerate(found.recorded) if kept):
        cell = "  ".join(f"{latent} {value:.2f} ({layer_ranges(where)})" for latent, value, where in found.strongest(position, 3))
        assert re.search(rf"\b{position} +'{re.escape(found.tokens[position])}' +{re.escape(cell)}", shown), position
    console = recording_console()
    explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, feature=0, layers="1-3"), console)  # latent 0: every recorded row
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("feature 0 on the text: largest ") and [line[:5] for line in lines[1:]] == ["L1   ", "L2   ", "L3   "]
    marked = "".join(f"⟦{t}⟧" if kept else t for t, kept in zip(found.tokens, found.recorded))
    assert [line[5:] for line in lines[1:]] == [marked] * 3
    console = recording_console()
    explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, feature=1), console)  # dead
    assert console.file.getvalue() == "feature 1 fires on no token of the text at hidden states 0-4\n"
    with pytest.raises(CrosscodersError, match=r"^--text reads one SAE, and .* holds a sweep; pass one of its runs, e\.g\. --sae .*k=2$"):
        explore_text(FeaturesConfig(sae=str(sweep_dir), text=TEXT), QUIET)


def test_cli_shows_the_latents_of_a_text(store, sae, run_dir, tiny_model_dir, tmp_path):
    result = cli("--sae", str(run_dir), "--text", "def add(a, b):\n    return a + b\n", "--top", "2", "--layers", "3")
    assert result.returncode == 0, result.stderr
    found = text_latents(load_model(str(tiny_model_dir)), sae, SkippedPositions.from_dict(store.metadata["skipped"]),
                         "def add(a, b):\n    return a + b\n", [3])
    assert "over hidden states 3" in result.stdout and not (run_dir / "features.html").exists()
    latent, value, _ = found.strongest(len(found.tokens) - 1, 1)[0]
    assert f"{latent} {value:.2f} (3)" in result.stdout.splitlines()[-2]  # the last token's row (a blank line ends the table)
    path = tmp_path / "add.py"
    path.write_text("def add(a, b):\n    return a + b\n")
    from_file = cli("--sae", str(run_dir), "--text-file", str(path), "--top", "2", "--layers", "3")
    assert from_file.returncode == 0 and from_file.stdout == result.stdout, from_file.stderr


def test_a_text_file_or_standard_input_gives_the_text_as_it_is(store, sae, run_dir, tmp_path, monkeypatch):
    path = tmp_path / "add.py"
    path.write_bytes(TEXT.encode())  # its last newline is part of the text, as --text "$(cat f)" would drop it
    want = explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT), QUIET)
    found = explore_text(FeaturesConfig(sae=str(run_dir), text_file=str(path)), QUIET)
    assert found.token_ids == want.token_ids and found.tokens[-1].endswith("⏎")
    torch.testing.assert_close(found.values, want.values)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode())))
    assert explore_text(FeaturesConfig(sae=str(run_dir), text_file="-"), QUIET).token_ids == want.token_ids
    answer = tmp_path / "answer.py"
    answer.write_text("def add(a, b):\n    return a + b\n")
    prompted = explore_text(FeaturesConfig(sae=str(run_dir), text_file=str(answer), prompt="Add them."), QUIET)
    assert prompted.token_ids == explore_text(FeaturesConfig(sae=str(run_dir), text=answer.read_text(), prompt="Add them."), QUIET).token_ids


def test_a_text_file_that_cannot_be_read_as_text_is_refused(run_dir, tmp_path):
    (tmp_path / "latin1.py").write_bytes("# café\n".encode("latin-1"))
    (tmp_path / "blank.py").write_text(" \n\n")
    for name, message in (("missing.py", r"cannot read --text-file .*missing\.py \(No such file or directory\); pass a text file"),
                          (".", r"cannot read --text-file \. \(Is a directory\); pass a text file"),
                          ("latin1.py", r"--text-file .*latin1\.py is not UTF-8 text \(byte 5 is not\); convert it, e\.g\. with iconv"),
                          ("blank.py", r"--text-file .*blank\.py is empty; pass a file with the text")):
        text_file = name if name == "." else str(tmp_path / name)
        with pytest.raises(CrosscodersError, match=f"^{message}"):
            explore_text(FeaturesConfig(sae=str(run_dir), text_file=text_file), QUIET)
    with pytest.raises(CrosscodersError, match=r"^--text and --text-file both give the text; pass one$"):
        FeaturesConfig(sae=str(run_dir), text=TEXT, text_file="f.py")
    FeaturesConfig(sae=str(run_dir), text_file="f.py", prompt="Add them.")  # --prompt goes with either


class TextPageParser(HTMLParser):
    """Each div.text of a --text page: its pieces of text, each with the attributes of the span it is in (None outside)."""

    def __init__(self):
        super().__init__()
        self.texts, self.sections, self.span, self.in_text = [], [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "div" and attrs.get("class") == "text":
            self.texts.append([])
            self.in_text = True
        if tag == "span" and self.in_text:
            self.span = attrs

    def handle_endtag(self, tag):
        self.span = None if tag == "span" else self.span
        self.in_text = self.in_text and tag != "div"

    def handle_data(self, data):
        if self.in_text:
            self.texts[-1].append((data, self.span))


def test_a_text_page_shows_each_tokens_latents_and_the_latents_firing_most_over_the_text(store, sae, run_dir, tmp_path):
    path = tmp_path / "pages" / "add.html"
    console = recording_console()
    found = explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, top=3, html=str(path)), console)
    assert console.file.getvalue().endswith(f"wrote {path}\n")
    page = TextPageParser()
    page.feed(path.read_text())
    whole, *shown = page.texts
    lines = "".join(token.replace("⏎", "⏎\n") for token in found.tokens)  # the text keeps its lines
    assert "".join(data for data, _ in whole) == lines and len(whole) == len(found.tokens)
    for position, ((_, span), recorded) in enumerate(zip(whole, found.recorded)):
        strongest = "; ".join(f"{latent} {value:.2f} ({layer_ranges(where)})" for latent, value, where in found.strongest(position, 3))
        assert span["title"] == f"pos {position}: " + ((strongest or "none fires") if recorded else "not recorded by the store, not encoded")
    dense = torch.stack([found.activations(latent) for latent in range(N_LATENTS)], -1)  # [layers, seq, latents]
    best = dense.amax((0, 1))
    want = sorted((latent for latent in range(N_LATENTS) if best[latent] > 0), key=lambda latent: (-float(best[latent]), latent))[:3]
    assert found.strongest_latents(3) == want and page.sections == [f"f{latent}" for latent in want] and len(shown) == 3
    for latent, pieces in zip(want, shown):
        acts = dense[..., latent]
        peak = acts.amax(0)
        assert "".join(data for data, _ in pieces) == lines
        active = [(data, span) for data, span in pieces if span and span.get("class") == "act"]
        fired = torch.nonzero(peak > 0).flatten().tolist()
        assert [data for data, _ in active] == [found.tokens[p].replace("⏎", "⏎\n") for p in fired]
        for p, (_, span) in zip(fired, active):
            at = [(layer, float(acts[i, p])) for i, layer in enumerate(found.layers) if acts[i, p] > 0]
            assert span["title"] == (f"pos {p}: {float(peak[p]):.3f}, at hidden states {layer_ranges([layer for layer, _ in at])}: "
                                     + ", ".join(f"L{layer} {value:.3f}" for layer, value in at))
            assert span["style"] == f"background: rgba(255, 120, 0, {0.15 + 0.85 * float(peak[p] / best[latent]):.2f})"


def test_a_text_page_for_one_feature_and_its_refusals(store, sae, run_dir, tmp_path):
    path = tmp_path / "one.html"
    found = explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, feature=0, html=str(path)), QUIET)  # 0: every recorded row
    page = TextPageParser()
    page.feed(path.read_text())
    active = [data for data, span in page.texts[1] if span and span.get("class") == "act"]
    assert page.sections == ["f0"] and active == [t.replace("⏎", "⏎\n") for t, kept in zip(found.tokens, found.recorded) if kept]
    explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, feature=1, html=str(path)), QUIET)  # dead
    page = TextPageParser()
    page.feed(path.read_text())
    assert page.sections == ["f1"] and len(page.texts) == 1 and "fires on no token of the text at hidden states 0-4." in path.read_text()
    for html, message in (("p.txt", r"--html p\.txt is not an \.html file"),
                          ("dir/", r"--html dir/ names a folder; pass a file path such as dir/text\.html")):
        with pytest.raises(CrosscodersError, match=f"^{message}"):
            explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT, html=html), QUIET)


def test_text_asks_for_model_where_the_stores_does_not_load(run_dir, store, monkeypatch):
    def gone(spec, **kwargs):
        raise CrosscodersError(f"could not load model {spec!r}")

    monkeypatch.setattr(pipeline.evaluate, "load_model", gone)
    with pytest.raises(CrosscodersError, match=f"^could not load model .* \\(the model {store.url} was cached from; if it has "
                                               "moved, pass --model\\)$"):
        explore_text(FeaturesConfig(sae=str(run_dir), text=TEXT), QUIET)


def test_a_latents_activation_histogram_and_median(store, sae):
    scan = scan_features(sae, store, "train", None, top=3)
    rows = all_rows(store, "train")
    with torch.no_grad():
        values, indices = sae.encode(rows["acts"], torch.from_numpy(rows["layer"].astype(np.int64)))
    for feature in (2, 5, 17, 100):
        fired = values[indices == feature]
        fired = fired[fired > 0].sort().values
        counts, edges = scan.activation_histogram(feature)
        assert counts.sum() == len(fired) and counts[0] > 0 and counts[-1] > 0 and len(edges) == len(counts) + 1
        assert edges[0] <= fired[0] < edges[1] and edges[-2] <= fired[-1] < edges[-1]
        median = float(fired[(len(fired) - 1) // 2])  # the lower median
        assert median / 1.06 < scan.median_activation(feature) < median * 1.06
    assert scan.activation_histogram(1) is None  # dead
    console = recording_console()
    print_feature(console, scan, 5, LatentContexts([], [], []), None)
    counts, edges = scan.activation_histogram(5)
    line = f"activations {edges[0]:.3g} {features.sparkline(counts.tolist(), [True] * len(counts))} {edges[-1]:.3g} (log-spaced bins), "
    assert line + f"median about {scan.median_activation(5):.3g}\n" in console.file.getvalue()


def test_a_prompt_puts_the_text_in_the_chat_as_cache_acts_renders_documents(store, sae, run_dir, tiny_model_dir):
    answer = "def add(a, b):\n    return a + b\n"
    found = explore_text(FeaturesConfig(sae=str(run_dir), text=answer, prompt="Add them."), recording_console())
    loaded = load_model(str(tiny_model_dir))
    system_prompt = store.metadata["corpus"]["system_prompt"]
    assert found.token_ids == tokenize_document(Document(0, chat_messages(system_prompt, "Add them.", answer), None), loaded.tokenizer, 10**6)
    skipped = SkippedPositions.from_dict(store.metadata["skipped"])
    assert len(skipped.shared_prefix) > 5 and found.token_ids[: len(skipped.shared_prefix)] == list(skipped.shared_prefix)
    assert found.recorded == (~skipped.mask(np.asarray(found.token_ids))).tolist() and not any(found.recorded[: len(skipped.shared_prefix)])
    other = text_latents(loaded, sae, skipped, answer, [2], prompt="Add them.", system_prompt="Be brief.")
    assert loaded.tokenizer.decode(other.token_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    loaded.tokenizer.chat_template = None
    with pytest.raises(CrosscodersError, match=r"^model .* has no chat template to put --prompt and --text in; drop --prompt$"):
        text_latents(loaded, sae, skipped, answer, [2], prompt="Add them.")
    with pytest.raises(CrosscodersError, match=r"^--prompt is the user's turn before --text's answer; pass --text too$"):
        FeaturesConfig(sae=str(run_dir), prompt="Add them.")


def test_in_colour_only_the_labels_and_unrecorded_tokens_are_dim():
    """A line's dim label dimmed the whole line: a context's tokens, and --text's recorded tokens like its unrecorded ones."""
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=200)
    features.print_context(console, Context(2.0, 3, 7, 2, [1, 2, 3], ["ab", "cd", "ef"], 1), 4.0)
    found = TextLatents([1, 2, 3], ["<s>", "ab", "cd"], [False, True, True], [0], torch.tensor([[[0.0], [0.0], [2.0]]]),
                        torch.tensor([[[-1], [5], [7]]]))
    print_text_feature(console, found, 7)
    shown = console.file.getvalue()
    dim = "\x1b[2m"
    assert f"{dim}   2.000  L3   doc 7 pos 2  \x1b[0mab\x1b[1;30;48;2;255;178;100mcd\x1b[0mef\n" in shown
    assert f"{dim}L0   \x1b[0m{dim}<s>\x1b[0mab\x1b[1;30;48;2;255;120;0mcd\x1b[0m\n" in shown
