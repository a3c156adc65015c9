"""A worker process's model and DALI pipeline: built once, then every shard the process is handed streams through.

Nothing here imports Prefect. One `Worker` per process and configuration (`Worker.for_config`); a Dask worker
keeps it for its whole life, so the model loads once per GPU, not once per shard.

The shards a process is handed at once (a GPU worker's Dask threads hold SHARDS_PER_GPU of them) go through one
stream: a thread of the Worker runs the model over the pipeline's batches, and each shard's samples are fed right
behind the previous shard's, so DALI and the model stay busy across shard boundaries instead of draining at the end
of each shard and filling again at the start of the next.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import functools
import gc
import itertools
import json
import logging
import os
import queue
import threading
import time
import weakref
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, TYPE_CHECKING

import numpy as np

from wdsembed import storage
from wdsembed.config import EmbedConfig
from wdsembed.threads import in_background, read_ahead
from wdsembed.validate import unusable_rows

if TYPE_CHECKING:  # torch is imported where it is used: its import takes seconds the checks before a run skip
    import torch

log = logging.getLogger("wdsembed")


def resolve_device(device: str) -> str:
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but no GPU is visible to this process")
    return f"cuda:{torch.cuda.current_device()}"


GPU_PREFETCH = 2  # DALI iterations in flight on a GPU worker
# An integer: DALI iterations in flight on a GPU worker instead of GPU_PREFETCH (a diagnostic: each one holds a batch
# of decoded images in DALI's device memory).
GPU_PREFETCH_ENV = "WDSEMBED_GPU_PREFETCH"

# CUDA's hardware work queues per process (CUDA_DEVICE_MAX_CONNECTIONS: 8 by default, 32 at most). A GPU worker runs
# a dozen streams or more (the model's, DALI's, nvJPEG's, the copies'); with 8 queues several share one, and a DALI
# kernel then waits behind every model kernel queued before it there. On one H200 (ViT-B/16, bench/dali_probe.py
# --ladder), Worker.embed went from 8,100 to 9,238 images/s with 32, and DALI beside a model that never paused fell
# from 22,983 to 401 images/s with 8 (docs/benchmarks.md).
GPU_HARDWARE_QUEUES = 32

# DALI's device memory from cudaMallocAsync rather than its own pool on CUDA's virtual memory functions, which grows
# to its high-water mark and keeps it. On one H200 (16 shards of 10,000 photos, sampled every 50 ms during the runs)
# a GPU worker's peak was a little lower (ViT-B/16 7.74-7.78 GiB against 7.99, ResNet-50 8.82-9.00 against 9.06), it
# held 2.2-3.1 GiB less after each run, and the rate was the same (docs/benchmarks.md, fourteenth session). Left
# alone where the user set any of DALI's device memory variables (DALI_USE_CUDA_MALLOC_ASYNC=0 keeps the pool); DALI
# refuses the allocator together with DALI_USE_DEVICE_MEM_POOL=0 or DALI_USE_VMM=1.
DALI_MEMORY_ENV = {"DALI_USE_CUDA_MALLOC_ASYNC": "1"}
DALI_MEMORY_SETTINGS = ("DALI_USE_CUDA_MALLOC_ASYNC", "DALI_USE_VMM", "DALI_USE_DEVICE_MEM_POOL")

# Batches the model's stream may hold queued on a GPU worker (the one running included) before the stream's thread
# waits for the oldest (QueueBound). With the model as a CUDA graph, one launch per batch, the host runs ahead of the
# model, and every batch it has taken keeps DALI's device buffers until the model reaches it (DALI frees them in the
# model stream's order): that is the 3.3-5.3 GiB a worker peaked above what it holds at rest. With 2, a 16-shard flow
# on one H200 peaked at 5.5 GiB for ResNet-50 (9.2-9.4 without a limit), 5.9 for ViT-B/16 (7.8-8.0) and 8.4 for
# ViT-L/14 (9.0), and ResNet-50's flow ran at the same rate in six paired runs (12,020-12,153 images/s against
# 11,292-12,166; docs/benchmarks.md, sixteenth session). An earlier form of the wait, a new event per batch that spun
# a core while it waited, slowed ResNet-50's flow in 6 of 10 runs (fifteenth session).
GPU_QUEUED_BATCHES = 2
# An integer: the limit instead; 0 for none (a GPU of its own, memory to spare, the host free to run ahead).
GPU_QUEUED_BATCHES_ENV = "WDSEMBED_GPU_QUEUED_BATCHES"

CUDA_GRAPH_ENV = "WDSEMBED_CUDA_GRAPH"  # "0": the model runs eagerly on a GPU too (should a model misbehave as a graph)
# "1": time the model's stream per shard (StreamMeter), a diagnostic. Off by default: each timing event's record lets
# the GIL go, and the model's thread may then wait up to Python's switch interval to get it back (two per batch).
STREAM_METER_ENV = "WDSEMBED_STREAM_METER"
# "0": a call's tar is read in the thread that feeds DALI, not ahead of it in a thread of its own (a diagnostic).
READ_AHEAD_ENV = "WDSEMBED_READ_AHEAD"
# "1": DALI copies each batch's encoded images into its own (pinned) buffers as they are fed, on a GPU too; "0": it
# reads them in place on the CPU too. By default only a CPU worker has them copied (Worker.__init__ says why).
COPY_INPUTS_ENV = "WDSEMBED_COPY_INPUTS"
# "0": a model in bfloat16 is fed from DALI's float32 output, not its float16 one (a diagnostic: memory, fidelity).
DALI_FLOAT16_ENV = "WDSEMBED_DALI_FLOAT16"
# "0": the model's CUDA graph captures its eager kernels, not torch.compile's (model.compile_embedding). Compiled, the
# flow ran 26% faster with ResNet-50 and 6% with ViT-B/16 on one H200, with the same or closer fidelity (36th
# session, docs/benchmarks.md); the price is one compile per worker process as its Worker is built, 7-25 s there.
COMPILE_ENV = "WDSEMBED_COMPILE"
# A number from 0 to 1 (a diagnostic): the share of JPEGs that a GPU worker's DALI sends to the hardware decoder, instead
# of HW_DECODER_LOAD; the others are Huffman-decoded in DALI's threads and finished by CUDA kernels. On one H200, 1 ran
# ResNet-50's flow 4% slower than 0.9, and 0.5 within the runs' spread (fortieth session, docs/benchmarks.md).
HW_DECODER_LOAD_ENV = "WDSEMBED_HW_DECODER_LOAD"
HW_DECODER_LOAD = 0.9
READ_AHEAD_CHUNK, READ_AHEAD_DEPTH = 64, 4  # samples per hand-over, hand-overs queued: 256-384 samples (10-15 MB)
# Of the variables above, those a Worker reads once, as it is built (the others are read per call or per pass). They are
# part of its identity in for_config: a long-lived worker process that sees one changed builds a new Worker, instead
# of going on with the old setting (the bench's --worker-env changes them between runs on warm workers).
BUILD_ENV = (CUDA_GRAPH_ENV, GPU_PREFETCH_ENV, STREAM_METER_ENV, COPY_INPUTS_ENV, DALI_FLOAT16_ENV, COMPILE_ENV,
             HW_DECODER_LOAD_ENV)


def build_env() -> dict[str, Optional[str]]:
    """The BUILD_ENV variables as they are now (None: unset)."""
    return {name: os.environ.get(name) for name in BUILD_ENV}


# torch's caching allocator grows its segments in place instead of reserving new ones per size: ViT-L/14's worker
# (compiled CUDA graph, float32 reference copy) peaked at 6.94 GiB of GPU memory against 8.01 without, at the same
# rate (2,710 against 2,711 images/s; one H100, bench/dali_probe.py --memory, sixty-fifth session).
TORCH_ALLOC_ENV, TORCH_ALLOC_SETTING = "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"


def gpu_process_environment(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """What a GPU worker process asks of CUDA, torch and DALI through its environment, unless the user set it: every
    hardware queue (GPU_HARDWARE_QUEUES), torch's allocator growing its segments in place (TORCH_ALLOC_ENV), and
    DALI's device memory from CUDA's stream-ordered allocator (DALI_MEMORY_ENV). The variables `environ` (a
    process's environment; this one's by default) lacks, with their values. They are read when first needed (CUDA's
    at the context's creation), so a worker process must start with them: a local GPU cluster's nannies give them
    to its workers' environment alone (wdsembed.localworkers.GPUNanny), not to the process that starts the run."""
    environ = os.environ if environ is None else environ
    wanted = {"CUDA_DEVICE_MAX_CONNECTIONS": str(GPU_HARDWARE_QUEUES), TORCH_ALLOC_ENV: TORCH_ALLOC_SETTING}
    if not any(name in environ for name in DALI_MEMORY_SETTINGS):
        wanted.update(DALI_MEMORY_ENV)
    return {name: value for name, value in wanted.items() if name not in environ}


def set_gpu_process_environment() -> None:
    """gpu_process_environment's variables set in this process, which is a GPU worker's (a Worker built here, a
    bench's process): before its first CUDA call."""
    os.environ.update(gpu_process_environment())


def gpu_prefetch() -> int:
    """DALI iterations in flight on a GPU worker: GPU_PREFETCH, or WDSEMBED_GPU_PREFETCH where it is set."""
    return _env_count(GPU_PREFETCH_ENV, GPU_PREFETCH, 1, "the DALI iterations a GPU worker keeps in flight")


def gpu_queued_batches() -> int:
    """Batches the model's stream may hold queued on a GPU worker (0: no limit): GPU_QUEUED_BATCHES, or
    WDSEMBED_GPU_QUEUED_BATCHES where it is set."""
    return _env_count(GPU_QUEUED_BATCHES_ENV, GPU_QUEUED_BATCHES, 0,
                      "the batches a GPU worker's model stream may hold queued, 0 for no limit")


def hw_decoder_load() -> float:
    """The share of JPEGs for the hardware decoder on a GPU worker: HW_DECODER_LOAD, or WDSEMBED_HW_DECODER_LOAD."""
    value = os.environ.get(HW_DECODER_LOAD_ENV)
    if value is None:
        return HW_DECODER_LOAD
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{HW_DECODER_LOAD_ENV}={value!r}: expected a number from 0 to 1, the share of JPEGs for the "
                         f"GPU's hardware decoder (default {HW_DECODER_LOAD}); unset it for the default")
    return share


