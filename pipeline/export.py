"""The layer-agnostic SAE at one hidden state, as a standard TopK SAE in SAELens's or sparsify's files.

At a fixed hidden state the normalization and the layer encoding are constants, so they fold into the biases: the
exported SAE computes relu(x @ W_enc + b_enc), keeps the top k, and decodes with the same unit-norm rows of W_dec plus
b_dec, on the model's raw activations. It keeps the same latents as the SAE on every row; its activations are the SAE's
divided by the hidden state's normalization scale (raw units, as those tools expect with unit-norm decoder rows).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.cli import local_path, option
from pipeline.errors import CrosscodersError
from pipeline.evaluate import check_output_folder, default_output
from pipeline.files import write_whole
from pipeline.hidden_states import hidden_state_module_name
from pipeline.layers import parse_layers
from pipeline.sae import TopKSAE, load
from pipeline.storage import Location
from pipeline.train import run_data, trained_layers
from pipeline.units import size_text

SAELENS_FORMAT = "6.0.0"  # SAELens reads a cfg.json naming no version of 6.0 or later as its older layout


@dataclass(frozen=True)
class ExportConfig:
    """Options of `export-sae`: which SAE, at which hidden states, in whose files."""

    sae: str = option("./runs/sae", "Training run folder (or its checkpoint/) holding the SAE.")
    layers: str = option("trained", "Hidden states to export, one SAE each: trained (those the SAE was trained on), all, "
                                    "0-24, or 4,8,12.")
    format: str = option("saelens", "saelens (SAE.load_from_disk; hook names of the Hugging Face model, as SAELens's "
                                    "HookedProxyLM names them) or sparsify (SparseCoder.load_many, hookpoints such as layers.11).")
    out: str | None = option(None, "Folder to write, one subfolder per hidden state named by its hook; default "
                                   "RUN/export-FORMAT (RUN/export-FORMAT-checkpoint for RUN/checkpoint).")

    def __post_init__(self):
        if self.format not in WRITERS:
            raise CrosscodersError(f"--format {self.format!r} is unknown; use one of {', '.join(WRITERS)}")


@dataclass(frozen=True)
class StandardTopK:
    """A TopK SAE on one hidden state's raw activations, float32: latents = top k of relu(x @ W_enc + b_enc),
    x_hat = latents @ W_dec + b_dec."""

    W_enc: torch.Tensor  # [d_model, n_latents]
    b_enc: torch.Tensor  # [n_latents]
    W_dec: torch.Tensor  # [n_latents, d_model]
    b_dec: torch.Tensor  # [d_model]
    k: int


@torch.no_grad()
def fold_layer(sae: TopKSAE, layer: int) -> StandardTopK:
    """The SAE at hidden state `layer`. With x_n = (x - mean) * scale, it computes relu((x_n - b_dec + encoding) @ W_enc
    + b_enc), and x_hat = (latents @ W_dec + b_dec) / scale + mean; dividing the latents by scale > 0 keeps the same top
    k and leaves W_enc and W_dec as they are. Folded in float64."""
    W_enc, b_enc, b_dec = (t.detach().cpu().double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    mean, scale = sae.norm_mean[layer].cpu().double(), float(sae.norm_scale[layer])
    encoding = sae.layer_embedding[layer].cpu().double() if sae.layer_embedding is not None else torch.zeros_like(b_dec)
    folded_b_enc = ((encoding - b_dec - scale * mean) @ W_enc + b_enc) / scale
    return StandardTopK(sae.W_enc.detach().float().cpu(), folded_b_enc.float(), sae.W_dec.detach().float().cpu(),
                        (b_dec / scale + mean).float(), sae.cfg.k)


def hook_name(layer: int, n_layers: int, format: str) -> str:
    """Where hidden state `layer` is read: the module whose output it is, named as SAELens's HookedProxyLM names a
    Hugging Face model's modules (model.layers.11), or as sparsify names its hookpoints, from the base model (layers.11)."""
    name = hidden_state_module_name(layer, n_layers)
    return name if format == "saelens" else name.removeprefix("model.")


