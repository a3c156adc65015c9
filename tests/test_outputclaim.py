"""One run writes to an OUTPUT at a time (wdsembed.outputclaim): real processes, real runs, and a real S3 server
(moto, on loopback); nothing mocked."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from processes import held_api_run, in_a_thread, killed_if_left
from s3server import CountingProxy, KeyedFaultProxy, aws_from_environment_only
from wdsembed import outputclaim, storage
from wdsembed.config import EmbedConfig
from wdsembed.outputclaim import CLAIM_NAME, OutputClaimedError

ROOT = Path(__file__).resolve().parents[1]
OTHER_MODEL = "test_efficientnet.r160_in1k"
SETTINGS = dict(pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1, fidelity_sample=0)


def _shards(folder: Path, n_shards: int = 2, per_shard: int = 2) -> Path:
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    for s in range(n_shards):
        write_shard(folder, f"{s:05d}", [ShardSample(encode_image(make_image(32, 24, seed=10 * s + i), "bmp"),
                                                     ext="bmp") for i in range(per_shard)])
    return folder


def _config(data: Path | str, out: Path | str, model: str = TINY_MODEL, **kw) -> EmbedConfig:
    return EmbedConfig(input=str(data), output=str(out), model_name=model, **(SETTINGS | kw))


def _embedder(model: str = TINY_MODEL, **kw):
    from wdsembed.api import TimmImageEmbedder

    return TimmImageEmbedder(model, **(SETTINGS | kw))


def _claim(out: Path) -> dict:
    return json.loads((out / CLAIM_NAME).read_text())


def _behind_proxy(server, data: Path | str, key: str, rules=(), attempts: int = 1) -> tuple[KeyedFaultProxy,
                                                                                              EmbedConfig]:
    """A KeyedFaultProxy (started: the caller stops it) in front of the moto server, and a config whose output
    s3://claims/<key> is reached through it, the client trying each request `attempts` times."""
    proxy = KeyedFaultProxy(server.endpoint, list(rules)).start()
    return proxy, _config(data, f"s3://claims/{key}",
                          storage_options={"endpoint_url": proxy.endpoint, "max_attempts": str(attempts)})


def _stored_claim(server, key: str) -> tuple[dict, str]:
    """The claim of s3://claims/<key> as the store holds it, read past any proxy, and its ETag."""
    got = server.boto().get_object(Bucket="claims", Key=f"{key}/{CLAIM_NAME}")
    return json.loads(got["Body"].read()), got["ETag"]


def _foreign_claim(config: EmbedConfig, **changes) -> bytes:
    """A claim as another run would have written it."""
    return json.dumps({**outputclaim.new_record(config), **changes}).encode()


# --------------------------------------------------------------------------------------------------- stale claims


def test_a_claim_left_by_a_killed_process_is_taken_over_and_its_temp_files_removed(tmp_path, caplog):
    """A process that claimed OUTPUT is killed (SIGKILL) while writing a file (its temp file written, not yet
    renamed): the claim and the temp file stay. The next run takes the claim over at once (the process is gone, on
    this host), with a warning, removes the temp file before any work, and ends with no claim left."""
    data, out = _shards(tmp_path / "in", n_shards=1), tmp_path / "out"
    config = _config(data, out)
    child = ("import os, signal; from wdsembed import outputclaim, storage; from wdsembed.config import EmbedConfig; "
             f"c = EmbedConfig.model_validate_json({config.model_dump_json()!r}); outputclaim.take(c); "
             f"storage.write_atomic(storage.filesystem({str(out)!r})[0], {str(out / '00000.parquet')!r}, "
             "b'x' * 4096, before_commit=lambda: os.kill(os.getpid(), signal.SIGKILL))")
    died = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    left = sorted(p.name for p in out.iterdir())
    assert left[0] == ".00000.parquet.tmp-" + left[0].rsplit("-", 1)[1] and left[1:] == [CLAIM_NAME], left
    dead = _claim(out)

    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        [result] = _embedder()(str(data), str(out))
    assert not result.cached
    said = caplog.text
    assert (f"took over the claim of run {dead['run']} (pid {dead['pid']} on host {socket.gethostname()}" in said
            and f"its process (pid {dead['pid']} on this host) is gone" in said), said
    assert f"removed 1 temp file(s) that runs killed mid-write had left: {left[0]}" in said, said
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "_embeddings", "_manifest.json"]


def test_a_claim_is_taken_over_once_its_heartbeat_is_stale_and_not_before(tmp_path, caplog):
    """On another host (its process cannot be looked up from here) a claim holds while its heartbeat is fresh, and
    is taken over once the heartbeat is older than STALE_S: its run is gone, and a killed run must not block the
    output for ever."""
    out = tmp_path / "out"
    out.mkdir()
    config = _config(tmp_path / "in", out)
    now = time.time()
    (out / CLAIM_NAME).write_bytes(_foreign_claim(config, host="another-host", pid=1,
                                                  heartbeat=outputclaim._iso(now - 60)))
    with pytest.raises(OutputClaimedError, match=r"pid 1 on host another-host.*last heartbeat 6\d s ago"):
        outputclaim.take(config)
    with pytest.raises(OutputClaimedError):
        outputclaim.check_free(config)  # the checks' early answer agrees
    (out / CLAIM_NAME).write_bytes(_foreign_claim(config, host="another-host", pid=1,
                                                  heartbeat=outputclaim._iso(now - outputclaim.STALE_S - 60)))
    outputclaim.check_free(config)
    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        claim = outputclaim.take(config)
    try:
        assert _claim(out)["run"] == claim.run and _claim(out)["host"] == socket.gethostname()
        assert "its last heartbeat is 24" in claim.took_over and "s old (more than 180 s)" in claim.took_over
        assert "took over the claim of run" in caplog.text
    finally:
        claim.release()
    assert not (out / CLAIM_NAME).exists()


def test_a_claims_process_is_gone_when_ended_unreaped_or_its_pid_reused_and_looked_up_in_its_namespace_only(
        tmp_path):
    """A killed run's process that its parent has not reaped yet (a zombie) has ended; a pid that now names a
    process started at another time is another process; a pid recorded in another pid namespace (another container
    with the same host name) cannot be looked up here, and such a claim holds while its heartbeat is fresh."""
    record = outputclaim.new_record(_config(tmp_path / "in", tmp_path / "out"))
    gone = "its process (pid {} on this host) is gone"
    assert outputclaim.stale_reason(record, written=time.time()) is None  # this process: alive
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        alive = record | {"pid": child.pid, "pid_started": outputclaim._process_start(child.pid)}
        assert outputclaim.stale_reason(alive, written=time.time()) is None
        child.kill()
        deadline = time.monotonic() + 30
        while outputclaim._proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{child.pid}")  # not reaped: the pid still answers os.kill(pid, 0)
        assert outputclaim.stale_reason(alive, written=time.time()) == gone.format(child.pid)
    finally:
        child.kill()
        child.wait()
    reused = record | {"pid_started": str(int(record["pid_started"]) - 1)}  # this pid, another process's start
    assert outputclaim.stale_reason(reused, written=time.time()) == gone.format(os.getpid())
    elsewhere = record | {"pid": child.pid, "pid_namespace": "pid:[1]"}  # gone here, but not this namespace's pid
    assert outputclaim.stale_reason(elsewhere, written=time.time()) is None
    assert outputclaim.stale_reason(elsewhere | {"pid_namespace": record["pid_namespace"]},
                                    written=time.time()) == gone.format(child.pid)


def test_a_stale_claim_another_run_took_over_first_is_left_to_it(tmp_path):
    """Two runs find the same stale claim; the one that moves it aside second finds the first one's claim in its
    place: it puts that back and takes nothing (one run writes to OUTPUT at a time)."""
    out = tmp_path / "out"
    out.mkdir()
    config = _config(tmp_path / "in", out)
    (out / CLAIM_NAME).write_bytes(_foreign_claim(config, host="another-host", pid=1,
                                                  heartbeat=outputclaim._iso(time.time() - outputclaim.STALE_S - 60)))
    store = outputclaim._store(config)
    found = store.read()  # the second run reads the stale claim...
    assert outputclaim.stale_reason(found.record, found.written)
    first = outputclaim.take(config)  # ...and the first run takes it over before the second moves it aside
    try:
        held = (out / CLAIM_NAME).read_bytes()
        assert store.take_over(found, _foreign_claim(config, run="second-run")) is None
        assert (out / CLAIM_NAME).read_bytes() == held and _claim(out)["run"] == first.run
        assert sorted(p.name for p in out.iterdir()) == [CLAIM_NAME]  # nothing moved aside is left
    finally:
        first.release()
    assert not (out / CLAIM_NAME).exists()