def _env_count(name: str, default: int, least: int, meaning: str) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit() or int(value) < least:
        kind = "a positive integer" if least > 0 else "an integer of 0 or more"
        raise ValueError(f"{name}={value!r}: expected {kind}, {meaning} (default {default}); unset it for the default")
    return int(value)


def _checkpoint_identity(config: EmbedConfig) -> Optional[str]:
    """The checkpoint file's identity now (its content's hash, as in the cache key; a stat once hashed): a file
    rewritten at the same path between two runs in one process (the API, a shared Dask worker) builds its Worker
    again instead of serving the old weights under the new file's cache key. None without a checkpoint, or where it
    cannot be read (the build then says why)."""
    if not config.checkpoint:
        return None
    try:
        return storage.checkpoint_identity(config.checkpoint, config.storage_options)
    except OSError:
        return None


def _pretrained_weights(loaded) -> Optional[dict]:
    """model.weights_file_record of the file the pretrained weights came from; None without one (random weights,
    a checkpoint: recorded as such) or where it cannot be read again."""
    from wdsembed.model import weights_file_record

    if not loaded.weights_file:
        return None
    try:
        return weights_file_record(loaded.weights_file)
    except OSError as exc:
        log.warning("pretrained weights %s not recorded: %s", loaded.weights_file, exc)
        return None


