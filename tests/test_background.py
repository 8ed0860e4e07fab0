"""Computing an iterator ahead in a background thread changes nothing but when the work happens."""

import threading
import time

import pytest

from pipeline.background import ahead


def test_items_arrive_in_order_and_are_computed_ahead():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    stream = ahead(items(), depth=2)
    assert next(stream) == 0
    time.sleep(0.2)
    assert produced == [0, 1, 2, 3]  # the item in use, the one waiting to be handed over, and depth more
    assert list(stream) == [1, 2, 3, 4]


def test_an_error_in_the_background_is_raised_in_place_of_its_item():
    def items():
        yield 1
        raise ValueError("bad document")

    stream = ahead(items())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad document"):
        next(stream)


def test_stopping_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = ahead(endless())
    assert next(stream) == 0
    stream.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
