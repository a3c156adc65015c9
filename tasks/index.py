from prefect import task

from wdsembed.config import EmbedConfig
from wdsembed.plan import plan_shards
from wdsembed.runner import ShardPlan


def list_and_index_shards(config: EmbedConfig) -> list[ShardPlan]:
    """List the shards, fingerprint them, and write DALI .idx files where missing."""
    return plan_shards(config)


index_shards = task(name="index-shards", retries=2, retry_delay_seconds=5)(list_and_index_shards)
