"""TrainStep: AuxK's candidates rounded up for CUDA graphs, metrics read back a step late with a bound on the dead
latents, and (on CUDA) graph replays that give the eager steps."""

import contextlib
import dataclasses

import pytest
import torch
from test_sae import D_MODEL, make_rows, make_sae
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import train_step
from pipeline.errors import CrosscodersError
from pipeline.sae import TopKSAE
from pipeline.train import TrainConfig
from pipeline.train_step import TrainStep, graph_dead_capacity, uses_cuda_graph

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 64


def test_graph_dead_capacity_adds_at_most_an_eighth_and_takes_eight_sizes_per_octave():
    n_latents = 3000
    capacities = [graph_dead_capacity(n, n_latents) for n in range(n_latents + 1)]
    assert capacities[:9] == list(range(9))
    for n_dead, capacity in enumerate(capacities):
        assert n_dead <= capacity <= min(n_latents, n_dead + n_dead / 8)
    for low in (16, 64, 1024):  # an octave's counts round up to 8 evenly spaced capacities, then the next octave's
        assert set(capacities[low : 2 * low]) == set(range(low, 2 * low + 1, low // 8))
    assert capacities == sorted(capacities) and capacities[-1] == n_latents


def test_cuda_graph_is_refused_off_cuda_in_one_line():
    with pytest.raises(CrosscodersError, match=r"^cuda_graph needs a CUDA device, not cpu; train without --cuda-graph$"):
        TrainStep(make_sae(), TrainConfig(cuda_graph=True), torch.device("cpu"))


def test_cuda_graphs_are_the_default_for_one_process_on_cuda_alone(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert uses_cuda_graph(TrainConfig(), cuda) and not uses_cuda_graph(TrainConfig(), cpu)
    assert not uses_cuda_graph(TrainConfig(cuda_graph=False), cuda) and uses_cuda_graph(TrainConfig(cuda_graph=True), cuda)
    monkeypatch.setattr(train_step.distributed, "world_size", lambda: 2)  # under torchrun
    assert not uses_cuda_graph(TrainConfig(), cuda)
    assert TrainStep(make_sae(), TrainConfig(), cpu).graphs is None


def silenced_half(sae, bias: float = -100.0):
    """The SAE with latents 0-63 of 128 pushed down by their bias: they (almost) never fire, so they die; at
    bias -3 AuxK still finds positive pre-acts among them."""
    with torch.no_grad():
        sae.b_enc[:64] = bias
    return sae


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
@pytest.mark.parametrize("batches_to_die", [2, 1])  # 1: latents die in the very first step, whose capacity has no count before it
def test_metrics_come_back_a_step_late_and_equal_steps_read_back_at_once(decoder, batches_to_die):
    """Each call returns the step before's metrics; AuxK's capacity, known before the step is queued, covers every
    latent dead when it starts; and the steps equal steps read back at once, whose capacity is the exact count."""
    cfg = TrainConfig(expansion=4, k=8, decoder=decoder, batch_size=BATCH, dead_tokens=batches_to_die * BATCH, lr=1e-3)
    pipelined, at_once = (TrainStep(silenced_half(make_sae(decoder=decoder), -3), cfg, torch.device("cpu"))
                          for _ in range(2))
    late, exact, dead = [], [], []
    for i in range(8):
        x, layer = make_rows(10 if i == 5 else BATCH, seed=i)  # an epoch's short last batch among them
        n_dead = int((pipelined.tokens_since_fired >= cfg.dead_tokens).sum())
        assert pipelined.dead_capacity >= n_dead
        at_once.dead_capacity = int((at_once.tokens_since_fired >= cfg.dead_tokens).sum())  # the exact count
        dead.append(n_dead)
        late.append(pipelined(x, layer, lr=1e-3 * (i + 1)))
        assert at_once(x, layer, lr=1e-3 * (i + 1)) is None
        exact.append(at_once.drain())
        assert exact[-1]["dead_fraction"] == n_dead / 128 and exact[-1]["lr"] == 1e-3 * (i + 1)
    late.append(pipelined.drain())
    assert late[0] is None and pipelined.drain() is None
    for i, (got, want) in enumerate(zip(late[1:], exact)):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), i
    assert dead[:batches_to_die] == [0] * batches_to_die and min(dead[batches_to_die:]) >= 32  # most of the silenced
    assert all(m["auxk_loss"] > 0 for m in exact[batches_to_die:])  # half died in the step before whose end the next
    # step's capacity had to be known
    torch.testing.assert_close(dict(pipelined.sae.named_parameters()), dict(at_once.sae.named_parameters()))


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_a_step_is_adamw_on_mse_plus_auxk_and_its_metrics_follow_their_formulas(decoder):
    """Against a step written out by hand: loss MSE + alpha * AuxK, W_dec's gradient without its part along each
    row, AdamW, the rows back to unit norm; metrics by their formulas; only a positive value counts as firing."""
    cfg = TrainConfig(expansion=4, k=8, decoder=decoder, batch_size=BATCH, dead_tokens=2 * BATCH, lr=1e-2, weight_decay=0.1)
    sae = make_sae(decoder=decoder)
    with torch.no_grad():
        sae.b_enc[:64] = -3.0  # dead from the start: AuxK finds positive pre-acts among them
        sae.b_enc[72:] = -1e6  # never fire: rows have fewer than k positive pre-acts, so top-k also picks zeros
    reference = TopKSAE(dataclasses.replace(sae.cfg, decoder="dense"))
    reference.load_state_dict(sae.state_dict())
    step = TrainStep(sae, cfg, torch.device("cpu"))
    counter = torch.zeros(128, dtype=torch.long)
    counter[:64] = cfg.dead_tokens
    step.load_state({}, counter, None)
    x, layer = make_rows(BATCH, seed=0)
    step(x, layer, lr=1e-2)
    metrics = step.drain()

    dead = counter >= cfg.dead_tokens
    out = reference(x, layer, dead, int(dead.sum()))
    mse = (out.x_hat_normalized - out.x_normalized).pow(2).mean()
    (mse + cfg.auxk_alpha * out.auxk_loss).backward()
    W_dec = reference.W_dec
    W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
    decayed = [{"params": [reference.W_enc], "weight_decay": 0.1},
                {"params": [p for name, p in reference.named_parameters() if name != "W_enc"], "weight_decay": 0.0}]
    torch.optim.AdamW(decayed, lr=1e-2).step()
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(dict(sae.named_parameters()), dict(reference.named_parameters()))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))

    l0 = (out.top_values > 0).sum(1).float().mean()
    assert 0 < l0 < cfg.k and out.auxk_loss > 0
    expected = {"loss": mse + cfg.auxk_alpha * out.auxk_loss, "mse": mse, "auxk_loss": out.auxk_loss, "dead_fraction": 0.5,
                "mse_raw": (out.x_hat - x).pow(2).mean(), "fvu": (out.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum(),
                "l0": l0, "lr": 1e-2}
    assert metrics == pytest.approx({name: float(torch.as_tensor(value).detach()) for name, value in expected.items()}, rel=1e-5)
    fired = torch.zeros(128, dtype=torch.bool)
    fired[out.top_indices[out.top_values > 0]] = True
    assert not fired[72:].any()
    assert torch.equal(step.tokens_since_fired, torch.where(fired, 0, counter + BATCH))


@pytest.mark.parametrize("weight_decay", [None, 0.1])  # None: the default
def test_a_latent_that_never_fires_keeps_its_weights_and_only_its_encoder_column_decays(weight_decay):
    """Its loss gradient is zero, so AdamW leaves it alone but for the decoupled decay of W_enc: a gradient-coupled
    L2 would move it by about lr a step, erasing its encoder column and bending its decoder row."""
    cfg = TrainConfig(expansion=4, k=8, batch_size=BATCH, lr=1e-2, dead_tokens=10**9)
    cfg = cfg if weight_decay is None else dataclasses.replace(cfg, weight_decay=weight_decay)
    step = TrainStep(silenced_half(make_sae()), cfg, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in step.sae.named_parameters()}
    for i in range(5):
        step(*make_rows(BATCH, seed=i), lr=1e-2)
    step.drain()
    silent = slice(0, 64)
    assert int(step.tokens_since_fired[silent].min()) == 5 * BATCH  # none of them fired
    after = dict(step.sae.named_parameters())
    shrink = (1 - 1e-2 * cfg.weight_decay) ** 5
    torch.testing.assert_close(after["W_enc"][:, silent], before["W_enc"][:, silent] * shrink)
    torch.testing.assert_close(after["W_dec"][silent], before["W_dec"][silent])
    torch.testing.assert_close(after["b_enc"][silent], before["b_enc"][silent])
    assert not torch.allclose(after["W_enc"][:, 64:], before["W_enc"][:, 64:] * shrink)  # the others did train


def test_moments_loaded_from_a_checkpoint_take_their_parameters_layout():
    cfg = TrainConfig(expansion=4, k=8, batch_size=BATCH, lr=1e-2)
    steps = [TrainStep(make_sae(), cfg, torch.device("cpu")) for _ in range(2)]
    assert steps[0].sae.W_enc.stride() == (1, D_MODEL)  # column-major, as the fused update must see its moments
    for i in range(2):
        steps[0](*make_rows(BATCH, seed=i), lr=1e-2)
    steps[0].drain()  # as a checkpoint does
    saved = {i: {name: t.clone(memory_format=torch.contiguous_format) for name, t in state.items()}
             for i, state in steps[0].optimizer.state_dict()["state"].items()}  # copies, contiguous, as a checkpoint
    steps[1].sae.load_state_dict(steps[0].sae.state_dict())
    steps[1].load_state(saved, steps[0].tokens_since_fired, [steps[0].dead_capacity, steps[0].dead_capacity_after])
    for step in steps:
        step(*make_rows(BATCH, seed=2), lr=1e-2)
    for name, parameter in steps[0].sae.named_parameters():
        assert torch.equal(dict(steps[1].sae.named_parameters())[name], parameter), name


class HostReads(TorchDispatchMode):
    """Notes the ops of a block that read a value back to the host: on CUDA each waits for the GPU, and a graph
    capture fails on it. .tolist() bypasses the dispatcher, so the test patches it."""

    OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "repeat_interleave", "equal")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        by_mask = name in ("index", "index_put", "index_put_") and any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1])
        if by_mask or any(op in name for op in self.OPS):  # a boolean mask's index needs its count of True
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("decoder", ["dense", "sparse"])
def test_the_step_a_cuda_graph_captures_reads_nothing_back(decoder, monkeypatch):
    """What StepGraphs captures, TrainStep.on_device with AuxK's capacity given, may not read anything back; only a
    GPU runs the capture, so on the CPU the dispatcher lists the ops instead."""
    cfg = TrainConfig(expansion=4, k=8, decoder=decoder, batch_size=BATCH, dead_tokens=2 * BATCH)
    step = TrainStep(make_sae(decoder=decoder), cfg, torch.device("cpu"))
    x, layer = make_rows(BATCH)
    step.on_device(x, layer, 0)  # the eager warm-up before a capture: Adam's state
    step.tokens_since_fired[:40] = cfg.dead_tokens  # 40 dead latents: AuxK runs, among 48 candidates
    with HostReads() as reads:
        tolist = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda tensor: reads.found.append("tolist") or tolist(tensor))
        step.on_device(x, layer, 48)
    assert reads.found == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("decoder", ["dense", "sparse", "triton"])
