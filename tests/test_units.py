"""Counts as users type them."""

import pytest

from pipeline.errors import CrosscodersError
from pipeline.units import parse_count, size_text


@pytest.mark.parametrize("text, count", [("20000", 20_000), ("20K", 20_000), (" 50m ", 50_000_000), ("1B", 10**9), ("1.5M", 1_500_000),
                                         ("4.1M", 4_100_000), ("8.2M", 8_200_000), ("2.01K", 2_010), ("0.001K", 1), (7, 7)])
def test_counts_are_parsed_exactly(text, count):
    assert parse_count(text) == count


def test_every_two_decimal_count_with_a_suffix_is_whole():
    """Read as floats, 99 of these (4.1M among them) came out a fraction short of a whole number and were refused."""
    for hundredths in range(1, 1000):
        for suffix, scale in (("K", 10**3), ("M", 10**6), ("B", 10**9)):
            assert parse_count(f"{hundredths // 100}.{hundredths % 100:02d}{suffix}") == hundredths * scale // 100


@pytest.mark.parametrize("text, message", [("1.5", "not a whole number"), ("0.0001K", "not a whole number"), ("0", "must be positive"),
                                           ("-5", "is not a count"), ("ten", "is not a count"), ("5 KB", "is not a count")])
def test_what_is_not_a_count_is_a_one_line_error(text, message):
    with pytest.raises(CrosscodersError, match=message):
        parse_count(text, "--steps")


@pytest.mark.parametrize("n_bytes, text", [(0, "0 bytes"), (1000, "1,000 bytes"), (1024, "1.0 KiB"), (5 * 2**20 + 2**19, "5.5 MiB"),
                                            (1234 * 2**30, "1,234.0 GiB")])
def test_sizes_are_printed_in_the_largest_unit_they_reach(n_bytes, text):
    assert size_text(n_bytes) == text
