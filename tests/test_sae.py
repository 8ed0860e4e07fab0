"""The TopK SAE: decoders, constraints, layer encoding, normalization, saving and loading."""

import collections
import json
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

from pipeline.errors import CrosscodersError
from pipeline.loader import LayerStats, layer_stats_of
from pipeline.sae import ForwardOutput, SAEConfig, TopKSAE, decode_dense, load, normalization_of, read_weights, sinusoidal_encoding
from pipeline.sparse_topk import decode, gather_pre_acts

D_MODEL, N_LAYERS = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_rows(n_rows: int = 256, seed: int = 0, d_model: int = D_MODEL):
    """Rows whose layers differ in offset and scale, like a residual stream: (x [n, d], layer [n])."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.randint(0, N_LAYERS - 1, (n_rows,), generator=generator)  # the last layer is never seen
    offset = 3 * torch.randn(N_LAYERS, d_model, generator=generator)
    scale = torch.tensor([0.5, 2.0, 10.0, 1.0])
    x = torch.randn(n_rows, d_model, generator=generator) * scale[layer, None] + offset[layer]
    return x, layer


def make_sae(seed: int = 0, **overrides) -> TopKSAE:
    torch.manual_seed(seed)
    x, layer = make_rows()
    cfg = SAEConfig(**{"d_model": D_MODEL, "n_layers": N_LAYERS, "expansion": 4, "k": 8, **overrides})
    return TopKSAE(cfg, layer_stats_of(x, layer, N_LAYERS))


def test_dense_and_sparse_decoding_agree_in_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(128, D_MODEL, generator=generator)
    values = torch.rand(16, 8, generator=generator)
    indices = torch.rand(16, 128, generator=generator).topk(8).indices
    outputs, gradients = [], []
    for decode_latents in (decode_dense, decode):
        W, v = W_dec.clone().requires_grad_(), values.clone().requires_grad_()
        out = decode_latents(v, indices, W)
        (out * torch.linspace(-1, 1, D_MODEL)).sum().backward()
        outputs.append(out)
        gradients.append((W.grad, v.grad))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(gradients[0], gradients[1])


def perturbed_sae(d_model: int, expansion: int, k: int, layer_encoding: str, decoder: str, dtype=torch.float32):
    """An SAE past its initialization: every parameter moved, and b_enc negative so ReLU cuts many pre-acts."""
    torch.manual_seed(0)
    stats = layer_stats_of(*make_rows(d_model=d_model), N_LAYERS)
    sae = TopKSAE(SAEConfig(d_model, N_LAYERS, expansion, k, layer_encoding, decoder=decoder), stats).to(dtype)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        sae.b_enc.copy_(-0.5 * torch.rand_like(sae.b_enc) - 0.05)
    return sae


def rows_with_weak_codes(sae: TopKSAE, n_rows: int, seed: int):
    """make_rows, then 4 rows whose encoder input is 0, so every pre-act is 0 (top-k picks among ties), and 8 whose
    input is shrunk, so fewer than k pre-acts stay positive."""
    x, layer = make_rows(n_rows, seed, sae.cfg.d_model)
    x = x.to(sae.b_dec.dtype)
    with torch.no_grad():
        x_in = sae.encoder_input(sae.normalize(x, layer), layer)
        x_in[:4], x_in[4:12] = 0, 0.01 * x_in[4:12]
        embedding = 0 if sae.layer_embedding is None else sae.layer_embedding[layer]
        return sae.denormalize(x_in + sae.b_dec - embedding, layer), layer


def loss_and_gradients(sae: TopKSAE, x, layer, dead_mask, dead_capacity=None) -> tuple[ForwardOutput, torch.Tensor, dict]:
    """(forward output, training loss MSE + AuxK, every parameter's gradient after backward and the projection)."""
    out = sae(x, layer, dead_mask, dead_capacity)
    loss = (out.x_hat_normalized - out.x_normalized).pow(2).mean() + out.auxk_loss
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    return out, loss, {name: p.grad for name, p in sae.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer_encoding", ["learned", "sinusoidal", "none"])
# shape: (d_model, expansion, k, n_dead)
@pytest.mark.parametrize("shape", [(32, 4, 8, 0), (32, 4, 8, 40), (16, 2, 3, 32), (24, 1, 20, 5)])
def test_sparse_step_matches_dense_loss_and_gradients(dtype, layer_encoding, shape):
    d_model, expansion, k, n_dead = shape
    results = []
    for decoder in ("dense", "sparse"):
        sae = perturbed_sae(d_model, expansion, k, layer_encoding, decoder, dtype)
        assert sae.sparse_step == (decoder == "sparse")
        x, layer = rows_with_weak_codes(sae, 64, seed=1)
        dead_mask = torch.arange(sae.cfg.n_latents) % 3 == 0
        dead_mask &= dead_mask.cumsum(0) <= n_dead
        results.append(loss_and_gradients(sae, x, layer, dead_mask))
    (dense, dense_loss, dense_grads), (sparse, sparse_loss, sparse_grads) = results
    assert (dense.top_values[:4] == 0).all() and (dense.top_values[4:12] == 0).any(1).all()  # ReLU cut kept latents
    assert (dense.auxk_loss > 0) == (n_dead > 0)
    assert all(grad.dtype == dtype and grad.abs().max() > 0 for grad in dense_grads.values())
    torch.testing.assert_close(sparse.x_hat, dense.x_hat)
    torch.testing.assert_close((sparse_loss, sparse.auxk_loss), (dense_loss, dense.auxk_loss))
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, msg=name)


@pytest.mark.parametrize("decoder", ["dense", "sparse", "triton"])
@pytest.mark.parametrize("n_dead", [3, 40])  # fewer than d_model / 2 = 16, so k_aux grows with the capacity; more
def test_auxk_among_more_candidates_than_dead_latents_gives_the_same_loss_and_gradients(decoder, n_dead):
    results = []
    for capacity in (n_dead, n_dead + 5, 4 * D_MODEL):
        sae = perturbed_sae(D_MODEL, 4, 8, "sinusoidal", decoder)
        x, layer = rows_with_weak_codes(sae, 64, seed=2)
        dead_mask = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
        dead_mask[torch.randperm(sae.cfg.n_latents, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
        results.append(loss_and_gradients(sae, x, layer, dead_mask, capacity))
    (exact, exact_loss, exact_grads), *larger = results
    assert exact.auxk_loss > 0
    for out, loss, grads in larger:
        torch.testing.assert_close((loss, out.auxk_loss, out.x_hat), (exact_loss, exact.auxk_loss, exact.x_hat))
        for name, grad in exact_grads.items():
            torch.testing.assert_close(grads[name], grad, msg=name)
    dead_rows = exact_grads["W_dec"][dead_mask].abs().sum(1) > 0
    assert dead_rows.sum() > n_dead // 2  # AuxK reached the dead latents, which the main top-k rarely picks


def test_sparse_training_steps_give_the_dense_weights():
    weights = []
    for decoder in ("dense", "sparse"):
        sae = perturbed_sae(D_MODEL, 4, 8, "learned", decoder)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead_mask = torch.arange(sae.cfg.n_latents) % 5 == 0
        for step in range(4):
            optimizer.zero_grad()
            loss_and_gradients(sae, *rows_with_weak_codes(sae, 64, seed=10 + step), dead_mask)
            optimizer.step()
            sae.set_decoder_norm_to_unit_norm()
        weights.append(dict(sae.named_parameters()))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weights[0]["W_enc"], perturbed_sae(D_MODEL, 4, 8, "learned", "dense").W_enc)


def test_gather_pre_acts_passes_gradcheck():
    generator = torch.Generator().manual_seed(0)
    x_in = torch.randn(6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    W_enc = torch.randn(5, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    b_enc = torch.randn(12, dtype=torch.float64, generator=generator, requires_grad=True)
    top = torch.rand(6, 12, generator=generator).topk(4).indices
    indices = torch.cat([top, top[:, :2]], 1)  # repeats, as the main and AuxK selections may
    masked = torch.rand(6, 6, generator=generator) < 0.2  # values zeroed before top-k, as AuxK's mask does

    def sparse_pre_acts(x_in, W_enc, b_enc):
        with torch.no_grad():
            pre_acts = (x_in @ W_enc + b_enc).gather(1, indices)
            assert pre_acts.abs().min() > 1e-3  # away from ReLU's kink, where finite differences jump
            values = pre_acts.relu().masked_fill(masked, 0)
        return gather_pre_acts(x_in, W_enc, b_enc, indices, values)

    assert torch.autograd.gradcheck(sparse_pre_acts, (x_in, W_enc, b_enc))


def test_sparse_step_under_bf16_autocast_gives_parameter_dtype_gradients():
    results = []
    for decoder in ("dense", "sparse"):
        sae = perturbed_sae(D_MODEL, 4, 8, "learned", decoder)
        x, layer = make_rows(64, seed=5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, layer, torch.arange(sae.cfg.n_latents) % 3 == 0)
        assert out.auxk_loss > 0
        ((out.x_hat_normalized.float() - out.x_normalized).pow(2).mean() + out.auxk_loss).backward()
        assert all(p.grad.dtype == p.dtype == torch.float32 for p in sae.parameters())
        results.append(dict(sae.named_parameters()))
    for name, dense in results[0].items():  # the dense backward runs in bf16, the sparse one in float32
        scale = dense.grad.abs().max().item()
        torch.testing.assert_close(results[1][name].grad, dense.grad, rtol=0.05, atol=0.05 * scale, msg=name)


def test_auto_decoder_takes_the_sparse_step_only_for_sparse_codes_off_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    for expansion, k in [(4, 32), (16, 64), (1, 128)]:  # 1/192 to 1/12, where sparse still wins on the CPU
        assert SAEConfig(d_model=1536, n_layers=29, expansion=expansion, k=k).sparse_step(cpu)
        assert not SAEConfig(d_model=1536, n_layers=29, expansion=expansion, k=k).sparse_step(cuda)  # dense is faster there
    for expansion, k in [(1, 192), (4, 768), (1, 384)]:  # 1/8 and up: dense
        assert not SAEConfig(d_model=1536, n_layers=29, expansion=expansion, k=k).sparse_step(cpu)
    assert SAEConfig(d_model=1536, n_layers=29, expansion=4, k=32, decoder="triton").sparse_step(cuda)


def test_encoder_starts_as_decoder_transpose_with_unit_norm_rows():
    sae = make_sae()
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents))
    assert not sae.b_dec.any() and not sae.b_enc.any()


def test_decoder_rows_stay_unit_norm_and_gradient_loses_parallel_part():
    sae = make_sae()
    x, layer = make_rows(64, seed=2)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    out = sae(x, layer)
    (out.x_hat_normalized - out.x_normalized).pow(2).mean().backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    scale = sae.W_dec.grad.abs().max().item()
    torch.testing.assert_close(parallel, torch.zeros_like(parallel), atol=1e-6 * scale, rtol=0)
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_latents))
    assert not torch.equal(sae.W_enc, sae.W_dec.T)  # it did train