def test_cuda_graph_replays_give_the_eager_steps(decoder, monkeypatch):
    monkeypatch.setattr(train_step, "autocast", lambda device: contextlib.nullcontext())  # float32: a tight comparison
    device = torch.device("cuda")
    cfg = TrainConfig(expansion=4, k=8, decoder=decoder, batch_size=BATCH, dead_tokens=2 * BATCH, cuda_graph=True)
    graphed, eager = (TrainStep(silenced_half(make_sae(decoder=decoder), -3).to(device), cfg, device) for _ in range(2))
    eager.graphs = None  # the same step, Adam and its state on the GPU included, launched op by op
    capacities = []  # AuxK's capacity in each full batch: a graph is captured the second time one comes up
    for i in range(12):
        x, layer = make_rows(10 if i == 6 else BATCH, seed=i)  # batch 6 is short: it runs eagerly between replays
        if len(x) == BATCH:
            capacities.append(graph_dead_capacity(graphed.dead_capacity, 128))
        lr = 1e-3 * (i + 1) / 12
        metrics, eager_metrics = graphed(x.to(device), layer.to(device), lr), eager(x.to(device), layer.to(device), lr)
        assert (metrics is None) == (eager_metrics is None) == (i == 0)
        assert metrics == pytest.approx(eager_metrics, rel=1e-4, abs=1e-5), i
        assert graphed.dead_capacity == eager.dead_capacity
    assert graphed.drain() == pytest.approx(eager.drain(), rel=1e-4, abs=1e-5)
    replayed = {capacity for capacity in capacities if capacities.count(capacity) > 1}
    assert graphed.graphs.graphs.keys() == replayed and 0 in replayed and len(replayed) >= 2  # without AuxK and with
    torch.testing.assert_close(dict(graphed.sae.named_parameters()), dict(eager.sae.named_parameters()),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graphed.tokens_since_fired, eager.tokens_since_fired)