class Worker:
    """The model and the DALI pipeline of one worker process, built once and reused for every shard."""

    _current: ClassVar[dict[str, "Worker"]] = {}
    _building: ClassVar[threading.Condition] = threading.Condition()  # guards _current and every Worker's _leases
    # The last build refused for its model (ModelLoadError), by the settings' identity: (the run, its message)
    _refused: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, config: EmbedConfig, device: Optional[str] = None) -> None:
        import torch

        from wdsembed.model import capture_batch_graph, load_model, spellings, timm_name, to_bfloat16
        from wdsembed.pipeline import ImagePipeline
        from wdsembed.preprocess import PreprocessRecipe

        self.built_with = build_env()  # read below; for_config builds a new Worker when they change
        if config.device != "cpu":
            # A local GPU cluster's workers start with these (wdsembed.localworkers.GPUNanny); a worker started
            # otherwise (`dask cuda worker`) gets them here, before torch's and DALI's first use, though CUDA's
            # context may already be made (dask-cuda's preload makes it), its queues then CUDA's default.
            set_gpu_process_environment()
        self.device = device or resolve_device(config.device)
        if self.device.startswith("cuda"):
            _leave_cores_to_dali(config.num_threads_per_worker)
        # The checkpoint's identity as loaded (the cache key's "sha256:<hex>" of its content), recorded with each
        # output: a later run with other weights, at this path or another, is told apart from this one; a copy of
        # the same bytes is not.
        checkpoint = ({"path": config.checkpoint,
                       "fingerprint": storage.checkpoint_identity(config.checkpoint, config.storage_options)}
                      if config.checkpoint else None)
        self.loaded = load_model(
            config.model_name,
            pretrained=config.pretrained,
            checkpoint=config.checkpoint,
            embedding=config.embedding,
            device=self.device,
        )
        # The fidelity check's reference needs the weights as loaded, in float32: copied before they become
        # bfloat16, to the GPU where they fit in a small share of it, else to the host (one copy per worker).
        self._float32_copy = (_float32_copy(self.loaded, _reference_device(self.loaded))
                              if config.autocast and self.device != "cpu" else None)
        if config.autocast:
            # On a GPU, bfloat16 weights: faster than autocast over float32 weights, within the fidelity target
            # (docs/benchmarks.md). autocast=False keeps float32.
            to_bfloat16(self.loaded)
        self.recipe = PreprocessRecipe.from_data_config(self.loaded.data_config)
        device_id = (torch.device(self.device).index or 0) if self.device.startswith("cuda") else None
        # On a GPU, full batches run as one CUDA graph (model.BatchGraph says why); a shard's short last batch, and
        # every batch where the model cannot be captured or WDSEMBED_CUDA_GRAPH=0, eagerly. Captured before the
        # pipeline exists: capturing synchronises the device.
        self._graph = (capture_batch_graph(self.loaded, (config.batch_size, *self.recipe.input_size),
                                           autocast=config.autocast, normalize=config.normalize_embeddings,
                                           compiled=os.environ.get(COMPILE_ENV, "1") != "0")
                       if device_id is not None and os.environ.get(CUDA_GRAPH_ENV, "1") != "0" else None)
        # The fidelity check's float32 reference on the GPU, as a graph too: eagerly, its few hundred launches per
        # shard each waited for the GIL behind the stream's threads (0.33 s per ResNet-50 shard on one H200, while
        # the stream's next shards waited on that task), against one replay per REFERENCE_BATCH images.
        self._reference_graph = (capture_batch_graph(self._float32_copy, (REFERENCE_BATCH, *self.recipe.input_size),
                                                     autocast=False, normalize=True)
                                 if self._graph is not None and self._float32_copy is not None
                                 and self._float32_copy.device.type == "cuda" else None)
        # The model's own rate on this GPU, timed here in a fraction of a second (before the pipeline, which would
        # share the GPU): every shard's timeline carries it, so that the run's report can say whether the input
        # path, not the GPU, bounded the run (wdsembed.report.gpu_use).
        self.gpu_figures = _model_alone(self._graph, device_id) if self._graph is not None else {}
        self.pipeline = ImagePipeline(
            self.recipe,
            batch_size=config.batch_size,
            num_threads=config.num_threads_per_worker,
            device_id=device_id,
            max_pixels=config.max_image_pixels or None,  # decompression-bomb guard; 0/None: off
            # Two iterations in flight on a GPU too. Four once ran Worker.embed faster (the seventh session); on the
            # landed code, in ten alternated flows on one H200 (twenty-seventh session), four ran at the same rate
            # as two (ViT-B/16 and ResNet-50) and held 0.1-0.9 GiB more device memory.
            prefetch=gpu_prefetch() if device_id is not None else 2,
            hw_decoder_load=hw_decoder_load() if device_id is not None else HW_DECODER_LOAD,
            # On a GPU, DALI reads each batch's encoded images where they lie: its copy into pinned buffers held the
            # GIL for 8.3 ms of each batch of 256 on one H200 (2.6 ms in place), on the one thread that feeds DALI.
            copy_inputs=os.environ.get(COPY_INPUTS_ENV, "1" if device_id is None else "0") != "0",
            # batches come out as the model takes them: its dtype and memory format, no second conversion
            output_dtype=self.loaded.dtype,
            channels_last=self.loaded.channels_last,
            half_from_dali=os.environ.get(DALI_FLOAT16_ENV, "1") != "0",
        )
        # The model runs on a stream of its own, not the legacy default stream: that one waits for (and holds up)
        # every blocking stream and synchronous copy in the process, the decoder's included, which would
        # serialize decoding with the model instead of overlapping them.
        self.stream = torch.cuda.Stream(torch.device(self.device)) if device_id is not None else None
        # Each call's embeddings leave the GPU on a stream of their own, so that the copy waits for that call's
        # batches only, not for the next call's, queued behind them on the model's stream.
        self._copy_stream = torch.cuda.Stream(torch.device(self.device)) if device_id is not None else None
        # How many batches the model's stream may hold queued (GPU_QUEUED_BATCHES; its limit is read as each pass
        # of the stream starts, so that a diagnostic can change it).
        self._queue = QueueBound(0, _cuda_event)
        # The calls waiting for the stream, in order (None: close), and the thread that runs it (started on first use).
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._streamer: Optional[threading.Thread] = None
        self._closed = False
        self._stopping: Optional[str] = None  # close(now=...): why the stream drops what is in it
        self._live: dict[int, "_Job"] = {}  # the calls in the stream's running pass (_run)
        self._model_lock = threading.Lock()  # the model, between the stream and a float32 fidelity reference
        self._last_batch_end = None  # on a GPU: the event after the stream's last model batch (StreamMeter)
        self._metered = self.stream if os.environ.get(STREAM_METER_ENV) == "1" else None  # the stream it times
        self._reference = None  # built on first use (fidelity check)
        self._leases = 0  # callers holding it (Worker.lease): it is not closed for another config before they end
        self._reference_lock = threading.Lock()
        self.info = {
            "name": self.loaded.name,  # as the run was given it
            # the architecture and pretrained tag timm built it as (resnet18 -> resnet18.a1_in1k, its default tag)
            "timm_name": timm_name(self.loaded.name),
            # every name timm builds it as (resnet18, resnet18.a1_in1k): a re-run spelling it otherwise finds its
            # outputs finished without importing timm (shard.same_model_name)
            "spellings": list(spellings(self.loaded.name)),
            "weights": self.loaded.weights,
            "embedding": self.loaded.embedding,
            # what auto, head and pooled resolve to on this model: a later run's request is judged against
            # `embedding` before it loads the model (plan.check_outputs_beside)
            "embedding_forms": dict(self.loaded.embedding_forms),
            "checkpoint": checkpoint,
            # the pretrained weights' snapshot and bytes: weights updated on the Hub under the same name differ here
            "pretrained_weights": _pretrained_weights(self.loaded),
            "dim": self.loaded.dim,
            "precision": str(self.loaded.dtype).replace("torch.", ""),
            "cuda_graph": self._graph is not None,
            "compiled": self._graph is not None and self._graph.compiled,
            "preprocessing": self.recipe.describe(),
            "device": self.device,
        }
        _unsaid.append(describe_worker(self, config))  # for the task run's log (take_unsaid)
        _stop_streams_at_exit(self)
        # Everything alive now (torch, timm, DALI, Dask, Prefect, the model: over half a million objects) lives as
        # long as the process: kept out of the garbage collector's full passes, which otherwise walk all of it with
        # the GIL held while the stream waits (on one H200, two such passes of 0.38-0.44 s stalled a ViT-B/16 run
        # of 16 shards). close() gives them back.
        gc.collect()
        gc.freeze()

    def reference(self):
        """The fidelity check's reference: timm's own eval transform, the float32 model as a function of a batch
        of images on its device (normalized embeddings), the lock to hold while using it, and that device. The
        model itself where it is float32 (its lock then keeps it to one shard at a time), else the float32 copy
        taken before the weights became bfloat16 (a few images per shard): on the GPU it runs there, as a CUDA
        graph where the worker's model is one, on a stream of its own, and takes no CPU core from DALI."""
        import timm
        import torch

        from wdsembed.model import embed_batch

        with self._reference_lock:
            if self._reference is None:
                transform = timm.data.create_transform(**self.loaded.data_config)
                if self.loaded.dtype == torch.float32:
                    model, lock = self.loaded, self._model_lock
                else:
                    model, lock = self._float32_copy, threading.Lock()
                graph = self._reference_graph
                if graph is not None:
                    forward = functools.partial(in_fixed_batches, graph, REFERENCE_BATCH)
                else:
                    forward = functools.partial(embed_batch, model, autocast=False, normalize=True)
                self._reference = (transform, forward, lock, model.device)
            return self._reference

    @classmethod
    def for_config(cls, config: EmbedConfig) -> "Worker":
        """This process's Worker for the config's model and pipeline settings and the BUILD_ENV variables as they
        are now (built on first use). Use `lease` where other threads may ask for other settings meanwhile."""
        with cls._building:
            return cls._built_for(config)

    @classmethod
    @contextlib.contextmanager
    def lease(cls, config: EmbedConfig, run: Optional[str] = None) -> Iterator["Worker"]:
        """for_config's Worker, held for the block: a Worker for other settings (another run's task on the same Dask
        worker) is built only once every lease of this one has ended, so that neither run's Worker is closed under
        it and the process holds one model at a time; the other run's tasks wait for it meanwhile. `run`: the run
        asking (its claim's id); where its model could not be loaded (ModelLoadError), the run's later leases raise
        that error again at once instead of loading it for every shard; another run tries again."""
        with cls._building:
            worker = cls._built_for(config, run)
            worker._leases += 1
        try:
            yield worker
        finally:
            with cls._building:
                worker._leases -= 1
                cls._building.notify_all()

    @classmethod
    def _built_for(cls, config: EmbedConfig, run: Optional[str] = None) -> "Worker":
        """The Worker for `config`, built where there is none (called holding _building); `run`: as in lease."""
        ident = json.dumps(
            [config.model_key(), config.checkpoint, _checkpoint_identity(config),
             storage.model_folder_identity(config.model_name), config.batch_size,
             config.num_threads_per_worker, config.device, config.max_image_pixels or None, build_env()],
            sort_keys=True,
        )
        while True:
            worker = cls._current.get(ident)
            if worker is not None:
                return worker
            if not any(old._leases for old in cls._current.values()):
                break
            cls._building.wait()  # a Worker for other settings is in use: its callers end first
        from wdsembed.model import ModelLoadError

        refused = cls._refused.get(ident)
        if run is not None and refused is not None and refused[0] == run:
            raise ModelLoadError(refused[1])  # the same words for every shard: the run's summary says it once
        # One model per process: drop others first so a long-lived worker never holds two on the GPU.
        for old in cls._current.values():
            old.close()
        cls._current.clear()
        try:
            worker = cls._current[ident] = cls(config)
        except ModelLoadError as exc:  # the model's own (not memory, not I/O that may pass): no second try this run
            cls._refused = {ident: (run, str(exc))} if run is not None else {}
            raise
        cls._refused = {}
        return worker

    def close(self, *, now: Optional[str] = None, wait_s: Optional[float] = None) -> bool:
        """Stop the stream and give the pipeline's memory back (the model goes with the last reference). By
        default the calls already waiting are finished first and the stream's thread is waited for. `now` (a
        reason): the stream stops after the batch in hand instead, and every call still in it or waiting fails
        with that reason; `wait_s`: its thread is waited for that long at most. Returns whether the stream's thread
        has ended; where it has not, the pipeline is left to it (pipelines are not thread-safe)."""
        with self._cv:
            if now is not None and self._stopping is None:
                self._stopping = now
                calls = [job for job in (*self._pending, *list(self._live.values())) if job is not None]
                self._pending.clear()
                if self._closed:
                    self._pending.append(None)
                for job in calls:
                    job.cancelled = True  # no more of its samples fed, none of its batches through the model
                    job.fail(RuntimeError(f"the embedding stream was stopped: {now}"))
            if not self._closed:
                self._closed = True
                self._pending.append(None)
            self._cv.notify_all()
        if self._streamer is not None and self._streamer is not threading.current_thread():
            self._streamer.join(wait_s)
            if self._streamer.is_alive():
                return False
        self.pipeline.close()
        self._graph = self._reference_graph = self._reference = None  # their memory pools go now, not with the Worker
        gc.unfreeze()  # this Worker's objects can be collected again once dropped
        return True

    def embed(
        self, samples: Iterator[tuple[str, bytes]], *, autocast: bool, normalize: bool,
        on_batch: Callable[[int], None] = lambda n: None, timeline: Optional[dict] = None,
    ) -> tuple[list[str], np.ndarray, dict[str, str]]:
        """Stream (key, bytes) through DALI and the model; returns keys, their (N, dim) embeddings, and failures.

        Calls from several threads share the Worker's stream, in the order they come: each call's samples are fed
        right behind the previous call's (the same autocast and normalize), and its batches hold only its own
        samples, cut as they would be if it were alone. `on_batch(n)` runs in this thread, once per batch, with the
        number of its samples that came out (embedded or failed). `timeline` (a dict), where given, gets
        "embed_start", "embed_fed" and "embed_end": when the stream began reading the samples, when it had read
        them all, and when their last batch was done (the next call's samples are read from "embed_fed" on). Where
        the model runs as a CUDA graph it also gets "gpu" (its UUID) and "model_alone_images_per_second", the
        model's own rate timed as the Worker was built. On a GPU with WDSEMBED_STREAM_METER=1 it also gets
        "model_busy_s", "model_idle_s", "model_longest_idle_s" and "model_wait_before_s" (StreamMeter): the GPU time
        of the call's batches on the model's stream, the time that stream stood still between them, and before the
        first of them.
        """
        job = _Job(iter(samples), (autocast, normalize))
        with self._cv:
            if self._closed:
                raise RuntimeError("this Worker is closed")
            if self._streamer is None:
                self._streamer = threading.Thread(target=self._stream_calls, name="wdsembed-stream", daemon=True)
                self._streamer.start()
            self._pending.append(job)
            self._cv.notify_all()
        try:
            while True:
                kind, value = job.events.get()
                if kind == "progress":
                    on_batch(value)
                elif kind == "error":
                    raise value
                else:
                    break
        except BaseException:
            job.cancelled = True  # the stream stops reading its samples and drops what is still in flight of it
            raise
        finally:
            if timeline is not None:
                now = time.time()
                timeline.update(embed_start=job.started or now, embed_fed=job.fed_at or now, embed_end=job.ended or now,
                                **self.gpu_figures)
        host = self._to_host(job.result)
        if timeline is not None:
            timeline.update(job.meter.seconds())  # its events are done: the copy above waited for its last batch
        # an embedding no output may hold (NaN, all zeros to normalize) fails its own image, not the shard
        bad = unusable_rows(host, normalized=normalize)
        if not bad:
            return job.keys, host, job.failures
        keep = np.ones(len(host), dtype=bool)
        keep[list(bad)] = False
        failures = {**job.failures, **{job.keys[i]: why for i, why in sorted(bad.items())}}
        return [k for k, kept in zip(job.keys, keep) if kept], host[keep], failures

    # -- the stream ----------------------------------------------------------------------------------------------

    def _stream_calls(self) -> None:
        """The stream's thread: the waiting calls, run back to back until close()."""
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                first = self._pending.popleft()
            if first is None:
                return
            try:
                self._run(first)
            except BaseException as exc:  # noqa: BLE001 - a fault of the stream itself: fail its call, keep serving
                log.exception("the embedding stream failed")
                first.fail(exc)

    def _next_call(self, flags: tuple) -> Optional["_Job"]:
        """The next waiting call, where it can join the running stream (same autocast and normalize); else None,
        and the stream ends once what is in it is done."""
        with self._cv:
            if self._pending and self._pending[0] is not None and self._pending[0].flags == flags:
                return self._pending.popleft()
        return None

    def _run(self, first: "_Job") -> None:
        """One pass of the pipeline over `first` and the calls that come while it runs; each call finishes as soon
        as its own last batch is done."""
        import torch

        from wdsembed.pipeline import BATCH_END, NOT_READY

        flags = first.flags
        live: dict[int, _Job] = {}  # calls with samples in the stream, by the number their keys are tagged with
        self._live = live
        self._queue.limit = gpu_queued_batches() if self.stream is not None else 0
        numbers = itertools.count()

        def tagged_samples() -> Iterator[tuple[Any, Any]]:  # runs in the pipeline's feeding thread
            job: Optional[_Job] = first
            while job is not None:
                number = next(numbers)
                live[number] = job
                job.started = time.time()
                if job.cancelled:  # its caller stopped waiting before its turn: its shard is never opened
                    job.fed_at = job.started
                    job = self._next_call(flags)
                    continue
                # The call's samples (reading and parsing its tar) are read in a thread of their own, ahead of this
                # one, which also feeds DALI and waits for its outputs (threads.read_ahead).
                # Where they are not read yet, the reader says so (NOT_READY) instead of holding up the batches in
                # DALI: the previous call's last ones then come out while this call's tar is still on its way.
                samples = (job.samples if os.environ.get(READ_AHEAD_ENV) == "0"
                           else read_ahead(job.samples, chunk=READ_AHEAD_CHUNK, depth=READ_AHEAD_DEPTH,
                                           not_ready=NOT_READY))
                try:
                    for key, data in samples:
                        if job.cancelled:
                            break
                        if key is NOT_READY:
                            yield key, data
                            continue
                        job.fed += 1
                        yield (number, key), data
                except GeneratorExit:
                    raise
                except BaseException as exc:  # noqa: BLE001 - the call's own samples failed (an unreadable shard)
                    job.fail(exc)
                finally:
                    close = getattr(samples, "close", None)
                    if close is not None:
                        close()  # stops the reader's thread where the call was cancelled or the stream stopped
                job.fed_at = time.time()
                yield BATCH_END, None  # the next call's samples start a batch of their own
                job = self._next_call(flags)

        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        batches = in_background(self.pipeline.process(tagged_samples(), cuda_stream=self.stream), depth=2)
        try:
            with on_stream, contextlib.closing(batches):  # closed: its threads end, DALI's batches in flight taken
                for batch in batches:
                    if self._stopping is not None:  # close(now=...): its calls have failed already
                        live.clear()
                        break
                    self._take(batch, live, flags)
                    self._finish_done(live)
                self._finish_done(live)
        except BaseException as exc:  # noqa: BLE001 - the pipeline broke: every call in it fails with the reason
            for job in live.values():
                job.fail(exc)
            live.clear()
        for job in live.values():  # cannot happen: every sample comes out of the pipeline once
            job.fail(RuntimeError(f"{job.fed - job.out} samples did not come out of the pipeline"))

    def _take(self, batch, live: dict, flags: tuple) -> None:
        """Route one batch of the pipeline's output to its call: the model on its images, the failures by key."""
        counts: collections.Counter = collections.Counter()
        for (number, key), reason in batch.failures:
            live[number].failures[key] = reason
            counts[number] += 1
        if batch.keys:
            number = batch.keys[0][0]
            if batch.keys[-1][0] != number:  # BATCH_END keeps a batch to one call; rows must never change hands
                raise RuntimeError("a batch holds the samples of two calls")
            job = live[number]
            if not job.closed and not job.cancelled:  # a call whose caller left: its batches skip the model
                try:
                    with self._model_lock:
                        start = job.meter.start(self._metered)
                        # in the call's own context: its log lines (out of memory) go to its task run's logs
                        out = job.context.run(self._model, batch.images, autocast=flags[0], normalize=flags[1])
                        self._last_batch_end = job.meter.end(self._metered, start, self._last_batch_end)
                except Exception as exc:  # noqa: BLE001 - that call fails; the others go on
                    job.fail(exc)
                else:
                    job.chunks.append(out)  # stays on the device until the call's last batch: one copy back
                    job.keys.extend(key for _, key in batch.keys)
                    self._queue.after_batch(self.stream)  # waits, where the stream holds too many
            counts[number] += len(batch.keys)
        for number, n in counts.items():
            job = live[number]
            job.out += n
            if not job.closed:
                job.events.put(("progress", n))

    def _finish_done(self, live: dict) -> None:
        """Finish the calls whose samples have all been read and have all come out."""
        import torch

        for number, job in list(live.items()):
            if job.fed_at is not None and job.out >= job.fed:
                del live[number]
                if job.closed or job.cancelled:
                    continue
                try:
                    embeddings = torch.cat(job.chunks).float() if job.chunks else None
                    ready = None
                    if embeddings is not None and self.stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(self.stream)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory joining a large shard: that call fails
                    job.fail(exc)
                    continue
                job.chunks = []
                job.finish((embeddings, ready))

    def _to_host(self, result: tuple) -> np.ndarray:
        """A call's embeddings as float32 NumPy, copied once its own batches are done (in the caller's thread)."""
        import torch

        embeddings, ready = result
        if embeddings is None:
            return np.zeros((0, self.loaded.dim), dtype=np.float32)
        if ready is None:
            return embeddings.numpy()
        ready.synchronize()
        with torch.cuda.stream(self._copy_stream):
            return embeddings.cpu().numpy()

    def _model(self, images: "torch.Tensor", *, autocast: bool, normalize: bool) -> "torch.Tensor":
        """The model on one batch. Out of memory (the GPU's, or the host's where an allocation is refused:
        allocation_refused), the batch is run again in halves (and those in halves, down to one image) in this same
        process: nothing is rebuilt or reloaded, and the images in hand are kept."""
        import torch

        from wdsembed.model import embed_batch

        try:
            if self._graph is not None and self._graph.fits(images, autocast=autocast, normalize=normalize):
                return self._graph(images)
            return embed_batch(self.loaded, images, autocast=autocast, normalize=normalize)
        except Exception as exc:
            if len(images) == 1 or not allocation_refused(exc):
                raise
        if images.is_cuda:
            torch.cuda.empty_cache()
        half = len(images) // 2
        log.warning("out of %s memory on a batch of %d images; running it as %d + %d",
                    "GPU" if images.is_cuda else "host", len(images), half, len(images) - half)
        return torch.cat([self._model(part, autocast=autocast, normalize=normalize)
                          for part in (images[:half], images[half:])])


