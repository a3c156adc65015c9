"""One shard, start to end, in plain Python: what the flow's task, the Python API and the bench all run.

    process_shard(config, plan) -> ShardResult
        a finished output with this cache key exists  -> its result, cached
        rows     = read_metadata(config, plan)        # the img2dataset parquet, if any
        tar      = TarRead(config, plan)               # (key, bytes) in archive order; damage, repeats, stale .idx
        check_keys_join(config, plan, rows, keys)      # none of the keys in the rows: failed, from the .idx's keys
                                                       # before embedding where there is one, else after it
        embedded = worker.embed(tar.images())          # DALI + model; a bad image costs only itself
        table    = join_embeddings(rows, embedded, tar) # every row by key, embedded or with its reason
        write_output(table, plan, key, check)         # whole or not at all, the cache key and its parts in its
                                                      # footer; the validation (rows, dimension, finite, norms)
                                                      # runs beside the writes, and nothing appears unless it
                                                      # passes and OUTPUT is still claimed by this run (claim_run)

`process_shards` runs a group of shards and raises one `ShardsFailed` for those that failed. Nothing here imports
Prefect.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import posixpath
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Collection, Iterator, Optional

from wdsembed import (faults, fidelity, output, outputclaim, pipeline, preprocess, report, shardindex, shards,
                      storage, tarstream)
from wdsembed.config import EmbedConfig, option
from wdsembed.validate import validate_output, validate_table
from wdsembed.versions import code_version, package_versions
from wdsembed.worker import Worker

log = logging.getLogger("wdsembed")

# "0": every tar header parsed one by one, even where the .idx allows the fast path (shards.iter_samples): a diagnostic.
TAR_FAST_PATH_ENV = "WDSEMBED_TAR_FAST_PATH"

# The libraries whose versions decide the numbers in an output.
_KEYED_PACKAGES = ("timm", "torch", "nvidia-dali-cuda120")


@dataclass(frozen=True)
class ShardPlan:
    """One shard to embed: where it is, what it is (fingerprint), where its output goes. Small and picklable."""

    shard: str  # URL or path of the tar
    stem: str  # "00000"
    fingerprint: str  # size + mtime/etag of the tar (and its parquet): changes when the shard is rewritten
    rows: Optional[str]  # the img2dataset parquet beside it, if any: a file, or a folder of part files (Spark, Dask)
    index: Optional[str]  # the .idx found or written for it, if use_index_files
    output: str  # OUTPUT/<stem>.parquet
    expected_samples: Optional[int] = None  # from <stem>_stats.json "successes", when present
    stats: Optional[str] = None  # the img2dataset <stem>_stats.json beside it, if any (expected_samples' source)
    run_shards: Optional[int] = None  # shards in the run: spreads its fidelity sample over them
    run_index: int = 0  # this shard's place among them: its share of that sample
    # The run's id column type ("int64", from its parquets or OUTPUT's outputs: plan.run_id_type), which the tar's
    # keys take where the shard has no parquet rows (none, or one that cannot be read): every output and kNN view
    # then has one schema. None: strings.
    id_type: Optional[str] = None
    # What the planning found reading the output whole (verify_outputs, or rebuilding its kNN view), as (the file's
    # fingerprint token then, sound): the shard's own check takes it while the file is unchanged, instead of reading
    # it whole again.
    output_verified: Optional[tuple[str, bool]] = None
    # The planning's listing of OUTPUT, under the run's claim, held no file at `output`: the task's first attempt
    # need not ask (process_shard's `first_attempt`).
    output_absent: bool = False
    # The planning found the output finished with this run's cache key (its kNN view rebuilt where missing or stale),
    # holding the run's claim: the shard's result from its footer, as JSON (a string: Prefect walks every element of
    # a task's parameters). The task's first attempt takes it (process_shard's `first_attempt`).
    finished_result: Optional[str] = None
    # Device auto, and the planning found the run's workers without a GPU (plan.run_on_cpu): the model runs float32
    # on the CPU whatever autocast says, and the shard is keyed as with device cpu (EmbedConfig.model_key).
    on_cpu: bool = False


@dataclass
class ShardResult:
    """What a shard's processing returns: counts and where the output is, never arrays."""

    shard: str
    stem: str
    output: str
    rows: int = 0  # rows in the output parquet
    samples: int = 0  # samples found in the tar
    embedded: int = 0
    failed: int = 0  # rows without embedding (bad images, failed downloads, missing from tar)
    cached: bool = False
    seconds: float = 0.0
    dim: int = 0
    cache_key: str = field(default="", repr=False)
    # A few (key, reason) examples. Left out of the repr: error_causes says each of their reasons once, with keys.
    errors: list[tuple[str, str]] = field(default_factory=list, repr=False)
    # Why its rows without an embedding have none, by cause, most rows first (report.row_causes): what the task run's
    # log and the run's summary say of them. Failed downloads included, which `errors` leaves out.
    error_causes: list[dict] = field(default_factory=list)
    # Left out of the repr, as are the timeline and fidelity record below: a list of results shown in a notebook
    # read about 1,200 characters per shard, most of them these. Each is an attribute, and in to_dict().
    model: dict = field(default_factory=dict, repr=False)  # name, weights, embedding, dim, preprocessing
    # What was wrong with the shard itself, though its output was written: a damaged tar (every intact sample is
    # embedded, the rest named in the error column), an unreadable parquet, repeated keys, a stale .idx rebuilt.
    warnings: list[str] = field(default_factory=list)
    batch_size: int = 0  # the model batch size this shard ran with
    # Wall-clock times (epoch s) and the worker process: when the shard began, when it got the worker's pipeline
    # and released it, when it ended. Shows waits between shards and overlap (or its absence) per worker.
    timeline: dict = field(default_factory=dict, repr=False)
    # The fidelity check's record (wdsembed.fidelity.check_sample): cosine per sampled key against timm's own
    # preprocessing, and images only one side could embed. Stored in the footer: a cached shard is re-checked.
    fidelity: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # (key, reason) tuples also where the result comes back from JSON (a finished output's footer): lists there
        self.errors = [tuple(error) for error in self.errors]

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 and not self.cached else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"images_per_second": round(self.images_per_second, 1)}


