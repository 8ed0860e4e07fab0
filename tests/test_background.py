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
    deadline = time.monotonic() + 30  # however loaded the machine, the thread gets that far
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time to run further ahead, were it not bounded
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


def test_stopping_early_waits_for_the_item_in_progress():
    """A producer left running inside native code at interpreter exit can abort the process."""

    def slow():
        i = 0
        while True:
            time.sleep(0.3)  # the next item is still being computed when the caller stops
            yield i
            i += 1

    stream = ahead(slow())
    assert next(stream) == 0
    stream.close()
    assert not any(thread.name == "ahead" and thread.is_alive() for thread in threading.enumerate())
