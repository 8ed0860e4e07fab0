"""Stage three on the tiny model: exact identity splices, known recovered fractions, SAE metrics against a hand-made
reference, the CLI and its errors."""

import io
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from forked_cli import run_python
from rich.console import Console
from transformers import AutoModelForCausalLM

import pipeline.evaluate
from pipeline.cache import CacheConfig, cache_activations, pack_batches
from pipeline.corpus import CorpusConfig
from pipeline.errors import CrosscodersError
from pipeline.evaluate import (
    EvalConfig,
    LayerEval,
    average,
    check_model_of_store,
    evaluate,
    layer_means,
    layers_of_run,
    run_eval,
    splice,
)
from pipeline.loader import LayerStats, stats_from_sums
from pipeline.models import load_model
from pipeline.positions import RECORD_ALL, SkippedPositions
from pipeline.sae import SAEConfig, TopKSAE, load
from pipeline.store import Store, create_or_open
from pipeline.sweep_eval import frontier_lines, run_sweep_eval, swept_settings
from pipeline.train import CHECKPOINT, DATA_FILE, TRAIN_CONFIG_FILE

QUIET = Console(file=open(os.devnull, "w"))
N_HIDDEN_STATES = 5  # the tiny model: 4 decoder layers, embeddings and final norm


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Store:
    """A float32 store of the tiny model over all hidden states, 30% of documents held out."""
    folder = tmp_path_factory.mktemp("eval")
    corpus = folder / "pairs.jsonl"
    corpus.write_text("".join(
        json.dumps({"prompt": f"Write function {i}.", "response": f"def f{i}(x):\n" + "    x = x + 1\n" * (i % 7 + 1) + "    return x\n"}) + "\n"
        for i in range(30)
    ))
    config = CacheConfig(model=str(tiny_model_dir), out=str(folder / "store"), n_tokens=2000, batch_tokens=512, max_seq_len=128, dtype="float32")
    cache_activations(config, CorpusConfig(dataset=str(corpus), val_fraction=0.3), console=QUIET, progress=False)
    return Store(folder / "store")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def model(tiny_model_dir, request):
    """The model in each dtype eval-sae runs it in (bf16 on a GPU or a CPU with bf16 instructions)."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=request.param).eval()


@pytest.fixture(scope="module")
def float32_model(tiny_model_dir):
    """For comparisons across batch shapes: in bf16 a document's results depend on what it is batched with."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def saved_run(folder: Path, store: Store, d_model: int = 64, seed: int = 0) -> Path:
    """A random SAE saved as a training run of the store would be."""
    torch.manual_seed(seed)
    TopKSAE(SAEConfig(d_model=d_model, n_layers=N_HIDDEN_STATES, expansion=2, k=8)).save(folder)
    (folder / DATA_FILE).write_text(json.dumps({"shards": store.url, "model": store.metadata["model"], "layers": store.metadata["layers"]}))
    return folder


def held_out(store: Store, n: int = 6) -> list:
    return list(islice(store.documents(split="val"), n))


def test_mean_ablation_uses_each_layers_mean_over_the_stored_training_rows(store):
    means = layer_means(store)
    for layer in range(store.n_hidden_states):
        rows = [store.read_acts(shard, "train")[store.read(shard, "train/layer") == layer].double() for shard in store.shards]
        rows = torch.cat(rows)
        if len(rows):
            torch.testing.assert_close(means[layer], rows.mean(0).float(), rtol=1e-5, atol=1e-6)
        else:
            assert not means[layer].any()
    assert means.abs().sum() > 0


