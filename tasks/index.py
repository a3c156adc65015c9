from prefect import task

from wdsembed.config import EmbedConfig
from wdsembed.plan import plan_shards
from wdsembed.runner import ShardPlan


@task(name="index-shards", retries=2, retry_delay_seconds=5)
def index_shards(config: EmbedConfig) -> list[ShardPlan]:
    """List the shards, fingerprint them, and write DALI .idx files where missing."""
    return plan_shards(config)
