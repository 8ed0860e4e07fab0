"""The command lines: one option per config field, same name, help and default (README, STYLE.md rule 4)."""

import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from pipeline.cache import CacheConfig
from pipeline.cli import config_command, option, print_error
from pipeline.corpus import CorpusConfig
from pipeline.errors import CrosscodersError, Interrupted
from pipeline.evaluate import EvalConfig
from pipeline.export import ExportConfig
from pipeline.features import FeaturesConfig
from pipeline.loader import LoaderConfig
from pipeline.train import TrainConfig

COMMANDS = {  # entry script -> its configs, and the options that belong to none (README says which)
    "cache_activations": ([CacheConfig, CorpusConfig], set()),
    "train_sae": ([LoaderConfig, TrainConfig], {"out", "sweep", "resume", "device"}),
    "eval_sae": ([EvalConfig], set()),
    "sae_features": ([FeaturesConfig], set()),
    "export_sae": ([ExportConfig], set()),
}


@pytest.mark.parametrize("script", COMMANDS)
def test_options_are_the_config_fields_with_their_names_help_and_defaults(script):
    classes, extra = COMMANDS[script]
    options = {p.name: p for p in typer.main.get_command(importlib.import_module(script).app).params if p.name != "help"}
    fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
    assert options.keys() == fields.keys() | extra
    for name, field in fields.items():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert "--" + name.replace("_", "-") in options[name].opts
        assert options[name].help == field.metadata["help"]
        assert options[name].default == (list(default) if isinstance(default, tuple) else default), name


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    switch: bool | None = option(None, "on, off, or left to the command")


@pytest.mark.parametrize("args, value", [([], None), (["--switch"], True), (["--no-switch"], False)])
def test_an_optional_bool_option_is_a_flag_pair_that_stays_unset_unless_given(args, value):
    app, seen = typer.Typer(), []
    config_command(app, [SwitchConfig], lambda config: seen.append(config.switch))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and seen == [value]


@dataclasses.dataclass(frozen=True)
class StopConfig:
    how: str = option("sigterm", "how the command stops")


def stopping_command(config: StopConfig):
    if config.how == "sigterm":  # a scheduler stopping the job
        os.kill(os.getpid(), signal.SIGTERM)
    elif config.how == "ctrl-c-in-a-stage":
        raise Interrupted("interrupted; the store keeps its complete shards")
    elif config.how.endswith("then-sigterm-in-its-clean-up"):  # torchrun's SIGTERM just after another process failed
        try:
            if config.how.startswith("error"):
                raise CrosscodersError("another process stopped; the store keeps its complete shards")
            raise Interrupted("interrupted; the store keeps its complete shards")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the clean-up the signal interrupts
    raise KeyboardInterrupt  # Ctrl-C where no stage says what it kept


@pytest.mark.parametrize("how, status, line", [
    ("sigterm", 143, "interrupted"),
    ("ctrl-c", 130, "interrupted"),
    ("ctrl-c-in-a-stage", 130, "interrupted; the store keeps its complete shards"),
    ("error-then-sigterm-in-its-clean-up", 2, "error: another process stopped; the store keeps its complete shards"),
    ("ctrl-c-then-sigterm-in-its-clean-up", 143, "interrupted; the store keeps its complete shards"),
])
def test_ctrl_c_and_sigterm_stop_a_command_with_one_line_and_the_signal_s_status(how, status, line):
    app = typer.Typer()
    config_command(app, [StopConfig], stopping_command)
    def sigterm_outside_the_command(signum, frame):
        raise AssertionError("the command did not catch SIGTERM")

    default_sigterm = signal.signal(signal.SIGTERM, sigterm_outside_the_command)  # not pytest's: it would end the tests
    try:
        result = CliRunner().invoke(app, ["--how", how])
        assert signal.getsignal(signal.SIGTERM) == sigterm_outside_the_command  # put back once the command returns
    finally:
        signal.signal(signal.SIGTERM, default_sigterm)
    assert (result.exit_code, result.stderr) == (status, line + "\n")


