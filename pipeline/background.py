"""An iterator computed ahead, so that its work overlaps the caller's: in a thread, or in another process, where its
Python work does not hold the caller's GIL (docs/BENCHMARKS.md: stage one's corpus work, in a thread, held it for
40% of the time)."""

import multiprocessing
import os
import pickle
import queue
import signal
import threading
from typing import Callable, Iterable, Iterator, TypeVar

from pipeline.errors import CrosscodersError

A, T = TypeVar("A"), TypeVar("T")
_END = object()
POLL_SECONDS = 0.1  # how often a blocked side looks whether the other has stopped


def ahead_in_thread(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yields what `items` yields, computing up to `depth` items beyond the one in use in a daemon thread.

    An exception there is raised here, in place of the item it replaced; when the caller stops early
    (or drops this iterator), the thread stops at its next item, and closing waits for that.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=POLL_SECONDS)
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


def ahead_in_process(produce: Callable[[A], Iterable[T]], argument: A, depth: int = 1, name: str = "ahead") -> Iterator[T]:
    """Yields what produce(argument) yields, computed up to `depth` items beyond the one in use in a process of its own.

    produce must be a module's function and argument picklable (the process is spawned: forking a process that
    holds CUDA or threads is unsafe). An exception there is raised here, in place of the item it replaced; when the
    caller stops early (or drops this iterator), the process stops at its next item, and closing waits for it.
    name: the process's, in the error that says it died.
    """
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(maxsize=depth), context.Event()
    process = context.Process(target=_produce, args=(produce, argument, ready, stop, os.getpid()), name=name, daemon=True)
    process.start()
    try:
        while True:
            kind, value = _next_entry(ready, process)
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        process.join(timeout=30)
        if process.is_alive():  # stuck in native code: it holds nothing the caller needs
            process.kill()
            process.join()
        ready.close()


def _next_entry(ready, process) -> tuple[str, object]:
    while True:
        try:
            return ready.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if not process.is_alive() and ready.empty():
                raise CrosscodersError(f"the {process.name} process ended before its work was done (exit code {process.exitcode}"
                                       "); out of memory? run the same command again to continue") from None


def _produce(produce: Callable[[A], Iterable[T]], argument: A, ready, stop, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle: it stops this process

    def hand_over(entry) -> bool:
        while not stop.is_set() and os.getppid() == parent:  # a parent killed outright leaves this process to end
            try:
                ready.put(entry, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                pass
        ready.cancel_join_thread()  # what is still queued is never read: exit without flushing it
        return False

    try:
        for item in produce(argument):
            if not hand_over(("item", item)):
                return
    except BaseException as error:  # handed to the caller, which raises it
        hand_over(("error", _picklable(error)))
        return
    hand_over(("end", None))


def _picklable(error: BaseException) -> BaseException:
    """The error itself where it survives pickling, else a CrosscodersError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return CrosscodersError(f"{type(error).__name__}: {error}")
