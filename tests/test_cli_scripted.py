"""The command as scripts and schedulers drive it (bash `set -e`, cron, Airflow's BashOperator, `timeout`): its exit
codes, what it says on stdout and stderr when they are files or pipes, and what it leaves behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
            start_new_session=True,
            # Ctrl-C's default, as in a terminal: a test run started in the background (CI's shell) passes its
            # children SIGINT ignored, and Python then installs no KeyboardInterrupt for it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# The real command (flows.command.main), held once its run has ended: in its summary, or at its exit before the
# temporary API server is stopped (an atexit hook registered after the server's runs first). The hold ends once the
# test has sent its signal (the file `go`).
def _signalled_at_its_hold(tmp_path: Path, driver: str, env: dict, signum: int, code: int, at_hold):
    """The command run by `driver` (which holds it at one point of its end, writing the file HELD, until the file GO
    exists) over a good shard, and a shard that is an HTML page saved as .tar where `code` is 1; `signum` sent to it
    at the hold, once `at_hold(proc)` has looked at it. Checks that the run's result stood: exit `code`, no
    traceback, one line saying the signal came after the end, the manifest written. Its stdout, stderr and what
    `at_hold` gave."""
    import json

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    write_shard(tmp_path / "in", "00000", from_encoded(synthetic_images(2, formats=("jpeg",))))
    if code:
        (tmp_path / "in" / "00001.tar").write_bytes(b"<!DOCTYPE html><html>404</html>")
    held, go, out = tmp_path / "held", tmp_path / "go", tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, str(tmp_path / "in"), "-o", str(out), "--model", TINY_MODEL,
         "--no-pretrained", "--device", "cpu", "--n-workers", "1", "--fidelity-sample", "0"],
        cwd=tmp_path, env=_env(tmp_path) | {"HELD": str(held), "GO": str(go)} | env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C's default, as in a terminal
    try:
        while not held.exists():
            assert proc.poll() is None, (proc.stdout.read() + proc.stderr.read())[-4000:]
            time.sleep(0.1)  # polling the hold's file, which says where the command is
        seen = at_hold(proc)
        proc.send_signal(signum)
        go.touch()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = stdout + stderr
    assert proc.returncode == code, said[-4000:]
    assert "Traceback" not in said and "run interrupted" not in said, said[-4000:]
    late = [line for line in stderr.splitlines() if "came after the run had ended" in line]
    assert late == [f"{signal.Signals(signum).name} came after the run had ended: nothing was stopped, the command "
                    "ends with the run's result"], said[-4000:]
    assert json.loads((out / "_manifest.json").read_text())["shards"].keys() == {"00000"}
    return stdout, stderr, seen


HELD_AFTER_THE_RUN = """
import atexit, os, sys, time
from pathlib import Path
from flows import command
from wdsembed import cli

held, go, where = Path(os.environ["HELD"]), Path(os.environ["GO"]), os.environ["WHERE"]

def hold():
    held.touch()
    while not go.exists():
        time.sleep(0.05)

if where == "summary":
    summary = cli.print_summary
    cli.print_summary = lambda manifest: (hold(), summary(manifest))
else:
    run_flow = command.run_flow
    command.run_flow = lambda config, **options: (run_flow(config, **options), atexit.register(hold))[0]
sys.argv = ["wdsembed", *sys.argv[1:]]
sys.exit(command.main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("where, signum, code", [("summary", signal.SIGTERM, 1), ("exit", signal.SIGTERM, 0),
                                                 ("exit", signal.SIGHUP, 0), ("summary", signal.SIGINT, 1),
                                                 ("exit", signal.SIGINT, 0)],
                         ids=["summary-SIGTERM", "exit-SIGTERM", "exit-SIGHUP", "summary-SIGINT", "exit-SIGINT"])
def test_a_stop_signal_after_the_run_ended_leaves_its_result(where, signum, code, tmp_path):
    """SIGTERM, SIGHUP or Ctrl-C once the run has ended, its outputs and manifest written: while its summary prints,
    or as the process exits and stops its temporary API server. SIGTERM and SIGHUP killed the command with the
    default action: exit 143 (129) and no word, for a run that had completed; Ctrl-C ended it on a KeyboardInterrupt
    traceback. Now the command ends with the run's own code (1 here where a shard is an HTML page saved as .tar, else
    0), one line saying the signal came after the end, no traceback, and its API server stopped."""
    import psutil

    stdout, stderr, started = _signalled_at_its_hold(
        tmp_path, HELD_AFTER_THE_RUN, {"WHERE": where}, signum, code,
        lambda proc: psutil.Process(proc.pid).children(recursive=True))
    assert started, "the temporary API server's process is not running"
    assert "output: " in stdout, (stdout + stderr)[-4000:]  # the summary printed to its end
    _, alive = psutil.wait_procs(started, timeout=15)  # the resource tracker ends on its own, after the command
    assert not [(p.pid, p.cmdline()) for p in alive if _alive(p)]


# The real command, held in its flow once the manifest is written, as its local Dask cluster closes: each nanny's
# kill of its worker process waits for the file `go`, then runs, and leaves a file `closed-<pid>` once it has.
HELD_IN_THE_CLUSTER_CLOSE = """
import os, sys, time, asyncio
from pathlib import Path
from flows import command
from wdsembed import localworkers

held, go = Path(os.environ["HELD"]), Path(os.environ["GO"])
kill = localworkers.Nanny.kill

async def held_kill(self, *args, **kwargs):
    held.touch()
    while not go.exists():
        await asyncio.sleep(0.05)
    pid = self.pid
    await kill(self, *args, **kwargs)
    (held.parent / f"closed-{pid}").touch()

localworkers.Nanny.kill = held_kill
sys.argv = ["wdsembed", *sys.argv[1:]]
sys.exit(command.main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGHUP, 0)],
                         ids=["SIGTERM", "SIGTERM-failed-shard", "SIGHUP"])
def test_a_stop_signal_as_the_cluster_closes_after_the_manifest_leaves_the_result(signum, code, tmp_path):
    """SIGTERM or SIGHUP inside the flow once its manifest is written, while its Dask cluster closes (seconds on a
    loaded machine). The run ended as "run interrupted by SIGTERM", exit 143, though every output and the manifest
    were written. Now the run's result stands (0, or 1 where a shard is an HTML page saved as .tar), one line says
    the signal came after the run had ended, no traceback, and the cluster's close still ran to its end."""
    stdout, stderr, _ = _signalled_at_its_hold(
        tmp_path, HELD_IN_THE_CLUSTER_CLOSE, {}, signum, code,
        lambda proc: (tmp_path / "out" / "_manifest.json").exists() or pytest.fail("no manifest before the close"))
    said = stdout + stderr
    assert "output: " in stdout, said[-4000:]  # the summary printed
    assert list(tmp_path.glob("closed-*")), said[-4000:]  # the nanny's kill of its worker ran to its end
