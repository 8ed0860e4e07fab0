"""An iterator computed ahead in a background thread, so its work overlaps the caller's."""

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def ahead(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yields what `items` yields, computing up to `depth` items beyond the one in use in a daemon thread.

    An exception there is raised here, in place of the item it replaced; when the caller stops early
    (or drops this iterator), the thread stops at its next item, and closing waits for that.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
        except BaseException as error:  # handed to the consumer
            hand_over((_END, error))
            return
        hand_over((_END, None))

    producer = threading.Thread(target=produce, name="ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        # wait for the item in progress: a thread still inside native code (a tokenizer, a torch op) when the
        # interpreter exits can abort the process ("terminate called without an active exception")
        producer.join()
