"""The worker processes of the local clusters a run starts leave Ctrl-C and a hangup to the process that started them
(wdsembed.localworkers): they ignore SIGINT and SIGHUP from their first instant, the starting process keeps its own,
closing the cluster still stops a busy worker within seconds, and workers started any other way are untouched.
The whole command under a terminal's Ctrl-C: tests/test_cli.py (test_ctrl_c_to_the_process_group_while_workers_embed);
under a hangup: test_hangup_mid_run_ends_as_sigterm_does there.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import dask
import psutil
import pytest

from wdsembed import cluster, localworkers
from wdsembed.config import EmbedConfig

pytestmark = pytest.mark.slow  # each starts a Dask cluster with a worker process


@pytest.fixture(autouse=True)
def interactive_signals():
    """This process with Python's own Ctrl-C handler and SIGHUP's default, as a command run from a terminal has
    them. A test run started in the background of a non-interactive shell (`cmd &` in a script, as CI runners may)
    inherits SIGINT ignored, one started with nohup SIGHUP, and so would every worker process it spawns, whatever
    the worker class."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGHUP, before[1])


BOTH = {"SIGINT", "SIGHUP"}


def ignored() -> set:
    """Which of SIGINT (Ctrl-C) and SIGHUP (a hangup) this process ignores."""
    return {name for name in BOTH if signal.getsignal(getattr(signal, name)) is signal.SIG_IGN}


def test_runs_and_the_gpu_clusters_use_these_workers():
    cpu = cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", device="cpu"))
    assert cpu["cluster_kwargs"]["worker_class"] is localworkers.Nanny
    for workers_per_gpu in (1, 2):
        assert cluster.gpu_cluster(2, workers_per_gpu)["cluster_kwargs"]["worker_class"] is localworkers.GPUNanny
    assert issubclass(localworkers.GPUNanny, localworkers.Nanny)  # dask-cuda takes a Nanny subclass as it is


GPU_SETTINGS = ("CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF", "DALI_USE_CUDA_MALLOC_ASYNC", "DALI_USE_VMM",
                "DALI_USE_DEVICE_MEM_POOL", "CUDA_VISIBLE_DEVICES")


def _unset_gpu_settings(monkeypatch) -> None:
    for name in GPU_SETTINGS:  # set first, so that anything written into this process is undone afterwards too
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_a_run_on_gpus_leaves_the_gpu_settings_out_of_this_process(monkeypatch):
    """The GPU settings (wdsembed.worker.gpu_process_environment) were written into the process that starts a run,
    for its GPU workers to inherit: a notebook that ran the API and then used torch on a GPU had them too. Planning
    a run's GPU cluster leaves this process's environment as it was (no CUDA here: the count of GPUs is the seam)."""
    import importlib.util

    _unset_gpu_settings(monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(cluster, "visible_gpus", lambda: 2)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "dask_cuda" else find_spec(name, *a))
    before = dict(os.environ)
    for workers_per_gpu in (1, 2):
        kwargs = cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", workers_per_gpu=workers_per_gpu))
        assert kwargs["cluster_kwargs"]["worker_class"] is localworkers.GPUNanny
    assert dict(os.environ) == before


def test_gpu_workers_start_with_the_gpu_settings_this_process_lacks(monkeypatch):
    """A GPU cluster's worker processes get the GPU settings in their own environment, where dask-cuda's preload
    creates their CUDA context as they start (CUDA reads CUDA_DEVICE_MAX_CONNECTIONS then), and this process none of
    them. What the user set stays: in this process's environment, in Dask's distributed.nanny.environ, and the
    cluster's own per worker (dask-cuda's CUDA_VISIBLE_DEVICES, which LocalCluster's `env` stands in for here)."""
    from distributed import Client, LocalCluster

    from wdsembed.worker import GPU_HARDWARE_QUEUES

    _unset_gpu_settings(monkeypatch)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own allocator settings
    here = lambda: [os.environ.get(name) for name in GPU_SETTINGS]  # noqa: E731 - (Dask's nanny writes its
    before = here()  # own distributed.nanny.pre-spawn-environ here as it spawns: not ours to judge)
    with dask.config.set({"distributed.nanny.environ": {"DALI_USE_VMM": "1"}}), \
            LocalCluster(n_workers=1, threads_per_worker=1, worker_class=localworkers.GPUNanny,
                         env={"CUDA_VISIBLE_DEVICES": "1,0"}, dashboard_address=None) as ours, \
            Client(ours, set_as_default=False) as client:
        (seen,) = client.run(lambda: [os.environ.get(name) for name in GPU_SETTINGS]).values()
        # DALI refuses cudaMallocAsync beside DALI_USE_VMM=1: DALI's variables are left to the user's choice
        assert seen == [str(GPU_HARDWARE_QUEUES), "max_split_size_mb:128", None, "1", None, "1,0"]
        assert here() == before
    with LocalCluster(n_workers=1, threads_per_worker=1, worker_class=localworkers.GPUNanny,
                      dashboard_address=None) as ours, Client(ours, set_as_default=False) as client:
        (seen,) = client.run(lambda: [os.environ.get(name) for name in GPU_SETTINGS]).values()
        assert seen == [str(GPU_HARDWARE_QUEUES), "max_split_size_mb:128", "1", None, None, None]
        assert here() == before