class SignalledWhileFinalized:
    """An object whose finalizer is running when the signal arrives (as regex's Group.__del__ was, once, in a test)."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        time.sleep(0.2)  # still finalizing when the signal's first retry comes


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    signum: int = option(int(signal.SIGINT), "the signal")


def finalizing_command(config: SignalConfig):
    SignalledWhileFinalized(config.signum)  # finalized at once, as its last reference goes
    time.sleep(2)  # the command's own work, which the signal must stop


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_command(signum, status):
    """Python drops an exception raised in __del__: the KeyboardInterrupt was lost and the command ran to its end."""
    app = typer.Typer()
    config_command(app, [SignalConfig], finalizing_command)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["--signum", str(int(signum))])
    assert (result.exit_code, result.stderr) == (status, "interrupted\n") and time.perf_counter() - started < 1.5


def quick_finalizing_command(config: SignalConfig):
    SignalledWhileFinalized(config.signum)  # the command ends within the retry's 50 ms, but for the finalizer's sleep


def test_a_signal_retried_after_a_finalizer_never_reaches_the_caller_once_the_command_ended():
    """The retry's timer outlived the command: 50 ms later its signal hit the caller (here pytest, which then stops)."""
    app = typer.Typer()
    config_command(app, [SignalConfig], quick_finalizing_command)
    caught = []
    callers = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        result = CliRunner().invoke(app, [])
        time.sleep(0.3)
    finally:
        signal.signal(signal.SIGINT, callers)
    assert caught == [] and result.exit_code in (0, 130)


@dataclasses.dataclass(frozen=True)
class FailConfig:
    error: str = option("memory", "what the command raises")


def failing_command(config: FailConfig):
    import torch

    if config.error == "memory":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.00 GiB free.\nOf the allocated ...")
    raise RuntimeError("a bug, not a user's error")


def test_a_memory_store_is_refused_by_the_commands_in_one_line():
    """It is empty for the next command, which then advised running the first again."""
    app = typer.Typer()
    config_command(app, [FailConfig], failing_command)
    result = CliRunner().invoke(app, ["--error", "memory://m"])
    assert (result.exit_code, result.stderr) == (2, "error: --error memory://m: a memory:// store ends with the command that made "
                                                    "it, so no other command finds it; pass a folder (memory:// is for the Python API)\n")


def test_an_error_shows_control_and_invisible_characters_as_escapes(capsys):
    """A shared store's model name holding ESC sequences moved the cursor and drew a fake success line over the error;
    spaces of every width stay, to be copied (a folder named with U+3000)."""
    print_error(CrosscodersError("could not load model '\x1b[1A\x1b[2Kdone\u202e' (a, b) from my\u3000store\u00a0x"))
    assert capsys.readouterr().err == "error: could not load model '\\x1b[1A\\x1b[2Kdone\\u202e' (a, b) from my\u3000store\u00a0x\n"


def test_out_of_memory_is_one_line_with_the_commands_advice_and_other_errors_stay_tracebacks():
    app = typer.Typer()
    config_command(app, [FailConfig], failing_command, memory_advice="lower --batch-tokens")
    result = CliRunner().invoke(app, [])
    assert (result.exit_code, result.stderr) == (2, "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                                    "1.00 GiB free.); lower --batch-tokens\n")
    assert isinstance(CliRunner().invoke(app, ["--error", "bug"]).exception, RuntimeError)


@pytest.mark.parametrize("script, signum", [*((script, "SIGINT") for script in COMMANDS), ("train_sae", "SIGTERM")])
def test_ctrl_c_while_a_command_imports_its_modules_stops_it_in_one_line(script, signum):
    """Ctrl-C (or a scheduler's SIGTERM) 0.1 s in, while torch is still importing (it takes seconds), and not a traceback
    from inside it (nor, for SIGTERM, no line at all)."""
    interrupt_soon = (f"import os, runpy, signal, sys; signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.{signum})); "
                      f"signal.setitimer(signal.ITIMER_REAL, 0.1); sys.argv = ['{script}.py', '--help']; "
                      f"runpy.run_path('{script}.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", interrupt_soon], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (128 + getattr(signal, signum), "interrupted\n")
    assert result.stdout == ""  # stopped before --help was answered
