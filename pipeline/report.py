"""The static HTML report of `sae-features`: one self-contained file, charts inline (SVG) or as PNG data URIs."""

import base64
import io
import json
from html import escape
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: leaves the caller's plotting backend alone

from pipeline.errors import CrosscodersError
from pipeline.features import DENSE_FREQUENCY, Context, FeatureScan, LatentContexts, LogitEffects, breadth_summary, density_histogram
from pipeline.files import write_whole

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table.index { border-collapse: collapse; } .index td, .index th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #ddd; }
section.feature { border-top: 2px solid #888; margin-top: 2em; }
.ctx { font-family: ui-monospace, monospace; white-space: pre; overflow-x: auto; margin: 2px 0; }
.where { color: #888; display: inline-block; min-width: 16em; }
.act { border-radius: 3px; outline: 1px solid #e07000; }
.tok { font-family: ui-monospace, monospace; white-space: pre; background: #eef; border-radius: 3px; padding: 0 2px; margin-right: 4px; }
.chart { margin-right: 2em; }
.dense { color: #b60; } .muted { color: #888; }
"""


def png_data_uri(figure: Figure) -> str:
    """The figure as a base64 PNG data URI, so the report needs no other file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def density_figure(histogram: tuple[np.ndarray, np.ndarray, int]) -> str:
    """The density histogram of all alive latents, with the dense threshold marked."""
    counts, edges, n_dead = histogram
    figure = Figure(figsize=(8, 3))
    axes = figure.subplots()
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4477aa")
    axes.axvline(np.log10(DENSE_FREQUENCY), color="#b60", linestyle="--", linewidth=1, label="dense")
    axes.set(xlabel="log10 firing frequency", ylabel="latents", title=f"feature density ({n_dead:,} dead latents not shown)")
    axes.legend()
    return png_data_uri(figure)


def layers_figure(scan: FeatureScan) -> str:
    """Across the alive latents: how many layers each spreads over (FeatureScan.layer_breadth), and on which it peaks."""
    alive = ~scan.dead
    n_scanned = sum(scan.scanned_layers)
    figure = Figure(figsize=(12, 3))
    breadth_axes, peak_axes = figure.subplots(1, 2)
    breadth_axes.hist(scan.layer_breadth[alive].numpy(), bins=np.arange(1, n_scanned + 1.5, 0.5), color="#4477aa")
    breadth_axes.set(xlabel="effective number of layers it fires on", ylabel="latents", title="layer breadth of alive latents")
    peaks = scan.layer_frequency[alive].argmax(1).numpy()
    peak_axes.bar(np.arange(len(scan.scanned_layers)), np.bincount(peaks, minlength=len(scan.scanned_layers)), color="#4477aa")
    peak_axes.set(xlabel="hidden state", ylabel="latents", title="the layer each alive latent fires on most often")
    return png_data_uri(figure)


def bar_chart_svg(values: np.ndarray, title: str, labels: list[str], axis: tuple[str, str], highlight: int | None = None) -> str:
    """A small inline SVG bar chart (cheap enough for one per latent); each bar's label and value show on hover."""
    width, height, top = 360, 110, 18
    bar = width / len(values)
    scale = (height - top) / max(float(values.max()), 1e-12)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - v * scale:.1f}" width="{max(bar - 1, 0.5):.1f}" height="{v * scale:.1f}" '
        f'fill="{"#d33" if i == highlight else "#4477aa"}"><title>{escape(label)}: {v:.4g}</title></rect>'
        for i, (v, label) in enumerate(zip(values.tolist(), labels))
    )
    return (
        f'<svg class="chart" width="{width}" height="{height + 16}" role="img"><title>{escape(title)}</title>'
        f'<text x="0" y="12" font-size="12">{escape(title)}</text>{bars}'
        f'<text x="0" y="{height + 14}" font-size="10">{escape(axis[0])}</text>'
        f'<text x="{width}" y="{height + 14}" font-size="10" text-anchor="end">{escape(axis[1])}</text></svg>'
    )


def feature_charts(scan: FeatureScan, feature: int, histogram: tuple[np.ndarray, np.ndarray, int]) -> str:
    """Layer profile (firing rate among each layer's rows), the latent's activation histogram and the density histogram
    with the latent's bin in red."""
    rates = scan.layer_frequency[feature].numpy() * 100
    layers = [f"layer {layer} (%)" if scanned else f"layer {layer} (not scanned)" for layer, scanned in enumerate(scan.scanned_layers)]
    profile = bar_chart_svg(rates, "layer profile: % of each layer's rows", layers, ("layer 0", f"layer {len(rates) - 1}"))
    fired, bins = scan.activation_histogram(feature)
    title = f"activations (log scale), median about {scan.median_activation(feature):.3g}"
    activations = bar_chart_svg(fired, title, [f"activation {a:.3g} to {b:.3g} (rows)" for a, b in zip(bins[:-1], bins[1:])],
                                (f"{bins[0]:.3g}", f"{bins[-1]:.3g}"))
    counts, edges, _ = histogram
    frequency = float(scan.frequency[feature])
    where = int(np.clip(np.searchsorted(edges, np.log10(frequency), side="right") - 1, 0, len(counts) - 1)) if frequency > 0 else None
    labels = [f"frequency 10^{a:.2f} to 10^{b:.2f} (latents)" for a, b in zip(edges[:-1], edges[1:])]
    axis = (f"frequency 10^{edges[0]:.1f}", "1")
    return profile + activations + bar_chart_svg(counts, "density of all latents: this one in red", labels, axis, where)


def active_span(token: str, fraction: float, title: str) -> str:
    """A token in a span whose background grows with its activation (fraction of the largest shown), title on hover."""
    return (f'<span class="act" style="background: rgba(255, 120, 0, {0.15 + 0.85 * fraction:.2f})" '
            f'title="{escape(title)}">{escape(token)}</span>')


def context_html(context: Context, top_value: float) -> str:
    """One context on one line, the activating token in a span whose background grows with its activation."""
    before = escape("".join(context.tokens[: context.center]))
    after = escape("".join(context.tokens[context.center + 1 :]))
    active = active_span(context.tokens[context.center], context.value / top_value,
                         f"activation {context.value:.4g} at layer {context.layer}")
    where = f'<span class="where">{context.value:8.3f}  L{context.layer} doc {context.doc} pos {context.pos}</span>'
    return f'<div class="ctx">{where}{before}{active}{after}</div>'


def tokens_html(tokens: list[tuple[str, float]] | None, n: int | None = None) -> str:
    """Ranked tokens, each with its logit in its title; a note where the model did not load (None)."""
    if tokens is None:
        return '<span class="muted">model not loaded</span>'
    return "".join(f'<span class="tok" title="logit {value:+.3f}">{escape(text)}</span>' for text, value in tokens[:n])


def similar_html(similar: list[tuple[int, float]], reported: dict) -> str:
    """The latents of the closest decoder directions with their cosine, each linked to its section where the report has one."""
    latents = "  ".join((f'<a class="sim" href="#f{latent}">{latent}</a>' if latent in reported else str(latent)) + f" {cosine:+.3f}"
                        for latent, cosine in similar)
    return f'<h3>Similar decoder directions</h3><p><span class="muted">alive latents, cosine:</span> {latents}</p>'


def write_html_report(
    path: Path | str,
    scan: FeatureScan,
    contexts: dict[int, LatentContexts],
    effects: dict[int, LogitEffects | None],
    title: str,
    settings: dict,
    similar: dict[int, list[tuple[int, float]]] | None = None,
) -> Path:
    """Writes the report: summary, the settings that made it (`sae-features`' options, resolved), density histogram, an
    index of the latents in contexts, then a section per latent (with its similar latents where given)."""
    path = Path(path)
    histogram = density_histogram(scan)
    n_latents = len(scan.counts)
    rows, sections = [], []
    for feature, shown in contexts.items():
        if scan.dead[feature]:  # --feature may name one: no peak layer (argmax of zeros), no promoted tokens, no contexts
            rows.append(f'<tr><td><a href="#f{feature}">{feature}</a></td><td>dead</td><td>0</td><td>-</td><td>-</td><td></td></tr>')
            sections.append(f'<section class="feature" id="f{feature}"><h2>Feature {feature}</h2><p>dead: fires on none of '
                            f'the {scan.n_rows:,} {scan.split} rows scanned. <a href="#index">index</a></p></section>')
            continue
        frequency, layer, breadth = float(scan.frequency[feature]), scan.peak_layer(feature), float(scan.layer_breadth[feature])
        promoted, suppressed = effects[feature] or (None, None)
        density = f'<span class="dense">{frequency:.3%}</span>' if frequency > DENSE_FREQUENCY else f"{frequency:.3%}"
        rows.append(
            f'<tr><td><a href="#f{feature}">{feature}</a></td><td>{density}</td><td>{int(scan.counts[feature]):,}</td>'
            f"<td>{layer}</td><td>{breadth:.1f}</td><td>{tokens_html(promoted, 5)}</td></tr>"
        )
        top_value = max((c.value for c in shown.top), default=1.0)  # the sample's highlights on the same scale
        sampled = (f'<h3>Random activations</h3><p class="muted">{shown.sample_caption(int(scan.counts[feature]))}, largest first</p>'
                   f"{''.join(context_html(c, top_value) for c in shown.sampled)}") if shown.sampled else ""
        by_layer = (f'<h3>Top activations at each layer</h3><p class="muted">what it fires on most at each hidden state, layer '
                    f"by layer</p>{''.join(context_html(c, top_value) for c in shown.by_layer)}") if shown.by_layer else ""
        sections.append(
            f'<section class="feature" id="f{feature}"><h2>Feature {feature}</h2>'
            f"<p>fires on {int(scan.counts[feature]):,} of {scan.n_rows:,} rows ({density}); most often on layer {layer} "
            f"({float(scan.layer_frequency[feature, layer]):.3%} of its rows), spread over {breadth:.1f} of "
            f'{sum(scan.scanned_layers)} layers. <a href="#index">index</a></p>'
            f'<div class="charts">{feature_charts(scan, feature, histogram)}</div>'
            f"<h3>Promoted tokens (logit lens at layer {layer})</h3><p>{tokens_html(promoted)}</p>"
            f"<h3>Suppressed tokens</h3><p>{tokens_html(suppressed)}</p>"
            f"{similar_html(similar[feature], contexts) if similar else ''}"
            f"<h3>Top activations</h3>{''.join(context_html(c, top_value) for c in shown.top)}{sampled}{by_layer}</section>"
        )
    body = f"""<p>{escape(title)}: {scan.n_rows:,} {scan.split} rows scanned; {n_latents:,} latents, {int((~scan.dead).sum()):,} alive,
{int(scan.dead.sum()):,} dead (never fired), {int(scan.dense.sum()):,} dense (fire on more than {DENSE_FREQUENCY:.0%} of rows);
{escape(breadth_summary(scan))}, counting a layer by the latent's firing rate among its rows (the exp of that profile's entropy).</p>
{settings_html(settings)}
<img src="{density_figure(histogram)}" alt="density histogram">
<img src="{layers_figure(scan)}" alt="layer breadth and peak layers of the alive latents">
<h2 id="index">Reported latents</h2>
<table class="index"><tr><th>feature</th><th>density</th><th>rows</th><th>peak layer</th><th>layers</th><th>promoted tokens</th></tr>
{"".join(rows)}</table>
{"".join(sections)}
"""
    return write_page(path, "SAE features", title, STYLE, body)


def settings_html(settings: dict) -> str:
    """The settings that made a page (the command's options, resolved), folded under a summary."""
    return f'<details><summary>settings</summary><pre id="settings">{escape(json.dumps(settings, indent=2))}</pre></details>'


def write_page(path: Path, heading: str, title: str, style: str, body: str) -> Path:
    """Writes one self-contained HTML page, whole or not at all (a page there before stays whole): heading as its h1
    and, with title, its tab's name; the page is what --html names, so a failure says to pass another."""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}: {escape(title)}</title><style>{style}</style></head>
<body><h1>{heading}</h1>
{body}</body></html>
"""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    except OSError as error:  # a full disk
        raise CrosscodersError(f"cannot write {path} ({error.strerror or error}); free space or pass another --html") from None
    return path
