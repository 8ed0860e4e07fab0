"""export-sae: each hidden state's standard TopK SAE computes what the layer-agnostic SAE does there, read back as
SAELens and sparsify compute it, hooked where the hidden state is, and the command's outputs and refusals."""

import json
import os
from pathlib import Path

import pytest
import torch
from forked_cli import run_python
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import pipeline.export
from pipeline.errors import CrosscodersError
from pipeline.export import ExportConfig, export_layers, fold_layer, hook_name
from pipeline.hidden_states import hidden_state_module
from pipeline.loader import LayerStats
from pipeline.sae import CHECKPOINT, SAEConfig, TopKSAE
from pipeline.train import DATA_FILE

D_MODEL, N_STATES = 16, 5


def random_sae(layer_encoding: str = "sinusoidal", normalize: bool = True, seen: list[bool] | None = None) -> TopKSAE:
    """An SAE with every part that folds away made non-trivial: per-layer means and scales far from 0 and 1, b_dec,
    b_enc and, when learned, the layer encoding."""
    torch.manual_seed(0)
    mean = torch.randn(N_STATES, D_MODEL, dtype=torch.float64) * 3
    mean_sq_norm = mean.pow(2).sum(1) + torch.logspace(-2, 3, N_STATES, dtype=torch.float64)  # variances 0.01 to 1000
    count = torch.tensor([100 if s else 0 for s in (seen or [True] * N_STATES)])
    sae = TopKSAE(SAEConfig(D_MODEL, N_STATES, expansion=4, k=5, layer_encoding=layer_encoding, normalize=normalize),
                  LayerStats(mean, mean_sq_norm, count))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.5)
        if layer_encoding == "learned":
            sae.layer_embedding.normal_()
    return sae.eval().requires_grad_(False)


def raw_rows(sae: TopKSAE, layer: int, n: int = 300) -> torch.Tensor:
    """Rows distributed as the layer's statistics say: [n, d_model]."""
    return sae.norm_mean[layer] + torch.randn(n, D_MODEL) / sae.norm_scale[layer]


