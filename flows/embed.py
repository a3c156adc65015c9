"""The embedding flow: index the shards, embed each on a Dask worker, validate, report.

    python flows/embed.py INPUT --output OUTPUT [--model NAME] ...   # embed a folder of shards
    python flows/embed.py                                           # the built-in demo
    python flows/embed.py --help
"""
from __future__ import annotations

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

from tasks.embed import embed_shard  # noqa: E402
from tasks.index import index_shards  # noqa: E402
from tasks.report import report  # noqa: E402
from tasks.validate import validate_shard  # noqa: E402
from wdsembed import cluster  # noqa: E402
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

    # A GPU resource per task keeps two shards off one device; the local clusters declare it per worker.
    annotations = {"resources": {"GPU": 1}} if cluster.uses_gpus(config) else {}
    with dask.annotate(**annotations):
        embedded = embed_shard.map(unmapped(config), plans)
        validated = validate_shard.map(unmapped(config), embedded)

    results, failures = [], {}
    upstream = {id(v): (plan.stem, e) for plan, e, v in zip(plans, embedded, validated)}
    for done, future in enumerate(as_completed(list(validated)), start=1):
        stem, embed_future = upstream[id(future)]
        result = future.result(raise_on_failure=False)
        if isinstance(result, dict):
            results.append(result)
        else:
            failures[stem] = _failure_reason(embed_future, result)
            logger.error("shard %s failed: %s", stem, failures[stem])
            result = None
        update_progress_artifact(progress, done / len(plans) * 100)
        if _on_shard_done:
            _on_shard_done(result, done, len(plans))

    manifest = report(config, results, failures, time.perf_counter() - started)
    if failures:
        raise ShardsFailed(f"{len(failures)} of {len(plans)} shard(s) failed: "
                           + "; ".join(f"{s}: {r}" for s, r in sorted(failures.items())))
    return manifest


# Built as flow(...)(function), like the tasks: Dask pickles the run context, which holds the flow, and a
# function shadowed by its Flow object could only be pickled by value, with every global it reads.
embed_shards = flow(name="embed-shards", log_prints=True)(embed_dataset)


def _failure_reason(embed_future, validation_outcome) -> str:
    """The first real error: the embedding task's own, else the validation's."""
    outcome = embed_future.result(raise_on_failure=False)
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
        return embed_shards.with_options(task_runner=runner)(config)
    finally:
        _on_shard_done = None


if __name__ == "__main__":
    # Run through the importable module, not __main__: Dask pickles tasks by reference to their module.
    import flows.embed

    from wdsembed.cli import main

    sys.exit(main(flows.embed.run))
