"""Reading chosen rows of chosen hidden states out of a forward pass, and nothing more.

Hidden state h follows Hugging Face's `output_hidden_states` numbering: 0 is the embedding output,
h in 1..n_layers-1 the output of decoder layer h-1, and n_layers the output of the final norm
(Hugging Face returns the last state after the norm). The pass stops after the last state needed.
"""

from contextlib import contextmanager

import torch
from torch import nn

from pipeline.models import decoder_layers, embedding, final_norm


class _StopForward(Exception):
    """Raised from a hook once every needed state is captured: the rest of the model is skipped."""


def hidden_state_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is hidden state `layer` of a causal LM."""
    n_layers = len(decoder_layers(model))
    if layer == 0:
        return embedding(model)
    if layer == n_layers:
        return final_norm(model)
    return decoder_layers(model)[layer - 1]


def hidden_state_module_name(layer: int, n_layers: int) -> str:
    """The name of hidden_state_module(model, layer) among the causal LM's named_modules(), without loading it."""
    if layer == 0:
        return "model.embed_tokens"
    if layer == n_layers:
        return "model.norm"
    return f"model.layers.{layer - 1}"


def output_tensor(output) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(modules_and_hooks: list[tuple[nn.Module, callable]]):
    """Registers forward hooks for the duration of a block."""
    handles = [module.register_forward_hook(hook) for module, hook in modules_and_hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_rows(
    model: nn.Module,
    input_ids: torch.Tensor,  # [batch, seq]
    attention_mask: torch.Tensor,  # [batch, seq]
    selections: dict[int, tuple[torch.Tensor, torch.Tensor]],  # layer -> (batch_index [n], position [n])
) -> dict[int, torch.Tensor]:
    """Runs the model body up to the last selected layer; returns layer -> rows [n, d_model]."""
    captured: dict[int, torch.Tensor] = {}
    last = max(selections)

    def make_hook(layer: int):
        batch_index, position = selections[layer]

        def hook(module, args, output):
            captured[layer] = output_tensor(output)[batch_index, position]
            if layer == last:
                raise _StopForward

        return hook

    body = model.model
    with hooked([(hidden_state_module(model, layer), make_hook(layer)) for layer in selections]):
        try:
            body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return captured
