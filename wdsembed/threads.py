"""Running a producer ahead of its consumer in a background thread, with a bounded queue between them; thread pools
and threads whose calls run in their caller's context; the Dask task a thread runs in."""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import queue
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, TypeVar

T = TypeVar("T")
_DONE = object()
_NOTHING = object()


def enclosing_dask_worker() -> Any:
    """The Dask worker whose task this code runs in (on a worker of this process or of another: the task's own
    thread, or a thread that copied its context; not a plain thread that such a task started), if any."""
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        return get_worker()
    except ValueError:
        return None


@contextlib.contextmanager
def ctrl_c_held(repeat_stops: bool = False) -> Iterator[None]:
    """Ctrl-C (SIGINT) held until the block ends, then handed to the caller's handler (a KeyboardInterrupt, by
    default): for work that a KeyboardInterrupt in its middle would leave broken or running on (an import half done,
    a Dask cluster half started). With `repeat_stops`, a second Ctrl-C meanwhile raises KeyboardInterrupt at once.
    Signals reach the main thread only, and a handler not set from Python (None) cannot be put back: elsewhere
    nothing is held."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    held: list[int] = []

    def hold(signum, frame) -> None:
        if held and repeat_stops:
            raise KeyboardInterrupt
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


class ContextThreadPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose calls run in a copy of the submitting thread's context (contextvars), as they would
    called inline: their log lines keep the caller's run (a Prefect task run's lines reach its log in the UI only from
    its context; from a bare pool thread they reached the terminal alone).

    Safe to interrupt (Ctrl-C, or SIGTERM where the command raises it as Ctrl-C). A KeyboardInterrupt raised in
    the caller's thread just after it took one of the executor's locks (`with` had not yet begun to guard it) left
    that lock held for good: the pool's threads then waited on it forever, and so did the `with` block's end, and
    Python's exit after it. The command hung on a Ctrl-C during its checks of 20,000 shards, its footer reads
    under way. So map() submits and waits in a thread of its own, and the caller only takes its results from a
    queue that holds no Python lock. Leaving the block by such an interruption cancels what has not started and
    does not wait for the rest (at most one item a thread, which Python's exit waits for)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def map(self, fn: Callable[..., T], *iterables: Any, timeout: Optional[float] = None,
            chunksize: int = 1) -> Iterator[T]:
        results: queue.SimpleQueue = queue.SimpleQueue()
        submitted: queue.SimpleQueue = queue.SimpleQueue()
        stopped: list = []  # set by the caller that stops taking results; a list, not an Event: no lock to leave held
        submit_all = super().map

        def feed() -> None:
            ordered = None
            try:
                try:
                    ordered = submit_all(fn, *iterables, timeout=timeout, chunksize=chunksize)
                finally:
                    submitted.put(None)
                for result in ordered:
                    if stopped:
                        break
                    results.put((True, result))
                results.put((True, _DONE))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                results.put((False, exc))
            finally:
                if ordered is not None:
                    ordered.close()  # cancels what has not started, where the caller stopped early

        start_in_context(feed, "wdsembed-pool-results")
        submitted.get()  # every call submitted before this returns, as Executor.map: the block may end at once

        def taken() -> Iterator[T]:
            try:
                while True:
                    ok, item = results.get()
                    if not ok:
                        raise item
                    if item is _DONE:
                        return
                    yield item
            finally:
                stopped.append(True)

        return taken()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not issubclass(exc_type, Exception):  # Ctrl-C, SIGTERM: stop, don't wait
            self.shutdown(wait=False, cancel_futures=True)
            return False
        return super().__exit__(exc_type, exc, tb)


def start_in_context(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """Start a daemon thread that runs `target(*args)` in a copy of the starting thread's context (contextvars): what
    it logs goes where the starter's lines go. A flow's run logger sends its lines to the API that the run's settings
    (context variables: the command's temporary server) name; from a bare thread, a line found no API there, and
    Prefect started a temporary server of its own to send it to, away from the run's UI. A `wdsembed` line from a
    bare thread has no run at all, and reaches only the terminal."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target, *args), name=name, daemon=True)
    thread.start()
    return thread


class Watch:
    """A `with` block during which `_watch()` runs in a thread of its starter's context (start_in_context), polling
    every `poll_s` until the block ends: `while not self._stop.wait(self.poll_s)`. Subclasses set `thread_name` and
    call `super().__init__(poll_s)`."""

    thread_name = "wdsembed-watch"

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self):
        self._thread = start_in_context(self._watch, self.thread_name)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        raise NotImplementedError


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Background:
    """`items` iterated in a thread of its own, at most `depth` items ahead of `get()`."""

    def __init__(self, items: Iterator[Any], depth: int, name: str) -> None:
        self._out: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._held: Any = _NOTHING  # an item wait() took from the queue, for the next get()
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Raised(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's cleanup (draining DALI) runs here, in the producer's own thread
            self._put(_DONE)

    def ready(self) -> bool:
        """Whether get() returns at once."""
        return self._held is not _NOTHING or not self._out.empty()

    def wait(self) -> None:
        """Return once get() would return at once."""
        if self._held is _NOTHING:
            self._held = self._out.get()

    def get(self) -> Any:
        """The next item, or _DONE after the last; raises what the producer raised."""
        item, self._held = (self._out.get() if self._held is _NOTHING else self._held), _NOTHING
        if isinstance(item, _Raised):
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def in_background(items: Iterator[T], depth: int = 2, name: str = "wdsembed-producer") -> Iterator[T]:
    """Yield what `items` yields, computed up to `depth` items ahead in one background thread.

    Everything `items` does (reading the tar, feeding and running DALI) happens in that one thread, so a
    thread-unsafe producer stays single-threaded, while the consumer (the model) works on the previous item.
    An exception in the producer is raised here; a consumer that stops early stops and closes the producer.
    """
    producer = _Background(items, depth, name)
    try:
        while (item := producer.get()) is not _DONE:
            yield item
    finally:
        producer.close()


def read_ahead(items: Iterator[T], chunk: int = 64, depth: int = 4, name: str = "wdsembed-reader",
               not_ready: Optional[object] = None) -> Iterator[Any]:
    """Yield what `items` yields, computed ahead in one background thread (the `depth` chunks queued, the one being
    made and the one being taken: at most `chunk * (depth + 2)` items in hand), handed over
    `chunk` at a time (one queue hand-over per chunk, not per item: a hand-over costs as much as parsing a small
    tar member). An exception in `items` is raised here after the items that came before it; closing this
    generator stops and closes `items`.

    With `not_ready` given, where the next chunk is not made yet this yields `(not_ready, wait)` instead of
    waiting for it: the consumer can do other work first, and calls `wait()` (which returns once the chunk is in)
    before it asks again when it has none. Asked again without `wait()`, it yields the same pair until the chunk
    is in.

    Why a thread: the one that feeds DALI waits for each batch's outputs with the GIL released; a parser running
    beside it fills those waits with the next samples instead of parsing after each wait."""

    def chunks() -> Iterator[tuple[list, Optional[BaseException]]]:
        it = iter(items)
        try:
            while True:
                part: list = []
                try:
                    part.extend(itertools.islice(it, chunk))
                except Exception as exc:  # noqa: BLE001 - raised to the consumer once the items before it are out
                    yield part, exc
                    return
                if not part:
                    return
                yield part, None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    producer = _Background(chunks(), depth, name)
    wait: Callable[[], None] = producer.wait
    try:
        while True:
            if not_ready is not None and not producer.ready():
                yield not_ready, wait
                continue
            got = producer.get()
            if got is _DONE:
                return
            part, exc = got
            yield from part
            if exc is not None:
                raise exc
    finally:
        producer.close()