def test_the_documents_scored_are_held_out_ones_evenly_spaced_in_corpus_order(store, tmp_path, monkeypatch):
    """The store's first were a packing window's shortest (it stores them sorted by length), and the corpus's first
    may all be of one language or source: one document from each third of the held-out ones, in corpus order."""
    in_corpus_order = sorted(store.documents(split="val"), key=lambda doc: doc[0])
    n = len(in_corpus_order)
    assert n >= 6
    scored = []

    class Scored(Exception):
        """The documents are what is checked: the evaluation stops once they are handed over."""

    def record(saes, model, docs, *rest):
        scored.extend(docs)
        raise Scored

    monkeypatch.setattr(pipeline.evaluate, "evaluate_all", record)
    with pytest.raises(Scored):
        run_eval(EvalConfig(sae=str(saved_run(tmp_path / "run", store)), n_docs=3), QUIET, progress=False)
    assert len(scored) == 3
    for third, (index, tokens) in enumerate(scored):
        in_third = dict(in_corpus_order[third * n // 3 : (third + 1) * n // 3])
        assert index in in_third and np.array_equal(tokens, in_third[index])


def test_identity_splice_at_every_hidden_state_leaves_the_logits_bit_identical(model, store):
    packed = next(pack_batches(held_out(store), batch_tokens=4096, pad_id=0))
    inputs = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask}
    assert packed.attention_mask.eq(0).any(), "the batch should hold padding"
    everywhere = packed.attention_mask.bool()
    identity = lambda x, layer: x  # noqa: E731
    with torch.no_grad():
        clean = model(**inputs).logits
        for layer in range(N_HIDDEN_STATES):
            with splice(model, layer, everywhere, identity):
                assert torch.equal(model(**inputs).logits, clean), f"hidden state {layer}"
        with ExitStack() as stack:
            for layer in range(N_HIDDEN_STATES):
                stack.enter_context(splice(model, layer, everywhere, identity))
            assert torch.equal(model(**inputs).logits, clean)
        with splice(model, N_HIDDEN_STATES - 1, everywhere, lambda x, layer: 2 * x):  # the final norm's hook does fire
            assert not torch.equal(model(**inputs).logits, clean)


def test_known_reconstructions_give_known_recovered_fractions(model, store):
    docs, means = held_out(store), layer_means(store)
    layers = list(range(N_HIDDEN_STATES))
    with torch.no_grad():
        identity = evaluate(lambda x, layer: x, model, docs, layers, means)
        zeros = evaluate(lambda x, layer: torch.zeros_like(x), model, docs, layers, means)
        mean = evaluate(lambda x, layer: means[layer].expand_as(x), model, docs, layers, means)
    for exact, zero, at_mean in zip(identity, zeros, mean):
        assert exact.ce_sae == exact.ce_clean and exact.kl == 0 and exact.mse == 0 and exact.fvu == 0
        assert exact.recovered_loss == 1 and exact.recovered_loss_mean == 1
        assert zero.ce_sae == zero.ce_zero and zero.recovered_loss == 0 and zero.kl > 0
        assert at_mean.ce_sae == at_mean.ce_mean and at_mean.recovered_loss_mean == 0
        assert exact.l0 is None
        assert exact.n_tokens == zero.n_tokens > 0


def test_scores_only_the_positions_stage_one_records(model, store):
    docs, means = held_out(store), layer_means(store)
    skipped = SkippedPositions.from_dict(store.metadata["skipped"])
    n_shared = len(skipped.shared_prefix)
    assert skipped.special_ids == (0, 1, 2) and n_shared > 10  # the tiny tokenizer's special tokens; the chat's start
    every, recorded = (evaluate(lambda x, layer: x, model, docs, [1], means, skip) for skip in (RECORD_ALL, skipped))
    assert all(tokens[:n_shared].tolist() == list(skipped.shared_prefix) for _, tokens in docs)
    n_special = sum(int(torch.isin(torch.from_numpy(t[n_shared:-1]), torch.tensor([0, 1, 2])).sum()) for _, t in docs)
    assert every[0].n_tokens == sum(len(t) - 1 for _, t in docs)
    assert recorded[0].n_tokens == every[0].n_tokens - len(docs) * n_shared - n_special  # minus the shared start, specials


def log_probs_with_state(model, ids: torch.Tensor, layer: int, state: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [seq - 1, vocab] of ids: [1, seq] with hidden state `layer` set to state: [seq, d_model]."""
    module = model.model.embed_tokens if layer == 0 else model.model.norm if layer == N_HIDDEN_STATES - 1 else model.model.layers[layer - 1]
    handle = module.register_forward_hook(lambda module, args, output: (state[None], *output[1:]) if isinstance(output, tuple) else state[None])
    try:
        return torch.log_softmax(model(ids).logits[0, :-1], -1)
    finally:
        handle.remove()


def reference_metrics(sae: TopKSAE, model, docs: list, layer: int, means: torch.Tensor, special_ids: list[int], n_shared: int) -> dict:
    """evaluate's metrics at one hidden state by hand: one document at a time, without padding, through a hook of its own."""
    nll, kl, xs, errors, n_active, n_scored = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}, 0.0, [], 0.0, 0, 0
    for _, tokens in docs:
        ids = torch.from_numpy(tokens.astype("int64"))[None]  # [1, seq]
        recorded = ~torch.isin(ids[0], torch.tensor(special_ids))  # [seq]: what stage one records
        recorded[:n_shared] = False  # the chat's start every document shares, the first position among it
        scored = recorded[:-1]  # the last token predicts nothing
        n_scored += int(scored.sum())
        targets = ids[0, 1:, None]
        out = model(ids, output_hidden_states=True)
        clean = torch.log_softmax(out.logits[0, :-1], -1)
        hidden = out.hidden_states[layer][0]  # [seq, d_model]
        x = hidden[recorded]
        layer_ids = torch.full((len(x),), layer)
        values, indices = sae.encode(x, layer_ids)
        x_hat = sae.decode(values, indices, layer_ids)
        xs.append(x.double())
        errors += float((x_hat - x).double().pow(2).sum())
        n_active += int((values > 0).sum())
        nll["clean"] -= float(clean.gather(1, targets)[scored].sum())
        for name, rows in {"sae": x_hat, "zero": torch.zeros_like(x), "mean": means[layer].expand_as(x)}.items():
            state = hidden.clone()
            state[recorded] = rows
            log_probs = log_probs_with_state(model, ids, layer, state)
            nll[name] -= float(log_probs.gather(1, targets)[scored].sum())
            if name == "sae":
                kl += float((clean.exp() * (clean - log_probs)).sum(1)[scored].sum())  # KL(clean || spliced)
    x = torch.cat(xs)
    return {
        "n_tokens": n_scored, **{f"ce_{name}": value / n_scored for name, value in nll.items()}, "kl": kl / n_scored,
        "mse": errors / x.numel(), "fvu": errors / float((x - x.mean(0)).pow(2).sum()), "l0": n_active / len(x),
    }


@pytest.mark.parametrize("layer", [0, 2, N_HIDDEN_STATES - 1])
def test_sae_metrics_equal_a_reference_computed_by_hand(float32_model, store, layer):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8))
    with torch.no_grad():
        sae.b_enc[10:] = -1e6  # only 10 latents can fire: rows with fewer than k active ones
    docs, means, skipped = held_out(store, 2), layer_means(store), SkippedPositions.from_dict(store.metadata["skipped"])
    with torch.no_grad():
        (result,) = evaluate(sae, float32_model, docs, [layer], means, skipped)
        expected = reference_metrics(sae, float32_model, docs, layer, means, [0, 1, 2], len(skipped.shared_prefix))
    assert expected["l0"] < 8 and expected["kl"] > 0
    assert {name: getattr(result, name) for name in expected} == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("l0", [[10.0, 20.0, 60.0], [None, None, None]])  # None: a plain reconstruct function
