"""Worker processes of the Dask clusters that wdsembed starts on this machine, which leave Ctrl-C and a hangup to the
process that started them.

A terminal sends Ctrl-C's SIGINT to its whole foreground process group: to the command, and to the worker processes
that its local cluster spawned. A worker that got it closed itself, and one that was idle ended on a KeyboardInterrupt
traceback of its own, printed among the command's lines (cli.main prints one: where the finished shards are; exit
130), while the command, which got the same signal, closes the cluster anyway. These workers ignore SIGINT: the
command alone handles it, and closes its cluster, whose nannies stop the workers (one still busy with a shard is
killed 4 s after it is asked to close, distributed's Nanny.kill, and said in one line: Nanny.kill). Outputs stay
whole or absent, as for any stop.

A hangup (an ssh session dropped, a terminal closed, with the command started without nohup or tmux) sends SIGHUP
to the whole group likewise (the shell passes it on to its jobs), whose default ended each worker on the spot, a
shard mid-way, while the command closed its cluster (cli: it takes SIGHUP as it takes Ctrl-C). These workers
ignore SIGHUP too, for the same reason; a worker whose starting process is killed outright still ends with it
(distributed's worker process watches its parent).

Two steps, so that no moment is left uncovered while a worker process starts (seconds: it imports the run's
modules again):
* Nanny (in the starting process) spawns each worker process from a thread that blocks these signals, a mask the
  new process inherits: a Ctrl-C or a hangup during its start is held pending, not delivered;
* dask_setup (a worker preload, in the worker process) ignores them, which discards one pending, and lets them
  through again.

A worker started any other way (`dask worker`, another program's cluster) is not touched: only a cluster given this
Nanny as its worker class (wdsembed.cluster) loads the preload.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from typing import Optional

import dask
import distributed
from distributed.core import Status

PRELOAD = __name__
logger = logging.getLogger(__name__)
# The signals that a terminal sends to its whole foreground process group, which the starting process handles alone.
LEFT_TO_THE_STARTER = {getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name)}


class Nanny(distributed.Nanny):
    """distributed.Nanny whose worker process ignores LEFT_TO_THE_STARTER from its birth (see the module)."""

    def __init__(self, *args, preload=None, preload_argv=None, **kwargs):
        # Taken now for kill(): a cluster left open closes as the interpreter exits, too late to import faults then
        # (it registers an atexit hook): that failed the nanny's close with distributed's tracebacks.
        from wdsembed.faults import worker_close_timeout

        self._worker_close_timeout = worker_close_timeout
        preload, preload_argv = with_this_preload(preload, preload_argv)
        super().__init__(*args, preload=preload, preload_argv=preload_argv, **kwargs)

    async def instantiate(self):
        _hold_signals_in_this_thread()
        status = await super().instantiate()
        if self.worker_address:
            _record_exit(self.worker_address, None)
        return status

    def _on_worker_exit_sync(self, exitcode):
        # Called as the process is reaped, its address still the dead worker's (a restart gives it another).
        if self.worker_address:
            _record_exit(self.worker_address, exitcode)
        super()._on_worker_exit_sync(exitcode)

    async def kill(self, timeout: float = 5, reason: str = "nanny-kill") -> None:
        """distributed's, with what it says of a worker process it kills as the nanny closes said in one line of
        ours. Such a process was still busy `timeout` * 0.8 s after it was asked to close (4 s of distributed's 5):
        its Dask worker's close waits for its task, and that task for the batch in its model, which torch cannot
        interrupt (a large model or batch on CPU takes longer). distributed then warns "Worker process still alive
        after 4.0 seconds, killing" and says "Worker process N was killed by signal 9", which reads as a crash or
        the OOM killer; after a Ctrl-C it is how a busy worker ends, its shard left unwritten (outputs are whole or
        absent). Where the killed process is not yet reaped when `timeout` is up (4.4-4.8 s of 5 on a loaded
        machine), that is said instead of raising TimeoutError: that error went up through the cluster's close and
        replaced the run's own end (a Ctrl-C or SIGTERM became "run failed: " with no reason). The process has had
        SIGKILL; it ends on its own."""
        pid, timeout = self.pid, self._worker_close_timeout(timeout)
        closing = self.status == Status.closing  # not a restart: distributed's own handling there
        killing = _Killing(pid) if closing else None
        token = _KILLING.set(killing)
        try:
            await super().kill(timeout=timeout, reason=reason)
        except asyncio.TimeoutError:
            if not closing:
                raise
            logger.warning("Dask worker process %s was killed but had not ended %.1f s after it was asked to close; "
                           "the cluster closes without waiting for it", pid, timeout)
            # Reaped later (at the latest by multiprocessing as the command exits), distributed then says its exit
            # status "was already read": a line after the run's closing one that adds nothing to the line above.
            logging.getLogger("distributed.process").addFilter(_AlreadyReaped(pid))
            return
        finally:
            _KILLING.reset(token)
        if killing is not None and killing.killed:
            logger.warning("Dask worker process %s was still busy %.1f s after it was asked to close (a batch in its "
                           "model, a read, or its own shutdown) and was killed; outputs are whole or absent: a "
                           "shard it had not finished is computed again by the next run", pid, timeout * 0.8)


# The close of this nanny's worker process that distributed's WorkerProcess.kill runs in this asyncio task, if any.
_KILLING: "contextvars.ContextVar[Optional[_Killing]]" = contextvars.ContextVar("wdsembed_killing", default=None)


class _Killing:
    """A closing nanny's kill of its worker process `pid`, told whether distributed had to SIGKILL it."""

    def __init__(self, pid) -> None:
        self.pid = pid
        self.killed = False


class _SaidByTheNanny(logging.Filter):
    """Drops distributed's lines of a worker process that a closing nanny of ours killed (Nanny.kill says it in
    one line of its own): "Worker process still alive after S seconds, killing", logged in the kill's own task,
    and then "Worker process N was killed by signal 9", logged as the process is reaped."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: "collections.deque[str]" = collections.deque(maxlen=64)  # those second lines, to drop

    def filter(self, record: logging.LogRecord) -> bool:
        said = record.getMessage()
        killing = _KILLING.get()
        if killing is not None and said.startswith("Worker process still alive after "):
            killing.killed = True
            self.killed.append(f"Worker process {killing.pid} was killed by signal {int(signal.SIGKILL)}")
            return False
        return said not in self.killed


if not any(isinstance(f, _SaidByTheNanny) for f in logging.getLogger("distributed.nanny").filters):
    logging.getLogger("distributed.nanny").addFilter(_SaidByTheNanny())


class GPUNanny(Nanny):
    """The Nanny of a local GPU cluster's worker (wdsembed.cluster.gpu_cluster): its worker process starts with the
    GPU settings its environment lacks (wdsembed.worker.gpu_process_environment), given to that process alone
    (distributed's `env`, applied in it before any preload), never written into this one: a notebook that runs the
    API and then uses torch keeps its own CUDA and allocator settings. dask-cuda's preload creates the worker's CUDA
    context as it starts, and CUDA reads CUDA_DEVICE_MAX_CONNECTIONS only then. Nothing set is overridden: this
    process's variables, Dask's distributed.nanny.environ, the cluster's own (CUDA_VISIBLE_DEVICES)."""

    def __init__(self, *args, **kwargs):
        from wdsembed.worker import gpu_process_environment

        super().__init__(*args, **kwargs)
        # The worker's environment: this process's, updated with self.env (distributed's Nanny._run).
        self.env = {**gpu_process_environment({**os.environ, **self.env}), **self.env}


# How the worker processes of this process's nannies ended, by worker address: None while one runs. The scheduler
# knows only that a worker left; the nanny, here, has its process's exit code (distributed logs it at INFO, "Worker
# process N exited with status 137", where a run's user does not look). Bounded: the latest workers only.
_EXITS: "collections.OrderedDict[str, Optional[int]]" = collections.OrderedDict()
_EXITS_KEPT = 4096
_EXITS_CHANGED = threading.Condition()


def _record_exit(address: str, exitcode: Optional[int]) -> None:
    with _EXITS_CHANGED:
        _EXITS[address] = exitcode
        _EXITS.move_to_end(address)
        while len(_EXITS) > _EXITS_KEPT:
            _EXITS.popitem(last=False)
        _EXITS_CHANGED.notify_all()


def exit_code(address: Optional[str], wait_s: float = 0.0) -> Optional[int]:
    """The exit code of the process of the worker at `address`, where a nanny of this process started it and saw it
    end, waiting up to `wait_s` for it (Dask may say the worker is gone a moment before its nanny has reaped the
    process); None otherwise (another cluster's worker, or one still running)."""
    deadline = time.monotonic() + wait_s
    with _EXITS_CHANGED:
        while address in _EXITS and _EXITS[address] is None and time.monotonic() < deadline:
            _EXITS_CHANGED.wait(deadline - time.monotonic())
        return _EXITS.get(address)


class _AlreadyReaped(logging.Filter):
    """Drops distributed's 'process PID exit status was already read' for one worker process said killed."""

    def __init__(self, pid) -> None:
        super().__init__()
        self.said = f"process {pid!r} exit status was already read"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.said not in record.getMessage()


def with_this_preload(preload, preload_argv) -> tuple[list, list]:
    """A worker's preloads and their arguments as distributed.Nanny takes them (None: the configured ones,
    distributed.worker.preload and preload-argv), with this module's after them."""
    preload = dask.config.get("distributed.worker.preload") if preload is None else preload
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.worker.preload-argv") if preload_argv is None else preload_argv
    argv = list(argv or [])
    if PRELOAD not in preload:
        preload.append(PRELOAD)
        if argv and not isinstance(argv[0], str):  # one list of arguments per preload: none for this one
            argv.append([])
        # else: one list shared by every preload, or none; dask_setup below takes no arguments
    return preload, argv


def _hold_signals_in_this_thread() -> None:
    """Block LEFT_TO_THE_STARTER in the thread that runs the nanny, unless it is the main thread: the threads that
    it then creates inherit the mask (distributed's AsyncProcess starts the worker process from one of them), and so
    does the worker process. Python runs signal handlers in the main thread only, so nothing else in this process
    changes: the kernel delivers these signals to a thread that does not block them. Not on the main thread, whose
    Ctrl-C would wait (a nanny of a cluster started with asynchronous=True in the main thread's event loop): there only
    the preload protects the worker, once it runs."""
    if threading.current_thread() is threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return
    # The worker's queues start multiprocessing's resource tracker the first time, and its launch unblocks SIGINT in
    # the launching thread (it blocks the signal for its own process, then unblocks rather than restores): started
    # first, it is left running, and the mask below stays. It ignores SIGINT itself, not SIGHUP: launched with
    # SIGHUP blocked, it keeps it blocked for good. A hangup killed it, and the one relaunched printed a warning and
    # a traceback for every resource it did not know as the workers ended.
    from multiprocessing import resource_tracker

    signal.pthread_sigmask(signal.SIG_BLOCK, LEFT_TO_THE_STARTER)
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, LEFT_TO_THE_STARTER)


def dask_setup(worker) -> None:
    """The preload, in the worker process as its Worker starts: ignore LEFT_TO_THE_STARTER (a pending one is
    discarded), then unblock them; and distributed's lines from the worker's close go (_QuietOnceClosing). Nothing
    in a worker that runs in the starting process itself (processes=False), whose Ctrl-C and hangup must stay."""
    if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return
    for signum in LEFT_TO_THE_STARTER:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LEFT_TO_THE_STARTER)
    quiet = _QuietOnceClosing(worker)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (name == "distributed" or name.startswith("distributed.")) and isinstance(logger, logging.Logger):
            logger.addFilter(quiet)


class _QuietOnceClosing(logging.Filter):
    """Nothing below CRITICAL from distributed once this process's worker is closing. Its nanny closes it when the
    run ends, and when a Ctrl-C stopped the run while it still ran a shard, its close logs what that leaves undone:
    a warning per task cancelled ("Async instruction for <Task cancelled ...> ended with CancelledError"), an error
    with a traceback for a heartbeat in flight that finds the scheduler gone, each printed among the command's lines.
    The command has said where the finished shards are; the nanny, in the command's process, still says when a
    worker had to be killed. What a worker logs before its close begins (why it closes) is kept."""

    def __init__(self, worker):
        super().__init__()
        self.worker = weakref.ref(worker)

    def filter(self, record: logging.LogRecord) -> bool:
        worker = self.worker()
        return record.levelno >= logging.CRITICAL or (worker is not None and worker.status not in _CLOSING)


_CLOSING = (Status.closing, Status.closed)