def test_an_unreadable_claim_is_described_in_plain_words_and_taken_over_once_old(tmp_path):
    """An empty claim file (its writer died between O_CREAT|O_EXCL and its write, where hard links are not
    supported) names no run and no process: the refusal says the file cannot be read, that it is taken over once
    it is STALE_S old by its modification time, and that it may be removed by hand; and it is, once that old."""
    out = tmp_path / "out"
    out.mkdir()
    config = _config(tmp_path / "in", out)
    (out / CLAIM_NAME).write_bytes(b"")
    with pytest.raises(OutputClaimedError) as refused:
        outputclaim.check_free(config)
    said = str(refused.value)
    assert "another a run" not in said and "once its process has ended" not in said, said
    assert (f"its claim file ({CLAIM_NAME} in the output) cannot be read (empty or not JSON" in said
            and "taken over once the file is 3 minutes old (by its modification time)" in said
            and "remove it by hand" in said), said
    with pytest.raises(OutputClaimedError, match="cannot be read"):
        outputclaim.take(config)  # the run's own answer says the same
    old = time.time() - outputclaim.STALE_S - 60
    os.utime(out / CLAIM_NAME, (old, old))
    claim = outputclaim.take(config)
    try:
        assert "cannot be read" in claim.took_over and "an unreadable claim, last written 24" in claim.took_over
    finally:
        claim.release()


def test_the_heartbeat_is_refreshed_and_a_claim_taken_over_meanwhile_stays(tmp_path, monkeypatch, caplog):
    """The holder's daemon thread refreshes the heartbeat. Where another run has taken the claim over meanwhile
    (this run's heartbeats had stopped), the holder says so and never removes the other run's claim."""
    monkeypatch.setattr(outputclaim, "HEARTBEAT_S", 0.2)
    out = tmp_path / "out"
    config = _config(tmp_path / "in", out)
    claim = outputclaim.take(config)
    try:
        first = _claim(out)["heartbeat"]
        deadline = time.monotonic() + 10
        while _claim(out)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _claim(out)["heartbeat"] > first and _claim(out)["run"] == claim.run
        other = _foreign_claim(config, run="0123456789abcdef", host="another-host")
        with caplog.at_level(logging.ERROR, logger="wdsembed"):
            # whole, as a takeover writes it: a heartbeat reading a half-written file would see no run in it
            storage.write_atomic(storage.filesystem(str(out))[0], str(out / CLAIM_NAME), other)
            deadline = time.monotonic() + 10
            # the heartbeat's thread marks the claim lost, then reads the new holder and says so: wait for both
            while not (claim.lost and "taken over" in caplog.text) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert claim.lost
        assert "this run's claim was taken over by run 0123456789abcdef (pid" in caplog.text
    finally:
        claim.release()
    assert (out / CLAIM_NAME).read_bytes() == other  # not this run's to remove


def test_a_claim_taken_in_a_flow_run_says_its_takeover_in_that_runs_log(tmp_path, monkeypatch, prefect_api):
    """The deployed flow takes OUTPUT's claim inside its flow run. The claim's heartbeat, a thread of its own, said
    that another run had taken the claim over (two runs may be writing to OUTPUT) on the terminal only: from a bare
    thread a `wdsembed` line has no run to go to. It now beats in its taker's context: the line is in the run's log
    in the UI."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.runtime import flow_run

    monkeypatch.setattr(outputclaim, "HEARTBEAT_S", 0.2)
    # As PREFECT_LOGGING_EXTRA_LOGGERS=wdsembed does in a run's own process, where it is set before Prefect's import
    monkeypatch.setattr(logging.getLogger("wdsembed"), "handlers", logging.getLogger("prefect.extra").handlers)
    out = tmp_path / "out"
    config = _config(tmp_path / "in", out)

    @flow(name="claim-taken-over")
    def taken_over() -> str:
        with outputclaim.held(config) as claim:
            storage.write_atomic(storage.filesystem(str(out))[0], str(out / CLAIM_NAME),
                                 _foreign_claim(config, run="0123456789abcdef", host="another-host"))
            claim._thread.join(10)  # the heartbeat's thread ends once it has said the claim lost
            assert claim.lost
        return str(flow_run.id)

    run_id = taken_over()
    deadline = time.monotonic() + 30  # lines reach the server in batches, a moment later
    while True:
        with get_client(sync_client=True) as client:
            said = [line.message for line in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
        if any("taken over" in m for m in said) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(f"output {out}: this run's claim was taken over by run 0123456789abcdef (pid" in m for m in said), said


def test_the_flow_started_directly_claims_its_output_as_run_does(tmp_path, monkeypatch, prefect_api):
    """`flows.embed.embed_flow(config)` (the flow object itself, or a subflow of a flow of the caller's), not
    `flows.embed.run`, took no claim on OUTPUT: it wrote beside another run writing there, and another run wrote
    beside it. It takes the claim itself now, released as it ends."""
    import flows.embed

    data, out = _shards(tmp_path / "in"), tmp_path / "out"
    config = _config(data, out)
    held, log = held_api_run(data, out, tmp_path, 120, TINY_MODEL, SETTINGS)
    with killed_if_left(held):  # an API run writing to OUTPUT, held in its first shard
        with pytest.raises(OutputClaimedError, match=f"by another run .* \\(pid {held.pid}"):
            flows.embed.embed_flow(config)
        assert _claim(out)["pid"] == held.pid and not list(out.glob("*.parquet"))  # nothing of the flow's
        held.send_signal(signal.SIGINT)
        held.wait(timeout=60)
    assert not (out / CLAIM_NAME).exists()

    spec = tmp_path / "hold-flow.json"  # the flow's tasks run in threads of this process: held here
    spec.write_text(json.dumps({"00000": {"fail_attempts": 0, "hold_s": 15}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(spec))
    ended = {}
    flow = threading.Thread(target=lambda: ended.update(manifest=flows.embed.embed_flow(config)))
    flow.start()
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{spec}.00000.attempts").exists():
            assert flow.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(OutputClaimedError, match=f"by another run .* \\(pid {os.getpid()}"):
            _embedder()(str(data), str(out))  # a second writer, while the flow writes
    finally:
        flow.join(timeout=300)
    assert ended["manifest"]["totals"]["computed"] == 2 and not ended["manifest"]["failed_shards"]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    assert not (out / CLAIM_NAME).exists()


def test_an_attempt_of_the_flow_computes_the_shards_an_earlier_attempt_closed(tmp_path, prefect_api):
    """run() holds one claim across the embed-shards flow's attempts (a Prefect flow retry runs the flow function
    again under it). An attempt that lost its Dask scheduler closed the shards it gave up on in that claim; the
    next attempt found them closed, and each failed at once with ShardClosedError: the retry could never finish
    them. Each attempt now starts with none closed. (The earlier attempt's close is made here as it makes it; the
    attempt is the flow itself, under the claim as run() hands it over.)"""
    import flows.embed

    data, out = _shards(tmp_path / "in"), tmp_path / "out"
    config = _config(data, out)
    with outputclaim.held(config) as claim:
        outputclaim.close_shards(config, claim.run, ["00000"])  # the earlier attempt's, its scheduler lost
        assert _claim(out)["closed"] == ["00000"]
        token = flows.embed._this_run.set(flows.embed._RunInProcess(claim_run=claim.run))
        try:
            manifest = flows.embed.embed_flow(config)
        finally:
            flows.embed._this_run.reset(token)
        manifest = manifest.unquote() if hasattr(manifest, "unquote") else manifest
        assert _claim(out)["run"] == claim.run and not _claim(out)["closed"]
    assert manifest["totals"]["computed"] == 2 and not manifest["failed_shards"], manifest
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


# --------------------------------------------------------------------------------------------------- release


def test_the_claim_is_released_after_success_failure_and_ctrl_c(tmp_path):
    """Every way a run ends removes its claim: success; a failed shard (the run raises ShardsFailed); a refusal in
    its planning (the output holds another model's shards); Ctrl-C (SIGINT to an API run in its own process, held
    in a shard). The command's Ctrl-C: tests/test_cli.py."""
    from wdsembed.inputs import InputError
    from wdsembed.shard import ShardsFailed

    data, out = _shards(tmp_path / "in"), tmp_path / "out"
    _embedder()(str(data), str(out))
    assert not (out / CLAIM_NAME).exists()

    broken = tmp_path / "broken"
    _shards(broken, n_shards=1)
    (broken / "00001.tar").write_bytes(b"<html>not a tar</html>")
    with pytest.raises(ShardsFailed):
        _embedder()(str(broken), str(tmp_path / "out2"))
    assert (tmp_path / "out2" / "00000.parquet").exists() and not (tmp_path / "out2" / CLAIM_NAME).exists()

    one = tmp_path / "one"
    _shards(one, n_shards=1)
    with pytest.raises(InputError, match="already holds embeddings made otherwise"):
        _embedder(OTHER_MODEL)(str(one), str(out))  # 00001 of the first run stays beside it: refused as it plans
    assert not (out / CLAIM_NAME).exists()

    held, log = held_api_run(data, tmp_path / "out3", tmp_path, 60, TINY_MODEL, SETTINGS)
    with killed_if_left(held):
        assert (tmp_path / "out3" / CLAIM_NAME).exists()
        held.send_signal(signal.SIGINT)
        held.wait(timeout=60)
    assert "KeyboardInterrupt" in log.read_text(), log.read_text()[-3000:]  # raised to the caller, as it was
    # and one line of its own saying what is kept and how to go on, as the command says it
    assert (f"run interrupted: the shards finished so far are in {tmp_path / 'out3'}; call again with the same output "
            "to finish the rest") in log.read_text(), log.read_text()[-3000:]
    assert not (tmp_path / "out3" / CLAIM_NAME).exists()


