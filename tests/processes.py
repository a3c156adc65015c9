"""Services the tests start as processes of their own (a Prefect server, a Dask scheduler and workers), each in a
new session so that stopping it stops everything it started; and calls a test runs beside its own steps, in a thread
(in_a_thread)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent


def start(args: list, log: Path, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([str(a) for a in args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, start_new_session=True)


@contextlib.contextmanager
def killed_if_left(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`proc`, killed (and reaped) on leaving, where a failed step left it running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# In a command's environment: it dumps its threads' stacks to stderr on SIGUSR1 (wdsembed.cli).
DUMP_STACKS = {"WDSEMBED_DUMP_STACKS_ON_SIGUSR1": "1"}


def ended(proc: subprocess.Popen, timeout: float, said: Optional[Callable[[], str]] = None) -> tuple:
    """proc.communicate(timeout=timeout) for a command told to stop (started with DUMP_STACKS); where it is still
    running then, an AssertionError with its threads' stacks, which SIGUSR1 makes it write to its stderr: read from
    its pipe, or with `said()` where stderr goes elsewhere. The caller kills it after."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGUSR1)
    time.sleep(2)
    try:
        out = proc.communicate(timeout=1)[1] or ""
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr or b""
    out = said() if said is not None else out.decode(errors="replace") if isinstance(out, bytes) else out
    stacks = re.search(r"^(Current thread|Thread) 0x", out, re.M)
    raise AssertionError(f"still running {timeout:.0f} s after it was stopped; its stacks:\n"
                         f"{out[stacks.start():][:30000] if stacks else out[-6000:]}")


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


def held_api_run(data: Path, out: Path, folder: Path, hold_s: float, model: str, settings: dict,
                 timeout: float = 240, cluster: bool = False, where: str = "start") -> tuple[subprocess.Popen, Path]:
    """An API run (TimmImageEmbedder(model, **settings)(data, out)) in a process of its own, held `hold_s` seconds
    as its first shard 00000 starts (WDSEMBED_FAULTS hold_s): returns (the process, its log) once it is there, by
    then holding its output's claim. With `cluster`, on the local cluster of get_client(n_workers=1), as a NeMo
    Curator script runs it (its worker process is a child of the run's). `where`: the point of the shard where it
    is held (WDSEMBED_FAULTS "where": "commit", between its kNN view and its table)."""
    import json
    import sys
    import time

    spec = folder / "hold.json"
    spec.write_text(json.dumps({"00000": {"fail_attempts": 0, "hold_s": hold_s, "where": where}}))
    held = Path(f"{spec}.00000.attempts")
    held.unlink(missing_ok=True)
    call = ("from wdsembed import get_client; get_client(n_workers=1, dashboard_address=':0'); " if cluster else "")
    call += (f"from wdsembed.api import TimmImageEmbedder as T; "
            f"r = T({model!r}, **{settings!r})({str(data)!r}, {str(out)!r}); print(len(r), 'shards')")
    log = folder / "held.log"
    # SIGINT's default disposition, as a script run from a terminal has it (the caller may interrupt this run): a
    # test run in the background of a script (`cmd &`, as CI runners may) would pass it on ignored.
    proc = subprocess.Popen([sys.executable, "-c", call], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "WDSEMBED_FAULTS": str(spec), "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not held.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return proc, log


def in_a_thread(call) -> tuple[threading.Thread, dict]:
    """`call()` started in a daemon thread: the thread, and a dict whose "outcome" is what it returned or raised once
    it has ended."""
    ended: dict = {}

    def run() -> None:
        try:
            ended["outcome"] = call()
        except BaseException as exc:  # noqa: BLE001 - what the call ended with is what is checked
            ended["outcome"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, ended
