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


# Ctrl-C lands while the first call imports torch: once torch's package has begun its submodules (torch.fx).
_INTERRUPTED_IN_IMPORT = """
import os, signal, sys, threading, time
# Ctrl-C raises KeyboardInterrupt, as in a notebook's kernel: a process started from a background job inherits
# SIGINT ignored (POSIX), and the signal would then do nothing at all.
signal.signal(signal.SIGINT, signal.default_int_handler)
from wdsembed.api import TimmImageEmbedder
assert "torch" not in sys.modules
data, out, model = sys.argv[1:4]

def ctrl_c_mid_import():
    while sys.modules.get("torch") is None or "torch.fx" not in sys.modules:
        time.sleep(0.001)
    mid = getattr(sys.modules["torch"].__spec__, "_initializing", False)
    os.kill(os.getpid(), signal.SIGINT)
    print("signal sent " + ("while torch was imported" if mid else "after torch was imported"), flush=True)

embedder = TimmImageEmbedder(model, pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1,
                             fidelity_sample=0)
threading.Thread(target=ctrl_c_mid_import, daemon=True).start()
try:
    embedder(data, out)
    print("first call finished", flush=True)
except KeyboardInterrupt:
    print("first call interrupted", flush=True)
print("second call:", [r.cached for r in embedder(data, out)], flush=True)
"""


def test_a_call_interrupted_while_it_imports_torch_leaves_the_next_call_working(demo, tmp_path):
    """A notebook's Interrupt (Ctrl-C) in the first seconds of its first call, while the call imported torch in the
    caller's process, left torch half-imported there: every later call in that kernel failed with "partially
    initialized module 'torch' has no attribute 'cuda' (most likely due to a circular import)" (or timm's "module
    'sympy' has no attribute 'logic'"), as did the caller's own `import torch`, until a restart. The call's
    KeyboardInterrupt now comes once those imports are done, and the next call works."""
    import os
    import subprocess
    import sys

    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_IN_IMPORT, demo, str(tmp_path / "out"), TINY_MODEL],
                          capture_output=True, text=True, timeout=300, env=env)
    said = done.stdout + done.stderr
    assert "signal sent while torch was imported" in said, said  # else the test proved nothing
    assert "first call interrupted" in said, said
    assert done.returncode == 0 and "second call: [False]" in said, said


def test_get_client_starts_a_cluster_of_threads_in_this_process(demo, tmp_path):
    """get_client(processes=False), a cluster whose workers are threads of the caller's process (no processes to
    spawn or to import the notebook's modules again), failed before it started with "TypeError:
    Server.__init__() got an unexpected keyword argument 'env'": the environment for worker processes was passed
    to workers that have no process of their own. Calls on it embed, and leave the caller's collector as it was
    (their Worker is built in this process)."""
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.nemo import get_client

    gc.unfreeze()
    client = get_client(n_workers=1, processes=False, dashboard_address=":0")
    try:
        embedder = TimmImageEmbedder(TINY_MODEL, batch_size=2, **SETTINGS)
        for i in range(2):
            assert [r.cached for r in embedder(demo, str(tmp_path / f"out{i}"))] == [False]
            assert gc.get_freeze_count() == 0, i
    finally:
        client.close()
        client.cluster.close()