@pytest.mark.parametrize("cluster", [False, True], ids=["in-process", "get_client"])
def test_sigterm_to_an_api_run_releases_its_claim_then_ends_it(tmp_path, cluster):
    """SIGTERM (Slurm's scancel, Kubernetes, kill PID) to a script running the API, held in a shard, in its own
    process or on get_client's local cluster. The process ended on the spot: no word of what was kept, and its
    claim left behind, so that the next run from another host (a requeued job) was refused for 3 minutes. Now the
    run ends as on Ctrl-C (its shards cancelled, its claim released), says so in one line, and the process then
    ends by the signal, as its default would have it; its worker process ends with it."""
    data, out = _shards(tmp_path / "in"), tmp_path / "out"
    held, log = held_api_run(data, out, tmp_path, 60, TINY_MODEL, SETTINGS, cluster=cluster)
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(held.pid)], capture_output=True,
                              text=True).stdout.split()
    with killed_if_left(held):
        assert (out / CLAIM_NAME).exists()
        held.send_signal(signal.SIGTERM)
        held.wait(timeout=60)
    said = log.read_text()
    assert held.returncode == -signal.SIGTERM, said[-3000:]
    assert not (out / CLAIM_NAME).exists(), said[-3000:]
    assert f"run interrupted by SIGTERM: the shards finished so far are in {out}" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), children
    results = _embedder()(str(data), str(out))
    assert [r.cached for r in results] == [False, False] and not (out / CLAIM_NAME).exists()


def test_ctrl_c_between_a_shards_view_and_its_table_leaves_neither(tmp_path):
    """Ctrl-C to an API run as its shard's kNN view is in place and its table not yet (held there, WDSEMBED_FAULTS
    "commit"): the view stayed alone in OUTPUT/_embeddings until the next run, read by kNN tools as a shard whose
    table is not there. A shard's two files are put in place whole or not at all (shard.write_output)."""
    data, out = _shards(tmp_path / "in", n_shards=1), tmp_path / "out"
    held, log = held_api_run(data, out, tmp_path, 60, TINY_MODEL, SETTINGS, where="commit")
    with killed_if_left(held):
        assert (out / "_embeddings" / "00000.parquet").exists()
        held.send_signal(signal.SIGINT)
        held.wait(timeout=60)
    assert "KeyboardInterrupt" in log.read_text(), log.read_text()[-3000:]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [], log.read_text()[-3000:]
    assert [r.cached for r in _embedder()(str(data), str(out))] == [False]


def test_ctrl_c_while_the_claim_clears_dead_runs_temp_files_releases_it(tmp_path, monkeypatch, request):
    """Ctrl-C (a notebook's Interrupt) while a run, its claim just taken, walks OUTPUT for the temp files of killed
    runs (long on a large or network folder): the claim stayed, naming this live process, with no heartbeat, and
    the notebook's next call was refused for 3 minutes. A real SIGINT, sent as the walk starts."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a REPL has it
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    walk = outputclaim.remove_stale_temp_files

    def interrupted_walk(config):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs in this thread, here
        return walk(config)

    monkeypatch.setattr(outputclaim, "remove_stale_temp_files", interrupted_walk)
    data, out = _shards(tmp_path / "in"), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _embedder()(str(data), str(out))
    assert not (out / CLAIM_NAME).exists()
    monkeypatch.setattr(outputclaim, "remove_stale_temp_files", walk)
    assert [r.cached for r in _embedder()(str(data), str(out))] == [False, False]


def test_a_claim_that_cannot_be_removed_says_when_the_next_run_takes_it_over(tmp_path):
    """OUTPUT made read-only while a run holds it: the claim cannot be removed as the run ends. Its warning said the
    next run takes it over once its heartbeat is 180 s old, where on this host the next run takes it over at once,
    its process gone; it now says both, and that it takes a folder the next run can write. Run in a process without
    root's permission override, as any user's."""
    from conftest import CANNOT_DROP_OVERRIDE, without_file_permission_override

    out = tmp_path / "out"
    config = _config(tmp_path / "in", out)
    child = ("import logging, os; from wdsembed import outputclaim; from wdsembed.config import EmbedConfig; "
             "logging.basicConfig(level=logging.WARNING, format='%(message)s'); "
             f"c = EmbedConfig.model_validate_json({config.model_dump_json()!r}); claim = outputclaim.take(c); "
             f"os.chmod({str(out)!r}, 0o555); claim.release(); print(os.getpid())")
    try:
        done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=120,
                              preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    finally:
        if out.exists():
            os.chmod(out, 0o755)
    if done.returncode == CANNOT_DROP_OVERRIDE:
        pytest.skip("cannot drop root's permission override here")
    assert done.returncode == 0, done.stderr[-3000:]
    pid = int(done.stdout)
    assert _claim(out)["pid"] == pid
    said = " ".join(done.stderr.split())
    assert (f"could not remove this run's claim {CLAIM_NAME} (PermissionError: [Errno 13] Permission denied: "
            f"'{out / CLAIM_NAME}'); the next run takes it over once it can write to the output: on this host at "
            f"once after this process (pid {pid}) has ended, from another host or from this process once the "
            "claim's heartbeat is 180 s old") in said, said

    claim = outputclaim.take(config)  # at once: the folder writable again, the process gone, on this host
    try:
        assert claim.took_over.endswith(f"its process (pid {pid} on this host) is gone"), claim.took_over
    finally:
        claim.release()
    assert not (out / CLAIM_NAME).exists()


# --------------------------------------------------------------------------------------------------- workers


def _in_output(out: Path) -> list[str]:
    """Every file and folder under OUTPUT, hidden temp files included."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_a_shard_is_put_in_place_only_while_its_run_holds_the_claim(tmp_path):
    """A task that outlives its run (on a shared Dask cluster, its orchestrating process gone) puts a shard's files
    in place only while OUTPUT's claim is its run's, asked just before the first of them appears. Once the claim is
    another run's (here: the run released it, and a run with another model took it) or gone, the shard fails at
    once, never retried, naming the shard, OUTPUT and the run that holds it now; nothing of it lands in OUTPUT (no
    table, no kNN view, no temp file), and without a view, the view an earlier run wrote stays."""
    from wdsembed import faults, shard
    from wdsembed.outputclaim import OutputClaimLostError
    from wdsembed.plan import plan_shards

    data, out = _shards(tmp_path / "in", n_shards=3), tmp_path / "out"
    config = _config(data, out)
    plans = {p.stem: p for p in plan_shards(config)}
    claim = outputclaim.take(config)
    try:
        assert not shard.process_shard(config, plans["00000"], claim_run=claim.run).cached
    finally:
        claim.release()
    written = {name: (out / name).read_bytes() for name in ("00000.parquet", "_embeddings/00000.parquet")}
    assert _in_output(out) == ["00000.parquet", "_embeddings", "_embeddings/00000.parquet"]

    newer = outputclaim.take(_config(data, out, OTHER_MODEL))
    try:
        with pytest.raises(OutputClaimLostError) as lost:
            shard.process_shard(config, plans["00001"], claim_run=claim.run)
        said = str(lost.value)
        assert said.startswith(f"shard {plans['00001'].shard}: not written to output {str(out)!r}: this run "
                               f"({claim.run}) no longer holds the output's claim ({CLAIM_NAME}): it is now held by "
                               f"run {newer.run} (pid {os.getpid()} on host {socket.gethostname()}"), said
        assert f"model {OTHER_MODEL} (random weights, normalized)" in said, said
        assert not faults.is_transient(lost.value)
        # A run without kNN views removes a shard's earlier view as it writes the shard: not this one.
        with pytest.raises(OutputClaimLostError, match=f"it is now held by run {newer.run}"):
            shard.process_shard(_config(data, out, force=True, knn_view=False), plans["00000"],
                                claim_run=claim.run)
        assert _in_output(out) == ["00000.parquet", CLAIM_NAME, "_embeddings", "_embeddings/00000.parquet"]
    finally:
        newer.release()

    with pytest.raises(shard.ShardsFailed) as failed:
        shard.process_shards(config, [plans["00002"]], claim_run=claim.run)
    assert failed.value.transient == []  # the task's retries leave it: the claim never comes back to this run
    assert failed.value.failures["00002"].startswith(
        f"OutputClaimLostError: shard {plans['00002'].shard}: not written to output {str(out)!r}: this run "
        f"({claim.run}) no longer holds the output's claim ({CLAIM_NAME}): the claim is gone"), failed.value.failures
    assert _in_output(out) == ["00000.parquet", "_embeddings", "_embeddings/00000.parquet"]
    assert {name: (out / name).read_bytes() for name in written} == written


