"""The worker's model step: out of GPU memory, a batch runs again in halves in the same process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from wdsembed import model as model_module
from wdsembed.config import EmbedConfig
from wdsembed.synthetic import photo_images
from wdsembed.worker import Worker


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    config = EmbedConfig(input=str(tmp_path_factory.mktemp("in")), output=str(tmp_path_factory.mktemp("out")),
                         model_name=TINY_MODEL, pretrained=False, device="cpu", batch_size=8,
                         num_threads_per_worker=1)
    return Worker(config)


def test_out_of_memory_splits_the_batch_and_keeps_every_image(worker, monkeypatch):
    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(8))]
    keys, expected, failures = worker.embed(iter(samples), autocast=True, normalize=True)
    assert keys == [k for k, _ in samples] and not failures

    real = model_module.embed_batch
    sizes = []

    def small_memory(loaded, images, **kw):  # a device that holds at most 3 images at once
        sizes.append(len(images))
        if len(images) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(loaded, images, **kw)

    monkeypatch.setattr(model_module, "embed_batch", small_memory)
    model_before = worker.loaded.model
    keys2, got, failures2 = worker.embed(iter(samples), autocast=True, normalize=True)
    assert keys2 == keys and not failures2
    assert sizes == [8, 4, 2, 2, 4, 2, 2]  # 8 fails, each half of 4 fails, the quarters run
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert worker.loaded.model is model_before  # nothing rebuilt or reloaded


def test_out_of_memory_on_one_image_is_raised(worker, monkeypatch):
    def no_memory(loaded, images, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model_module, "embed_batch", no_memory)
    samples = [(f"k{i}", im.data) for i, im in enumerate(photo_images(2))]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        worker.embed(iter(samples), autocast=True, normalize=True)
