"""The Python API called many times in one process (a notebook, a service): nothing of a call is left in the
caller's process state once it returns, whether it succeeded or failed."""
import gc
import weakref

import pytest

from tests.conftest import TINY_MODEL
from wdsembed.synthetic import write_demo_dataset

SETTINGS = dict(pretrained=False, device="cpu", num_threads_per_worker=1, fidelity_sample=0)


@pytest.fixture
def demo(tmp_path):
    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=3, failed_per_shard=0)
    return str(tmp_path / "data")


class _Node:
    pass


def test_the_callers_objects_stay_collectable_after_in_process_calls(demo, tmp_path):
    """A call that runs its shards here built the model's Worker in the caller's process, which froze everything
    alive there (gc.freeze, meant for a Dask worker process): the caller's objects of that moment, dropped later
    in reference cycles, were never collected again (a notebook's or a service's memory only grew), until a call
    with another model. The caller's collector is left as it had it."""
    from wdsembed.api import TimmImageEmbedder

    gc.unfreeze()  # another test's Worker in this pytest process may have frozen objects
    # batch_size=3: a Worker of its own, built in the first call here
    embedder = TimmImageEmbedder(TINY_MODEL, batch_size=3, **SETTINGS)
    for i in range(3):
        cycle = _Node()
        cycle.self = cycle
        alive = weakref.ref(cycle)
        results = embedder(demo, str(tmp_path / f"out{i}"))
        assert [r.cached for r in results] == [False]
        assert gc.get_freeze_count() == 0, i
        del cycle
        gc.collect()
        assert alive() is None, f"call {i}: an object the caller dropped after the call was never collected"