def test_a_task_whose_run_lost_the_claim_does_not_rebuild_a_kNN_view(tmp_path):
    """A finished shard whose kNN view is missing is found finished by its task, which rebuilds the view from the
    table: only while its run still holds OUTPUT's claim. A task of a run that has lost it (another run, with
    another model, holds it now) fails the shard, naming it, OUTPUT and that run, and writes no view; under its
    run's claim the view is rebuilt and the shard comes back cached."""
    from wdsembed import shard
    from wdsembed.outputclaim import OutputClaimLostError
    from wdsembed.plan import plan_shards

    data, out = _shards(tmp_path / "in", n_shards=1), tmp_path / "out"
    config = _config(data, out)
    [plan] = plan_shards(config)
    claim = outputclaim.take(config)
    try:
        assert not shard.process_shard(config, plan, claim_run=claim.run).cached
    finally:
        claim.release()
    view = out / "_embeddings" / "00000.parquet"
    view.unlink()

    newer = outputclaim.take(_config(data, out, OTHER_MODEL))
    try:
        with pytest.raises(OutputClaimLostError) as lost:
            shard.process_shard(config, plan, claim_run=claim.run)
        said = str(lost.value)
        assert said.startswith(f"shard {plan.shard}: not written to output {str(out)!r}: this run ({claim.run}) "
                               f"no longer holds the output's claim ({CLAIM_NAME}): it is now held by run "
                               f"{newer.run} "), said
        assert "Its missing or stale kNN view was not rebuilt from its table" in said, said
        assert _in_output(out) == ["00000.parquet", CLAIM_NAME, "_embeddings"]
    finally:
        newer.release()

    again = outputclaim.take(config)
    try:
        assert shard.process_shard(config, plan, claim_run=again.run).cached
    finally:
        again.release()
    assert _in_output(out) == ["00000.parquet", "_embeddings", "_embeddings/00000.parquet"]


def test_a_task_whose_run_lost_the_claim_leaves_the_kNN_view_of_the_run_that_took_it(tmp_path, monkeypatch):
    """A task writes its shard's view, then its table; where another writer's view replaced its own between the two,
    it writes the view again from its table: only while its run still holds OUTPUT's claim. Here another run takes
    the claim over and writes its view of the shard while the task's table is about to land (held there, as
    WDSEMBED_FAULTS allows): the table lands (the window outputclaim's docstring names), but the other run's view
    stays, and the shard fails saying so."""
    import pyarrow as pa

    from wdsembed import output, shard
    from wdsembed.outputclaim import OutputClaimLostError
    from wdsembed.plan import plan_shards

    data, out = _shards(tmp_path / "in", n_shards=1), tmp_path / "out"
    config = _config(data, out)
    [plan] = plan_shards(config)
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"00000": {"fail_attempts": 0, "hold_s": 2, "where": "commit"}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(spec))
    fs = storage.filesystem(str(out))[0]
    view = out / "_embeddings" / "00000.parquet"

    def take_over_and_write_a_view() -> None:
        counter = Path(f"{spec}.00000.attempts")
        deadline = time.monotonic() + 120
        while not counter.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        storage.write_atomic(fs, str(out / CLAIM_NAME), _foreign_claim(config, run="0123456789abcdef"))
        output.write_parquet_atomic(pa.table({"key": ["x"]}), str(view), fs, {"cache_key": "theirs"})

    claim = outputclaim.take(config)
    taker = threading.Thread(target=take_over_and_write_a_view)
    taker.start()
    try:
        with pytest.raises(OutputClaimLostError) as lost:
            shard.process_shard(config, plan, claim_run=claim.run)
    finally:
        taker.join(130)
        claim.release()  # not this run's any more: left as it is
    said = str(lost.value)
    assert "it is now held by run 0123456789abcdef" in said and "Its table was put in place, but its kNN view, " \
        "which another writer replaced meanwhile, was not written again from it" in said, said
    assert output.read_output_metadata(str(view), fs) == {"cache_key": "theirs"}
    assert (output.read_output_metadata(str(out / "00000.parquet"), fs) or {}).get("cache_key") == \
        shard.cache_key(config, plan)
    assert not list(out.rglob(".*.tmp-*"))


def test_an_api_run_whose_claim_is_taken_over_mid_shard_puts_none_of_it_in_place(tmp_path, monkeypatch):
    """The run's id reaches its shards through the Python API: another run takes the claim over while the API
    run's shard is being embedded (held at its start, as WDSEMBED_FAULTS allows), and the shard fails naming that
    run; its files never appear, and the other run's claim and manifest stay."""
    from wdsembed.shard import ShardsFailed

    data, out = _shards(tmp_path / "in", n_shards=1), tmp_path / "out"
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"00000": {"fail_attempts": 0, "hold_s": 2}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(spec))
    other = _foreign_claim(_config(data, out, OTHER_MODEL), run="0123456789abcdef", host="another-host")

    def take_over_once_the_shard_started() -> None:
        counter = Path(f"{spec}.00000.attempts")
        deadline = time.monotonic() + 120
        while not counter.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        storage.write_atomic(storage.filesystem(str(out))[0], str(out / CLAIM_NAME), other)  # whole, as a takeover
        (out / "_manifest.json").write_text('{"run": "0123456789abcdef"}')

    taker = threading.Thread(target=take_over_once_the_shard_started)
    taker.start()
    try:
        with pytest.raises(ShardsFailed) as failed:
            _embedder()(str(data), str(out))
    finally:
        taker.join(130)
    reason = failed.value.failures["00000"]
    assert reason.startswith("OutputClaimLostError: shard ") and \
        "it is now held by run 0123456789abcdef (pid" in reason and "on host another-host" in reason, reason
    assert not (out / "00000.parquet").exists() and not (out / "_embeddings" / "00000.parquet").exists()
    assert not [p for p in out.rglob(".*.tmp-*")]
    assert (out / CLAIM_NAME).read_bytes() == other
    assert (out / "_manifest.json").read_text() == '{"run": "0123456789abcdef"}'
    assert failed.value.failures["_manifest.json"].startswith("this run's manifest: not written to output "), \
        failed.value.failures


# --------------------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def serial_s3():
    """moto served one request at a time (s3server.MotoS3 `serial`): its conditional PUTs are then atomic, as
    AWS's are."""
    from s3server import MotoS3

    server = MotoS3(serial=True).start()
    server.boto().create_bucket(Bucket="claims")
    yield server
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path, serial_s3):
    nowhere = str(tmp_path / "none")
    aws_from_environment_only(monkeypatch, nowhere, serial_s3.admin)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield serial_s3
    s3fs.S3FileSystem.clear_instance_cache()


def _race(config: EmbedConfig, takers: int = 8) -> tuple[list, list[str]]:
    """`takers` threads claiming one output at the same moment: (the claims taken, the refusals' messages)."""
    barrier = threading.Barrier(takers)
    won, refused = [], []

    def take() -> None:
        barrier.wait()
        try:
            won.append(outputclaim.take(config))
        except OutputClaimedError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return won, refused