class ShardsFailed(faults.PartlyTransient, RuntimeError):
    """Some shards failed; every other shard's output is written. `failures`: stem -> reason, and where the manifest
    could not be written either, its file name (output.MANIFEST_NAME) -> reason; `results`: the finished shards'
    results (ShardResult or their dicts); `transient`: the failed shards whose failure may pass on a retry
    (faults.is_transient; the finished shards are then found done, not redone), the others fail again until their
    cause is fixed; `manifest`: the run's manifest (written unless `failures` names it)."""

    def __init__(self, failures: dict, results: list = (), transient: Collection[str] = (),
                 manifest: Optional[dict] = None, total: Optional[int] = None) -> None:
        failures, results, transient = dict(failures), list(results), sorted(transient)
        of = f" of {total}" if total else ""
        # The manifest's failure (report.with_manifest_failure) is named last and counted as no shard. The shards'
        # reasons by cause and bounded: Prefect logs this message and shows it as the run's state, at any scale.
        failed = {stem: reason for stem, reason in failures.items() if stem != output.MANIFEST_NAME}
        said = [report.describe_failures(failed)] if failed else []
        said += [f"{name}: {failures[name]}" for name in sorted(set(failures) - set(failed))]
        message = f"{len(failed)}{of} shard(s) failed: " + "; ".join(said)
        super().__init__(message)
        self.failures, self.results, self.transient, self.manifest, self.total = (failures, results, transient,
                                                                                  manifest, total)

    def __reduce__(self):  # crosses from Dask workers to the flow with every field
        return type(self), (self.failures, self.results, self.transient, self.manifest, self.total)


class ShardAbandoned(Exception):
    """The task running these shards is no longer wanted by the run that gave it (`abandoned()` said so:
    wdsembed.cluster.task_abandoned, on a Dask worker whose run was interrupted or cancelled): the shard being
    embedded is left unwritten, the group's others unstarted. Never retried (faults.is_transient)."""


def _never() -> bool:
    return False


_NOT_WANTED = "Dask no longer wants this task's result (the run that submitted it was interrupted or cancelled)"


def _why(abandoned: Callable[[], bool]) -> str:
    """Why `abandoned` said so: its own words where it has them (wdsembed.cluster.task_abandoned's, of a worker
    that is closing), else _NOT_WANTED."""
    why = getattr(abandoned, "why", None)
    return (why() if why is not None else None) or _NOT_WANTED


# --------------------------------------------------------------------------------------------------- cache key


def cache_key(config: EmbedConfig, plan: ShardPlan) -> str:
    """Everything that decides a shard's output bytes (cache_key_parts), hashed."""
    return hashlib.sha256(json.dumps(cache_key_parts(config, plan), sort_keys=True).encode()).hexdigest()[:32]


def cache_key_parts(config: EmbedConfig, plan: ShardPlan) -> dict:
    """Everything that decides a shard's output bytes: its content, the model and weights, the embedding options,
    the output schema options, the declared versions of the preprocessing recipe and the output format, and the
    versions of the libraries doing the maths. Not a hash of source files: reformatting code recomputes nothing;
    a change that alters outputs bumps preprocess.RECIPE_IMPL_VERSION or output.OUTPUT_FORMAT_VERSION, or, where
    it alters only some runs' outputs, adds a part to those runs' keys alone."""
    parts = {
        "shard": plan.fingerprint,
        "model": config.model_key(on_cpu=plan.on_cpu),
        # Its content's hash: since 2026-12-05 (before, its size and mtime), so outputs made with a checkpoint before
        # then recompute once.
        "checkpoint": (storage.checkpoint_identity(config.checkpoint, config.storage_options) if config.checkpoint
                       else None),
        "columns": [config.id_column, config.embedding_column, config.error_column],
        "extensions": list(config.image_extensions),
        "max_image_pixels": config.max_image_pixels or None,
        "recipe": preprocess.RECIPE_IMPL_VERSION,
        "format": output.OUTPUT_FORMAT_VERSION,
        "packages": {k: v for k, v in package_versions().items() if k in _KEYED_PACKAGES},
    }
    folder = storage.model_folder_identity(config.model_name)
    if folder:  # a local-dir: model's folder content; only there, so that no other run's keys change
        parts["model_folder"] = folder
    if config.embedding_dtype != "float32":  # only then: the keys of float32 outputs made before it stay as they were
        parts["dtype"] = config.embedding_dtype
    if keys_typed(plan) is not None:  # only there: no other shard's key changes; a string-keyed one is remade
        parts["id_type"] = plan.id_type
    if config.checkpoint and config.embedding == "auto":
        # Since 2026-12-05 a checkpoint's own class head makes the model a classifier (pooled features, not its
        # logits) even where the pretrained tag names a CLIP projection: outputs of the old rule recompute. Only
        # here, so that no other run's outputs do.
        parts["checkpoint_head_rule"] = 2
    return parts


def same_model_name(recorded, name: str, spelled=None) -> bool:
    """Whether a recorded model name is `name` or another spelling of it that timm builds the same
    (model.spellings: `resnet18` and its default tag `resnet18.a1_in1k`). `spelled`: the spellings the output's
    footer recorded beside the name (model.spellings when it was made); where it has them, timm is not imported: a
    re-run of finished shards, spelled otherwise, stays without torch and timm. Else timm is imported, only where
    the two are names of one architecture."""
    if recorded == name:
        return True
    if not isinstance(recorded, str) or ":" in recorded + name or recorded.partition(".")[0] != name.partition(".")[0]:
        return False
    if isinstance(spelled, list) and recorded in spelled:
        return name in spelled
    from wdsembed.model import spellings  # imports torch and timm: seconds, which a re-run of finished shards skips

    return recorded in spellings(name)


def made_as_spelled_otherwise(config: EmbedConfig, plan: ShardPlan, meta: dict) -> bool:
    """Whether an output whose footer metadata `meta` carries another key than this run's was made under this run's
    key but for the model's name spelled otherwise (same_model_name): the same model and weights, finished for this
    run too. Each key stays that of the name as typed (outputs of earlier versions' included), and a key of the other
    spelling is made only where the footer names it."""
    recorded = meta.get("cache_key")
    parts = meta.get("cache_key_parts")
    model = (meta.get("result") or {}).get("model") or {}
    named = (parts.get("model") or {}).get("model_name") if isinstance(parts, dict) else \
        model.get("name")  # footers before the parts were recorded
    if not recorded or named == config.model_name or \
            not same_model_name(named, config.model_name, model.get("spellings")):
        return False
    now = cache_key_parts(config, plan)
    now["model"] = {**now["model"], "model_name": named}
    return hashlib.sha256(json.dumps(now, sort_keys=True).encode()).hexdigest()[:32] == recorded


def stored_result(meta: dict, plan: ShardPlan) -> dict:
    """A finished output's result as its footer `meta` stored it, naming the shard and the output by this run's
    paths: the footer's are those of the run that made it, and the tars or OUTPUT may have moved since (no path is
    in a cache key: a copy of OUTPUT is finished where it is)."""
    return {**meta["result"], "shard": plan.shard, "output": plan.output}


# How a recorded part is said where it differs: by the EmbedConfig field it comes from, where there is one. Parts
# absent from a footer take the value their absence stands for (cache_key_parts adds "dtype" and
# "checkpoint_head_rule" only where they are not that value).
_PART_NAMES = {"extensions": "image_extensions", "dtype": "embedding_dtype", "recipe": "preprocessing recipe version",
               "format": "output format version", "checkpoint": "checkpoint content",
               "model_folder": "local-dir folder content", "id_type": "id type of its keys (no parquet)"}
