"""The exception types users see: a single line saying what is wrong, or what an interruption kept, and how to go on."""

import contextlib
import os
import re
import signal
import sys
import threading


class CrosscodersError(Exception):
    """A user-facing error; the CLI prints its message on one line, without a traceback."""


def out_of_memory(error: BaseException) -> str | None:
    """For an allocation that failed (torch's out-of-memory error on a GPU, its allocator's RuntimeError or Python's
    MemoryError on the host), the first line of what it said; None for any other error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if type(error).__name__ == "OutOfMemoryError" or isinstance(error, MemoryError):
        return text
    if isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text.lower()):
        return text
    return None


def peer_stopped(error: BaseException) -> str | None:
    """For a collective that failed because another process of a torchrun job stopped (gloo's "closed" or "reset by
    peer", NCCL's DistBackendError), its first sentence without gloo's source location; None for any other error."""
    if not isinstance(error, RuntimeError):
        return None
    text = (re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0].splitlines() or [""])[0]
    if type(error).__name__ in ("DistBackendError", "DistNetworkError") or "by peer" in text:
        return text or type(error).__name__
    return None


def one_line(error: Exception) -> str:
    """A library error squeezed onto one line, for a user-facing message."""
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__  # the caller's message goes on after it


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, saying what was kept and how to continue; the CLI prints it on one line."""


def first_stop(interrupted: KeyboardInterrupt) -> BaseException:
    """What a stage said of the stop whose clean-up a Ctrl-C or SIGTERM interrupted (a second Ctrl-C; torchrun's SIGTERM
    just after another process failed), since that says what was kept; the interruption itself where there is none."""
    stop: BaseException = interrupted
    while type(stop) is KeyboardInterrupt and isinstance(stop.__context__, (CrosscodersError, KeyboardInterrupt)):
        stop = stop.__context__
    return stop


@contextlib.contextmanager
def importing_quietly():
    """Around a command's imports (torch and transformers take seconds): Ctrl-C or SIGTERM there stops it as it does
    later, in one line with status 130 or 143, not with a traceback from inside an import (or, for SIGTERM, silently).
    The handler exits at once rather than raising KeyboardInterrupt, which Python ignores where it lands in a
    finalizer, and the command would then go on."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, frame):
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(128 + signum)  # nothing is written yet, so nothing needs cleaning up

    with stopping_signals_handled_by(stop):
        yield


@contextlib.contextmanager
def stopping_signals_handled_by(handler):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler stopping the job) go to handler, then back to their handlers before."""
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)