def test_an_s3_claim_is_atomic_against_concurrent_takers(s3_env, tmp_path):
    """On S3 the claim is a conditional PUT (If-None-Match: *), a stale claim is replaced only while it is the one
    judged stale (If-Match: its ETag), and the heartbeat only while the claim is this run's own: of 8 runs claiming
    one output at once exactly one gets it, the others are refused naming it; of 8 taking over one stale claim at
    once, one; a claim replaced under its holder is never removed by it. (A look-then-write gives all 8 the claim
    on the same server.)"""
    server = s3_env
    config = _config(tmp_path / "in", "s3://claims/emb", storage_options={"endpoint_url": server.endpoint})
    won, refused = _race(config)
    try:
        assert len(won) == 1 and len(refused) == 7, (len(won), refused[:2])
        assert all(f"by another run {won[0].run} (pid {os.getpid()}" in r for r in refused), refused[0]
        stored = json.loads(server.boto().get_object(Bucket="claims", Key=f"emb/{CLAIM_NAME}")["Body"].read())
        assert stored["run"] == won[0].run
        won[0].heartbeat()
        assert not won[0].lost
    finally:
        for claim in won:
            claim.release()
    assert [k for k in server.keys("claims") if k.startswith("emb/")] == []

    stale = _foreign_claim(config, host="another-host", heartbeat=outputclaim._iso(time.time() - 3600))
    server.boto().put_object(Bucket="claims", Key=f"emb/{CLAIM_NAME}", Body=stale)
    won, refused = _race(config)
    try:
        assert len(won) == 1 and len(refused) == 7, (len(won), refused[:2])
        assert "its last heartbeat is 36" in won[0].took_over
        other = _foreign_claim(config, run="fedcba9876543210", host="another-host")
        server.boto().put_object(Bucket="claims", Key=f"emb/{CLAIM_NAME}", Body=other)
        won[0].heartbeat()  # If-Match on its own ETag: refused by the store
        assert won[0].lost
    finally:
        for claim in won:
            claim.release()
    assert server.boto().get_object(Bucket="claims", Key=f"emb/{CLAIM_NAME}")["Body"].read() == other


def test_an_api_run_on_s3_claims_its_output_and_leaves_no_claim(s3_env, tmp_path):
    """An API run writing to S3, while another run's fresh claim is there, is refused naming it; once that claim
    is gone it runs, and leaves its outputs and no claim."""
    server = s3_env
    data = _shards(tmp_path / "in", n_shards=1)
    opts = {"endpoint_url": server.endpoint}
    config = _config(data, "s3://claims/api", storage_options=opts)
    other = _foreign_claim(config, run="00000000feedbeef", host="another-host")
    server.boto().put_object(Bucket="claims", Key=f"api/{CLAIM_NAME}", Body=other)
    with pytest.raises(OutputClaimedError, match="another run 00000000feedbeef .* on host another-host"):
        _embedder(storage_options=opts)(str(data), "s3://claims/api")
    assert [k for k in server.keys("claims") if k.startswith("api/")] == [f"api/{CLAIM_NAME}"]
    server.boto().delete_object(Bucket="claims", Key=f"api/{CLAIM_NAME}")
    [result] = _embedder(storage_options=opts)(str(data), "s3://claims/api")
    assert not result.cached
    assert [k for k in server.keys("claims") if k.startswith("api/")] == [
        "api/00000.parquet", "api/_embeddings/00000.parquet", "api/_manifest.json"]


def test_a_shard_on_s3_is_put_in_place_only_while_its_run_holds_the_claim(s3_env, tmp_path):
    """On S3 the worker's look at the claim is one GET, before the shard's first PUT: under its run's claim a shard
    is written; once another run (another host) has taken the claim over, a shard of the old run's fails naming it,
    and no object of it appears."""
    from wdsembed import shard
    from wdsembed.outputclaim import OutputClaimLostError
    from wdsembed.plan import plan_shards

    server = s3_env
    data = _shards(tmp_path / "in")
    config = _config(data, "s3://claims/lost", storage_options={"endpoint_url": server.endpoint})
    plans = {p.stem: p for p in plan_shards(config)}

    def stored() -> list[str]:
        return sorted(k for k in server.keys("claims") if k.startswith("lost/"))

    claim = outputclaim.take(config)
    try:
        assert not shard.process_shard(config, plans["00000"], claim_run=claim.run).cached
        other = _foreign_claim(config, run="fedcba9876543210", host="another-host")
        server.boto().put_object(Bucket="claims", Key=f"lost/{CLAIM_NAME}", Body=other)
        with pytest.raises(OutputClaimLostError, match="now held by run fedcba9876543210 .* on host another-host"):
            shard.process_shard(config, plans["00001"], claim_run=claim.run)
        assert stored() == ["lost/00000.parquet", f"lost/{CLAIM_NAME}", "lost/_embeddings/00000.parquet"]
    finally:
        claim.release()
        server.boto().delete_object(Bucket="claims", Key=f"lost/{CLAIM_NAME}")


# --------------------------------------------------------------------------------------------------- closed shards


@pytest.fixture(scope="module")
def dask_here():
    """A client (not made current) of a Dask cluster whose worker runs in this very process (processes=False), as a
    notebook's may: a shard written in a task there is a worker's, that its run, holding the claim in this same
    process, may give up on (its task cancelled, its thread writing on). It puts its marker (ShardCommit), which a
    shard written outside a Dask task here does not."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def _in_a_dask_task(client, call, *args, **kwargs):
    """`call(*args, **kwargs)` run as a task of `client`'s worker (pickled, as Dask sends tasks, even to a worker of
    this process), waited for: what it returned (or raised)."""
    return client.submit(call, *args, **kwargs, pure=False).result()


def _workers_commit(client, config: EmbedConfig, run: str, stem: str = "00000"):
    """The ShardCommit of shard `stem` of run `run`, made in a Dask task (as shard.write_output makes it, in the
    task's thread): its check() puts a marker, the run being one that may give up on that task."""
    from wdsembed.outputclaim import ShardCommit

    return _in_a_dask_task(client, ShardCommit, config, run, stem, f"shard {stem}")


@pytest.fixture(params=["local", "s3"])
def closing(request, tmp_path, monkeypatch):
    """(config, listing of OUTPUT's every object, the claim's record, gate file) of a one-shard output, local or on
    S3, whose shard 00000 a worker thread of this test holds (WDSEMBED_FAULTS) at the step the test names, until
    the gate file exists."""
    data = _shards(tmp_path / "in", n_shards=1)
    if request.param == "local":
        config = _config(data, tmp_path / "out")
    else:
        server = request.getfixturevalue("s3_env")
        config = _config(data, f"s3://claims/closing-{tmp_path.name}",
                         storage_options={"endpoint_url": server.endpoint})
    fs, root = storage.filesystem(config.output, config.storage_options)

    def listing() -> list[str]:
        fs.invalidate_cache()
        return sorted(path[len(root.rstrip("/")) + 1:] for path in fs.find(root))

    def record() -> dict:
        return json.loads(storage.cat_whole(*outputclaim.claim_url(config)))

    gate = tmp_path / "gate"
    yield config, listing, record, gate, lambda where: _hold_shard(tmp_path, monkeypatch, gate, where)


def _hold_shard(tmp_path: Path, monkeypatch, gate: Path, where: str) -> Path:
    """Shard 00000's worker held (WDSEMBED_FAULTS) at step `where` until `gate` exists: the file that says it is."""
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"00000": {"fail_attempts": 0, "hold_until": str(gate), "where": where}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(spec))
    return Path(f"{spec}.00000.attempts")


def _until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_shard_its_run_closed_before_its_worker_looked_is_not_put_in_place(closing, dask_here, caplog):
    """A run that lost its Dask scheduler gives up on the shards in flight and counts their outputs once, as its
    manifest is written; a worker that outlived the scheduler then wrote one whole under the run's still-held claim,
    beside a manifest listing it failed. The run now closes those shards in its claim before it counts: the worker,
    reaching its write after the count, puts nothing in place (no table, no view, no temp file, no marker), says
    why in one line naming the shard, and fails with an error never retried."""
    from wdsembed import caching, faults, shard
    from wdsembed.outputclaim import ShardClosedError
    from wdsembed.plan import plan_shards

    config, listing, record, gate, hold_at = closing
    held = hold_at("table")  # every image embedded, before the output's table is built and written
    [plan] = plan_shards(config)
    claim = outputclaim.take(config)
    try:
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            worker, ended = in_a_thread(lambda: _in_a_dask_task(dask_here, shard.process_shard, config, plan,
                                                                 claim_run=claim.run))
            _until(held.exists)
            failures, transient = {"00000": "the Dask scheduler was lost"}, {"00000"}
            assert caching.written_after_all(config, claim.run, [plan], failures, transient) == []
            assert list(failures) == ["00000"] and transient == {"00000"}
            gate.touch()
            worker.join(120)
        assert listing() == [CLAIM_NAME]  # counted failed, and absent
        outcome = ended["outcome"]
        assert isinstance(outcome, ShardClosedError) and not faults.is_transient(outcome), repr(outcome)
        said = str(outcome)
        assert said.startswith(f"shard {plan.shard}: not written to output {config.output!r}: this run "
                               f"({claim.run}) gave up on it") and "lists it as failed" in said, said
        # (Dask's worker says "Compute Failed" too, of its task)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "wdsembed"] == [said]
        assert record()["closed"] == ["00000"] and record()["run"] == claim.run
        claim.heartbeat()  # the closed shard stays closed while the run holds OUTPUT
        assert record()["closed"] == ["00000"]
    finally:
        gate.touch()
        claim.release()
    assert listing() == []