_PART_ABSENT = {"dtype": "float32", "checkpoint_head_rule": 1, "id_type": "string"}
_COLUMN_NAMES = ("id_column", "embedding_column", "error_column")  # the order of cache_key_parts' "columns"


def keys_typed(plan: ShardPlan):
    """The type a shard without a parquet gives its tar keys (plan.id_type), where it is not string; else None."""
    return tar_key_type(plan) if plan.rows is None else None


def tar_key_type(plan: ShardPlan):
    """The type the shard's tar keys take where it has no parquet rows to join (plan.id_type), where it is not
    string; else None."""
    if not plan.id_type:
        return None
    import pyarrow as pa

    t = pa.type_for_alias(plan.id_type)
    return None if t == pa.string() else t


def why_recomputed(recorded: dict, now: dict) -> str:
    """Why an output whose footer metadata is `recorded` is not finished for a run whose key parts
    (cache_key_parts) are `now`, in words a user can act on: which of the shard's files changed since, and each
    setting or version that differs, with its old and new value (`autocast=True (now False)`)."""
    if "cache_key" not in recorded:
        return "their files carry no cache key (copies saved from outputs, never taken for finished ones)"
    before = recorded.get("cache_key_parts")
    if not isinstance(before, dict):
        return "their outputs were made by an earlier wdsembed version, which did not record its settings"
    now = json.loads(json.dumps(now))  # as a footer holds it: lists, not tuples
    said = _files_changed(str(before.get("shard", "")), str(now.get("shard", "")))
    settings = []
    for part in sorted(set(before) | set(now), key=lambda p: list(now).index(p) if p in now else len(now)):
        if part == "shard":
            continue
        old, new = before.get(part, _PART_ABSENT.get(part)), now.get(part, _PART_ABSENT.get(part))
        if part in ("model", "packages") and isinstance(old, dict) and isinstance(new, dict):
            settings += [_changed(name, old.get(name), new.get(name)) for name in {**old, **new}
                         if old.get(name) != new.get(name)]
        elif part == "columns" and isinstance(old, list) and isinstance(new, list) and len(old) == len(new) == 3:
            settings += [_changed(name, a, b) for name, a, b in zip(_COLUMN_NAMES, old, new) if a != b]
        elif old != new:
            settings.append(_changed(_PART_NAMES.get(part, part), old, new))
    if settings:
        said.append("their outputs were made with " + ", ".join(settings))
    # Equal parts under another key: a key computed otherwise, by another version of this code.
    return "; ".join(said) or "their outputs were made under another cache key, from the settings of this run"


def _files_changed(before: str, now: str) -> list[str]:
    """What changed in a shard's fingerprint (plan.plan_shards: the tar's, then its img2dataset parquet's)."""
    (tar_before, *rows_before), (tar_now, *rows_now) = before.split("|"), now.split("|")
    said = []
    if tar_before != tar_now:
        said.append(f"their tars changed since ({_what_changed(tar_before, tar_now)})")
    if rows_before and rows_now and rows_before != rows_now:
        said.append(f"their img2dataset parquets changed since ({_what_changed(rows_before[0], rows_now[0])})")
    elif rows_before != rows_now:
        said.append("their img2dataset parquets " + ("appeared since" if rows_now else "are gone since"))
    return said


def _what_changed(before: str, now: str) -> str:
    """Which of a file's size, ETag and mtime differ, from two ShardFingerprint tokens (`size-etag-mtime`)."""
    def fields(token: str) -> dict:
        size, _, rest = token.partition("-")
        etag, _, mtime = rest.rpartition("-")
        return {"size": size, "ETag": etag, "mtime": mtime}

    old, new = fields(before), fields(now)
    return "/".join(name for name in old if old[name] != new[name]) or "size/mtime"


def _changed(name: str, old, new) -> str:
    def said(value) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value))
        if isinstance(value, str) and value.startswith(storage.CONTENT_IDENTITY_PREFIX):
            return value[:len(storage.CONTENT_IDENTITY_PREFIX) + 12] + "..."  # a checkpoint's hash: its first digits
        return str(value)

    return f"{name}={said(old)} (now {said(new)})"


_UNREAD = object()  # finished_output's footer, where its caller has not read it


def finished_output(config: EmbedConfig, plan: ShardPlan, key: str, *, repair_view: bool = True,
                    claim_run: Optional[str] = None,
                    made_otherwise: Callable[[dict], None] = lambda meta: None,
                    verified: Callable[[str, bool], None] = lambda token, sound: None,
                    footer=_UNREAD, checked_meta: Optional[dict] = None) -> Optional[dict]:
    """The footer metadata of a complete output made with the same cache key (or with the model spelled otherwise:
    made_as_spelled_otherwise), else None (missing, cut short, its footer unreadable, or made from other inputs):
    such an output is recomputed, never reported as cached; a readable
    parquet there that wdsembed did not write raises output.ForeignOutputError, and is never overwritten. Only the
    footer is read, but where the kNN view must be rebuilt from the table and the table turns out damaged, the
    output is not finished either (a warning names it). `repair_view=False` only reads (the pre-flight's question),
    writing no missing kNN view. A view is rebuilt only while OUTPUT's claim is still run `claim_run`'s (a task's;
    None: the planning's, in the process that holds it), else OutputClaimLostError (outputclaim.check_still_held).
    `made_otherwise` is called with the footer metadata of an output of ours made under another key (why_recomputed
    says why, from the footer already read). `verified` is called with the output's fingerprint token and whether it
    was found sound, where it was read whole (verify_outputs) or found damaged rebuilding its view; where
    plan.output_verified holds the planning's verdict on the same file, that is taken instead (and its warning not
    said again). `footer`: the output's footer, where the caller just read it (output.read_footer: None for
    none). `checked_meta`: its footer metadata as the run's checks read it, of this very file
    (plan.Listed.checked_footers: unchanged since), whose id column is plain: taken instead of a read."""
    fs, path = storage.filesystem(plan.output, config.storage_options)
    if checked_meta is not None:
        meta = checked_meta
    else:
        footer = output.read_footer(path, fs) if footer is _UNREAD else footer
        meta = output.output_metadata(footer, path, refuse_foreign=True)
    if meta is not None and meta.get("cache_key") != key:
        if made_as_spelled_otherwise(config, plan, meta):
            key = meta["cache_key"]  # its view, and any rewrite of its ids, go on under the key it was made with
        else:
            made_otherwise(meta)

    def damaged(exc: Exception) -> None:  # the table, read to repair it, is damaged: recomputed, said once
        token = _output_token(fs, path)
        if token is not None:
            verified(token, False)
        log.warning("shard %s: %s; recomputing it", plan.stem, exc)

    if meta and meta.get("cache_key") == key:
        if repair_view and plan.output_verified and not plan.output_verified[1] and \
                plan.output_verified[0] == _output_token(fs, path):
            return None  # found damaged by the planning, which said why: not read, nor said, again
        if repair_view and checked_meta is None:  # the checks kept only footers of plain ids
            # an earlier version's dictionary-typed ids, which a merged read refuses beside this version's
            try:
                if output.ensure_plain_ids(
                        config, plan.stem, plan.output, footer, key,
                        before_commit=lambda: outputclaim.check_still_held(
                            config, claim_run, f"shard {plan.shard}",
                            "Its table with dictionary-encoded ids was not rewritten")):
                    log.info("shard %s: its output's dictionary-encoded %s column (an earlier version's) was "
                             "rewritten as its values, embedding nothing", plan.stem, config.id_column)
            except output.DamagedOutputError as exc:
                return damaged(exc)
        if repair_view and config.knn_view:
            # a deleted or stale view is rebuilt from the table, not re-embedded
            try:
                output.ensure_embeddings_view(
                    config, plan.stem, plan.output, key,
                    before_commit=lambda: outputclaim.check_still_held(
                        config, claim_run, f"shard {plan.shard}",
                        "Its missing or stale kNN view was not rebuilt from its table"))
            except output.DamagedOutputError as exc:
                return damaged(exc)
        if repair_view and config.verify_outputs:
            token = _output_token(fs, path)
            if token is not None and plan.output_verified and plan.output_verified[0] == token:
                return meta if plan.output_verified[1] else None  # read whole by the planning, which said why
            damage = _damage(config, plan, meta)
            if token is not None:
                verified(token, not damage)
            if damage:
                log.warning("shard %s: output %s is damaged: %s; recomputing it", plan.stem, plan.output, damage)
                return None
        return meta
    return None


