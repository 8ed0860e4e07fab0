"""`eval-sae --sae SWEEP`: every finished run of a sweep evaluated on the same documents, then side by side:
sweep_eval.json, each run's swept settings and metrics averaged over the hidden states, and frontier.png, FVU and the
CE loss not recovered against L0 (the sparsity-fidelity frontier), a line through the runs that differ in k alone."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from pipeline.cli import local_path
from pipeline.evaluate import EvalConfig, Evaluated, average, evaluate_runs, finished_runs, note_unfinished, write_record_and_plot
from pipeline.files import write_whole
from pipeline.layers import layer_ranges
from pipeline.train import TRAIN_CONFIG_FILE, read_json

SUMMARY_FILE, FRONTIER_FILE = "sweep_eval.json", "frontier.png"


@dataclass(frozen=True)
class SweepEval:
    """A sweep's evaluation: each run's, and the files that put them side by side."""

    runs: list[Evaluated]
    summary: Path  # sweep_eval.json
    frontier: Path  # frontier.png


def run_sweep_eval(config: EvalConfig, console: Console | None = None, progress: bool = True) -> SweepEval:
    """Evaluates every finished run of a sweep's folder (train-sae --sweep's --out) on the same documents, with the
    model's clean and ablated passes shared; each run's eval.json holds what evaluating it alone would write, in
    RUN/eval, or OUT/RUN with --out; sweep_eval.json and frontier.png go to the sweep's folder, or OUT."""
    console = console or Console(stderr=True)
    sweep = local_path(config.sae, "--sae")
    runs = finished_runs(sweep)
    note_unfinished(sweep, runs, console, ("evaluated", "evaluate"))
    out = local_path(config.out, "--out") if config.out else None
    train_configs = [read_json(run / TRAIN_CONFIG_FILE) for run in runs]  # a damaged one fails now, not after the passes
    evaluated = evaluate_runs([replace(config, sae=str(run), out=str(out / run.name) if out else None) for run in runs], console, progress)
    return SweepEval(evaluated, *write_sweep_summary(evaluated, train_configs, sweep, out or sweep))


def swept_settings(train_configs: list[dict]) -> list[dict]:
    """Each run's training settings that differ between the runs (what the sweep varied), in the configs' order."""
    keys = list(dict.fromkeys(key for config in train_configs for key in config))
    varied = [key for key in keys if len({json.dumps(config.get(key)) for config in train_configs}) > 1]
    return [{key: config.get(key) for key in varied} for config in train_configs]


def frontier_lines(runs: list[dict]) -> dict[str, list[dict]]:
    """sweep_eval.json's runs grouped by their swept settings other than k, a line each, each line's runs by L0."""
    lines = {}
    for run in runs:
        label = ", ".join(f"{key}={value}" for key, value in run["swept"].items() if key != "k") or "every run"
        lines.setdefault(label, []).append(run)
    return {label: sorted(line, key=lambda run: (run["average"]["l0"], run["run"])) for label, line in lines.items()}


def write_sweep_summary(evaluated: list[Evaluated], train_configs: list[dict], sweep: Path, out: Path) -> tuple[Path, Path]:
    """Writes sweep_eval.json and frontier.png into out; train_configs: each run's train_config.json."""
    runs = [{"run": Path(run.config.sae).name, "swept": swept, "sae": run.config.sae, "eval": str(run.eval_path),
             "average": average(run.results)} for run, swept in zip(evaluated, swept_settings(train_configs))]
    first = evaluated[0]
    summary = {"sweep": str(sweep), "model": first.config.model, "shards": first.config.shards,
               "layers": [r.layer for r in first.results], "n_tokens": first.results[0].n_tokens, "runs": runs}
    title = f"{sweep.name}: mean over hidden states {layer_ranges(summary['layers'])}"
    return write_record_and_plot(out, SUMMARY_FILE, summary, FRONTIER_FILE, lambda path: plot_frontier(runs, path, title))


def plot_frontier(runs: list[dict], path: Path, title: str):
    """FVU and the fraction of CE loss not recovered (vs zero ablation) against L0, one line per frontier_lines group,
    each point named by its run."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's plotting backend alone

    figure = Figure(figsize=(12, 5), layout="constrained")
    panels = figure.subplots(1, 2)
    l0s = sorted({run["average"]["l0"] for run in runs})
    for axes, metric, ylabel in ((panels[0], lambda a: a["fvu"], "FVU (fraction of variance unexplained)"),
                                 (panels[1], lambda a: 1 - a["recovered_loss"], "fraction of CE loss not recovered")):
        for label, line in frontier_lines(runs).items():
            l0 = [run["average"]["l0"] for run in line]
            values = [metric(run["average"]) for run in line]
            axes.plot(l0, values, "o-", label=label)
            for x, y, run in zip(l0, values, line):
                axes.annotate(run["run"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes.set_xscale("log", base=2)
        axes.set_xticks(l0s, [f"{l0:g}" for l0 in l0s])
        axes.minorticks_off()
        axes.set(xlabel="L0 (active latents per row)", ylabel=ylabel)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    write_whole(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
