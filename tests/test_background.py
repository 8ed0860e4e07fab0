"""Computing an iterator ahead, in a thread or in another process, changes nothing but when and where the work happens."""

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.background import ahead_in_process, ahead_in_thread
from pipeline.errors import CrosscodersError


def counted(folder: str):
    """0, 1, 2, ... 4, each noted as a file in folder when it is made."""
    for i in range(5):
        Path(folder, str(i)).touch()
        yield i


def failing(message: str):
    yield 1
    raise ValueError(message)


def endless(_):
    i = 0
    while True:
        time.sleep(0.2)  # the next item is still being computed when the caller stops
        yield i, os.getpid()
        i += 1


def dying(_):
    yield 1
    os._exit(3)


def killed_while_sending(_):
    yield "first"
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGKILL)).start()
    yield np.zeros(10_000_000, np.uint8)  # the pipe holds a part of it when the process is killed


def small_then_large(_):
    yield 0
    yield np.zeros(10_000_000, np.uint8)
    yield 2


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle")


def failing_unpicklably(_):
    yield 1
    raise Unpicklable("held a lock")


def test_items_arrive_in_order_and_are_computed_ahead_in_process(tmp_path):
    stream = ahead_in_process(counted, str(tmp_path), depth=2)
    assert next(stream) == 0
    deadline = time.monotonic() + 60  # however loaded the machine, the process gets that far
    while len(list(tmp_path.iterdir())) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # time to run further ahead, were it not bounded
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [0, 1, 2, 3]  # in use, queued (depth 2), and in hand
    assert list(stream) == [1, 2, 3, 4]


def test_an_error_in_the_process_is_raised_in_place_of_its_item():
    stream = ahead_in_process(failing, "bad document")
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad document"):
        next(stream)


def test_a_forwarded_error_says_where_in_the_process_it_came_from():
    stream = ahead_in_process(failing, "bad document")
    next(stream)
    with pytest.raises(ValueError) as raised:
        next(stream)
    assert any("in failing" in note and "bad document" in note for note in raised.value.__notes__)


def test_an_error_that_cannot_travel_is_named():
    stream = ahead_in_process(failing_unpicklably, None)
    assert next(stream) == 1
    with pytest.raises(CrosscodersError, match="Unpicklable: held a lock"):
        next(stream)


def test_a_process_that_dies_is_an_error_not_a_hang():
    ended = r"the corpus process ended before its work was done \(exit code 3; its own error, if it printed one, is above\)"
    with pytest.raises(CrosscodersError, match=ended):
        list(ahead_in_process(dying, None, name="corpus"))  # its last item may die with it


def test_a_process_killed_while_sending_is_an_error_not_a_hang():
    stream = ahead_in_process(killed_while_sending, None, name="corpus")
    assert next(stream) == "first"
    time.sleep(3)  # killed meanwhile, a part of the large item in the pipe
    with pytest.raises(CrosscodersError, match=r"the corpus process ended before its work was done \(exit code -9; killed: out of memory\?\)"):
        next(stream)


def test_stopping_early_is_quick_with_large_items_queued():
    stream = ahead_in_process(small_then_large, None, depth=2)
    assert next(stream) == 0
    time.sleep(3)  # the large item waits in the pipe, the last one for room
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 5


def test_stopping_early_ends_the_process():
    stream = ahead_in_process(endless, None)
    _, pid = next(stream)
    stream.close()
    assert not any(child.pid == pid for child in multiprocessing.active_children())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_items_arrive_in_order_and_are_computed_ahead_in_thread():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    stream = ahead_in_thread(items(), depth=2)
    assert next(stream) == 0
    deadline = time.monotonic() + 30  # however loaded the machine, the thread gets that far
    while len(produced) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time to run further ahead, were it not bounded
    assert produced == [0, 1, 2, 3]  # the item in use, the one waiting to be handed over, and depth more
    assert list(stream) == [1, 2, 3, 4]


def test_an_error_in_the_thread_is_raised_in_place_of_its_item():
    def items():
        yield 1
        raise ValueError("bad document")

    stream = ahead_in_thread(items())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad document"):
        next(stream)


def test_stopping_early_waits_for_the_threads_item_in_progress():
    """A producer left running inside native code at interpreter exit can abort the process."""

    def slow():
        i = 0
        while True:
            time.sleep(0.3)  # the next item is still being computed when the caller stops
            yield i
            i += 1

    stream = ahead_in_thread(slow())
    assert next(stream) == 0
    stream.close()
    assert not any(thread.name == "ahead" and thread.is_alive() for thread in threading.enumerate())
