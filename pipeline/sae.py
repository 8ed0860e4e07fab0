"""A layer-agnostic TopK sparse autoencoder: one dictionary for all layers, told the layer by an encoding."""

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.errors import CrosscodersError
from pipeline.files import write_whole
from pipeline.loader import LayerStats
from pipeline.sparse_topk import TORCH_KERNELS, SparseKernels, gather_pre_acts

LAYER_ENCODINGS = ("sinusoidal", "learned", "none")
DECODERS = ("dense", "sparse", "triton", "auto")
CONFIG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
CHECKPOINT = "checkpoint"  # a training run's folder of its latest checkpoint (pipeline/train.py)
CHECKPOINT_READ_ATTEMPTS = 3  # a reader of a running trainer's checkpoint/ may meet it between two renames
Selection = tuple[torch.Tensor, torch.Tensor]  # (values, indices) of chosen latents: [batch, m] each
# AuxK's choice: (values, positions: [batch, k_aux] into candidates: [dead_capacity] latent ids)
DeadSelection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# decoder="auto" picks the training step. On the CPU by density k / n_latents: from python -m bench.sae_step on 2 CPU
# cores (torch 2.13, d_model 1536, batch 1024, 5% of the latents dead), rows/s of train-sae's whole step:
#   expansion  k     density   dense / sparse
#   4          32    1/192     1,345 / 2,982
#   16         64    1/384       313 /   717
#   1          128   1/12      5,201 / 6,456
#   1          192   1/8       5,215 / 5,269
#   4          768   1/8       1,299 / 1,164
#   1          384   1/4       5,035 / 3,607
#   4          1536  1/4       1,303 /   685
# Dense pays for every latent in six products (AuxK's three more only for the dead ones); sparse pays for the k
# (and AuxK's k_aux) kept, gathered from memory at random. They cross between 1/12 and 1/8. On CUDA the dense step: on
# one H200 (torch 2.11, d_model 1536, batch 4096, bf16 autocast, 5% dead) it ran 955K and 347K rows/s at 4x/k32 and
# 16x/k64 (when AuxK still multiplied by every row of W_dec), against 191K and 75K for the sparse step and 602K and
# 236K with its Triton kernels (docs/BENCHMARKS.md), as the tensor cores make the products cheap.
SPARSE_UP_TO_DENSITY = 1 / 10


