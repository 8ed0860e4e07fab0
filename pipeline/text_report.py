"""The HTML page of `sae-features --text ... --html`: the text, each token's strongest latents on hover, then the latents
firing most on it (or --feature's), each over the text with its largest activation at each hidden state."""

from html import escape
from pathlib import Path

from pipeline.layers import layer_ranges
from pipeline.report import STYLE, active_span, bar_chart_svg, settings_html, write_page
from pipeline.text_latents import TextLatents

TEXT_STYLE = """
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; border: 1px solid #ddd; padding: 0.5em; }
.text span[title]:hover { outline: 1px solid #555; cursor: help; }
"""


def with_breaks(token: str) -> str:
    """The token as shown, a line break after each newline symbol, so the text keeps its lines."""
    return token.replace("⏎", "⏎\n")


def text_html(found: TextLatents, n: int) -> str:
    """The whole text, each token's n strongest latents (activation, hidden states) in its title."""
    spans = []
    for position, (token, recorded) in enumerate(zip(found.tokens, found.recorded)):
        if not recorded:
            spans.append(f'<span class="muted" title="pos {position}: not recorded by the store, not encoded">'
                         f"{escape(with_breaks(token))}</span>")
            continue
        strongest = "; ".join(f"{latent} {value:.2f} ({layer_ranges(where)})" for latent, value, where in found.strongest(position, n))
        title = f"pos {position}: {strongest or 'none fires'}"
        spans.append(f'<span title="{escape(title)}">{escape(with_breaks(token))}</span>')
    return f'<div class="text">{"".join(spans)}</div>'


def latent_section(found: TextLatents, latent: int) -> tuple[str, str]:
    """The latent's row of the index and its section: its largest activation at each hidden state (a chart), and the text,
    each token highlighted by its largest activation over the hidden states, every hidden state's in its title."""
    acts = found.activations(latent)  # [layers, seq]
    top = float(acts.max())
    if top <= 0:
        return "", (f'<section class="feature" id="f{latent}"><h2>Feature {latent}</h2><p>fires on no token of the text at '
                    f"hidden states {layer_ranges(found.layers)}.</p></section>")
    layer_index, position = divmod(int(acts.argmax()), acts.shape[1])
    peak = acts.max(0).values  # [seq] over the hidden states
    spans = []
    for p, (token, value, recorded, by_layer) in enumerate(zip(found.tokens, peak.tolist(), found.recorded, acts.T.tolist())):
        if value > 0:
            at = [(layer, v) for layer, v in zip(found.layers, by_layer) if v > 0]
            title = (f"pos {p}: {value:.3f}, at hidden states {layer_ranges([layer for layer, _ in at])}: "
                     + ", ".join(f"L{layer} {v:.3f}" for layer, v in at))
            spans.append(active_span(with_breaks(token), value / top, title))
        else:
            spans.append(escape(with_breaks(token)) if recorded else f'<span class="muted">{escape(with_breaks(token))}</span>')
    fired_at = [layer for i, layer in enumerate(found.layers) if acts[i].max() > 0]
    n_tokens = int((peak > 0).sum())
    chart = bar_chart_svg(acts.max(1).values.numpy(), "its largest activation on the text at each hidden state",
                          [f"hidden state {layer}" for layer in found.layers],
                          (f"hidden state {found.layers[0]}", f"hidden state {found.layers[-1]}"), layer_index)
    where = f"'{found.tokens[position]}' (pos {position})"
    row = (f'<tr><td><a href="#f{latent}">{latent}</a></td><td>{top:.3f}</td><td>{found.layers[layer_index]}</td>'
           f"<td>{escape(where)}</td><td>{n_tokens:,}</td><td>{layer_ranges(fired_at)}</td></tr>")
    section = (f'<section class="feature" id="f{latent}"><h2>Feature {latent}</h2>'
               f"<p>largest {top:.3f} at hidden state {found.layers[layer_index]} on {escape(where)}; fires on {n_tokens:,} "
               f"of {sum(found.recorded):,} tokens, at hidden states {layer_ranges(fired_at)}. "
               f'<a href="#index">index</a></p><div class="charts">{chart}</div>'
               f'<div class="text">{"".join(spans)}</div></section>')
    return row, section


def write_text_report(path: Path | str, found: TextLatents, feature: int | None, n: int, title: str, settings: dict) -> Path:
    """Writes the page: the text with each token's n strongest latents on hover, then --feature's section, or those of the
    n latents firing most on the text."""
    path = Path(path)
    latents = [feature] if feature is not None else found.strongest_latents(n)
    rows, sections = zip(*(latent_section(found, latent) for latent in latents)) if latents else ((), ())
    shown = "--feature's latent" if feature is not None else f"the {len(latents)} latents of largest activation on the text"
    body = f"""<p>{escape(title)}: {len(found.tokens):,} tokens, {sum(found.recorded):,} of them recorded by the store and encoded at hidden
states {layer_ranges(found.layers)}; the others (the first, special tokens, the chat template's shared start) in grey.</p>
{settings_html(settings)}
<h2>The text</h2><p class="muted">each token's {n} strongest latents on hover: latent, largest activation, the hidden states it
fires at</p>
{text_html(found, n)}
<h2 id="index">Latents shown</h2><p class="muted">{shown}</p>
<table class="index"><tr><th>feature</th><th>largest</th><th>at hidden state</th><th>on token</th><th>tokens</th><th>hidden states</th></tr>
{"".join(rows)}</table>
{"".join(sections)}
"""
    return write_page(path, "SAE latents on a text", title, STYLE + TEXT_STYLE, body)
