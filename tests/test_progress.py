"""What a long run says while it runs: its progress (shards ended of all, failed ones, images/s, the time left) in
its log a line a minute at most, and a line where no shard has ended for long. Clocks are given, never waited on."""
from __future__ import annotations

import contextvars
import threading

from wdsembed.progress import ProgressLog, RunProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_progress_line_counts_shards_failures_images_and_the_time_left():
    clock = Clock()
    progress = RunProgress(10, finished_before=2, clock=clock)
    clock.now = 1.0
    for _ in range(2):  # the finished outputs come back at once, and take no share of the time left
        progress.shard_ended({"embedded": 50, "cached": True})
    assert progress.seconds_left() is None and progress.rate() is None  # nothing computed yet: no estimate
    clock.now = 10.0
    progress.shard_ended({"embedded": 100, "cached": False})
    clock.now = 20.0
    progress.shard_ended(None)  # failed
    # 2 shards took 20 s of work; 6 are left: about 60 s
    assert progress.line() == ("progress: 4 of 10 shard(s) ended (40%), 1 failed; 100 images at 5.0 images/s; "
                               "about 60 s left")
    assert [format_duration(s) for s in (59.6, 100, 300, 600, 3 * 3600 + 5 * 60)] == [
        "60 s", "1 min 40 s", "5 min", "10 min", "3 h 05 min"]


def test_the_log_says_the_progress_a_line_a_minute_not_a_line_per_shard():
    """10,000 shards, one ending each second: 166 lines, not 10,000, each with the counts of its moment."""
    clock, said = Clock(), []
    progress = RunProgress(10_000, clock=clock)
    log = ProgressLog(progress, said.append, every_s=60.0)  # not entered: no thread, the shards' ends only
    for n in range(1, 10_001):
        clock.now = float(n)
        log.shard_ended({"embedded": 10, "cached": False})
    assert len(said) == 166, said[:3]
    assert said[0] == "progress: 60 of 10,000 shard(s) ended (1%); 600 images at 10 images/s; about 2 h 46 min left"
    assert said[-1].startswith("progress: 9,960 of 10,000 shard(s) ended (100%);")


def test_a_run_where_no_shard_ends_says_so_against_its_longest_wait_so_far():
    """A stalled run is told from a slow one: the line says how long none has ended, beside the longest wait for
    an end so far, and is said at 3 times that wait, then at each doubling, not every minute for hours."""
    clock = Clock()
    progress = RunProgress(10, clock=clock)
    log = ProgressLog(progress, lambda line: None, every_s=60.0)
    clock.now = 59.0
    assert log.quiet_for() is None
    clock.now = 60.0
    assert log.quiet_for() == 60.0
    assert progress.quiet_line().startswith("progress: no shard has ended yet, 60 s after the start (0 of 10;")
    for n in range(1, 4):  # a shard every 100 s
        clock.now = 100.0 * n
        log.shard_ended({"embedded": 4, "cached": False})
    clock.now = 300.0 + 299.0
    assert log.quiet_for() is None  # slow, not stalled: less than 3 times its longest wait
    clock.now = 300.0 + 300.0
    assert log.quiet_for() == 300.0
    assert progress.quiet_line() == (
        "progress: no shard has ended for 5 min (3 of 10 ended; the longest wait between two ends before was 1 min 40 s): "
        "a run this quiet may be stalled; Dask's dashboard shows what each worker is doing")
    log._quiet_said = 300.0  # said: the next line at twice the wait
    clock.now = 300.0 + 599.0
    assert log.quiet_for() is None
    clock.now = 300.0 + 600.0
    assert log.quiet_for() == 600.0


def test_the_quiet_line_is_said_from_a_thread_in_the_runs_own_context():
    """The flow's run logger sends its lines to the API that the run's settings (context variables) name: said from
    a bare thread, a line found no API and Prefect started a temporary server of its own to send it to."""
    run = contextvars.ContextVar("run", default=None)
    run.set("this run")
    heard, said = [], threading.Event()

    def say(line: str) -> None:
        heard.append((run.get(), line))
        said.set()

    with ProgressLog(RunProgress(3), say, every_s=0.01, poll_s=0.01):
        assert said.wait(60)
    assert heard[0][0] == "this run" and "no shard has ended yet" in heard[0][1], heard