def test_a_shard_its_worker_was_putting_in_place_as_its_run_closed_it_counts_finished(closing, dask_here):
    """The worker looked at the claim just before the run closed the shard, and puts its files in place just after:
    a look and a rename (on S3 an upload) are two steps. The run, closing, finds the worker's marker and waits for
    its files before it counts: the shard counts finished, its output whole, and no marker is left."""
    from wdsembed import caching, shard
    from wdsembed.plan import plan_shards

    config, listing, record, gate, hold_at = closing
    held = hold_at("commit")  # the claim looked at and the kNN view in place, before the table's rename or upload
    [plan] = plan_shards(config)
    claim = outputclaim.take(config)
    try:
        worker, worked = in_a_thread(lambda: _in_a_dask_task(dask_here, shard.process_shard, config, plan,
                                                             claim_run=claim.run))
        _until(held.exists)
        failures, transient = {"00000": "the Dask scheduler was lost"}, ["00000"]
        counting, counted = in_a_thread(lambda: caching.written_after_all(config, claim.run, [plan], failures,
                                                                           transient))
        # closed, the count waiting for the worker's files (its marker is there); or, counted already, ended
        _until(lambda: record().get("closed") == ["00000"] or not counting.is_alive())
        gate.touch()
        worker.join(120)
        counting.join(120)
        assert not worked["outcome"].cached, worked["outcome"]
        assert listing() == ["00000.parquet", CLAIM_NAME, "_embeddings/00000.parquet"]  # no marker left
        assert [r["stem"] for r in counted["outcome"]] == ["00000"] and failures == {} and transient == []
        assert counted["outcome"][0]["seconds"] is None  # computed by an attempt whose result the run never had
    finally:
        gate.touch()
        claim.release()


def test_a_run_removes_the_markers_its_killed_workers_left_as_it_releases_its_claim(closing, dask_here):
    """A worker killed while putting a shard in place leaves its marker beside the claim. On an object store no
    later run's cleanup removes it (there are no temp files there to look for): the run removes its own run's as it
    releases its claim, with one listing of their prefix. Another run's marker is not its to remove."""
    from wdsembed.outputclaim import OutputClaimLostError, ShardCommit

    config, listing, record, gate, hold_at = closing
    claim = outputclaim.take(config)
    try:
        _workers_commit(dask_here, config, claim.run).check()  # its worker killed before the block ended
        with pytest.raises(OutputClaimLostError):  # a dead run's worker, whose marker stays
            ShardCommit(config, "0123456789abcdef", "00000", "shard 00000").check()
        markers = [name for name in listing() if name.startswith(f".{CLAIM_NAME}.commit-")]
        assert len(markers) == 2, listing()
    finally:
        claim.release()
    assert listing() == [m for m in markers if m.startswith(f".{CLAIM_NAME}.commit-0123456789abcdef-")]


def test_the_next_run_removes_the_markers_a_killed_runs_workers_left(closing, caplog):
    """The process that ran a run was killed (SIGKILL) while a worker of its run was putting a shard in place: the
    worker's marker stayed beside the claim. On local disk the next run's claim removed it as a temp file; on S3
    nothing did (the run's own release never came), and it stayed in the bucket for good. The next run, its claim
    taken over, removes it, and says so with the temp files."""
    from wdsembed.outputclaim import ShardCommit

    config, listing, record, gate, hold_at = closing
    dead = "0123456789abcdef"
    fs, path = outputclaim.claim_url(config)
    fs.makedirs(fs._parent(path), exist_ok=True)  # local disk; a no-op on S3
    fs.pipe_file(path, _foreign_claim(config, run=dead, host="another-host",
                                      heartbeat=outputclaim._iso(time.time() - 3600)))
    ShardCommit(config, dead, "00000", "shard 00000").check()  # its claim still in place: the worker went on
    [marker] = [name for name in listing() if name.startswith(f".{CLAIM_NAME}.commit-{dead}-")]
    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        claim = outputclaim.take(config)
    try:
        assert f"took over the claim of run {dead}" in caplog.text, caplog.text
        assert f"removed 1 temp file(s) that runs killed mid-write had left: {marker}" in caplog.text, caplog.text
        assert claim.removed == [marker] and listing() == [CLAIM_NAME]
        with pytest.raises(outputclaim.OutputClaimLostError, match=f"now held by run {claim.run} "):
            ShardCommit(config, dead, "00001", "shard 00001").check()  # a worker of the dead run, still running
    finally:
        claim.release()
    assert [name for name in listing() if not name.startswith(f".{CLAIM_NAME}.commit-{dead}-")] == []


def test_a_run_on_a_store_listed_only_whole_looks_for_its_markers_only_where_it_gave_up_shards(tmp_path, dask_here,
                                                                                              monkeypatch, caplog):
    """On an object store whose fsspec listing takes no prefix (fsspec's memory store here; S3, GCS and Azure's blob
    store list a prefix alone), a run's markers are found only by listing OUTPUT, a page per 1,000 of its outputs:
    every run did so as it released its claim. It does so only where it gave up on shards (a worker of theirs may
    have died mid-write); the markers of a killed run go as the next run takes the claim, which lists OUTPUT once
    for them."""
    import fsspec

    from wdsembed.outputclaim import ShardCommit

    monkeypatch.setattr(outputclaim, "COMMIT_WAIT_S", 0.5)
    bucket = f"claims-{tmp_path.name}"
    config = _config(tmp_path / "in", f"memory://{bucket}/out")
    fs, root = storage.filesystem(config.output)
    assert fs is fsspec.filesystem("memory") and root == f"/{bucket}/out"
    listed = []
    ls = fs.ls

    def counted(path, *args, **kwargs):
        listed.append(path.rstrip("/"))
        return ls(path, *args, **kwargs)

    monkeypatch.setattr(fs, "ls", counted)

    def markers() -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in fs.find(root) if f"/.{CLAIM_NAME}.commit-" in p]

    claim = outputclaim.take(config)
    try:
        assert listed == [root]  # once, for a killed run's markers (none)
        listed.clear()
        with _workers_commit(dask_here, config, claim.run) as commit:
            commit.check()  # a shard put in place
            assert len(markers()) == 1
        assert markers() == []
    finally:
        claim.release()
    assert listed == []  # nothing given up: OUTPUT not listed as the run ends

    claim = outputclaim.take(config)
    try:
        _workers_commit(dask_here, config, claim.run).check()  # its worker died mid-write
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            outputclaim.close_shards(config, claim.run, ["00000"])  # the run gave up on it (waited 0.5 s)
        assert len(markers()) == 1
        listed.clear()
    finally:
        claim.release()
    assert markers() == [] and listed == [root]  # looked for as the run ended

    dead = "0123456789abcdef"  # a run whose process was killed while its worker put shard 00000 in place
    fs.pipe_file(storage.join(root, CLAIM_NAME), _foreign_claim(config, run=dead, host="another-host",
                                                                heartbeat=outputclaim._iso(time.time() - 3600)))
    ShardCommit(config, dead, "00000", "shard 00000").check()
    [marker] = markers()
    claim = outputclaim.take(config)
    try:
        assert claim.removed == [marker] and markers() == []
    finally:
        claim.release()
    assert fs.find(root) == []


def test_a_claim_write_refused_as_a_conflict_is_tried_again(s3_env, tmp_path, caplog):
    """S3 answers 409 ConditionalRequestConflict to a conditional write racing another on the same key, and says to
    try again. The claim's creation did; a rewrite of it (a heartbeat, a close) raised it as the store's error, and a
    close refused so left the shard open for its workers. It is tried again, after a short sleep."""
    server = s3_env
    key = f"conflict-{tmp_path.name}"
    proxy, config = _behind_proxy(server, tmp_path / "in", key)

    def stored() -> dict:
        return _stored_claim(server, key)[0]

    proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "conflict", 2, "If-None-Match"])
    claim = outputclaim.take(config)
    try:
        assert proxy.injected["conflict"] == 2 and stored()["run"] == claim.run
        proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "conflict", 2, "If-Match"])
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            assert claim.close(["00000"])
            assert proxy.injected["conflict"] == 4 and stored()["closed"] == ["00000"]
            proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "conflict", 2, "If-Match"])
            claim.heartbeat()
            assert proxy.injected["conflict"] == 6 and not claim.lost
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        claim.release()
        proxy.stop()
    assert [k for k in server.keys("claims") if k.startswith(key)] == []


