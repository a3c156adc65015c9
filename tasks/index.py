from prefect import task

from tasks.retries import retry_if_transient
from wdsembed.config import EmbedConfig
from wdsembed.plan import Listed, plan_run
from wdsembed.shard import ShardPlan


def list_and_index_shards(config: EmbedConfig) -> tuple[list[ShardPlan], set[str], set[str]]:
    """List the shards (or take the run's checks' listing of them: Listed.after_checks), fingerprint them, find
    those whose output is finished (their stems), and write DALI .idx files where missing for the others; and every
    file under OUTPUT, as the planning listed them (for retire_manifest, which would list OUTPUT again)."""
    listed = Listed.after_checks(config)
    plans, finished = plan_run(config, listed=listed)
    # Only the stems: each finished shard's task comes back from Prefect's cache with its result, or, where that
    # has none, from its plan's (ShardPlan.finished_result).
    return plans, set(finished), listed.output_files()


# A fixed run name: Prefect's default adds a random suffix (index-shards-572) that tells the UI's user nothing.
index_shards = task(
    name="index-shards", task_run_name="index-shards", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient
)(list_and_index_shards)
