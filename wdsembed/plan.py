"""Checking a run before it starts, and planning it: what each shard needs (fingerprint, siblings, index, output
path), which outputs are finished, and which are to compute. Which shards INPUT names is wdsembed.inputs'.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import re
import sys
from contextvars import ContextVar
from typing import Any, Collection, Optional

from wdsembed import caching, output, outputclaim, report, shard, shardindex, shards, storage, tarstream
from wdsembed.config import EmbedConfig, option
from wdsembed.inputs import (
    FoundShards,
    InputError,
    check_path_names,
    compressed_file,
    find_shards,
    SKIPPED_PREFIXES,
    input_folder,
    input_kind,
    refuse_wildcard,
)
from wdsembed.shard import ShardPlan
from wdsembed.threads import ContextThreadPool

log = logging.getLogger("wdsembed")


def check_config(config: EmbedConfig, *, on_current_client: bool = False) -> bool:
    """Refuse a run that cannot work, before any work starts, saying what to change: every check that needs no
    work, cheapest and most basic first. Every entry point calls it before it claims the output: the CLI and the
    deployed flow before Prefect starts, the Python API (api.run_shards, the NeMo drop-in) before it connects to a
    Dask scheduler. Another run holding the output is refused here too (outputclaim.check_free); the run's own claim,
    taken as it starts, is what decides.

    `on_current_client`: the shards run on the caller's current Dask client (the Python API's), whose workers may be
    on other hosts: as with --dask-address, their GPUs are not this process's to check (preflight.check_device).

    Returns whether every output is already finished (nothing_to_compute), for the run to take as it is: asked
    again, it would list the input and the output and read every footer again (GETs, on an object store)."""
    from wdsembed import preflight

    check_path_names(config)  # a path Python decodes otherwise than pyarrow and Prefect would name other files
    preflight.check_storage_options(config)  # before anything builds a filesystem from them
    preflight.check_output_writable(config)  # needs no torch import: refused in about a second
    check_own_folders(config)
    preflight.check_dask_security(config)
    preflight.check_dask_reachable(config)
    # before the folder and store checks, which would call '/data/*' missing
    refuse_wildcard(config.input, f"input {config.input!r}", config.storage_options)
    _check_percent_escapes(config)
    # a mistyped path is refused in a second, before torch is imported
    if input_kind(config.input, config.storage_options) == "folder":
        _check_local_input(config)

    # A re-run whose every output already carries this run's cache key loads no model: those outputs prove that the
    # model name, its weights and the checkpoint were usable, so the checks that import torch and timm (seconds,
    # most of such a run) are left out. Every other check still runs.
    listed = Listed(config)  # INPUT and OUTPUT listed once for all these checks
    needs_model = not nothing_to_compute(config, listed)
    # A folder with no shards, a pattern, list or .tar naming missing ones, a store refusing access: the listing
    # that nothing_to_compute just made said so, and it is said now, before torch's import (seconds).
    found = listed.found()
    if needs_model:
        from wdsembed.model import LIST_HINT, ModelLoadError, check_model_name  # imports torch

        try:
            check_model_name(config.model_name)  # the architecture and its pretrained tag, with suggestions
        except ModelLoadError as exc:
            # Where to look is said once, as the command line's advice.
            raise InputError(f"{str(exc).removesuffix(LIST_HINT)} Pass {option('model_name')} a name from "
                             "timm.list_models() / timm.list_pretrained().") from None
        if not on_current_client:
            preflight.check_device(config)  # torch is imported by now
    if config.checkpoint:  # a local path: EmbedConfig refuses other stores, which no worker could load from
        if not os.path.isfile(os.path.expanduser(config.checkpoint)):
            raise InputError(f"checkpoint {config.checkpoint!r} is not a file: pass the path of a weights file "
                             f"(.safetensors, .pth, .bin), or leave {option('checkpoint')} out")
    if needs_model:
        check_model(config)
    # Another run writing to OUTPUT now: refused here, in a second; the run's own claim (outputclaim.take) decides.
    outputclaim.check_free(config)
    _check_readable(config, found)
    _check_image_extensions(config, found)
    _check_id_column(config, found)
    _check_id_types(config, found)
    check_output_location(config, found)
    check_outputs_beside(config, found, listed.output_files())
    # Each output there is read once by these checks (nothing_to_compute, else here), so that a user's own file is
    # refused before Prefect starts, not in the flow; the planning takes those reads for the files its own listing
    # shows unchanged (Listed.checked_footers).
    if needs_model:
        check_own_outputs(config, [found.stem(t) for t in found.tars], listed.output_files(), listed=listed)
    if needs_model:
        preflight.check_weights(config)  # last: needs timm
    _checked_input.set(listed)  # for the planning that follows (Listed.after_checks)
    return not needs_model


def check_own_folders(config: EmbedConfig) -> None:
    """The folders the run writes files other than parquets into (Prefect's results, `.idx` files) must be outside
    OUTPUT, or in a folder of it that readers of OUTPUT as one dataset skip (a name starting with '_' or '.', as
    the default OUTPUT/_prefect_results): pyarrow.dataset and pandas.read_parquet fail on a file that is no
    parquet."""
    out = storage.location(config.output, config.storage_options)
    for name, what in (("result_storage", "result storage"), ("index_cache_dir", "index cache folder")):
        url = getattr(config, name)
        if not url:
            continue
        where = storage.location(url, config.storage_options)
        if not storage.within(where, out):
            continue
        parts = where[1][len(out[1]):].strip("/").split("/")
        if not any(part.startswith(SKIPPED_PREFIXES) for part in parts):
            instead = f"_{parts[-1]}" if parts[-1] else "_cache"
            raise InputError(f"{what} {url!r} is inside output {config.output!r}: pyarrow.dataset, "
                             "pandas.read_parquet and Spark, reading OUTPUT as one dataset, would fail on its files, "
                             f"which are no parquet; pass {option(name)} a folder outside it, or one in it whose "
                             f"name starts with '_' (OUTPUT/{instead})")


def check_output_location(config: EmbedConfig, found: FoundShards) -> None:
    """OUTPUT must be nowhere its files could be read back as shards or overwrite the shards' own parquets: for a
    folder input (recursive or not), not inside the folder; for shards named one by one (a pattern, one .tar, a
    list file), which read only what they name, not one of the shards' folders (nor below one, with recursive),
    and no shard's OUTPUT/<stem>.parquet in one. Every entry point runs it before any work (check_config), and its
    planning again (plan_shards)."""
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    out = storage.place(out_fs, out_root)  # through symlinks too
    if input_kind(config.input, config.storage_options) == "folder":
        if storage.within(out, storage.place(found.fs, found.root)):
            raise InputError(f"output {config.output!r} is inside input {config.input!r}: choose a folder outside "
                             "it, so outputs are never read as shards")
        return
    folders = {storage.place(found.fs, f): f for f in {posixpath.dirname(t) for t in found.tars}}
    # OUTPUT itself, and each folder a shard's output goes to (OUTPUT/train for a stem train/00000)
    stem_folders = {posixpath.dirname(found.stem(t)) for t in found.tars}
    writes = {out} | {storage.place(out_fs, storage.join(out_root, f)) for f in stem_folders if f}
    for where in sorted(writes):
        ancestors = [where] + ([(where[0], p) for p in _parents(where[1])] if config.recursive else [])
        hit = next((folders[a] for a in ancestors if a in folders), None)
        if hit is not None:
            raise InputError(f"output {config.output!r} would write into {storage.to_url(found.fs, hit)}, a folder of "
                             f"the shards that input {config.input!r} names: choose a folder outside the shards' "
                             "folders, so outputs never overwrite their img2dataset parquets nor are read as shards")


def check_outputs_beside(config: EmbedConfig, found: FoundShards, files: Optional[set[str]] = None) -> None:
    """Refuse a run whose OUTPUT already holds outputs of shards it does not name, made by another model (or the
    same model otherwise set: its weights, its head, normalized or not): they would stay beside this run's, two
    embedding spaces in one folder and one kNN view, which kNN tools read as one (or fail on, where the sizes
    differ), and so are outputs of the same model stored as another embedding_dtype (their schemas do not merge),
    whose embedding or error column is named otherwise (a dataset read of OUTPUT would hold two of each), or whose
    kNN views name their id or embedding column otherwise.
    Outputs this run names are rewritten, so they never count. One listing of OUTPUT (`files`, where the caller
    listed it: output_files), and a footer read for each output that this run does not name (and for its view,
    where the run writes views)."""
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    if files is None:
        files = output_files(config)
    mine = {found.stem(t) for t in found.tars}
    root = out_root.rstrip("/") + "/"
    others = []
    for path in sorted(files):
        stem = path[len(root):-len(".parquet")] if path.startswith(root) and path.endswith(".parquet") else None
        if stem and stem not in mine and not any(part.startswith(("_", ".")) for part in stem.split("/")):
            others.append(path)
    if not others:
        return

    judge = OtherSpace(config)

    def differs(path: str) -> Optional[str]:
        meta = output.read_output_metadata(path, out_fs)
        reasons = judge.reasons(meta)
        stored = _embedding_dtype(meta)
        if not reasons and stored and stored != config.embedding_dtype:
            # The same model, its embeddings stored as another type: the tables' and the views' embedding columns
            # would not merge into one schema.
            reasons = [f"embedding_dtype {stored}"]
        if not reasons:
            # The same model, its table's own columns named otherwise (another --embedding-column or
            # --error-column): a dataset read of OUTPUT would hold two of each, each null in the other's rows.
            reasons = _columns_otherwise(meta, config)
        if not reasons and config.knn_view:
            # The same model, but its view's columns named otherwise (another --id-column or --embedding-column):
            # kNN tools read the view's files with one column name, and fail on the others.
            columns = output.view_columns(out_fs, output.embeddings_view_url(out_root, path[len(root):-8]))
            if columns and columns[:2] != [config.id_column, config.embedding_column]:
                reasons = [f"kNN view columns {', '.join(columns[:2])}"]
        return f"{path[len(root):]} ({', '.join(reasons)})" if reasons else None

    with ContextThreadPool(max(1, min(16, len(others)))) as pool:
        mixed = [d for d in pool.map(differs, others) if d]
    if mixed:
        more = f" and {len(mixed) - 3} more" if len(mixed) > 3 else ""
        raise InputError(
            f"output {config.output!r} already holds embeddings made otherwise, of shards this run does not name: "
            f"{'; '.join(mixed[:3])}{more}. This run ({config.model_name}) would leave them beside its own in one "
            "folder and one kNN view, which kNN tools read as one. Choose another output folder, name those shards in this run too (they are "
            "then recomputed), or remove their outputs."
        )


def outputs_without_views(config: EmbedConfig, named: Collection[str], files: set[str]) -> list[str]:
    """The stems of the outputs of ours in OUTPUT (`files`: its listing) that this run, writing kNN views, does not
    name and that have none: a partial run after an upgrade from a version that wrote no views (or after a run with
    knn_view off) leaves those rows out of the views, which it rebuilds only for the shards it names. A footer read
    only for each such output, to tell ours from a user's parquet."""
    if not config.knn_view:
        return []
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    root = out_root.rstrip("/") + "/"
    lacking = {}
    for path in files:
        stem = path[len(root):-len(".parquet")] if path.startswith(root) and path.endswith(".parquet") else None
        if stem and stem not in named and not any(part.startswith(("_", ".")) for part in stem.split("/")) \
                and output.embeddings_view_url(out_root, stem) not in files:
            lacking[stem] = path
    if not lacking:
        return []
    with ContextThreadPool(max(1, min(16, len(lacking)))) as pool:
        ours = pool.map(lambda path: bool((output.read_output_metadata(path, out_fs) or {}).get("result")),
                        lacking.values())
    return sorted(stem for stem, mine in zip(lacking, ours) if mine)


def _columns_otherwise(meta: Optional[dict], config: EmbedConfig) -> list[str]:
    """The embedding and error columns of an output that its footer's cache key parts record under other names than
    this run's (`embedding column image_embedding`); none where the footer records no parts (older versions)."""
    parts = (meta or {}).get("cache_key_parts")
    recorded = parts.get("columns") if isinstance(parts, dict) else None
    if not (isinstance(recorded, list) and len(recorded) == 3):
        return []
    mine = {"embedding column": config.embedding_column, "error column": config.error_column}
    return [f"{what} {theirs}" for (what, ours), theirs in zip(mine.items(), recorded[1:]) if theirs != ours]


def _embedding_dtype(meta: Optional[dict]) -> Optional[str]:
    """The embedding_dtype an output was stored with, from its footer's cache key parts (shard.cache_key_parts
    records it only where it is not float32); None where the footer records no parts (older versions)."""
    parts = (meta or {}).get("cache_key_parts")
    return parts.get("dtype", "float32") if isinstance(parts, dict) else None


class OtherSpace:
    """Tells outputs made by another model than a run's (or the same model otherwise set: its weights, its head,
    normalized or not), whose embeddings are of another space, from its footers. The run's checkpoint, where it has
    one, is read once, as this is made."""

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        try:  # this run's checkpoint's identity, as its outputs will record it; and as footers recorded it before
            self.identity = (storage.checkpoint_identity(config.checkpoint, config.storage_options)
                             if config.checkpoint else None)
            self.size_and_mtime = (storage.file_fingerprint(config.checkpoint, config.storage_options)
                                   if config.checkpoint else None)
        except OSError as exc:
            # Said here, as the cause: unread, every output made with this path would look made by another file.
            raise InputError(f"checkpoint {config.checkpoint!r} cannot be read: {type(exc).__name__}: {exc}") from exc

    def reasons(self, meta: Optional[dict]) -> list[str]:
        """How the output whose footer metadata is `meta` was made otherwise (`model X`, `weights Y`, ...); none
        where it was made as this run makes its own, or is not one of ours."""
        model = ((meta or {}).get("result") or {}).get("model") or {}
        if not model:
            return []  # not one of ours
        config, identity, size_and_mtime = self.config, self.identity, self.size_and_mtime
        weights = str(model.get("weights", ""))
        reasons = []
        if not shard.same_model_name(model.get("name"), config.model_name, model.get("spellings")):
            reasons.append(f"model {model.get('name')}")
        if weights.startswith("checkpoint:") != bool(config.checkpoint):
            reasons.append(f"weights {weights}")
        elif config.checkpoint:
            recorded = model.get("checkpoint") if isinstance(model.get("checkpoint"), dict) else {}
            made_with = str(recorded.get("fingerprint") or "")
            same_file = _same_file(weights[len("checkpoint:"):], config.checkpoint)
            if made_with.startswith(storage.CONTENT_IDENTITY_PREFIX):
                # The weights' content: the same bytes are the same weights, whatever their path or mtime.
                if made_with != identity:
                    why = "the file has changed since" if same_file else "another file"
                    reasons.append(f"weights {weights} ({why})")
            elif not same_file:
                reasons.append(f"weights {weights} (another file)")
            elif made_with and made_with != size_and_mtime:
                # Footers from before the content's hash record "size:mtime", judged by that rule: a copy of the same
                # weights with another mtime is refused until those outputs are remade, other weights always are.
                reasons.append(f"weights {weights} (the file has changed since)")
        elif (weights == "random-init") == config.pretrained:
            reasons.append(f"weights {weights}")
        # What this run's request resolves to on this model, where the output recorded it (the same model and
        # weights: otherwise the reasons above speak); else only an explicit request can be judged ('auto' is
        # resolved once the model loads).
        forms = model.get("embedding_forms") if not reasons else None
        if isinstance(forms, dict) and config.embedding in forms:
            if model.get("embedding") != forms[config.embedding]:
                reasons.append(f"embedding {model.get('embedding')}")
        elif config.embedding != "auto" and model.get("embedding") != config.embedding:
            reasons.append(f"embedding {model.get('embedding')}")
        if meta.get("normalized") is not None and meta.get("normalized") != config.normalize_embeddings:
            reasons.append("normalized" if meta.get("normalized") else "not normalized")
        return reasons


def remove_failed_outputs_made_otherwise(config: EmbedConfig, failed: Collection[str]) -> list[str]:
    """Remove the earlier outputs (full table and kNN view) of this run's failed shards where another model made
    them (OtherSpace): the run was to rewrite them, and left as they are they would be the one shard of another
    embedding space in OUTPUT and its kNN view, which kNN tools read as one (check_outputs_beside refuses the same
    for shards a run does not name). An earlier output of this run's own settings stays. Call it holding OUTPUT's
    claim, once every shard has ended; returns each removed output, as `00001.parquet (model X)`."""
    if not failed:
        return []
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    try:
        judge = OtherSpace(config)
    except InputError as exc:  # the workers read it meanwhile; judged by nothing, nothing is removed
        log.warning("earlier outputs of the failed shards not looked at: %s", exc)
        return []
    removed = []
    for stem in sorted(failed):
        path = storage.join(out_root, stem + ".parquet")
        try:
            # None, so no reasons, for the user's own file (no footer of ours): never removed
            reasons = judge.reasons(output.read_output_metadata(path, out_fs))
            if not reasons:
                continue
            out_fs.rm_file(path)  # first: a table gone is a shard not finished, whatever becomes of its view
            output.remove_embeddings_view(config, stem)
        except OSError as exc:  # the run's own failures are said first; this one goes to the log
            log.warning("shard %s: its earlier output, of another model, could not be removed: %s", stem, exc)
            continue
        removed.append(f"{stem}.parquet ({', '.join(reasons)})")
        log.warning("shard %s failed; its earlier output, made otherwise (%s), was removed with its kNN view: "
                    "OUTPUT keeps one embedding space", stem, ", ".join(reasons))
    return removed


def remove_views_without_tables(config: EmbedConfig, claim_run: Optional[str] = None, *,
                                planned: Optional[set[str]] = None, failed: Collection[str] = ()) -> list[str]:
    """Remove each kNN view (`_embeddings/<stem>.parquet`) whose shard has no table in OUTPUT: a shard that failed
    between its view and its table (a full disk on the table, the claim lost, a process killed), or whose table
    was removed by hand (a shard dropped from the dataset). kNN tools read every view, and such rows would name a
    table that is not there, beyond what the manifest counts. Call it once every shard of the run has ended (a
    shard in flight has its view before its table); views are removed only while OUTPUT's claim is still run
    `claim_run`'s (a run that took it over may have shards in flight). One listing of OUTPUT. Returns the removed
    views' stems.

    `planned`: OUTPUT's files as the run's planning listed them, holding the claim, and `failed`: the stems of the
    run's failed shards. Under the claim only this run wrote to OUTPUT since, and only a failed shard can have left
    a view without its table: where the planning's listing shows no such view and no shard failed, there is none,
    and OUTPUT is not listed again."""
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    root = out_root.rstrip("/") + "/"
    if planned is not None and not failed and not _views_without_tables(
            {path[len(root):] for path in planned if path.startswith(root)}):
        return []
    try:
        files = {path[len(root):] for path in out_fs.find(out_root, withdirs=False) if path.startswith(root)}
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:  # the shards' outputs are written; only this tidying is left for the next run
        log.warning("could not list output %s to find kNN views without a table: %s", config.output, exc)
        return []
    orphans = _views_without_tables(files)
    if not orphans:
        return []
    try:
        outputclaim.check_still_held(config, claim_run, "kNN views without a table", "None was removed")
    except outputclaim.OutputClaimLostError as exc:  # the manifest's write says it again, as the run's end
        log.warning("%s", exc)
        return []
    removed = []
    for stem in orphans:
        try:
            if output.remove_embeddings_view(config, stem):
                removed.append(stem)
        except OSError as exc:  # the run's own failures are said first; this one goes to the log
            log.warning("the kNN view of %s, whose table OUTPUT does not hold, could not be removed: %s", stem, exc)
    if removed:
        log.warning("removed the kNN view (%s/) of %d shard(s) with no table in OUTPUT, so that kNN tools read only "
                    "rows of its tables (a shard that failed between its view and its table, or whose table was "
                    "removed): %s", output.EMBEDDINGS_FOLDER, len(removed), report.name_shards(removed))
    return removed


def _views_without_tables(files: set[str]) -> list[str]:
    """The stems of the kNN views among `files` (paths under OUTPUT) whose table is not among them."""
    views = output.EMBEDDINGS_FOLDER + "/"
    return sorted(rel[len(views):-len(".parquet")] for rel in files
                  if rel.startswith(views) and output.is_output_name(rel) and rel[len(views):] not in files)


def check_own_outputs(config: EmbedConfig, stems: Collection[str], files: Optional[set[str]] = None, *,
                      listed: Optional[Listed] = None) -> None:
    """Refuse a run where a shard's OUTPUT/<stem>.parquet is a readable parquet that wdsembed did not write (no
    footer of ours: the user's own file, copied there): it would be overwritten. An output of ours, of any model or
    damaged below its footer, is rewritten as before, and so is a file whose footer cannot be read (an output of
    ours cut short or damaged looks the same). One listing of OUTPUT (`files`, where the caller listed it:
    output_files), and a footer read for each of these outputs that exists. Raises output.ForeignOutputError naming
    them. `listed`: the checks' listings (check_config's, whose `files` these are), which keep the footers of ours
    read here for the planning (Listed.checked_footers), and give those read already (nothing_to_compute)."""
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    if files is None:
        files = output_files(config)
    existing = [stem for stem in stems if storage.join(out_root, stem + ".parquet") in files]

    def foreign(stem: str) -> bool:
        path = storage.join(out_root, stem + ".parquet")
        if listed is not None and path in listed._footers:
            return False  # ours: read by this step's nothing_to_compute
        footer = output.read_footer(path, out_fs)
        try:
            meta = output.output_metadata(footer, path, refuse_foreign=True)
        except output.ForeignOutputError:
            return True
        if listed is not None and meta is not None and not output.dictionary_ids(footer, config.id_column):
            listed.keep_footer(path, meta)
        return False

    with ContextThreadPool(max(1, min(16, len(existing)))) as pool:
        found = [f"{stem}.parquet" for stem, bad in zip(existing, pool.map(foreign, existing)) if bad]
    if found:
        raise output.ForeignOutputError(found, config.output)


def _same_file(recorded: str, given: str) -> bool:
    """Whether an output's recorded checkpoint path (absolute, as the worker loaded it) and this run's (as given:
    relative, with ~, through a link) name one file."""
    def norm(p: str) -> str:
        return os.path.realpath(os.path.abspath(os.path.expanduser(p)))

    if norm(recorded) == norm(given):
        return True
    try:
        return os.path.samefile(os.path.expanduser(recorded), os.path.expanduser(given))
    except OSError:
        return False


def _parents(path: str) -> list[str]:
    """`a/b/c`'s folders above it: `a/b`, `a` (and `/` for an absolute path)."""
    parents = []
    while True:
        parent = posixpath.dirname(path)
        if not parent or parent == path:
            return parents
        parents.append(parent)
        path = parent


def output_files(config: EmbedConfig) -> set[str]:
    """Every file under OUTPUT, as paths of its filesystem (none where OUTPUT does not exist yet): one listing, on an
    object store a LIST request per 1,000 keys."""
    return set(_output_listing(config))


def _output_listing(config: EmbedConfig) -> dict[str, str]:
    """output_files' listing, each path with its file's fingerprint token (size, mtime or ETag) as the listing gives
    it: the same requests."""
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    try:
        found = out_fs.find(out_root, withdirs=False, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {path: shardindex._fingerprint_from_info(info).token for path, info in found.items()}


class Listed:
    """INPUT's shards and OUTPUT's files, each listed once for the checks of one step (check_config's), which ask
    for them several times: at 100,000 shards on an object store, each listing is hundreds of LIST requests and
    tens of seconds. Only an answer is kept: a step that failed runs again when asked again, and raises in its
    turn."""

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        self._storage_checked = False
        self._found: Optional[FoundShards] = None
        self._output_files: Optional[set[str]] = None
        self._output_tokens: Optional[dict[str, str]] = None
        # output path -> (its token in this listing, its footer metadata): what nothing_to_compute read
        self._footers: dict[str, tuple[str, dict]] = {}
        self._checked_footers: dict[str, tuple[str, dict]] = {}  # the checks' _footers (after_checks)

    @classmethod
    def after_checks(cls, config: EmbedConfig) -> "Listed":
        """The planning's listings: INPUT as the checks just before it listed it (check_config, in this context, of
        an equal config; taken once), else listed anew; OUTPUT always anew, as the planning holds OUTPUT's claim and
        another run may have written there since the checks. INPUT is no run's output: a shard added to it since
        the checks would be as missed as one added a second after the planning."""
        listed = cls(config)
        checked = _checked_input.get()
        if checked is not None and checked._found is not None and checked.config == config:
            _checked_input.set(None)
            listed._found, listed._storage_checked = checked._found, checked._storage_checked
            listed._checked_footers = checked._footers  # taken only for files this listing shows unchanged
        return listed

    def check_storage(self) -> None:
        if not self._storage_checked:
            check_storage(self.config)
            self._storage_checked = True

    def found(self) -> FoundShards:
        """find_shards' answer, after check_storage."""
        if self._found is None:
            self.check_storage()
            self._found = find_shards(self.config, fresh=True)
        return self._found

    def output_files(self) -> set[str]:
        if self._output_files is None:
            self._output_files = set(self.output_tokens())
        return self._output_files

    def output_tokens(self) -> dict[str, str]:
        """OUTPUT's files (output_files), each with its fingerprint token as listed."""
        if self._output_tokens is None:
            self._output_tokens = _output_listing(self.config)
        return self._output_tokens

    def keep_footer(self, path: str, meta: dict) -> None:
        """Keep the footer metadata just read of output `path`, under its token in this listing, for the planning."""
        token = self.output_tokens().get(path)
        if token is not None:
            self._footers[path] = (token, meta)

    def checked_footers(self) -> dict[str, dict]:
        """Output path -> footer metadata, as the checks read it, of each output that this step's listing of OUTPUT
        shows unchanged since the checks listed it (the same size and mtime or ETag): reading it again would read
        the same bytes. A file written since (by another run, by hand) is not among them, and is read anew."""
        tokens = self.output_tokens()
        return {path: meta for path, (token, meta) in self._checked_footers.items() if tokens.get(path) == token}


# The Listed of the last check_config that passed in this context, until a planning takes it (Listed.after_checks).
_checked_input: ContextVar[Optional[Listed]] = ContextVar("wdsembed_checked_input", default=None)


def forget_checked_input() -> None:
    """Leave no check_config's listing of INPUT to the next planning in this context (a run without the checks)."""
    _checked_input.set(None)


def nothing_to_compute(config: EmbedConfig, listed: Optional[Listed] = None) -> bool:
    """Whether every shard's output is already finished with this run's cache key (never with --force). Only reads:
    no index is built and no kNN view rewritten here (the flow's own planning rewrites a missing view). Any doubt,
    a refused input included, answers False: the run then goes through every check. With verify_outputs, False:
    the planning reads each output whole, and a damaged one needs the workers; read here too, each twice.
    `listed`: the listings of the checks that ask next (check_config), which keep those made here."""
    if config.force or config.verify_outputs:
        return False
    listed = listed or Listed(config)
    try:
        found = listed.found()
        # One listing of OUTPUT first: a run with any output still to write (every first run) needs no more.
        out_fs, out_root = storage.filesystem(config.output, config.storage_options)
        written = listed.output_files()
        if any(storage.join(out_root, found.stem(t) + ".parquet") not in written for t in found.tars):
            return False
        # The cache key needs each shard's fingerprint, not its index nor its count of samples. check_config runs
        # the checks next.
        plans, _ = run_on_cpu(config, plan_shards(config, found=found, indexes=False, samples=False, checks=False))

        def finished(plan: ShardPlan) -> bool:
            key = shard.cache_key(config, plan)
            path = storage.join(out_root, plan.stem + ".parquet")
            footer = output.read_footer(path, out_fs)
            ours = output.output_metadata(footer, path, refuse_foreign=True)
            if ours is not None and not output.dictionary_ids(footer, config.id_column):
                listed.keep_footer(path, ours)  # the planning judges it from this read (Listed.checked_footers)
            return shard.finished_output(config, plan, key, repair_view=False, footer=footer) is not None

        with ContextThreadPool(max(1, min(16, len(plans)))) as pool:
            return bool(plans) and all(pool.map(finished, plans))
    except Exception:  # noqa: BLE001 - quietly: the checks that follow say what is wrong, the flow what is not
        return False


_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _check_percent_escapes(config: EmbedConfig) -> None:
    """A local INPUT or OUTPUT with %-escapes (`file:///data/my%20data`, as file managers and browsers copy a path)
    is read and written as fsspec takes it, escapes as written: a folder `my%20data`. Where that is not there, it is
    refused saying what the escapes encode: an input whose decoded path exists, and a file:// OUTPUT, which would
    otherwise be a new folder named with the escapes."""
    from urllib.parse import unquote

    def local(url: str) -> Optional[str]:
        if not _PERCENT_ESCAPE.search(url):
            return None
        fs, path = storage.filesystem(url, config.storage_options)
        return path if storage.is_local(fs) else None

    path = local(config.input)
    if path is not None:
        there = (path if input_kind(config.input, config.storage_options) != "pattern"
                 else local(input_folder(config.input, config.storage_options)) or path)
        if not os.path.lexists(there) and os.path.exists(unquote(there)):
            raise InputError(f"input {config.input!r} does not exist: fsspec, which reads the shards, takes its "
                             "%-escapes as they are written ('%20' as those three characters, not as what they "
                             f"encode), and {unquote(path)!r}, what they encode, exists: pass that path")
    path = local(config.output)
    if path is not None and config.output.lower().startswith(("file:", "local:")) and not os.path.lexists(path):
        raise InputError(f"output {config.output!r} holds %-escapes, which fsspec writes as they are: the run would "
                         f"create a folder named {path!r}; pass the path meant, as it is spelled on disk "
                         f"({unquote(path)!r}), or create that folder first to write there")


def _check_local_input(config: EmbedConfig) -> None:
    """A local input folder must exist and be readable: said in local terms (the store check that follows speaks
    of buckets and credentials)."""
    fs, root = storage.filesystem(config.input, config.storage_options)
    if not storage.is_local(fs):
        return
    if not os.path.exists(root):
        raise InputError(f"input {config.input!r} does not exist: pass the folder that holds the *.tar shards")
    if not os.path.isdir(root):
        raise InputError(f"input {config.input!r} is not a folder: pass the folder that holds the *.tar shards"
                         + compressed_file(root))
    try:
        os.listdir(root)
    except PermissionError as exc:
        raise InputError(f"input {config.input!r} cannot be read by this user ({exc.strerror}): give it read and "
                         f"execute permission (chmod a+rx) or run as a user who can read it") from None


def _check_readable(config: EmbedConfig, found: FoundShards) -> None:
    """Every local shard must be readable by this user (root reads anything; others are refused up front)."""
    if not storage.is_local(found.fs):
        return
    unreadable = sorted(posixpath.relpath(t, found.root) if found.root else t
                        for t in found.tars if not os.access(t, os.R_OK))
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        raise InputError(f"{len(unreadable)} shard(s) under {config.input!r} cannot be read by this user ({shown}): "
                         "give them read permission (chmod a+r) or run as a user who can read them")


# Where the first shard has no .idx, the pre-flight reads its member names from its tar headers up to its first
# member of --image-extensions (in most shards, their first member: one read). On a local disk it reads on to the
# tar's end where none comes (headers only, data seeked past): a shard is never refused for its first members
# alone. On an object store each image member bigger than a read block costs a request: the look stops at
# FIRST_IMAGES members named like images of other extensions, or FIRST_MEMBERS members in all (a shard that begins
# with its captions), and a refusal says how far it looked and how to have every member seen (a .idx).
FIRST_IMAGES = 32
FIRST_MEMBERS = 1024


def _check_image_extensions(config: EmbedConfig, found: FoundShards) -> None:
    """The first shard must have a member of one of --image-extensions where it has images of other extensions:
    otherwise every row of every shard like it would fail 'no image member'. Its member names from its .idx where
    one fits it (a few small reads), else from its tar headers (_first_member_names). A shard whose
    samples only partly have the image is not refused (each such row fails on its own)."""
    tar, cut = found.tars[0], False
    try:
        # quiet: the run's planning says an unreadable index once, in the run's log
        index = (shardindex.ensure_index(tar, found.fs, config.index_cache(), build=False, quiet=True)
                 if config.use_index_files else None)
        if index is not None:
            columns = index.columns()
            names, source = (columns.names if columns is not None else [m.name for m in index.members()]), \
                "its .idx lists"
        else:
            names, cut = _first_member_names(tar, found.fs, config.image_extensions,
                                             bounded=not storage.is_local(found.fs))
            source = f"its {'first ' if cut else ''}{len(names)} members have"
    except Exception:  # noqa: BLE001 - an unreadable tar or index is the shard's own failure
        return
    exts = list(dict.fromkeys(map(_image_extension, names)))
    images = [e for e in exts if e in shards.KNOWN_IMAGE_EXTENSIONS]
    if not images or set(config.image_extensions) & set(exts):
        return
    given = ",".join(config.image_extensions)
    shown = tar if storage.is_local(found.fs) else found.fs.unstrip_protocol(tar)
    flag = option("image_extensions")
    raise InputError(f"{flag} {given}: no member of shard {shown} has "
                     f"{'that extension' if len(config.image_extensions) == 1 else 'those extensions'} ({source}: "
                     f"{', '.join(e or '(no extension)' for e in exts)}), and every row would fail with 'no image "
                     f"member': pass the extensions of its images, e.g. {flag} {','.join(images)}"
                     + (f"; only its first {len(names)} members were read (on an object store each further one can "
                        f"cost a request): where later ones have {given}, a .idx beside the shard (DALI's wds2idx "
                        f"writes one, as runs with index files do) lets this check read every member's name"
                        + ("" if config.use_index_files else f", in a run without {option('use_index_files')}")
                        if cut else ""))


def _image_extension(name: str) -> str:
    """A member's extension as its sample's image would have it: its last dot-part (`0001.mask.png`: png)."""
    return shards.split_member_name(name)[1].rsplit(".", 1)[-1]


def _first_member_names(tar: str, fs, extensions, bounded: bool) -> tuple[list[str], bool]:
    """A tar's member names from its headers, up to its first member of `extensions` or its end; where `bounded`,
    up to FIRST_IMAGES members named like images of other extensions or FIRST_MEMBERS members in all. And whether
    a bound stopped the look (the tar's other members unseen)."""
    names, images = [], 0
    with contextlib.closing(shards.member_names(tar, fs)) as listed:
        for name in listed:
            names.append(name)
            ext = _image_extension(name)
            if ext in extensions:
                break
            images += ext in shards.KNOWN_IMAGE_EXTENSIONS
            if bounded and (images >= FIRST_IMAGES or len(names) >= FIRST_MEMBERS):
                return names, True
    return names, False


# How many of the first shard's sample keys the pre-flight looks up in its parquet's id column, before all of them.
FIRST_KEYS = 8


def _check_id_column(config: EmbedConfig, found: FoundShards) -> None:
    """The first shard's img2dataset parquet, where it has one, must hold the id column, of a type the key join
    takes, and no column the output's own would replace (the embedding and error columns): otherwise every shard
    would be embedded and then fail at the join, or lose that column. Its footer first (one small read);
    each shard checks its own before embedding (shard.process_shard). Then the column must hold one of the tar's
    sample keys (its first ones from its headers, and the id column alone; where none matches, every one, as
    _every_key can have them): a wrong but valid --id-column (`width`) matches none, and every shard would fail at
    its key join (shard.process_shard checks every key of its own). Where every key would cost the whole tar (an
    object store without .idx), the parquet's other columns speak instead: one that holds the first keys is the
    right one."""
    siblings = ((t, found.parquet(t)) for t in found.tars)
    tar, first = next(((t, p) for t, p in siblings if p), (None, None))
    if first is None:
        _check_id_column_without_parquets(config, found)
        return
    try:
        schema = shards.read_rows_schema(first, found.fs)
    except Exception:  # noqa: BLE001 - an unreadable parquet is the shard's own warning (shard.read_metadata)
        return
    shown = posixpath.relpath(first, found.root) if found.root else first
    problem = (output.id_column_problem(config.id_column, shown, schema)
               or output.column_clash_problem(shown, schema, config.embedding_column, config.error_column))
    if problem:
        raise InputError(problem)
    try:
        keys = shards.first_keys(tar, found.fs, FIRST_KEYS)
        ids = shards.read_rows(first, found.fs, columns=[config.id_column]).column(config.id_column) if keys else None
    except Exception:  # noqa: BLE001 - an unreadable tar or parquet is the shard's own failure or warning
        return
    if not keys or not output.unmatched_keys_problem(ids, keys, config.id_column, shown, ""):
        return
    # None of the first keys: a wrong column, or a parquet filtered down (curated rows; the tar's other samples
    # join as rows of their own). Only every key of the tar tells them apart (_every_key).
    try:
        every = _every_key(config, found, tar)
    except Exception:  # noqa: BLE001 - as above
        every = None
    if every is None:
        # Every key would cost the whole tar (an object store, no .idx yet: a first run). Where another column of
        # the parquet holds those first keys, the id column is the wrong one, filtered rows or not.
        try:
            joinable = [n for n in schema.names
                        if n != config.id_column and not output.id_column_problem(n, "", schema)]
            rows = shards.read_rows(first, found.fs, columns=joinable) if joinable else None
            holding = output.columns_holding_keys(rows, keys, config.id_column) if rows is not None else []
        except Exception:  # noqa: BLE001 - as above
            return
        if holding:
            raise InputError(output.unmatched_keys_problem(
                ids, keys, config.id_column, shown,
                f"the first {len(keys)} sample key(s) of {posixpath.basename(tar)}",
                advice=f", but its column {holding[0]!r} holds them: pass {option('id_column')} {holding[0]}"))
        return
    keys = every
    problem = output.unmatched_keys_problem(ids, keys, config.id_column, shown,
                                            f"the {len(keys)} sample key(s) of {posixpath.basename(tar)}")
    if problem:
        raise InputError(problem)


def _check_id_column_without_parquets(config: EmbedConfig, found: FoundShards) -> None:
    """Without a parquet anywhere, the output's id column holds the tar's own sample keys (output.join_embeddings):
    an --id-column other than img2dataset's `key` would put them under a name they are not (DataComp's `uid`, which
    its shards carry in each sample's .json), and a join on that name downstream would match nothing. Where a
    parquet exists, its column is checked to hold those keys instead (_check_id_column)."""
    default = EmbedConfig.model_fields["id_column"].default
    if config.id_column == default:
        return
    tar = found.tars[0]
    name = posixpath.basename(tar)
    try:
        keys = shards.first_keys(tar, found.fs, 1)
        sidecar = shards.first_sidecar(tar, found.fs)
    except Exception:  # noqa: BLE001 - an unreadable tar is its shard's own failure; the refusal stands without it
        keys, sidecar = [], None
    column = config.id_column
    example = f" (such as {keys[0]!r})" if keys else ""
    held = sidecar.get(column) if sidecar else None
    said = (f" ({name}'s samples carry a {column!r} in their .json files, such as {str(held)!r}, which is not read)"
            if held is not None else "")
    raise InputError(
        f"{option('id_column')} {column!r} names the column of the shards' img2dataset parquets "
        f"({name[: -len('.tar')]}.parquet beside {name}) that holds each sample's key, but none of the "
        f"{len(found.tars)} shard(s) has one: the output's {column!r} would hold the tar's own sample keys{example}, "
        f"not a {column!r} read from anywhere{said}. Leave it out: each row is then keyed by {default!r}, "
        f"the tar's sample key (the {default!r} of each sample's .json file too), to join the .json files' "
        f"{column!r} on; or put each shard's img2dataset parquet beside it, whose columns ({column!r} among them) "
        "each output keeps")


def _check_id_types(config: EmbedConfig, found: FoundShards) -> None:
    """Refuse shards whose parquets disagree on the id column's type (int64 in some, string in others: a partial
    conversion): each output takes its parquet's type, and OUTPUT would hold two, which no merged read, concat or
    kNN view takes. Every parquet's footer, on a local disk only (a fraction of a second for thousands); on an
    object store (a GET or two each) each shard checks its own against the run's type as it starts
    (shard.process_shard). Unreadable parquets and those without the column are their shards' own warning or
    failure."""
    if not storage.is_local(found.fs):
        return
    parquets = [p for p in map(found.parquet, found.tars) if p]
    if len(parquets) < 2:
        return

    def type_of(path: str) -> Optional[str]:
        try:
            return output.id_type_name(config.id_column, shards.read_rows_schema(path, found.fs))
        except Exception:  # noqa: BLE001 - as above
            return None

    by_type: dict[str, list[str]] = {}
    with ContextThreadPool(max(1, min(8, len(parquets)))) as pool:
        for path, t in zip(parquets, pool.map(type_of, parquets)):
            if t is not None:
                by_type.setdefault(t, []).append(posixpath.relpath(path, found.root) if found.root else path)
    if len(by_type) < 2:
        return

    def listed(paths: list[str]) -> str:
        return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

    said = "; ".join(f"{t} in {listed(paths)}" for t, paths in by_type.items())
    raise InputError(f"the shards' parquets disagree on the type of id column {config.id_column!r}: {said}. Each "
                     "output would take its parquet's type, and OUTPUT would hold keys of two types, which a merged "
                     "read, a concat or a kNN view of it refuses: write every parquet's "
                     f"{config.id_column!r} as one type, or embed each kind into an output of its own")


def _every_key(config: EmbedConfig, found: FoundShards, tar: str) -> Optional[list[str]]:
    """Every sample key of a shard, where they cost no download of its tar; else None. On a local disk from its
    headers, read through in a fraction of a second. On an object store from its .idx (beside it, or in the local
    index cache), which a run leaves there after its first pass, where it still fits the tar (a few small reads:
    shardindex checks the tar's header at its last member: an index of the tar before it was rewritten around an
    unchanged last member still passes, and gives that tar's keys; the shard's own read checks every header);
    without one each shard's own check says it (shard.process_shard)."""
    if storage.is_local(found.fs):
        return shards.first_keys(tar, found.fs, n=sys.maxsize, max_members=sys.maxsize)
    if not config.use_index_files:
        return None
    # quiet: the run's planning says an unreadable index once, in the run's log
    index = shardindex.ensure_index(tar, found.fs, config.index_cache(), build=False, quiet=True)
    return shards.index_keys(index) if index is not None else None


# check_model's, in this process: each model that passed, with the warning its checkpoint's load gives (or None)
_models_passed: dict[tuple, Optional[str]] = {}


def check_model(config: EmbedConfig) -> None:
    """Build the model as each worker will, on the meta device (no memory, no arithmetic, no weights downloaded:
    random ones, or the checkpoint's read and loaded), and its preprocessing recipe: what only the model itself
    tells is refused here rather than in every shard's task. A checkpoint that is not a state dict, or one of another
    model; an hf-hub: or local-dir: model whose config cannot be had; a model without an embedding to take (an
    encoder whose forward_head raises); a data config the pipeline cannot reproduce (a grayscale model); a checkpoint
    whose NaN or infinite weights (or negative batch-norm variances) make every embedding NaN (built on the CPU to
    tell, only where it holds any). A checkpoint whose position embeddings timm resamples to the model's grid (a
    ViT fine-tuned at another size) is warned of, once per run. About a
    second for a ViT-B/16, three for a ViT-L/14 on a busy 2-core machine; whether pretrained weights can be had is
    preflight.check_weights's (it downloads nothing)."""
    from wdsembed.model import ModelLoadError, load_model
    from wdsembed.preprocess import CROP_MODES, INTERPOLATIONS, PreprocessRecipe, UnsupportedRecipe

    # A process that runs again and again (a served deployment, a notebook, the bench) builds each model once: the
    # same name, the same weights' content and the same embedding passed already.
    try:
        weights = config.checkpoint and storage.checkpoint_identity(config.checkpoint)
    except (OSError, storage.StoreError):
        weights = False  # unreadable: loading it says why, every time
    key = (config.model_name, config.checkpoint, weights, storage.model_folder_identity(config.model_name),
           config.embedding)
    if key in _models_passed:
        if _models_passed[key]:  # said for each run, as the build would
            log.warning("%s", _models_passed[key])
        return
    try:
        loaded = load_model(config.model_name, pretrained=False, checkpoint=config.checkpoint,
                            embedding=config.embedding, device="meta")
        PreprocessRecipe.from_data_config(loaded.data_config)
        if loaded.suspect_weights:  # NaN, infinity, a negative variance: probed on the CPU, refused if broken
            load_model(config.model_name, pretrained=False, checkpoint=config.checkpoint,
                       embedding=config.embedding, device="cpu")
        if loaded.checkpoint_warning:  # once per run, here before any work (the workers' loads say nothing)
            log.warning("%s", loaded.checkpoint_warning)
        if weights is not False:
            _models_passed[key] = loaded.checkpoint_warning
    except ModelLoadError as exc:
        raise InputError(str(exc)) from None  # each says what to pass for its own cause
    except UnsupportedRecipe as exc:
        raise InputError(f"{config.model_name!r} cannot be embedded here: {exc}. Pass {option('model_name')} a "
                         "model whose timm data config the pipeline reproduces: 3-channel input, "
                         f"{' or '.join(INTERPOLATIONS)} interpolation, crop_mode {', '.join(CROP_MODES)}") from None


def check_storage(config: EmbedConfig) -> None:
    """Input listable and output bucket present, with these credentials: a missing bucket or denied access fails
    here, at once and naming the URL, not after the first shard's retries. Writes nothing. For a pattern, a
    single .tar or a list file, the folder listed is the one holding it."""
    # a `*` in the folder's name: said to be a wildcard, not a folder that does not exist
    refuse_wildcard(config.input, f"input {config.input!r}", config.storage_options)
    try:
        storage.check_input(input_folder(config.input, config.storage_options), config.storage_options)
        storage.check_output(config.output, config.storage_options)
    except storage.StoreError as exc:
        raise InputError(str(exc)) from None


def plan_shards(config: EmbedConfig, *, max_workers: int = 8, found: Optional[FoundShards] = None,
                indexes: bool = True, samples: bool = True, checks: bool = True,
                listed: Optional[Listed] = None) -> list[ShardPlan]:
    """List the shards that config.input names (find_shards, unless `found` is that listing) and prepare each:
    fingerprint, parquet/stats siblings, output path, (with `samples`) img2dataset's count of its samples
    (with_expected_samples: one read of its _stats.json) and (with `indexes`, when use_index_files) .idx, written
    where missing (with_indexes). Cheap per shard except a first-time index. With `checks`, it first refuses an
    output where it must not go (check_output_location, check_outputs_beside). `listed`: the step's listings
    (plan_run's), which keep those made here."""
    listed = listed or Listed(config)
    if found is None:
        found = listed.found()
    if checks:  # the output's place, before any index is written
        check_output_location(config, found)
        check_outputs_beside(config, found, listed.output_files())
    fs, tars, siblings = found.fs, found.tars, found.files
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)

    def plan_one(tar: str) -> ShardPlan:
        stem = found.stem(tar)  # "00000", or "train/00000" for a shard in a subfolder
        base = tar[: -len(".tar")]
        rows = found.parquet(tar)
        stats_path = base + "_stats.json" if base + "_stats.json" in siblings else None
        fingerprint = shardindex.fingerprint(tar, fs).token
        if rows:
            fingerprint += "|" + shards.parquet_fingerprint(rows, fs, folder=rows in found.folders)
        return ShardPlan(
            shard=storage.to_url(fs, tar),
            stem=stem,
            fingerprint=fingerprint,
            rows=storage.to_url(fs, rows) if rows else None,
            index=None,
            output=storage.to_url(out_fs, storage.join(out_root, stem + ".parquet")),
            stats=storage.to_url(fs, stats_path) if stats_path else None,
        )

    with ContextThreadPool(max_workers) as pool:
        plans = list(pool.map(plan_one, tars))
    plans = [dataclasses.replace(p, run_shards=len(plans), run_index=i) for i, p in enumerate(plans)]
    # Every shard gets it: one whose parquet turns out unreadable keys its tar samples with it too (shard.py).
    id_type = run_id_type(config, plans, listed)
    plans = [dataclasses.replace(p, id_type=id_type) for p in plans]
    if samples:
        plans = with_expected_samples(config, plans, max_workers=max_workers)
    return with_indexes(config, plans, max_workers=max_workers) if indexes else plans


# How many parquets (or earlier outputs) run_id_type reads the footer of, at most, before it settles for strings.
ID_TYPE_READS = 3


def run_id_type(config: EmbedConfig, plans: list[ShardPlan], listed: Optional[Listed] = None) -> Optional[str]:
    """The type of the run's id column, for the shards without a parquet, or whose parquet cannot be read
    (ShardPlan.id_type): their keys, from the tar's member names, take it, so that every output and kNN view has
    one schema (a string key beside int64 ones breaks a merged read of OUTPUT); a shard whose parquet's id column
    is of another type fails (shard.py). From the first readable footer of the run's parquets; where the run has
    none, from the outputs already in OUTPUT of shards it does not name (ours, by their footer), which stay beside
    its own. None (strings, unchecked) where neither says, or the type is none a key can take (id_column_problem
    refuses it)."""
    import pyarrow as pa

    def usable(schema: pa.Schema) -> Optional[str]:
        return output.id_type_name(config.id_column, schema)

    parquets = [p.rows for p in plans if p.rows][:ID_TYPE_READS]
    for url in parquets:
        try:
            fs, path = storage.filesystem(url, config.storage_options)
            schema = shards.read_rows_schema(path, fs)
        except Exception:  # noqa: BLE001 - an unreadable parquet is its shard's own warning (shard.read_metadata)
            continue
        if output.holds_no_ids(config.id_column, schema):  # an emptied shard's: it takes the others' type
            continue
        return usable(schema)
    if parquets:
        return None
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    try:
        files = sorted((listed or Listed(config)).output_files())
    except OSError as exc:  # said by the run's own checks of OUTPUT; the keys stay strings
        log.warning("could not list output %s for its outputs' id type: %s", config.output, exc)
        return None
    mine, root = {p.stem for p in plans}, out_root.rstrip("/") + "/"
    others = [path for path in files if path.startswith(root) and output.is_output_name(path[len(root):])
              and path[len(root):-len(".parquet")] not in mine
              and not any(part.startswith(("_", ".")) for part in path[len(root):].split("/"))]
    for path in others[:ID_TYPE_READS]:
        try:
            footer = output.read_footer(path, out_fs)
        except OSError:
            continue
        if footer is not None and output.footer_metadata(footer.metadata) is not None:
            return usable(footer.schema.to_arrow_schema())
    return None


def plan_run(config: EmbedConfig, *, gpus: Optional[int] = None, client: Any = None,
             listed: Optional[Listed] = None) -> tuple[list[ShardPlan], dict[str, dict]]:
    """The planning of the flow and the Python API: every shard's plan, and those whose output is already finished
    with this run's cache key (none with force), from their footers, as stem -> the shard's result stored there
    (caching.planned_outputs); output.ForeignOutputError where one of their output paths holds a parquet that
    wdsembed did not write (check_own_outputs). Only the others get a .idx and a read of its _stats.json: a
    finished shard is never read, so a re-run with nothing to compute reads no tar (not even one that no .idx can be
    written for) and no _stats.json. Says why outputs already there are recomputed, by cause
    (report.describe_recomputed), before any work. Refuses (check_finished_precision) a run that would keep
    finished outputs made in another precision than its own; `gpus`: the GPUs its workers see (None: those of
    `client`'s workers, where the shards run on a Dask client the caller holds, else of dask_address's, else this
    process's). `listed`: the planning's listings of INPUT and OUTPUT, made once, which the caller keeps for what
    it does next holding OUTPUT's claim (retire_manifest)."""
    listed = listed or Listed(config)
    plans = plan_shards(config, indexes=False, samples=False, listed=listed)
    plans, gpus = run_on_cpu(config, plans, gpus, client)
    # A parquet that wdsembed did not write, where a shard's output goes, is refused before any shard overwrites it:
    # from the footers the cache check reads anyway (caching.planned_outputs); with force, read for this alone.
    if config.force:
        check_own_outputs(config, [p.stem for p in plans])
    verified: dict[str, tuple[str, bool]] = {}
    finished, recompute = ({}, {}) if config.force else caching.planned_outputs(
        config, plans, verified=verified, checked=listed.checked_footers())
    check_finished_precision(config, finished, gpus, client)
    # each shard's own check takes the planning's verdict on an output it read whole (verify_outputs, or a damaged
    # table behind a missing kNN view), unchanged since: read whole twice, a damaged one was said to be twice.
    plans = [dataclasses.replace(p, output_verified=verified[p.stem]) if p.stem in verified else p for p in plans]
    # and a finished shard's task, where Prefect's cache has no result for its group, takes the planning's verdict
    plans = [dataclasses.replace(p, finished_result=json.dumps(finished[p.stem])) if p.stem in finished else p
             for p in plans]
    # A warning: outputs already there are about to be overwritten, and an accident (a package upgraded, tars
    # touched) must show before the work, in the terminal and the flow run's logs, not only at INFO.
    for line in report.describe_recomputed(recompute):
        log.warning("%s", line)
    # Held for the tasks' first attempts, which need not look for these outputs (process_shard's first_attempt).
    _, out_root = storage.filesystem(config.output, config.storage_options)
    written = listed.output_files()
    plans = [dataclasses.replace(p, output_absent=True)
             if storage.join(out_root, p.stem + ".parquet") not in written else p for p in plans]
    viewless = outputs_without_views(config, {p.stem for p in plans}, written)
    if viewless:
        more = f" and {len(viewless) - 5} more" if len(viewless) > 5 else ""
        log.warning("%d finished shard(s) in OUTPUT that this run does not name have no kNN view (%s/), so kNN "
                    "tools reading it do not see their rows: written by a version before views, or with "
                    "knn_view off (--no-knn-view). A run that names them writes their views: %s%s", len(viewless),
                    output.EMBEDDINGS_FOLDER, ", ".join(viewless[:5]), more)
    plans = spread_over_computed(plans, finished)
    return with_indexes(config, with_expected_samples(config, plans, skip=finished), skip=finished), finished


def spread_over_computed(plans: list[ShardPlan], finished: Collection[str]) -> list[ShardPlan]:
    """The plans with the shards to compute numbered among themselves (run_shards, run_index), so that the run's
    fidelity sample is spread over them alone: a finished shard keeps the check of the run that computed it, and
    a re-run of a few new shards beside many finished ones would otherwise check only the new ones' shares."""
    todo = [p.stem for p in plans if p.stem not in finished]
    place = {stem: i for i, stem in enumerate(todo)}
    return [dataclasses.replace(p, run_shards=len(todo), run_index=place[p.stem]) if p.stem in place else p
            for p in plans]


def run_precision(config: EmbedConfig, gpus: Optional[int]) -> Optional[str]:
    """The precision the run's model computes in (the footers' `precision`), where planning can know it: float32 on
    the CPU (device cpu, or auto where the run's workers see no GPU, `gpus` 0), else bfloat16 with autocast and
    float32 without. `gpus`: the GPUs the run's workers see (those of its local cluster, or of a Dask scheduler's
    workers: run_gpus); None where that is not known, and with device auto the precision then is not either."""
    if config.device == "cpu":
        return "float32"
    if config.device == "auto" and gpus is None:
        return None
    if config.device == "auto" and not gpus:
        return "float32"
    return "bfloat16" if config.autocast else "float32"


def run_on_cpu(config: EmbedConfig, plans: list[ShardPlan], gpus: Optional[int] = None,
               client: Any = None) -> tuple[list[ShardPlan], Optional[int]]:
    """The plans, marked ShardPlan.on_cpu where the device is auto, autocast off, and the run's workers see no GPU
    (`gpus`, else run_gpus with `client`): the CPU runs float32 whatever autocast says, so these shards are keyed
    as with autocast on, and a re-run that toggles it finds them finished. Asked only there: with autocast on the
    key is the same on either device. Where the workers' GPUs are unknown (they disagree), autocast keys as given
    (float32 either way). Also returns `gpus`, as looked up here (check_finished_precision takes it)."""
    if config.device != "auto" or config.autocast:
        return plans, gpus
    if gpus is None:
        gpus = run_gpus(config, client)
    if gpus != 0:
        return plans, gpus
    return [dataclasses.replace(p, on_cpu=True) for p in plans], gpus


def run_gpus(config: EmbedConfig, client: Any = None) -> Optional[int]:
    """The GPUs the run's workers see: those of the Dask scheduler's workers where the shards run there (`client`,
    the caller's; else the Dask client current in this process, on whose workers the flow and the Python API run
    the shards where no dask_address is given; else one connected to dask_address for the question), else this
    process's (its local cluster's workers see what it sees). None where the scheduler's workers disagree (some see a
    GPU, some none) or it has none yet."""
    from wdsembed.cluster import current_client, visible_gpus, workers_gpus

    if client is None and not config.dask_address:
        # The flow's planning (tasks.index) and its pre-flight question (nothing_to_compute) have no client in
        # hand: asked of this process, a notebook's on a host without a GPU keyed a GPU cluster's float32 outputs as
        # the CPU's, and a re-run with autocast on took them as its own bfloat16 ones.
        client = current_client()
    if client is not None:
        return workers_gpus(client)
    if not config.dask_address:
        return visible_gpus()
    from distributed import Client

    with Client(config.dask_address, set_as_default=False) as connected:
        return workers_gpus(connected)


def check_finished_precision(config: EmbedConfig, finished: dict[str, dict], gpus: Optional[int] = None,
                             client: Any = None) -> None:
    """Refuse a run that would keep `finished` outputs (plan_run's) made in another precision than it embeds the
    others in: the cache key holds autocast, not the device, so a GPU run resumed on the CPU (or the reverse) finds
    the other's outputs finished, and OUTPUT would mix bfloat16-made and float32-made embeddings without a word.
    `gpus`: the GPUs the run's workers see (None: run_gpus, with `client` where the shards run on its workers;
    looked up only where it matters: device auto). Where they cannot be known (the scheduler's workers disagree),
    a warning says the check was not made."""
    if not finished:
        return
    if gpus is None and config.device == "auto":
        gpus = run_gpus(config, client)
        if gpus is None:
            log.warning("the Dask scheduler's workers do not all see a GPU, or none is connected yet: whether the "
                        "finished outputs in %s were made in this run's precision is not checked", config.output)
    want = run_precision(config, gpus)
    if want is None:
        return
    other = {stem: (result.get("model") or {}) for stem, result in sorted(finished.items())
             if (result.get("model") or {}).get("precision") not in (None, want)}
    if not other:
        return
    made = sorted({(str(m.get("precision")), str(m.get("device", "?")).split(":")[0]) for m in other.values()})
    hints = {("float32", "cpu"): f"{option('device')} cpu", ("bfloat16", "cuda"): "on a GPU with autocast",
             ("float32", "cuda"): f"on a GPU with {option('autocast')}"}
    how = " or ".join(hints.get(pd, f"on {pd[1]}") for pd in made)
    shown = ", ".join(list(other)[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
    where = "the CPU" if config.device == "cpu" or (config.device == "auto" and not gpus) else "a GPU"
    raise InputError(
        f"output {config.output!r} holds {len(other)} finished output(s) made in "
        f"{' and '.join(f'{p} on {d}' for p, d in made)} ({shown}); this run would embed the others in {want} on "
        f"{where} and keep those: two precisions in one OUTPUT. Run it as they were made ({how}), or pass "
        f"{option('force')} to recompute every shard in one precision.")


def with_expected_samples(config: EmbedConfig, plans: list[ShardPlan], *, skip: Collection[str] = (),
                          max_workers: int = 8) -> list[ShardPlan]:
    """The plans with img2dataset's count of their samples, from their _stats.json where they have one, but for the
    stems in `skip` (on an object store, a GET each)."""

    def count_one(plan: ShardPlan) -> ShardPlan:
        if plan.stem in skip or not plan.stats:
            return plan
        return dataclasses.replace(plan, expected_samples=_successes(plan.stats, config))

    with ContextThreadPool(max_workers) as pool:
        return list(pool.map(count_one, plans))


def with_indexes(config: EmbedConfig, plans: list[ShardPlan], *, skip: Collection[str] = (),
                 max_workers: int = 8) -> list[ShardPlan]:
    """The plans with their shard's DALI .idx where use_index_files (found, or written where missing for local
    shards), but for the stems in `skip`."""
    if not config.use_index_files:
        return plans
    cache_dir = config.index_cache()
    not_stored: list[shardindex.IndexNotStoredError] = []

    def index_one(plan: ShardPlan) -> ShardPlan:
        if plan.stem in skip:
            return plan
        fs, tar = storage.filesystem(plan.shard, config.storage_options)
        try:
            # On object stores a missing index is built by the worker during its one read of the tar
            # (shard.process_shard), not here: that would download every shard twice, serially, up front.
            index = shardindex.index_file(tar, fs, cache_dir, build=storage.is_local(fs))
        except shardindex.IndexNotStoredError as exc:
            # A read-only input and a cache this user cannot write: the shard is read without one, said once below.
            not_stored.append(exc)
            return plan
        except shardindex.IndexFormatError as exc:
            # Member names that the .idx format cannot hold (spaces, `b.`): the shard is read without one.
            log.warning("shard %s: no .idx (%s); reading it without one", tar, exc)
            return plan
        except tarstream.ShardReadError as exc:
            # A truncated or corrupt tar: its task embeds the samples before the damage and names the rest
            # (shard.process_shard); it never stops the planning of every other shard.
            why = str(exc).removeprefix(f"{exc.shard}: ")  # the line names the shard once
            if exc.offset == 0:  # not a tar at all: its task fails, naming it (shard.process_shard)
                log.warning("shard %s is not a readable tar (%s)", tar, why)
            else:
                log.warning("shard %s cannot be indexed (%s); its intact samples are read without an index",
                            tar, why)
            return plan
        if index is not None and index == shardindex.index_path_for(tar):
            index = storage.to_url(fs, index)  # beside the shard: s3://bucket/.../00000.idx
        return dataclasses.replace(plan, index=index)

    with ContextThreadPool(max_workers) as pool:
        planned = list(pool.map(index_one, plans))
    if not_stored:
        log.warning("%d shard(s) are read without a .idx: neither their folder nor the index cache %s takes one "
                    "(%s); pass --index-cache-dir (index_cache_dir=) a folder this user can write to keep them",
                    len(not_stored), cache_dir, not_stored[0].strerror)
    return planned


# The most task runs a run makes when shards_per_task is left to it: the Prefect API records every one (on the default
# SQLite server about 0.09 CPU-seconds each), and the flow spends 35-65 ms submitting each (README: Thousands of shards).
TASK_RUNS_PER_RUN = 1000


def shard_groups(plans: list[ShardPlan], shards_per_task: Optional[int]) -> list[list[ShardPlan]]:
    """The run's shards in the groups its embedding task runs take, in order: `shards_per_task` shards each where it
    is set; else one shard per task run up to TASK_RUNS_PER_RUN shards, and beyond that the fewest shards per group
    that keep the run within TASK_RUNS_PER_RUN task runs."""
    size = shards_per_task or max(1, math.ceil(len(plans) / TASK_RUNS_PER_RUN))
    return [plans[i:i + size] for i in range(0, len(plans), size)]


def _successes(url: str, config: EmbedConfig) -> Optional[int]:
    """img2dataset's count of the samples it wrote, from `<stem>_stats.json` at `url`, or None. The file is advisory
    (the shard is read from its tar and parquet; nothing is decided by this count): one that cannot be read (empty,
    not JSON, unreadable, a count that is no whole number) costs a warning naming it, never the run's planning."""
    try:
        fs, _ = storage.filesystem(url, config.storage_options)
        value = (shards.read_stats(url, fs) or {}).get("successes")
        if isinstance(value, float) and not value.is_integer():  # NaN, inf, 2.5
            raise shards.MetadataFileError(f"{url}: 'successes' is {value!r}, not a count")
    except (shards.MetadataFileError, OSError) as exc:
        why = str(exc) if isinstance(exc, shards.MetadataFileError) or url in str(exc) else f"{url}: {exc}"
        log.warning("%s; ignored (it holds img2dataset's counts only: the shard is read from its tar and parquet)",
                    why)
        return None
    return int(value) if isinstance(value, (int, float)) else None
