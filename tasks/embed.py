from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

from tasks.validate import validate_one_shard
from wdsembed import caching, faults, runner, storage
from wdsembed.config import EmbedConfig
from wdsembed.runner import ShardPlan

# This task's own code is part of the cache key (wdsembed's code and the libraries are in runner.cache_key).
TASK_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

# The batch size halves on each retry that follows an out-of-memory error in this worker process
# (Prefect retries run in the same Dask task, so this survives between attempts).
_OOM_HALVINGS: dict[str, int] = {}


def result_storage_for(config: EmbedConfig):
    """Prefect's result storage for the embedding tasks (their cache): config.result_storage, default
    OUTPUT/_prefect_results, a folder or fsspec URL that every worker reaches.

    A local folder is passed as a Path. Prefect wants any other storage as a saved block: a RemoteFileSystem block
    named after the URL is saved (overwritten) with `storage_options` as its settings, which hold no credentials
    (EmbedConfig refuses them; each worker takes keys from its own environment)."""
    url = caching.result_storage_url(config)
    fs, path = storage.filesystem(url, config.storage_options)
    if storage.is_local(fs):
        return Path(path)
    from prefect.filesystems import RemoteFileSystem

    settings = storage.fsspec_options(url, config.storage_options)
    block = RemoteFileSystem(basepath=url.rstrip("/"), settings=settings)
    digest = hashlib.sha256(json.dumps([url, settings], sort_keys=True, default=str).encode()).hexdigest()[:12]
    block.save(f"wdsembed-results-{digest}", overwrite=True)
    return block


def shard_cache_key(context: TaskRunContext, parameters: dict) -> str:
    return f"embed-{TASK_CODE}-" + runner.cache_key(parameters["config"], parameters["plan"])


def group_cache_key(context: TaskRunContext, parameters: dict) -> str:
    keys = [runner.cache_key(parameters["config"], plan) for plan in parameters["plans"]]
    return f"embed-group-{TASK_CODE}-" + hashlib.sha256(" ".join(keys).encode()).hexdigest()[:32]


def retry_if_transient(task, task_run_, state) -> bool:
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, ShardGroupFailed):
        return exc.transient
    return isinstance(exc, BaseException) and faults.is_transient(exc)


def embed_one_shard(config: EmbedConfig, plan: ShardPlan) -> dict:
    """Embed one shard on this worker's GPU (or CPU) and write its parquet whole."""
    halvings = _OOM_HALVINGS.get(plan.shard, 0)
    if halvings:
        config = config.model_copy(update={"batch_size": max(1, config.batch_size >> halvings)})
    try:
        faults.maybe_inject(plan.stem)
        result = runner.embed_shard(config, plan).to_dict()
    except BaseException as exc:
        if faults.is_out_of_memory(exc):
            _OOM_HALVINGS[plan.shard] = halvings + 1
            _log().warning("shard %s: out of memory at batch size %d; a retry halves it", plan.stem, config.batch_size)
        raise
    _log().info("shard %s: %s, %d rows, %d embedded, %d without embedding, %.1f s", plan.stem,
                "output already done" if result["cached"] else "embedded", result["rows"], result["embedded"],
                result["failed"], result["seconds"])
    return result


def _log():
    """The task run's logger (its lines show under the task run in the UI), or a plain one outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return runner.log


# Shared by the one-shard and the group task: JSON results persisted for the cache, retries only when they can pass.
_EMBED_TASK_OPTIONS = dict(
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
)

embed_shard = task(
    name="embed-shard", task_run_name="embed-{plan.stem}", cache_key_fn=shard_cache_key, **_EMBED_TASK_OPTIONS
)(embed_one_shard)


class ShardGroupFailed(RuntimeError):
    """Some shards of a group failed; `results` holds the group's finished shards, `failures` stem -> reason.
    `transient`: some failure may pass on a retry (the group's finished shards are then found done, not redone)."""

    def __init__(self, message: str, results: list, failures: dict, transient: bool) -> None:
        super().__init__(message, results, failures, transient)
        self.results, self.failures, self.transient = results, failures, transient

    def __str__(self) -> str:
        return self.args[0]


def embed_shards_in_group(config: EmbedConfig, plans: list[ShardPlan]) -> list[dict]:
    """Embed and validate several shards in one task run (shards_per_task > 1), for runs of thousands of shards
    where one task run per shard would load the Prefect API. Every shard is tried; failures are raised together."""
    results, failures, transient = [], {}, False
    for plan in plans:
        try:
            result = validate_one_shard(config, embed_one_shard(config, plan))
        except Exception as exc:  # noqa: BLE001 - every shard's outcome is reported, the first error fails none else
            failures[plan.stem] = f"{type(exc).__name__}: {exc}"
            transient = transient or faults.is_transient(exc)
            continue
        results.append(result)
    if failures:
        raise ShardGroupFailed(
            f"{len(failures)} of {len(plans)} shard(s) failed: "
            + "; ".join(f"{stem}: {reason}" for stem, reason in sorted(failures.items())),
            results, failures, transient,
        )
    return results


def _group_run_name() -> str:
    from prefect.runtime import task_run

    plans = task_run.parameters["plans"]
    return f"embed-{plans[0].stem}" + (f"..{plans[-1].stem}" if len(plans) > 1 else "")


embed_shard_group = task(
    name="embed-shard-group", task_run_name=_group_run_name, cache_key_fn=group_cache_key, **_EMBED_TASK_OPTIONS
)(embed_shards_in_group)