def test_the_average_is_each_metrics_mean_over_the_layers(l0):
    results = [LayerEval(layer=layer, n_tokens=50, ce_clean=2.0, ce_sae=ce_sae, ce_zero=8.0, ce_mean=5.0, kl=kl, mse=1.0,
                         fvu=fvu, l0=n) for layer, ce_sae, kl, fvu, n in zip((0, 6, 12), (2.6, 3.2, 5.0), (0.1, 0.2, 0.6), (0.1, 0.2, 0.9), l0)]
    mean = average(results)
    expected = {"ce_clean": 2.0, "ce_sae": 3.6, "ce_zero": 8.0, "ce_mean": 5.0, "kl": 0.3, "mse": 1.0, "fvu": 0.4,
                "recovered_loss": (0.9 + 0.8 + 0.5) / 3, "recovered_loss_mean": (0.8 + 0.6 + 0.0) / 3}
    assert mean == pytest.approx(expected if l0[0] is None else {**expected, "l0": 30.0})


def test_cli_writes_eval_json_and_plot(store, tmp_path):
    run = saved_run(tmp_path / "[b]:smile:run", store)  # printed as text, not rich markup or emoji codes
    result = run_python("eval_sae.py", "--sae", str(run), "--layers", "0,4", "--n-docs", "4", env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [0, 4]
    assert report["config"]["shards"] == store.url and report["n_docs"] == 4
    assert {"ce_clean", "ce_sae", "ce_zero", "ce_mean", "recovered_loss", "recovered_loss_mean", "kl", "mse", "fvu", "l0"} <= set(report["layers"][0])
    assert "recovered_loss" in report["average"]
    assert (run / "eval" / "recovered.png").read_bytes()[:4] == b"\x89PNG"
    assert "recovered vs mean" in result.stdout and str(run / "eval" / "eval.json") in result.stderr


@pytest.mark.parametrize("typed", ["absolute", "."])  # `eval-sae --sae .` run inside the checkpoint: "." has no name
def test_outputs_of_a_checkpoint_go_beside_it(store, tmp_path, monkeypatch, typed):
    run = saved_run(tmp_path / "run", store)
    TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8)).save(run / CHECKPOINT)
    monkeypatch.chdir(run / CHECKPOINT)
    sae = str(run / CHECKPOINT) if typed == "absolute" else "."
    _, eval_path, plot_path = run_eval(EvalConfig(sae=sae, layers="1", n_docs=1), QUIET, progress=False)
    assert (eval_path, plot_path) == (run / "eval-checkpoint" / "eval.json", run / "eval-checkpoint" / "recovered.png")  # the trainer replaces checkpoint/


