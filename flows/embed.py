"""The embedding flow: index the shards, embed each on a Dask worker, validate, report.

    python flows/embed.py INPUT --output OUTPUT [--model NAME] ...   # embed a folder of shards
    python flows/embed.py                                           # the built-in demo
    python flows/embed.py --help
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import Callable, Optional

# `python flows/embed.py` puts flows/ on the path, not the project root that holds `tasks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Without PREFECT_API_URL, Prefect starts a temporary local server; on a busy 2-core machine that can take
# longer than its 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Its telemetry only logs errors on the offline GPU hosts this often runs on; set it to "true" to send it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The package's own log lines (a damaged tar, an index rebuilt) go to the task run's logs in the UI too; local
# Dask workers inherit this (workers on other nodes: export it there).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "wdsembed")

import dask  # noqa: E402
from prefect import flow, get_run_logger, unmapped  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from tasks.embed import ShardGroupFailed, embed_shard, embed_shard_group, result_storage_for  # noqa: E402
from tasks.index import index_shards  # noqa: E402
from tasks.report import report  # noqa: E402
from tasks.validate import validate_shard  # noqa: E402
from wdsembed import caching, cluster  # noqa: E402
from wdsembed.config import EmbedConfig  # noqa: E402


class ShardsFailed(RuntimeError):
    """Some shards failed; every other shard's output is written and listed in the manifest (`.manifest`)."""

    def __init__(self, message: str, manifest: Optional[dict] = None) -> None:
        super().__init__(message)
        self.manifest = manifest


# Called in the flow's process as each shard ends (the CLI's progress bar); not a flow parameter, since
# parameters travel to the Prefect API.
_on_shard_done: Optional[Callable[[Optional[dict], int, int], None]] = None


def embed_dataset(config: EmbedConfig) -> dict:
    """Embed every WebDataset shard under `config.input` into `config.output`/<shard>.parquet."""
    logger = get_run_logger()
    started = time.perf_counter()
    plans = index_shards(config)
    logger.info("%d shard(s) under %s", len(plans), config.input)
    progress = create_progress_artifact(0.0, key="embedding-progress", description="Shards finished")

    # Resume: Prefect's task cache (results under config.result_storage) skips finished shards, but a cached
    # result says nothing of the output itself. Every output's footer is read here; a shard whose output is missing,
    # damaged or made from other inputs recomputes (refresh_cache), and --force recomputes all.
    finished = set() if config.force else caching.finished_stems(config, plans)
    logger.info("%d shard(s) with a finished output, %d to compute", len(finished), len(plans) - len(finished))
    result_storage = result_storage_for(config)
    grouped = config.shards_per_task > 1
    cached_task = (embed_shard_group if grouped else embed_shard).with_options(result_storage=result_storage)
    fresh_task = cached_task.with_options(refresh_cache=True)

    # A GPU resource per embedding task keeps two shards off one device, where the workers declare GPUs. Asked of
    # this run's own Dask client (its cluster starts here if it has not yet), before anything is submitted.
    annotations = {"resources": {"GPU": 1}} if cluster.gpu_slots_declared(_dask_client()) else {}
    units = []  # (future whose outcome ends the unit, its shards' stems, the embedding future)
    if grouped:
        # One task run embeds and validates several shards: fewer task runs for the API at thousands of shards.
        groups = [plans[i:i + config.shards_per_task] for i in range(0, len(plans), config.shards_per_task)]
        with dask.annotate(**annotations):
            for group in groups:
                task_ = cached_task if all(p.stem in finished for p in group) else fresh_task
                future = task_.submit(config, group)
                units.append((future, [p.stem for p in group], future))
    else:
        with dask.annotate(**annotations):
            embedded = [(cached_task if p.stem in finished else fresh_task).submit(config, p) for p in plans]
        validated = validate_shard.map(unmapped(config), embedded)
        units = [(v, [p.stem], e) for p, e, v in zip(plans, embedded, validated)]

    results, failures = [], {}
    by_future = {id(unit[0]): unit for unit in units}
    done, shown = 0, 0.0
    for future in as_completed([unit[0] for unit in units]):
        _, stems, embed_future = by_future[id(future)]
        try:
            outcome = future.result(raise_on_failure=False)
        except Exception as exc:  # noqa: BLE001 - a validation never run (its embedding failed) has no result
            outcome = exc
        finished_now, failed_now = _outcomes(stems, outcome, embed_future, finished)
        for stem, reason in failed_now.items():
            failures[stem] = reason
            logger.error("shard %s failed: %s", stem, reason)
        if failed_now:
            _record_lost_runs({embed_future, future}, "; ".join(sorted(set(failed_now.values()))))
        results.extend(finished_now)
        for result in finished_now + [None] * len(failed_now):
            done += 1
            if _on_shard_done:
                _on_shard_done(result, done, len(plans))
        if done == len(plans) or done / len(plans) * 100 - shown >= 1:  # one API call per percent at most
            shown = done / len(plans) * 100
            update_progress_artifact(progress, shown)

    manifest = report(config, results, failures, time.perf_counter() - started)
    if failures:
        raise ShardsFailed(f"{len(failures)} of {len(plans)} shard(s) failed: "
                           + "; ".join(f"{s}: {r}" for s, r in sorted(failures.items())), manifest)
    _reported["manifest"] = manifest  # only a run without failed shards
    return manifest


