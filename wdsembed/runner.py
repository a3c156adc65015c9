"""Embedding one shard end to end, in plain Python: the work a Prefect task wraps.

A worker process keeps one `Worker` (the model and the DALI pipeline) for its whole life; every shard it is
handed streams through them. Nothing here imports Prefect.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from wdsembed import faults, output, shards, storage
from wdsembed.config import EmbedConfig
from wdsembed.threads import in_background
from wdsembed.versions import code_version, package_versions

log = logging.getLogger("wdsembed")

METADATA_VERSION = 1


@dataclass(frozen=True)
class ShardPlan:
    """One shard to embed: where it is, what it is (fingerprint), where its output goes. Small and picklable."""

    shard: str  # URL or path of the tar
    stem: str  # "00000"
    fingerprint: str  # size + mtime/etag of the tar (and its parquet): changes when the shard is rewritten
    rows: Optional[str]  # the img2dataset parquet beside it, if any
    index: Optional[str]  # the .idx to read it through, if use_index_files
    output: str  # OUTPUT/<stem>.parquet
    expected_samples: Optional[int] = None  # from <stem>_stats.json "successes", when present


@dataclass
class ShardResult:
    """What a shard's task returns: counts and where the output is, never arrays."""

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
    cache_key: str = ""
    errors: list[tuple[str, str]] = field(default_factory=list)  # a few (key, reason) examples
    model: dict = field(default_factory=dict)  # name, weights, embedding, dim, preprocessing
    # What was wrong with the shard itself, though its output was written: a damaged tar (every intact sample is
    # embedded, the rest named in the error column), an unreadable parquet, repeated keys, a stale .idx rebuilt.
    warnings: list[str] = field(default_factory=list)
    batch_size: int = 0  # the batch size this shard ran with (smaller than configured after an out-of-memory retry)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 and not self.cached else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"images_per_second": round(self.images_per_second, 1)}


