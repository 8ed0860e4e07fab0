"""Command lines built from config dataclasses: one option per field, same name, same help text.

A field declares its help (and, optionally, a parser for what users type) with `option(...)`.
User errors (CrosscodersError) are printed as one red line and exit with status 2. Ctrl-C and SIGTERM (a scheduler
stopping or preempting the job) stop a command alike: one plain line, saying what the stage kept (Interrupted) where it
says, and the status a shell gives a process the signal killed, 130 or 143.
"""

import dataclasses
import inspect
import os
import signal
import sys
import threading
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.text import Text

from pipeline.errors import CrosscodersError, first_stop, out_of_memory, stopping_signals_handled_by

FINALIZER_RETRY_S = 0.05  # a signal that lands in a finalizer is sent again this much later


def option(default: Any, help: str, parse: Callable[[str], Any] | None = None, cli_type: type | None = None):
    """A dataclass field that is also a CLI option; `parse` turns the typed text into the value."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "cli_type": cli_type})


def _cli_annotation(field: dataclasses.Field) -> Any:
    if field.metadata.get("cli_type") is not None:
        return field.metadata["cli_type"]
    annotation = field.type
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return typing.Optional[inner[0]]
    if typing.get_origin(annotation) in (tuple, list):
        return list[typing.get_args(annotation)[0]]
    return annotation


def _parameter(field: dataclasses.Field) -> inspect.Parameter:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(default, tuple):
        default = list(default)
    flag = "--" + field.name.replace("_", "-")
    annotation = _cli_annotation(field)
    if annotation in (bool, typing.Optional[bool]):  # a flag pair; an Optional one is None unless given
        flag = f"{flag}/--no-{field.name.replace('_', '-')}"
    return inspect.Parameter(
        field.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(default, flag, help=field.metadata.get("help", "")),
        annotation=annotation,
    )


def extra_option(name: str, default: Any, help: str, annotation: Any) -> inspect.Parameter:
    """A CLI option that belongs to no config (where a run goes, whether it resumes, ...)."""
    flag = "--" + name.replace("_", "-")
    flags = (f"{flag}/--no-{name}",) if annotation is bool else (flag,)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, *flags, help=help), annotation=annotation)


def build_config(cls, values: dict[str, Any]):
    """A config from CLI values: typed text goes through each field's parser."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value, parse = values[field.name], field.metadata.get("parse")
        if parse is not None and value is not None and not isinstance(value, bool):
            value = parse(value) if not isinstance(value, list) else [parse(v) for v in value]
        if isinstance(value, list) and typing.get_origin(field.type) is tuple:
            value = tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def config_command(app: typer.Typer, config_classes: list[type], run: Callable, extra: list[inspect.Parameter] = (), help: str = "",
                   memory_advice: str = "free memory or use another --device"):
    """Registers `run(configs..., **extra)` as the app's command with one option per config field; memory_advice ends
    the one line an allocation that failed gives, where the stage did not say itself what to do."""
    config_fields = [f for cls in config_classes for f in dataclasses.fields(cls) if "help" in f.metadata]
    names = [f.name for f in config_fields]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RuntimeError(f"config fields share CLI names: {duplicates}")

    def command(**values):
        stopped_by = [signal.SIGINT]
        retry = SignalRetry()

        def stop(signum, frame):
            stopped_by[0] = signum
            if in_finalizer(frame):  # Python prints and drops an exception raised there: the command would go on
                retry.schedule(signum)
                return
            raise KeyboardInterrupt

        with stopping_signals_handled_by(stop):
            try:
                for name, value in values.items():
                    if isinstance(value, str) and value.startswith("memory://"):
                        raise CrosscodersError(f"--{name.replace('_', '-')} {value}: a memory:// store ends with the command "
                                               "that made it, so no other command finds it; pass a folder (memory:// is "
                                               "for the Python API)")
                configs = [build_config(cls, values) for cls in config_classes]
                run(*configs, **{p.name: values[p.name] for p in extra})
            except CrosscodersError as error:
                print_error(error)
                raise typer.Exit(2) from None
            except (RuntimeError, MemoryError) as error:  # a stage that knows what it kept says so itself, as CrosscodersError
                if (memory := out_of_memory(error)) is None:
                    raise
                print_error(CrosscodersError(f"out of memory ({memory}); {memory_advice}"))
                raise typer.Exit(2) from None
            except KeyboardInterrupt as interrupted:  # Interrupted says what the stage kept
                if isinstance(stop := first_stop(interrupted), CrosscodersError):
                    print_error(stop)
                    raise typer.Exit(2) from None
                Console(stderr=True).print(Text(printable(str(stop)) or "interrupted"), highlight=False, soft_wrap=True)
                raise typer.Exit(128 + stopped_by[0]) from None
            finally:
                retry.end()  # before the handlers go back: a retry must not reach the caller's

    command.__signature__ = inspect.Signature([_parameter(f) for f in config_fields] + list(extra))
    command.__doc__ = help
    app.command()(command)
    return command