def _output_token(fs, path: str) -> Optional[str]:
    """The output file's fingerprint (size, mtime or ETag), to tell whether it changed since it was verified."""
    try:
        return shardindex.fingerprint(path, fs).token
    except OSError:
        return None


def _damage(config: EmbedConfig, plan: ShardPlan, meta: dict) -> Optional[str]:
    """What verify_outputs finds wrong with a finished output, read whole (every column, then its view), or None.
    Overwritten bytes below an intact footer show only there: in a page that no longer decodes, or in values unlike
    the view's copy of them (or not finite, or not of unit norm)."""
    result = meta.get("result") or {}
    rows, failed = result.get("rows"), result.get("failed")
    check = validate_output(config, plan.output, dim=int(result.get("dim") or 0), expected_rows=rows,
                            expected_embedded=rows - failed if rows is not None and failed is not None else None,
                            every_column=True)
    return "; ".join(check.problems) or None


# --------------------------------------------------------------------------------------------------- one shard


def process_shard(
    config: EmbedConfig, plan: ShardPlan, *, claim_run: Optional[str] = None, abandoned: Callable[[], bool] = _never,
    first_attempt: bool = False,
) -> ShardResult:
    """Embed one shard and write OUTPUT/<stem>.parquet whole, or find it already done (same cache key).
    `claim_run`: the id of the run whose claim on OUTPUT this shard is written under (outputclaim.Claim.run); its
    files are put in place only while that run still holds it (write_output). None: written without a claim.
    `abandoned`: asked as the shard starts and after each batch (it must be cheap); once true, ShardAbandoned is
    raised and nothing of the shard is written. `first_attempt`: this run has not tried the shard before (its task's
    first try), so an output the planning found absent (plan.output_absent) is not looked for, nor one it found
    finished (plan.finished_result) read again: under the run's claim nothing else writes it, and on an object store
    each look is a HEAD and a one-key LIST, each read of a footer a GET."""
    if abandoned():
        raise _abandon(f"shard {plan.shard} not started: {_why(abandoned)}")
    start = time.perf_counter()
    timeline = {"worker": f"{socket.gethostname()}:{os.getpid()}", "start": time.time()}
    key = cache_key(config, plan)
    if not config.force and first_attempt and plan.finished_result is not None:
        # Under the run's claim nothing else writes OUTPUT since the planning judged it: its footer and view are
        # not read again (where Prefect's task cache has no result for the group)
        return ShardResult(**json.loads(plan.finished_result), cached=True, seconds=time.perf_counter() - start)
    if not config.force and not (first_attempt and plan.output_absent):
        meta = finished_output(config, plan, key, claim_run=claim_run)
        if meta is not None:
            return ShardResult(**stored_result(meta, plan), cached=True, seconds=time.perf_counter() - start)

    check_output_writable(config, plan)
    faults.maybe_inject(plan.stem)  # opt-in (WDSEMBED_FAULTS); a no-op otherwise
    rows, warnings = read_metadata(config, plan)
    # found now, not after embedding the shard: no id column, one the join refuses (float keys), or a column the
    # output's own would replace
    problem = (output.id_column_problem(config.id_column, plan.rows, rows.schema)
               or output.column_clash_problem(plan.rows, rows.schema, config.embedding_column, config.error_column)
               if rows is not None else None)
    if problem:
        raise ValueError(f"shard {plan.shard}: {problem}")
    if rows is not None:
        check_id_type(config, plan, rows.schema)
    tar = TarRead(config, plan)
    if rows is not None and tar.index is not None:
        # The index lists every sample key: a parquet that holds none of them fails now, before the shard is
        # downloaded and embedded, not after.
        check_keys_join(config, plan, rows, shards.index_keys(tar.index))
    # Held until the shard is written: another run's task on this Dask worker, with other settings, waits for it
    # instead of closing this Worker under it (Worker.lease).
    with Worker.lease(config, run=claim_run) as worker:
        # From an object store, the shard starts arriving now, while another shard may still hold the pipeline.
        storage.prefetch_shards([plan.shard], config.storage_options)
        # The fidelity sample is picked as the images stream past (a few kept, never the shard).
        quota = fidelity.shard_quota(config.fidelity_sample, plan.run_shards, plan.run_index)
        sample = fidelity.SampleCollector(quota)
        # The worker's stream takes this shard's samples right behind those of the shard before it (another
        # thread's).
        seen = [0]

        def after_batch(n: int) -> None:  # in this thread: raised here, the stream drops the rest of the shard
            seen[0] += n
            if abandoned():
                raise _abandon(f"shard {plan.shard} stopped after {seen[0]} of its images, nothing of it written: "
                               f"{_why(abandoned)}")

        try:
            keys, embeddings, failures = worker.embed(
                sample.wrap(tar.images()), autocast=config.autocast, normalize=config.normalize_embeddings,
                on_batch=faults.batch_hook(plan.stem, after_batch, until=abandoned), timeline=timeline,
            )
        finally:  # a call stopped before the stream reached its shard never opened it: its bytes go back
            storage.forget_shards([plan.shard], config.storage_options)
        embeddings = output.as_stored(embeddings, keys, config.embedding_dtype, plan.shard)
        # The reference runs beside the table building below, while the stream goes on with the next shard (on a
        # GPU the reference is the worker's float32 copy of the model, beside it); stopped and waited for where the
        # block raises.
        chosen = sample.chosen()
        with fidelity.reference_beside(worker, chosen, config.max_image_pixels or None) as reference:
            faults.maybe_inject(plan.stem, "table")
            warnings += tar.finish()
            if rows is None and plan.expected_samples is not None and tar.n_samples < plan.expected_samples:
                # With a parquet, its rows of such samples say "not in tar"; without one, only this count tells.
                warnings.append(f"{posixpath.basename(plan.stats)} counts {plan.expected_samples} samples written "
                                f"(img2dataset's 'successes'), but the tar holds {tar.n_samples}: "
                                f"{plan.expected_samples - tar.n_samples} are missing from it, and without the "
                                "shard's parquet no row names them")
            if rows is not None:  # the keys as read: a shard without an index is checked here only
                check_keys_join(config, plan, rows, list(dict.fromkeys([*keys, *tar.errors, *failures])))
            joined = output.join_embeddings(
                rows=rows,
                keys=keys,
                embeddings=embeddings,
                errors={**tar.errors, **failures},
                repeats=tar.repeats,
                dim=worker.loaded.dim,
                id_column=config.id_column,
                embedding_column=config.embedding_column,
                error_column=config.error_column,
                missing_reason=tar.missing_reason,
                missing_reasons=tar.missing_reasons,
                embedding_dtype=config.embedding_dtype,
                # without rows (no parquet, or one that cannot be read: its warning says so), or with an id column
                # that holds no value (an empty frame's), the run's id type
                id_type=tar_key_type(plan),
            )
            timeline["table"] = time.time()
            record = fidelity.check_sample(worker, chosen, keys, embeddings, failures,
                                           config.max_image_pixels or None, reference)
        table = joined.table

        def check() -> None:
            problems = validate_table(config, table, dim=worker.loaded.dim, expected_embedded=joined.embedded_rows)
            timeline["validated"] = time.time()
            if problems:
                raise ValueError(f"shard {plan.shard}: output not written, it fails validation: "
                                 + "; ".join(problems))

        if config.fidelity_sample and not quota:  # fewer images asked than shards: none of this one's, by design
            record = {"sampled": 0}  # not "without a stored check" (no record: the check was off, or predates it)
        timeline["checked"] = time.time()
        result = ShardResult(
            shard=plan.shard,
            stem=plan.stem,
            output=plan.output,
            rows=table.num_rows,
            samples=tar.n_samples,
            embedded=joined.embedded,
            failed=table.num_rows - joined.embedded_rows,  # rows without an embedding
            dim=worker.loaded.dim,
            cache_key=key,
            errors=sorted([*{**tar.errors, **failures, **joined.errors}.items(), *tar.repeats])[:20],
            error_causes=_row_causes(config, plan, table),
            model=worker.info,
            warnings=warnings,
            batch_size=config.batch_size,
            timeline=timeline,
            fidelity=record,
        )
        write_output(config, plan, table, key, result, check, claim_run=claim_run)
    result.seconds = time.perf_counter() - start
    timeline["end"] = time.time()
    return result


