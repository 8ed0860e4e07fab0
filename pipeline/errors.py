"""The one exception type users see: a single line saying what is wrong and how to fix it."""


class CrosscodersError(Exception):
    """A user-facing error; the CLI prints its message on one line, without a traceback."""
