"""Embed WebDataset image shards with any timm model: DALI preprocessing, Prefect + Dask-CUDA orchestration."""

__all__ = ["EmbedConfig", "TimmImageEmbedder", "ImageTextPairDataset", "get_client", "embedding_matrix"]

# name -> module: imported on first use, so that importing the package pulls in neither torch, timm nor DALI.
_EXPORTS = {
    "EmbedConfig": "wdsembed.config",
    "TimmImageEmbedder": "wdsembed.api",
    "ImageTextPairDataset": "wdsembed.nemo",
    "get_client": "wdsembed.nemo",
    "embedding_matrix": "wdsembed.reading",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wdsembed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
