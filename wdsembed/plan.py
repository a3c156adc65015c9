"""Finding the shards of a run and what each needs: fingerprint, siblings, index, output path."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from wdsembed import shards, storage
from wdsembed.config import EmbedConfig
from wdsembed.runner import ShardPlan

log = logging.getLogger("wdsembed")

DEFAULT_INDEX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "wdsembed", "idx")


class InputError(ValueError):
    """The run's input cannot be used; says what to change."""


def check_config(config: EmbedConfig) -> None:
    """Refuse a run that cannot work, before any work starts, saying what to change."""
    import timm

    if not timm.is_model(config.model_name):
        import difflib

        arch = config.model_name.split(".")[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise InputError(f"unknown timm model {config.model_name!r}" + (f"; did you mean {close}?" if close else ""))
    if config.checkpoint:
        fs, path = storage.filesystem(config.checkpoint, config.storage_options)
        if not fs.isfile(path):
            raise InputError(f"checkpoint {config.checkpoint!r} is not a file")
    check_storage(config)
    in_fs, in_root = storage.filesystem(config.input, config.storage_options)
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    if in_fs.protocol == out_fs.protocol and (out_root == in_root or out_root.startswith(in_root.rstrip("/") + "/")):
        raise InputError(f"output {config.output!r} is inside input {config.input!r}: choose a folder outside it, "
                         "so outputs are never read as shards")
    try:
        exists = in_fs.isdir(in_root)
    except PermissionError as exc:
        raise InputError(f"input {config.input!r} cannot be read: {exc}") from exc
    if not exists:
        raise InputError(f"input {config.input!r} is not a folder (or cannot be reached)")


def check_storage(config: EmbedConfig) -> None:
    """Input listable and output bucket present, with these credentials: a missing bucket or denied access fails
    here, at once and naming the URL, not after the first shard's retries. Writes nothing."""
    try:
        storage.check_input(config.input, config.storage_options)
        storage.check_output(config.output, config.storage_options)
    except storage.StoreError as exc:
        raise InputError(str(exc)) from None


def plan_shards(config: EmbedConfig, *, max_workers: int = 8) -> list[ShardPlan]:
    """List the shards under config.input and prepare each: fingerprint, parquet/stats siblings, .idx (written
    where missing when use_index_files), output path. Cheap per shard except a first-time index."""
    check_storage(config)
    fs, root = storage.filesystem(config.input, config.storage_options)
    if not fs.exists(root):
        raise InputError(f"input {config.input!r} does not exist")
    if not fs.isdir(root):
        raise InputError(f"input {config.input!r} is not a folder of *.tar shards")
    tars = shards.list_shards(root, fs)
    if not tars:
        raise InputError(f"input {config.input!r} holds no *.tar shards")
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    siblings = set(fs.ls(root, detail=False))
    cache_dir = config.index_cache_dir or DEFAULT_INDEX_CACHE

    def plan_one(tar: str) -> ShardPlan:
        stem = os.path.basename(tar)[: -len(".tar")]
        base = tar[: -len(".tar")]
        rows = base + ".parquet" if base + ".parquet" in siblings else None
        stats_path = base + "_stats.json" if base + "_stats.json" in siblings else None
        fingerprint = shards.fingerprint(tar, fs).token
        if rows:
            fingerprint += "|" + shards.fingerprint(rows, fs).token
        index = None
        if config.use_index_files:
            try:
                # On object stores a missing index is built by the worker during its one read of the tar
                # (runner.embed_shard), not here: that would download every shard twice, serially, up front.
                found = shards.ensure_index(tar, fs, cache_dir, build=storage.is_local(fs))
                index = found.path if found else None
                if index is not None and index == shards.index_path_for(tar):
                    index = storage.to_url(fs, index)  # beside the shard: s3://bucket/.../00000.idx
            except shards.IndexFormatError as exc:
                # Member names that the .idx format cannot hold (spaces): the shard is read without one.
                log.warning("shard %s: no .idx (%s); reading it without one", tar, exc)
        return ShardPlan(
            shard=storage.to_url(fs, tar),
            stem=stem,
            fingerprint=fingerprint,
            rows=storage.to_url(fs, rows) if rows else None,
            index=index,
            output=storage.to_url(out_fs, storage.join(out_root, stem + ".parquet")),
            expected_samples=_successes(stats_path, fs),
        )

    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(plan_one, tars))


def _successes(stats_path: Optional[str], fs) -> Optional[int]:
    if not stats_path:
        return None
    stats = shards.read_stats(stats_path, fs)
    value = (stats or {}).get("successes")
    return int(value) if isinstance(value, (int, float)) else None
