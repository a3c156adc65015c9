"""Which Dask cluster runs the shard tasks: one worker per visible GPU, CPU worker processes, or a given scheduler.

Returns plain keyword arguments for `prefect_dask.DaskTaskRunner`; nothing here imports Prefect or CUDA libraries,
so a CPU-only machine never needs dask-cuda. Also the workers' announcements of a task's start, which a run waits on
to let its first tasks start alone (announce_task_start, TaskStarts), and a running task's check that Dask still wants
its result (task_abandoned).
"""
from __future__ import annotations

import asyncio
import collections
import importlib.util
import logging
import os
import sys
import warnings
import threading
import time
from typing import Callable, Optional

from wdsembed.config import EmbedConfig, set_to
from wdsembed.threads import Watch, enclosing_dask_worker


class _NothingYetToCancel(logging.Filter):
    """Drops distributed's traceback for a Ctrl-C that lands while a Dask call waits and its coroutine has not begun
    (the client's loop busy): distributed.utils.sync's cancel callback then reads a `future` never assigned and
    raises NameError, which tornado logs as 'Exception in callback', with its traceback, among a stopped command's
    last lines. Nothing was there to cancel; the run's own end says what is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, NameError) or getattr(exc, "name", None) != "future":
            return True
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        code = tb.tb_frame.f_code if tb is not None else None
        return not (code is not None and code.co_name == "cancel"
                    and code.co_filename.endswith(os.path.join("distributed", "utils.py")))


class _NannyRoutine(logging.Filter):
    """Drops a local nanny's lines of its start and of its ordinary close (five per worker process: forty lines on
    an 8-GPU host, saying only that the cluster ran). Its other lines stay: why a worker process died ('Worker
    process N exited with status 137'), its restart, a close for another reason."""

    _ALWAYS = ("        Start Nanny at: %r", "Nanny at %r closed.")
    _ON_CLOSE = ("Closing Nanny at %r. Reason: %s", "Closing Nanny gracefully at %r. Reason: %s",
                 "Nanny asking worker to close. Reason: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.msg, str):
            return True
        if record.msg in self._ALWAYS:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg in self._ON_CLOSE and args and str(args[-1]).startswith("nanny-close"))


class _ClosedWhileReconnecting(logging.Filter):
    """Drops distributed's ERROR and traceback of a client closed while it waits for its lost scheduler to come back
    (Client._reconnect cancelled: a CancelledError, logged by its log_errors): the run, or the call, ends as soon
    as its shards are back, and says itself that the scheduler was lost; nothing failed in the close."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, asyncio.CancelledError):
            return True
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "_reconnect" and code.co_filename.endswith(os.path.join("distributed", "client.py")):
                return False
            tb = tb.tb_next
        return True


# In every process that talks to Dask for a run: they all import this module first.
if not any(isinstance(f, _ClosedWhileReconnecting) for f in logging.getLogger("distributed.client").filters):
    logging.getLogger("distributed.client").addFilter(_ClosedWhileReconnecting())
if not any(isinstance(f, _NothingYetToCancel) for f in logging.getLogger("tornado.application").filters):
    logging.getLogger("tornado.application").addFilter(_NothingYetToCancel())
if not any(isinstance(f, _NannyRoutine) for f in logging.getLogger("distributed.nanny").filters):
    logging.getLogger("distributed.nanny").addFilter(_NannyRoutine())


def visible_gpus() -> int:
    """GPUs this process may use, honouring CUDA_VISIBLE_DEVICES, without creating a CUDA context here
    (the workers are separate processes that each take one GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if "torch" not in sys.modules and not _gpu_driver_present():
        return 0  # torch, which would count none either, not imported: seconds of a re-run with nothing to compute
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA is simply zero GPUs
        return 0


def _gpu_driver_present() -> bool:
    """Whether this host may have a GPU torch can count: False only on Linux where neither of the NVIDIA driver's
    libraries loads (torch counts CUDA devices through NVML, else the CUDA runtime, which loads libcuda) and ROCm's
    device (/dev/kfd) is absent. Elsewhere True: torch is asked."""
    if not sys.platform.startswith("linux") or os.path.exists("/dev/kfd"):
        return True
    import ctypes

    for library in ("libcuda.so.1", "libnvidia-ml.so.1"):
        try:
            ctypes.CDLL(library)
        except OSError:
            continue
        return True
    return False


def workers_gpus(client) -> Optional[int]:
    """The GPUs the Dask client's workers see, each as visible_gpus says on it (a GPU worker of dask-cuda sees its
    own); None where the scheduler has no worker yet, or some see a GPU and some none."""
    seen = list(client.run(visible_gpus).values())
    if not seen or (0 in seen and any(seen)):
        return None
    return sum(seen)


# What one embedding task asks of a worker's GPU resource: three shards per GPU worker at a time. One streams
# through the worker's pipeline and model while the others do what needs no GPU (Prefect's state and cache calls,
# reading metadata, joining, validating and writing tables, the fidelity reference), so the GPU does not wait for
# that work between shards. Three, not two: for a fast model (ResNet-50 embeds a 10,000-image shard in under a
# second on an H200) one shard's bookkeeping takes longer than the next one's embedding. The worker's stream
# (wdsembed.worker.Worker.embed) takes the shards' samples one shard after the other, the next right behind.
SHARDS_PER_GPU = 3
GPU_SHARE_PER_SHARD = 0.33  # not 1/3: three of those can add up to a hair over 1.0 in Dask's resource accounting


def gpu_slots_declared(client, *, wait_s: float = 30.0) -> bool:
    """Whether every worker of this run's own Dask client declares a GPU resource (the LocalCUDACluster started
    for the run, or `dask cuda worker --resources GPU=1` on other nodes): only then may an embedding task ask for
    one, or it would wait forever. Asked of the client the run submits through, never of a global default client,
    which may not exist yet when the run decides (that once let two shards share one worker's pipeline). Waits up to
    `wait_s` for a first worker, so that a scheduler whose workers are still joining is judged by them."""
    if client is None:
        return False
    try:
        client.wait_for_workers(1, timeout=wait_s)
    except (TimeoutError, OSError):
        return False
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return bool(workers) and all("GPU" in (w.get("resources") or {}) for w in workers)


class WorkersCannotRunError(RuntimeError):
    """The workers of a Dask cluster that this run did not start cannot run its shards (a package they cannot
    import, a path of the run they do not see); the message names the workers, the cause and what to do."""


def _worker_probe():
    """A function for client.run that says what a worker lacks to run the shards: the modules it cannot import
    (`modules`: imported; `specs`: only found, not run: tasks.embed installs hooks as it is imported) and the
    paths it does not see. Made here, not at module level, so that it is pickled by value: a worker that cannot
    import wdsembed can still run it, and say so."""

    def probe(modules, specs, paths):
        import importlib
        import importlib.util
        import os

        lacks = []
        for name in list(modules) + list(specs):
            try:
                found = importlib.import_module(name) if name in modules else importlib.util.find_spec(name)
                if found is None:
                    raise ModuleNotFoundError(f"No module named {name!r}")
            except Exception as exc:  # noqa: BLE001 - any import failure is what the worker lacks
                lacks.append(f"cannot import {name} ({type(exc).__name__}: {exc})")
        lacks += [f"does not see {what} {path}" for what, path in paths if not os.path.exists(path)]
        return lacks

    return probe


def check_workers(client, config: EmbedConfig, first_shard: Optional[str], *,
                  modules: tuple = ("wdsembed.shard",), specs: tuple = ("timm", "nvidia.dali")) -> None:
    """Before the first shard goes to a Dask cluster that this run did not start (--dask-address, or the API's
    current client), whose workers may run elsewhere, in another environment: ask each worker whether it imports
    the modules the shards run with, and sees the first shard and OUTPUT's claim where they are local paths. A
    worker that could not failed every task with "Error during deserialization of the task graph" (its cause left
    out), and one that did not see OUTPUT embedded each shard, then refused its write as if the run had lost its
    claim. Raises WorkersCannotRunError naming each cause once, with the workers it holds for."""
    from wdsembed import outputclaim, storage

    paths = []
    if storage.is_local(storage.filesystem(config.output, config.storage_options)[0]):
        paths.append(("OUTPUT's claim", os.path.abspath(outputclaim.claim_url(config)[1])))
    if first_shard:
        fs, path = storage.filesystem(first_shard, config.storage_options)
        if storage.is_local(fs):
            paths.insert(0, ("the first shard", os.path.abspath(path)))
    try:
        said = client.run(_worker_probe(), list(modules), list(specs), paths)
    except Exception as exc:  # noqa: BLE001 - the probe is plain Python: its own failure says what is wrong
        said = {"(every worker)": [f"cannot run Python sent by this process ({type(exc).__name__}: {exc})"]}
    by_cause: dict[str, list[str]] = {}
    for worker, lacks in said.items():
        for lack in lacks:
            by_cause.setdefault(lack, []).append(str(worker))
    if not by_cause:
        return
    lines = [f"{lack} on {len(workers)} worker(s) ({', '.join(sorted(workers)[:3])}"
             f"{', ...' if len(workers) > 3 else ''})" for lack, workers in by_cause.items()]
    todo = []
    if any(lack.startswith("cannot") for lack in by_cause):
        todo.append("install wdsembed and its dependencies (the same versions as here) where the workers run")
    if any(lack.startswith("does not see") for lack in by_cause):
        todo.append("every worker must reach INPUT and OUTPUT at the same paths as this process (a shared file "
                    "system), or pass URLs of an object store")
    raise WorkersCannotRunError(f"the Dask workers at {client.scheduler.address} cannot run this run's shards, so none "
                                f"was submitted: {'; '.join(lines)}. {'; '.join(todo)}")


def describe_lost_task(exc: BaseException, client=None) -> Optional[tuple[str, bool]]:
    """A shard's reason, and whether it may pass on a re-run, where Dask itself lost its task: Dask gave up on it
    after its workers died running it (KilledWorker), or cancelled it as the client lost its scheduler. Dask's
    own words name the task by its opaque key (a hash per shard: a summary said each shard's as a cause of its
    own) and leave out why the workers died, and a lost scheduler read as a failure that would come again. None
    for any other exception. `client`: asked for the nannies' memory restarts (a scheduler's event log)."""
    try:
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - no Dask, no Dask loss
        return None
    if isinstance(exc, KilledWorker):
        last = exc.last_worker
        name = getattr(last, "name", None)
        where = getattr(last, "address", str(last)) + (f" ({name})" if isinstance(name, str) and name else "")
        address = getattr(last, "address", None)
        why = _memory_restart(client, address)
        why = f"was {why}" if why else process_end(address, wait_s=EXIT_CODE_WAIT_S) or (
            "was killed from outside (the system's out-of-memory killer, a SIGKILL) or crashed: the worker's log, or "
            "the kernel's (dmesg), says which")
        return (f"its Dask worker process died while running it, on {exc.allowed_failures + 1} worker(s) in turn, "
                f"so Dask gave up on it (KilledWorker); the last, {where}, {why}"), False
    if isinstance(exc, FutureCancelledError) and exc.reason == "scheduler-connection-lost":
        return scheduler_lost(client), True
    if isinstance(exc, FutureCancelledError) and exc.reason == STALLED and exc.msg:
        return exc.msg, True  # StallWatch's words: the workers' memory, what to change
    if isinstance(exc, FutureCancelledError):
        return f"its Dask task was cancelled ({exc.reason}{': ' + exc.msg if exc.msg else ''})", True
    return None


def scheduler_lost(client) -> str:
    """A shard's reason where the run lost its Dask scheduler (`client`'s) before the shard was done."""
    address = getattr(getattr(client, "scheduler", None), "address", None) or "this run's"
    # Its worker, closing as it lost the scheduler too, stops the shard between two batches (task_abandoned).
    return (f"the Dask scheduler at {address} was lost mid-run (its connection closed), and the shard's task with "
            "it: its worker stops it unwritten, and a re-run computes it (or finds it done, where the worker was "
            "already writing it)")


# The longest a lost task's reason waits for the nanny of a worker of this process's own cluster to see its process
# end (wdsembed.localworkers.exit_code): Dask says the worker is gone as its connection closes, a moment before.
EXIT_CODE_WAIT_S = 5.0


def process_end(address: Optional[str], wait_s: float = 0.0) -> Optional[str]:
    """How the process of the worker at `address` ended, in words, where a nanny of this process (a local cluster
    that wdsembed started: wdsembed.localworkers) saw it end; None for a worker of another cluster, whose nanny runs
    elsewhere and tells no one but its own log."""
    import signal
    import sys

    localworkers = sys.modules.get("wdsembed.localworkers")  # not imported: no nanny of ours ran here
    code = localworkers.exit_code(address, wait_s) if localworkers is not None and address else None
    if code is None:
        return None
    oom = "most often the system's out-of-memory killer: the kernel's log (dmesg) says whether it was"
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        said = f"was killed by signal {signal.SIGKILL}" if code < 0 else f"exited with status {code}"
        return f"{said}: SIGKILL, {oom}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-code} ({name}): the worker's log, or the kernel's (dmesg), says why"
    return f"exited with status {code}: the worker's log says why"


def _memory_restart(client, address: Optional[str]) -> Optional[str]:
    """What the scheduler's log says of a nanny that restarted the worker at `address` for its memory (distributed's
    terminate threshold), if it did."""
    if client is None or not address:
        return None
    try:
        events = client.get_events("worker-restart-memory")
    except Exception:  # noqa: BLE001 - a reason without it is still the reason
        return None
    for _, event in reversed(list(events or ())):
        if isinstance(event, dict) and event.get("worker") == address:
            import dask

            fraction = dask.config.get("distributed.worker.memory.terminate")
            return (f"restarted by its nanny for using {event.get('rss', 0) / 2**30:.2f} GiB, over "
                    f"{fraction:.0%} of its memory limit (distributed.worker.memory.terminate): give the workers "
                    "more memory (dask worker --memory-limit) or pass a smaller --batch-size")
    return None


# A worker paused for its memory (over distributed.worker.memory.pause of its limit) starts no task. Where every
# worker is paused and none runs a task, nothing frees their memory (the model and pipeline a worker keeps are no
# data Dask can spill), and a run waited on its unstarted shards for ever, without a word. Said after STALL_WARN_S;
# after STALL_S, the unstarted shards fail with the reason (a worker that resumes, or joins, ends the count).
STALL_WARN_S = 30.0
STALL_S = 300.0
STALLED = "wdsembed-workers-paused"  # the cancel reason of a shard given up on so (describe_lost_task)


def stall_reason(client) -> Optional[str]:
    """Why no worker of `client`'s cluster can start a task now: every one paused for its memory, none running a
    task; None where one can (or there is no worker to judge)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        return None
    for w in workers.values():
        counts = (w.get("metrics") or {}).get("task_counts") or {}
        if w.get("status") != "paused" or counts.get("executing") or counts.get("long-running"):
            return None
    import dask

    def used(w) -> float:
        return (w.get("metrics") or {}).get("memory", 0) / (w.get("memory_limit") or 1)

    address, w = max(workers.items(), key=lambda item: used(item[1]))
    fraction = dask.config.get("distributed.worker.memory.pause")
    return (f"every worker of the Dask cluster at {client.scheduler.address} ({len(workers)}) is paused for its "
            f"memory and runs no task, so none starts a shard: {address} uses "
            f"{(w.get('metrics') or {}).get('memory', 0) / 2**30:.2f} GiB of its "
            f"{(w.get('memory_limit') or 0) / 2**30:.2f} GiB limit, over {fraction:.0%} "
            "(distributed.worker.memory.pause); give the workers more memory (dask worker --memory-limit)")


class StallWatch(Watch):
    """While a run waits on `futures` (Dask futures), watches its cluster from a thread: once no worker could start
    a task (stall_reason) for STALL_WARN_S, `warn(reason)`; for STALL_S, cancels the futures not done, with
    reason STALLED and the words as their message (their tasks never started). A `with` block."""

    thread_name = "wdsembed-stall-watch"

    def __init__(self, client, futures, warn, poll_s: float = 2.0):
        # Its thread runs in its starter's context: the flow's run logger warns in the run's log (threads.Watch).
        super().__init__(poll_s)
        self.client, self.futures, self.warn = client, list(futures), warn

    def _watch(self) -> None:
        since, warned = None, False
        while not self._stop.wait(self.poll_s):
            if self.client.status != "running":
                # Its scheduler lost: an ask would wait for it to come back, up to Dask's connect timeout (30 s),
                # and the run's end with it (this thread is joined); the run ends by itself (describe_lost_task).
                continue
            try:
                reason = stall_reason(self.client)
            except Exception:  # noqa: BLE001 - a scheduler gone ends the run by itself (describe_lost_task)
                reason = None
            if reason is None:
                since, warned = None, False
                continue
            since = since or time.monotonic()
            if not warned and time.monotonic() - since >= STALL_WARN_S:
                warned = True
                self.warn(f"{reason}; the shards not started fail in {STALL_S - STALL_WARN_S:.0f} s unless a "
                          "worker resumes")
            if time.monotonic() - since >= STALL_S:
                undone = [f for f in self.futures if not f.done()]
                if undone:
                    self.client.cancel(undone, reason=STALLED,
                                       msg=f"not started in {STALL_S:.0f} s: {reason}")
                return


class Ended:
    """The futures given to `add` (Dask's, or Prefect's that wrap them) as each ends, taken without waiting (`take`):
    what a run collects between two of its submits. Collected only after the last submit, the first shards of a
    first run of 4,000 ended unseen (the bar at 0) for the 3 minutes that Prefect's submits took on 2 cores."""

    def __init__(self) -> None:
        self._ended: collections.deque = collections.deque()  # appended to from Dask's callback thread

    def add(self, future) -> None:
        future.add_done_callback(self._ended.append)

    def take(self) -> list:
        """The futures that ended since the last take, in the order they ended."""
        taken = []
        while self._ended:
            taken.append(self._ended.popleft())
        return taken


def workers_lost_under(client, keys) -> dict:
    """For each of `keys` (Dask task keys), the workers that left the cluster unexpectedly (a process killed, by the
    kernel's out-of-memory killer or a nanny's memory restart, or crashed) while it was given to them, from the
    scheduler's event log: Dask ran such a task again elsewhere, and its shard came out whole, with no word of it
    anywhere the run's user looks. Empty where the log cannot be read."""
    keys = set(keys)
    try:
        events = client.get_events("all")
    except Exception:  # noqa: BLE001 - a record of what happened, never a reason to fail the run
        return {}
    lost: dict = {}
    for _, event in events or ():
        if isinstance(event, dict) and event.get("action") == "remove-worker" and not event.get("expected"):
            for key in event.get("processing-tasks") or ():
                if key in keys:
                    lost.setdefault(key, []).append(str(event.get("worker")))
    return lost


def rerun_warning(workers: list) -> str:
    """A shard's warning where its task outlived workers_lost_under's workers."""
    ends = {worker: process_end(worker) for worker in workers[:3]}
    said = [f"{worker} {end}" for worker, end in ends.items() if end]
    why = f"; {'; '.join(said)}" if said else " (the worker's log, or the kernel's, says why it died)"
    return (f"its Dask worker died before the shard was done ({len(workers)} time(s): {', '.join(workers[:3])}), "
            f"and Dask ran it again from its start; nothing of the lost attempt was kept{why}")


def rerun_warnings(client, stems_of: dict) -> dict:
    """Stem -> rerun_warning, for the shards of `stems_of` (Dask task key -> its shards' stems) whose task Dask ran
    again after a worker died under it (workers_lost_under): what the flow and the API both add to those shards'
    warnings (computed shards only: a cached one's task never ran)."""
    return {stem: rerun_warning(workers) for key, workers in workers_lost_under(client, stems_of).items()
            for stem in stems_of[key]}


def worker_count(client) -> int:
    """How many workers the Dask scheduler of `client` has now."""
    return len(client.scheduler_info(n_workers=-1)["workers"])


# Worker names on a cluster with several workers per GPU (wdsembed.gpucluster.SharedGPUCluster). Here, not there,
# so that they are tested where dask-cuda is not installed.
def worker_name(device, round_: int):
    """The Dask name of a GPU's worker in round `round_`: the device itself in round 0, as dask-cuda names it."""
    return device if round_ == 0 else f"{device}#{round_}"


def round_of(name) -> int:
    """The round of a worker named by `worker_name`."""
    return int(name.rsplit("#", 1)[1]) if isinstance(name, str) and "#" in name else 0


def device_of(name):
    """The device of a worker named by `worker_name`, as dask-cuda parsed it (an int, or a GPU's UUID)."""
    if round_of(name) == 0:
        return name
    device = name.rsplit("#", 1)[0]
    return int(device) if device.isdigit() else device


def local_nanny(gpu: bool = False) -> type:
    """The worker class of every local cluster started here: worker processes that leave Ctrl-C to the process that
    started them, which closes the cluster (wdsembed.localworkers); on GPUs, processes that start with the GPU
    settings (localworkers.GPUNanny). Imported when a cluster is, not with this module."""
    from wdsembed.localworkers import GPUNanny, Nanny

    return GPUNanny if gpu else Nanny


def gpu_cluster(gpus: int, workers_per_gpu: int = 1) -> dict:
    """DaskTaskRunner's cluster_class and cluster_kwargs for a local cluster on the first `gpus` visible GPUs, with
    `workers_per_gpu` worker processes on each (wdsembed.gpucluster.SharedGPUCluster where more than one)."""
    kwargs = {
        # Workers that declare their GPU as a resource; each embedding task takes GPU_SHARE_PER_SHARD of it, so a
        # worker's threads hold SHARDS_PER_GPU shards, one in its pipeline at a time.
        "n_workers": gpus * workers_per_gpu,
        "threads_per_worker": SHARDS_PER_GPU,
        "resources": {"GPU": 1},
        "worker_class": local_nanny(gpu=True),
    }
    if workers_per_gpu == 1:
        return {"cluster_class": "dask_cuda.LocalCUDACluster", "cluster_kwargs": kwargs}
    return {"cluster_class": "wdsembed.gpucluster.SharedGPUCluster",
            "cluster_kwargs": kwargs | {"workers_per_gpu": workers_per_gpu}}


def start_gpu_cluster(gpus: int, workers_per_gpu: int = 1, **overrides):
    """A local cluster on `gpus` GPUs as a run's task runner starts it (gpu_cluster), started here, with `overrides`
    on top of its keyword arguments (for a Dask client of one's own: the bench, wdsembed.nemo.get_client)."""
    spec = gpu_cluster(gpus, workers_per_gpu)
    module, name = spec["cluster_class"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**(spec["cluster_kwargs"] | overrides))


def _quiet_dashboard_port_warning() -> None:
    """A local cluster's dashboard takes another port where 8787 is taken (another run, a notebook's cluster), and
    Dask says so with a UserWarning and its traceback-like source line; the run's log already names the dashboard's
    address (prefect-dask's "The Dask dashboard is available at ..."), so the warning adds only noise."""
    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)


def current_client():
    """The Dask client made current in this process (distributed.Client(...), get_client(), `with client:`), if one
    is running; None where there is none."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        client = default_client()
    except ValueError:
        return None
    return client if client.status == "running" else None


def same_scheduler(a: str, b: str) -> bool:
    """Whether two scheduler addresses are one (`127.0.0.1:8786` is `tcp://127.0.0.1:8786`)."""
    from distributed.comm.addressing import normalize_address

    try:
        return normalize_address(a) == normalize_address(b)
    except ValueError:
        return a == b


# The fields that shape a local cluster of the flow run's own (task_runner_kwargs).
LOCAL_CLUSTER_FIELDS = ("n_workers", "workers_per_gpu")


def current_client_for(config: EmbedConfig):
    """The Dask client current in this process (a notebook's `Client(...)`, get_client()) that a flow run runs its
    shards on, as the Python API does, where the run names no scheduler (dask_address, which wins over it); None
    where there is none, or dask_address is set. prefect-dask's task runner takes such a client whatever cluster it
    is told to start: a run that sizes a local cluster of its own (n_workers, workers_per_gpu) beside one ran on the
    current client's workers, its sizes dropped without a word. Such a run is refused (ValueError naming both).

    Called in a task of a Dask worker (a parent flow's task on a Dask task runner), the runner takes that worker's
    client (distributed.get_client) over anything, a dask_address and a client made current included: the run uses
    it as the current client, and one that sizes a cluster or names another scheduler is refused."""
    from wdsembed.config import field_default, setting

    worker = enclosing_dask_worker()
    if worker is not None:
        if config.dask_address and not same_scheduler(worker.scheduler.address, config.dask_address):
            raise ValueError(
                f"{set_to('dask_address', config.dask_address)} names a Dask scheduler, but this run is called in a "
                f"task of a Dask worker of the scheduler at {worker.scheduler.address}, and its shards would run "
                "there instead (prefect-dask's task runner takes that worker's client): call it outside a Dask "
                "task to run on the scheduler it names")
        if config.dask_address:
            return None
        from distributed import get_client

        current, where = get_client(), "this run is called in a task of a Dask worker"
        remedy = "call it outside a Dask task"
    else:
        current, where = current_client(), "a Dask client is current in this process"
        remedy = "close that client (client.close())"
        if current is None or config.dask_address:
            return None
    given = [name for name in LOCAL_CLUSTER_FIELDS if getattr(config, name) != field_default(name)]
    if given:
        raise ValueError(
            f"{' and '.join(set_to(name, getattr(config, name)) for name in given)} "
            f"{'shape' if len(given) > 1 else 'shapes'} a local Dask cluster of the run's own, but {where}, on "
            f"the scheduler at {current.scheduler.address} with {worker_count(current)} worker(s), and the run "
            f"would run on its workers instead: leave {' and '.join(setting(name) for name in given)} unset to run "
            f"on them, or {remedy} for the run to start a cluster of its own")
    return current


def task_runner_kwargs(config: EmbedConfig, current=None) -> dict:
    """Keyword arguments of DaskTaskRunner for this run. `current`: the Dask client current in this process that the
    run runs on (current_client_for), if any: no cluster is started, and no local GPU looked for."""
    if current is not None and not config.dask_address:
        return {"address": current.scheduler.address}
    gpus = visible_gpus() if config.device != "cpu" and not config.dask_address else 0
    if config.workers_per_gpu > 1 and not gpus:
        # said, not refused: the same config may run on a GPU host another time
        logging.getLogger("wdsembed").warning(
            "%s is for a local cluster on GPUs; this run %s, so it has no effect",
            set_to("workers_per_gpu", config.workers_per_gpu),
            "uses the Dask scheduler at " + config.dask_address if config.dask_address else "has no GPU")
    if not config.dask_address:
        _quiet_dashboard_port_warning()
    if config.dask_address:
        if config.n_workers is not None:  # said, as workers_per_gpu is: the scheduler's own workers run the shards
            logging.getLogger("wdsembed").warning(
                "%s sizes a local cluster; this run uses the Dask scheduler at %s and its workers, so it has no "
                "effect", set_to("n_workers", config.n_workers), config.dask_address)
        # No security passed: distributed.Client(address) builds Security() from Dask's configuration
        # (distributed.comm.tls.*, require-encryption), which is where a tls:// address's certificates are set.
        return {"address": config.dask_address}
    if gpus:
        if importlib.util.find_spec("dask_cuda") is None:
            raise RuntimeError("GPUs are visible but dask-cuda is not installed: pip install 'wdsembed[gpu]'")
        return gpu_cluster(min(config.n_workers or gpus, gpus), config.workers_per_gpu)
    n_workers = config.n_workers or default_cpu_workers()
    return {
        "cluster_class": "distributed.LocalCluster",
        "cluster_kwargs": {
            "n_workers": n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "worker_class": local_nanny(),
            "env": cpu_worker_env(n_workers),
        },
    }


# torch's thread counts as the user set them, read before this process starts a Dask worker: each nanny writes Dask's
# own (distributed.nanny.pre-spawn-environ, MKL_NUM_THREADS=1 among them) into this process's environment.
TORCH_THREADS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_USERS_THREADS = {name: os.environ[name] for name in TORCH_THREADS_ENV if os.environ.get(name)}


def default_cpu_workers() -> int:
    """A local CPU cluster's workers where the user gave no number: 2, or 1 where the run may use one core only
    (taskset -c 0, a container's --cpus 1), where two would each load the model to split that core. Counted as
    cpu_worker_env counts (dask.system.cpu_count: CPU affinity and cgroup quota)."""
    from dask.system import cpu_count

    return max(1, min(2, cpu_count()))


def cpu_worker_env(n_workers: int, users: Optional[dict] = None) -> dict:
    """The environment of the worker processes of a local CPU cluster: torch's thread pools split the cores that
    this process may use between the `n_workers` workers. Counted by Dask (dask.system.cpu_count: the CPU affinity,
    as taskset sets it, and a cgroup's CPU quota, as a container's --cpus sets it): os.cpu_count() counts every core
    of the host, and each worker then took more threads than the run had cores. MKL_NUM_THREADS too: Dask's nanny
    sets it to 1 in its workers (distributed.nanny.pre-spawn-environ), and torch takes it over OMP_NUM_THREADS.
    Where the user set either (`users`: those of this process's environment as wdsembed was imported), their number
    stands instead, as it would for torch anywhere else; a value that is no positive whole number ("0", taken for
    automatic) is none: libgomp and torch reject it, and torch then took every core in each worker. DALI's
    decoding threads (num_threads_per_worker) are not taken off torch's share: on the CPU they sit idle nearly all
    the time (about 1.7 ms of CPU per photo decoded and resized, against some 570 ms for ViT-B/16's float32 forward
    and 170 ms for ResNet-50's, on one core), and the share less their count would leave the model one thread of
    four on an 8-core host."""
    from dask.system import cpu_count

    users = _USERS_THREADS if users is None else users
    users = {name: value.strip() for name, value in users.items() if value.strip().isdigit() and int(value) > 0}
    share = users.get("MKL_NUM_THREADS") or users.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // n_workers))
    return {name: users.get(name, share) for name in TORCH_THREADS_ENV}


def refuse_in_a_worker_bootstrap(caller: str) -> None:
    """A worker process of a local cluster imports the script again as it starts: a script without the __main__
    guard calls `caller` there too. No cluster can start there, and the worker would never come up, the script
    waiting for it forever with no word; raising ends the worker, and with it the script's cluster start."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):  # as multiprocessing itself tells it
        raise RuntimeError(
            f"{caller} was called in a worker process of its own cluster, which imports the script again as it "
            "starts. An attempt has been made to start a new process before the current process has finished its "
            'bootstrapping phase: call it under `if __name__ == "__main__":` in the script')


def never() -> bool:
    return False


def task_abandoned() -> Callable[[], bool]:
    """For the Dask task running in this thread: a check that says whether Dask no longer wants its result, for
    the shard loop to call between batches and between a group's shards (wdsembed.shard), ending the task early.
    Dask cannot stop a running task's thread: where the client that submitted it released or cancelled its
    future (a Ctrl-C in the API, its client closed, the flow's process gone), the worker only marks the task
    "cancelled" (distributed's WorkerState: executing -> released), and it ran on, for a group of shards, to be
    refused at its write (the run's claim on OUTPUT released), its worker thread (a GPU) kept from the next run.
    The check reads the worker's own state for the task: no I/O, no message to the scheduler. Only "cancelled"
    counts, or the task no longer known to the worker: "executing" and "resumed" (a cancelled task that the
    scheduler wants again: its result is taken) do not. A worker that is closing counts too: one that lost its
    scheduler closes at once (Worker.handle_scheduler; Dask's workers never reconnect, and a restarted scheduler
    knows none of their tasks), its task's result can go nowhere, and the task ran on until the close gave up
    waiting for it 30 s later and the process ended under it. A worker retiring gracefully (closing_gracefully)
    still hands its results over: not counted. Outside a Dask task: never true. The check's `why()` gives the words
    for a closing worker's task (None for a cancelled one)."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask task
        return never
    key = getattr(thread_state, "key", None)
    tasks = getattr(getattr(worker, "state", None), "tasks", None)
    own = tasks.get(key) if tasks is not None and key is not None else None
    if own is None:
        return never

    from distributed.worker import WORKER_ANY_RUNNING

    def abandoned() -> bool:
        return tasks.get(key) is not own or own.state == "cancelled" or worker.status not in WORKER_ANY_RUNNING

    def why() -> Optional[str]:  # None: the task was cancelled (wdsembed.shard says so in its own words)
        if worker.status not in WORKER_ANY_RUNNING and tasks.get(key) is own and own.state != "cancelled":
            return WORKER_CLOSING
        return None

    abandoned.why = why
    return abandoned


WORKER_CLOSING = ("its Dask worker is closing (it lost its Dask scheduler, which Dask's workers never reconnect to, "
                  "or it was stopped), so nothing can take this task's result")


# The scheduler's metadata of a task key that marks it started (started_before); Dask drops it with the key.
STARTED_MARK = "wdsembed-started"


def started_before() -> bool:
    """On a Dask worker: whether the task running in this thread was started before, on this or another worker
    (one died, or left, under it, and Dask runs it again from its start: no Prefect retry, run_count is 1), its
    earlier run marked in the scheduler's metadata of the task key (which Dask forgets with the key); marks this
    run. Where the scheduler cannot say, True: the caller then looks for what an earlier run may have written.
    Outside a Dask task: False."""
    try:
        from distributed import get_worker
        from distributed.utils import sync
        from distributed.worker import thread_state

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask task
        return False
    key = getattr(thread_state, "key", None)
    if key is None:
        return False

    async def mark() -> bool:
        # Before any of the task's work, and a round trip each: the mark is on the scheduler before a shard is
        # written. One run of a key at a time, so the read and the write need not be one step.
        seen = await worker.scheduler.get_metadata(keys=[key, STARTED_MARK], default=None)
        if seen is None:
            await worker.scheduler.set_metadata(keys=[key, STARTED_MARK], value=True)
        return seen is not None

    try:
        return sync(worker.loop, mark)
    except Exception as exc:  # noqa: BLE001 - unsure: taken as started, the outputs are looked for
        # Nothing for the user to do: a worker closing under Ctrl-C, or a lost scheduler, which its own message says.
        logging.getLogger("wdsembed").debug("could not ask the Dask scheduler whether task %s ran before (%s); its "
                                            "shards' outputs are looked for", key, exc)
        return True


# Workers announce each embedding task's start on this Dask topic (the scheduler keeps a bounded log per topic), so
# that a run can let its first task start alone before it submits the others (flows.embed).
TASK_STARTED_TOPIC = "wdsembed-task-started"


def announce_task_start(run_id: str, stem: str) -> None:
    """On a Dask worker, tell the scheduler, and the clients listening (TaskStarts), that the task of run `run_id`
    whose first shard is `stem` has begun; nothing elsewhere. One message on the worker's open connection: no
    client, no round trip."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask task
        return
    worker.log_event(TASK_STARTED_TOPIC, {"run": run_id, "stem": stem})


class TaskStarts:
    """The task starts that workers announce for run `run_id` (announce_task_start), heard through `client`'s
    subscription to the topic while in the `with` block; `wait` blocks until a given one is heard."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self._heard: set[str] = set()
        self._changed = threading.Condition()

    def __enter__(self) -> "TaskStarts":
        # Sent ahead of any task submitted after it, on the same connection: no start can be missed.
        self.client.subscribe_topic(TASK_STARTED_TOPIC, self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        self.client.unsubscribe_topic(TASK_STARTED_TOPIC)

    def _on_event(self, event) -> None:  # on the client's event loop
        _, msg = event
        if isinstance(msg, dict) and msg.get("run") == self.run_id:
            with self._changed:
                self._heard.add(msg.get("stem"))
                self._changed.notify_all()

    def wait(self, stem: str, timeout: float, done=lambda: False, poll: float = 0.05) -> bool:
        """Whether the task whose first shard is `stem` started within `timeout` seconds; gives up early once
        `done()` (a task that ends without running its body, e.g. from Prefect's cache, announces nothing)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while stem not in self._heard:
                left = deadline - time.monotonic()
                if left <= 0 or done():
                    return False
                self._changed.wait(min(left, poll))
            return True