def dense_code(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    return torch.zeros(len(values), n_latents, dtype=values.dtype).scatter(1, indices, values)


@pytest.mark.parametrize("layer_encoding,normalize", [("sinusoidal", True), ("learned", True), ("none", True), ("sinusoidal", False)])
def test_folded_sae_keeps_the_latents_and_the_reconstruction(layer_encoding, normalize):
    sae = random_sae(layer_encoding, normalize)
    for layer in range(N_STATES):
        x = raw_rows(sae, layer)
        values, indices = sae.encode(x, layer)
        folded = fold_layer(sae, layer)
        standard = torch.relu(x @ folded.W_enc + folded.b_enc).topk(folded.k)
        ours = dense_code(values, indices, sae.cfg.n_latents)
        theirs = dense_code(standard.values, standard.indices, sae.cfg.n_latents)
        assert torch.equal(ours > 0, theirs > 0)  # the same latents fire on every row
        assert (ours > 0).any(1).float().mean() > 0.9
        torch.testing.assert_close(theirs, ours / sae.norm_scale[layer], rtol=1e-4, atol=1e-5)
        x_hat = theirs @ folded.W_dec + folded.b_dec
        torch.testing.assert_close(x_hat, sae.decode(values, indices, layer), rtol=1e-4, atol=1e-4 / float(sae.norm_scale[layer]))
        assert torch.equal(folded.W_dec, sae.W_dec)  # unit-norm rows, as both tools expect


def saved_run(tmp_path: Path, sae: TopKSAE, train_layers: list[int] | None = (1, 2, 4)) -> Path:
    """A run folder as train-sae leaves it: the SAE, and data.json naming the model and the hidden states trained on."""
    run = tmp_path / "run"
    sae.save(run)
    if train_layers is not None:
        model = {"name": "tiny-qwen2", "fingerprint": "config-sha256:abc", "n_hidden_states": N_STATES}
        (run / DATA_FILE).write_text(json.dumps({"shards": "/somewhere", "model": model, "layers": list(range(N_STATES)),
                                                 "train_layers": list(train_layers)}))
    return run


def read_folder(folder: Path, weights_name: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    with safe_open(folder / weights_name, framework="pt") as weights:
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}
        header = weights.metadata() or {}
    return json.loads((folder / "cfg.json").read_text()), tensors, header


def test_saelens_files_compute_the_sae(tmp_path):
    sae = random_sae()
    folders = export_layers(ExportConfig(sae=str(saved_run(tmp_path, sae)), format="saelens"))
    assert [f.name for f in folders] == ["model.layers.0", "model.layers.1", "model.norm"]  # hidden states 1, 2, 4
    assert all(f.parent == tmp_path / "run" / "export-saelens" for f in folders)
    for layer, folder in zip((1, 2, 4), folders):
        cfg, weights, _ = read_folder(folder, "sae_weights.safetensors")
        assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", D_MODEL, sae.cfg.n_latents, sae.cfg.k)
        assert (cfg["apply_b_dec_to_input"], cfg["normalize_activations"], cfg["metadata"]["hook_name"]) == (False, "none", folder.name)
        assert cfg["metadata"]["crosscoders"]["hidden_state"] == layer
        assert cfg["metadata"]["model_name"] == "tiny-qwen2"
        assert cfg["metadata"]["sae_lens_version"] == "6.0.0"  # without it SAELens reads an older layout, dropping the metadata
        x = raw_rows(sae, layer)
        hidden_pre = x @ weights["W_enc"] + weights["b_enc"]  # SAELens's TopKSAE: top k, then ReLU
        top = hidden_pre.topk(cfg["k"])
        acts = dense_code(top.values.relu(), top.indices, cfg["d_sae"])
        values, indices = sae.encode(x, layer)
        assert torch.equal(acts > 0, dense_code(values, indices, sae.cfg.n_latents) > 0)
        torch.testing.assert_close(acts @ weights["W_dec"] + weights["b_dec"], sae.decode(values, indices, layer),
                                   rtol=1e-4, atol=1e-4 / float(sae.norm_scale[layer]))


def test_sparsify_files_compute_the_sae(tmp_path):
    sae = random_sae("learned")
    out = tmp_path / "exported"
    folders = export_layers(ExportConfig(sae=str(saved_run(tmp_path, sae, None)), format="sparsify", out=str(out)))
    assert [f.name for f in folders] == ["embed_tokens", "layers.0", "layers.1", "layers.2", "norm"]  # no data.json: all
    assert all(f.parent == out for f in folders)
    for layer, folder in enumerate(folders):
        cfg, weights, header = read_folder(folder, "sae.safetensors")
        assert (cfg["activation"], cfg["d_in"], cfg["num_latents"], cfg["k"]) == ("topk", D_MODEL, sae.cfg.n_latents, sae.cfg.k)
        assert not cfg["transcode"] and not cfg["skip_connection"]
        assert json.loads(header["crosscoders"])["hidden_state"] == layer
        x = raw_rows(sae, layer)
        top = torch.relu((x - weights["b_dec"]) @ weights["encoder.weight"].T + weights["encoder.bias"]).topk(cfg["k"])  # sparsify's encode
        values, indices = sae.encode(x, layer)
        assert torch.equal(dense_code(top.values, top.indices, cfg["num_latents"]) > 0, dense_code(values, indices, sae.cfg.n_latents) > 0)
        x_hat = (top.values[:, :, None] * weights["W_dec"][top.indices]).sum(1) + weights["b_dec"]
        torch.testing.assert_close(x_hat, sae.decode(values, indices, layer), rtol=1e-4, atol=1e-4 / float(sae.norm_scale[layer]))


def test_hook_names_name_the_module_each_hidden_state_comes_from(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_layers = model.config.num_hidden_layers
    for layer in range(n_layers + 1):
        module = hidden_state_module(model, layer)
        assert model.get_submodule(hook_name(layer, n_layers, "saelens")) is module  # HookedProxyLM: the causal LM's names
        assert model.base_model.get_submodule(hook_name(layer, n_layers, "sparsify")) is module  # sparsify: the base model's


@torch.no_grad()
def test_exported_sae_hooked_by_its_name_changes_the_model_as_the_splice_does(tiny_model_dir, tmp_path):
    """The exported SAE, hooked on the module its folder names, gives the logits eval-sae's splice of the SAE gives."""
    from pipeline.evaluate import splice

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    d_model = model.config.hidden_size
    assert model.config.num_hidden_layers + 1 == N_STATES
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        hidden = model(input_ids, output_hidden_states=True).hidden_states
    rows = torch.cat([h.reshape(-1, d_model) for h in hidden]).double()
    layer = torch.arange(N_STATES).repeat_interleave(hidden[0].numel() // d_model)
    sums = torch.zeros(N_STATES, d_model, dtype=torch.float64).index_add_(0, layer, rows)
    counts = torch.bincount(layer, minlength=N_STATES)
    sq = torch.zeros(N_STATES, dtype=torch.float64).index_add_(0, layer, rows.pow(2).sum(1))
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model, N_STATES, expansion=4, k=8), LayerStats(sums / counts[:, None], sq / counts, counts)).eval()
    sae.b_dec.normal_()
    folders = export_layers(ExportConfig(sae=str(saved_run(tmp_path, sae, list(range(N_STATES))))))
    positions = torch.ones(input_ids.shape, dtype=torch.bool)
    for layer, folder in enumerate(folders):
        cfg, weights, _ = read_folder(folder, "sae_weights.safetensors")

        def exported(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            top = (x @ weights["W_enc"] + weights["b_enc"]).topk(cfg["k"])
            x_hat = dense_code(top.values.reshape(-1, cfg["k"]).relu(), top.indices.reshape(-1, cfg["k"]), cfg["d_sae"])
            x_hat = (x_hat @ weights["W_dec"] + weights["b_dec"]).reshape(x.shape)
            return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

        handle = model.get_submodule(cfg["metadata"]["hook_name"]).register_forward_hook(exported)
        try:
            theirs = model(input_ids).logits
        finally:
            handle.remove()
        with splice(model, layer, positions, lambda x, layer: sae.decode(*sae.encode(x, layer), layer)):
            ours = model(input_ids).logits
        assert not torch.allclose(ours, model(input_ids).logits, atol=1e-3)  # the splice changes the model
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_checkpoint_exports_beside_it_and_layers_are_chosen(tmp_path):
    sae = random_sae()
    run = saved_run(tmp_path, sae)
    sae.save(run / CHECKPOINT)
    folders = export_layers(ExportConfig(sae=str(run / CHECKPOINT), layers="0,3", format="sparsify"))
    assert folders == [run / "export-sparsify-checkpoint" / "embed_tokens", run / "export-sparsify-checkpoint" / "layers.2"]


def test_refusals(tmp_path, monkeypatch):
    with pytest.raises(CrosscodersError, match="--format 'gguf' is unknown; use one of saelens, sparsify"):
        ExportConfig(format="gguf")
    run = saved_run(tmp_path, random_sae(seen=[True, True, False, True, True]), None)
    with pytest.raises(CrosscodersError, match=r"no normalization statistics for hidden states \[2\]"):
        export_layers(ExportConfig(sae=str(run)))
    with pytest.raises(CrosscodersError, match="layer 7 is out of range"):
        export_layers(ExportConfig(sae=str(run), layers="7"))
    monkeypatch.setattr(pipeline.export.Location, "free_bytes", lambda self: 1000)
    with pytest.raises(CrosscodersError, match=r"2 SAEs need 16\.6 KiB but .* has 1,000 bytes free; export fewer --layers"):
        export_layers(ExportConfig(sae=str(run), layers="0,1"))
    assert not (run / "export-saelens").exists()


def test_cli_writes_and_says_how_to_load(tmp_path):
    run = saved_run(tmp_path, random_sae())
    result = run_python("export_sae.py", "--sae", str(run), "--format", "sparsify", "--layers", "4",
                        env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert f"wrote {run / 'export-sparsify' / 'norm'}" in result.stdout
    assert f"SparseCoder.load_many('{run / 'export-sparsify'}', local=True)" in result.stdout
    result = run_python("export_sae.py", "--sae", str(tmp_path / "nothing"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "no SAE at" in result.stderr