@dataclass(frozen=True)
class SAEConfig:
    """Shape and behaviour of one SAE; saved as cfg.json next to its weights."""

    d_model: int
    n_layers: int  # layer ids the SAE accepts lie in [0, n_layers)
    expansion: int = 4  # n_latents = expansion * d_model
    k: int = 32  # latents kept per row
    layer_encoding: str = "sinusoidal"  # added to the encoder input: "sinusoidal" | "learned" | "none"
    normalize: bool = True  # per-layer normalization from the loader's statistics
    # the training step: "dense" | "sparse" | "triton" (sparse, with Triton kernels on CUDA) | "auto" (dense on
    # CUDA, else by k / n_latents: see SPARSE_UP_TO_DENSITY)
    decoder: str = "auto"

    def __post_init__(self):
        if self.layer_encoding not in LAYER_ENCODINGS:
            raise CrosscodersError(f"layer_encoding={self.layer_encoding!r} is unknown; use one of {LAYER_ENCODINGS}")
        if self.decoder not in DECODERS:
            raise CrosscodersError(f"decoder={self.decoder!r} is unknown; use one of {DECODERS}")
        sizes = (self.d_model, self.n_layers, self.expansion, self.k)
        if not all(isinstance(size, int) and not isinstance(size, bool) for size in sizes):
            raise CrosscodersError(f"d_model, n_layers, expansion and k must be whole numbers, got {self}")
        if min(sizes) < 1:
            raise CrosscodersError(f"d_model, n_layers, expansion and k must be positive, got {self}")
        if self.k > self.n_latents:
            raise CrosscodersError(
                f"k={self.k} is larger than n_latents={self.n_latents} (expansion {self.expansion} x d_model "
                f"{self.d_model}); lower k or raise expansion"
            )

    @property
    def n_latents(self) -> int:
        return self.expansion * self.d_model

    def k_aux(self, n_dead: int) -> int:
        """Latents AuxK reconstructs from, of n_dead dead ones (or candidates): the top d_model/2, 0 when none."""
        return min(self.d_model // 2 or 1, n_dead)

    def sparse_step(self, device: torch.device) -> bool:
        """Whether, on device, everything after top-k touches only the kept latents: the decoder, and the encoder's
        backward."""
        if self.decoder == "auto":
            return device.type != "cuda" and self.k / self.n_latents <= SPARSE_UP_TO_DENSITY
        return self.decoder in ("sparse", "triton")


@dataclass(frozen=True)
class ForwardOutput:
    """Everything the trainer reads from one forward pass."""

    x_hat: torch.Tensor  # [batch, d_model] raw space
    x_hat_normalized: torch.Tensor  # [batch, d_model]
    x_normalized: torch.Tensor  # [batch, d_model]
    top_values: torch.Tensor  # [batch, k] ReLU'd, so zeros mark latents that did not fire
    top_indices: torch.Tensor  # [batch, k]
    auxk_loss: torch.Tensor  # [] zero when no latent is dead


def sinusoidal_encoding(n_layers: int, d_model: int) -> torch.Tensor:
    """Transformer positional encoding of each layer index: [n_layers, d_model], sin/cos at 10000^(-2i/d_model)."""
    angle = torch.arange(n_layers, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model
    )  # [n_layers, ceil(d_model / 2)]
    encoding = torch.zeros(n_layers, d_model, dtype=torch.float64)
    encoding[:, 0::2] = angle.sin()
    encoding[:, 1::2] = angle.cos()[:, : d_model // 2]
    return encoding.float()


def normalization_of(stats: LayerStats, n_layers: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (mean [n_layers, d_model], scale [n_layers]) so E||x_norm||^2 = d_model; unseen layers pass as is."""
    if stats.mean.shape != (n_layers, d_model):
        raise CrosscodersError(
            f"layer statistics have shape {tuple(stats.mean.shape)} but the SAE expects ({n_layers}, {d_model}); "
            "recompute the statistics for this cache"
        )
    mean = stats.mean.double()
    variance = stats.mean_sq_norm.double() - mean.pow(2).sum(1)  # E||x - mean||^2
    seen = (stats.count > 0) & (variance > 0)
    scale = torch.where(seen, (d_model / variance.clamp(min=1e-30)).sqrt(), 1.0)
    return torch.where(seen[:, None], mean, 0.0).float(), scale.float()


def decode_dense(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Reference decoder: scatter the k latents (values, indices: [batch, k]) into a dense code, times W_dec."""
    code = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter(1, indices, values)  # [batch, n_latents]
    return code @ W_dec  # [batch, d_model]


def sparse_kernels(decoder: str, device: torch.device) -> SparseKernels:
    """The products of the sparse step: Triton's for decoder="triton" on CUDA (or under Triton's CPU interpreter,
    TRITON_INTERPRET=1), else plain PyTorch's, which compute the same: a Triton-trained SAE runs on the CPU."""
    if decoder != "triton" or not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return TORCH_KERNELS
    try:
        from pipeline import triton_topk  # optional: Triton ships with CUDA builds of torch
    except ImportError:
        raise CrosscodersError("decoder='triton' needs the triton package: pip install triton, or use "
                               "decoder='sparse'") from None
    return triton_topk.KERNELS


def layer_ids(layer: torch.Tensor | np.ndarray | int, rows: torch.Tensor) -> torch.Tensor:
    """layer as int64 ids [batch] on rows' device: the store keeps them as int16; a notebook passes one int, or numpy."""
    layer = torch.as_tensor(layer, device=rows.device).long()
    return layer.expand(len(rows)) if layer.ndim == 0 else layer


class TopKSAE(nn.Module):
    """TopK SAE (Gao et al. 2024) on per-layer normalized activations, with the layer encoded in the encoder input."""

    def __init__(self, cfg: SAEConfig, stats: LayerStats | None = None):
        super().__init__()
        self.cfg, self.path = cfg, None  # path: the folder it was loaded from, for error messages
        W_dec = torch.randn(cfg.n_latents, cfg.d_model)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [d_model, n_latents], starts as the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(W_dec)  # [n_latents, d_model], unit-norm rows
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model))
        if cfg.layer_encoding == "sinusoidal":
            self.register_buffer("layer_embedding", sinusoidal_encoding(cfg.n_layers, cfg.d_model), persistent=False)
        elif cfg.layer_encoding == "learned":
            # starts as the sinusoidal encoding: from zero, Adam's steps of about lr leave it near zero for thousands of steps
            self.layer_embedding = nn.Parameter(sinusoidal_encoding(cfg.n_layers, cfg.d_model))
        else:
            self.layer_embedding = None
        if cfg.normalize and stats is not None:
            mean, scale = normalization_of(stats, cfg.n_layers, cfg.d_model)
        else:
            mean, scale = torch.zeros(cfg.n_layers, cfg.d_model), torch.ones(cfg.n_layers)
        self.register_buffer("norm_mean", mean)  # [n_layers, d_model]
        self.register_buffer("norm_scale", scale)  # [n_layers]

    @property
    def sparse_step(self) -> bool:
        """Whether this SAE's training step is the sparse one where its weights are now (SAEConfig.sparse_step)."""
        return self.cfg.sparse_step(self.W_dec.device)

    @property
    def kernels(self) -> SparseKernels:
        """The sparse step's products for where the weights are now."""
        return sparse_kernels(self.cfg.decoder, self.W_dec.device)

    def decode_latents(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(values, indices): [batch, m] -> values times their rows of W_dec, summed: [batch, d_model]."""
        if self.sparse_step:
            return self.kernels.decode(values, indices, self.W_dec)
        return decode_dense(values, indices, self.W_dec)

    def normalize(self, x: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Raw activations x: [batch, d_model] of layers layer: [batch] -> normalized space."""
        return (x - self.norm_mean[layer]) * self.norm_scale[layer, None]

    def denormalize(self, x_hat: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Normalized space -> raw activations, the inverse of normalize."""
        return x_hat / self.norm_scale[layer, None] + self.norm_mean[layer]

    def encoder_input(self, x_normalized: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies by W_enc: x_normalized - b_dec + the layer's encoding, [batch, d_model]."""
        x = x_normalized - self.b_dec
        return x if self.layer_embedding is None else x + self.layer_embedding[layer]

    def pre_acts(self, x_normalized: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """ReLU'd encoder outputs for every latent: [batch, n_latents]."""
        return self.pre_acts_of(self.encoder_input(x_normalized, layer))

    def pre_acts_of(self, x_in: torch.Tensor) -> torch.Tensor:
        """pre_acts from the encoder input x_in: [batch, d_model] -> [batch, n_latents]."""
        return F.relu(x_in @ self.W_enc + self.b_enc)

    def encode(self, x: torch.Tensor, layer: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw x: [batch, d_model] of layer: [batch] (or one int for all rows) -> (top_values, top_indices): [batch, k]."""
        layer = layer_ids(layer, x)
        return self.pre_acts(self.normalize(x, layer), layer).topk(self.cfg.k, sorted=False)

    def decode(self, top_values: torch.Tensor, top_indices: torch.Tensor, layer: torch.Tensor | int) -> torch.Tensor:
        """(top_values, top_indices): [batch, k] of layer: [batch] (or one int) -> raw reconstruction [batch, d_model]."""
        return self.denormalize(self.decode_latents(top_values, top_indices) + self.b_dec, layer_ids(layer, top_values))

    def forward(self, x: torch.Tensor, layer: torch.Tensor, dead_mask: torch.Tensor | None = None,
                dead_capacity: int | None = None) -> ForwardOutput:
        """Reconstruct raw x: [batch, d_model]; with dead_mask: [n_latents] bool, also the AuxK loss.

        dead_capacity: how many latents AuxK looks among, at least the number dead; None counts them, a read-back.
        A fixed capacity gives the step fixed shapes, which a CUDA graph needs; the live latents that fill it are
        never picked over a dead one and weigh 0 when picked, so the loss and gradients are the same.
        """
        layer = layer.long()
        x_normalized = self.normalize(x, layer)
        x_in = self.encoder_input(x_normalized, layer)
        if dead_mask is None:
            dead_capacity = 0
        elif dead_capacity is None:
            dead_capacity = int(dead_mask.sum())  # a shape: read back before the large GPU work is queued
        (top_values, top_indices), dead_top = self.top_latents(x_in, dead_mask, dead_capacity)
        x_hat_normalized = self.decode_latents(top_values, top_indices) + self.b_dec
        auxk_loss = self.auxk_loss(dead_top, x_normalized - x_hat_normalized, dead_mask)
        x_hat = self.denormalize(x_hat_normalized, layer)
        return ForwardOutput(x_hat, x_hat_normalized, x_normalized, top_values, top_indices, auxk_loss)

    def top_latents(self, x_in: torch.Tensor, dead_mask: torch.Tensor | None,
                    dead_capacity: int) -> tuple[Selection, DeadSelection | None]:
        """(values, indices) of the top k latents: [batch, k], and AuxK's top dead ones among dead_capacity
        candidates (None when the capacity is 0). The sparse step differentiates only these entries, not the dense
        pre-acts."""
        k_aux = self.cfg.k_aux(dead_capacity)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse_step):
            pre_acts = self.pre_acts_of(x_in)  # [batch, n_latents]: the one dense product
            top_values, top_indices = pre_acts.topk(self.cfg.k, sorted=False)
            if k_aux:  # top-k among the dead columns alone: a few percent of the latents, usually
                # the dead first, then live ones up to the capacity; no read-back, unlike nonzero()
                candidates = (~dead_mask).to(torch.uint8).argsort(stable=True)[:dead_capacity]
                live = ~dead_mask[candidates]
                # -1 ranks a live candidate below every ReLU'd dead one; clamped to 0, it adds nothing
                dead_values, positions = pre_acts[:, candidates].masked_fill(live, -1).topk(k_aux, sorted=False)
                dead_values = dead_values.clamp(min=0)
        if self.sparse_step:  # one backward over both selections
            selections = [(top_values, top_indices)] + ([(dead_values, candidates[positions])] if k_aux else [])
            sizes = [indices.shape[1] for _, indices in selections]
            values, indices = (torch.cat(parts, 1) for parts in zip(*selections))
            top_values, *dead = gather_pre_acts(x_in, self.W_enc, self.b_enc, indices, values, self.kernels).split(sizes, 1)
            dead_values = dead[0] if k_aux else None
        return (top_values, top_indices), (dead_values, positions, candidates) if k_aux else None

    def decode_dead(self, dead_top: DeadSelection) -> torch.Tensor:
        """AuxK's reconstruction [batch, d_model] from its top dead latents. The dense step multiplies by the
        candidates' rows of W_dec alone, a few percent of the decoder's product, in the forward and backward alike.
        (The sparse step gathers their rows: on 2 CPU cores these products in place of its gathers, the encoder's
        side included, ran at 0.86-1.13x its rate: docs/BENCHMARKS.md.)"""
        values, positions, candidates = dead_top
        if self.sparse_step:
            return self.kernels.decode(values, candidates[positions], self.W_dec)
        return decode_dense(values, positions, self.W_dec[candidates])

    def auxk_loss(self, dead_top: DeadSelection | None, residual: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """Gao et al. A.2: ||e - e_hat||^2 / ||e||^2, e_hat from dead_top, the top dead latents, so dead ones
        learn; 0 when none is dead (dead_top None, or candidates among which dead_mask marks none)."""
        if dead_top is None:
            return residual.new_zeros((), dtype=torch.float32)
        error = residual.detach().float()  # the main reconstruction is not pulled towards the dead latents
        error_hat = self.decode_dead(dead_top).float()
        # clamped: a process whose share of the batch is empty contributes 0, not 0 / 0
        loss = (error - error_hat).pow(2).sum() / error.pow(2).sum().clamp(min=torch.finfo(torch.float32).tiny)
        return loss * dead_mask.any()  # not the 1 of reconstructing from none; a device op, no read-back

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        """Keep decoder rows on the unit sphere, so latent activations carry the scale (after every step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        """Drop the part of W_dec's gradient that would only change row norms (before every step)."""
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)  # [n_latents, 1]
        self.W_dec.grad -= parallel * self.W_dec

    def check_compatible(self, d_model: int, n_layers: int):
        """Raise unless this SAE was trained on activations of this width and number of layers."""
        if (self.cfg.d_model, self.cfg.n_layers) != (d_model, n_layers):
            raise CrosscodersError(
                f"SAE at {self.path or '(not saved)'} was trained on d_model={self.cfg.d_model}, "
                f"n_layers={self.cfg.n_layers}; the model has d_model={d_model}, n_layers={n_layers}: "
                "use an SAE trained on this model's activations"
            )

    def check_normalized(self, layers: list[int]):
        """Raise unless the SAE has normalization statistics for each of these hidden states. Its training store held no
        rows of one without (mean 0, scale 1: normalization_of), so it would take that state's raw rows for normalized
        ones, and its reconstructions there would mean nothing. An SAE made without statistics has none to miss."""
        blank = ((self.norm_scale == 1) & (self.norm_mean == 0).all(1)).tolist()
        if not self.cfg.normalize or all(blank):
            return
        missing = [layer for layer in layers if blank[layer]]
        if missing:
            normalized = [layer for layer, is_blank in enumerate(blank) if not is_blank]
            raise CrosscodersError(f"SAE at {self.path or '(not saved)'} has no normalization statistics for hidden states "
                                   f"{missing} (its training store held none of their rows); use --layers among {normalized}, "
                                   "or train on a store that holds them")

    def save(self, folder: Path | str):
        """Write sae_weights.safetensors, then cfg.json (the SAELens layout) into folder, each whole or not at all:
        a crash while saving leaves the files before, never a torn SAE."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().float() if t.is_floating_point() else t.detach() for name, t in self.state_dict().items()}
        # float32 (docs/FORMAT.md), whatever the SAE's dtype
        write_whole(folder / WEIGHTS_FILE, lambda path: save_file({name: t.contiguous() for name, t in tensors.items()}, path))
        write_whole(folder / CONFIG_FILE, lambda path: path.write_text(json.dumps(asdict(self.cfg), indent=2)))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The float32 tensors of a weights file, read through one open file. safetensors' torch loader opens it, then torch
    opens it again by name, and a trainer swapping in a new checkpoint/ between the two made that a RuntimeError."""
    with safe_open(path, framework="numpy") as weights:
        return {name: torch.from_numpy(weights.get_tensor(name)) for name in weights.keys()}


def _not_an_sae(folder: Path, missing: str) -> str:
    """What folder is instead of an SAE, and what to pass: the usual mistakes named."""
    if folder.is_file():
        return f"it is a file; pass the folder holding it, {folder.parent}"
    if (folder / "zarr.json").is_file():
        return "it is an activation store (pass it as --shards); pass a training run or its checkpoint/"
    if (folder / CHECKPOINT / CONFIG_FILE).is_file():
        return f"the run has not finished; pass its checkpoint, {folder / CHECKPOINT}"
    runs = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []
    if runs:
        return f"it holds a sweep; pass one of its runs, e.g. {folder / runs[0]}"
    return f"{missing} is missing; pass a training run or its checkpoint/"


def load(path: Path | str, device: torch.device | str = "cpu") -> TopKSAE:
    """The SAE saved in path: a training run folder or its checkpoint/ folder."""
    folder = Path(path)
    attempts = CHECKPOINT_READ_ATTEMPTS if folder.name == CHECKPOINT else 1
    for attempt in range(attempts):  # a running trainer swaps in a new checkpoint/ at each save: read it once there
        try:
            return _load(folder, device)
        except CrosscodersError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


def _load(folder: Path, device: torch.device | str) -> TopKSAE:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CrosscodersError(f"no SAE at {folder}: {_not_an_sae(folder, name)}")
    try:
        cfg = SAEConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        weights = read_weights(folder / WEIGHTS_FILE)
    except FileNotFoundError as error:
        raise CrosscodersError(f"no SAE at {folder}: {error.filename} went away while it was read") from None
    except (ValueError, TypeError, SafetensorError, CrosscodersError) as error:
        raise CrosscodersError(f"SAE at {folder} is corrupt ({error}); retrain it or restore its files") from None
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, leaves the caller's RNG as it was
        sae = TopKSAE(cfg)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        raise CrosscodersError(
            f"SAE weights at {folder} do not match its cfg.json (expected {expected}, found {found}); "
            "the folder mixes files of different runs"
        )
    sae.load_state_dict(weights)
    sae.path = folder
    return sae.to(device).eval().requires_grad_(False)  # for analysis; a trainer that resumes it turns gradients on