def write_saelens(folder: Path, sae: StandardTopK, hook: str, provenance: dict):
    """cfg.json and sae_weights.safetensors as SAELens's TopKSAE saves them (architecture "topk"), b_dec not subtracted
    from the input; metadata names the model and hook as SAELens's HookedProxyLM does."""
    d_model, n_latents = sae.W_enc.shape
    metadata = {"sae_lens_version": SAELENS_FORMAT, "model_name": provenance["model_name"],
                "model_class_name": "AutoModelForCausalLM", "hook_name": hook, "prepend_bos": False,  # Qwen's tokenizer adds none
                "crosscoders": provenance}
    cfg = {"architecture": "topk", "d_in": d_model, "d_sae": n_latents, "k": sae.k, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False, "metadata": metadata}
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    _write(folder, "sae_weights.safetensors", weights, cfg)


def write_sparsify(folder: Path, sae: StandardTopK, hook: str, provenance: dict):
    """cfg.json and sae.safetensors as sparsify's SparseCoder saves them, in a folder named by the hookpoint as
    SparseCoder.load_many reads it, the provenance in the weights file's header (sparsify prints a cfg.json key it does
    not know). sparsify encodes x - b_dec, so b_dec @ W_enc is added to the encoder's bias."""
    d_model, n_latents = sae.W_enc.shape
    cfg = {"activation": "topk", "expansion_factor": n_latents // d_model, "normalize_decoder": True, "num_latents": n_latents,
           "k": sae.k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_model}
    bias = (sae.b_enc.double() + sae.b_dec.double() @ sae.W_enc.double()).float()
    weights = {"encoder.weight": sae.W_enc.T, "encoder.bias": bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    _write(folder, "sae.safetensors", weights, cfg, {"crosscoders": json.dumps({**provenance, "hookpoint": hook})})


WRITERS = {"saelens": write_saelens, "sparsify": write_sparsify}


def _write(folder: Path, weights_name: str, weights: dict[str, torch.Tensor], cfg: dict, header: dict[str, str] | None = None):
    """The weights (header: the safetensors file's metadata), then cfg.json, each whole (a loader finding cfg.json finds
    its weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in weights.items()}
    write_whole(folder / weights_name, lambda path: save_file(tensors, path, metadata=header))
    write_whole(folder / "cfg.json", lambda path: path.write_text(json.dumps(cfg, indent=2)))


def export_layers(config: ExportConfig) -> list[Path]:
    """`export-sae`: writes one standard TopK SAE per requested hidden state; returns their folders."""
    sae_dir = local_path(config.sae, "--sae")
    sae = load(sae_dir)
    data = run_data(sae_dir)
    spec = config.layers.strip()
    if spec == "trained" and data is not None:
        layers = trained_layers(data)
    else:
        layers = parse_layers("all" if spec == "trained" else spec, sae.cfg.n_layers)
    sae.check_normalized(layers)
    out = local_path(config.out, "--out") if config.out else default_output(sae_dir, f"export-{config.format}")
    check_output_folder(out, "--out")
    needed = len(layers) * sum(t.numel() * 4 for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))  # float32
    free = Location(out).free_bytes()
    if needed > free:
        raise CrosscodersError(f"{len(layers)} SAEs need {size_text(needed)} but {out} has {size_text(free)} free; export "
                               "fewer --layers or pass another --out")
    model = (data or {}).get("model", {})
    folders = []
    for layer in layers:
        hook = hook_name(layer, sae.cfg.n_layers - 1, config.format)
        provenance = {"sae": str(sae_dir), "hidden_state": layer, "model_name": model.get("name"),
                      "model_fingerprint": model.get("fingerprint"), "normalization_scale": float(sae.norm_scale[layer])}
        try:
            WRITERS[config.format](out / hook, fold_layer(sae, layer), hook, provenance)
        except OSError as error:  # a full disk: the files before stay whole
            raise CrosscodersError(f"cannot write {out / hook} ({error.strerror or error}); free space or pass another --out") from None
        folders.append(out / hook)
    return folders
