"""The embedding task: `wdsembed.shard.process_shards` for a group of one or more shards, with Prefect's cache,
retries for failures that can pass, and the task run's own logger."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Optional

from prefect import task
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.context import TaskRunContext
from prefect.filesystems import RemoteFileSystem

from tasks.expected_ends import log_expected_ends_without_traceback
from tasks.prefect_events import count_api_logs, route_events_by_api_url
from tasks.prefect_settings import share_hydrated_settings
from tasks.prefect_tls import share_api_tls_contexts
from tasks.retries import retry_if_transient
from wdsembed import caching, cluster, report, shard, storage
from wdsembed.config import EmbedConfig
from wdsembed.shard import ShardPlan
from wdsembed.worker import take_unsaid

# On import: the one hook a Dask worker runs before Prefect's task engine (see the modules).
share_api_tls_contexts()
share_hydrated_settings()
route_events_by_api_url()
count_api_logs()
log_expected_ends_without_traceback()


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
    settings = storage.fsspec_options(url, config.storage_options)
    block = ResultFolder(basepath=url.rstrip("/"), settings=settings)
    digest = hashlib.sha256(json.dumps([url, settings], sort_keys=True, default=str).encode()).hexdigest()[:12]
    block.save(f"wdsembed-results-{digest}", overwrite=True)
    return block


class ResultFolder(RemoteFileSystem):
    """Prefect's RemoteFileSystem, but a stored result read for the task cache's lookup is not read again at once:
    Prefect asks whether a cached result exists, then reads it, and each reads the whole object
    (prefect.results.ResultStore._exists): two GETs per cached task run on an object store. The bytes just read are
    kept for the next read of the same path, once, for a few seconds (the lookup's own read follows at once)."""

    _block_type_name = "wdsembed result folder"

    async def aread_path(self, path: str) -> bytes:
        held = _take_read(self.basepath, path)
        if held is None:
            held = await super().aread_path(path)
            _keep_read(self.basepath, path, held)
        return held

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        held = _take_read(self.basepath, path)
        if held is None:
            held = super().read_path(path, _sync=True)
            _keep_read(self.basepath, path, held)
        return held

    async def awrite_path(self, path: str, content: bytes) -> str:
        _take_read(self.basepath, path)  # a result written anew is never answered with the bytes it replaced
        return await super().awrite_path(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        _take_read(self.basepath, path)
        return super().write_path(path, content, _sync=True)


_READ_KEPT_S = 10.0
_read_kept: dict[tuple[str, str], tuple[float, bytes]] = {}
_read_kept_lock = threading.Lock()


def _keep_read(base: str, path: str, content: bytes) -> None:
    now = time.monotonic()
    with _read_kept_lock:
        for key in [k for k, (at, _) in _read_kept.items() if now - at > _READ_KEPT_S]:
            del _read_kept[key]
        _read_kept[(base, path)] = (now, content)


def _take_read(base: str, path: str) -> Optional[bytes]:
    """The bytes of `path` read within _READ_KEPT_S, once (the second of the two reads of one lookup)."""
    with _read_kept_lock:
        at, content = _read_kept.pop((base, path), (0.0, None))
    return content if time.monotonic() - at <= _READ_KEPT_S else None


def group_cache_key(context: TaskRunContext, parameters: dict) -> str:
    # Each shard's cache key and its output: a stored result names its shard and output, and must come back only
    # for them (two shards of one size and mtime have one key; one result storage may serve several outputs).
    keys = [f"{plan.output}\x00{shard.cache_key(parameters['config'], plan)}" for plan in parameters["plans"]]
    return "embed-" + hashlib.sha256(" ".join(keys).encode()).hexdigest()[:32]


def embed_and_log(config: EmbedConfig, plans: list[ShardPlan], claim_run: Optional[str] = None) -> list[dict]:
    """Embed, validate and write the group's shards on this worker's GPU (or CPU); a line per shard in the task
    run's log. `claim_run`: the id of the flow run's claim on OUTPUT, under which the shards are written (in no
    cache key: group_cache_key reads only the config and the plans)."""
    _announce_start(plans)
    log = _run_logger()
    abandoned = cluster.task_abandoned()
    left = [len(plans)]
    # The shards the planning found finished: their line would say it again (the flow's "N shard(s) with a finished
    # output" and the summary do), one per shard of every group whose cached result Prefect lacks (a re-run that
    # groups them otherwise: 4,000 lines for 10 new shards beside 4,000 finished ones).
    planned_done = {p.stem for p in plans if p.finished_result is not None}

    def said_as_it_ends(stem: str, result: Optional[shard.ShardResult], reason: Optional[str]) -> None:
        # Each shard's line as it ends: a group of many shards would say them all only at its end, a failed
        # shard's reason with them. A shard whose failure ends its task run (a one-shard task's, the group's last)
        # is said by that end, at once, not twice here.
        left[0] -= 1
        for line in take_unsaid():  # what this process's Worker runs on and with, once, before its first shard's line
            log.info("%s", line)
        if result is not None:
            if not (result.cached and stem in planned_done):
                _log_result(log, result.to_dict())
        elif left[0]:
            log.error("shard %s failed: %s (the %d shard(s) after it in its task run go on)", stem, reason, left[0])

    try:
        # The group stops, its shard being embedded unwritten, once Dask no longer wants the task's result.
        results = shard.process_shards(config, plans, claim_run=claim_run, abandoned=abandoned,
                                       first_attempt=_first_attempt(), on_shard_end=said_as_it_ends)
    except shard.ShardAbandoned:
        if getattr(abandoned, "why", lambda: None)() is None:  # cancelled by its run: Failed, as it says
            raise
        # Its worker closing (its scheduler lost): Crashed, as the flow marks such a task run, which this state,
        # sent after that mark, would otherwise replace with a Failed one.
        from prefect.states import Crashed

        return Crashed(message=f"shard(s) {report.name_shards([p.stem for p in plans])} lost: its Dask worker "
                               "closed mid-shard (its Dask scheduler was lost mid-run, or the worker was stopped) "
                               "and stopped it unwritten; a re-run computes it")
    return [r.to_dict() for r in results]


def _first_attempt() -> bool:
    """Whether this is the task run's first try: not a Prefect retry (run again in the same Dask task), nor a Dask
    task run again after its worker died under it, which Prefect counts as a first try (cluster.started_before)."""
    context = TaskRunContext.get()
    return context is not None and context.task_run.run_count <= 1 and not cluster.started_before()


def _announce_start(plans: list[ShardPlan]) -> None:
    """The flow run waits for its first task's start before it submits the others (flows.embed)."""
    from prefect.runtime import flow_run

    if flow_run.id and plans:
        cluster.announce_task_start(str(flow_run.id), plans[0].stem)


def _log_result(log, r: dict) -> None:
    why = report.describe_row_causes(r) if r["failed"] else ""
    log.info("shard %s: %s, %d rows, %d embedded, %d without embedding%s, %.1f s", r["stem"],
             "output already done" if r["cached"] else "embedded", r["rows"], report.embedded_rows(r), r["failed"],
             f" ({why})" if why else "", r["seconds"])


def _run_logger() -> logging.Logger:
    """The task run's logger (its lines show under the task run in the UI), or a plain one outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("wdsembed")


def run_name(plans: list[ShardPlan]) -> str:
    """The name of the task run of a group of shards: embed-00000, or embed-00000..00009."""
    return f"embed-{plans[0].stem}" + (f"..{plans[-1].stem}" if len(plans) > 1 else "")


def _run_name() -> str:
    from prefect.runtime import task_run

    return run_name(task_run.parameters["plans"])


embed_shards = task(
    name="embed-shards",
    task_run_name=_run_name,
    cache_key_fn=group_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
)(embed_and_log)