def _row_causes(config: EmbedConfig, plan: ShardPlan, table) -> list[dict]:
    """The table's rows without an embedding, by cause (report.row_causes)."""
    import pyarrow.compute as pc

    reasons = table.column(config.error_column)
    if reasons.null_count == len(reasons):  # every row embedded
        return []
    without = table.filter(pc.is_valid(reasons))
    return report.row_causes(plan.stem, without.column(config.id_column).to_pylist(),
                             without.column(config.error_column).to_pylist())


def process_shards(
    config: EmbedConfig, plans: list[ShardPlan], *, claim_run: Optional[str] = None,
    abandoned: Callable[[], bool] = _never, first_attempt: bool = False,
    on_shard_end: Callable[[str, Optional[ShardResult], Optional[str]], None] = lambda stem, result, reason: None,
) -> list[ShardResult]:
    """Every shard of a group, each tried (process_shard, with `claim_run`); raises one ShardsFailed naming those
    that failed (with the results of those that did not). `abandoned`: asked before each shard and after each
    batch (process_shard); once true, ShardAbandoned is raised and the group's other shards are not started.
    `first_attempt`: the group's first try (process_shard); a retry looks for the outputs an earlier try wrote.
    `on_shard_end(stem, result, reason)`: as each shard ends, before the next starts, with its result, or None and
    the reason it failed (a group of 20 shards says each one as it ends, not all of them at its end).

    No look-ahead over the group: process_shard names its own shard to the S3 fetcher once its cache check has
    passed, as in a one-shard task, and it downloads while the worker's other task threads embed theirs; a
    look-ahead would hold memory for shards whose cached outputs mean they are never opened."""
    results, failures, transient = [], {}, []
    for i, plan in enumerate(plans):
        try:
            results.append(process_shard(config, plan, claim_run=claim_run, abandoned=abandoned,
                                         first_attempt=first_attempt))
        except ShardAbandoned:
            if plans[i + 1:]:
                log.warning("shards %s not started: %s", ", ".join(p.stem for p in plans[i + 1:]), _why(abandoned))
            raise
        except Exception as exc:  # noqa: BLE001 - every shard's outcome is reported; one failure stops no other
            failures[plan.stem] = faults.reason(exc)
            if faults.is_transient(exc):
                transient.append(plan.stem)
            _said_at_its_end(on_shard_end, plan.stem, None, failures[plan.stem])
        else:
            _said_at_its_end(on_shard_end, plan.stem, results[-1], None)
    # Not logged here: on_shard_end may say each one as it ends; the task run's end says each reason (this
    # ShardsFailed), and the run's summary again.
    if failures:
        raise ShardsFailed(failures, [r.to_dict() for r in results], transient, total=len(plans))
    return results


def _said_at_its_end(on_shard_end: Callable, stem: str, result: Optional[ShardResult], reason: Optional[str]) -> None:
    """on_shard_end, whose failure (a log handler's) neither fails a shard already written nor stops the group."""
    try:
        on_shard_end(stem, result, reason)
    except Exception as exc:  # noqa: BLE001 - saying a shard's end is not part of its outcome
        log.warning("shard %s: its end could not be said (%s); its outcome stands", stem, faults.reason(exc))


def _abandon(said: str) -> ShardAbandoned:
    """The ShardAbandoned to raise, said first on the worker's log: its run, gone, hears of it no more."""
    log.warning("%s", said)
    return ShardAbandoned(said)


# --------------------------------------------------------------------------------------------------- the steps


def check_keys_join(config: EmbedConfig, plan: ShardPlan, rows, keys: list[str]) -> None:
    """A parquet whose id column holds none of the tar's sample keys (`keys`): a wrong --id-column, or a parquet of
    another tar, refused rather than joined into a table of nulls; a ValueError, so not retried (the same keys
    match nothing again)."""
    problem = output.unmatched_keys_problem(rows.column(config.id_column), keys, config.id_column, plan.rows,
                                            f"the tar's {len(keys)} sample key(s)")
    if problem:
        raise ValueError(f"shard {plan.shard}: {problem}")


