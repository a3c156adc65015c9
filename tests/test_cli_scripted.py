"""The command as scripts and schedulers drive it (bash `set -e`, cron, Airflow's BashOperator, `timeout`): its exit
codes, what it says on stdout and stderr when they are files or pipes, and what it leaves behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WDSEMBED_", "DASK_"))}
    return env | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
                  "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_during_the_checks_ends_in_one_line_and_leaves_nothing(signum, tmp_path):
    """A stop signal while the command runs its checks (seconds: torch's import, the model's build, the footers
    read; here held on a --dask-address that accepts but never answers). SIGTERM (`timeout`, Airflow's kill) and
    SIGHUP killed it outright, with no word, and its temporary Prefect API server's process, still loading, ran on
    holding the command's stderr (a pipe read to its end waited for it), then wrote a BrokenPipeError traceback
    there; Ctrl-C ended on a KeyboardInterrupt traceback. Now each ends as mid-run: its own exit code (128 + the
    signal), one line saying nothing was written, no traceback, and no process of it left."""
    import psutil

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    write_shard(tmp_path / "in", "00000", from_encoded(synthetic_images(2, formats=("jpeg",))))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(300)
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.command", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model",
             TINY_MODEL, "--no-pretrained", "--device", "cpu", "--dask-address",
             f"tcp://127.0.0.1:{listener.getsockname()[1]}"],
            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            connection, _ = listener.accept()  # the checks' probe of the scheduler: the command is in its checks
            started = psutil.Process(proc.pid).children(recursive=True)
            assert started, "the temporary API server's process was not started"
            proc.send_signal(signum)
            stdout, stderr = proc.communicate(timeout=120)  # to the end of its pipes, whoever holds them
            connection.close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    said = stdout + stderr
    assert proc.returncode == 128 + signum, said[-4000:]
    assert "Traceback" not in said, said[-4000:]
    assert stderr.strip().splitlines()[-1] == (
        f"run interrupted{'' if signum == signal.SIGINT else ' by ' + signum.name} before any work (during its "
        "checks): nothing was written; run the same command again"), said[-4000:]
    assert not [p for p in started if _alive(p)]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_command_killed_during_its_checks_leaves_no_traceback_from_its_api_server(tmp_path):
    """SIGKILL (the OOM killer; `timeout -s KILL`, Airflow's and systemd's kill after their grace period) while the
    command runs its checks, its temporary Prefect API server's process still loading. That process went on loading,
    holding the stderr the command shared with it, then wrote a BrokenPipeError traceback there as it found its
    command gone. Now it watches for that from its start, and ends without a word."""
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    write_shard(tmp_path / "in", "00000", from_encoded(synthetic_images(2, formats=("jpeg",))))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(300)
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.command", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model",
             TINY_MODEL, "--no-pretrained", "--device", "cpu", "--dask-address",
             f"tcp://127.0.0.1:{listener.getsockname()[1]}"],
            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            connection, _ = listener.accept()
            proc.kill()
            stdout, stderr = proc.communicate(timeout=120)  # to the end of its pipes: the server's process holds them
            connection.close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert stdout + stderr == "", (stdout + stderr)[-4000:]