def test_sinusoidal_encoding_matches_closed_form_and_differs_per_layer():
    n_layers, d_model = 29, 10
    encoding = sinusoidal_encoding(n_layers, d_model)
    for position in range(n_layers):
        for i in range(d_model // 2):
            angle = position / 10000 ** (2 * i / d_model)
            assert encoding[position, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert encoding[position, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.cdist(encoding, encoding).add(torch.eye(n_layers)).min() > 0.1
    assert sinusoidal_encoding(3, 7).shape == (3, 7)  # odd widths end on a sine


def test_layer_encoding_changes_the_code_of_the_same_row():
    x_normalized = torch.randn(1, D_MODEL, generator=torch.Generator().manual_seed(0)).expand(N_LAYERS, D_MODEL)
    layer = torch.arange(N_LAYERS)
    for layer_encoding, n_codes in (("sinusoidal", N_LAYERS), ("learned", N_LAYERS), ("none", 1)):
        code = make_sae(layer_encoding=layer_encoding).pre_acts(x_normalized, layer).topk(8).indices
        assert len({tuple(sorted(row)) for row in code.tolist()}) == n_codes, layer_encoding


def test_learned_layer_encoding_starts_as_the_sinusoidal_one_and_is_trained():
    sae = make_sae(layer_encoding="learned")
    torch.testing.assert_close(sae.layer_embedding.detach(), sinusoidal_encoding(N_LAYERS, D_MODEL))
    assert sae.layer_embedding in set(sae.parameters())


def test_normalization_round_trips_and_gives_unit_scale_per_layer():
    x, layer = make_rows()
    sae = make_sae()
    x_normalized = sae.normalize(x, layer)
    torch.testing.assert_close(sae.denormalize(x_normalized, layer), x, atol=1e-5, rtol=1e-5)
    for i in range(N_LAYERS - 1):
        rows = x_normalized[layer == i]
        torch.testing.assert_close(rows.mean(0), torch.zeros(D_MODEL), atol=1e-5, rtol=0)
        assert rows.pow(2).sum(1).mean().item() == pytest.approx(D_MODEL, rel=1e-4)
    unseen = torch.full((5,), N_LAYERS - 1)
    assert torch.equal(sae.normalize(x[:5], unseen), x[:5])  # a layer without statistics passes as is


@pytest.mark.parametrize("layer_encoding", ["sinusoidal", "learned", "none"])
def test_save_and_load_give_identical_outputs(tmp_path, layer_encoding):
    sae = make_sae(layer_encoding=layer_encoding)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    sae.save(tmp_path)
    loaded = load(tmp_path)
    x, layer = make_rows(32, seed=3)
    assert loaded.cfg == sae.cfg
    for name, expected in sae(x, layer).__dict__.items():
        assert torch.equal(getattr(loaded(x, layer), name), expected), name
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}


def test_a_save_that_fails_midway_leaves_the_sae_before_it(tmp_path, monkeypatch):
    """The trainer's final save writes into the run's own folder: a crash there must not leave a torn SAE."""
    first, second = make_sae(), make_sae(seed=1)
    first.save(tmp_path)

    def torn(tensors, path):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr("pipeline.sae.save_file", torn)
    with pytest.raises(OSError):
        second.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}  # no half file left behind either
    assert all(torch.equal(a, b) for a, b in zip(load(tmp_path).state_dict().values(), first.state_dict().values(), strict=True))
    monkeypatch.undo()
    second.save(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(load(tmp_path).state_dict().values(), second.state_dict().values(), strict=True))
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.json", "sae_weights.safetensors"}  # the torn file replaced


def apply_as_format_md_says(folder, x: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A third party's SAE, from docs/FORMAT.md alone: (latent indices [n, k], x_hat [n, d_model]) in float64 numpy."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: t.astype(np.float64) for name, t in load_numpy(folder / "sae_weights.safetensors").items()}
    d, n_layers = cfg["d_model"], cfg["n_layers"]
    if cfg["layer_encoding"] == "sinusoidal":
        angle = np.arange(n_layers)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
        encoding = np.zeros((n_layers, d))
        encoding[:, 0::2], encoding[:, 1::2] = np.sin(angle), np.cos(angle)[:, : d // 2]
        encoding = encoding.astype(np.float32).astype(np.float64)
    else:
        encoding = w["layer_embedding"] if cfg["layer_encoding"] == "learned" else np.zeros((n_layers, d))
    x_norm = (x - w["norm_mean"][layer]) * w["norm_scale"][layer, None]
    pre = np.maximum((x_norm - w["b_dec"] + encoding[layer]) @ w["W_enc"] + w["b_enc"], 0)
    indices = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    values = np.take_along_axis(pre, indices, 1)
    x_hat = (np.einsum("nk,nkd->nd", values, w["W_dec"][indices]) + w["b_dec"]) / w["norm_scale"][layer, None] + w["norm_mean"][layer]
    return indices, x_hat


@pytest.mark.parametrize("layer_encoding", ["sinusoidal", "learned", "none"])
@pytest.mark.parametrize("d_model", [D_MODEL, D_MODEL + 1])
def test_a_saved_sae_applied_as_format_md_describes_gives_its_codes_and_reconstructions(tmp_path, layer_encoding, d_model):
    torch.manual_seed(0)
    x, layer = make_rows(64, d_model=d_model)
    sae = TopKSAE(SAEConfig(d_model, N_LAYERS, expansion=4, k=8, layer_encoding=layer_encoding), layer_stats_of(x, layer, N_LAYERS))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    sae.save(tmp_path)
    indices, x_hat = apply_as_format_md_says(tmp_path, x.double().numpy(), layer.numpy())
    sae = load(tmp_path).double()
    with torch.no_grad():
        values, expected_indices = sae.encode(x.double(), layer)
        expected = sae.decode(values, expected_indices, layer)
    assert np.array_equal(np.sort(indices, 1), np.sort(expected_indices.numpy(), 1))
    np.testing.assert_allclose(x_hat, expected.numpy(), rtol=1e-9, atol=1e-9)


def test_load_rejects_mismatched_missing_or_corrupt_files(tmp_path):
    make_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(CrosscodersError, match="do not match its cfg.json"):
        load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(CrosscodersError, match="corrupt"):
        load(tmp_path)
    for field, value in (("expansion", 4.0), ("k", 1.5), ("n_layers", True)):  # sizes that are not whole numbers
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(CrosscodersError, match="is corrupt .*must be whole numbers"):
            load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CrosscodersError, match="corrupt"):
        load(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(CrosscodersError, match="sae_weights.safetensors is missing"):
        load(tmp_path)
    with pytest.raises(CrosscodersError, match="cfg.json is missing"):
        load(tmp_path / "elsewhere")


def test_load_of_a_file_a_store_a_sweep_or_an_unfinished_run_says_what_to_pass_instead(tmp_path):
    make_sae().save(tmp_path / "sweep" / "k8")
    with pytest.raises(CrosscodersError, match=rf"no SAE at {tmp_path}/sweep: it holds a sweep; pass one of its runs, e.g. {tmp_path}/sweep/k8$"):
        load(tmp_path / "sweep")
    with pytest.raises(CrosscodersError, match=rf"it is a file; pass the folder holding it, {tmp_path}/sweep/k8$"):
        load(tmp_path / "sweep" / "k8" / "cfg.json")
    make_sae().save(tmp_path / "unfinished" / "checkpoint")
    with pytest.raises(CrosscodersError, match=rf"the run has not finished; pass its checkpoint, {tmp_path}/unfinished/checkpoint$"):
        load(tmp_path / "unfinished")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "zarr.json").write_text("{}")
    with pytest.raises(CrosscodersError, match=r"it is an activation store \(pass it as --shards\)"):
        load(tmp_path / "store")


def test_check_compatible_names_the_sae_and_both_sizes(tmp_path):
    make_sae().save(tmp_path)
    sae = load(tmp_path)
    sae.check_compatible(D_MODEL, N_LAYERS)
    with pytest.raises(CrosscodersError, match=f"SAE at {tmp_path} was trained on d_model=32.*model has d_model=64"):
        sae.check_compatible(64, N_LAYERS)


def test_k_larger_than_n_latents_is_refused():
    with pytest.raises(CrosscodersError, match="k=200 is larger than n_latents=128"):
        SAEConfig(d_model=D_MODEL, n_layers=N_LAYERS, expansion=4, k=200)


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_auxk_loss_trains_only_dead_latents(decoder):
    sae = make_sae(decoder=decoder)
    x, layer = make_rows(64, seed=4)
    assert sae(x, layer).auxk_loss.item() == 0
    dead_mask = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    dead_mask[:40] = True
    out = sae(x, layer, dead_mask)
    assert 0 < out.auxk_loss.item()
    out.auxk_loss.backward()
    assert sae.W_dec.grad[:40].abs().sum() > 0
    assert not sae.W_dec.grad[40:].any() and not sae.W_enc.grad[:, 40:].any()


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_auxk_among_candidates_none_of_them_dead_adds_nothing(decoder):
    """The trainer's bound on the dead count may exceed a count of 0: AuxK then adds nothing, to the loss as to the
    gradients, not the 1 of reconstructing the residual from nothing."""
    results = []
    for capacity in (0, 5, 4 * D_MODEL):
        sae = perturbed_sae(D_MODEL, 4, 8, "sinusoidal", decoder)
        results.append(loss_and_gradients(sae, *make_rows(64, seed=6), torch.zeros(sae.cfg.n_latents, dtype=torch.bool),
                                          capacity))
    (exact, exact_loss, exact_grads), *larger = results
    for out, loss, grads in larger:
        assert out.auxk_loss.item() == 0 and loss.item() == exact_loss.item()
        for name, grad in exact_grads.items():
            torch.testing.assert_close(grads[name], grad, msg=name)


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
@pytest.mark.parametrize("layer_encoding", ["sinusoidal", "none"])
def test_forward_and_auxk_equal_the_topk_recipe_written_out(decoder, layer_encoding):
    """Gao et al.'s TopK SAE and AuxK, written out on dense codes in the normalized space: the reconstruction, the MSE
    and AuxK's top d_model / 2 dead latents reconstructing the detached residual, over its squared norm."""
    sae = perturbed_sae(D_MODEL, 4, 8, layer_encoding, decoder, torch.float64)
    x, layer = make_rows(64, seed=7)
    x = x.double()
    dead_mask = torch.arange(sae.cfg.n_latents) % 4 == 0  # 32 dead, more than k_aux = 16
    out = sae(x, layer, dead_mask)
    p = {name: parameter.detach() for name, parameter in sae.named_parameters()}
    x_n = (x - sae.norm_mean[layer]) * sae.norm_scale[layer, None]
    encoding = 0 if sae.layer_embedding is None else sae.layer_embedding[layer]
    pre_acts = torch.relu((x_n - p["b_dec"] + encoding) @ p["W_enc"] + p["b_enc"])
    top_values, top_indices = pre_acts.topk(8)
    x_hat_n = torch.zeros_like(pre_acts).scatter(1, top_indices, top_values) @ p["W_dec"] + p["b_dec"]
    dead_values, dead_indices = pre_acts.where(dead_mask, -torch.inf).topk(D_MODEL // 2)
    e = x_n - x_hat_n
    e_aux = torch.zeros_like(pre_acts).scatter(1, dead_indices, dead_values) @ p["W_dec"]
    torch.testing.assert_close(out.x_hat, x_hat_n / sae.norm_scale[layer, None] + sae.norm_mean[layer])
    torch.testing.assert_close(out.x_hat_normalized.detach(), x_hat_n)
    assert out.auxk_loss.item() == pytest.approx(((e - e_aux).pow(2).sum() / e.pow(2).sum()).item(), rel=1e-5)


def test_a_checkpoint_swapped_in_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """eval-sae RUN/checkpoint while training runs: the trainer renames checkpoint/ away and a new one in at each save."""
    make_sae().save(tmp_path / "checkpoint")
    make_sae().save(tmp_path / "run")
    real, calls = read_weights, []

    def swapped_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr("pipeline.sae.read_weights", swapped_once)
    assert load(tmp_path / "checkpoint").cfg == make_sae().cfg and len(calls) == 2
    calls.clear()
    with pytest.raises(CrosscodersError, match=r"^no SAE at .*run: .*sae_weights.safetensors went away while it was read$"):
        load(tmp_path / "run")  # a finished run's folder is not swapped: no second try


def test_reading_a_checkpoint_the_trainer_keeps_swapping_never_ends_in_a_traceback(tmp_path):
    """safetensors opened the weights file, then torch opened it again by name: a swap in between raised a RuntimeError,
    which no retry caught (29 of 10,330 loads against a trainer saving every step)."""
    run, stop, outcomes = tmp_path / "run", threading.Event(), collections.Counter()
    make_sae().save(run / "checkpoint")

    def save_checkpoints():  # as Run.save_checkpoint swaps them in, as fast as it can
        while not stop.is_set():
            make_sae().save(run / "checkpoint.tmp")
            shutil.rmtree(run / "checkpoint.old", ignore_errors=True)
            (run / "checkpoint").rename(run / "checkpoint.old")
            (run / "checkpoint.tmp").rename(run / "checkpoint")

    trainer = threading.Thread(target=save_checkpoints)
    trainer.start()
    try:
        for _ in range(1500):
            try:
                load(run / "checkpoint")
                outcomes["loaded"] += 1
            except CrosscodersError:  # three reads in a row met a swap: said in one line
                outcomes["refused"] += 1
    finally:
        stop.set()
        trainer.join()
    assert outcomes["loaded"] > 1000


def test_a_loaded_sae_is_for_analysis_and_leaves_the_callers_rng_alone(tmp_path):
    """From a notebook: no autograd graph held by encode's outputs, and torch.randn goes on as it would have."""
    make_sae().save(tmp_path)
    torch.manual_seed(123)
    expected = torch.randn(3)
    torch.manual_seed(123)
    sae = load(tmp_path)
    assert torch.equal(torch.randn(3), expected)
    assert not sae.training and not any(p.requires_grad for p in sae.parameters())
    x, layer = make_rows(16, seed=2)
    values, _ = sae.encode(x, layer)
    assert values.grad_fn is None


def test_encode_and_decode_take_the_stores_int16_layer_ids(tmp_path):
    sae = make_sae()
    x, layer = make_rows(16, seed=2)
    values, indices = sae.encode(x, layer.to(torch.int16))
    assert all(torch.equal(a, b) for a, b in zip((values, indices), sae.encode(x, layer)))
    assert torch.equal(sae.decode(values, indices, layer.to(torch.int16)), sae.decode(values, indices, layer))
    assert torch.equal(sae(x, layer.to(torch.int16)).x_hat, sae(x, layer).x_hat)


def test_encode_and_decode_take_one_layer_for_every_row_or_numpy_ids():
    """sae.encode(x, 12), a notebook's most common call, raised AttributeError."""
    sae = make_sae()
    x, _ = make_rows(16, seed=3)
    every = torch.full((16,), 2)
    for layer in (2, np.full(16, 2, np.int16)):
        values, indices = sae.encode(x, layer)
        assert all(torch.equal(a, b) for a, b in zip((values, indices), sae.encode(x, every)))
        assert torch.equal(sae.decode(values, indices, layer), sae.decode(values, indices, every))


def test_an_sae_in_bf16_is_saved_in_float32_as_documented(tmp_path):
    sae = make_sae().to(torch.bfloat16)
    sae.save(tmp_path)
    assert {t.dtype for t in load_numpy(str(tmp_path / "sae_weights.safetensors")).values()} == {np.dtype("float32")}
    assert all(torch.equal(a.float(), b) for a, b in zip(sae.state_dict().values(), load(tmp_path).state_dict().values(), strict=True))


def test_saved_files_are_as_readable_as_any_new_file(tmp_path):
    """safetensors writes its files for their owner alone: colleagues on a shared machine could not read an SAE."""
    make_sae().save(tmp_path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert {(tmp_path / name).stat().st_mode & 0o777 for name in ("sae_weights.safetensors", "cfg.json")} == {0o666 & ~mask}


def test_a_layer_whose_rows_do_not_vary_is_left_unscaled():
    """A hidden state of one repeated vector has no variance to scale by: 1/sqrt(0) would blow its inputs up."""
    stats = LayerStats(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 25.001]), torch.tensor([10, 10]))
    mean, scale = normalization_of(stats, 2, 2)
    assert scale[0] == 1 and mean[0].eq(0).all() and torch.isfinite(scale).all() and scale[1] > 1


def test_a_layer_far_from_the_origin_is_scaled_by_its_own_spread():
    """E||x||^2 - ||mean||^2 loses the spread's digits when the moments are rounded to float32 first."""
    x = 3000 + torch.randn(4096, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, scale = normalization_of(layer_stats_of(x.float(), torch.zeros(4096, dtype=torch.long), 1), 1, 16)
    spread = ((x - mean.double()) * scale.double()).pow(2).sum(1).mean()
    assert abs(float(spread) - 16) < 1e-3


def test_statistics_of_another_shape_are_a_one_line_error():
    with pytest.raises(CrosscodersError):
        TopKSAE(SAEConfig(d_model=8, n_layers=3), LayerStats(torch.zeros(2, 8), torch.ones(2), torch.ones(2, dtype=torch.long)))
