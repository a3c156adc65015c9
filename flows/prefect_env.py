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
This module imports nothing of Prefect; no module sets them on import.
"""
from __future__ import annotations

import os

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
    # Those of its lines that come from threads outside a run's context (the claim's heartbeat, reading ahead) have
    # no run to go to; for each, Prefect would print a UserWarning about its own settings. They still reach the
    # terminal and log.
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
