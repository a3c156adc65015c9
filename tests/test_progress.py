"""What a long run says while it runs: its progress (shards ended of all, failed ones, images/s, the time left) in
its log a line a minute at most, a line where no shard has ended for long, and each shard of a task's group as it
ends, a failed one's reason with it. Clocks are given, never waited on; the group is embedded for real (DALI, the
tiny timm model on the CPU)."""
from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
from pathlib import Path

import pytest

from conftest import TINY_MODEL

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


def test_a_group_says_each_shard_as_it_ends_and_a_failed_one_at_its_failure(tmp_path, monkeypatch):
    """A task run of many shards (above 1,000 shards, by default) logged each shard's line, and said nothing of a
    failed one, until the whole group had ended: a shard that failed first was heard of 20 shards later. Each line
    now comes as its shard ends, before the next shard is written."""
    import json

    from tasks.embed import embed_and_log
    from wdsembed import plan
    from wdsembed.config import EmbedConfig
    from wdsembed.shard import ShardsFailed
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=3, per_shard=4, failed_per_shard=1)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"00001": {"fail_attempts": 1000, "error": "fatal"}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(faults))
    out = tmp_path / "out"
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(out), model_name=TINY_MODEL, pretrained=False,
                         device="cpu", batch_size=4, num_threads_per_worker=1)
    plans = plan.plan_shards(config)

    heard: list[tuple[str, list[str]]] = []  # each shard line, with the outputs written when it was said

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("shard 0000"):
                heard.append((message, sorted(p.name for p in out.glob("0000*.parquet"))))

    handler, logger = Heard(), logging.getLogger("wdsembed")  # a task run's own logger, outside a run
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(ShardsFailed):
            embed_and_log(config, plans)
        heard_alone = len(heard)
        with pytest.raises(ShardsFailed):  # alone in its task run: its end says it, once
            embed_and_log(config, [p for p in plans if p.stem == "00001"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [(message.split(",")[0].split(":")[0], written) for message, written in heard[:heard_alone]] == [
        ("shard 00000", ["00000.parquet"]),
        ("shard 00001 failed", ["00000.parquet"]),  # before 00002 is written
        ("shard 00002", ["00000.parquet", "00002.parquet"]),
    ], heard
    assert "shard 00001 failed: " in heard[1][0] and "the 1 shard(s) after it in its task run go on" in heard[1][0]
    assert len(heard) == heard_alone, heard[heard_alone:]
    assert Path(out / "00001.parquet").exists() is False


def test_a_shard_whose_end_cannot_be_said_keeps_its_outcome(tmp_path, caplog):
    """on_shard_end (a log line) that raises once the shard is written: the shard is one of the group's results,
    not reported failed beside an output it wrote, and the group's next shard still runs."""
    from wdsembed import plan
    from wdsembed.config import EmbedConfig
    from wdsembed.shard import process_shards
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=2, per_shard=3)
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name=TINY_MODEL,
                         pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)

    def broken(stem, result, reason):
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        results = process_shards(config, plan.plan_shards(config), on_shard_end=broken)
    assert [r.stem for r in results] == ["00000", "00001"] and all(r.embedded == 3 for r in results)
    assert sorted(p.name for p in (tmp_path / "out").glob("0000*.parquet")) == ["00000.parquet", "00001.parquet"]
    said = [r.getMessage() for r in caplog.records if "could not be said" in r.getMessage()]
    assert len(said) == 2 and "No space left on device" in said[0], said


def test_a_group_says_nothing_of_the_shards_the_planning_found_finished(tmp_path):
    """A re-run that groups its shards otherwise than the run that made them (10 shards added to 4,000: groups of 5,
    not 4) finds no cached result in Prefect for any group, and each group's task found its finished outputs done:
    one 'output already done' line per finished shard, 4,000 lines, each also sent to the Prefect API, where the
    planning had already said how many were finished. Only the shards the planning did not find finished are said;
    one found done only by the task (written since by an earlier attempt) still is."""
    from tasks.embed import embed_and_log
    from wdsembed import plan
    from wdsembed.config import EmbedConfig
    from wdsembed.shard import process_shards
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=3, per_shard=2)
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name=TINY_MODEL,
                         pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)
    process_shards(config, [p for p in plan.plan_shards(config) if p.stem in ("00000", "00001")])
    plans, finished = plan.plan_run(config)
    assert sorted(finished) == ["00000", "00001"]
    # 00001 as a plan that does not know it is finished: found done by the task itself
    plans = [dataclasses.replace(p, finished_result=None) if p.stem == "00001" else p for p in plans]

    heard: list[str] = []

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("shard 0000"):
                heard.append(record.getMessage())

    handler, logger = Heard(), logging.getLogger("wdsembed")  # a task run's own logger, outside a run
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        results = embed_and_log(config, plans)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [(r["stem"], r["cached"]) for r in results] == [("00000", True), ("00001", True), ("00002", False)]
    assert [line.split(",")[0] for line in heard] == ["shard 00001: output already done", "shard 00002: embedded"], \
        heard
