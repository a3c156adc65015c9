"""The flow that deployments run (prefect.yaml, deployments/serve.py).

A deployment's entrypoint must be a flow object, but the Dask task runner depends on the run's parameters
(local GPUs, CPU workers, or a scheduler address). So this thin flow receives the config, refuses an unusable
one, then runs `embed-shards` as a subflow with the runner that config asks for (`flows.embed.run`).
"""
from __future__ import annotations

from prefect import flow

from flows.embed import run
from wdsembed.config import EmbedConfig
from wdsembed.plan import check_config


@flow(name="wdsembed", log_prints=True)
def embed(config: EmbedConfig) -> dict:
    """Embed the WebDataset shards under `config.input` into one parquet per shard under `config.output`.
    Shards whose finished output exists are not recomputed (they come back cached)."""
    # Fail in seconds, naming what to change (unknown model, missing folder, output inside input), before a
    # Dask cluster starts. Field bounds (batch_size >= 1, ...) were checked by the API when the run was created.
    # Its answer (is every output finished?) goes on to the run, which would otherwise ask again.
    return run(config, all_finished=check_config(config))
