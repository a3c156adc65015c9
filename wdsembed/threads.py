"""Running a producer ahead of its consumer in a background thread, with a bounded queue between them."""
from __future__ import annotations

import itertools
import queue
import threading
from typing import Iterator, Optional, TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def in_background(items: Iterator[T], depth: int = 2, name: str = "wdsembed-producer") -> Iterator[T]:
    """Yield what `items` yields, computed up to `depth` items ahead in one background thread.

    Everything `items` does (reading the tar, feeding and running DALI) happens in that one thread, so a
    thread-unsafe producer stays single-threaded, while the consumer (the model) works on the previous item.
    An exception in the producer is raised here; a consumer that stops early stops and closes the producer.
    """
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Raised(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's cleanup (draining DALI) runs here, in the producer's own thread
            put(_DONE)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def read_ahead(items: Iterator[T], chunk: int = 64, depth: int = 4, name: str = "wdsembed-reader") -> Iterator[T]:
    """Yield what `items` yields, computed ahead in one background thread (the `depth` chunks queued, the one being
    made and the one being taken: at most `chunk * (depth + 2)` items in hand), handed over
    `chunk` at a time (one queue hand-over per chunk, not per item: a hand-over costs as much as parsing a small
    tar member). An exception in `items` is raised here after the items that came before it; closing this
    generator stops and closes `items`.

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

    for part, exc in in_background(chunks(), depth=depth, name=name):
        yield from part
        if exc is not None:
            raise exc