def check_id_type(config: EmbedConfig, plan: ShardPlan, schema) -> None:
    """A parquet whose id column is not of the run's type (plan.id_type, the first readable parquet's): its
    output's keys would be of another type than the others', which no merged read, concat or kNN view of OUTPUT
    takes. Refused before the shard is embedded; a ValueError, so not retried. The pre-flight names every such
    shard of a local input (plan._check_id_types)."""
    mine = output.id_type_name(config.id_column, schema)
    if plan.id_type and mine and mine != plan.id_type:
        raise ValueError(f"shard {plan.shard}: id column {config.id_column!r} is {mine} in {plan.rows}, but the run's "
                         f"ids are {plan.id_type} (its first readable parquet's): outputs of two id types do not read "
                         f"as one dataset nor one kNN view; write every parquet's {config.id_column!r} as one type")


def read_metadata(config: EmbedConfig, plan: ShardPlan):
    """The shard's img2dataset parquet rows (None without one), and a warning where it cannot be read."""
    if not plan.rows:
        return None, []
    fs, path = storage.filesystem(plan.rows, config.storage_options)
    try:
        return shards.read_rows(path, fs), []
    except shards.MetadataFileError as exc:
        # The tar's samples are still embedded (one row each, keyed); the parquet's columns are missing until it is
        # fixed, which changes the shard's fingerprint, so the next run redoes the shard with them.
        warning = f"{exc}; the output holds the tar's samples only (no img2dataset columns)"
        log.warning("shard %s: %s", plan.stem, warning)
        return None, [warning]


MAX_DAMAGE_WARNINGS = 5  # a tar damaged in many places gets this many warnings naming a damaged part, then a count


