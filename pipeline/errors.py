"""The exception types users see: a single line saying what is wrong, or what an interruption kept, and how to go on."""


class CrosscodersError(Exception):
    """A user-facing error; the CLI prints its message on one line, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, saying what was kept and how to continue; the CLI prints it on one line."""
