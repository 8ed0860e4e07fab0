"""The exception types users see: a single line saying what is wrong, or what an interruption kept, and how to go on."""

import contextlib
import sys


class CrosscodersError(Exception):
    """A user-facing error; the CLI prints its message on one line, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, saying what was kept and how to continue; the CLI prints it on one line."""


@contextlib.contextmanager
def importing_quietly():
    """Around a command's imports (torch and transformers take seconds): Ctrl-C there stops it as it does later, in one
    line with status 130, not with a traceback from inside an import."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
