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