class TarRead:
    """One pass over a shard's tar in archive order: the images to embed, and what the pass found on the way
    (samples without an image, repeated keys, damage, a stale .idx). A shard on an object store without an index
    gets one from this same pass, and so does a shard whose index turns out stale."""

    def __init__(self, config: EmbedConfig, plan: ShardPlan) -> None:
        self.config, self.plan = config, plan
        self.fs, self.path = storage.filesystem(plan.shard, config.storage_options)
        self.index = self._read_index()
        self.builder = (shardindex.IndexBuilder() if config.use_index_files
                        and (self.index is not None or not storage.is_local(self.fs)) else None)
        self.errors: dict[str, str] = {}  # key -> why it has no image
        self.duplicates: dict[str, int] = {}  # key -> how many later samples repeat it
        # (key, why) of each such repeat, in tar order: a row of its own in the output, never embedded (the key's
        # first sample is its row), so that no sample of the tar goes missing from it unsaid
        self.repeats: list[tuple[str, str]] = []
        # members without an extension, which no sample has (shards.iter_samples): the key each would be -> its name
        self.no_extension: dict[str, str] = {}
        self.n_no_extension = 0
        # samples with more than one image member (Sample.others): how many, and the first few (key, chosen, others)
        self.several_images: list[tuple[str, str, tuple[str, ...]]] = []
        self.n_several_images = 0
        self.damage: list[tarstream.ShardReadError] = []
        self.stale: list[shardindex.StaleIndexError] = []
        self.n_samples = 0
        self.read_to_end = False

    def images(self) -> Iterator[tuple[str, bytes]]:
        """(key, image bytes) of every sample with an image: the first sample of a key with an image member (a
        sample of none, a caption before its image, gives the key its row only until one comes)."""
        seen: set[str] = set()
        imageless: set[str] = set()  # keys seen so far only in samples without an image member
        # Object stores: large ranges fetched ahead in the background, overlapping download with embedding.
        with storage.open_sequential(self.fs, self.path) as f:
            samples = shards.iter_samples(f, extensions=self.config.image_extensions, shard=self.plan.shard,
                                          index=self.index, index_builder=self.builder,
                                          on_stale_index=self.stale.append, on_damage=self.damage.append,
                                          fast=os.environ.get(TAR_FAST_PATH_ENV) != "0",
                                          refuse_large=functools.partial(pipeline.refusal_from_head,
                                                                         max_pixels=self.config.max_image_pixels
                                                                         or None),
                                          on_no_extension=self._without_extension)
            try:
                for sample in samples:
                    self.n_samples += 1
                    no_image = shards.has_no_image_member(sample)
                    if sample.key in seen:
                        if no_image:  # members of the key apart from its row's (a caption after its image)
                            continue
                        if sample.key not in imageless:
                            # The key's first sample with an image owns its row (embedded or failed); a repeat is
                            # not embedded (which of two images a key's parquet row describes cannot be told, and
                            # two embeddings of one key would make its id ambiguous in a kNN index): it gets a row
                            # of its own that says so.
                            self.duplicates[sample.key] = self.duplicates.get(sample.key, 0) + 1
                            self.repeats.append((sample.key, self._repeat_reason(sample)))
                            continue
                        imageless.discard(sample.key)
                        del self.errors[sample.key]
                    seen.add(sample.key)
                    if no_image:
                        imageless.add(sample.key)
                    if sample.others:  # the key's row, from one of its image members: said in the warnings
                        self.n_several_images += 1
                        if len(self.several_images) < 3:
                            self.several_images.append((sample.key, sample.member, sample.others))
                    if sample.error:
                        self.errors[sample.key] = sample.error
                    else:
                        yield sample.key, sample.image
            except tarstream.ShardReadError as exc:
                # A truncated tar (or no intact header after a damaged one): every sample before the damage is
                # embedded; the one being read is named, and parquet rows not reached say so (the shard is not
                # failed: retrying changes nothing). A damaged header read past is in self.damage already.
                self.damage.append(exc)
                if exc.key is not None and exc.key not in seen:
                    self.errors[exc.key] = shards.damaged_sample_reason(exc)
                return
        self.read_to_end = True

    def _repeat_reason(self, sample: shards.Sample) -> str:
        """The row reason of a sample that repeats an earlier sample's key, naming the key, the tar and its member."""
        n = self.duplicates[sample.key] + 1
        where = ""
        if sample.member is not None:
            at = f" at byte {sample.offset}" if sample.offset is not None else ""
            where = f", member {shards.stored_key(sample.member)!r}{at}"
        return (f"{shards.DUPLICATE_KEY}: sample {n} of key {sample.key!r} in {posixpath.basename(self.plan.shard)}"
                f"{where}; not embedded, as only the key's first sample is (on the key's row)")

    def _without_extension(self, name: str) -> None:
        self.n_no_extension += 1
        self.no_extension.setdefault(shards.stored_key(name), name)

    @property
    def missing_reasons(self) -> dict[str, str]:
        """Why a parquet row whose key no sample has has no embedding, where the tar holds a member of that name
        without an extension (`000001` for key 000001): it is there, but no field of a sample."""
        return {key: f"{shards.NO_IMAGE}: {shards.member_without_extension(name)}"
                for key, name in self.no_extension.items()}

    @property
    def missing_reason(self) -> str:
        """Why a parquet row whose key was not found in the tar has no embedding: where the tar is damaged, its
        sample may have been in a damaged part (which cannot say what it held)."""
        if self.damage:
            exc = self.damage[0]
            more = f"; and {len(self.damage) - 1} more damaged part(s)" if len(self.damage) > 1 else ""
            return f"not in the readable part of the tar (damaged at byte {exc.offset}: {exc.reason}{more})"
        return output.NOT_IN_TAR

    def finish(self) -> list[str]:
        """After the pass: fail a file that is not a tar at all, save a built index, and say what was wrong."""
        if self.damage and self.n_samples == 0 and self.damage[0].offset == 0:
            # Not a tar at all: an output of "not in the tar" rows would pass for a finished shard. Failed instead
            # (not retried); the run names it, and the next run tries it again once it is replaced.
            raise self._not_a_tar(self.damage[0])
        # Not for a damaged tar, whose index (that of the members read past the damage) would differ from what
        # build_index makes of the same file: it refuses one, so that a local shard and one on a store agree.
        if self.builder is not None and self.read_to_end and not self.damage and (self.index is None or self.stale):
            self._save_built_index()
        warnings = []
        if self.stale:
            warnings.append(f"stale .idx ignored and rebuilt ({self.stale[0]})")
        if self.duplicates:
            first = sorted(self.duplicates)[:3]
            warnings.append(f"{sum(self.duplicates.values())} sample(s) repeat an earlier key ({len(self.duplicates)} "
                            f"key(s), e.g. {', '.join(map(repr, first))}): the first sample of a key is its row; "
                            f"each repeat is a row of its own, not embedded, with reason '{shards.DUPLICATE_KEY}: "
                            "...'")
        if self.n_several_images:
            shown = "; ".join(f"{key!r}: {chosen!r} taken, {', '.join(map(repr, others))} not"
                              for key, chosen, others in self.several_images)
            warnings.append(f"{self.n_several_images} sample(s) have more than one image member (e.g. {shown}): the "
                            f"image is the one whose extension comes first in {option('image_extensions')}, of two "
                            "spelt alike but for case the first in the tar; the others are not embedded")
        if self.no_extension:
            for key, name in self.no_extension.items():  # a key whose sample has no image: that member is why
                if (self.errors.get(key) or "").startswith(shards.NO_IMAGE):
                    self.errors[key] += f"; {shards.member_without_extension(name)}"
            first = list(self.no_extension.values())[:3]
            warnings.append(f"{self.n_no_extension} member(s) without an extension (e.g. "
                            f"{', '.join(map(repr, first))}): no field of any sample (WebDataset names a sample's "
                            "members KEY.EXTENSION), not read; a parquet row of such a key says so")
        for exc in self.damage[:MAX_DAMAGE_WARNINGS]:
            if exc.resumed is not None:
                warnings.append(f"tar damaged at byte {exc.offset}: {exc.reason}; read on from the next intact header, "
                                f"at byte {exc.resumed}")
            else:
                warnings.append(f"tar damaged at byte {exc.offset}: {exc.reason}; {self.n_samples} sample(s) before "
                                "it read")
        if len(self.damage) > MAX_DAMAGE_WARNINGS:
            warnings.append(f"and {len(self.damage) - MAX_DAMAGE_WARNINGS} more damaged part(s) of the tar")
        for warning in warnings:
            log.warning("shard %s: %s", self.plan.stem, warning)
        return warnings

    def _read_index(self) -> Optional[shardindex.ShardIndex]:
        """The shard's .idx as planned; rebuilt here when this worker cannot reach it (a cache on another node)."""
        if not self.plan.index:
            return None
        idx_fs, idx_path = storage.filesystem(self.plan.index, self.config.storage_options)
        try:
            # read_whole: a store's failure names the .idx (retried by the tasks as before)
            return shardindex.ShardIndex.parse(storage.read_whole(idx_fs, idx_path).decode())
        except (FileNotFoundError, shardindex.IndexFormatError):
            # Gone (a cache on another node), or damaged past its last line (the planner reads no more than that;
            # ensure_index logs it): rebuilt here from the tar where it is local; on an object store, None, and the
            # index comes out of the embedding pass instead of a second download.
            return shardindex.ensure_index(self.path, self.fs, self.config.index_cache(), build=storage.is_local(self.fs))

    def _save_built_index(self) -> None:
        """Write back the index built during the read (beside the shard where the bucket allows, else the local
        cache). Best effort: the shard's output does not depend on it."""
        try:
            shardindex.save_index(self.path, self.fs, self.builder.index(), self.config.index_cache())
        except (OSError, shardindex.IndexFormatError) as exc:
            log.warning("shard %s: index not saved (%s)", storage.to_url(self.fs, self.path), exc)

    def _not_a_tar(self, exc: tarstream.ShardReadError) -> tarstream.MalformedShardError:
        try:
            head = self.fs.cat_file(self.path, start=0, end=tarstream.BLOCK)
        except OSError:
            head = b""
        if len(head) < tarstream.BLOCK and head[257:262] == b"ustar":
            # A tar's first header, cut short (a download or copy stopped within its first 512 bytes): a tar, with
            # nothing of its first member; said so, rather than by bytes that look like a member's name.
            return tarstream.MalformedShardError(
                self.plan.shard, 0, f"a tar cut short ({len(head)} bytes, no member whole: replace it with the "
                "whole file): it ends inside its first header, the one")
        head = head[:16]
        what = "an empty file (0 bytes)" if not head else f"its bytes start with {head!r}"
        tool = next((tool for magic, tool in _COMPRESSED_MAGIC if head.startswith(magic)), None)
        name = posixpath.basename(self.path)
        how = (f"; they are {tool}-compressed data (a compressed tar under a plain tar's name, which this run does not "
               f"read): decompress it in its place ({tool} -dc {name} > {name}.plain && mv {name}.plain {name})"
               if tool else "")
        return tarstream.MalformedShardError(self.plan.shard, 0, f"not a tar file, {what}: {exc.reason}{how}")


# A compressed tar under a plain tar's name (`tar czf 00000.tar`, a shard gzipped on upload): its magic bytes, and the
# command that decompresses it.
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                     (b"\x04\x22\x4d\x18", "lz4"))