def allocation_refused(exc: BaseException) -> bool:
    """The model's memory was refused: the GPU's (CUDA out of memory), or the host's where an allocation fails
    instead of the kernel's OOM killer ending the process (an address-space limit, ulimit -v; strict overcommit):
    torch's CPU allocator then raises RuntimeError 'DefaultCPUAllocator: can't allocate memory', and the memory of
    the failed forward is freed. Not oneDNN's 'could not create a primitive', raised where a kernel for a new batch
    shape cannot be made under such a limit: from then on that process made no kernel for any new shape, even with
    the limit lifted (torch 2.14), so halves would fail too."""
    import torch

    return (isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
            or isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc))


class QueueBound:
    """Holds the host back to at most `limit` batches queued on a CUDA stream (0: no limit). After each batch is
    queued, an event is recorded behind it; once more than `limit` are outstanding, the oldest is waited for
    (`synchronize` lets the GIL go). `new_event` makes an event: an object with record(stream) and synchronize().
    Events are made once and recorded again once waited for: one more than the largest limit set, none per batch."""

    def __init__(self, limit: int, new_event: Callable[[], Any]) -> None:
        self.limit = limit
        self._new_event = new_event
        self._events: collections.deque = collections.deque()
        self._spare: list = []

    def after_batch(self, stream) -> None:
        if not self.limit:
            return
        event = self._spare.pop() if self._spare else self._new_event()
        event.record(stream)
        self._events.append(event)
        while len(self._events) > self.limit:
            oldest = self._events.popleft()
            oldest.synchronize()
            self._spare.append(oldest)