def cache_key(config: EmbedConfig, plan: ShardPlan) -> str:
    """Everything that decides a shard's output bytes: its content, the model and weights, the embedding options,
    the output schema options, the versions of the code and of the libraries doing the maths."""
    parts = {
        "shard": plan.fingerprint,
        "model": config.model_key(),
        "checkpoint": _file_fingerprint(config.checkpoint, config.storage_options) if config.checkpoint else None,
        "columns": [config.id_column, config.embedding_column, config.error_column],
        "extensions": list(config.image_extensions),
        "max_image_pixels": config.max_image_pixels or None,
        "code": code_version(),
        "packages": {k: v for k, v in package_versions().items() if k in ("timm", "torch", "nvidia-dali-cuda120")},
        "format": METADATA_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _file_fingerprint(url: str, storage_options: dict) -> str:
    fs, path = storage.filesystem(url, storage_options)
    info = fs.info(path)
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"


def finished_output(config: EmbedConfig, plan: ShardPlan, key: str) -> Optional[dict]:
    """The footer metadata of a complete output made with the same cache key, else None (missing, damaged,
    or made from other inputs): a deleted or damaged output is recomputed, never reported as cached."""
    fs, path = storage.filesystem(plan.output, config.storage_options)
    meta = output.read_output_metadata(path, fs)
    if meta and meta.get("cache_key") == key:
        output.ensure_embeddings_view(config, plan.stem, plan.output)  # a deleted kNN view is rebuilt, not re-embedded
        return meta
    return None


def _read_index(config: EmbedConfig, plan: ShardPlan) -> Optional[shards.ShardIndex]:
    """The shard's .idx as planned; rebuilt here when this worker cannot reach it (a cache on another node)."""
    if not plan.index:
        return None
    idx_fs, idx_path = storage.filesystem(plan.index, config.storage_options)
    try:
        return shards.ShardIndex.parse(idx_fs.cat_file(idx_path).decode())
    except FileNotFoundError:
        from wdsembed.plan import DEFAULT_INDEX_CACHE

        fs, tar_path = storage.filesystem(plan.shard, config.storage_options)
        # on an object store: None, and the index comes out of the embedding pass instead of a second download
        return shards.ensure_index(tar_path, fs, config.index_cache_dir or DEFAULT_INDEX_CACHE,
                                   build=storage.is_local(fs))


def _save_built_index(config: EmbedConfig, fs, tar_path: str, builder: "shards.IndexBuilder") -> None:
    """Write back the index built during the read (beside the shard where the bucket allows, else the local
    cache). Best effort: the shard's output does not depend on it."""
    from wdsembed.plan import DEFAULT_INDEX_CACHE

    try:
        shards.save_index(tar_path, fs, builder.index(), config.index_cache_dir or DEFAULT_INDEX_CACHE)
    except (OSError, shards.IndexFormatError) as exc:
        log.warning("shard %s: index not saved (%s)", storage.to_url(fs, tar_path), exc)


class Worker:
    """The model and the DALI pipeline of one worker process, built once and reused for every shard."""

    def __init__(self, config: EmbedConfig, device: Optional[str] = None) -> None:
        import torch

        from wdsembed.model import load_model
        from wdsembed.pipeline import ImagePipeline
        from wdsembed.preprocess import PreprocessRecipe

        self.device = device or resolve_device(config.device)
        self.loaded = load_model(
            config.model_name,
            pretrained=config.pretrained,
            checkpoint=config.checkpoint,
            embedding=config.embedding,
            device=self.device,
        )
        self.recipe = PreprocessRecipe.from_data_config(self.loaded.data_config)
        device_id = (torch.device(self.device).index or 0) if self.device.startswith("cuda") else None
        self.pipeline = ImagePipeline(
            self.recipe,
            batch_size=config.batch_size,
            num_threads=config.num_threads_per_worker,
            device_id=device_id,
            max_pixels=config.max_image_pixels or None,  # decompression-bomb guard; 0/None: off
        )
        # The model runs on a stream of its own, not the legacy default stream: that one waits for (and holds up)
        # every blocking stream and synchronous copy in the process, the decoder's included, which would
        # serialize decoding with the model instead of overlapping them.
        self.stream = torch.cuda.Stream(torch.device(self.device)) if device_id is not None else None
        self.info = {
            "name": self.loaded.name,
            "weights": self.loaded.weights,
            "embedding": self.loaded.embedding,
            "dim": self.loaded.dim,
            "preprocessing": self.recipe.describe(),
            "device": self.device,
        }

    def embed(
        self, samples: Iterator[tuple[str, bytes]], *, autocast: bool, normalize: bool, on_batch: Callable[[int], None]
    ) -> tuple[list[str], np.ndarray, dict[str, str]]:
        """Stream (key, bytes) through DALI and the model; returns keys, their (N, dim) embeddings, and failures."""
        import contextlib

        import torch

        from wdsembed.model import embed_batch

        keys: list[str] = []
        chunks: list = []
        failures: dict[str, str] = {}
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        # Reading and DALI run a batch or two ahead in their own thread while the model works on this one.
        with on_stream:
            for batch in in_background(self.pipeline.process(samples, cuda_stream=self.stream), depth=2):
                failures.update(batch.failures)
                if batch.keys:
                    emb = embed_batch(self.loaded, batch.images, autocast=autocast, normalize=normalize)
                    # Stays on the device until the shard ends: one copy back, no sync per batch.
                    chunks.append(emb)
                    keys.extend(batch.keys)
                on_batch(len(batch.keys) + len(batch.failures))
            if chunks:
                embeddings = torch.cat(chunks).float().cpu().numpy()
            else:
                embeddings = np.zeros((0, self.loaded.dim), dtype=np.float32)
        return keys, embeddings, failures


def _not_a_tar(shard: str, fs, path: str, exc: "shards.ShardReadError") -> "shards.MalformedShardError":
    try:
        head = fs.cat_file(path, start=0, end=16)
    except OSError:
        head = b""
    what = "an empty file (0 bytes)" if not head else f"its bytes start with {head!r}"
    return shards.MalformedShardError(shard, 0, f"not a tar file, {what}: {exc.reason}")


def resolve_device(device: str) -> str:
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but no GPU is visible to this process")
    return f"cuda:{torch.cuda.current_device()}"


_WORKERS: dict[str, Worker] = {}
_WORKERS_LOCK = threading.Lock()


def get_worker(config: EmbedConfig) -> Worker:
    """This process's Worker for the config's model and pipeline settings (built on first use)."""
    ident = json.dumps(
        [config.model_key(), config.checkpoint, config.batch_size, config.num_threads_per_worker, config.device,
         config.max_image_pixels or None],
        sort_keys=True,
    )
    with _WORKERS_LOCK:
        worker = _WORKERS.get(ident)
        if worker is None:
            # One model per process: drop others first so a long-lived worker never holds two on the GPU.
            _WORKERS.clear()
            worker = _WORKERS[ident] = Worker(config)
        return worker


def embed_shard(
    config: EmbedConfig, plan: ShardPlan, *, on_progress: Callable[[int], None] = lambda n: None
) -> ShardResult:
    """Embed one shard and write OUTPUT/<stem>.parquet whole, or find it already done (same cache key)."""
    start = time.perf_counter()
    key = cache_key(config, plan)
    if not config.force:
        meta = finished_output(config, plan, key)
        if meta is not None:
            return ShardResult(**meta["result"], cached=True, seconds=time.perf_counter() - start)

    worker = get_worker(config)
    in_fs, tar_path = storage.filesystem(plan.shard, config.storage_options)
    index = _read_index(config, plan)
    warnings: list[str] = []
    rows = None
    if plan.rows:
        rows_fs, rows_path = storage.filesystem(plan.rows, config.storage_options)
        try:
            rows = shards.read_rows(rows_path, rows_fs)
        except shards.MetadataFileError as exc:
            # The tar's samples are still embedded (one row each, keyed); the parquet's columns are missing until
            # it is fixed, which changes the shard's fingerprint, so the next run redoes the shard with them.
            warnings.append(f"{exc}; the output holds the tar's samples only (no img2dataset columns)")
            log.warning("shard %s: %s", plan.stem, warnings[-1])

    tar_errors: dict[str, str] = {}
    duplicates: dict[str, int] = {}
    damage: list[shards.ShardReadError] = []
    seen: set[str] = set()
    stale: list[shards.StaleIndexError] = []
    n_samples = 0
    # A shard on an object store without an index gets one from this same pass (plan_shards does not read it);
    # a shard whose index turns out stale gets a fresh one from it too.
    builder = shards.IndexBuilder() if config.use_index_files and (index is not None or not storage.is_local(in_fs)) else None
    read_to_end = False

    def after_batch(n: int) -> None:
        faults.maybe_inject(plan.stem, where="batch")  # opt-in (WDSEMBED_FAULTS): a failure mid-shard
        on_progress(n)

    def good_samples() -> Iterator[tuple[str, bytes]]:
        nonlocal n_samples, read_to_end
        # Object stores: large ranges fetched ahead in the background, overlapping download with embedding.
        with storage.open_sequential(in_fs, tar_path) as f:
            samples = shards.iter_samples(f, extensions=config.image_extensions, shard=plan.shard, index=index,
                                          index_builder=builder, on_stale_index=stale.append)
            try:
                for sample in samples:
                    n_samples += 1
                    if sample.key in seen:
                        # The key's first sample owns its row (embedded or failed); a repeat is counted, not joined.
                        duplicates[sample.key] = duplicates.get(sample.key, 0) + 1
                        continue
                    seen.add(sample.key)
                    if sample.error:
                        tar_errors[sample.key] = sample.error
                    else:
                        yield sample.key, sample.image
            except shards.ShardReadError as exc:
                # A truncated or corrupt tar: every sample before the damage is embedded; the one being read is
                # named, and parquet rows not reached say so (the shard is not failed: retrying changes nothing).
                damage.append(exc)
                if exc.key is not None and exc.key not in seen:
                    tar_errors[exc.key] = f"tar damaged inside this sample: {exc.reason} at byte {exc.offset}"
                return
        read_to_end = True

    keys, embeddings, failures = worker.embed(
        good_samples(), autocast=config.autocast, normalize=config.normalize_embeddings, on_batch=after_batch
    )
    if damage and n_samples == 0 and damage[0].offset == 0:
        # Not a tar at all: an output of "not in the tar" rows would pass for a finished shard. Failed instead (not
        # retried); the run names it, and the next run tries it again once it is replaced.
        raise _not_a_tar(plan.shard, in_fs, tar_path, damage[0])
    if builder is not None and read_to_end and (index is None or stale):
        _save_built_index(config, in_fs, tar_path, builder)
    if stale:
        warnings.append(f"stale .idx ignored and rebuilt ({stale[0]})")
        log.warning("shard %s: %s", plan.stem, warnings[-1])
    if duplicates:
        first = sorted(duplicates)[:3]
        warnings.append(f"{sum(duplicates.values())} sample(s) repeat an earlier key ({len(duplicates)} key(s), "
                        f"e.g. {', '.join(map(repr, first))}): the first sample of a key is its row, repeats are skipped")
        log.warning("shard %s: %s", plan.stem, warnings[-1])
    missing_reason = output.NOT_IN_TAR
    if damage:
        exc = damage[0]
        missing_reason = f"not in the readable part of the tar (damaged at byte {exc.offset}: {exc.reason})"
        warnings.append(f"tar damaged at byte {exc.offset}: {exc.reason}; {n_samples} sample(s) before it read")
        log.warning("shard %s: %s", plan.stem, warnings[-1])
    errors = {**tar_errors, **failures}
    table = output.build_output_table(
        rows=rows,
        keys=keys,
        embeddings=embeddings,
        errors=errors,
        dim=worker.loaded.dim,
        id_column=config.id_column,
        embedding_column=config.embedding_column,
        error_column=config.error_column,
        missing_reason=missing_reason,
    )
    n_embedded = int(table.column(config.embedding_column).is_valid().to_numpy(zero_copy_only=False).sum())
    result = ShardResult(
        shard=plan.shard,
        stem=plan.stem,
        output=plan.output,
        rows=table.num_rows,
        samples=n_samples,
        embedded=n_embedded,
        failed=table.num_rows - n_embedded,
        dim=worker.loaded.dim,
        cache_key=key,
        errors=sorted(errors.items())[:20],
        model=worker.info,
        warnings=warnings,
        batch_size=config.batch_size,
    )
    out_fs, out_path = storage.filesystem(plan.output, config.storage_options)
    if storage.is_local(out_fs):  # object stores have no folders (and s3fs's makedirs would create a bucket)
        out_fs.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    stored = {k: v for k, v in result.to_dict().items() if k not in ("cached", "seconds", "images_per_second")}
    try:
        output.write_embeddings_view(table, config, plan.stem, cache_key=key)  # first: a finished shard has its view
        output.write_parquet_atomic(
            table,
            out_path,
            out_fs,
            metadata={"cache_key": key, "normalized": config.normalize_embeddings, "result": stored},
        )
    except PermissionError as exc:  # s3fs says only "Access Denied"; not retried (faults.is_transient)
        raise PermissionError(f"cannot write {plan.output}: {exc}") from exc
    result.seconds = time.perf_counter() - start
    return result
