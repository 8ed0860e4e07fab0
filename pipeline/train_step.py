"""One SAE's optimizer step: forward with AuxK, backward, Adam, the decoder's renormalization and the dead-latent
counter, queued on the device; its metrics are read back while the next step runs. On CUDA optionally replayed from
CUDA graphs."""

import math
from typing import TYPE_CHECKING

import torch

from pipeline import distributed
from pipeline.cuda_graphs import StepGraphs
from pipeline.errors import CrosscodersError
from pipeline.sae import TopKSAE

if TYPE_CHECKING:
    from pipeline.train import TrainConfig

METRICS = ("loss", "mse", "auxk_loss", "dead_fraction", "mse_raw", "fvu", "l0")


def graph_dead_capacity(n_dead: int, n_latents: int) -> int:
    """n_dead rounded up to one of 8 sizes per octave (exact up to 8), at most n_latents: how many latents AuxK
    looks among in a CUDA graph, so that a run meets few shapes (one graph each) for at most 1/8 more AuxK work."""
    if n_dead <= 8:
        return n_dead
    granularity = 1 << (n_dead.bit_length() - 4)
    return min(n_latents, -(-n_dead // granularity) * granularity)


def parameter_groups(sae: TopKSAE, weight_decay: float) -> list[dict]:
    """AdamW's groups: decoupled weight decay on the encoder weights only, in the order of sae.parameters() (a
    checkpoint's optimizer state is keyed by it). The decoder's rows keep unit norm and biases are not decayed; a
    gradient-coupled L2 (Adam's weight_decay) would instead shrink every latent that stops firing by about lr a step."""
    rest = [parameter for name, parameter in sae.named_parameters() if name != "W_enc"]
    return [{"params": [sae.W_enc], "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def uses_cuda_graph(cfg: "TrainConfig", device: torch.device) -> bool:
    """cfg.cuda_graph, or where the run left it unset, whether one process trains on a CUDA device."""
    if cfg.cuda_graph is None:
        return device.type == "cuda" and distributed.world_size() == 1
    return cfg.cuda_graph


def check_device(cfg: "TrainConfig", device: torch.device):
    """Raise unless this process can take cfg's step on device: CUDA graphs need one process on a CUDA device."""
    if cfg.cuda_graph and device.type != "cuda":
        raise CrosscodersError(f"cuda_graph needs a CUDA device, not {device}; train without --cuda-graph")
    if cfg.cuda_graph and distributed.world_size() > 1:
        raise CrosscodersError(f"cuda_graph trains on one process, not {distributed.world_size()}; train without "
                               "--cuda-graph, or on one GPU")


class TrainStep:
    """The optimizer, the dead-latent counter and the training step of one SAE.

    A step's metrics are read back after the next step is queued, so that a GPU always has a step to run while the
    host waits. AuxK's shape, the number of dead latents, must be known on the host before a step is queued; what the
    host knows then is a bound: the latents that a step leaves within one batch of dying (dead_capacity).
    """

    def __init__(self, sae: TopKSAE, cfg: "TrainConfig", device: torch.device):
        self.sae, self.cfg, self.device = sae, cfg, device
        check_device(cfg, device)
        # fused: one pass over each parameter, its gradient and moments, where the multi-tensor update makes about
        # ten; capturable: the step count and learning rate stay on the GPU, where a graph's replays update them
        graphs = uses_cuda_graph(cfg, device)
        lr = torch.tensor(cfg.lr, device=device) if graphs else cfg.lr
        self.optimizer = torch.optim.AdamW(parameter_groups(sae, cfg.weight_decay), lr=lr, fused=True, capturable=graphs)
        self.tokens_since_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
        self.graphs = StepGraphs(self.on_device, list(sae.parameters())) if graphs else None
        self.in_flight: InFlight | None = None  # the last step queued, not read back yet
        # how many latents AuxK looks among in the next step queued: at least as many as are dead when it starts;
        # and, while no step is in flight, the same for the step after it
        self.dead_capacity, self.dead_capacity_after = self.dead_counts().tolist()

    def dead(self) -> torch.Tensor:
        """[n_latents] bool: the latents dead now, which the next step's AuxK trains."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def dead_counts(self) -> torch.Tensor:
        """[latents dead now, latents that one more batch without firing would leave dead], on the device."""
        return torch.stack([self.dead().sum(), self.may_die().sum()])

    def may_die(self) -> torch.Tensor:
        """[n_latents] bool: the latents that the next step leaves dead if they do not fire in it."""
        return self.tokens_since_fired + self.cfg.batch_size >= self.cfg.dead_tokens

    def load_state(self, optimizer_state: dict[int, dict], tokens_since_fired: torch.Tensor,
                   dead_capacities: list[int] | None):
        """Resume from a checkpoint's optimizer state, dead-latent counter and AuxK capacities (dead_capacities;
        None: counted from the counter) with no step in flight."""
        param_groups = self.optimizer.state_dict()["param_groups"]  # lr etc. come from the config, set every step
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
        for parameter, state in self.optimizer.state.items():
            for name, value in state.items():  # saved contiguous, but W_enc is column-major: the fused update walks
                if value.shape == parameter.shape:  # a parameter and its moments in memory order, so they must match
                    state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
        self.tokens_since_fired.copy_(tokens_since_fired)
        self.dead_capacity, self.dead_capacity_after = dead_capacities or self.dead_counts().tolist()

    def __call__(self, x: torch.Tensor, layer: torch.Tensor, lr: float) -> dict[str, float] | None:
        """Queue one optimizer step at learning rate lr on x: [batch, d_model] of layers layer: [batch] (this
        process's share of the batch); returns the step before's METRICS of the global batch and its lr (None if
        none is in flight), read back while this one runs."""
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if self.graphs is not None and len(x) == self.cfg.batch_size:  # an epoch's short last batch runs eagerly
            results = self.graphs(x, layer, graph_dead_capacity(self.dead_capacity, self.sae.cfg.n_latents))
        else:
            results = self.on_device(x, layer, self.dead_capacity)
        previous, self.in_flight = self.in_flight, InFlight(results, lr)
        if previous is None:
            self.dead_capacity = self.dead_capacity_after
            return None
        # waits for the step before only; the latents it left within a batch of dying bound those dead when the
        # next step starts (those it left dead, this step already trained)
        metrics, _, self.dead_capacity = previous.read()
        return metrics

    def drain(self) -> dict[str, float] | None:
        """Wait for the step in flight; returns its METRICS and lr (None if there is none)."""
        if self.in_flight is None:
            return None
        # the capacities stay the bounds a step read late gives: AuxK's shapes, and so the weights down to their
        # rounding, are then the same however often a run validates or saves
        metrics, _, self.dead_capacity_after = self.in_flight.read()
        self.in_flight = None
        return metrics

    def on_device(self, x: torch.Tensor, layer: torch.Tensor, dead_capacity: int) -> torch.Tensor | list[float]:
        """The step's work: [*METRICS, latents dead after it, latents it leaves within a batch of dying], queued
        without a read-back on a single process (a tensor), read back on several (a list). AuxK looks among
        dead_capacity latents, at least those dead now."""
        dead_mask = self.dead()
        with autocast(self.device):
            out = self.sae(x, layer, dead_mask, dead_capacity)
        dead_fraction = dead_mask.float().mean()  # of the latents AuxK trained this step
        if distributed.world_size() == 1:
            mse = (out.x_hat_normalized.float() - out.x_normalized.float()).pow(2).mean()
            loss = mse + self.cfg.auxk_alpha * out.auxk_loss
            metrics = torch.stack([loss, mse, out.auxk_loss, dead_fraction, *batch_metrics(x, out.x_hat, out.top_values)])
            n_rows = len(x)
        else:
            loss, metrics, n_rows = shared_loss(self.cfg, x, out, dead_fraction)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed.world_size() > 1:
            grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
            for grad, total in zip(grads, distributed.all_reduce_sum(grads)):  # sum of shares: the global gradient
                grad.copy_(total)
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.sae.set_decoder_norm_to_unit_norm()
        fired = torch.zeros_like(self.tokens_since_fired).index_add_(
            0, out.top_indices.flatten(), (out.top_values > 0).flatten().long()
        )
        (fired,) = distributed.all_reduce_sum([fired])
        self.tokens_since_fired.add_(n_rows).masked_fill_(fired > 0, 0)  # in place: a graph replays into it
        dead_counts = self.dead_counts()
        if torch.is_tensor(metrics):
            return torch.cat([metrics, dead_counts.to(metrics.dtype)])
        return [*metrics, *dead_counts.tolist()]


class InFlight:
    """A queued step's results on their way to the host: on CUDA copied to pinned memory right after the step, so
    that reading them waits for that step alone, not for the steps queued since (nor does a graph's next replay
    overwrite them first)."""

    def __init__(self, results: torch.Tensor | list[float], lr: float):
        self.lr, self.copied = lr, None
        self.source = results  # held until read: the copy may still read it
        if torch.is_tensor(results) and results.is_cuda:
            self.results = torch.empty(results.shape, dtype=results.dtype, pin_memory=True)
            self.results.copy_(results, non_blocking=True)  # on the current stream of results' device
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(results.device))
        else:
            self.results = results

    def read(self) -> tuple[dict[str, float], int, int]:
        """(the step's METRICS and lr, latents it left dead, latents it left within a batch of dying), once the step
        and the copy are done."""
        if self.copied is not None:
            self.copied.synchronize()
        *values, n_dead, may_die = self.results.tolist() if torch.is_tensor(self.results) else self.results
        return {**dict(zip(METRICS, values)), "lr": self.lr}, int(n_dead), int(may_die)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def shared_loss(cfg: "TrainConfig", x: torch.Tensor, out, dead_fraction: torch.Tensor) -> tuple[torch.Tensor, list[float], int]:
    """This process's share of the global batch's loss, so that summing gradients gives the global one.

    Returns (share with grad, global [loss, mse, auxk_loss, dead_fraction, mse_raw, fvu, l0], global rows). AuxK is a
    ratio over the whole batch, so its share is this process's numerator over the global denominator.
    """
    d_model = x.shape[1]
    squared_error = (out.x_hat_normalized.float() - out.x_normalized.float()).pow(2).sum()
    residual = (out.x_normalized - out.x_hat_normalized).detach().float().pow(2).sum()  # AuxK's denominator here
    with torch.no_grad():
        x64 = x.double()
        local = [len(x), squared_error, out.auxk_loss * residual, residual, (out.x_hat.double() - x64).pow(2).sum(),
                 x64.pow(2).sum(), (out.top_values > 0).sum()]
        sums = distributed.all_reduce_sum([torch.stack([torch.as_tensor(v, device=x.device).double() for v in local]), x64.sum(0)])
    n_rows, total_error, auxk_numerator, total_residual, raw_error, sum_sq, n_fired = sums[0].tolist()
    sum_x = sums[1]  # [d_model]
    loss = squared_error / (n_rows * d_model) + cfg.auxk_alpha * out.auxk_loss * residual / total_residual
    mse, auxk = total_error / (n_rows * d_model), auxk_numerator / total_residual
    fvu = raw_error / (sum_sq - sum_x.pow(2).sum().item() / n_rows) if n_rows > 1 else math.nan  # as batch_metrics
    values = [mse + cfg.auxk_alpha * auxk, mse, auxk, dead_fraction.item(), raw_error / (n_rows * d_model), fvu, n_fired / n_rows]
    return loss, values, int(n_rows)


def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor, top_values: torch.Tensor) -> list[torch.Tensor]:
    """[mse_raw, fvu, l0] of one batch, as 0-d tensors (no device sync)."""
    with torch.no_grad():
        squared_error = (x_hat.float() - x).pow(2)
        fvu = squared_error.sum() / (x - x.mean(0)).pow(2).sum() if len(x) > 1 else x.new_full((), math.nan)  # needs a variance
        return [squared_error.mean(), fvu, (top_values > 0).sum(1).float().mean()]
