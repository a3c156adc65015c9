"""Embed WebDataset image shards with any timm model: DALI preprocessing, Prefect + Dask-CUDA orchestration."""

__all__ = ["EmbedConfig", "TimmImageEmbedder"]


def __getattr__(name: str):
    # Lazy: importing the package must not pull in torch, timm or DALI.
    if name == "EmbedConfig":
        from wdsembed.config import EmbedConfig

        return EmbedConfig
    if name == "TimmImageEmbedder":
        from wdsembed.api import TimmImageEmbedder

        return TimmImageEmbedder
    raise AttributeError(name)
