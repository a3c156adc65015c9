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


# Ctrl-C lands as the flow's local Dask cluster starts: once its LocalCluster exists, before its constructor returns.
_INTERRUPTED_CLUSTER_START = """
import os, signal, sys, threading, time
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a notebook's kernel has it
    import psutil
    from distributed.deploy.spec import SpecCluster
    import flows.embed
    from wdsembed.config import EmbedConfig
    data, out, model = sys.argv[1:4]
    settings = dict(model_name=model, pretrained=False, device="cpu", num_threads_per_worker=1, fidelity_sample=0,
                    batch_size=2, n_workers=1)

    def ctrl_c_as_the_cluster_starts():
        while not SpecCluster._instances:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
        print("signal sent as the cluster started", flush=True)

    threading.Thread(target=ctrl_c_as_the_cluster_starts, daemon=True).start()
    try:
        flows.embed.run(EmbedConfig(input=data, output=out + "1", **settings))
        print("first run finished", flush=True)
    except KeyboardInterrupt:
        print("first run interrupted", flush=True)
    running = [c for c in SpecCluster._instances if c.status.name != "closed"]
    workers = [p for p in psutil.Process().children(recursive=True)
               if p.status() != psutil.STATUS_ZOMBIE and "apiserver" not in " ".join(p.cmdline())
               and "resource_tracker" not in " ".join(p.cmdline())]
    print("left running:", running, [" ".join(p.cmdline())[:80] for p in workers], flush=True)
    manifest = flows.embed.run(EmbedConfig(input=data, output=out + "2", **settings))
    print("second run:", repr(manifest), flush=True)
    os._exit(0)  # distributed's exit hook would close a cluster left running, hiding nothing said above
"""


def test_a_flow_run_interrupted_as_its_cluster_starts_leaves_no_cluster_running(demo, tmp_path):
    """A notebook's Interrupt (Ctrl-C) while flows.embed.run() started its local Dask cluster raised
    KeyboardInterrupt from inside LocalCluster's constructor: the cluster was never the task runner's to close, and
    its scheduler, dashboard port and worker processes ran on in the kernel until it exited, one more per such
    interrupt. Ctrl-C now comes once the cluster is the runner's, which closes it; the next run works."""
    import os
    import subprocess
    import sys

    script = tmp_path / "notebook.py"
    script.write_text(_INTERRUPTED_CLUSTER_START)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    env.pop("PREFECT_API_URL", None)  # the run's own temporary server, as in a plain notebook
    done = subprocess.run([sys.executable, str(script), demo, str(tmp_path / "out"), TINY_MODEL],
                          capture_output=True, text=True, timeout=300, env=env)
    said = done.stdout + done.stderr
    assert "signal sent as the cluster started" in said, said[-3000:]
    assert "first run interrupted" in said, said[-3000:]
    assert "left running: [] []" in said, said[-3000:]
    assert done.returncode == 0 and "computed=1, cached=0, failed_shards=0" in said, said[-3000:]
