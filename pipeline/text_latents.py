"""The latents an SAE fires on a text of one's own (`sae-features --text`): the model run over it, each recorded
position's hidden states encoded, shown token by token or, for one latent, token by token at each hidden state."""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.cli import local_path
from pipeline.corpus import SYSTEM_PROMPT, Document, chat_messages, tokenize_document
from pipeline.devices import resolve_device, resolve_model_dtype
from pipeline.errors import CrosscodersError
from pipeline.evaluate import load_model_of_store, sweep_runs
from pipeline.features import FeaturesConfig, OpenedRun, highlighted, html_path, open_run
from pipeline.hidden_states import capture_rows
from pipeline.layers import layer_ranges
from pipeline.models import LoadedModel
from pipeline.positions import SkippedPositions
from pipeline.sae import TopKSAE
from pipeline.token_text import token_texts


@dataclass(frozen=True)
class TextLatents:
    """The SAE's top-k latents on each token of a text at each hidden state; positions the store does not record (the
    first, special tokens, the chat template's shared start) are not encoded: index -1, value 0."""

    token_ids: list[int]
    tokens: list[str]  # each token's text, as token_texts shows it
    recorded: list[bool]  # [seq] whether the store records this position, so the SAE was trained on its like
    layers: list[int]  # the hidden states encoded
    values: torch.Tensor  # [len(layers), seq, k] float32 activations (0: not firing)
    indices: torch.Tensor  # [len(layers), seq, k] int64 latent ids

    def activations(self, feature: int) -> torch.Tensor:
        """[len(layers), seq] the latent's activation on each token at each hidden state (0 where it is not in the top k)."""
        return torch.where(self.indices == feature, self.values, 0).sum(-1)

    def strongest(self, position: int, n: int) -> list[tuple[int, float, list[int]]]:
        """The n latents firing most on the token at position, over the hidden states: (latent, its largest activation,
        the hidden states it fires at), largest first; of equal ones, the lower latent first."""
        values, indices = self.values[:, position].numpy(), self.indices[:, position].numpy()  # [layers, k]
        at_layer, slot = np.nonzero(values > 0)
        latents, group = np.unique(indices[at_layer, slot], return_inverse=True)
        largest = np.zeros(len(latents), dtype=values.dtype)
        np.maximum.at(largest, group, values[at_layer, slot])
        return [(int(latents[i]), float(largest[i]), [self.layers[j] for j in np.unique(at_layer[group == i])])
                for i in np.lexsort((latents, -largest))[:n]]

    def strongest_latents(self, n: int) -> list[int]:
        """The n latents of largest activation anywhere on the text, largest first; of equal ones, the lower first."""
        firing = self.values > 0
        latents, values = self.indices[firing], self.values[firing]
        if not len(latents):
            return []
        best = torch.zeros(int(latents.max()) + 1).scatter_reduce(0, latents, values, "amax")
        return sorted(torch.unique(latents).tolist(), key=lambda latent: (-float(best[latent]), latent))[:n]


@torch.no_grad()
def text_latents(loaded: LoadedModel, sae: TopKSAE, skipped: SkippedPositions, text: str, layers: list[int],
                 prompt: str | None = None, system_prompt: str = SYSTEM_PROMPT) -> TextLatents:
    """Runs the model over text and encodes each recorded position's hidden state at each of layers. The text is taken as
    given, or with a prompt, as the assistant's answer to it after system_prompt, in the model's chat template."""
    if not text.strip():
        raise CrosscodersError("--text is empty; pass the text whose latents to show, e.g. --text 'def add(a, b):'")
    tokenizer, model = loaded.tokenizer, loaded.model
    if prompt is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif not tokenizer.chat_template:
        raise CrosscodersError(f"model {loaded.info.name} has no chat template to put --prompt and --text in; drop --prompt")
    else:  # as cache-acts tokenizes a corpus's chat documents
        ids = tokenize_document(Document(0, chat_messages(system_prompt, prompt, text), None), tokenizer, sys.maxsize)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) > limit:
        raise CrosscodersError(f"--text is {len(ids):,} tokens, over the model's {limit:,}; shorten it")
    recorded = ~skipped.mask(np.asarray(ids, dtype=np.int64))
    if not recorded.any():
        raise CrosscodersError("--text has no position the store records (it records neither the first position, nor special "
                               "tokens, nor the chat template's shared start); pass a longer text")
    device = next(model.parameters()).device
    kept = torch.from_numpy(np.flatnonzero(recorded))
    positions = kept.to(device)
    input_ids = torch.tensor([ids], device=device)
    selections = {layer: (torch.zeros_like(positions), positions) for layer in layers}
    captured = capture_rows(model, input_ids, torch.ones_like(input_ids), selections)
    k = sae.cfg.k
    values = torch.zeros(len(layers), len(ids), k)
    indices = torch.full((len(layers), len(ids), k), -1, dtype=torch.int64)
    sae_device, sae_dtype = sae.W_enc.device, sae.W_enc.dtype
    for i, layer in enumerate(layers):
        top_values, top_indices = sae.encode(captured[layer].to(sae_device, sae_dtype), layer)
        values[i, kept] = top_values.float().cpu()
        indices[i, kept] = top_indices.cpu()
    return TextLatents(ids, token_texts(tokenizer, ids), recorded.tolist(), layers, values, indices)


