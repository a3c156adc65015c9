"""Finding the shards of a run and what each needs: fingerprint, siblings, index, output path."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from wdsembed import shards, storage
from wdsembed.config import EmbedConfig
from wdsembed.shard import ShardPlan

log = logging.getLogger("wdsembed")


class InputError(ValueError):
    """The run's input cannot be used; says what to change."""


def check_config(config: EmbedConfig) -> None:
    """Refuse a run that cannot work, before any work starts, saying what to change."""
    from wdsembed.model import ModelLoadError, check_model_name

    try:
        check_model_name(config.model_name)  # the architecture and its pretrained tag, with suggestions
    except ModelLoadError as exc:
        raise InputError(f"{exc} Pass --model a name from timm.list_models() / timm.list_pretrained().") from None
    if config.checkpoint:
        fs, path = storage.filesystem(config.checkpoint, config.storage_options)
        if not fs.isfile(path):
            raise InputError(f"checkpoint {config.checkpoint!r} is not a file: pass the path of a weights file "
                             "(.safetensors, .pth, .bin), or leave --checkpoint out")
        if storage.is_local(fs):
            _check_checkpoint_fits(config)
    _check_local_input(config)
    check_storage(config)
    in_fs, in_root = storage.filesystem(config.input, config.storage_options)
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    if storage.is_local(in_fs) and storage.is_local(out_fs):  # through symlinks too
        in_root, out_root = os.path.realpath(in_root), os.path.realpath(out_root)
    if in_fs.protocol == out_fs.protocol and (out_root == in_root or out_root.startswith(in_root.rstrip("/") + "/")):
        raise InputError(f"output {config.output!r} is inside input {config.input!r}: choose a folder outside it, "
                         "so outputs are never read as shards")
    try:
        exists = in_fs.isdir(in_root)
    except PermissionError as exc:
        raise InputError(f"input {config.input!r} cannot be read: {exc}") from exc
    if not exists:
        raise InputError(f"input {config.input!r} is not a folder (or cannot be reached)")


def _check_local_input(config: EmbedConfig) -> None:
    """A local input folder must exist and be readable, with every shard in it: said in local terms (the store
    check that follows speaks of buckets and credentials)."""
    fs, root = storage.filesystem(config.input, config.storage_options)
    if not storage.is_local(fs):
        return
    if not os.path.exists(root):
        raise InputError(f"input {config.input!r} does not exist: pass the folder that holds the *.tar shards")
    if not os.path.isdir(root):
        raise InputError(f"input {config.input!r} is not a folder: pass the folder that holds the *.tar shards")
    try:
        names = os.listdir(root)
    except PermissionError as exc:
        raise InputError(f"input {config.input!r} cannot be read by this user ({exc.strerror}): give it read and "
                         f"execute permission (chmod a+rx) or run as a user who can read it") from None
    unreadable = sorted(n for n in names if n.lower().endswith(".tar") and not os.access(os.path.join(root, n), os.R_OK))
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise InputError(f"{len(unreadable)} shard(s) under {config.input!r} cannot be read by this user ({shown}): "
                         "give them read permission (chmod a+r) or run as a user who can read them")


def _check_checkpoint_fits(config: EmbedConfig) -> None:
    """Read the checkpoint and load it into the model built on the meta device (no memory, no forward pass): a
    file that is not a state dict, or one of another model, is refused here rather than in every shard's task."""
    from wdsembed.model import ModelLoadError, load_model

    try:
        load_model(config.model_name, pretrained=config.pretrained, checkpoint=config.checkpoint,
                   embedding=config.embedding, device="meta")
    except ModelLoadError as exc:
        raise InputError(f"{exc}\n  pass --checkpoint a weights file of {config.model_name!r} (a timm/PyTorch state "
                         "dict in .safetensors, .pth or .bin), or the --model it was trained as") from None


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
    cache_dir = config.index_cache()

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
                # (shard.process_shard), not here: that would download every shard twice, serially, up front.
                found = shards.ensure_index(tar, fs, cache_dir, build=storage.is_local(fs))
                index = found.path if found else None
                if index is not None and index == shards.index_path_for(tar):
                    index = storage.to_url(fs, index)  # beside the shard: s3://bucket/.../00000.idx
            except shards.IndexFormatError as exc:
                # Member names that the .idx format cannot hold (spaces): the shard is read without one.
                log.warning("shard %s: no .idx (%s); reading it without one", tar, exc)
            except shards.ShardReadError as exc:
                # A truncated or corrupt tar: its task embeds the samples before the damage and names the rest
                # (shard.process_shard); it never stops the planning of every other shard.
                if exc.offset == 0:  # not a tar at all: its task fails, naming it (shard.process_shard)
                    log.warning("shard %s is not a readable tar (%s)", tar, exc)
                else:
                    log.warning("shard %s cannot be indexed (%s); its intact samples are read without an index",
                                tar, exc)
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