def _cuda_event():
    import torch

    # Blocking: the waiting thread sleeps until the batch is done instead of spinning a core that DALI's threads
    # and the feeding thread need (a CUDA event spins by default where the machine has cores to spare).
    return torch.cuda.Event(blocking=True)


class StreamMeter:
    """Where the model's CUDA stream spent one call's time: timing events around each of its batches, read once
    the call's last batch is done. Busy: from each batch's start to its end (where the launching thread waits
    between the start event and the batch's own kernels, the stream stands still, but that counts as busy). Idle:
    from the end of the stream's previous batch to this batch's start, how long the GPU's model work waited for the
    CPU (the feed, DALI's output, the Python thread) at that point. The wait before the call's first batch is kept
    apart: at a shard boundary it is a stall of the stream, before a run's first shard it is only the time since
    the last run. No events on the CPU."""

    def __init__(self) -> None:
        self.batches: list = []  # (the previous batch's end event or None, start event, end event)

    def start(self, stream):
        if stream is None:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def end(self, stream, start, previous_end):
        """Record the batch's end; returns it (the next batch's `previous_end`)."""
        if start is None:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.batches.append((previous_end, start, event))
        return event

    def seconds(self) -> dict:
        if not self.batches:
            return {}
        busy = sum(start.elapsed_time(end) for _, start, end in self.batches) / 1000
        gaps = [max(0.0, previous.elapsed_time(start)) / 1000 if previous is not None else None
                for previous, start, _ in self.batches]
        within = [g for g in gaps[1:] if g is not None]
        self.batches = []
        return {"model_busy_s": round(busy, 4), "model_idle_s": round(sum(within), 4),
                "model_longest_idle_s": round(max(within, default=0.0), 4),
                "model_wait_before_s": round(gaps[0], 4) if gaps[0] is not None else None}