def test_eval_json_records_paths_that_work_from_any_folder(store, tmp_path, monkeypatch):
    saved_run(tmp_path / "run", store)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _, eval_path, _ = run_eval(EvalConfig(sae="run", out="~/ev", layers="1", n_docs=1), QUIET, progress=False)
    assert eval_path == tmp_path / "ev" / "eval.json"
    config = json.loads(eval_path.read_text())["config"]
    assert (config["sae"], config["shards"], config["out"]) == (str(tmp_path / "run"), store.url, str(tmp_path / "ev"))


@pytest.mark.parametrize("option", ["sae", "out"])
def test_a_url_as_a_run_or_output_path_is_refused_in_one_line(store, tmp_path, option):
    """It became a local folder named s3:"""
    paths = {"sae": str(saved_run(tmp_path / "run", store)), "out": None, option: "s3://bucket/runs/k32"}
    with pytest.raises(CrosscodersError, match=f"--{option} s3://bucket/runs/k32 must be a local path; only stores"):
        run_eval(EvalConfig(**paths), QUIET, progress=False)


@pytest.mark.parametrize("out", ["x" * 300 + "/eval", "file/eval", "dangling/eval"])
def test_an_output_folder_that_cannot_be_made_is_a_one_line_error_before_the_model_loads(store, tmp_path, monkeypatch, out):
    saved_run(tmp_path / "run", store)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # passed the check, and failed once every document was scored
    with pytest.raises(CrosscodersError, match=r"cannot write to .* \((File name too long|Not a directory|.*dangling is a link that leads "
                                               r"nowhere)\); pass a writable path as --out"):
        run_eval(EvalConfig(sae="run", out=out, model="not-loaded"), QUIET, progress=False)


def test_a_link_then_dotdot_in_a_path_is_the_file_systems_not_the_texts(store, tmp_path, monkeypatch):
    """link/../run is real/run once the link is followed, as ls reads it; collapsed as text, it named another run."""
    saved_run(tmp_path / "real" / "run", store)
    (tmp_path / "real" / "deep").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    monkeypatch.chdir(tmp_path)
    _, eval_path, _ = run_eval(EvalConfig(sae="link/../run", layers="1", n_docs=1), QUIET, progress=False)
    assert eval_path.resolve() == tmp_path / "real" / "run" / "eval" / "eval.json"


def test_dotdot_after_a_link_that_leads_nowhere_is_a_one_line_error(store, tmp_path, monkeypatch):
    """resolve() followed the dangling link's text: the outputs went to /evx."""
    saved_run(tmp_path / "run", store)
    (tmp_path / "dangling").symlink_to("/nonexistent-target")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CrosscodersError, match=r"--out dangling/../evx: .*dangling/.. cannot be followed \(No such file or directory\)"):
        run_eval(EvalConfig(sae="run", out="dangling/../evx", model="not-loaded"), QUIET, progress=False)


def test_a_failed_evaluation_leaves_no_output_folder(store, tmp_path):
    """The folder is checked early, by making it, and made again when the outputs are written."""
    run = saved_run(tmp_path / "run", store)
    with pytest.raises(CrosscodersError, match="could not load model"):
        run_eval(EvalConfig(sae=str(run), model=str(tmp_path / "moved-model"), out=str(tmp_path / "new" / "eval")), QUIET, progress=False)
    assert not (tmp_path / "new").exists()


def test_the_model_runs_in_the_dtype_the_store_was_cached_in(store, tmp_path, monkeypatch):
    """Not in what this machine runs fastest: the SAE is scored on the hidden states it was trained on."""
    run = saved_run(tmp_path / "run", store)
    cached_in = store.metadata["model_dtype"]
    monkeypatch.setattr("pipeline.devices.native_bf16", lambda device: cached_in != "bfloat16")  # auto would pick the other
    for model_dtype, expected in (("auto", cached_in), ("float32", "float32"), ("bf16", "bfloat16")):
        _, eval_path, _ = run_eval(EvalConfig(sae=str(run), layers="1", n_docs=1, model_dtype=model_dtype), QUIET, progress=False)
        report = json.loads(eval_path.read_text())
        assert (report["model_dtype"], report["config"]["model_dtype"]) == (expected, model_dtype)


def test_fewer_held_out_documents_than_asked_for_are_scored_and_said(store, tmp_path):
    run = saved_run(tmp_path / "run", store)
    n_val = len(held_out(store, 1000))
    console = Console(record=True, file=open(os.devnull, "w"))
    run_eval(EvalConfig(sae=str(run), layers="1", n_docs=n_val + 5), console, progress=False)
    assert json.loads((run / "eval" / "eval.json").read_text())["n_docs"] == n_val
    assert f"holds {n_val} held-out documents, fewer than --n-docs {n_val + 5}" in console.export_text()


