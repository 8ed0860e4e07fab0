"""An iterator computed ahead, so that its work overlaps the caller's: in a thread, or in another process, where its
Python work does not hold the caller's GIL (docs/BENCHMARKS.md: stage one's corpus work, in a thread, held it for
40% of the time)."""

import contextlib
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import traceback
from typing import Callable, Iterable, Iterator, TypeVar

from pipeline.errors import CrosscodersError

A, T = TypeVar("A"), TypeVar("T")
_END = object()
POLL_SECONDS = 0.1  # how often a blocked side looks whether the other has stopped
STOP_SECONDS = 2  # how long a process that computes ahead may take to stop before it is killed


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
    """Yields what produce(argument) yields, computed up to `depth` items beyond the one in use in a process of its own,
    started at once.

    produce must be a module's function and argument picklable (the process is spawned: forking a process that
    holds CUDA or threads is unsafe). An exception there is raised here, in place of the item it replaced, and a
    process that dies is an error naming it. When the caller stops early (or drops this iterator), the process
    stops at its next item, or is killed within seconds: it must write nothing another run relies on.
    """
    context = multiprocessing.get_context("spawn")
    received, sent = context.Pipe(duplex=False)  # a pipe, not a Queue: a process dying mid-message leaves end-of-file
    room, stop = context.Semaphore(depth), context.Event()
    with _ignored(signal.SIGINT):  # inherited through the process's start-up, whose imports take seconds
        process = context.Process(target=_produce, args=(produce, argument, sent, room, stop, os.getpid()), name=name,
                                  daemon=True)
        process.start()
    sent.close()  # this process's copy of the sending end, else its reads never see the other's end
    return _received_items(process, received, room, stop)


def _received_items(process, received, room, stop) -> Iterator:
    try:
        while True:
            try:
                kind, value = received.recv()
            except (EOFError, OSError):  # OSError: "got end of file during message"
                process.join()
                raise _ended_early(process) from None
            room.release()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        received.close()  # a process blocked sending gets a broken pipe
        process.join(timeout=STOP_SECONDS)
        if process.is_alive():  # inside an item's work
            process.kill()
            process.join()


def _ended_early(process) -> CrosscodersError:
    code = process.exitcode
    why = "killed: out of memory?" if code == -signal.SIGKILL else "its own error, if it printed one, is above"
    return CrosscodersError(f"the {process.name} process ended before its work was done (exit code {code}; {why}); "
                            "run the same command again to continue")


@contextlib.contextmanager
def _ignored(signal_number: int):
    """The signal ignored for the block, where this thread may set handlers (the main thread's only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal_number, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal_number, previous)


def _produce(produce: Callable[[A], Iterable[T]], argument: A, sent, room, stop, parent: int) -> None:
    for number in (signal.SIGINT, signal.SIGTERM):  # the caller's to handle: it stops this process
        signal.signal(number, signal.SIG_IGN)

    def hand_over(entry) -> bool:
        while not room.acquire(timeout=POLL_SECONDS):
            if stop.is_set() or os.getppid() != parent:  # a parent killed outright leaves this process to end
                return False
        try:
            sent.send(entry)
            return True
        except (BrokenPipeError, ConnectionResetError):  # the caller stopped reading
            return False

    try:
        for item in produce(argument):
            if not hand_over(("item", item)):
                return
    except BaseException as error:  # handed to the caller, which raises it
        error.add_note("".join(traceback.format_exception(error)).rstrip())  # where in this process it came from
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