# How long a process that exits waits for its Worker's stream to stop (_close_at_exit): the batch in the model and
# DALI's batches in flight end within seconds (a batch of 32 through ResNet-18 took about 3 s on one core of a loaded
# 2-core host), while a stream waiting on a shard's read that never returns would hold the exit for good; such a
# thread waits in Python, not inside torch or DALI, and is left to the exit as before. A local cluster's nanny kills
# its worker process 4 s after asking it to close (distributed's Nanny.kill) whatever this says: that SIGKILL, not an
# abort, ends a worker whose batch is slower. Such a process never gets here: its Dask worker's close waits for the
# task (its executor's shutdown), and the task for the batch in the model. A bound below the nanny's would not help:
# a thread still in torch as the interpreter finalizes aborts, where SIGKILL does not (localworkers.Nanny.kill says
# it in one line).
EXIT_WAIT_S = 10.0
_built: "weakref.WeakSet[Worker]" = weakref.WeakSet()  # every Worker of this process not yet collected
_exit_hook: list = []  # _close_at_exit, once registered


def _stop_streams_at_exit(worker: Worker) -> None:
    """Have `worker` stopped at exit (_close_at_exit, registered as this process's first Worker is built: after
    torch and DALI registered theirs, so that it runs before them, atexit running the latest first)."""
    with Worker._building:
        if not _exit_hook:
            _exit_hook.append(atexit.register(_close_at_exit))
        _built.add(worker)


