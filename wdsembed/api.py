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

from wdsembed import report
from wdsembed.config import DEFAULT_MODEL, EmbedConfig
from wdsembed.plan import plan_shards
from wdsembed.shard import ShardResult, ShardsFailed, process_shard


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

    def __call__(self, input: str, output: str, *, force: Optional[bool] = None) -> list[ShardResult]:
        """Embed every shard under `input` into `output`; returns one ShardResult per shard."""
        config = self.config(input, output)
        if force is not None:
            config = config.model_copy(update={"force": force})
        started = time.perf_counter()
        results, failures = [], {}
        for plan in plan_shards(config):
            try:
                results.append(process_shard(config, plan))
            except Exception as exc:  # noqa: BLE001 - one shard's failure stops no other; all are reported at the end
                failures[plan.stem] = f"{type(exc).__name__}: {exc}"
        dicts = [r.to_dict() for r in results]
        try:
            report.write_manifest(config, report.build_manifest(config, dicts, failures, time.perf_counter() - started))
        except OSError as exc:
            if not failures:
                raise
            # The shards' own failures (often the same cause, e.g. a full disk) are the news; keep them first.
            raise ShardsFailed(failures | {"_manifest.json": f"{type(exc).__name__}: {exc}"}, results) from exc
        if failures:
            raise ShardsFailed(failures, results)
        return results