def test_a_close_the_store_refuses_is_tried_again_until_the_wait_is_up(s3_env, tmp_path, monkeypatch, caplog):
    """Every write of the claim refused (503, past the client's tries) as the run closes a shard it gave up on,
    with no worker of it putting files in place: the close was tried once, and the count went on at once, the shard
    open to a worker that had not yet put its marker. It is tried again until COMMIT_WAIT_S is up, then said, and
    the count goes on."""
    monkeypatch.setattr(outputclaim, "COMMIT_WAIT_S", 2.0)
    server = s3_env
    key = f"unclosable-{tmp_path.name}"
    proxy, config = _behind_proxy(server, tmp_path / "in", key)
    claim = outputclaim.take(config)
    try:
        proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "slowdown", None])
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            outputclaim.close_shards(config, claim.run, ["00000"])
        proxy.rules.clear()
        assert proxy.injected["slowdown"] >= 2  # tried again
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert said[0].startswith(f"output {config.output}: could not mark shard(s) 00000 closed in this run's "
                                  "claim (") and said[0].endswith("; tried again for up to 2 s"), said
        assert said[1:] == [f"shard(s) 00000: could not be marked closed in this run's claim on output "
                            f"{config.output} for 2 s (the store's error, said above): counted by what is in place "
                            "now; a worker may yet write one of them after this run has counted it failed"], said
        assert "closed" not in json.loads(server.boto().get_object(Bucket="claims", Key=f"{key}/{CLAIM_NAME}")[
            "Body"].read())
    finally:
        proxy.rules.clear()
        claim.release()
        proxy.stop()
    assert [k for k in server.keys("claims") if k.startswith(key)] == []


def test_a_close_whose_earlier_claim_write_lost_its_answer_is_stored(s3_env, tmp_path, caplog):
    """A write of the claim (here closing shard 00001) landed on S3 but its answers were lost (the connection cut):
    the run's ETag of its claim is stale. Its next write, closing shard 00000, got 412; the claim read back was
    still the run's, and the close returned True without writing: 00000 was not closed in the store, and a worker
    could still write it after the count. It is written again against the ETag read. (The lost answers are real
    ones: the proxy forwards each PUT, then closes the connection.)"""
    from wdsembed.outputclaim import ShardClosedError

    server = s3_env
    key = f"lost-answer-{tmp_path.name}"
    proxy, config = _behind_proxy(server, tmp_path / "in", key)

    def stored() -> dict:
        return _stored_claim(server, key)[0]

    claim = outputclaim.take(config)
    try:
        # every answer lost, the retries' too (a retry's If-Match, stale once the first PUT landed, gets 412)
        proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "lost_reply", None])
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            assert not claim.close(["00001"])  # said: not known to be closed
        proxy.rules.clear()
        assert proxy.injected["lost_reply"] >= 1 and not claim.lost
        assert "could not mark shard(s) 00001 closed" in caplog.text, caplog.text
        assert stored()["closed"] == ["00001"]  # stored all the same: the run's ETag is stale
        assert claim.close(["00000"])
        assert stored()["run"] == claim.run and stored()["closed"] == ["00000"], stored()
        with pytest.raises(ShardClosedError):
            outputclaim.check_still_held(config, claim.run, "shard 00000", stem="00000")
        claim.heartbeat()  # its ETag the stored one's again
        assert not claim.lost and stored()["closed"] == ["00000"]
    finally:
        claim.release()
        proxy.stop()
    assert [k for k in server.keys("claims") if k.startswith(key)] == []


def test_a_claim_write_that_landed_but_lost_its_answer_is_this_runs_own(s3_env, tmp_path, caplog):
    """The store served the claim's conditional PUT, then the connection dropped before its answer (the proxy
    forwards the PUT, then closes the connection); the client's retry got 412 from the run's own write. take()
    then read a fresh claim, its own, and refused the run naming itself; a takeover of a stale claim did the same;
    a heartbeat whose claim had been removed by hand (created again) marked the run's claim lost. The claim found is
    the run's own (the record it wrote): it is held, under the ETag read, and nothing alarming is said."""
    server = s3_env
    key = f"lost-create-{tmp_path.name}"
    proxy, config = _behind_proxy(server, tmp_path / "in", key, attempts=3)

    def stored() -> tuple[dict, str]:
        return _stored_claim(server, key)

    def lose_next_claim_put(header: str) -> None:  # the next PUT of the claim with that condition
        proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "lost_reply", 1, header])

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    try:
        with caplog.at_level(logging.INFO, logger="wdsembed"):
            lose_next_claim_put("If-None-Match")  # a free output
            claim = outputclaim.take(config)
            try:
                assert proxy.injected["lost_reply"] == 1
                record, etag = stored()
                assert record["run"] == claim.run and claim.token == etag and not claim.took_over
                assert said() == []
                server.boto().delete_object(Bucket="claims", Key=f"{key}/{CLAIM_NAME}")  # removed by hand
                lose_next_claim_put("If-None-Match")  # the heartbeat creates it again
                claim.heartbeat()
                assert proxy.injected["lost_reply"] == 2 and not claim.lost, said()
                record, etag = stored()
                assert record == claim.record and claim.token == etag
                claim.heartbeat()  # If-Match on the ETag read: stored
                assert not claim.lost and said() == [] and stored()[1] == claim.token
            finally:
                claim.release()
            assert [k for k in server.keys("claims") if k.startswith(key)] == []

            stale = _foreign_claim(config, host="another-host", heartbeat=outputclaim._iso(time.time() - 3600))
            server.boto().put_object(Bucket="claims", Key=f"{key}/{CLAIM_NAME}", Body=stale)
            lose_next_claim_put("If-Match")  # the takeover's, on the stale claim's ETag (its create is refused)
            claim = outputclaim.take(config)
            try:
                assert proxy.injected["lost_reply"] == 3
                record, etag = stored()
                assert record["run"] == claim.run and claim.token == etag
                assert "its last heartbeat is 36" in claim.took_over
                assert [m for m in said() if "took over the claim of run" not in m] == []
                claim.heartbeat()
                assert not claim.lost and stored()[1] == claim.token
            finally:
                claim.release()
    finally:
        proxy.stop()
    assert [k for k in server.keys("claims") if k.startswith(key)] == []


def test_a_run_whose_claim_cannot_be_written_still_waits_for_a_worker_putting_a_shard_in_place(
        s3_env, dask_here, tmp_path, monkeypatch, caplog):
    """Every PUT of the claim refused (503, past the retries) as the run closes the shard it gave up on: it is not
    closed, said. The run counted at once, while its worker was putting the shard's files in place: the manifest
    listed it failed beside its whole output. It still waits for the worker's marker, and counts the shard finished;
    meanwhile it tries the close again, which the store takes once it takes writes again."""
    from wdsembed import caching, shard
    from wdsembed.plan import plan_shards

    server = s3_env
    key = f"unclosed-{tmp_path.name}"
    proxy, config = _behind_proxy(server, _shards(tmp_path / "in", n_shards=1), key)
    gate = tmp_path / "gate"
    held = _hold_shard(tmp_path, monkeypatch, gate, "commit")  # the kNN view in place, before the table's upload
    [plan] = plan_shards(config)
    claim = outputclaim.take(config)
    try:
        worker, worked = in_a_thread(lambda: _in_a_dask_task(dask_here, shard.process_shard, config, plan,
                                                             claim_run=claim.run))
        _until(held.exists)
        proxy.rules.append(["PUT", rf"/{key}/{CLAIM_NAME}$", "slowdown", None])
        failures, transient = {"00000": "the Dask scheduler was lost"}, ["00000"]
        with caplog.at_level(logging.INFO, logger="wdsembed"):
            counting, counted = in_a_thread(lambda: caching.written_after_all(config, claim.run, [plan], failures,
                                                                               transient))
            # waiting for the worker's files, or (not waiting) counted already
            _until(lambda: not counting.is_alive() or "waiting for their worker" in caplog.text)
            gate.touch()
            worker.join(120)
            proxy.rules.clear()  # the store takes writes again
            counting.join(120)
        assert proxy.injected["slowdown"] >= 1
        assert "could not mark shard(s) 00000 closed in this run's claim" in caplog.text, caplog.text
        assert not worked["outcome"].cached, worked["outcome"]
        assert [r["stem"] for r in counted["outcome"]] == ["00000"] and failures == {} and transient == []
        stored = json.loads(server.boto().get_object(Bucket="claims", Key=f"{key}/{CLAIM_NAME}")["Body"].read())
        assert stored["closed"] == ["00000"], stored
    finally:
        gate.touch()
        proxy.rules.clear()
        claim.release()
        proxy.stop()
    assert sorted(k for k in server.keys("claims") if k.startswith(key)) == [
        f"{key}/00000.parquet", f"{key}/_embeddings/00000.parquet"]