def test_sae_of_another_width_is_a_one_line_cli_error(store, tmp_path):
    run = saved_run(tmp_path / "run", store, d_model=32)
    result = run_python("eval_sae.py", "--sae", str(run), fresh=True)  # as a new interpreter starts
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "d_model=32" in result.stderr and "d_model=64" in result.stderr


@contextmanager
def no_model_loads():
    """Around a command that must fail before it spends time loading the model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.evaluate, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded first"))
        yield


def half_written_then_full(self, text, *args, **kwargs):
    """Path.write_text on a disk that fills up halfway."""
    with open(self, "w") as handle:
        handle.write(text[: len(text) // 2])
    raise OSError(28, "No space left on device")


def test_a_full_disk_leaves_the_last_eval_json_whole_and_says_so_in_one_line(store, tmp_path, monkeypatch):
    run = saved_run(tmp_path / "run", store)
    _, eval_path, _ = run_eval(EvalConfig(sae=str(run), n_docs=1), QUIET, progress=False)
    before = eval_path.read_text()
    monkeypatch.setattr(Path, "write_text", half_written_then_full)
    with pytest.raises(CrosscodersError, match=r"^cannot write .*run/eval \(No space left on device\); free space or pass another --out$"):
        run_eval(EvalConfig(sae=str(run), n_docs=2), QUIET, progress=False)
    assert eval_path.read_text() == before and sorted(p.name for p in eval_path.parent.iterdir()) == ["eval.json", "recovered.png"]


def test_user_errors(store, tmp_path):
    run = saved_run(tmp_path / "run", store)
    with pytest.raises(CrosscodersError, match="out of range"):
        run_eval(EvalConfig(sae=str(run), layers="0-7"), QUIET, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(CrosscodersError, match="cannot write to .*file/eval .*; pass a writable path as --out"), no_model_loads():
        run_eval(EvalConfig(sae=str(run), out=str(tmp_path / "file" / "eval")), QUIET, progress=False)
    (run / DATA_FILE).unlink()
    with pytest.raises(CrosscodersError, match="--shards"):
        run_eval(EvalConfig(sae=str(run)), QUIET, progress=False)


def test_layers_default_to_those_the_sae_was_trained_on(store, tmp_path):
    run = saved_run(tmp_path / "run", store)
    data, sae = json.loads((run / DATA_FILE).read_text()), load(run)
    assert layers_of_run("trained", store, data, sae) == layers_of_run("trained", store, None, sae) == store.metadata["layers"]  # before --layers
    (run / DATA_FILE).write_text(json.dumps({**data, "train_layers": [1, 3]}))  # train-sae --layers 1,3
    for layers, expected in (("trained", [1, 3]), ("all", store.metadata["layers"]), ("2", [2])):
        results, eval_path, _ = run_eval(EvalConfig(sae=str(run), layers=layers, n_docs=1), QUIET, progress=False)
        assert [r.layer for r in results] == [r["layer"] for r in json.loads(eval_path.read_text())["layers"]] == expected
    with pytest.raises(CrosscodersError, match=r"was not cached at hidden state 1, which the SAE was trained on; pick from \[0, 2\] with --layers"):
        layers_of_run("trained", create_or_open(tmp_path / "two", {**store.metadata, "layers": [0, 2]}), {**data, "train_layers": [1, 3]}, sae)


def test_an_sae_is_not_evaluated_where_its_training_store_gave_it_no_statistics(store, tmp_path):
    """Trained on a store cached with --layers 2, it would take the raw rows of another hidden state for normalized ones:
    FVUs in the hundreds, reported as results."""
    stats = stats_from_sums(*store.layer_stats_sums())
    only_2 = LayerStats(stats.mean, stats.mean_sq_norm, torch.where(torch.arange(N_HIDDEN_STATES) == 2, stats.count, 0))
    run = saved_run(tmp_path / "run", store)
    TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8), only_2).save(run)
    [result], _, _ = run_eval(EvalConfig(sae=str(run), layers="2", n_docs=1), QUIET, progress=False)
    assert result.layer == 2
    with pytest.raises(CrosscodersError, match=r"has no normalization statistics for hidden states \[0, 1, 3, 4\] \(its training store "
                                               r"held none of their rows\); use --layers among \[2\], or train on a store that holds them$"):
        run_eval(EvalConfig(sae=str(run), layers="all", n_docs=1), QUIET, progress=False)


def small_store(model_dir: Path, folder: Path, val_fraction: float = 0.3) -> Store:
    """A store of a few short documents."""
    corpus = folder / "pairs.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i} = {i}"}) + "\n" for i in range(10)))
    config = CacheConfig(model=str(model_dir), out=str(folder / "store"), n_tokens=100, batch_tokens=512, max_seq_len=64, dtype="float32")
    cache_activations(config, CorpusConfig(dataset=str(corpus), val_fraction=val_fraction), console=QUIET, progress=False)
    return Store(folder / "store")


def test_a_model_or_store_other_than_the_sae_was_trained_on_is_refused(store, other_tiny_model_dir, tmp_path):
    run = saved_run(tmp_path / "run", store)
    with pytest.raises(CrosscodersError, match="is not the model the store was cached from.*pass that model as --model"):
        run_eval(EvalConfig(sae=str(run), model=str(other_tiny_model_dir)), QUIET, progress=False)
    other = small_store(other_tiny_model_dir, tmp_path)
    with pytest.raises(CrosscodersError, match="but the SAE was trained on.*pass a store of that model as --shards"):
        run_eval(EvalConfig(sae=str(run), shards=other.url), QUIET, progress=False)


def test_a_store_fingerprinted_by_its_models_config_alone_asks_to_be_cached_again(tiny_model_dir):
    old_store = SimpleNamespace(url="/s", metadata={"model": {"fingerprint": "config-sha256:ab12"}})
    with pytest.raises(CrosscodersError, match=r"^/s was cached before a model's fingerprint covered its weights "
                                               r"\(config-sha256:ab12\); cache it again with cache-acts into a new --out$"):
        check_model_of_store(load_model(str(tiny_model_dir)).info, old_store)


def test_store_without_held_out_documents_is_refused(tiny_model_dir, store, tmp_path):
    run = saved_run(tmp_path / "run", small_store(tiny_model_dir, tmp_path, val_fraction=0.0))
    with pytest.raises(CrosscodersError, match="no held-out documents; cache more tokens or raise --val-fraction"):
        run_eval(EvalConfig(sae=str(run)), QUIET, progress=False)


def test_an_sae_scores_on_the_bf16_model_as_on_the_float32_one(float32_model, tiny_model_dir, store):
    """eval-sae's default on a GPU, and on CPUs with bf16 instructions: only bf16's rounding apart."""
    bf16_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8))
    docs, means, skipped = held_out(store), layer_means(store), SkippedPositions.from_dict(store.metadata["skipped"])
    with torch.no_grad():
        exact, rounded = (evaluate(sae, model, docs, [1, 3], means, skipped) for model in (float32_model, bf16_model))
    for a, b in zip(exact, rounded):
        assert (b.layer, b.n_tokens, b.l0) == (a.layer, a.n_tokens, a.l0)
        for name in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl", "mse", "fvu"):  # 2.8e-5 to 5.5e-4 apart, measured
            assert getattr(b, name) == pytest.approx(getattr(a, name), rel=2e-3), name
        assert b.ce_sae != a.ce_sae  # it did run in bf16


def test_a_fraction_with_no_denominator_is_null_in_eval_json(store, tmp_path, monkeypatch):
    """eval.json is plain JSON, as metrics.jsonl is: no NaN where clean and ablated losses tie."""
    run = saved_run(tmp_path / "run", store)
    real = pipeline.evaluate.evaluate_all
    monkeypatch.setattr(pipeline.evaluate, "evaluate_all",
                        lambda *args: [[replace(r, ce_zero=r.ce_clean) for r in results] for results in real(*args)])
    _, eval_path, _ = run_eval(EvalConfig(sae=str(run), layers="1", n_docs=1), QUIET, progress=False)
    report = json.loads(eval_path.read_text(), parse_constant=lambda name: pytest.fail(f"eval.json holds {name}"))
    assert report["layers"][0]["recovered_loss"] is None and report["average"]["recovered_loss"] is None
    assert report["layers"][0]["recovered_loss_mean"] is not None


def test_a_moved_store_asks_for_shards_instead_of_a_new_cache(store, tmp_path):
    run = saved_run(tmp_path / "run", store)
    data = json.loads((run / DATA_FILE).read_text())
    (run / DATA_FILE).write_text(json.dumps({**data, "shards": str(tmp_path / "moved-away")}))
    with pytest.raises(CrosscodersError, match=f"^the store {run / DATA_FILE} names, {tmp_path / 'moved-away'}, is not there; "
                                               "if it has moved, pass --shards with its new place$"):
        run_eval(EvalConfig(sae=str(run), layers="1", n_docs=1), QUIET, progress=False)
    _, eval_path, _ = run_eval(EvalConfig(sae=str(run), shards=store.url, layers="1", n_docs=1), QUIET, progress=False)
    assert eval_path.exists()


def test_a_model_the_store_names_that_does_not_load_asks_for_model(store, tmp_path, monkeypatch):
    run = saved_run(tmp_path / "run", store)

    def gone(spec, **kwargs):
        raise CrosscodersError(f"could not load model {spec!r}")

    monkeypatch.setattr(pipeline.evaluate, "load_model", gone)
    with pytest.raises(CrosscodersError, match=f"^could not load model .* \\(the model {store.url} was cached from; if it has "
                                               "moved, pass --model\\)$"):
        run_eval(EvalConfig(sae=str(run), layers="1", n_docs=1), QUIET, progress=False)
    with pytest.raises(CrosscodersError, match="^could not load model 'elsewhere'$"):  # given: its own error
        run_eval(EvalConfig(sae=str(run), model="elsewhere", layers="1", n_docs=1), QUIET, progress=False)


def test_an_sae_in_bf16_is_evaluated_like_its_float32_copy(float32_model, store):
    """From a notebook: the splice fed float32 states to a bf16 SAE and failed."""
    torch.manual_seed(0)
    half = TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8)).to(torch.bfloat16)
    docs, means, skipped = held_out(store, 2), layer_means(store), SkippedPositions.from_dict(store.metadata["skipped"])
    with torch.no_grad():
        (result,) = evaluate(half, float32_model, docs, [2], means, skipped)
        (same,) = evaluate(half.float(), float32_model, docs, [2], means, skipped)
    assert result.ce_sae == pytest.approx(same.ce_sae, rel=0.05) and result.l0 == pytest.approx(same.l0, rel=0.1)


def saved_sweep(folder: Path, store: Store, n: int) -> list[Path]:
    """n runs of other random SAEs in one folder, as train-sae --sweep leaves them."""
    runs = [saved_run(folder / f"k{i}", store, seed=i) for i in range(n)]
    for i, run in enumerate(runs):
        (run / TRAIN_CONFIG_FILE).write_text(json.dumps({"expansion": 2, "k": 8, "seed": i, "lr": 0.0003}))
    return runs


def test_a_sweep_is_evaluated_in_one_pass_as_each_of_its_runs_alone(store, tmp_path, monkeypatch):
    runs = saved_sweep(tmp_path / "sweep", store, 3)
    training = tmp_path / "sweep" / "k3"  # a run still training: no final SAE
    TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8)).save(training / CHECKPOINT)
    (training / TRAIN_CONFIG_FILE).write_text("{}")
    passes = []
    counted = pipeline.evaluate.next_token_log_probs
    monkeypatch.setattr(pipeline.evaluate, "next_token_log_probs", lambda *args: passes.append(1) or counted(*args))
    console = Console(file=io.StringIO(), width=400)
    sweep = run_sweep_eval(EvalConfig(sae=str(tmp_path / "sweep"), layers="1,3", n_docs=3), console, progress=False)
    evaluated = sweep.runs
    swept_passes, passes[:] = len(passes), []
    assert [Path(e.config.sae) for e in evaluated] == runs
    assert "note: k3: no final SAE yet (still training, or stopped): not evaluated" in console.file.getvalue()
    for run, e in zip(runs, evaluated):
        assert (e.eval_path, e.plot_path) == (run / "eval" / "eval.json", run / "eval" / "recovered.png") and e.plot_path.exists()
        swept = json.loads(e.eval_path.read_text())
        _, alone_path, _ = run_eval(EvalConfig(sae=str(run), layers="1,3", n_docs=3, out=str(tmp_path / "alone")), QUIET, progress=False)
        alone = json.loads(alone_path.read_text())
        assert swept == {**alone, "config": {**alone["config"], "out": str(run / "eval")}}  # bit for bit
    assert len({e.results[0].ce_sae for e in evaluated}) == 3  # three SAEs, three results
    assert (sweep.summary, sweep.frontier) == (tmp_path / "sweep" / "sweep_eval.json", tmp_path / "sweep" / "frontier.png")
    summary = json.loads(sweep.summary.read_text())
    assert {key: summary[key] for key in ("sweep", "layers", "n_tokens")} == {"sweep": str(tmp_path / "sweep"), "layers": [1, 3],
                                                                              "n_tokens": evaluated[0].results[0].n_tokens}
    assert summary["runs"] == [{"run": run.name, "swept": {"seed": i}, "sae": str(run), "eval": str(run / "eval" / "eval.json"),
                                "average": json.loads((run / "eval" / "eval.json").read_text())["average"]} for i, run in enumerate(runs)]
    assert sweep.frontier.read_bytes().startswith(b"\x89PNG")
    n_batches = len(passes) // (3 * (1 + 2 * 3))  # alone: clean, then SAE, zeros and mean at each of 2 layers
    assert n_batches >= 1 and swept_passes == n_batches * (1 + 2 * (2 + 3))  # swept: zeros and mean once for all


def test_a_sweep_with_out_writes_each_run_in_its_own_folder_and_refuses_runs_trained_apart(store, tmp_path):
    runs = saved_sweep(tmp_path / "sweep", store, 2)
    sweep = run_sweep_eval(EvalConfig(sae=str(tmp_path / "sweep"), layers="2", n_docs=1, out=str(tmp_path / "ev")), QUIET,
                           progress=False)
    assert [e.eval_path for e in sweep.runs] == [tmp_path / "ev" / run.name / "eval.json" for run in runs]
    assert (sweep.summary, sweep.frontier) == (tmp_path / "ev" / "sweep_eval.json", tmp_path / "ev" / "frontier.png")
    assert not (tmp_path / "sweep" / "sweep_eval.json").exists()
    data = json.loads((runs[1] / DATA_FILE).read_text())
    (runs[1] / DATA_FILE).write_text(json.dumps({**data, "layers": [1, 2]}))
    with pytest.raises(CrosscodersError, match=r"^.*k1 and .*k0 were not trained on the same store, model and hidden states "
                                               r"\(data.json\); pass them one at a time$"), no_model_loads():
        run_sweep_eval(EvalConfig(sae=str(tmp_path / "sweep"), n_docs=1), QUIET, progress=False)
    with pytest.raises(CrosscodersError, match="holds no finished run of a sweep"):
        run_sweep_eval(EvalConfig(sae=str(runs[0]), n_docs=1), QUIET, progress=False)
    (runs[1] / DATA_FILE).write_text(json.dumps(data))
    (runs[1] / TRAIN_CONFIG_FILE).write_text('{"k": 8, "expan')  # cut short
    with pytest.raises(CrosscodersError, match=r"^.*k1/train_config\.json is damaged \(.*\); restore it"), no_model_loads():
        run_sweep_eval(EvalConfig(sae=str(tmp_path / "sweep"), n_docs=1), QUIET, progress=False)
    (runs[1] / TRAIN_CONFIG_FILE).write_text("{}")
    stats = stats_from_sums(*store.layer_stats_sums())  # the second run's SAE has statistics for hidden state 2 alone
    only_2 = LayerStats(stats.mean, stats.mean_sq_norm, torch.where(torch.arange(N_HIDDEN_STATES) == 2, stats.count, 0))
    TopKSAE(SAEConfig(d_model=64, n_layers=N_HIDDEN_STATES, expansion=2, k=8), only_2).save(runs[1])
    with pytest.raises(CrosscodersError, match=r"k1 has no normalization statistics for hidden states \[3\]"):
        run_sweep_eval(EvalConfig(sae=str(tmp_path / "sweep"), layers="2,3", n_docs=1), QUIET, progress=False)


def test_cli_evaluates_a_sweep_and_shows_a_row_per_run(store, tmp_path):
    runs = [run.rename(run.with_name(f"{run.name}-expansion2-lr0.0003-seed0")) for run in saved_sweep(tmp_path / "sweep", store, 2)]
    result = run_python("eval_sae.py", "--sae", str(tmp_path / "sweep"), "--layers", "0,4", "--n-docs", "2", env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "mean over hidden states 0,4" in result.stdout
    for run in runs:
        average = json.loads((run / "eval" / "eval.json").read_text())["average"]
        row = next(line.split() for line in result.stdout.splitlines() if line.strip().startswith(run.name))
        assert [float(cell) for cell in row[1:]] == pytest.approx([average[name] for name in (
            "ce_clean", "ce_sae", "ce_zero", "ce_mean", "recovered_loss", "recovered_loss_mean", "kl", "mse", "fvu", "l0")], rel=1e-2)
        assert f"wrote {run / 'eval' / 'eval.json'} and recovered.png" in result.stderr
    assert f"wrote {tmp_path / 'sweep' / 'sweep_eval.json'} and frontier.png" in result.stderr


def test_a_sweeps_frontier_joins_the_runs_that_differ_in_k_alone():
    configs = [{"expansion": e, "k": k, "lr": 0.0003, "seed": 0} for e in (4, 8) for k in (64, 16, 32)] + [{"expansion": 4, "k": 16, "lr": 0.001, "seed": 0, "new": 1}]
    swept = swept_settings(configs)
    assert swept[0] == {"expansion": 4, "k": 64, "lr": 0.0003, "new": None} and swept[-1] == {"expansion": 4, "k": 16, "lr": 0.001, "new": 1}
    runs = [{"run": f"r{i}", "swept": settings, "average": {"l0": float(settings["k"])}} for i, settings in enumerate(swept)]
    lines = frontier_lines(runs)
    assert list(lines) == ["expansion=4, lr=0.0003, new=None", "expansion=8, lr=0.0003, new=None", "expansion=4, lr=0.001, new=1"]
    assert [[run["run"] for run in line] for line in lines.values()] == [["r1", "r2", "r0"], ["r4", "r5", "r3"], ["r6"]]  # by L0
    assert list(frontier_lines([{"run": "a", "swept": {"k": 8}, "average": {"l0": 8.0}}])) == ["every run"]