def _close_at_exit(wait_s: float = EXIT_WAIT_S) -> None:
    """Stop this process's Worker streams before the interpreter finalizes, and wait for their threads (at most
    `wait_s` in all). A daemon thread still inside torch or DALI then (the stream running the model on a shard
    whose caller left: a Dask worker closed under a Ctrl-C) is ended by the finalizing interpreter as it takes the
    GIL back, an unwind through C++ frames that calls std::terminate: "terminate called without an active
    exception", SIGABRT, a core dump where they are on. atexit runs once the interpreter has joined its non-daemon
    threads: the callers left now are daemon threads it will not wait for (a Dask worker's task threads, which its
    close waited for already)."""
    deadline = time.monotonic() + wait_s
    for worker in list(_built):  # no lock: a thread that holds one is never waited for
        if not worker.close(now="this process is exiting", wait_s=max(0.0, deadline - time.monotonic())):
            log.warning("the embedding stream of process %d had not stopped %.0f s after the process began to exit "
                        "(a batch still in the model, or a shard's read that does not return); it exits without it",
                        os.getpid(), wait_s)


class _Job:
    """One `Worker.embed` call in the stream: its samples, what has come out for it, and the queue its caller waits
    on: ("progress", n) per batch, then ("done", None) or ("error", exception)."""

    def __init__(self, samples: Iterator[tuple[str, bytes]], flags: tuple) -> None:
        self.samples = samples
        self.flags = flags  # (autocast, normalize)
        self.context = contextvars.copy_context()  # the caller's: a Prefect task run's, where there is one
        self.events: queue.Queue = queue.Queue()
        self.keys: list[str] = []
        self.chunks: list = []
        self.failures: dict[str, str] = {}
        self.result: tuple = (None, None)  # (embeddings on the device, the event after which they are ready)
        self.fed = 0  # samples handed to the pipeline
        self.out = 0  # samples come out of it, embedded or failed
        self.closed = False  # finished or failed: what still comes out of it is dropped
        self.cancelled = False  # its caller stopped waiting
        self.started: Optional[float] = None  # time.time() when the stream began reading its samples
        self.fed_at: Optional[float] = None  # ... when it had read them all (then `fed` is final)
        self.ended: Optional[float] = None  # ... when their last batch was done
        self.meter = StreamMeter()

    def finish(self, result: tuple) -> None:
        self.result, self.closed, self.ended = result, True, time.time()
        self.events.put(("done", None))

    def fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed, self.ended, self.chunks = True, time.time(), []
            self.events.put(("error", exc))