# Built as flow(...)(function), like the tasks: Dask pickles the run context, which holds the flow, and a
# function shadowed by its Flow object could only be pickled by value, with every global it reads.
embed_shards = flow(name="embed-shards", log_prints=True)(embed_dataset)


def _dask_client():
    """The Dask client of the task runner this flow run submits through."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get().task_runner.client


def _outcomes(stems: list[str], outcome, embed_future, finished: set[str]) -> tuple[list[dict], dict[str, str]]:
    """The finished shards' results (with cached set as this run saw it) and the failed shards' reasons, of one
    task (one shard, or a group)."""
    if isinstance(outcome, dict):
        outcome = [outcome]
    if isinstance(outcome, list):
        return [_mark_cached(r, embed_future, finished) for r in outcome], {}
    if isinstance(outcome, ShardGroupFailed):
        return [_mark_cached(r, embed_future, finished) for r in outcome.results], dict(outcome.failures)
    reason = _failure_reason(embed_future, outcome)
    return [], {stem: reason for stem in stems}


def _mark_cached(result: dict, embed_future, finished: set[str]) -> dict:
    """Cached: the task run was a cache hit (its stored result is the one from when the shard was computed), or
    the task found the output done, and it was done before this run. An output found done that this run made (an
    attempt lost with its worker, or a group's retry) counts as computed."""
    embed_future.wait()
    cached = embed_future.state.name == "Cached" or (result.get("cached") and result["stem"] in finished)
    if cached:
        return {**result, "cached": True, "seconds": 0.0, "images_per_second": 0.0}
    return {**result, "cached": False}


def _record_lost_runs(futures, reason: str) -> None:
    """A task run whose worker process died (Dask gave up on it: KilledWorker) stays Running in the API, as nothing
    was left to report its end: mark it Crashed, with the reason, so the UI tells the truth."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is None or wrapped.status != "error":  # the task engine returned a state: nothing was lost
            continue
        try:
            with get_client(sync_client=True) as client:
                state = client.read_task_run(future.task_run_id).state
                if state is None or not state.is_final():
                    client.set_task_run_state(future.task_run_id, Crashed(message=reason[:2000]), force=True)
        except ObjectNotFound:
            pass  # never started: no task run to mark
        except Exception as exc:  # noqa: BLE001 - the report matters more than this mark
            get_run_logger().warning("could not mark task run %s crashed: %s", future.task_run_id, exc)


def _failure_reason(embed_future, validation_outcome) -> str:
    """The first real error: the embedding task's own, else the validation's."""
    try:
        outcome = embed_future.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - a worker lost for good (KilledWorker) raises here
        outcome = exc
    if not isinstance(outcome, BaseException):
        outcome = validation_outcome
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {outcome}"
    return str(outcome)


def run(config: EmbedConfig, on_shard_done=None) -> dict:
    """Run the flow with the Dask task runner this config asks for (local GPUs, CPU workers, or a scheduler)."""
    global _on_shard_done
    runner = DaskTaskRunner(**cluster.task_runner_kwargs(config))
    _on_shard_done = on_shard_done
    _reported.clear()
    try:
        with _api_for_workers():
            return embed_shards.with_options(task_runner=runner)(config)
    except (TimeoutError, asyncio.CancelledError) as exc:
        # Every shard finished and the manifest is written; only the local Dask cluster's shutdown ran out of time
        # (seen on a loaded 2-core machine). The run's work is whole: report it, not a failed run.
        if "manifest" not in _reported:
            raise
        logging.getLogger("wdsembed").warning("the run completed, but its Dask cluster did not shut down in time "
                                              "(%r); outputs and manifest are complete", exc)
        return _reported["manifest"]
    finally:
        _on_shard_done = None
        _reported.clear()


# The manifest of the flow run that just ended in this process (the flow runs in-process): kept by run() when only
# the task runner's shutdown fails after it.
_reported: dict = {}


def _api_for_workers():
    """Without PREFECT_API_URL, Prefect starts a temporary API server for this process, and each Dask worker
    process, not knowing it, would start one of its own on the same SQLite file (slow, "database is locked").
    Start it here and give its URL to the workers with the run's settings. Workers on other nodes cannot reach it:
    with --dask-address, set PREFECT_API_URL to a server every node reaches."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


if __name__ == "__main__":
    # Run through the importable module, not __main__: Dask pickles tasks by reference to their module.
    import flows.embed

    from wdsembed.cli import main

    sys.exit(main(flows.embed.run))
