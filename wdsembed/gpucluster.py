"""A Dask-CUDA local cluster with more than one worker process on each GPU.

A GPU worker feeds DALI from one Python thread (the tar reader, the host checks, `feed_input`), under one GIL. For a
model faster than that thread (ResNet-50 on an H200), a second process on the same GPU adds a second GIL; the GPU
time-slices between them (bench/gpu_share.py measures it). dask-cuda's LocalCUDACluster names each worker by its GPU
and stops at one per GPU; this subclass asks it for one more round of workers per GPU. Imported only where a run
asks for more than one worker per GPU (wdsembed.cluster.gpu_cluster), so nothing else needs dask-cuda.
"""
from __future__ import annotations

from dask_cuda import LocalCUDACluster

from wdsembed.cluster import device_of, round_of, worker_name


class SharedGPUCluster(LocalCUDACluster):
    """LocalCUDACluster with `workers_per_gpu` worker processes on each of n_workers / workers_per_gpu visible GPUs
    (the GPUs dask-cuda picks for that many workers). Each worker is built as dask-cuda builds one: its GPU first in
    CUDA_VISIBLE_DEVICES, that GPU's CPU affinity, the resources given."""

    def __init__(self, *args, n_workers: int, workers_per_gpu: int = 2, **kwargs):
        if workers_per_gpu < 1 or n_workers % workers_per_gpu:
            raise ValueError(f"n_workers ({n_workers}) must be a multiple of workers_per_gpu ({workers_per_gpu})")
        self.workers_per_gpu = workers_per_gpu
        self.gpus = n_workers // workers_per_gpu
        super().__init__(*args, n_workers=n_workers, **kwargs)

    def new_worker_spec(self):
        gpus = self.gpus
        round_ = len(self.worker_spec) // gpus
        if round_ >= self.workers_per_gpu:
            raise ValueError(f"Can not scale beyond {self.workers_per_gpu} workers on each of {gpus} GPUs")
        # dask-cuda picks the first GPU that has no worker of the names it sees: show it only this round's workers,
        # under their devices' names, then name the new one for its round.
        everyone = self.worker_spec
        self.worker_spec = {device_of(n): s for n, s in everyone.items() if round_of(n) == round_}
        try:
            ((device, spec),) = super().new_worker_spec().items()
        finally:
            self.worker_spec = everyone
        return {worker_name(device, round_): spec}
