"""wdsembed.threads: producers run ahead of their consumers in a thread of their own."""
from __future__ import annotations

import threading
import time

import pytest

from wdsembed.threads import ContextThreadPool, in_background, read_ahead


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


def test_read_ahead_says_when_the_next_chunk_is_not_in_and_waits_when_asked():
    """With `not_ready`, a chunk still being made gives (not_ready, wait) instead of a wait; wait() returns once it
    is in, and every item still comes out once, in order. The error of a late chunk still comes after its items."""
    NOT_READY = object()
    release = threading.Event()

    def slow(n: int, fail_at: int | None = None):
        for i in range(n):
            if i == 4:
                assert release.wait(timeout=30)
            if i == fail_at:
                raise OSError(f"unreadable at {i}")
            yield i

    ahead = read_ahead(slow(10), chunk=4, depth=2, not_ready=NOT_READY)
    got, markers = [], 0
    for item in ahead:
        if isinstance(item, tuple) and item[0] is NOT_READY:
            markers += 1
            if markers == 3:  # the consumer has nothing else to do: it waits
                release.set()
                item[1]()
            continue
        got.append(item)
    assert got == list(range(10))
    assert markers >= 3  # asked again without waiting, it said so again instead of blocking

    release.clear()
    got = []
    with pytest.raises(OSError, match="unreadable at 5"):
        for item in read_ahead(slow(10, fail_at=5), chunk=4, depth=2, not_ready=NOT_READY):
            if isinstance(item, tuple) and item[0] is NOT_READY:
                release.set()
                item[1]()
                continue
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_in_background_raises_what_the_producer_raised_and_closes_it_when_the_consumer_stops():
    """The worker's pipeline runs through in_background: a pipeline that breaks must fail its calls with its own
    error (not end the stream quietly), and a consumer that stops early stops and closes it, in its own thread."""
    log: dict = {}
    got = []
    with pytest.raises(OSError, match="unreadable at 7"):
        for item in in_background(_source(100, log, fail_at=7), depth=2):
            got.append(item)
    assert got == list(range(7))
    assert log["thread"] is not threading.current_thread() and log["closed_in"] is log["thread"]

    log = {}
    before = threading.active_count()
    ahead = in_background(_source(10_000, log), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    assert log["closed_in"] is log["thread"]  # closed by the producer's thread, which has ended
    assert log["made"] < 10_000 and threading.active_count() == before



def test_a_pools_map_submits_every_call_before_it_returns():
    """As Executor.map: the results of a map called last in the pool's block are there after the block (its end
    waits for the calls, and submits none after it): plan.py reads the footers of outputs so."""
    with ContextThreadPool(4) as pool:
        doubled = pool.map(lambda i: 2 * i, range(2000))
    assert list(doubled) == [2 * i for i in range(2000)]


# A script that maps many CPU-bound calls over a ContextThreadPool in its main thread, as the command's checks read
# thousands of outputs' footers: says "busy" once its pool's threads work, "interrupted" on Ctrl-C.
_MAPS_UNTIL_INTERRUPTED = """
import os, sys
from wdsembed.threads import ContextThreadPool

def work(i):
    if i == 2000:
        os.write(1, b"busy\\n")
    x = 0
    for _ in range(3000):  # holds the GIL: the caller's thread waits for it among the pool's
        x += 1
    return x

try:
    with ContextThreadPool(4) as pool:
        total = sum(pool.map(work, range(200000)))
    print("done", total)
except KeyboardInterrupt:
    os.write(1, b"interrupted\\n")
"""


def test_ctrl_c_while_a_pool_maps_many_calls_ends_the_process():
    """Ctrl-C while the main thread submitted and took the results of many calls (the command's checks reading
    20,000 outputs' footers): where the KeyboardInterrupt came just after it took one of the executor's locks, that
    lock stayed held, every pool thread waited on it and the process hung for good (one try in two here), ending
    neither on that Ctrl-C nor on the next; or the lock's release failed (RuntimeError: release unlocked lock). Now
    the caller's thread takes no lock the pool's threads share: each try ends on its KeyboardInterrupt, without
    waiting for the calls not yet started."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path


    root = Path(__file__).resolve().parents[1]
    for _ in range(8):  # the interrupt lands somewhere else each time
        proc = subprocess.Popen([sys.executable, "-c", _MAPS_UNTIL_INTERRUPTED], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert proc.stdout.readline() == b"busy\n", proc.communicate()
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError("the process still runs 60 s after its Ctrl-C: hung in its pool") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert out == b"interrupted\n" and proc.returncode == 0, (out, err)