def _model_alone(graph, device_id: int) -> dict:
    """The GPU's identity and the model's own rate on it (BatchGraph.images_per_second); {} where it cannot be
    timed (a diagnostic figure: never fatal)."""
    import torch

    try:
        rate = graph.images_per_second()
        gpu = str(torch.cuda.get_device_properties(device_id).uuid)
    except Exception as e:  # noqa: BLE001 - the run does not need the figure
        log.info("could not time the model alone on the GPU: %s", e)
        return {}
    return {"gpu": gpu, "model_alone_images_per_second": round(rate, 1)}


# Each Worker's description as it is built, until the task layer says it in its task run's log (wdsembed's own
# INFO lines reach no log unless the user turns them on).
_unsaid: collections.deque = collections.deque()


def take_unsaid() -> list[str]:
    """The descriptions of the Workers built in this process since the last call (describe_worker)."""
    said = []
    while _unsaid:
        said.append(_unsaid.popleft())
    return said


def describe_worker(worker: Worker, config: EmbedConfig) -> str:
    """What a worker runs on and with, said once as it is built: without it, nothing in a CPU-only run's log said
    that it ran on the CPU, in which precision (autocast is for GPUs), on how many threads or with which batch."""
    import torch

    loaded, info = worker.loaded, worker.info
    form = [info["precision"]] + ["channels_last"] * loaded.channels_last + ["compiled"] * info["compiled"] + \
        ["a CUDA graph"] * info["cuda_graph"]
    why = " (no GPU visible)" if config.device == "auto" and worker.device == "cpu" else ""
    return (f"worker on {worker.device}{why}: {info['name']} in {', '.join(form)}, batches of {config.batch_size}; "
            f"torch on {torch.get_num_threads()} thread(s), DALI on {config.num_threads_per_worker} "
            "(--num-threads)")


def _leave_cores_to_dali(dali_threads: int) -> None:
    """On a GPU worker, torch's CPU ops (the fidelity check's float32 reference) get the cores that the DALI
    pipelines of this host's GPU workers leave free, not torch's default of every core: oversubscribed, they would
    slow the decoding of the shard in the pipeline."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = max(1, torch.cuda.device_count())
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (cores - dali_threads * gpus) // gpus)))


REFERENCE_BATCH = 8  # images per replay of the fidelity reference's graph (a shard checks a few)


def in_fixed_batches(run: Callable[["torch.Tensor"], "torch.Tensor"], size: int,
                     images: "torch.Tensor") -> "torch.Tensor":
    """`run` (which takes batches of exactly `size` images, such as a BatchGraph) over any number of images (on its
    device): in batches of `size`, the last one filled up with copies of its last image, whose outputs are dropped."""
    import torch

    if len(images) == 0:
        raise ValueError("no images")
    outs = []
    for part in images.split(size):
        n = len(part)
        if n < size:
            part = torch.cat([part, part[-1:].expand(size - n, *part.shape[1:])])
        outs.append(run(part)[:n])
    return torch.cat(outs)


# The float32 reference copy goes to the GPU when its weights take at most this share of the GPU's memory (an H200
# holds ViT-L/14's 1.2 GB thirty times over), else to the host, where it runs on the CPU threads DALI leaves free.
REFERENCE_GPU_SHARE = 1 / 16


def _reference_device(loaded) -> str:
    import torch

    if loaded.device.type != "cuda":
        return "cpu"
    weights = sum(t.numel() * 4 for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    total = torch.cuda.get_device_properties(loaded.device).total_memory
    return str(loaded.device) if weights <= REFERENCE_GPU_SHARE * total else "cpu"


def _float32_copy(loaded, device: str = "cpu"):
    """The model as a float32 copy on `device`, made without a second copy of the source's weights: each weight
    is copied to `device` as the module is deep-copied."""
    import copy

    import torch

    model = loaded.model
    memo = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        moved = tensor.detach().to(device, torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
        memo[id(tensor)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(
            tensor, torch.nn.Parameter) else moved
    twin = copy.copy(loaded)
    twin.model = copy.deepcopy(model, memo).eval()
    twin.device, twin.dtype, twin.channels_last = torch.device(device), torch.float32, False
    return twin
