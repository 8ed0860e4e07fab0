"""The counts users type (`50M` tokens, `20K` steps) and the sizes messages print."""

import re
from decimal import Decimal

from pipeline.errors import CrosscodersError

SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def parse_count(text: str | int, option: str = "--n-tokens") -> int:
    """'20K' -> 20000, '1.5M' -> 1500000; a positive whole number of items."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbB]?)\s*", text)
        if not match:
            raise CrosscodersError(f"{option} {text!r} is not a count; write e.g. 20000, 20K, 50M or 1B")
        value = Decimal(match.group(1)) * SUFFIXES[match.group(2).upper()]  # exact: 4.1M is 4100000, not 4099999.9...
        if value != int(value):
            raise CrosscodersError(f"{option} {text!r} is not a whole number of items")
        value = int(value)
    if value <= 0:
        raise CrosscodersError(f"{option} must be positive, got {text!r}")
    return value


def size_text(n_bytes: int) -> str:
    """A byte count in the largest binary unit it reaches: '1,234.5 GiB', '12.0 MiB', '512 bytes'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:,.1f} {unit}"
    return f"{n_bytes:,} bytes"
