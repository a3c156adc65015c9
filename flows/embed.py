"""The embedding flow: index the shards, embed each on a Dask worker, validate, report.

    python flows/embed.py INPUT --output OUTPUT [--model NAME] ...   # embed a folder of shards
    python flows/embed.py                                           # the built-in demo
    python flows/embed.py --help
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Optional

# `python flows/embed.py` puts flows/ on the path, not the project root that holds `tasks`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Without PREFECT_API_URL, Prefect starts a temporary local server; on a busy 2-core machine that can take
# longer than its 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import dask  # noqa: E402
from prefect import flow, get_run_logger, unmapped  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from tasks.embed import ShardGroupFailed, embed_shard, embed_shard_group  # noqa: E402
from tasks.index import index_shards  # noqa: E402
from tasks.report import report  # noqa: E402
from tasks.validate import validate_shard  # noqa: E402
from wdsembed import caching, cluster  # noqa: E402
from wdsembed.config import EmbedConfig  # noqa: E402


class ShardsFailed(RuntimeError):
    """Some shards failed; every other shard's output is written and listed in the manifest."""


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
    result_storage = caching.result_storage(config)
    grouped = config.shards_per_task > 1
    cached_task = (embed_shard_group if grouped else embed_shard).with_options(result_storage=result_storage)
    fresh_task = cached_task.with_options(refresh_cache=True)

    # A GPU resource per embedding task keeps two shards off one device, where the workers declare GPUs.
    annotations = {"resources": {"GPU": 1}} if cluster.gpu_slots_declared() else {}
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
    done = 0
    for future in as_completed([unit[0] for unit in units]):
        _, stems, embed_future = by_future[id(future)]
        try:
            outcome = future.result(raise_on_failure=False)
        except Exception as exc:  # noqa: BLE001 - a validation never run (its embedding failed) has no result
            outcome = exc
        finished_now, failed_now = _outcomes(stems, outcome, embed_future)
        for stem, reason in failed_now.items():
            failures[stem] = reason
            logger.error("shard %s failed: %s", stem, reason)
        results.extend(finished_now)
        for result in finished_now + [None] * len(failed_now):
            done += 1
            if _on_shard_done:
                _on_shard_done(result, done, len(plans))
        update_progress_artifact(progress, done / len(plans) * 100)

    manifest = report(config, results, failures, time.perf_counter() - started)
    if failures:
        raise ShardsFailed(f"{len(failures)} of {len(plans)} shard(s) failed: "
                           + "; ".join(f"{s}: {r}" for s, r in sorted(failures.items())))
    return manifest


# Built as flow(...)(function), like the tasks: Dask pickles the run context, which holds the flow, and a
# function shadowed by its Flow object could only be pickled by value, with every global it reads.
embed_shards = flow(name="embed-shards", log_prints=True)(embed_dataset)


def _outcomes(stems: list[str], outcome, embed_future) -> tuple[list[dict], dict[str, str]]:
    """The finished shards' results (marked cached when the embedding task run was a cache hit) and the failed
    shards' reasons, of one task (one shard, or a group)."""
    if isinstance(outcome, dict):
        outcome = [outcome]
    if isinstance(outcome, list):
        return [_mark_cached(r, embed_future) for r in outcome], {}
    if isinstance(outcome, ShardGroupFailed):
        return [_mark_cached(r, embed_future) for r in outcome.results], dict(outcome.failures)
    reason = _failure_reason(embed_future, outcome)
    return [], {stem: reason for stem in stems}


def _mark_cached(result: dict, embed_future) -> dict:
    """A cache hit returns the result stored when the shard was computed: report it as cached, with this run's
    (zero) time."""
    embed_future.wait()
    if embed_future.state.name == "Cached" or result.get("cached"):
        return {**result, "cached": True, "seconds": 0.0, "images_per_second": 0.0}
    return result


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
    try:
        with _api_for_workers():
            return embed_shards.with_options(task_runner=runner)(config)
    finally:
        _on_shard_done = None


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
