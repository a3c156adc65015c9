"""Services the tests start as processes of their own (a Prefect server, a Dask scheduler and workers), each in a
new session so that stopping it stops everything it started."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(args: list, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(a) for a in args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def scheduler_address(proc: subprocess.Popen, scheduler_file: Path, log: Path, timeout: float = 60) -> str:
    """The address a `dask scheduler --scheduler-file` process writes, once it has; fails with its log if it dies
    or takes longer than `timeout`."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while not scheduler_file.exists():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
        time.sleep(0.2)
    return json.loads(scheduler_file.read_text())["address"]
