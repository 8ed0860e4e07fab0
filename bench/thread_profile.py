"""Where each thread's samples went, from a py-spy profile in raw (collapsed stacks) form, recorded with --threads.

Usage: py-spy record --threads --format raw -o PROFILE [--gil | --idle --subprocesses] -- python -m bench.cache_throughput ...
       python -m bench.thread_profile PROFILE [--top 12] [--within _cache]
With --gil py-spy samples only the thread holding the GIL, so each thread's share is its share of the GIL; with
--idle it samples waiting threads too, so a thread's waits (Queue.get, Event.wait) show as functions. Threads of a
pool are summed under its name without the number (compress_0 and compress_1 as compress), and with --subprocesses
the threads of the processes it started as "subprocess PID NAME" (cache-acts' corpus process on a GPU, and
multiprocessing's resource tracker); a function counts each
sample whose stack it is in (inclusive), and those in every sample of a thread (its entry calls) are left out. --within keeps the
samples whose stack passes through that function, or that come from a thread other than the main one (the import
of the libraries and the model's loading left out).
"""

import collections
import re

import typer
from rich.console import Console
from rich.table import Table

from bench.tables import add_row

THREAD = re.compile(r"thread \(\w+\)(?:: (?P<name>.+))?")
PLUMBING = {"Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "_worker", "_WorkItem.run", "<module>",
            "_run_module_as_main", "_run_code"}


def read_profile(path: str, within: str | None) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    """(samples per thread, inclusive samples per function of each thread)."""
    threads, functions = collections.Counter(), collections.defaultdict(collections.Counter)
    with open(path) as lines:
        for line in lines:
            stack, count = line.rstrip("\n").rsplit(" ", 1)
            frames = stack.split(";")
            at, match = next(((i, match) for i, match in enumerate(map(THREAD.fullmatch, frames)) if match), (None, None))
            if match is None:
                continue
            # with --subprocesses a stack starts with its process's ancestry ("process PID:COMMAND", a command may hold ";")
            processes = [frame.split(":")[0].removeprefix("process ") for frame in frames[:at] if frame.startswith("process ")]
            frames = frames[at:]
            thread = re.sub(r"_\d+$", "", match["name"] or "(unnamed)")
            if len(processes) > 1:  # a thread of a process the profiled one started
                thread = f"subprocess {processes[-1]} {thread}"
            names = list(dict.fromkeys(frame.split(" (")[0] for frame in frames[1:]))
            if within and thread == "MainThread" and within not in names:
                continue
            threads[thread] += int(count)
            functions[thread].update({name: int(count) for name in names if name not in PLUMBING})
    return threads, functions


def main(profile: str, top: int = typer.Option(12, help="Functions shown per thread."),
         within: str = typer.Option(None, help="Keep the main thread's samples that pass through this function.")):
    threads, functions = read_profile(profile, within)
    total = sum(threads.values())
    table = Table(title=f"{profile}: {total:,} samples" + (f", the main thread's within {within}" if within else ""))
    for column in ("thread", "samples", "share", "function", "function samples", "of thread"):
        table.add_column(column, justify="right")
    for thread, samples in threads.most_common():
        add_row(table, thread, f"{samples:,}", f"{samples / total:.1%}", "", "", "")
        shown = [(function, count) for function, count in functions[thread].most_common() if count < samples]
        for function, count in shown[:top]:  # each thread's entry calls, in every sample, left out
            add_row(table, thread, "", "", function, f"{count:,}", f"{count / samples:.1%}")
    Console(width=200).print(table)


if __name__ == "__main__":
    typer.run(main)
