"""A run's progress as its shards end: counts, images/s, time left, and how long since a shard last ended.

Read by the command's progress bar (wdsembed.cli) and said in the run's log (ProgressLog, from the flow), for those
who read the log rather than a terminal: a run's stdout that is a file or a pipe, where the bar shows only its
last state, and the Prefect UI. Plain Python: the flow feeds it the shards' results as they come back.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from wdsembed.threads import Watch


def format_rate(rate: float) -> str:
    """Images/s: one decimal below 10 (a CPU run, a first shard's model load), where whole numbers would read 0."""
    return f"{rate:,.1f}" if rate < 10 else f"{rate:,.0f}"


def format_duration(seconds: float) -> str:
    """45 s, 1 min 40 s, 12 min, 3 h 05 min: as precise as a wait of that length needs."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    if seconds < 600:
        minutes, seconds = divmod(round(seconds), 60)
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class RunProgress:
    """The shards of one run as they end. `total` is None until the run's shards are planned; `finished_before`:
    those the planning found finished, which come back at once (cached) and take no share of the time left.
    Thread-safe: the flow's loop feeds it while ProgressLog's thread reads it."""

    def __init__(self, total: Optional[int] = None, finished_before: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.finished_before, self.clock = total, finished_before, clock
        self.started = clock()
        self.last_end: Optional[float] = None  # when a shard last ended
        self.longest_gap = 0.0  # the longest wait for a shard's end so far, from the start: what "slow" is here
        self.ended = self.failed = self.cached = self.images = 0
        self._lock = threading.Lock()

    def planned(self, total: int, finished_before: int = 0) -> None:
        with self._lock:
            self.total, self.finished_before = total, finished_before

    def shard_ended(self, result: Optional[dict]) -> None:
        """A shard came back: its result, or None where it failed."""
        with self._lock:
            now = self.clock()
            self.longest_gap = max(self.longest_gap, now - (self.last_end or self.started))
            self.last_end = now
            self.ended += 1
            if result is None:
                self.failed += 1
            elif result.get("cached"):
                self.cached += 1
            else:
                self.images += result["embedded"]

    def rate(self) -> Optional[float]:
        """Images embedded per second since the start; None while none was (a run finding every output finished)."""
        return self.images / max(self.clock() - self.started, 1e-9) if self.images else None

    def seconds_left(self) -> Optional[float]:
        """The time the shards not ended yet will take at the pace of those that took work so far (computed or
        failed; the cached ones took none, nor will those the planning found finished); None before one did."""
        with self._lock:
            if self.total is None:
                return None
            worked = self.ended - self.cached
            to_work = self.total - self.ended - max(0, self.finished_before - self.cached)
            if to_work <= 0:
                return 0.0
            if worked <= 0:
                return None
            return (self.clock() - self.started) * to_work / worked

    def line(self) -> str:
        return f"progress: {self.words()}"

    def words(self) -> str:
        """120 of 1,000 shard(s) ended (12%), 2 failed; 45,000 images at 1,234 images/s; about 2 h 10 min left"""
        total = self.total or 0
        percent = f" ({100 * self.ended / total:.0f}%)" if total else ""
        failed = f", {self.failed:,} failed" if self.failed else ""
        rate = self.rate()
        images = f"; {self.images:,} images at {format_rate(rate)} images/s" if rate is not None else ""
        left = self.seconds_left()
        left = f"; about {format_duration(left)} left" if left else ""
        return f"{self.ended:,} of {total:,} shard(s) ended{percent}{failed}{images}{left}"

    def quiet_line(self) -> str:
        """What the log says where no shard has ended for a while: how long, against the longest wait before, so
        that a stalled run can be told from a slow one."""
        now = self.clock()
        if self.last_end is None:
            return (f"progress: no shard has ended yet, {format_duration(now - self.started)} after the start "
                    f"(0 of {self.total or 0:,}; each worker loads the model before its first shard)")
        return (f"progress: no shard has ended for {format_duration(now - self.last_end)} ({self.ended:,} of "
                f"{self.total or 0:,} ended; the longest wait between two ends before was "
                f"{format_duration(self.longest_gap)}): a run this quiet may be stalled; Dask's dashboard shows what "
                "each worker is doing")


# The least time between two of the run's progress lines in its log (seconds): a line a minute, whatever the number
# of shards (a run of 10,000 shards says its progress in a few hundred lines, not one per shard).
PROGRESS_LOG_EVERY_S = 60.0


class ProgressLog(Watch):
    """The run's progress in its log (`say`, a logger's method): a line as a shard ends, at most one per `every_s`;
    and, from a thread, one where no shard has ended for `every_s`, or for 3 times the longest wait between two ends
    so far where that is longer, then at each doubling of the wait (a stalled run says so a few times, not once a
    minute for hours). A `with` block."""

    thread_name = "wdsembed-progress-log"

    def __init__(self, progress: RunProgress, say: Callable[[str], None], every_s: Optional[float] = None,
                 poll_s: float = 1.0) -> None:
        # Its thread runs in the flow's own context: its run logger's lines reach the run's API (threads.Watch).
        super().__init__(poll_s)
        self.progress, self.say = progress, say
        self.every_s = PROGRESS_LOG_EVERY_S if every_s is None else every_s  # read at the run's start
        self.last_said = progress.started
        self._quiet_said = 0.0  # the silence last said (seconds), reset as a shard ends

    def shard_ended(self, result: Optional[dict]) -> None:
        self.progress.shard_ended(result)
        self._quiet_said = 0.0
        now = self.progress.clock()
        if now - self.last_said >= self.every_s and self.progress.ended < (self.progress.total or 0):
            self.last_said = now  # not at the last shard: the summary follows at once
            self.say(self.progress.line())

    def quiet_for(self) -> Optional[float]:
        """How long no shard has ended, where that is worth a line now (None where not)."""
        p = self.progress
        quiet = p.clock() - (p.last_end or p.started)
        due = max(self.every_s, 3 * p.longest_gap, 2 * self._quiet_said)
        return quiet if quiet >= due and self.every_s > 0 else None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            quiet = self.quiet_for()
            if quiet is not None:
                self._quiet_said = quiet
                self.last_said = self.progress.clock()
                self.say(self.progress.quiet_line())
