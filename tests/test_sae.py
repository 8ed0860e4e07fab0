"""The TopK SAE: decoders, constraints, layer encoding, normalization, saving and loading."""

import json
import math

import pytest
import torch

from pipeline.errors import CrosscodersError
from pipeline.loader import layer_stats_of
from pipeline.sae import SAEConfig, TopKSAE, decode_dense, decode_sparse, load, sinusoidal_encoding

D_MODEL, N_LAYERS = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_rows(n_rows: int = 256, seed: int = 0):
    """Rows whose layers differ in offset and scale, like a residual stream: (x [n, d], layer [n])."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.randint(0, N_LAYERS - 1, (n_rows,), generator=generator)  # the last layer is never seen
    offset = 3 * torch.randn(N_LAYERS, D_MODEL, generator=generator)
    scale = torch.tensor([0.5, 2.0, 10.0, 1.0])
    x = torch.randn(n_rows, D_MODEL, generator=generator) * scale[layer, None] + offset[layer]
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
    for decode in (decode_dense, decode_sparse):
        W, v = W_dec.clone().requires_grad_(), values.clone().requires_grad_()
        out = decode(v, indices, W)
        (out * torch.linspace(-1, 1, D_MODEL)).sum().backward()
        outputs.append(out)
        gradients.append((W.grad, v.grad))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(gradients[0], gradients[1])


def test_dense_and_sparse_saes_agree_end_to_end():
    x, layer = make_rows(64, seed=1)
    dead_mask = torch.arange(128) % 3 == 0
    results = []
    for decoder in ("dense", "sparse"):
        sae = make_sae(decoder=decoder)
        assert sae.cfg.sparse_decoder == (decoder == "sparse")
        out = sae(x, layer, dead_mask)
        ((out.x_hat_normalized - out.x_normalized).pow(2).mean() + out.auxk_loss).backward()
        results.append((out.x_hat, out.auxk_loss, [p.grad for p in sae.parameters()]))
    torch.testing.assert_close(results[0], results[1])


def test_auto_decoder_is_sparse_only_for_sparse_codes():
    assert SAEConfig(d_model=1536, n_layers=29, expansion=4, k=32).sparse_decoder
    assert SAEConfig(d_model=1536, n_layers=29, expansion=16, k=64).sparse_decoder
    assert not SAEConfig(d_model=1536, n_layers=29, expansion=1, k=128).sparse_decoder


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
    torch.testing.assert_close(parallel, torch.zeros_like(parallel), atol=1e-6, rtol=0)
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
    x_normalized = torch.randn(1, D_MODEL).expand(N_LAYERS, D_MODEL)
    layer = torch.arange(N_LAYERS)
    for layer_encoding, n_codes in (("sinusoidal", N_LAYERS), ("none", 1)):
        code = make_sae(layer_encoding=layer_encoding).pre_acts(x_normalized, layer).topk(8).indices
        assert len({tuple(sorted(row)) for row in code.tolist()}) == n_codes, layer_encoding


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


def test_load_rejects_mismatched_missing_or_corrupt_files(tmp_path):
    make_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(CrosscodersError, match="do not match its cfg.json"):
        load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(CrosscodersError, match="corrupt"):
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


def test_check_compatible_names_the_sae_and_both_sizes(tmp_path):
    make_sae().save(tmp_path)
    sae = load(tmp_path)
    sae.check_compatible(D_MODEL, N_LAYERS)
    with pytest.raises(CrosscodersError, match=f"SAE at {tmp_path} was trained on d_model=32.*model has d_model=64"):
        sae.check_compatible(64, N_LAYERS)


def test_k_larger_than_n_latents_is_refused():
    with pytest.raises(CrosscodersError, match="k=200 is larger than n_latents=128"):
        SAEConfig(d_model=D_MODEL, n_layers=N_LAYERS, expansion=4, k=200)


def test_auxk_loss_trains_only_dead_latents():
    sae = make_sae()
    x, layer = make_rows(64, seed=4)
    assert sae(x, layer).auxk_loss.item() == 0
    dead_mask = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    dead_mask[:40] = True
    out = sae(x, layer, dead_mask)
    assert 0 < out.auxk_loss.item()
    out.auxk_loss.backward()
    assert sae.W_dec.grad[:40].abs().sum() > 0
    assert not sae.W_dec.grad[40:].any() and not sae.W_enc.grad[:, 40:].any()