def check_output_writable(config: EmbedConfig, plan: ShardPlan) -> None:
    """Where the shard's local output folder (or the nearest one that exists) takes no file any more, an OSError
    with its errno, before the shard is read: an OUTPUT turned read-only or full during a run (a remount, a
    chmod, a full disk) fails each shard still to come at once, instead of after embedding it. A real write of one
    byte, not os.access: it sees read-only mounts and a full disk. Object stores are not tried (a request per shard)."""
    fs, path = storage.filesystem(plan.output, config.storage_options)
    if not storage.is_local(fs):
        return
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        handle, probe = tempfile.mkstemp(prefix=".wdsembed-write-check-", dir=folder)
        try:
            os.write(handle, b"\0")
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as exc:
        if exc.errno is None:
            raise
        then = ("free space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make OUTPUT writable")
        # OSError(errno, ...) is its subclass (PermissionError for EACCES): neither is retried (faults.is_transient)
        raise OSError(exc.errno, f"{exc.strerror}: cannot write {plan.output} (OUTPUT refused a test write before "
                                 f"the shard was read; nothing of it was embedded: {then} and run again, finished "
                                 "outputs are kept)") from None


def write_output(config: EmbedConfig, plan: ShardPlan, table, key: str, result: ShardResult,
                 check: Callable[[], None] = lambda: None, *, claim_run: Optional[str] = None) -> None:
    """OUTPUT/<stem>.parquet and its kNN view (with `config.knn_view`), whole or not at all, with the cache key, its
    parts in readable form (a later run with another key says what changed: why_recomputed) and the result in the
    table's footer. `check` (the table's validation) runs while both are written; where it raises, neither appears
    and its error is raised. Likewise where OUTPUT's claim is no longer run `claim_run`'s, or the run has closed the
    shard (outputclaim.ShardCommit, asked once, just before the first file appears; None: not asked). Without a
    view, the view an earlier run wrote for this shard is removed before the table appears, once the check has
    passed and the claim is still this run's: it holds the embeddings this table replaces."""
    fs, path = storage.filesystem(plan.output, config.storage_options)
    if storage.is_local(fs):  # object stores have no folders (and s3fs's makedirs would create a bucket)
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    run_only = ("cached", "seconds", "images_per_second", "timeline")  # this run's, not the output's
    stored = {k: v for k, v in result.to_dict().items() if k not in run_only}
    view = None
    try:
        # Three threads: the check, the kNN view and the table (two large files: half the time). Each file appears
        # only once the check has passed and OUTPUT is still this run's (asked once, in the view's thread, whose end
        # the table's commit waits for), and the table, which marks the shard finished, only once its view has: a
        # finished shard always has its view. At the run's end the last shard's check and writes are its tail.
        # The look at the claim also refuses a shard its run has closed, and the run, closing it, waits for the
        # block to end before it counts the shard (outputclaim.ShardCommit): both files land before that count or
        # neither does.
        with outputclaim.ShardCommit(config, claim_run, plan.stem, f"shard {plan.shard}") as commit, \
                ThreadPoolExecutor(2, thread_name_prefix="wdsembed-write") as pool:
            checked = pool.submit(check)

            def before_first_change() -> None:
                checked.result()
                commit.check()

            def remove_view() -> bool:
                before_first_change()
                return output.remove_embeddings_view(config, plan.stem)

            view = (pool.submit(output.write_embeddings_view, table, config, plan.stem, cache_key=key,
                                before_commit=before_first_change) if config.knn_view
                    else pool.submit(remove_view))
            output.write_parquet_atomic(
                table, path, fs, metadata={"cache_key": key, "cache_key_parts": cache_key_parts(config, plan),
                                           "normalized": config.normalize_embeddings, "result": stored,
                                           # what wrote this file: the manifest's versions are its run's, which
                                           # keeps outputs of an earlier wdsembed under the same key
                                           "versions": package_versions() | {"wdsembed-code": code_version()}},
                before_commit=lambda: (checked.result(), view.result(), faults.maybe_inject(plan.stem, "commit")),
            )
        if config.knn_view:
            _keep_view_beside_table(config, plan, fs, path, table, key, claim_run)
    except BaseException as exc:
        # Ctrl-C (or SIGTERM, raised as it) between the view's commit and the table's: no run's end follows to
        # remove the view alone (plan.remove_views_without_tables does after a failed shard)
        if not isinstance(exc, Exception) and config.knn_view and view is not None and view.done() and \
                not view.cancelled() and not view.exception():
            _remove_view_without_its_table(config, plan, fs, path, key, claim_run)
        if not isinstance(exc, PermissionError):
            raise
        # s3fs says only "Access Denied"; not retried (faults.is_transient)
        if exc.filename:  # locally, the file refused (the table, its view or their folder), never a temp file
            raise PermissionError(f"cannot write {exc.filename}: {exc.strerror}") from exc
        raise PermissionError(f"cannot write {plan.output}: {exc}") from exc


def _remove_view_without_its_table(config: EmbedConfig, plan: ShardPlan, fs, path: str, key: str,
                                   claim_run: Optional[str]) -> None:
    """The view this call put in place, removed where its table was then interrupted (Ctrl-C in the calling
    process): kNN tools read every view, and would read it as a shard whose table is not there until the next run
    removed it. Kept where the table did land, or where OUTPUT's claim is no longer run `claim_run`'s (the view in
    place may be the holder's). Best effort: the next run removes what stays."""
    try:
        if (output.read_output_metadata(path, fs) or {}).get("cache_key") == key:
            return
        outputclaim.check_still_held(config, claim_run, f"shard {plan.shard}")
        output.remove_embeddings_view(config, plan.stem)
    except Exception as exc:  # noqa: BLE001 - the table's own failure is the one to raise
        log.warning("shard %s: its kNN view stays without its table until the next run (%s: %s)", plan.stem,
                    type(exc).__name__, exc)


def _keep_view_beside_table(config: EmbedConfig, plan: ShardPlan, fs, path: str, table, key: str,
                            claim_run: Optional[str]) -> None:
    """The view and the table are two files, each written whole, one after the other: a writer of the same shard
    with other settings, committing between the two (a run that does not claim the output: outputclaim), would
    leave its view beside this table. Where the view in place is not this table's while the table in place is
    this one, the view is written again from the table (one footer read when nothing is amiss), while OUTPUT's
    claim is still run `claim_run`'s: else the view is the claim holder's, and the shard fails saying so. Where the
    table in place is another writer's, that writer does the same for its own."""
    fs_view, root = storage.filesystem(config.output, config.storage_options)
    made_with = (output.read_output_metadata(output.embeddings_view_url(root, plan.stem), fs_view) or {})
    if made_with.get("cache_key") == key:
        return
    if (output.read_output_metadata(path, fs) or {}).get("cache_key") != key:
        return
    log.warning("shard %s: its kNN view was replaced by another writer's between this run's view and table; "
                "writing it again from the table", plan.stem)
    output.write_embeddings_view(
        table, config, plan.stem, cache_key=key,
        before_commit=lambda: outputclaim.check_still_held(
            config, claim_run, f"shard {plan.shard}",
            "Its table was put in place, but its kNN view, which another writer replaced meanwhile, was not "
            "written again from it"))