def print_text_latents(console: Console, found: TextLatents, n: int):
    """One row per token: the n latents that fire most on it, with their largest activation and where they fire."""
    table = Table(title=f"the latents firing most on each token, over hidden states {layer_ranges(found.layers)}",
                  box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("pos", justify="right")
    table.add_column("token")
    table.add_column("latent activation (hidden states it fires at)")
    for position, (token, recorded) in enumerate(zip(found.tokens, found.recorded)):
        if not recorded:
            cell = Text("not recorded by the store, not encoded", style="dim")
        else:
            cell = Text("  ".join(f"{latent} {value:.2f} ({layer_ranges(where)})" for latent, value, where in found.strongest(position, n))
                        or "none fires")
        table.add_row(str(position), Text(f"'{token}'"), cell)  # quoted: a token of spaces is seen
    console.print(table)


def print_text_feature(console: Console, found: TextLatents, feature: int):
    """The latent's activation on each token, one line per hidden state, highlighted relative to its largest."""
    acts = found.activations(feature)
    top = float(acts.max())
    if top <= 0:
        console.print(f"feature {feature} fires on no token of the text at hidden states {layer_ranges(found.layers)}")
        return
    layer_index, position = divmod(int(acts.argmax()), acts.shape[1])
    console.print(Text(f"feature {feature} on the text: largest {top:.3f} at hidden state {found.layers[layer_index]} on "
                       f"'{found.tokens[position]}' (pos {position}); fires on {int((acts > 0).sum()):,} of "
                       f"{sum(found.recorded) * len(found.layers):,} (token, hidden state) pairs"))
    for i, layer in enumerate(found.layers):
        line = Text.assemble((f"L{layer:<3d} ", "dim"))  # the tokens not recorded alone dim
        for token, value, recorded in zip(found.tokens, acts[i].tolist(), found.recorded):
            if value > 0:
                line.append_text(highlighted(console, token, value / top))
            else:
                line.append(token, style=None if recorded else "dim")
        console.print(line)


def text_of(cfg: FeaturesConfig) -> str:
    """--text, or the UTF-8 text of the file --text-file names (-: standard input), as it is."""
    if cfg.text_file is None:
        return cfg.text
    if cfg.text_file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = local_path(cfg.text_file, "--text-file").read_bytes()
        except OSError as error:
            raise CrosscodersError(f"cannot read --text-file {cfg.text_file} ({error.strerror or error}); pass a text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CrosscodersError(f"--text-file {cfg.text_file} is not UTF-8 text (byte {error.start:,} is not); convert it, e.g. with "
                               "iconv -t utf-8") from None
    if not text.strip():
        raise CrosscodersError(f"--text-file {cfg.text_file} is empty; pass a file with the text whose latents to show")
    return text


def explore_text(cfg: FeaturesConfig, console: Console) -> TextLatents:
    """`sae-features --text`: the run's SAE on the text at --layers, printed; the store is read for its metadata alone."""
    text = text_of(cfg)
    folder = local_path(cfg.sae, "--sae")
    runs = sweep_runs(folder)
    if runs:
        raise CrosscodersError(f"--text reads one SAE, and {folder} holds a sweep; pass one of its runs, e.g. --sae {runs[0]}")
    path = html_path(cfg.html, Path("text.html")) if cfg.html is not None else None
    device = resolve_device(cfg.device)
    run = open_run(cfg, folder, device)
    store = run.store
    loaded = load_model_of_store(store, cfg.model, device, resolve_model_dtype("auto", device, store.metadata.get("model_dtype")))
    system_prompt = store.metadata.get("corpus", {}).get("system_prompt") or SYSTEM_PROMPT  # a store recording none: the default
    found = text_latents(loaded, run.sae, SkippedPositions.from_dict(store.metadata["skipped"]), text, run.layers, cfg.prompt,
                         system_prompt)
    if cfg.feature is None:
        print_text_latents(console, found, cfg.top)
    else:
        print_text_feature(console, found, cfg.feature)
    if path is not None:
        write_text_page(cfg, run, found, path)
        console.print(Text(f"wrote {path}"))
    return found


def write_text_page(cfg: FeaturesConfig, run: OpenedRun, found: TextLatents, path: Path) -> Path:
    """The HTML page of the text's latents (text_report), the settings that made it at its top."""
    from pipeline.text_report import write_text_report  # here, not at the top: text_report builds on this module

    settings = {**asdict(cfg), "sae": str(run.folder), "shards": run.store.url, "html": str(path), "layers": run.layers}
    return write_text_report(path, found, cfg.feature, cfg.top, f"{run.folder} on a text", settings)
