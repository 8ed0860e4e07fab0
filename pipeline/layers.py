"""The --layers syntax: which hidden states a command reads (0 = the embeddings)."""

from pipeline.errors import CrosscodersError


def parse_layers(spec: str, n_hidden_states: int) -> list[int]:
    """'all', '0-28', '4,8,12' or '0-8,20' -> sorted layer ids, each checked against the model."""
    if spec.strip() == "all":
        return list(range(n_hidden_states))
    ranges = [_layer_range(part.strip(), spec) for part in spec.split(",")]
    # checked before any range is listed: a typo such as 0-10000000000 would fill the memory
    out_of_range = [max(layers.start, n_hidden_states) for layers in ranges if layers.stop > n_hidden_states]
    if out_of_range:
        raise CrosscodersError(f"--layers {spec!r}: layer {min(out_of_range)} is out of range; the model has {n_hidden_states} "
                               f"hidden states (0..{n_hidden_states - 1})")
    return sorted({layer for layers in ranges for layer in layers})


def layer_ranges(layers: list[int]) -> str:
    """[4, 5, 6, 9] -> '4-6,9': sorted layer ids in the --layers syntax (parse_layers' inverse), as a title shows them."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def _layer_range(part: str, spec: str) -> range:
    """'4' or '0-28' (one item of --layers) -> its layers."""
    first, dash, last = part.partition("-")
    try:
        first, last = int(first), int(last if dash else first)
    except ValueError:
        raise CrosscodersError(f"--layers {spec!r}: {part!r} is not a layer list; write e.g. all, 0-28 or 4,8,12") from None
    if first > last:
        raise CrosscodersError(f"--layers {spec!r}: range {part!r} is empty; write the lower layer first ({last}-{first})")
    return range(first, last + 1)


def stored_layers(spec: str, store_layers: list[int], n_hidden_states: int) -> list[int]:
    """'all' (every layer the store holds) or a layer list of parse_layers, each checked to be in the store."""
    if spec.strip() == "all":
        return list(store_layers)
    layers = parse_layers(spec, n_hidden_states)
    uncached = [layer for layer in layers if layer not in store_layers]
    if uncached:
        raise CrosscodersError(f"--layers {spec!r}: the store was not cached at hidden state {uncached[0]}; pick from {store_layers}")
    return layers