class SignalRetry:
    """Sends a signal that landed in a finalizer again, FINALIZER_RETRY_S later, while the command runs: one pending
    retry at a time, none once the command has ended."""

    def __init__(self):
        self.lock, self.pending, self.ended = threading.Lock(), None, False

    def schedule(self, signum: int):
        with self.lock:
            if self.pending is None and not self.ended:
                self.pending = threading.Timer(FINALIZER_RETRY_S, self._send, (signum,))
                self.pending.daemon = True
                self.pending.start()

    def _send(self, signum: int):
        with self.lock:
            self.pending = None
            if self.ended:
                return
        os.kill(os.getpid(), signum)

    def end(self):
        with self.lock:
            self.ended = True
            if self.pending is not None:
                self.pending.cancel()


def in_finalizer(frame: types.FrameType | None) -> bool:
    """Whether the code a signal interrupted runs inside a __del__ method, where an exception would be dropped."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def local_path(text: str, option: str) -> Path:
    """A file or folder option as an absolute local path, ~ expanded (a run records it, to be found from any folder);
    a URL is refused in one line, as only stores may live on other file systems."""
    if "://" in text:
        raise CrosscodersError(f"{option} {text} must be a local path; only stores (--shards, cache-acts --out) may be URLs")
    path = Path(text).expanduser().absolute()
    if ".." not in path.parts:
        return path
    # ".." as the file system reads it, after the links before it (os.path.abspath, which tempfile uses, cuts it as text)
    followed = len(path.parts) - path.parts[::-1].index("..")
    try:
        return Path(*path.parts[:followed]).resolve(strict=True).joinpath(*path.parts[followed:])
    except OSError as error:
        raise CrosscodersError(f"{option} {text}: {Path(*path.parts[:followed])} cannot be followed ({error.strerror}); "
                               "pass a path that exists up to its last ..") from None


def print_error(error: CrosscodersError) -> None:
    """One red line on stderr; the message is text: its brackets are no markup, its :codes: no emoji."""
    Console(stderr=True).print(Text("error:", style="bold red"), Text(printable(str(error))), highlight=False, soft_wrap=True)


def print_note(message: str, console: Console | None = None) -> None:
    """"note: message" in one line (stderr, unless another console is given), as text, as print_error prints errors."""
    console = console or Console(stderr=True)
    console.print(Text.assemble(("note:", "yellow"), " ", printable(message)), highlight=False, soft_wrap=True)


def printable(text: str) -> str:
    """text with control and invisible characters as escapes (\\x1b, \\u202e): from a shared store, run or dataset,
    they could move the cursor, recolour or hide what the terminal shows."""
    return "".join(char if char.isprintable() or unicodedata.category(char) == "Zs" else char.encode("unicode_escape").decode("ascii")
                   for char in text)  # spaces of every width stay, to be copied: a folder may be named with U+3000


# click's base of its usage errors: typer from 0.23 on brings its own copy of click, older ones use click itself
CLICK_ERROR = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")


def run_app(app: typer.Typer) -> None:
    """Entry point: run the app; a user error never shows a traceback."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own progress bars say what is happening
    try:
        exit_code = app(standalone_mode=False)  # click's own errors come here, not as its boxed usage text
    except CrosscodersError as error:
        print_error(error)
        sys.exit(2)
    except CLICK_ERROR as error:  # a value of the wrong type, an unknown or missing option
        command = error.ctx.command_path if getattr(error, "ctx", None) else Path(sys.argv[0]).name
        print_error(CrosscodersError(f"{error.format_message().rstrip('.')}; see {command} --help"))
        sys.exit(error.exit_code)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)  # a command's return value is no exit status