def test_configured_preloads_stay():
    this = localworkers.PRELOAD
    assert localworkers.with_this_preload(None, None) == ([this], [])
    assert localworkers.with_this_preload("mine", ["--x"]) == (["mine", this], ["--x"])  # one argv for all
    assert localworkers.with_this_preload(["mine"], [["--x"]]) == (["mine", this], [["--x"], []])
    assert localworkers.with_this_preload(["dask_cuda.initialize", this], ["--a"]) == (
        ["dask_cuda.initialize", this], ["--a"])
    with dask.config.set({"distributed.worker.preload": ["mine"], "distributed.worker.preload-argv": [["--y"]]}):
        assert localworkers.with_this_preload(None, None) == (["mine", this], [["--y"], []])


def test_workers_ignore_sigint_and_sighup_and_this_process_keeps_them():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, worker_class=localworkers.Nanny,
                      dashboard_address=None) as ours, Client(ours, set_as_default=False) as client:
        assert list(client.run(ignored).values()) == [BOTH]
        assert list(client.run(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, [])).values()) == [set()]
        assert list(client.run(quiet_once_closing, "distributed.worker").values()) == [True]
        assert list(client.run(quiet_once_closing, "distributed.worker.state_machine").values()) == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    localworkers.dask_setup(None)  # as for a worker in this very process (processes=False): nothing changes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # nor in this thread


def quiet_once_closing(logger: str) -> bool:
    import logging

    return any(isinstance(f, localworkers._QuietOnceClosing) for f in logging.getLogger(logger).filters)


def test_a_closing_worker_keeps_distributeds_lines_to_itself():
    """What a worker closed with a task still running logs (the run was stopped) stays in its process; what it logs
    before, and anything critical, still shows."""
    import logging

    from distributed.core import Status

    class Worker:
        status = Status.running

    worker = Worker()
    quiet = localworkers._QuietOnceClosing(worker)

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", level, __file__, 1, "Failed to communicate with scheduler "
                                 "during heartbeat.", None, None)

    assert quiet.filter(record(logging.ERROR))
    for worker.status in (Status.closing, Status.closed):
        assert not quiet.filter(record(logging.ERROR)) and not quiet.filter(record(logging.WARNING))
        assert quiet.filter(record(logging.CRITICAL))


def test_workers_started_otherwise_keep_sigint_and_sighup():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as theirs, \
            Client(theirs, set_as_default=False) as client:
        assert list(client.run(ignored).values()) == [set()]
        assert list(client.run(quiet_once_closing, "distributed.worker").values()) == [False]


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP"])
def test_a_ctrl_c_or_hangup_while_a_worker_process_starts_is_held_for_it(name):
    """The worker process gets a SIGINT (or SIGHUP) as soon as it exists, long before its preload runs (Python
    starting, its imports): it survives it, and ignores both once started. Without the mask inherited at its spawn
    it died there (KeyboardInterrupt in an import, or killed outright), and the cluster failed to start."""
    from distributed import Client, LocalCluster

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    made: dict = {}

    def start():
        try:
            made["cluster"] = LocalCluster(n_workers=1, threads_per_worker=1, worker_class=localworkers.Nanny,
                                           dashboard_address=None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            made["error"] = exc

    starting = threading.Thread(target=start)
    starting.start()
    deadline = time.monotonic() + 60
    worker = None
    while worker is None:
        assert time.monotonic() < deadline and starting.is_alive(), made
        for p in me.children(recursive=True):
            try:
                if p.pid not in before and "spawn_main" in " ".join(p.cmdline()):
                    worker = p
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.005)
    os.kill(worker.pid, getattr(signal, name))
    starting.join(120)
    assert "cluster" in made, made
    with made["cluster"] as ours, Client(ours, set_as_default=False) as client:
        assert list(client.run(os.getpid).values()) == [worker.pid]
        assert list(client.run(ignored).values()) == [BOTH]


