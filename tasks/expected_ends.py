"""A run's expected ends in Prefect's logs: one line each, without the traceback.

Prefect's engines log the exception that ends a flow run or a task run with its traceback ("Encountered exception
during execution: ...", "Task run failed with exception: ...", "An error was encountered while committing
transaction ...": a task's cached result not written). For the ends that a run expects and says itself, the line
stays and the traceback goes, on the terminal and in the UI alike: shards failed, the fidelity check below its
threshold, the manifest not written, each said in the run's summary (the reasons by cause); a deployed run refused
by its checks or by another run holding OUTPUT, whose line says what to change; a full disk (or a
read-only one), whose one line names the file and what to do; and an HTTP 500 of the run's own server once it has
said its database cannot be written (the command's closing line says so). Any other exception keeps its traceback.

Installed in the flow's process by flows.embed.run and in each Dask worker by importing `tasks.embed` (the one hook a
worker runs before Prefect's task engine), on Prefect's run loggers: Prefect adds its own filters to them.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from wdsembed import faults, fidelity
from wdsembed.cluster import WorkersCannotRunError
from wdsembed.outputclaim import OutputClaimedError
from wdsembed.report import ManifestNotWritten
from wdsembed.shard import ShardAbandoned, ShardsFailed

# WorkersCannotRunError: said whole by the command's "run failed: ..." line (what the workers lack, what to do).
# ShardAbandoned: said whole on the worker's log; its run is gone. OutputClaimedError: its one line names the run
# that holds OUTPUT and what to do.
_SAID_IN_THE_SUMMARY = (ShardsFailed, fidelity.FidelityError, ManifestNotWritten, WorkersCannotRunError,
                        ShardAbandoned, OutputClaimedError)
_REFUSED = "_wdsembed_refused"  # the mark of refused()


def refused(exc: BaseException) -> BaseException:
    """Mark `exc` a refusal of the run's checks (plan.check_config: a missing folder, an unknown model, ...), whose
    message says whole what to change: the line that the flow run ended on it stays, its traceback (Prefect's
    engine, then the checks) goes, as the command prints such a refusal in one line. Returns `exc`, to raise."""
    setattr(exc, _REFUSED, True)
    return exc


# The run's own Prefect server's word on why it cannot record the run (its database cannot be written), or None:
# flows.apiserver.trouble, given by flows.embed.run. None on the Dask workers, which have no server of their own.
_server_trouble: Optional[Callable[[], Optional[str]]] = None


def _server_cannot_record(exc: Optional[BaseException]) -> bool:
    """`exc` is an HTTP 5xx of the run's own server, which has said why (its database cannot be written): the
    command's closing line says that, and the client-side traceback names only the 500."""
    from prefect.exceptions import PrefectHTTPStatusError

    if not isinstance(exc, PrefectHTTPStatusError) or exc.response.status_code < 500 or _server_trouble is None:
        return False
    if _server_trouble() is None:
        return False
    quiet_failed_log_sends()
    return True


def quiet_failed_log_sends() -> None:
    """Once the run's own server has said it cannot record the run: Prefect's log worker sends the lines queued
    for the API still, and printed each failed batch as '--- Error logging to API ---' and the 500 (it prints only
    while logging.raiseExceptions). The server cannot store them, and the command's closing line says why."""
    logging.raiseExceptions = False


class ExpectedEndWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (isinstance(exc, _SAID_IN_THE_SUMMARY) or getattr(exc, _REFUSED, False) or faults.is_disk_full(exc)
                or _server_cannot_record(exc)):
            said = record.getMessage()
            if str(exc) not in said and repr(exc) not in said:  # the traceback was the only place naming it
                record.msg, record.args = f"{said}: {type(exc).__name__}: {exc}", ()
            record.exc_info, record.exc_text = None, None
        return True


class TaskRunEndAlreadySaid(logging.Filter):
    """Drops Prefect's line of a task run's end where the run has said it already: 'Finished in state
    Completed()' (or 'Cached(...)') of this flow's task runs, since each shard's embedding says its own line, the
    planning says how many shards were found finished, and the summary lists every shard (the task run's state
    shows in the UI); and the ERROR 'Finished in state Failed("... ShardAbandoned: ...")' of a task its interrupted
    run no longer wants, whose worker has said the same words as a warning. Any other failed task run keeps its
    line (the reason)."""

    TASKS = frozenset({"embed-shards", "index-shards", "report"})

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_name", None) not in self.TASKS:
            return True
        said = str(record.msg)
        if record.levelno == logging.INFO:
            return not said.startswith(("Finished in state Completed(", "Finished in state Cached("))
        return not (said.startswith("Finished in state Failed(") and f"{ShardAbandoned.__name__}: " in said)


class SignalledEndNotACrash(logging.Filter):
    """Drops Prefect's ERROR 'Crash detected! Execution was aborted by an interrupt signal.' (or a termination
    signal) of this flow's run: the user stopped it (Ctrl-C, kill), the line after it says the run ended Crashed for
    that reason, and the command's closing line says where the finished shards are. A crash of any other cause keeps
    its line."""

    SIGNALLED = ("Crash detected! Execution was aborted by an interrupt signal.",
                 "Crash detected! Execution was aborted by a termination signal.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR and getattr(record, "flow_name", None) == "embed-shards"
                    and record.msg in self.SIGNALLED)


def log_expected_ends_without_traceback(server_trouble: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Once per process; idempotent. Also leaves out the task runs' ends said already (TaskRunEndAlreadySaid) and
    a stopped run's 'Crash detected!' (SignalledEndNotACrash). `server_trouble`: the run's own Prefect server's
    word on why it cannot record the run, or None (flows.apiserver.trouble)."""
    global _server_trouble
    if server_trouble is not None:
        _server_trouble = server_trouble
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedEndWithoutTraceback) for f in logger.filters):
            logger.addFilter(ExpectedEndWithoutTraceback())
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, TaskRunEndAlreadySaid) for f in task_runs.filters):
        task_runs.addFilter(TaskRunEndAlreadySaid())
    flow_runs = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, SignalledEndNotACrash) for f in flow_runs.filters):
        flow_runs.addFilter(SignalledEndNotACrash())
