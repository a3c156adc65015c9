"""Runs of the `wdsembed` command on a long-lived Dask cluster (`--dask-address`: a scheduler and two worker
processes started here, which outlive every run), each run without PREFECT_API_URL, so with a temporary Prefect API
server of its own: each run's task runs and their logs must reach its own API, whatever runs came before it on
those workers, or run beside it.

Each run is a process of its own (the command, then a look at its API before the process, and the server with it,
ends), with its own Prefect home (database), so whatever one API holds was sent to it. Small on purpose (2 shared
cores): 3 shards of 4 images, the tiny timm test model with random weights, one single-threaded CPU worker each.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from processes import scheduler_address, start as start_process, stop as stop_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEMS = ["00000", "00001", "00002"]

# The command, then its flow run's task runs and their logs, read from the API the run used (its temporary server,
# still up until this process exits), once the embedding task runs are final or a minute has passed.
RUN_AND_READ = '''
import json, sys, time
from flows.command import main

code = main(sys.argv[1:])
from flows import apiserver
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

url = apiserver.api_url()
deadline = time.monotonic() + 60
with temporary_settings(updates={PREFECT_API_URL: url}):
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs()
            embeds = [r for r in runs if r.name.startswith("embed-")]
            if (len(embeds) >= 3 and all(r.state and r.state.is_final() for r in embeds)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        flow_runs = client.read_flow_runs()
        logs = client.read_logs()
ids = {str(r.id): r.name for r in embeds}
print(json.dumps({"code": code, "api": url, "flow_runs": len(flow_runs),
                  "embed_runs": sorted([r.name, r.state.name if r.state else None] for r in embeds),
                  "shard_logs": sorted(ids[str(l.task_run_id)] for l in logs
                                       if str(l.task_run_id) in ids and l.message.startswith("shard "))}))
'''


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker` processes on loopback, up for the module's runs, started in a folder
    of their own (as on a cluster, not the command's); their address, logs and that folder."""
    from distributed import Client

    root = tmp_path_factory.mktemp("shared-cluster")
    env = _env(root / "workers-prefect")
    workdir = root / "workers-cwd"
    workdir.mkdir()
    scheduler_file = root / "scheduler.json"
    procs = [start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", scheduler_file], root / "scheduler.log", env, cwd=workdir)]
    logs = [root / f"worker{i}.log" for i in range(2)]
    try:
        address = scheduler_address(procs[0], scheduler_file, root / "scheduler.log")
        for i, log in enumerate(logs):
            procs.append(start_process([BIN / "dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                                        "--no-dashboard", "--name", f"node{i}"], log, env, cwd=workdir))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, logs, workdir
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def _env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "WDSEMBED_FAULTS"}
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                  "PREFECT_HOME": str(prefect_home)}


def _data(folder: Path) -> Path:
    from wdsembed.synthetic import write_demo_dataset

    if not folder.exists():
        write_demo_dataset(folder, n_shards=len(STEMS), per_shard=4, failed_per_shard=1)
    return folder


def _start_run(root: Path, name: str, address: str, *, relative: bool = False) -> subprocess.Popen:
    """The command in `root`, on the shards of in-<name>, into out-<name>: both named by their absolute paths, or
    relative to `root` (`relative`)."""
    script = root / "run_and_read.py"
    script.write_text(RUN_AND_READ)
    data, out = _data(root / f"in-{name}"), root / f"out-{name}"
    if relative:
        data, out = data.relative_to(root), out.relative_to(root)
    argv = [sys.executable, script, data, "-o", out, "--model", TINY_MODEL,
            "--no-pretrained", "--device", "cpu", "--num-threads", "1", "--batch-size", "4", "--dask-address", address]
    return subprocess.Popen([str(a) for a in argv], cwd=root, env=_env(root / f"prefect-{name}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(run: subprocess.Popen) -> dict:
    try:
        stdout, stderr = run.communicate(timeout=420)
    finally:
        run.kill()
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    seen = json.loads(stdout.strip().splitlines()[-1])
    assert seen["code"] == 0, stderr[-3000:]
    return seen


def _assert_own_task_runs(seen: dict) -> None:
    """The run's API holds its one flow run, its three embedding task runs Completed (no other run's: the shards
    of every run here have the same names), and the shard line each logged on its worker."""
    assert seen["flow_runs"] == 1, seen
    assert seen["embed_runs"] == [[f"embed-{s}", "Completed"] for s in STEMS], seen
    assert seen["shard_logs"] == [f"embed-{s}" for s in STEMS], seen


def _api_errors(logs: list[Path]) -> list[str]:
    return [line for log in logs for line in log.read_text(errors="replace").splitlines()
            if "Unable to connect to 'ws://" in line or "Error logging to API" in line]


def test_each_run_on_long_lived_workers_reports_to_its_own_temporary_api(tmp_path, shared_cluster):
    """A second run on the workers of a first: its task runs reach its own API (they went to the first run's
    server, gone by then, and the second run's API showed none of them)."""
    address, worker_logs, _ = shared_cluster
    first = _finish(_start_run(tmp_path, "first", address))
    _assert_own_task_runs(first)
    second = _finish(_start_run(tmp_path, "second", address))
    assert second["api"] != first["api"]
    _assert_own_task_runs(second)
    assert not _api_errors(worker_logs)
    # Nor do the workers keep an events or log worker for either run's API, gone with its run: one per run, for
    # good, on workers that serve runs for weeks.
    assert not _served_apis(address) & {first["api"].rstrip("/"), second["api"].rstrip("/")}


def _served_apis(address: str) -> set[str]:
    """The API URLs the cluster's workers still hold events or log workers for."""
    from distributed import Client

    from tasks import prefect_events

    with Client(address, timeout=60) as client:
        served = client.run(prefect_events.api_urls_served)
    return {url for urls in served.values() for url in urls}


def test_two_runs_at_once_on_the_same_workers_each_report_to_their_own_api(tmp_path, shared_cluster):
    """Two runs at the same time, on the same two workers, each with its own temporary API: each run's task runs
    and logs reach its API, and none of the other's."""
    address, worker_logs, _ = shared_cluster
    runs = [_start_run(tmp_path, name, address) for name in ("a", "b")]
    seen = [_finish(run) for run in runs]
    assert seen[0]["api"] != seen[1]["api"]
    for one in seen:
        _assert_own_task_runs(one)
    assert not _api_errors(worker_logs)


def test_relative_input_and_output_name_the_commands_folders_not_the_workers(tmp_path, shared_cluster):
    """INPUT and OUTPUT named relative to the command's folder, on workers started in another: every shard's table,
    kNN view, the manifest and the claim the workers check before writing are under the command's OUTPUT, and
    nothing appears in the workers' folder (there the claim was looked for, missing, and every shard failed; the
    kNN views went there before the claim was checked). The same command again finds every shard cached."""
    address, worker_logs, workdir = shared_cluster
    first = _finish(_start_run(tmp_path, "rel", address, relative=True))
    _assert_own_task_runs(first)
    out = tmp_path / "out-rel"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet") if "_prefect_results" not in p.parts)
    assert names == [f"{s}.parquet" for s in STEMS] + [f"_embeddings/{s}.parquet" for s in STEMS], names
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["output"] == str(out) and manifest["input"] == str(tmp_path / "in-rel")
    assert {s["status"] for s in manifest["shards"].values()} == {"computed"}
    assert list(workdir.iterdir()) == []
    assert not _api_errors(worker_logs)

    again = _finish(_start_run(tmp_path, "rel", address, relative=True))
    assert again["code"] == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {stem: s["status"] for stem, s in manifest["shards"].items()} == {s: "cached" for s in STEMS}
    assert list(workdir.iterdir()) == []


@pytest.fixture(scope="module")
def foreign_cluster(tmp_path_factory):
    """A `dask scheduler` with two workers that cannot run the shards, as on a cluster set up elsewhere: one whose
    Python cannot import wdsembed (a package of that name that fails to import, first on its path), one that does
    not see the folder holding INPUT and OUTPUT (an empty tmpfs mounted over it in a mount namespace of its own, as
    on a node without the client's disk). Skipped where this process may not make mount namespaces (not root)."""
    from distributed import Client

    root = tmp_path_factory.mktemp("foreign-cluster")
    hidden = root / "client-only"
    hidden.mkdir()
    if subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "none", str(hidden)],
                      capture_output=True).returncode:
        pytest.skip("needs root to give a worker a mount namespace of its own (a node without the client's disk)")
    shadow = root / "shadow"
    for name in ("wdsembed", "tasks"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    env = _env(root / "workers-prefect")
    scheduler_file = root / "scheduler.json"
    procs = [start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", scheduler_file], root / "scheduler.log", env, cwd=root)]
    try:
        address = scheduler_address(procs[0], scheduler_file, root / "scheduler.log")
        worker = [BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard"]
        procs.append(start_process(worker + ["--name", "no-wdsembed"], root / "worker0.log",
                                   env | {"PYTHONPATH": str(shadow)}, cwd=root))
        masked = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                  'mount -t tmpfs none "$0" && exec "$@"', hidden]
        procs.append(start_process(masked + worker + ["--name", "no-disk"], root / "worker1.log", env, cwd=root))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, hidden
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_workers_that_cannot_import_wdsembed_or_see_the_paths_are_said_before_any_shard(foreign_cluster):
    """Workers lacking the package failed every shard with Dask's "Error during deserialization of the task
    graph" (the missing module unsaid), and workers not seeing OUTPUT embedded every shard, then failed each with
    "this run no longer holds the output's claim". Now the API and the command refuse before any shard is submitted,
    naming each cause and its worker; the claim is released, no output is written."""
    from wdsembed import TimmImageEmbedder
    from wdsembed.cluster import WorkersCannotRunError

    address, hidden = foreign_cluster
    data, out = _data(hidden / "in"), hidden / "out-api"
    with pytest.raises(WorkersCannotRunError) as raised:
        TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                          dask_address=address)(str(data), str(out))
    said = str(raised.value)
    assert "cannot import wdsembed.api (ModuleNotFoundError: No module named 'wdsembed')" in said, said
    assert f"does not see the first shard {data}/00000.tar on 1 worker(s)" in said, said
    assert f"does not see OUTPUT's claim {out}/_claim.json on 1 worker(s)" in said, said
    assert "install wdsembed" in said and "same paths as this process" in said, said
    assert not list(out.rglob("*.parquet")) and not (out / "_claim.json").exists()

    out = hidden / "out-cli"
    argv = [sys.executable, ROOT / "flows" / "embed.py", data, "-o", out, "--model", TINY_MODEL, "--no-pretrained",
            "--device", "cpu", "--num-threads", "1", "--batch-size", "4", "--dask-address", address]
    done = subprocess.run([str(a) for a in argv], cwd=hidden, env=_env(hidden / "prefect-cli"), capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"run failed: the Dask workers at {address} cannot run this run's shards, so none was submitted" \
        in done.stderr, done.stderr[-3000:]
    assert "cannot import wdsembed.shard (ModuleNotFoundError: No module named 'wdsembed')" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(out.rglob("*.parquet")) and not (out / "_claim.json").exists()


def test_workers_restarted_for_their_memory_say_so_once_for_all_their_shards(tmp_path):
    """A cluster of the user's own whose worker's memory limit is too small for the model: its nanny restarts the
    worker as it passes distributed's terminate threshold, and Dask gives up on the shards (KilledWorker, here at the
    first death). Each shard's reason was Dask's 'Attempted to run task ... Inspecting worker logs is often a good
    next step', logs that a cluster run elsewhere keeps from its user; now the reason says the nanny restarted the
    worker for its memory, how much it used, and what to change, in the same words for every shard (one cause in
    the summary). No output is left, whole or partial, and the claim is released."""
    import dask
    from distributed import LocalCluster

    from wdsembed import TimmImageEmbedder, report
    from wdsembed.shard import ShardsFailed

    data, out = _data(tmp_path / "in"), tmp_path / "out"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="700MB",
                         dashboard_address=":0") as small:
        with pytest.raises(ShardsFailed) as raised:
            TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              dask_address=small.scheduler_address)(str(data), str(out))
    failures = raised.value.failures
    assert failures, failures
    for reason in failures.values():
        assert "its Dask worker process died while running it" in reason, reason
        assert "restarted by its nanny for using" in reason and "dask worker --memory-limit" in reason, reason
        assert "Inspecting worker logs" not in reason, reason
    assert len(report.failure_causes(failures)) == 1, failures
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != "_manifest.json"], list(out.rglob("*"))


def test_a_scheduler_lost_mid_run_ends_the_run_saying_so_and_its_shards_may_pass(tmp_path):
    """The `dask scheduler` of --dask-address killed while its worker embeds: the call ends (Dask's client gives
    up on its scheduler), each shard's reason says the scheduler was lost, in the same words (one cause), and the
    shards count as failures that may pass on a re-run. Dask's words named each task by its key and the run said
    the shards would fail again until the reason was fixed."""
    import json
    import threading

    from wdsembed import TimmImageEmbedder, report
    from wdsembed.shard import ShardsFailed

    data, out = _data(tmp_path / "in"), tmp_path / "out"
    spec = tmp_path / "hold.json"
    spec.write_text(json.dumps({s: {"fail_attempts": 0, "hold_s": 60} for s in STEMS}))
    env = _env(tmp_path / "prefect") | {"WDSEMBED_FAULTS": str(spec)}
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", scheduler_file], tmp_path / "scheduler.log", env, cwd=tmp_path)
    worker = None
    try:
        address = scheduler_address(scheduler, scheduler_file, tmp_path / "scheduler.log")
        worker = start_process([BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard"],
                               tmp_path / "worker.log", env, cwd=tmp_path)
        ended = {}

        def call():
            try:
                TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                  dask_address=address)(str(data), str(out))
            except BaseException as exc:  # noqa: BLE001 - what the call ended with is what is checked
                ended["exc"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("hold.json.*.attempts")):  # a shard held on the worker
            assert time.monotonic() < deadline and caller.is_alive(), (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(scheduler.pid, signal.SIGKILL)
        caller.join(180)
        assert not caller.is_alive()
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                stop_process(proc)
    exc = ended.get("exc")
    assert isinstance(exc, ShardsFailed), repr(exc)
    assert sorted(exc.failures) == STEMS, exc.failures
    for reason in exc.failures.values():
        assert f"the Dask scheduler at {address} was lost mid-run" in reason, reason
    assert len(report.failure_causes(exc.failures)) == 1, exc.failures
    assert sorted(exc.transient) == STEMS


def test_a_worker_that_lost_its_scheduler_stops_the_shard_it_embeds(tmp_path):
    """The `dask scheduler` of a dask_address killed while its worker is mid-shard (00000 held after its first
    batch, for a real shard its many batches): Dask's worker closes as its scheduler's connection breaks (it never
    reconnects), and its result can go nowhere, but the shard ran on, holding the worker's thread (a GPU), until
    the worker's close gave up waiting for it 30 s later and its process ended under it, mid-shard, saying
    nothing. Now the worker sees, between batches, that it is closing: the shard stops, saying why, nothing of it
    written, and the worker process ends."""
    import threading

    from wdsembed import TimmImageEmbedder
    from wdsembed.shard import ShardsFailed

    data, out = _data(tmp_path / "in"), tmp_path / "out"
    spec = tmp_path / "hold.json"
    _hold_first_shard(spec)
    env = _env(tmp_path / "prefect") | {"WDSEMBED_FAULTS": str(spec)}
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", scheduler_file], tmp_path / "scheduler.log", env, cwd=tmp_path)
    worker, worker_log = None, tmp_path / "worker.log"
    try:
        address = scheduler_address(scheduler, scheduler_file, tmp_path / "scheduler.log")
        worker = start_process([BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard"], worker_log,
                               env, cwd=tmp_path)
        ended = {}

        def call():
            try:
                TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1,
                                  dask_address=address)(str(data), str(out))
            except BaseException as exc:  # noqa: BLE001 - what the call ended with is what is checked
                ended["exc"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        _wait_until_held(spec, worker, lambda: worker_log.read_text()[-3000:])
        os.killpg(scheduler.pid, signal.SIGKILL)
        caller.join(120)
        assert not caller.is_alive()
        worker.wait(120)  # HOLD_S is far longer: the worker process ends once its shard has stopped
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                stop_process(proc)
    assert isinstance(ended.get("exc"), ShardsFailed), repr(ended.get("exc"))
    said = worker_log.read_text()
    assert ("00000.tar stopped after 2 of its images, nothing of it written: its Dask worker is closing (it lost "
            "its Dask scheduler" in said), said[-3000:]
    _assert_nothing_of_the_held_shard(out)


def test_the_stall_watch_of_a_run_whose_scheduler_is_lost_lets_it_end(tmp_path):
    """cluster.StallWatch (the watch for workers all paused for their memory, in the flow and the API) asked the
    scheduler every 2 s; one ask after the scheduler was lost waited for Dask's client to reconnect, up to its
    connect timeout (30 s by default, 10 minutes here), and the run's end waited for that ask (the watch's
    thread is joined as the run stops waiting on its shards): a run that lost its scheduler could still take 30 s
    to end, one time in a few. Now the watch asks nothing of a client that is not connected."""
    import threading

    import dask
    from distributed import Client

    from wdsembed import cluster

    scheduler_file = tmp_path / "scheduler.json"
    scheduler = start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", scheduler_file], tmp_path / "scheduler.log", _env(tmp_path),
                              cwd=tmp_path)
    try:
        address = scheduler_address(scheduler, scheduler_file, tmp_path / "scheduler.log")
        with dask.config.set({"distributed.comm.timeouts.connect": "600s"}):
            client = Client(address, set_as_default=False)
        watch = cluster.StallWatch(client, [], lambda said: None, poll_s=0.05).__enter__()
        os.killpg(scheduler.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while client.status == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the watch's next asks, after the loss
        stopped = threading.Thread(target=watch.__exit__, args=(None, None, None), daemon=True)
        stopped.start()
        stopped.join(60)  # far less than the client's 10 minutes of reconnecting
        assert not stopped.is_alive(), "the watch still waits on the lost scheduler"
        client.close()
    finally:
        stop_process(scheduler)


@contextlib.contextmanager
def _paused_cluster(imported: str):
    """A LocalCluster whose only worker process is paused by Dask: its memory over distributed.worker.memory.pause
    of its limit, here a ballast it holds, as a worker's model and pipeline hold theirs. `imported` (the module the
    run's checks import there) is imported before the ballast, which would otherwise take the worker past
    distributed.worker.memory.terminate, and its nanny would restart it."""
    from distributed import Client, LocalCluster

    def hold(n: int) -> int:  # run on the worker: memory it keeps, as a loaded model is kept
        import builtins
        import importlib

        import psutil

        importlib.import_module(imported)
        builtins._wdsembed_test_ballast = b"x" * n
        return psutil.Process().memory_info().rss

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="2GB",
                      dashboard_address=":0") as small, Client(small, set_as_default=False) as client:
        rss = next(iter(client.run(hold, 0).values()))
        client.run(hold, int(0.85 * 2e9) - rss)
        deadline = time.monotonic() + 30
        while next(iter(client.scheduler_info(n_workers=-1)["workers"].values()))["status"] != "paused":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield small


def test_workers_all_paused_for_their_memory_end_the_run_saying_so(tmp_path, monkeypatch, caplog):
    """A cluster of the user's own whose only worker is paused by Dask (its memory over
    distributed.worker.memory.pause of its limit) starts no task: the call waited for ever, without a word. Now it
    warns, then fails the shards it could not start, saying why (the worker, its memory, its limit) and that they
    may pass; no output is written."""
    import logging

    from wdsembed import TimmImageEmbedder, cluster, report
    from wdsembed.shard import ShardsFailed

    monkeypatch.setattr(cluster, "STALL_WARN_S", 2.0)
    monkeypatch.setattr(cluster, "STALL_S", 10.0)
    data, out = _data(tmp_path / "in"), tmp_path / "out"
    with _paused_cluster("wdsembed.api") as small:
        with caplog.at_level(logging.WARNING, logger="wdsembed"), pytest.raises(ShardsFailed) as raised:
            TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              dask_address=small.scheduler_address)(str(data), str(out))
    failures = raised.value.failures
    assert sorted(failures) == STEMS, failures
    for reason in failures.values():
        assert reason.startswith(f"not started in 10 s: every worker of the Dask cluster at {small.scheduler_address} (1) "
                                 "is paused for its memory and runs no task"), reason
        assert "GiB of its 1.86 GiB limit, over 80% (distributed.worker.memory.pause)" in reason, reason
    assert len(report.failure_causes(failures)) == 1 and sorted(raised.value.transient) == STEMS
    assert any("the shards not started fail in 8 s unless a worker resumes" in r.getMessage()
               for r in caplog.records), caplog.text
    assert not list(out.rglob("*.parquet"))


# The command, its stall watch's waits cut to seconds, then the lines of its flow run's log (not its task runs'),
# read from the API the run used (its temporary server, up until this process exits), and whether Prefect started
# a temporary server of its own in this process.
STALLED_RUN_AND_READ = '''
import json, sys, time
from wdsembed import cluster
cluster.STALL_WARN_S, cluster.STALL_S = 1.0, 6.0
from flows.command import main

code = main(sys.argv[1:])
from flows import apiserver
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

deadline = time.monotonic() + 30  # lines reach the server in batches, a moment later
with temporary_settings(updates={PREFECT_API_URL: apiserver.api_url()}):
    with get_client(sync_client=True) as client:
        while True:
            said = [l.message for l in client.read_logs() if l.task_run_id is None]
            if any("is paused for its memory" in m for m in said) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
server = sys.modules.get("prefect.server.api.server")
print(json.dumps({"code": code, "flow_logs": said,
                  "prefect_servers": len(server.SubprocessASGIServer._instances) if server else 0}))
'''


def test_the_commands_warning_of_workers_all_paused_reaches_its_runs_log(tmp_path):
    """The command without PREFECT_API_URL (its flow run's settings, a context, name its own temporary server), its
    only Dask worker paused for its memory: the flow's warning, which its stall watch says from a thread of its
    own, made Prefect start a second temporary server to send it to (the bare thread's settings name no API), and
    the line never reached the run's log in the UI. The thread now runs in the flow's context."""
    script = tmp_path / "stalled_run_and_read.py"
    script.write_text(STALLED_RUN_AND_READ)
    data, out = _data(tmp_path / "in"), tmp_path / "out"
    with _paused_cluster("wdsembed.shard") as small:
        argv = [sys.executable, script, data, "-o", out, "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu",
                "--num-threads", "1", "--batch-size", "4", "--fidelity-sample", "0",
                "--dask-address", small.scheduler_address]
        done = subprocess.run([str(a) for a in argv], cwd=tmp_path, env=_env(tmp_path / "prefect-home"),
                              capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["code"] == 1, done.stderr[-3000:]  # its shards failed, not started
    assert seen["prefect_servers"] == 0 and "Starting temporary server" not in done.stderr, done.stderr[-3000:]
    warned = [m for m in seen["flow_logs"] if "the shards not started fail in 5 s unless a worker resumes" in m]
    assert warned and "is paused for its memory and runs no task" in warned[0], seen["flow_logs"]
    assert not list(out.rglob("*.parquet"))


@pytest.fixture(scope="module")
def held_cluster(tmp_path_factory):
    """A `dask scheduler` and one single-threaded `dask worker` process that outlive the runs, as
    shared_cluster's, whose worker reads a faults spec (WDSEMBED_FAULTS) that each test writes: (its address, the
    spec's path, the worker's log)."""
    from distributed import Client

    root = tmp_path_factory.mktemp("held-cluster")
    spec = root / "hold.json"
    env = _env(root / "workers-prefect") | {"WDSEMBED_FAULTS": str(spec)}
    scheduler_file = root / "scheduler.json"
    procs = [start_process([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", scheduler_file], root / "scheduler.log", env, cwd=root)]
    log = root / "worker.log"
    try:
        address = scheduler_address(procs[0], scheduler_file, root / "scheduler.log")
        procs.append(start_process([BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard"], log, env,
                                   cwd=root))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address, spec, log
    finally:
        for proc in reversed(procs):
            stop_process(proc)


# Long enough that no test waits it out: a task still held after its run's interruption is a failure, not a wait.
HOLD_S = 900


def _hold_first_shard(spec: Path) -> None:
    """00000 held mid-shard (after its first batch) for HOLD_S; each shard's start counted (<spec>.<stem>.attempts)."""
    for counter in spec.parent.glob(f"{spec.name}.*.attempts"):
        counter.unlink()
    spec.write_text(json.dumps({s: {"fail_attempts": 0, "where": "start"} for s in STEMS[1:]}
                               | {"00000": {"fail_attempts": 0, "where": "batch", "hold_s": HOLD_S}}))


def _wait_until_held(spec: Path, proc: subprocess.Popen, said) -> None:
    held = Path(f"{spec}.00000.attempts")
    deadline = time.monotonic() + 300
    while not held.exists():
        assert proc.poll() is None and time.monotonic() < deadline, said()
        time.sleep(0.1)


def _assert_the_workers_let_go(address: str, worker_log: Path) -> None:
    """The workers run no task once the run that gave them theirs is gone: the held shard's task ended long before
    its hold would have (HOLD_S is far longer than this wait). Dask marks such a task "cancelled", and it ran on."""
    from distributed import Client

    def running(dask_worker):
        return [f"{ts.key} ({ts.state})" for ts in dask_worker.state.all_running_tasks]

    with Client(address, timeout=60) as client:
        deadline = time.monotonic() + 120
        while (tasks := [t for each in client.run(running).values() for t in each]) and time.monotonic() < deadline:
            time.sleep(1)
    said = "\n".join(line for line in worker_log.read_text().splitlines() if "out-of-band function" not in line)
    assert not tasks, f"still running on the worker: {tasks}\n{said[-3000:]}"


def _assert_nothing_of_the_held_shard(out: Path) -> None:
    """No output, kNN view or temp file of the abandoned shard."""
    left = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "00000" in p.name]
    assert left == [], left
    assert not [p for p in out.rglob(".*tmp-*")], list(out.rglob("*"))


def _rerun_finishes_every_shard(address: str, data: Path, out: Path) -> None:
    """A second run on the same cluster (its single worker thread) and output embeds every shard whole: the first
    run's held task no longer holds that thread, and none of its shards was left written."""
    import pyarrow.parquet as pq

    from wdsembed import TimmImageEmbedder

    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1,
                                dask_address=address)(str(data), str(out))
    assert sorted((r.stem, r.cached, r.rows, r.embedded) for r in results) == [(s, False, 5, 4) for s in STEMS]
    for stem in STEMS:
        table = pq.read_table(out / f"{stem}.parquet")
        assert table.num_rows == 5 and table.column("image_embedding").null_count == 1
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {stem: s["status"] for stem, s in manifest["shards"].items()} == {s: "computed" for s in STEMS}


def test_an_interrupted_api_call_on_a_dask_address_stops_its_running_shard_there(tmp_path, held_cluster):
    """Ctrl-C in a script whose call runs on a Dask cluster of its own (dask_address): the call cancels its tasks,
    but the shard already running on a worker ran on to its end (the whole hold here, for a real shard every batch)
    only to be refused at its write, the call's claim on OUTPUT released; the next call's shards waited behind it.
    Now the worker sees between batches that Dask no longer wants the task's result and stops: nothing of the shard
    is written, the worker is free at once, and the next call embeds every shard."""
    address, spec, worker_log = held_cluster
    data, out = _data(tmp_path / "in"), tmp_path / "out"
    _hold_first_shard(spec)
    script = ("from wdsembed import TimmImageEmbedder as T; "
              f"T({TINY_MODEL!r}, pretrained=False, device='cpu', batch_size=2, num_threads_per_worker=1, "
              f"dask_address={address!r})({str(data)!r}, {str(out)!r})")
    log = tmp_path / "call.log"
    call = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=_env(tmp_path / "prefect"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_until_held(spec, call, lambda: log.read_text()[-3000:] + worker_log.read_text()[-3000:])
        call.send_signal(signal.SIGINT)
        call.wait(120)
    finally:
        if call.poll() is None:
            call.kill()
    said = log.read_text()
    assert "run interrupted: the shards finished so far are in" in said and "KeyboardInterrupt" in said, said[-3000:]
    _assert_the_workers_let_go(address, worker_log)
    assert "00000.tar stopped after 2 of its images, nothing of it written: Dask no longer wants this task's result" \
        in worker_log.read_text(), worker_log.read_text()[-3000:]
    _assert_nothing_of_the_held_shard(out)
    assert not (out / "_claim.json").exists()
    spec.write_text("{}")
    _rerun_finishes_every_shard(address, data, out)


def test_an_interrupted_command_on_a_dask_address_stops_its_running_task_and_the_groups_other_shards(
        tmp_path, held_cluster):
    """Ctrl-C to the command running on a Dask cluster of its own (--dask-address), its three shards one task run
    (--shards-per-task 3): the task ran on, its held shard to the hold's end, then its group's two other shards,
    each embedded only to be refused at its write, while a re-run's shards waited behind them. Now the worker stops
    the task between two batches of the held shard, writes nothing of it, starts neither other shard, and the
    re-run on the same cluster embeds all three."""
    address, spec, worker_log = held_cluster
    data, out = _data(tmp_path / "in"), tmp_path / "out"
    _hold_first_shard(spec)
    argv = [sys.executable, ROOT / "flows" / "embed.py", data, "-o", out, "--model", TINY_MODEL, "--no-pretrained",
            "--device", "cpu", "--num-threads", "1", "--batch-size", "2", "--shards-per-task", "3",
            "--fidelity-sample", "0", "--dask-address", address]
    log = tmp_path / "command.log"
    command = subprocess.Popen([str(a) for a in argv], cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               env=_env(tmp_path / "prefect"),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_until_held(spec, command, lambda: log.read_text()[-3000:] + worker_log.read_text()[-3000:])
        command.send_signal(signal.SIGINT)
        command.wait(180)
    finally:
        if command.poll() is None:
            command.kill()
    said = log.read_text()
    assert command.returncode == 130, said[-3000:]
    _assert_the_workers_let_go(address, worker_log)
    on_worker = worker_log.read_text()
    assert "00000.tar stopped after 2 of its images, nothing of it written" in on_worker, on_worker[-3000:]
    assert "shards 00001, 00002 not started: Dask no longer wants this task's result" in on_worker, on_worker[-3000:]
    assert not [p.name for p in spec.parent.glob(f"{spec.name}.0000[12].attempts")]  # neither was started
    _assert_nothing_of_the_held_shard(out)
    assert not list(out.glob("0000*.parquet")) and not (out / "_claim.json").exists()
    spec.write_text("{}")
    _rerun_finishes_every_shard(address, data, out)


def test_the_abandoned_check_says_so_only_of_a_task_dask_no_longer_wants(tmp_path):
    """cluster.task_abandoned on a real LocalCluster: for two tasks running side by side, the check turns true for
    the one whose future is cancelled, and stays false for the other, which ends with its result; outside a Dask
    task it is never true."""
    from distributed import Client, LocalCluster

    from wdsembed import cluster

    assert cluster.task_abandoned() is cluster.never

    def watch(folder: str) -> str:  # on the worker: says what it sees in files, a cancelled task's result being lost
        import os
        import time

        from wdsembed import cluster

        check = cluster.task_abandoned()
        open(os.path.join(folder, "armed" if check is not cluster.never else "unarmed"), "w").close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if check():
                open(os.path.join(folder, "abandoned"), "w").close()
                return "abandoned"
            if os.path.exists(os.path.join(folder, "go")):
                return "finished"
            time.sleep(0.05)
        return "timed out"

    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    kept.mkdir()
    dropped.mkdir()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        futures = [client.submit(watch, str(folder), pure=False) for folder in (kept, dropped)]
        deadline = time.monotonic() + 120
        while not ((kept / "armed").exists() and (dropped / "armed").exists()):
            assert time.monotonic() < deadline and not list(tmp_path.glob("*/unarmed"))
            time.sleep(0.05)
        futures[1].cancel()
        while not (dropped / "abandoned").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (kept / "abandoned").exists()
        (kept / "go").touch()
        assert futures[0].result(timeout=60) == "finished"
