"""The Prefect settings (and one Dask setting) that this project's entry points default, and why they are set where
they are.

Prefect reads its settings from the environment once per process, when it is first imported: `import prefect`
builds the global settings context (prefect.context.GLOBAL_SETTINGS_CONTEXT, which get_current_settings() returns
outside a temporary_settings block), and importing `prefect.main` (any `from prefect import flow`) runs
setup_logging, which gives PREFECT_LOGGING_EXTRA_LOGGERS their handlers then and there. A variable set after that
changes nothing in this process (checked with Prefect 3.9.1). Processes started later read the environment they
inherit: local Dask workers, the temporary API server (its environment is os.environ at start), flow runs of a
work pool or of deployments/serve.py.

So `set_defaults()` is called, explicitly, where each process begins:
* `python flows/embed.py` and the `wdsembed` command (flows/launch.py): before Prefect's first import, so it
  applies to that process and to everything it starts;
* flows.embed.run (every run, the deployed flow's included): before it starts Dask workers and the temporary API
  server, for callers that imported Prefect first (a deployment's flow-run process, tests, Python callers).
* A deployment's flow-run process is started by Prefect with Prefect already imported: prefect.yaml gives it
  PREFECT_LOGGING_EXTRA_LOGGERS in the work pool's job variables, and deployments/serve.py sets the defaults
  before its flow runs (its subprocesses) start.
This module imports nothing of Prefect; no module sets them on import. `callers_logging_kept` keeps the caller's
logging handlers through that first import (flows.embed imports Prefect within it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

EPHEMERAL_STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DASK_LOGGING = "DASK_DISTRIBUTED__LOGGING"  # distributed.logging: logger name -> level

DEFAULTS = {
    # Without PREFECT_API_URL, a run starts a temporary local server; on a busy 2-core machine that can take
    # longer than its 20 s default.
    EPHEMERAL_STARTUP_TIMEOUT: "120",
    # Its telemetry only logs errors on the offline GPU hosts this often runs on; set it to "true" to send it.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The package's own log lines (a damaged tar, an index rebuilt) go to the run's logs in the UI too; local Dask
    # workers inherit this (workers on other nodes: export it there).
    "PREFECT_LOGGING_EXTRA_LOGGERS": "wdsembed",
    # Those of its lines that come from threads outside a run's context (the command's claim heartbeat, started
    # before its flow run; reading ahead on the workers) have no run to go to; for each, Prefect would print a
    # UserWarning about its own settings. They still reach the terminal and log.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Dask logs every cluster's start and stop at INFO (about forty lines per run: ports, plugins, each connection),
    # through Prefect's console handler. Its warnings and errors still show, and so do the nanny's lines, which say
    # why a worker process died ("exited with status 137": killed, often for memory). Read by Dask, as a Python
    # literal, when `distributed` is first imported, as the variables above are by Prefect.
    DASK_LOGGING: "{'distributed': 'warning', 'distributed.nanny': 'info'}",
}


def set_defaults() -> None:
    """Set each of DEFAULTS in os.environ unless already set (a value the user exported wins)."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def dask_logging_defaults():
    """DASK_LOGGING's levels for this process's own Dask loggers while inside, where Dask read its configuration
    before set_defaults could give it that variable and was given no logging setting of the caller's. A Python
    caller (a notebook) imports flows.embed, which imports Prefect, then `distributed`: Dask set its own default,
    INFO, with no handler of its own, so each run's local scheduler and cluster printed some twenty lines through
    Prefect's console handler. Worker processes read the variable as they start. Levels the caller set are left
    as they are, and every level is back as it was after."""
    import ast
    import dask

    wanted = ast.literal_eval(DEFAULTS[DASK_LOGGING])
    loggers = {name: logging.getLogger(name) for name in wanted}
    told = dask.config.get("distributed.logging", None) is not None or dask.config.get("logging", None) is not None
    if told or "distributed" not in sys.modules or loggers["distributed"].level != logging.INFO:
        yield
        return
    before = {name: logger.level for name, logger in loggers.items()}
    for name, level in wanted.items():
        loggers[name].setLevel(level.upper())
    try:
        yield
    finally:
        for name, level in before.items():
            loggers[name].setLevel(level)


@contextlib.contextmanager
def callers_logging_kept():
    """Around Prefect's first import in this process (prefect.main runs its setup_logging): the caller's logging
    handlers as they were. Prefect applies its configuration with logging.config.dictConfig, which closes every
    handler of the process (a FileHandler opened with mode "w" wrote nothing more after it, a MemoryHandler lost its
    target), and replaces the root logger's handlers and level unless one of them has a formatter: one added
    without, as `logging.FileHandler(path)` is, was dropped from the root. Here the handlers that exist are kept
    out of dictConfig's reach (logging._handlerList, the list it closes), and a root logger that had handlers of the
    caller's gets them and its level back, as Prefect leaves a root whose handlers have formatters: its own console
    handler is not added there. A test runner's capture handlers are not the caller's (Prefect's own rule): where
    the root has only those, Prefect's handler joins them as before. The caller's named handlers (dictConfig's)
    keep their names too (logging._handlers, which dictConfig empties): an incremental dictConfig of the caller's,
    or logging.getHandlerByName, finds them after. These are the internals logging.config's dictConfig itself works
    on (3.11 to 3.13). Nothing to do once Prefect was imported."""
    if "prefect.main" in sys.modules:
        yield
        return
    lock, handler_list, named = logging._lock, logging._handlerList, logging._handlers
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with lock:
        existing, names = handler_list[:], dict(named)
        del handler_list[:]
    try:
        yield
    finally:
        with lock:
            handler_list[:0] = existing
            for name, handler in names.items():
                named.setdefault(name, handler)  # Prefect's own, of the same name, keeps it
        if any(_callers(h) for h in handlers) and root.handlers != handlers:
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)


def _callers(handler: logging.Handler) -> bool:
    """Whether a handler is the caller's, not a test runner's capture (pytest's LogCaptureHandler, and its own
    handlers named with a leading underscore), as Prefect's setup_logging tells them apart."""
    name = type(handler).__name__
    return not name.startswith("_") and name != "LogCaptureHandler"
