"""The Python API, with the parameter names of NeMo Curator's TimmImageEmbedder.

    from wdsembed import TimmImageEmbedder
    embedder = TimmImageEmbedder("vit_large_patch14_clip_quickgelu_224.openai", batch_size=512)
    results = embedder("/data/shards", "/data/embeddings")

Runs in this process on this machine's GPU (or CPU), shard after shard, with no Prefect server or Dask cluster;
the flow in flows/embed.py runs the same code across workers.
"""
from __future__ import annotations

import time
from typing import Optional

from wdsembed import report, runner
from wdsembed.config import DEFAULT_MODEL, EmbedConfig
from wdsembed.plan import plan_shards


class TimmImageEmbedder:
    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: bool = True,
        batch_size: int = 256,
        num_threads_per_worker: int = 4,
        normalize_embeddings: bool = True,
        autocast: bool = True,
        use_index_files: bool = True,
        **options,
    ) -> None:
        """`options` takes any other EmbedConfig field (checkpoint, embedding, id_column, storage_options...)."""
        self.settings = dict(
            model_name=model_name,
            pretrained=pretrained,
            batch_size=batch_size,
            num_threads_per_worker=num_threads_per_worker,
            normalize_embeddings=normalize_embeddings,
            autocast=autocast,
            use_index_files=use_index_files,
            **options,
        )
        # Validate now, so a wrong parameter fails at construction, not at the first shard.
        EmbedConfig(input=".", output="./out", **self.settings)

    def config(self, input: str, output: str) -> EmbedConfig:
        return EmbedConfig(input=input, output=output, **self.settings)

    def __call__(self, input: str, output: str, *, force: Optional[bool] = None) -> list[runner.ShardResult]:
        """Embed every shard under `input` into `output`; returns one ShardResult per shard."""
        config = self.config(input, output)
        if force is not None:
            config = config.model_copy(update={"force": force})
        started = time.perf_counter()
        results = [runner.embed_shard(config, plan) for plan in plan_shards(config)]
        dicts = [r.to_dict() for r in results]
        report.write_manifest(config, report.build_manifest(config, dicts, {}, time.perf_counter() - started))
        return results