def test_closing_the_cluster_stops_a_busy_worker_within_seconds():
    """What the command's Ctrl-C relies on: the cluster's close stops a worker still running a task (its nanny kills
    it after 4 s: distributed's Nanny.kill), SIGINT and SIGHUP ignored or not."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, worker_class=localworkers.Nanny,
                      dashboard_address=None) as ours, Client(ours, set_as_default=False) as client:
        (pid,) = client.run(os.getpid).values()
        busy = client.submit(time.sleep, 300)
        while not client.processing()[next(iter(client.processing()))]:
            time.sleep(0.05)
        closing = time.monotonic()
        client.close()
        ours.close()
        assert time.monotonic() - closing < 15
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    del busy


CTRL_C_BEFORE_SYNC_BEGAN = r"""
import logging, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import wdsembed.cluster  # what a run's process imports before it talks to Dask
from distributed import Client, LocalCluster
from distributed.utils import sync

with LocalCluster(processes=False, n_workers=0, dashboard_address=":0") as local, Client(local) as client:
    async def nothing():
        return None
    # The loop busy for a moment: the Ctrl-C lands while sync() waits and its coroutine has not begun.
    client.loop.add_callback(time.sleep, 1.0)
    threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    try:
        sync(client.loop, nothing)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    time.sleep(1.5)  # the loop runs sync()'s cancel callback
"""


def test_a_ctrl_c_before_a_dask_call_began_prints_no_traceback(tmp_path):
    """A Ctrl-C that lands while the client waits on a call whose coroutine has not begun (the loop busy): distributed's
    sync() then runs its cancel callback with nothing yet to cancel, which raises NameError ('future' never assigned),
    and tornado logged it with its traceback among the command's last lines (a fresh-clone CI run of
    test_ctrl_c_mid_run failed on it). Nothing was lost; the line goes."""
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", CTRL_C_BEFORE_SYNC_BEGAN], capture_output=True, text=True, timeout=120,
                           env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert "interrupted" in ended.stdout, ended.stderr[-3000:]
    assert "Traceback" not in ended.stderr and "NameError" not in ended.stderr, ended.stderr[-3000:]


def test_a_cpu_run_splits_the_cores_this_process_may_use(monkeypatch):
    """The CPU workers' torch threads split the cores the run may use, not every core of the host: os.cpu_count()
    counted the host's, so under taskset (or a container's CPU quota) each worker took more threads than it had
    cores. Dask's count (dask.system.cpu_count) reads the CPU affinity and the cgroup quota."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("needs a process allowed on 2 cores or more")
    monkeypatch.setattr(cluster, "_USERS_THREADS", {})  # as for a user who set neither (conftest sets OMP's)
    os.sched_setaffinity(0, {min(cores)})
    try:
        kwargs = cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", device="cpu", n_workers=1))
    finally:
        os.sched_setaffinity(0, cores)
    assert kwargs["cluster_kwargs"]["env"]["OMP_NUM_THREADS"] == "1"


ONE_CORE_DEFAULTS = """
import json
from wdsembed import cluster, nemo
from wdsembed.config import EmbedConfig

def workers(**fields):
    return cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", device="cpu", **fields))["cluster_kwargs"]

client = nemo.get_client(dashboard_address=None)
try:
    nemo_workers = len(client.scheduler_info(n_workers=-1)["workers"])
finally:
    client.cluster.close()
    client.close()
print(json.dumps({"flow": workers()["n_workers"], "threads": workers()["env"]["OMP_NUM_THREADS"],
                  "asked": workers(n_workers=2)["n_workers"], "nemo": nemo_workers}))
"""


