from __future__ import annotations

from prefect import task
from prefect.context import TaskRunContext

from wdsembed import faults, runner
from wdsembed.config import EmbedConfig
from wdsembed.runner import ShardPlan

# The batch size halves on each retry that follows an out-of-memory error in this worker process
# (Prefect retries run in the same Dask task, so this survives between attempts).
_OOM_HALVINGS: dict[str, int] = {}


def shard_cache_key(context: TaskRunContext, parameters: dict) -> str:
    return "embed-" + runner.cache_key(parameters["config"], parameters["plan"])


def retry_if_transient(task, task_run_, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and faults.is_transient(exc)


def embed_one_shard(config: EmbedConfig, plan: ShardPlan) -> dict:
    """Embed one shard on this worker's GPU (or CPU) and write its parquet whole."""
    halvings = _OOM_HALVINGS.get(plan.shard, 0)
    if halvings:
        config = config.model_copy(update={"batch_size": max(1, config.batch_size >> halvings)})
    try:
        faults.maybe_inject(plan.stem)
        return runner.embed_shard(config, plan).to_dict()
    except BaseException as exc:
        if faults.is_out_of_memory(exc):
            _OOM_HALVINGS[plan.shard] = halvings + 1
        raise


embed_shard = task(
    name="embed-shard",
    task_run_name="embed-{plan.stem}",
    cache_key_fn=shard_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_if_transient,
)(embed_one_shard)
