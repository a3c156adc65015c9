"""A worker process's model and DALI pipeline: built once, then every shard the process is handed streams through.

Nothing here imports Prefect. One `Worker` per process and configuration (`Worker.for_config`); a Dask worker
keeps it for its whole life, so the model loads once per GPU, not once per shard.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from typing import Callable, ClassVar, Iterator, Optional

import numpy as np

from wdsembed.config import EmbedConfig
from wdsembed.threads import in_background

log = logging.getLogger("wdsembed")


def resolve_device(device: str) -> str:
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but no GPU is visible to this process")
    return f"cuda:{torch.cuda.current_device()}"


GPU_PREFETCH = 4  # DALI iterations in flight on a GPU worker


class Worker:
    """The model and the DALI pipeline of one worker process, built once and reused for every shard."""

    _current: ClassVar[dict[str, "Worker"]] = {}
    _building: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: EmbedConfig, device: Optional[str] = None) -> None:
        import torch

        from wdsembed.model import load_model, to_bfloat16
        from wdsembed.pipeline import ImagePipeline
        from wdsembed.preprocess import PreprocessRecipe

        self.device = device or resolve_device(config.device)
        if self.device.startswith("cuda"):
            _leave_cores_to_dali(config.num_threads_per_worker)
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
        self.pipeline = ImagePipeline(
            self.recipe,
            batch_size=config.batch_size,
            num_threads=config.num_threads_per_worker,
            device_id=device_id,
            max_pixels=config.max_image_pixels or None,  # decompression-bomb guard; 0/None: off
            # On a GPU, DALI four iterations ahead, not two: with the model sharing the GPU, Worker.embed went from
            # 7,355 to 7,833 images/s (ViT-B/16, one H200, bench/dali_probe.py --ladder).
            prefetch=GPU_PREFETCH if device_id is not None else 2,
            # batches come out as the model takes them: its dtype and memory format, no second conversion
            output_dtype=self.loaded.dtype,
            channels_last=self.loaded.channels_last,
        )
        # The model runs on a stream of its own, not the legacy default stream: that one waits for (and holds up)
        # every blocking stream and synchronous copy in the process, the decoder's included, which would
        # serialize decoding with the model instead of overlapping them.
        self.stream = torch.cuda.Stream(torch.device(self.device)) if device_id is not None else None
        # One shard at a time through the pipeline: the threads of one Dask worker can be handed two embedding
        # tasks at once (a scheduler whose workers declare no GPU resource), and the second waits here.
        self.lock = threading.RLock()
        self._reference = None  # built on first use (fidelity check)
        self._reference_lock = threading.Lock()
        self.info = {
            "name": self.loaded.name,
            "weights": self.loaded.weights,
            "embedding": self.loaded.embedding,
            "dim": self.loaded.dim,
            "precision": str(self.loaded.dtype).replace("torch.", ""),
            "preprocessing": self.recipe.describe(),
            "device": self.device,
        }

    def reference(self):
        """The fidelity check's reference: timm's own eval transform, the model in float32, and the lock to hold
        while using it. The model itself where it is float32 (its lock then keeps it to one shard at a time), else
        the float32 copy taken before the weights became bfloat16 (a few images per shard): on the GPU it takes a
        few milliseconds there, on a stream of its own, and no CPU core from DALI."""
        import timm
        import torch

        with self._reference_lock:
            if self._reference is None:
                transform = timm.data.create_transform(**self.loaded.data_config)
                if self.loaded.dtype == torch.float32:
                    self._reference = (transform, self.loaded, self.lock)
                else:
                    self._reference = (transform, self._float32_copy, threading.Lock())
            return self._reference

    @classmethod
    def for_config(cls, config: EmbedConfig) -> "Worker":
        """This process's Worker for the config's model and pipeline settings (built on first use)."""
        ident = json.dumps(
            [config.model_key(), config.checkpoint, config.batch_size, config.num_threads_per_worker, config.device,
             config.max_image_pixels or None],
            sort_keys=True,
        )
        with cls._building:
            worker = cls._current.get(ident)
            if worker is None:
                # One model per process: drop others first so a long-lived worker never holds two on the GPU.
                for old in cls._current.values():
                    old.close()
                cls._current.clear()
                worker = cls._current[ident] = cls(config)
            return worker

    def close(self) -> None:
        """Give the pipeline's memory back (the model goes with the last reference)."""
        with self.lock:
            self.pipeline.close()

    def embed(
        self, samples: Iterator[tuple[str, bytes]], *, autocast: bool, normalize: bool,
        on_batch: Callable[[int], None] = lambda n: None,
    ) -> tuple[list[str], np.ndarray, dict[str, str]]:
        """Stream (key, bytes) through DALI and the model; returns keys, their (N, dim) embeddings, and failures."""
        import torch

        keys: list[str] = []
        chunks: list = []
        failures: dict[str, str] = {}
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        # Reading and DALI run a batch or two ahead in their own thread while the model works on this one.
        with self.lock, on_stream:
            for batch in in_background(self.pipeline.process(samples, cuda_stream=self.stream), depth=2):
                failures.update(batch.failures)
                if batch.keys:
                    # Stays on the device until the shard ends: one copy back, no sync per batch.
                    chunks.append(self._model(batch.images, autocast=autocast, normalize=normalize))
                    keys.extend(batch.keys)
                on_batch(len(batch.keys) + len(batch.failures))
            if chunks:
                embeddings = torch.cat(chunks).float().cpu().numpy()
            else:
                embeddings = np.zeros((0, self.loaded.dim), dtype=np.float32)
        return keys, embeddings, failures

    def _model(self, images: "torch.Tensor", *, autocast: bool, normalize: bool) -> "torch.Tensor":
        """The model on one batch. Out of GPU memory, the batch is run again in halves (and those in halves, down to
        one image) in this same process: nothing is rebuilt or reloaded, and the images in hand are kept."""
        import torch

        from wdsembed.model import embed_batch

        try:
            return embed_batch(self.loaded, images, autocast=autocast, normalize=normalize)
        except torch.cuda.OutOfMemoryError:
            if len(images) == 1:
                raise
        torch.cuda.empty_cache()
        half = len(images) // 2
        log.warning("out of GPU memory on a batch of %d images; running it as %d + %d", len(images), half,
                    len(images) - half)
        return torch.cat([self._model(part, autocast=autocast, normalize=normalize)
                          for part in (images[:half], images[half:])])


def _leave_cores_to_dali(dali_threads: int) -> None:
    """On a GPU worker, torch's CPU ops (the fidelity check's float32 reference) get the cores that the DALI
    pipelines of this host's GPU workers leave free, not torch's default of every core: oversubscribed, they would
    slow the decoding of the shard in the pipeline."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = max(1, torch.cuda.device_count())
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (cores - dali_threads * gpus) // gpus)))


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
    twin._fingerprint = None
    return twin