def test_a_cpu_run_on_one_core_starts_one_worker_unless_asked_for_more():
    """On the CPU, --n-workers (and get_client's n_workers) defaulted to 2 whatever the cores: under `taskset -c 0`
    or a container's quota of one CPU, two workers each loaded the model and split one core. The default is now
    the smaller of 2 and the cores the run may use (Dask's count: affinity and cgroup quota); a number the user
    gives stands."""
    import json
    import subprocess
    import sys

    core = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in cluster.TORCH_THREADS_ENV} | {"PYTHONPATH": os.getcwd()}
    ran = subprocess.run([sys.executable, "-c", ONE_CORE_DEFAULTS], capture_output=True, text=True, timeout=300,
                         env=env, preexec_fn=lambda: os.sched_setaffinity(0, {core}))  # as `taskset -c 0` does
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads(ran.stdout.strip().splitlines()[-1]) == {"flow": 1, "threads": "1", "asked": 2, "nemo": 1}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_a_cpu_workers_torch_takes_its_share_of_the_cores(monkeypatch):
    """torch in a CPU run's worker runs on the threads its share of the cores gives (cpu_worker_env), as it embeds:
    Dask's nanny sets MKL_NUM_THREADS=1 in each worker process (distributed.nanny.pre-spawn-environ), which torch
    reads over OMP_NUM_THREADS, and every worker's model ran on one thread, on a 16-core host too."""
    from dask.system import cpu_count
    from distributed import Client, LocalCluster

    if cpu_count() < 2:
        pytest.skip("needs a process allowed on 2 cores or more")
    monkeypatch.setattr(cluster, "_USERS_THREADS", {})  # as for a user who set neither (conftest sets OMP's)
    kwargs = cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", device="cpu", n_workers=1))
    with LocalCluster(**kwargs["cluster_kwargs"], dashboard_address=None) as ours, \
            Client(ours, set_as_default=False) as client:
        assert list(client.run(torch_threads).values()) == [cpu_count()]



def test_a_cpu_workers_torch_keeps_the_users_own_thread_count():
    """OMP_NUM_THREADS (or MKL_NUM_THREADS) set by the user decides the CPU workers' torch threads, as it does torch's
    anywhere: the run's share of the cores replaced it. Read as wdsembed is imported: each Dask nanny started in
    this process writes Dask's own MKL_NUM_THREADS=1 into its environment, which is no user's."""
    from dask.system import cpu_count
    from distributed import Client, LocalCluster

    if cpu_count() < 2:
        pytest.skip("needs a process allowed on 2 cores or more")
    assert cluster.cpu_worker_env(1, {})["MKL_NUM_THREADS"] == str(cpu_count())
    for variable in cluster.TORCH_THREADS_ENV:
        env = cluster.cpu_worker_env(1, {variable: "1"})
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, env=env, dashboard_address=None,
                          worker_class=localworkers.Nanny) as ours, Client(ours, set_as_default=False) as client:
            assert list(client.run(torch_threads).values()) == [1], variable


def test_a_users_thread_count_that_is_no_count_leaves_the_workers_their_share():
    """OMP_NUM_THREADS=0 (taken for 'automatic'), or a value that is no whole number, is no thread count: libgomp
    and torch reject it ('Invalid value for environment variable OMP_NUM_THREADS') and torch then takes every core
    in each worker. The workers get their share of the cores instead, and MKL_NUM_THREADS no copy of it."""
    from dask.system import cpu_count
    from distributed import Client, LocalCluster

    share = str(max(1, cpu_count() // 2))
    for junk in ("0", "abc", "", "-3"):
        assert cluster.cpu_worker_env(2, {"OMP_NUM_THREADS": junk}) == \
            {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}, junk
    assert cluster.cpu_worker_env(2, {"OMP_NUM_THREADS": "0", "MKL_NUM_THREADS": "3"}) == \
        {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    if cpu_count() < 2:
        pytest.skip("needs a process allowed on 2 cores or more")
    env = cluster.cpu_worker_env(2, {"OMP_NUM_THREADS": "0"})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, env=env, dashboard_address=None,
                      worker_class=localworkers.Nanny) as ours, Client(ours, set_as_default=False) as client:
        assert list(client.run(torch_threads).values()) == [int(share)] * 2