def test_a_store_that_refuses_to_list_the_markers_delays_the_count_then_it_goes_on(s3_env, tmp_path, monkeypatch,
                                                                                    caplog):
    """A closing run's look for workers still putting shards in place (a listing) answered 503 on every try: it
    raised out of the count, and the run ended without its manifest. It is tried again until COMMIT_WAIT_S is up,
    then said once, and the count goes on with what is in place."""
    from wdsembed import caching
    from wdsembed.plan import plan_shards

    monkeypatch.setattr(outputclaim, "COMMIT_WAIT_S", 2.0)
    server = s3_env
    key = f"unlisted-{tmp_path.name}"
    # the listings of the markers' prefix (an object's key never ends so)
    proxy, config = _behind_proxy(server, _shards(tmp_path / "in", n_shards=1), key, [
        ("GET", rf"/{key}/{re.escape(f'.{CLAIM_NAME}.commit-')}[0-9a-f]+-$", "slowdown", None)])
    [plan] = plan_shards(config)
    claim = outputclaim.take(config)
    try:
        failures, transient = {"00000": "the Dask scheduler was lost"}, {"00000"}
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            assert caching.written_after_all(config, claim.run, [plan], failures, transient) == []
        assert list(failures) == ["00000"] and transient == {"00000"}
        assert proxy.injected["slowdown"] >= 2
        said = [r.getMessage() for r in caplog.records if "could not look for workers" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(f"shard(s) 00000: could not look for workers still putting "
                                                     f"their files in place in output {config.output} for 2 s ("), said
        assert "reduce your request rate" in said[0], said
        assert json.loads(server.boto().get_object(Bucket="claims", Key=f"{key}/{CLAIM_NAME}")["Body"].read())[
            "closed"] == ["00000"]
    finally:
        proxy.rules.clear()
        claim.release()
        proxy.stop()


def test_a_closing_run_on_s3_lists_only_its_own_markers(s3_env, dask_here, tmp_path, monkeypatch, caplog):
    """A closing run looks for its workers' markers 5 times a second: it listed the whole OUTPUT each time, on S3 a
    page per 1,000 outputs (100 pages for 100,000). It lists the prefix of its own run's markers alone, and finds
    them there (a worker of this process, alive, putting shard 00000 in place: waited for until COMMIT_WAIT_S)."""
    monkeypatch.setattr(outputclaim, "COMMIT_WAIT_S", 1.0)
    server = s3_env
    proxy = CountingProxy(server.endpoint).start()
    key = f"listed-{tmp_path.name}"
    config = _config(tmp_path / "in", f"s3://claims/{key}", storage_options={"endpoint_url": proxy.endpoint})
    for stem in ("00000", "00001", "00002"):  # outputs beside the claim
        server.boto().put_object(Bucket="claims", Key=f"{key}/{stem}.parquet", Body=b"x")
    claim = outputclaim.take(config)
    try:
        with _workers_commit(dask_here, config, claim.run) as commit:
            commit.check()
            proxy.reset()
            with caplog.at_level(logging.WARNING, logger="wdsembed"):
                outputclaim.close_shards(config, claim.run, ["00000"])
            listed = {where for op, where in proxy.seen if op.startswith("List")}
        assert listed == {f"/claims/{key}/.{CLAIM_NAME}.commit-{claim.run}-"}, proxy.seen
        assert "shard(s) 00000: a worker has been putting their files in place for over 1 s" in caplog.text, \
            caplog.text
    finally:
        claim.release()
        proxy.stop()
        for stem in ("00000", "00001", "00002"):
            server.boto().delete_object(Bucket="claims", Key=f"{key}/{stem}.parquet")


def test_a_shard_its_run_cannot_give_up_on_puts_no_marker_on_s3(s3_env, dask_here, tmp_path):
    """The marker beside the claim (on S3 a PUT and a DELETE per shard) makes a run that gives up on a shard's Dask
    task wait for its worker, which may be putting the shard in place. An API run without Dask writes each shard in
    the caller's own thread, in the process that holds the claim, and never gives up on one while it is written: it
    puts no marker, each shard's look at the claim (a GET) kept. Its shards on Dask put one each, removed after:
    even on a worker of this very process, whose task Dask can give up on while its thread writes on."""
    import collections

    server = s3_env
    proxy = CountingProxy(server.endpoint).start()
    key = f"unmarked-{tmp_path.name}"
    data, url, opts = _shards(tmp_path / "in"), f"s3://claims/{key}", {"endpoint_url": proxy.endpoint}

    def requests() -> tuple[collections.Counter, int]:
        """The requests of markers' objects (no listing of their prefix) by operation, and the GETs of the claim."""
        markers = collections.Counter(op for op, where in proxy.seen if not op.startswith("List")
                                      and where.startswith(f"/claims/{key}/.{CLAIM_NAME}.commit-"))
        claim = ("GetObject", f"/claims/{key}/{CLAIM_NAME}")
        return markers, sum(1 for seen in proxy.seen if seen == claim)

    try:
        results = _embedder(storage_options=opts)(str(data), url)
        assert [(r.stem, r.cached) for r in results] == [("00000", False), ("00001", False)]
        markers, looks = requests()
        assert markers == {} and looks >= 2, proxy.seen
        proxy.reset()
        with dask_here.as_current():  # the API runs the shards on the current client's workers
            results = _embedder(storage_options=opts)(str(data), url, force=True)
        assert [(r.stem, r.cached) for r in results] == [("00000", False), ("00001", False)]
        assert requests() == ({"PutObject": 2, "DeleteObject": 2}, looks), proxy.seen
    finally:
        proxy.stop()
    assert sorted(k[len(key) + 1:] for k in server.keys("claims") if k.startswith(f"{key}/")) == [
        "00000.parquet", "00001.parquet", "_embeddings/00000.parquet", "_embeddings/00001.parquet", "_manifest.json"]


def test_temp_files_are_found_where_atomic_writes_leave_them():
    """The names storage.write_atomic gives its temp files are what the cleanup removes, and nothing else."""
    for path in ("out/00000.parquet", "out/_embeddings/train/00000.parquet", "out/_manifest.json"):
        assert outputclaim.TEMP_FILE.match(os.path.basename(storage.temp_name(path)))
    for name in ("00000.parquet", ".00000.parquet", "00000.parquet.tmp-" + "a" * 32, ".x.tmp-" + "a" * 31,
                 ".x.tmp-" + "g" * 32, CLAIM_NAME):
        assert not outputclaim.TEMP_FILE.match(name), name


def test_runs_claiming_one_local_output_at_once_are_refused_but_one(tmp_path):
    """Of 8 runs claiming one local output at the same moment exactly one gets it and the others are refused naming
    it, also as the one that got it removes dead runs' temp files: the claim's own temp files, those of the runs
    being refused, are not among them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / (".00000.parquet.tmp-" + "c" * 32)).write_bytes(b"left by a killed run")
    config = _config(tmp_path / "in", out)
    for _ in range(3):
        won, refused = _race(config)
        try:
            assert len(won) == 1 and len(refused) == 7, (len(won), refused[:2])
            assert all(f"by another run {won[0].run} (pid {os.getpid()}" in r for r in refused), refused[0]
        finally:
            for claim in won:
                claim.release()
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_run_leaves_the_temp_files_of_another_runs_output_inside_its_own(tmp_path):
    """Two models' runs at once, one writing to OUTPUT and the other to a folder inside it (out/ and out/resnet/):
    the first, as it claimed out/, took the second's temp file, its shard's output being written at that moment,
    for one a killed run had left, and removed it, so that shard failed at its rename. A folder of OUTPUT that is
    another run's OUTPUT (its claim there) is now left to that run."""
    data, out = _shards(tmp_path / "in", n_shards=1), tmp_path / "out"
    inner = _config(data, out / "resnet", OTHER_MODEL)
    held = outputclaim.take(inner)
    in_flight = out / "resnet" / Path(storage.temp_name(str(out / "resnet" / "00000.parquet"))).name
    in_flight.write_bytes(b"being written")
    left = out / (".00000.parquet.tmp-" + "d" * 32)
    left.write_bytes(b"left by a killed run of out/")
    try:
        [result] = _embedder()(str(data), str(out))
        assert not result.cached
        assert in_flight.read_bytes() == b"being written" and not left.exists()
        assert _claim(out / "resnet")["run"] == held.run
    finally:
        held.release()
