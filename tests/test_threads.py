"""wdsembed.threads: producers run ahead of their consumers in a thread of their own."""
from __future__ import annotations

import threading
import time

import pytest

from wdsembed.threads import read_ahead


def _source(n: int, log: dict, fail_at: int | None = None):
    log["thread"] = threading.current_thread()
    try:
        for i in range(n):
            if i == fail_at:
                raise OSError(f"unreadable at {i}")
            log["made"] = i + 1
            yield i
    finally:
        log["closed_in"] = threading.current_thread()


def test_read_ahead_yields_everything_in_order_from_another_thread():
    log: dict = {}
    assert list(read_ahead(_source(1000, log), chunk=64, depth=3)) == list(range(1000))
    assert log["thread"] is not threading.current_thread()
    assert log["closed_in"] is log["thread"]


def test_read_ahead_raises_after_the_items_that_came_before_the_error():
    log: dict = {}
    got = []
    with pytest.raises(OSError, match="unreadable at 100"):
        for item in read_ahead(_source(1000, log, fail_at=100), chunk=64, depth=3):
            got.append(item)
    assert got == list(range(100))  # the 36 of the failing chunk included


def test_read_ahead_stays_within_its_depth_and_stops_when_closed():
    log: dict = {}
    ahead = read_ahead(_source(10_000, log), chunk=10, depth=2)
    assert next(ahead) == 0
    deadline = time.time() + 5
    while log.get("made", 0) < 30 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # one chunk taken, two queued, one being made and blocked on the full queue: never the whole source
    assert log["made"] <= 40
    before = threading.active_count()
    ahead.close()
    assert log["closed_in"] is log["thread"]  # the source was closed, in its own thread
    assert threading.active_count() == before - 1
