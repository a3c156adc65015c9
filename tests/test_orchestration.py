"""The flow as it runs for users: a real Prefect API server (the session's `prefect_api`) and real Dask clusters
with worker processes (a LocalCluster per run, or a scheduler and two workers started here on loopback).

Proofs are counts, never wall time: task-body executions are counted by WDSEMBED_FAULTS counters (a spec with
"fail_attempts": 0 only counts; one with "fatal" fails any shard that runs), task-run states are read back from the
API, and outputs are compared by inode and mtime.

Small on purpose (2 shared cores): 3-4 shards of 4 images plus a failed download each, the tiny timm test model
with random weights, one single-threaded CPU worker, batch size 4.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import dask
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL
from processes import in_a_thread, scheduler_address, start as start_process, stop as stop_process
from wdsembed import caching, cluster, faults, storage, storeoptions
from wdsembed.config import EmbedConfig
from wdsembed.output import read_output_metadata
from wdsembed.validate import validate_output

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS, EMBEDDED = 5, 4  # per demo shard: 4 images in the tar, 1 failed download in the parquet


# --------------------------------------------------------------------------------------------------- helpers


def make_dataset(folder: Path, n_shards: int = 3) -> Path:
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(folder, n_shards=n_shards, per_shard=EMBEDDED, failed_per_shard=ROWS - EMBEDDED)
    return folder


def make_config(data: Path, out: Path, **overrides) -> EmbedConfig:
    values = dict(input=str(data), output=str(out), model_name=TINY_MODEL, pretrained=False, device="cpu",
                  n_workers=1, batch_size=4, num_threads_per_worker=1)
    return EmbedConfig(**(values | overrides))


class Faults:
    """A WDSEMBED_FAULTS spec file for one run, and its per-shard attempt counters."""

    def __init__(self, folder: Path, monkeypatch, spec: dict):
        self.path = folder / f"faults-{time.monotonic_ns()}.json"
        self.path.write_text(json.dumps(spec))
        monkeypatch.setenv("WDSEMBED_FAULTS", str(self.path))  # local Dask workers inherit it when spawned

    def attempts(self, stem: str) -> int:
        counter = Path(f"{self.path}.{stem}.attempts")
        return int(counter.read_text()) if counter.exists() else 0


def count_only(stems) -> dict:
    return {s: {"fail_attempts": 0} for s in stems}


def fail_if_run(stems) -> dict:
    return {s: {"fail_attempts": 1000, "error": "fatal"} for s in stems}


def embed(config: EmbedConfig):
    """Run the flow as the CLI does; returns (manifest or the exception raised, flow run id)."""
    import flows.embed
    from prefect.runtime import flow_run

    seen = set()
    try:
        outcome = flows.embed.run(config, on_shard_done=lambda *a: seen.add(flow_run.id))
    except flows.embed.ShardsFailed as exc:
        outcome = exc
    assert len(seen) == 1, seen
    return outcome, seen.pop()


def task_runs(flow_run_id: str, expected: int, timeout: float = 60.0, names=()) -> dict:
    """The flow run's task runs by name, once `expected` of them, and every one in `names`, are in a final state
    (task-run states reach the server as events, recorded a moment later and not in order). The indexing and report
    task runs count towards `expected`: name the runs whose states are read."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        final = [r.name for r in runs if r.state and r.state.is_final()]
        if (len(final) >= expected and set(names) <= set(final)) or time.monotonic() > deadline:
            return {r.name: r for r in runs}
        time.sleep(0.5)


def flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.name


def heartbeats(flow_run_id: str, wait_for: int = 0, timeout: float = 60.0) -> int:
    """How many heartbeat events of the flow run the server has recorded; with `wait_for`, once that many are (the
    server persists events in batches, a moment later), or at `timeout`."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    only_its_heartbeats = EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                      resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]))
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            count = client.read_events(only_its_heartbeats, limit=1).total  # the total counts them all
        if count >= wait_for or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


def embed_states(flow_run_id: str, stems, prefix: str = "embed-") -> dict[str, str]:
    # The indexing and report task runs count as final too: wait for these shards' own.
    runs = task_runs(flow_run_id, expected=len(stems), names=[prefix + s for s in stems])
    return {s: runs[prefix + s].state.name for s in stems}


def artifacts(flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.type: a for a in found}


def table_rows(flow_run_id: str) -> dict[str, dict]:
    data = artifacts(flow_run_id)["table"].data
    rows = json.loads(data) if isinstance(data, str) else data
    return {row["shard"]: row for row in rows}


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def check_outputs(config: EmbedConfig, stems, *, rows: int = ROWS, embedded: int = EMBEDDED) -> None:
    """Every output whole and valid: expected rows, unique keys, one dimension, unit norms; no temp files left."""
    out = Path(config.output)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], "a partial output was left behind"
    for stem in stems:
        path = out / f"{stem}.parquet"
        meta = read_output_metadata(str(path), storage.filesystem(str(path))[0])
        dim = meta["result"]["dim"]
        check = validate_output(config, str(path), dim=dim, expected_rows=rows, expected_embedded=embedded)
        assert check.ok, (stem, check.problems)
        keys = pq.read_table(path, columns=[config.id_column]).column(0).to_pylist()
        assert len(keys) == len(set(keys)) == rows, (stem, keys)


# --------------------------------------------------------------------------------------------------- caching


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Four shards embedded once, with every task body's executions counted."""
    root = tmp_path_factory.mktemp("cache")
    data = make_dataset(root / "in", n_shards=4)
    config = make_config(data, root / "out")
    mp = pytest.MonkeyPatch()
    try:
        counted = Faults(root, mp, count_only(["00000", "00001", "00002", "00003"]))
        manifest, run_id = embed(config)
    finally:
        mp.undo()
    return dict(root=root, config=config, manifest=manifest, run_id=run_id, faults=counted)


STEMS4 = ["00000", "00001", "00002", "00003"]


def test_first_run_computes_every_shard_once(first_run):
    manifest, config = first_run["manifest"], first_run["config"]
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 4 and manifest["totals"]["cached"] == 0
    assert manifest["totals"]["embedded_this_run"] == 4 * EMBEDDED
    assert [first_run["faults"].attempts(s) for s in STEMS4] == [1, 1, 1, 1]
    assert set(embed_states(first_run["run_id"], STEMS4).values()) == {"Completed"}
    check_outputs(config, STEMS4)
    # The task results (the cache) live with the output, where every worker reaches them.
    assert len(list((Path(config.output) / caching.RESULTS_FOLDER).iterdir())) == 4


def test_the_manifest_reads_short_and_comes_back_whole_from_prefects_persisted_result(tmp_path):
    """flows.embed.run's manifest, shown as a notebook cell's value, printed every shard's entry; its repr is one
    line now (report.Manifest). Where Prefect persists flow results (PREFECT_RESULTS_PERSIST_BY_DEFAULT), the flow
    run's result, read back from the API, is the same manifest."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

    from wdsembed.report import Manifest

    config = make_config(make_dataset(tmp_path / "in", n_shards=2), tmp_path / "out", fidelity_sample=0)
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True, PREFECT_LOCAL_STORAGE_PATH: tmp_path / "r"}):
        manifest, run_id = embed(config)
    assert type(manifest) is Manifest and manifest["totals"]["computed"] == 2, manifest
    assert repr(manifest) == (f"Manifest(output={str(tmp_path / 'out')!r}, shards=2, computed=2, cached=0, "
                              f"failed_shards=0, rows={2 * ROWS}, embedded_rows={2 * EMBEDDED}, "
                              f"failed_rows=2, wall_seconds={manifest['totals']['wall_seconds']}, "
                              f"path={str(tmp_path / 'out' / '_manifest.json')!r})")
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["totals"] == manifest["totals"]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.name == "Completed" and str(tmp_path / "r") in state.data.storage_key, state.data
    stored = state.result()
    assert type(stored) is Manifest and stored == manifest


def test_artifacts_of_the_run(first_run):
    arts = artifacts(first_run["run_id"])
    assert set(arts) >= {"progress", "table", "markdown"}, set(arts)
    assert float(arts["progress"].data) == 100.0
    rows = table_rows(first_run["run_id"])
    assert sorted(rows) == STEMS4
    for row in rows.values():
        assert (row["rows"], row["embedded"], row["failed"], row["status"]) == (ROWS, EMBEDDED, 1, "computed")
        assert row["seconds"] > 0 and row["images_per_second"] > 0
    assert "4 computed, 0 cached" in arts["markdown"].data


def test_the_ui_says_why_rows_have_no_embedding(first_run):
    """Each demo shard has a failed download. The UI said '1 without embedding' and no more: the shard's task run
    log and the run's summary artifact now say why, with a key to look at."""
    config = first_run["config"]
    table = pq.read_table(Path(config.output) / "00000.parquet", columns=["key", "status"]).to_pylist()
    failed = [row["key"] for row in table if row["status"] != "success"]
    assert len(failed) == 1
    summary = artifacts(first_run["run_id"])["markdown"].data
    assert f"- 4 row(s) in 4 shard(s): HTTP Error 404: Not Found (e.g. shard `00000`, key `{failed[0]}`)" in summary
    said = run_logs(first_run["run_id"], "HTTP Error 404")
    assert (("embed-00000", f"shard 00000: embedded, 5 rows, 4 embedded, 1 without embedding (1: HTTP Error 404: "
             f"Not Found ({failed[0]}))") in [(name, message.rsplit(",", 1)[0]) for name, message in said]), said


def test_the_worker_says_in_its_first_task_runs_log_what_it_runs_on_and_with(first_run):
    """Nothing in a CPU run's log said the device, precision, batch size or threads it chose: its one worker says
    so once, under its first task run, before that shard's line."""
    said = run_logs(first_run["run_id"], "worker on ")
    lines = [(name, message) for name, message in said if message.startswith("worker on ")]
    assert len(lines) == 1, said
    assert re.fullmatch(rf"worker on cpu: {re.escape(TINY_MODEL)} in float32, channels_last, batches of 4; torch on "
                        r"\d+ thread\(s\), DALI on 1 \(--num-threads\)", lines[0][1]), lines
    own = [message for name, message in said if name == lines[0][0]]
    assert own.index(lines[0][1]) < next(i for i, m in enumerate(own) if m.startswith("shard ")), own


def test_the_progress_artifact_moves_once_per_few_seconds_where_shards_come_back_fast(first_run, monkeypatch):
    """Each move of the progress artifact is an API call that the loop collecting the shards waits for (0.1-0.2 s
    where the server is busy recording the run's task runs): one per percent took 17 s of a 53 s re-run of 2,000
    finished shards. Shards that come back together move it once, to 100%; each other move waits
    PROGRESS_UPDATE_EVERY_S after the one before."""
    import flows.embed

    moves, created = [], []
    create, update = flows.embed.create_progress_artifact, flows.embed.update_progress_artifact

    def created_at(*args, **kwargs):
        created.append(time.monotonic())
        return create(*args, **kwargs)

    def moved(artifact, percent, **kwargs):
        moves.append((time.monotonic(), percent))
        return update(artifact, percent, **kwargs)

    monkeypatch.setattr(flows.embed, "create_progress_artifact", created_at)
    monkeypatch.setattr(flows.embed, "update_progress_artifact", moved)
    manifest, run_id = embed(first_run["config"])  # 4 cached shards, back within a second or two
    assert isinstance(manifest, dict), manifest
    assert moves and moves[-1][1] == 100.0
    assert float(artifacts(run_id)["progress"].data) == 100.0
    assert len(moves) - 1 <= (moves[-1][0] - created[0]) / flows.embed.PROGRESS_UPDATE_EVERY_S, moves


def test_the_runs_log_and_progress_artifact_say_its_progress_as_shards_end(tmp_path, monkeypatch):
    """Where stdout is no terminal (a log file, a pipe), the command's bar shows only its last state, at the end, and
    the UI's progress artifact said only a percent: a run of hours said nothing of its pace, failures or time left
    until it ended. The flow run's log now says it (here at every shard, as PROGRESS_LOG_EVERY_S is 0; a line a
    minute by default), with the run's counts, and so does the artifact's description."""
    import re

    import flows.embed
    from wdsembed import progress

    monkeypatch.setattr(progress, "PROGRESS_LOG_EVERY_S", 0.0)
    data = make_dataset(tmp_path / "in", 3)
    config = make_config(data, tmp_path / "out")
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1000, "error": "fatal"}})
    outcome, run_id = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    said = [m for _, m in run_logs(run_id, "progress: 2 of 3") if m.startswith("progress: ")]
    counts = [re.fullmatch(r"progress: (\d) of 3 shard\(s\) ended \(\d+%\)(?:, (\d) failed)?"
                           r"(?:; (\d+) images at [\d.,]+ images/s)?(?:; about .+ left)?", m) for m in said]
    assert all(counts) and [int(c[1]) for c in counts] == [1, 2], said
    for c in counts:  # each line's counts of its moment: 4 images in each shard ended but the failed one
        ended, failed, images = int(c[1]), int(c[2] or 0), int(c[3] or 0)
        assert failed <= 1 and images == EMBEDDED * (ended - failed), said
    planned = f"3 shard(s) under {data}, their outputs to {config.output}"  # where to look, said at the start
    assert planned in [m for _, m in run_logs(run_id, planned)]
    description = artifacts(run_id)["progress"].description
    assert re.fullmatch(r"3 of 3 shard\(s\) ended \(100%\), 1 failed; 8 images at [\d.,]+ images/s", description), \
        description


def test_progress_updates_keep_one_per_percent_on_a_long_run():
    from flows.embed import PROGRESS_UPDATE_EVERY_S, ProgressUpdates

    def sent_for(total: int, seconds_per_shard: float) -> list[float]:
        sent, done = [], [0]
        updates = ProgressUpdates(total, sent.append, clock=lambda: done[0] * seconds_per_shard)
        for n in range(1, total + 1):
            done[0] = n
            updates.done(n)
        return sent

    # 200 shards of 10 s each: every other shard is a percent, 20 s apart
    assert sent_for(200, 10.0) == [float(p) for p in range(1, 101)]
    # 2,000 shards back within 10 s: at 5 s and at the end
    assert sent_for(2000, PROGRESS_UPDATE_EVERY_S / 1000) == [50.0, 100.0]
    assert sent_for(1, 0.0) == [100.0]


def test_second_run_is_all_cached_and_embeds_nothing(first_run, monkeypatch):
    config, root = first_run["config"], first_run["root"]
    before = {s: identity(Path(config.output) / f"{s}.parquet") for s in STEMS4}
    # Any shard whose task body runs now fails the flow: a pass proves that nothing was embedded.
    tripwire = Faults(root, monkeypatch, fail_if_run(STEMS4))

    def no_cluster(config):
        raise AssertionError("a run with nothing to compute must not start a Dask cluster")

    monkeypatch.setattr(cluster, "task_runner_kwargs", no_cluster)
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert [tripwire.attempts(s) for s in STEMS4] == [0, 0, 0, 0]
    assert embed_states(run_id, STEMS4) == {s: "Cached" for s in STEMS4}
    assert flow_run_state(run_id) == "Completed"
    assert manifest["totals"]["cached"] == 4 and manifest["totals"]["computed"] == 0
    assert manifest["totals"]["embedded_this_run"] == 0
    # each shard keeps the figures of the run that computed it
    first = first_run["manifest"]["shards"]
    assert {s: {k: v for k, v in manifest["shards"][s].items() if k != "status"} for s in STEMS4} == {
        s: {k: v for k, v in first[s].items() if k != "status"} for s in STEMS4}
    assert {s: identity(Path(config.output) / f"{s}.parquet") for s in STEMS4} == before
    rows = table_rows(run_id)
    assert {r["status"] for r in rows.values()} == {"cached"}
    assert sum(r["embedded"] for r in rows.values()) == 4 * EMBEDDED
    # Heartbeats (crash detection) with a server that outlives the process: the computing run sent them, the
    # run with nothing to compute (about a second) did not.
    assert heartbeats(first_run["run_id"], wait_for=1) >= 1
    assert heartbeats(run_id) == 0


def test_a_run_with_new_shards_keeps_the_groups_of_finished_ones_off_the_workers(tmp_path, monkeypatch):
    """A nightly re-run with a few new shards beside many finished ones: each group of finished shards is still a
    task run (Cached where the task cache holds that very group's result), but it runs in the flow's own threads,
    never on a Dask worker. There, where the cache had no result for the group (a run of more shards groups them
    otherwise; here, shards first embedded through the Python API), every such task run read its footers on a
    worker: 674 of them took 75 s ahead of 20 new shards beside 2,000 finished ones."""
    from wdsembed import shard
    from wdsembed.api import run_shards
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = make_dataset(tmp_path / "in", n_shards=2)
    config = make_config(data, tmp_path / "out", fidelity_sample=0)
    # in this process, with no task cache (the API starts no cluster: n_workers left at its default)
    first = config.model_copy(update={"n_workers": EmbedConfig.model_fields["n_workers"].default})
    assert sorted(r.stem for r in run_shards(first)) == ["00000", "00001"]
    write_shard(data, "00002", from_encoded(synthetic_images(2, seed=7)), shard_id=2)
    ran_here = _calls(monkeypatch, shard, "process_shards")
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert (manifest["totals"]["computed"], manifest["totals"]["cached"]) == (1, 2)
    assert sorted(plan.stem for args in ran_here for plan in args[1]) == ["00000", "00001"]  # not 00002
    assert set(embed_states(run_id, ["00000", "00001", "00002"]).values()) == {"Completed"}


def test_prefect_never_walks_the_shards_records_handed_to_the_report(first_run, monkeypatch):
    """The report task takes every shard's result and the earlier manifest's entries: Prefect looks through a task's
    parameters for futures and states, element by element, twice (about 30 s of the flow's process for 10,000
    shards, on every run). Handed over quoted, they are never walked: the flow's thread, where the report task runs,
    visits none of the shards' result dicts (each embedding task run looks at its own result, one level deep, in its
    own thread or on its worker)."""
    from prefect.utilities import collections as prefect_collections

    visited_results = []
    original = prefect_collections.visit_collection

    def visit(expr, *args, **kwargs):  # the recursion's own calls, below each top-level one
        if (threading.current_thread() is threading.main_thread() and isinstance(expr, dict)
                and {"stem", "cache_key"} <= expr.keys()):
            visited_results.append(expr["stem"])
        return original(expr, *args, **kwargs)

    monkeypatch.setattr(prefect_collections, "visit_collection", visit)
    manifest, _ = embed(first_run["config"])  # in this thread, as the command runs it
    assert isinstance(manifest, dict), manifest
    assert set(manifest["shards"]) == set(STEMS4)
    assert visited_results == []


def test_nothing_to_compute_reads_and_writes_nothing(first_run):
    """The pre-flight's question (plan.nothing_to_compute): yes only when every output carries this run's cache key;
    asking builds no index and rewrites no kNN view (the run's own planning rewrites the view)."""
    from wdsembed import plan
    from wdsembed.output import EMBEDDINGS_FOLDER

    config = first_run["config"]
    out, data = Path(config.output), Path(config.input)
    assert plan.nothing_to_compute(config)
    assert not plan.nothing_to_compute(config.model_copy(update={"force": True}))
    assert not plan.nothing_to_compute(config.model_copy(update={"model_name": "test_efficientnet.r160_in1k"}))
    assert not plan.nothing_to_compute(config.model_copy(update={"output": str(first_run["root"] / "elsewhere")}))
    view, index = out / EMBEDDINGS_FOLDER / "00003.parquet", data / "00003.idx"
    kept = view.read_bytes(), index.read_bytes()
    view.unlink()
    index.unlink()
    try:
        assert plan.nothing_to_compute(config)  # the view is not part of the answer; the full table is
        assert not view.exists() and not index.exists()
    finally:
        view.write_bytes(kept[0])
        index.write_bytes(kept[1])
    hidden = out / "00003.parquet.away"
    (out / "00003.parquet").rename(hidden)
    try:
        assert not plan.nothing_to_compute(config)
    finally:
        hidden.rename(out / "00003.parquet")


@pytest.fixture(scope="module")
def finished_by_api(tmp_path_factory):
    """Two shards embedded once through the Python API (in this process): 00000 with an .idx, 00001 with member
    names that a v1.2 .idx cannot hold (whitespace), read without one; and the command line that runs them again."""
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    root = tmp_path_factory.mktemp("rerun")
    write_shard(root / "in", "00000", [ShardSample(encode_image(make_image(32, 24, seed=i), "bmp"), ext="bmp")
                                       for i in range(2)])
    write_shard(root / "in", "00001", [ShardSample(encode_image(make_image(32, 24, seed=5 + i), "bmp"), ext="bmp",
                                                   key=f"a b{i}") for i in range(2)], parquet=False, stats=False)
    TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1,
                      fidelity_sample=0)(str(root / "in"), str(root / "out"))
    assert (root / "in" / "00000.idx").exists() and not (root / "in" / "00001.idx").exists()
    argv = [str(root / "in"), "-o", str(root / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu",
            "--batch-size", "2", "--num-threads", "1", "--n-workers", "1", "--fidelity-sample", "0"]
    return root, argv


def _calls(monkeypatch, module, name: str) -> list:
    """The arguments of every call of module.name from now on (it still runs)."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _rerun_totals(root: Path, argv: list[str]) -> dict:
    from flows.command import run_flow
    from wdsembed import cli

    assert cli.main(run_flow, argv) == 0
    return json.loads((root / "out" / "_manifest.json").read_text())["totals"]


@pytest.mark.parametrize("entry", ["command", "api"])
def test_a_rerun_with_nothing_to_compute_reads_no_tar(finished_by_api, monkeypatch, entry):
    """The planning (the flow's and the API's) builds a missing .idx only for the shards it will compute: a finished
    shard is never read, so one that cannot hold an .idx (or a damaged one) is not read to its end again on every
    re-run. Nor is its _stats.json: read by the checks and again by the planning, that was two GETs per shard of an
    object store for a run that computes nothing."""
    from wdsembed import shardindex, shards

    root, argv = finished_by_api
    built = _calls(monkeypatch, shardindex, "build_index")
    stats_read = _calls(monkeypatch, shards, "read_stats")
    if entry == "command":
        assert _rerun_totals(root, argv)["cached"] == 2  # nothing computed
    else:
        from wdsembed.api import TimmImageEmbedder

        results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=2,
                                    num_threads_per_worker=1, fidelity_sample=0)(str(root / "in"), str(root / "out"))
        assert sorted(r.cached for r in results) == [True, True]  # nothing computed
    assert built == [], f"a re-run with nothing to compute read {len(built)} tar(s) to index them"
    assert stats_read == [], f"a re-run with nothing to compute read {len(stats_read)} _stats.json file(s)"
    assert not (root / "in" / "00001.idx").exists()


@pytest.mark.parametrize("entry", ["command", "deployed-flow", "api"])
def test_a_rerun_with_nothing_to_compute_asks_once_and_reads_each_footer_once(finished_by_api, monkeypatch, entry):
    """Is every output finished? The checks ask once (plan.check_config: nothing_to_compute, listing the input and
    the output and reading every footer) and pass the answer to the run, in the command and in the deployed flow;
    the flow's planning judges each shard again, for its own state, from the footers the checks read where its
    listing of OUTPUT shows the same files (same size and mtime or ETag). It was asked twice and every footer read
    three times, then twice: on an object store, a round of GETs per shard for each read, for a run that computes
    nothing. The Python API's planning takes them likewise, and a finished shard's result from them: it ran every
    finished shard again (a task each on a Dask client), which read its footer a third time."""
    import flows.embed
    from wdsembed import cli, output, plan, shard

    root, argv = finished_by_api
    footers = _calls(monkeypatch, shard, "finished_output")
    read = _calls(monkeypatch, output, "read_footer")
    asked = _calls(monkeypatch, plan, "nothing_to_compute")
    monkeypatch.setattr(flows.embed, "nothing_to_compute", plan.nothing_to_compute)  # imported by name there
    if entry == "command":
        assert _rerun_totals(root, argv)["cached"] == 2  # nothing computed
    elif entry == "deployed-flow":
        from flows.deployed import embed as deployed

        config = cli.config_from_args(cli.build_parser().parse_args(argv))
        assert deployed(config)["totals"]["cached"] == 2
    else:
        from wdsembed.api import TimmImageEmbedder

        results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=2,
                                    num_threads_per_worker=1, fidelity_sample=0)(str(root / "in"), str(root / "out"))
        assert [(r.stem, r.cached, r.embedded) for r in results] == [("00000", True, 2), ("00001", True, 2)]
    assert len(asked) == 1
    per_shard = {}
    for args in footers:
        per_shard[args[1].stem] = per_shard.get(args[1].stem, 0) + 1
    assert per_shard == {"00000": 2, "00001": 2}
    tables = sorted(Path(str(args[0])).name for args in read if "_embeddings" not in str(args[0]))
    assert tables == ["00000.parquet", "00001.parquet"], tables


def test_the_flow_run_s_end_does_not_walk_the_manifest(finished_by_api, monkeypatch):
    """As a flow run ends, Prefect walks its return value for futures to resolve (none here): the manifest, every
    shard's entry, about 1 s of this process for 4,000 shards (0.2 s for 1,000) at the end of every run, a re-run
    with nothing to compute too. run() takes it quoted from the flow, unwalked, and returns the manifest itself."""
    import prefect.flow_engine

    import flows.embed
    from wdsembed import cli
    from wdsembed.report import Manifest

    root, argv = finished_by_api
    walked = _calls(monkeypatch, prefect.flow_engine, "resolve_futures_to_states")
    manifest = flows.embed.run(cli.config_from_args(cli.build_parser().parse_args(argv)))
    assert isinstance(manifest, Manifest) and sorted(manifest["shards"]) == ["00000", "00001"]
    assert manifest["totals"]["cached"] == 2
    assert walked, "the flow engine's walk of the return value was not reached: the test no longer looks at it"
    assert not [args for args in walked if isinstance(args[0], dict) and "shards" in args[0]], walked


def test_a_rerun_whose_task_cache_lacks_the_results_reads_each_footer_and_view_once(finished_by_api, monkeypatch,
                                                                                     tmp_path):
    """Where Prefect's task cache has no result for a group of finished shards (an empty --result-storage here; in
    use: outputs the Python API made, or a run of more shards that groups them otherwise), its task run takes the
    planning's verdict on each output, made holding OUTPUT's claim, under which nothing else writes there: it read
    each output's footer and its kNN view's again, in this process's threads (on an object store, two GETs per
    shard more)."""
    from wdsembed import output

    root, argv = finished_by_api
    read = _calls(monkeypatch, output, "read_footer")
    assert _rerun_totals(root, argv + ["--result-storage", str(tmp_path / "results")])["cached"] == 2
    reads = sorted(str(Path(str(args[0])).relative_to(root / "out")) for args in read)
    assert reads == ["00000.parquet", "00001.parquet", "_embeddings/00000.parquet", "_embeddings/00001.parquet"]


def test_ctrl_c_right_after_the_planning_counts_the_shards_finished_before(finished_by_api, capsys):
    """Ctrl-C as the flow has planned a re-run whose every output is finished: the closing line counted only the
    shards whose results had come back, and said '0 of 2 shard(s) finished, 2 not' of two whole outputs."""
    from flows.command import run_flow
    from wdsembed import cli

    root, argv = finished_by_api
    planned = []

    def stopped_after_planning(config, on_shard_done=None, all_finished=None):
        def hook(*args):
            on_shard_done(*args)
            planned.append(args)
            raise KeyboardInterrupt  # as Ctrl-C would, in the flow, before any shard's task came back

        return run_flow(config, on_shard_done=hook, all_finished=all_finished)

    assert cli.main(stopped_after_planning, argv) == 130
    assert len(planned) == 1 and planned[0][:3] == (None, 0, 2)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("run interrupted: 2 of 2 shard(s) finished, 0 not "), last
    assert sorted(p.name for p in (root / "out").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


def test_an_output_changed_since_the_checks_is_judged_by_its_new_footer(finished_by_api, tmp_path):
    """The planning takes the checks' footers only for outputs its own listing shows unchanged: one cut short, or
    replaced by a user's own parquet, after the checks (another run, a hand) is read again and recomputed or refused,
    as where the checks had not read it."""
    import shutil

    import pyarrow as pa

    from wdsembed import cli, output, plan

    root, argv = finished_by_api
    config = cli.config_from_args(cli.build_parser().parse_args(argv)).model_copy(
        update={"output": str(tmp_path / "out")})
    shutil.copytree(root / "out", tmp_path / "out")
    assert plan.check_config(config) is True
    cut = tmp_path / "out" / "00000.parquet"
    cut.write_bytes(cut.read_bytes()[:-100])
    plans, finished = plan.plan_run(config, listed=plan.Listed.after_checks(config))
    assert sorted(finished) == ["00001"]

    assert plan.check_config(config) is False  # 00000 to compute: the checks read the others' footers for the planning
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "00001.parquet")
    with pytest.raises(output.ForeignOutputError, match="00001.parquet"):
        plan.plan_run(config, listed=plan.Listed.after_checks(config))


def test_a_run_without_kNN_views_writes_none_and_one_with_them_adds_them_embedding_nothing(first_run, monkeypatch):
    """knn_view is not part of the cache key: turning it on or off embeds nothing again. Off, a finished shard's
    missing view stays missing; on, the flow's planning writes it from the full table."""
    import shutil

    from wdsembed.output import EMBEDDINGS_FOLDER

    config, root = first_run["config"], first_run["root"]
    views = Path(config.output) / EMBEDDINGS_FOLDER
    kept = {p.name: pq.read_table(p) for p in views.glob("*.parquet")}
    assert sorted(kept) == [f"{s}.parquet" for s in STEMS4]
    shutil.rmtree(views)
    tripwire = Faults(root, monkeypatch, fail_if_run(STEMS4))
    for knn_view in (False, True):
        manifest, run_id = embed(config.model_copy(update={"knn_view": knn_view}))
        assert isinstance(manifest, dict), manifest
        assert embed_states(run_id, STEMS4) == {s: "Cached" for s in STEMS4}
        assert views.exists() == knn_view
    assert [tripwire.attempts(s) for s in STEMS4] == [0, 0, 0, 0]
    assert {p.name: pq.read_table(p).select(["key", "image_embedding", "shard"]) for p in views.glob("*.parquet")} \
        == {name: t.select(["key", "image_embedding", "shard"]) for name, t in kept.items()}
    check_outputs(config, STEMS4)


def test_changes_recompute_only_what_changed(first_run, monkeypatch):
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    config, root = first_run["config"], first_run["root"]
    out, data = Path(config.output), Path(config.input)
    (out / "00000.parquet").unlink()  # a deleted output
    write_shard(data, "00001", from_encoded(synthetic_images(6, seed=42)))  # a rewritten shard: 6 images now
    damaged = out / "00002.parquet"  # a damaged output (cut short)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    untouched = identity(out / "00003.parquet")

    counted = Faults(root, monkeypatch, count_only(STEMS4))
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert [counted.attempts(s) for s in STEMS4] == [1, 1, 1, 0]
    assert embed_states(run_id, STEMS4) == {"00000": "Completed", "00001": "Completed", "00002": "Completed",
                                            "00003": "Cached"}
    status = {s: v["status"] for s, v in manifest["shards"].items()}
    assert status == {"00000": "computed", "00001": "computed", "00002": "computed", "00003": "cached"}
    assert manifest["shards"]["00001"]["rows"] == manifest["shards"]["00001"]["embedded"] == 6
    assert identity(out / "00003.parquet") == untouched
    check_outputs(config, ["00000", "00002", "00003"])
    check_outputs(config, ["00001"], rows=6, embedded=6)

    # Another model: every shard again, with that model's dimension.
    other = config.model_copy(update={"model_name": "test_efficientnet.r160_in1k"})
    counted = Faults(root, monkeypatch, count_only(STEMS4))
    manifest, run_id = embed(other)
    assert isinstance(manifest, dict), manifest
    assert [counted.attempts(s) for s in STEMS4] == [1, 1, 1, 1]
    assert manifest["totals"]["computed"] == 4
    assert set(embed_states(run_id, STEMS4).values()) == {"Completed"}
    assert manifest["model"]["name"] == "test_efficientnet.r160_in1k"
    assert manifest["model"]["cuda_graph"] is False  # the CPU path runs eagerly, uncompiled
    assert manifest["model"]["compiled"] is False
    dims = {read_output_metadata(str(out / f"{s}.parquet"), storage.filesystem(str(out))[0])["result"]["dim"]
            for s in STEMS4}
    assert dims == {manifest["model"]["dim"]}


# --------------------------------------------------------------------------------------------------- failures


def test_transient_fault_is_retried_and_a_deterministic_failure_fails_at_once(tmp_path, monkeypatch):
    import flows.embed

    data = make_dataset(tmp_path / "in")
    (data / "00001.tar").write_bytes(b"<html><body>503 Service Unavailable</body></html>\n" * 40)  # malformed
    config = make_config(data, tmp_path / "out")
    injected = Faults(tmp_path, monkeypatch, {
        "00000": {"fail_attempts": 1, "error": "io"},  # an I/O hiccup on the first attempt
        "00001": {"fail_attempts": 0},  # attempts counted
    })
    outcome, run_id = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    assert "00001: MalformedShardError" in str(outcome) and "not a tar file" in str(outcome)
    assert "00000" not in str(outcome) and "00002" not in str(outcome)
    assert injected.attempts("00000") == 2  # failed once, retried once
    assert injected.attempts("00001") == 1  # never retried
    assert outcome.transient == []  # the one failure left cannot pass on a re-run (the command says so)

    runs = task_runs(run_id, expected=3, names=["embed-00000", "embed-00001", "embed-00002"])
    assert runs["embed-00000"].state.name == "Completed" and runs["embed-00000"].run_count == 2
    assert runs["embed-00001"].state.is_failed() and runs["embed-00001"].run_count == 1
    assert runs["embed-00002"].state.name == "Completed" and runs["embed-00002"].run_count == 1

    # The good shards' outputs stay; the manifest and the artifacts name the failed one.
    check_outputs(config, ["00000", "00002"])
    assert not (Path(config.output) / "00001.parquet").exists()
    manifest = json.loads((Path(config.output) / "_manifest.json").read_text())
    assert list(manifest["failed_shards"]) == ["00001"]
    assert sorted(manifest["shards"]) == ["00000", "00002"]
    rows = table_rows(run_id)
    assert rows["00001"]["status"].startswith("FAILED") and "not a tar file" in rows["00001"]["status"]
    assert rows["00000"]["status"] == rows["00002"]["status"] == "computed"
    assert float(artifacts(run_id)["progress"].data) == 100.0


def test_failure_classes():
    from wdsembed.model import ModelLoadError
    from wdsembed.outputclaim import OutputClaimLostError
    from wdsembed.tarstream import ShardReadError

    assert faults.is_transient(faults.TransientError("throttled"))
    assert faults.is_transient(ConnectionResetError("reset"))
    assert faults.is_transient(TimeoutError("slow"))
    assert faults.is_transient(MemoryError("CUDA out of memory"))
    import aiohttp
    import botocore.exceptions as bex

    assert faults.is_transient(bex.ConnectionClosedError(endpoint_url="http://s3"))
    assert faults.is_transient(bex.EndpointConnectionError(endpoint_url="http://s3"))
    assert faults.is_transient(aiohttp.ServerDisconnectedError())
    assert not faults.is_transient(bex.NoCredentialsError())
    assert not faults.is_transient(ShardReadError("/d/00000.tar", 512, "bad tar header checksum"))
    assert not faults.is_transient(ModelLoadError("no weights for x"))
    assert not faults.is_transient(FileNotFoundError("/d/00000.tar"))
    assert not faults.is_transient(ValueError("malformed"))
    assert not faults.is_transient(OutputClaimLostError("shard /d/00000.tar: not written to output '/o'"))


def test_both_tasks_retry_on_one_rule_what_may_pass():
    """The index and embedding tasks share one retry condition, a one-liner over faults.worth_retrying: a group's
    ShardsFailed is retried where any of its shards' failures may pass, another error where it may itself."""
    import pickle

    from prefect.states import Completed, Failed

    import tasks.embed
    import tasks.index
    from tasks.retries import retry_if_transient
    from wdsembed.shard import ShardsFailed

    assert tasks.index.index_shards.retry_condition_fn is tasks.embed.embed_shards.retry_condition_fn
    assert tasks.embed.embed_shards.retry_condition_fn is retry_if_transient
    some = ShardsFailed({"00000": "OSError: reset", "00001": "MalformedShardError: x"}, transient=["00000"])
    none = ShardsFailed({"00001": "MalformedShardError: x"}, transient=[])
    cases = [(some, True), (pickle.loads(pickle.dumps(some)), True), (none, False),
             (ConnectionResetError("reset"), True), (faults.TransientError("throttled"), True),
             (FileNotFoundError("/d/00000.tar"), False), (ValueError("malformed"), False), (None, False)]
    for exc, retried in cases:
        assert faults.worth_retrying(exc) is retried, exc
        if exc is not None:
            assert retry_if_transient(None, None, Failed(data=exc)) is retried, exc
    assert retry_if_transient(None, None, Completed(data=[])) is False


def test_a_group_names_the_failed_shards_whose_failure_may_pass(tmp_path, monkeypatch):
    """Prefect retries a task whose group has one (tasks.embed), and the command tells them from the others."""
    from wdsembed import plan, shard

    data = make_dataset(tmp_path / "in", 2)
    config = make_config(data, tmp_path / "out")
    Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 1000, "error": "io"},
                                   "00001": {"fail_attempts": 1000, "error": "fatal"}})
    with pytest.raises(shard.ShardsFailed) as failed:
        shard.process_shards(config, plan.plan_shards(config))
    assert sorted(failed.value.failures) == ["00000", "00001"] and failed.value.transient == ["00000"]


def test_the_apis_failed_run_says_what_the_flows_does(tmp_path, monkeypatch):
    """ShardsFailed from the Python API carried neither the manifest it had written, nor the run's shard count, nor
    which failures may pass on a retry (an empty `transient` said none would): it now carries all three, as the
    flow's does."""
    from wdsembed import shard
    from wdsembed.api import run_shards

    data = make_dataset(tmp_path / "in", 3)
    config = make_config(data, tmp_path / "out", n_workers=None)  # the API starts no cluster
    Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 1000, "error": "io"},
                                   "00001": {"fail_attempts": 1000, "error": "fatal"}})
    with pytest.raises(shard.ShardsFailed) as failed:
        run_shards(config)
    exc = failed.value
    assert sorted(exc.failures) == ["00000", "00001"] and exc.transient == ["00000"] and exc.total == 3
    assert str(exc).startswith("2 of 3 shard(s) failed: ")
    written = json.loads((Path(config.output) / "_manifest.json").read_text())
    assert exc.manifest is not None and sorted(exc.manifest["failed_shards"]) == sorted(written["failed_shards"])
    assert list(exc.manifest["shards"]) == list(written["shards"]) == ["00002"]


def test_a_task_whose_run_lost_its_claim_puts_none_of_its_shards_in_place(tmp_path, monkeypatch):
    """The flow gives each embedding task its claim's run id (no flow parameter, in no cache key). Another run takes
    OUTPUT's claim over while the run's shard is embedded (held at its start on the worker): the task puts none of
    the shard's files in place and fails it naming that run, and Prefect does not retry it; nor does the flow
    replace the other run's manifest with its own."""
    import flows.embed
    from wdsembed import outputclaim

    data = make_dataset(tmp_path / "in", n_shards=1)
    config = make_config(data, tmp_path / "out")
    held = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0, "hold_s": 3}})
    claim = Path(config.output) / outputclaim.CLAIM_NAME
    other = json.dumps({**outputclaim.new_record(config), "run": "0123456789abcdef", "host": "another-host"})

    def take_over_once_the_shard_started() -> None:
        deadline = time.monotonic() + 240
        while not held.attempts("00000") and time.monotonic() < deadline:
            time.sleep(0.02)
        storage.write_atomic(storage.filesystem(str(claim))[0], str(claim), other.encode())
        manifest.write_text('{"run": "0123456789abcdef"}')

    manifest = Path(config.output) / "_manifest.json"
    taker = threading.Thread(target=take_over_once_the_shard_started)
    taker.start()
    try:
        outcome, run_id = embed(config)
    finally:
        taker.join(250)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    assert "00000: OutputClaimLostError: shard " in str(outcome), str(outcome)
    assert "it is now held by run 0123456789abcdef" in str(outcome), str(outcome)
    assert outcome.transient == [] and held.attempts("00000") == 1
    runs = task_runs(run_id, expected=1, names=["embed-00000"])
    assert runs["embed-00000"].state.is_failed() and runs["embed-00000"].run_count == 1
    out = Path(config.output)
    assert not (out / "00000.parquet").exists() and not (out / "_embeddings" / "00000.parquet").exists()
    assert not list(out.rglob(".*.tmp-*"))
    assert claim.read_text() == other  # the other run's, left to it
    assert manifest.read_text() == '{"run": "0123456789abcdef"}'
    assert "_manifest.json: this run's manifest: not written to output" in str(outcome), str(outcome)


def test_validation_names_each_problem(tmp_path):
    import numpy as np

    from wdsembed.output import build_output_table, write_parquet_atomic

    config = make_config(tmp_path, tmp_path / "out")
    path = str(tmp_path / "00007.parquet")
    emb = np.full((2, 8), 0.5, dtype=np.float32)  # norm sqrt(2), not 1
    table = build_output_table(rows=None, keys=["a", "b"], embeddings=emb, errors={}, dim=8)
    write_parquet_atomic(table, path, storage.filesystem(path)[0], metadata={})

    def problems(**expected) -> str:
        check = validate_output(config, path, **({"dim": 8, "expected_rows": 2, "expected_embedded": 2} | expected))
        assert check.output == path and not check.ok
        return "; ".join(check.problems)

    assert "L2 norm" in problems()
    assert "embedding lengths [8], expected 16" in problems(dim=16)
    assert "2 rows, expected 3" in problems(expected_rows=3)
    emb[0, 0] = np.nan
    write_parquet_atomic(build_output_table(rows=None, keys=["a", "b"], embeddings=emb, errors={}, dim=8), path,
                         storage.filesystem(path)[0], metadata={})
    assert "NaN" in problems()


def test_worker_killed_mid_shard_leaves_no_partial_output(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out")
    # The worker process dies (os._exit) after the first batch of 00001 went through the model.
    killed = Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest  # Dask ran the shard again on the restarted worker process
    assert killed.attempts("00001") == 2  # killed at the first batch, then one pass through
    assert manifest["totals"]["computed"] == 3 and not manifest["failed_shards"]
    # Said in the manifest (and so the summary), not only in the nanny's log line: the shard was run again.
    warned = [w for w in manifest["shards"]["00001"]["warnings"] if "its Dask worker died" in w]
    assert len(warned) == 1 and "Dask ran it again from its start" in warned[0], manifest["shards"]["00001"]
    assert not any("Dask worker died" in w for s in ("00000", "00002") for w in manifest["shards"][s]["warnings"])
    assert set(embed_states(run_id, ["00000", "00001", "00002"]).values()) == {"Completed"}
    check_outputs(config, ["00000", "00001", "00002"])

    tripwire = Faults(tmp_path, monkeypatch, fail_if_run(["00000", "00001", "00002"]))
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["cached"] == 3 and tripwire.attempts("00001") == 0
    check_outputs(config, ["00000", "00001", "00002"])


def test_the_api_says_a_shard_was_run_again_after_its_worker_died(tmp_path, monkeypatch):
    """The same death through the Python API, on a cluster of the caller's (dask_address): Dask ran 00001 again on
    the restarted worker and the shard came out whole, with no word of it in its result or the manifest, where the
    flow's says it."""
    from distributed import LocalCluster

    from wdsembed.api import run_shards

    data = make_dataset(tmp_path / "in", n_shards=2)
    killed = Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        config = make_config(data, tmp_path / "out", dask_address=local.scheduler_address, n_workers=None)
        results = run_shards(config)
    assert killed.attempts("00001") == 2
    manifest = json.loads((Path(config.output) / "_manifest.json").read_text())
    assert not manifest["failed_shards"] and manifest["totals"]["computed"] == 2
    warned = [w for w in manifest["shards"]["00001"]["warnings"] if "its Dask worker died" in w]
    assert len(warned) == 1 and "Dask ran it again from its start" in warned[0], manifest["shards"]["00001"]
    assert [w for w in results[1].warnings if "its Dask worker died" in w] == warned
    assert not any("Dask worker died" in w for w in manifest["shards"]["00000"]["warnings"])
    check_outputs(config, ["00000", "00001"])


def test_killed_worker_fails_the_shard_and_the_next_run_resumes(tmp_path, monkeypatch):
    import flows.embed

    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out")
    killed = Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    # No rescheduling: the lost worker fails its shard (KilledWorker), as after Dask's last reschedule.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        outcome, run_id = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    assert "00001" in str(outcome) and "KilledWorker" in str(outcome)
    assert killed.attempts("00001") == 1
    crashed = task_runs(run_id, expected=3, names=["embed-00001"])["embed-00001"]
    assert crashed.state.name == "Crashed"  # not left Running in the UI
    assert not (Path(config.output) / "00001.parquet").exists()
    check_outputs(config, ["00000", "00002"])

    counted = Faults(tmp_path, monkeypatch, count_only(["00000", "00001", "00002"]))
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert [counted.attempts(s) for s in ["00000", "00001", "00002"]] == [0, 1, 0]
    assert {s: v["status"] for s, v in manifest["shards"].items()} == {
        "00000": "cached", "00001": "computed", "00002": "cached"}
    check_outputs(config, ["00000", "00001", "00002"])


def test_a_lost_worker_does_not_fail_the_shards_its_group_had_written(tmp_path, monkeypatch):
    """A group's task lost with its worker (KilledWorker) fails the shards it had not written; a shard of the group
    written whole before the death is reported finished, as its output is."""
    import flows.embed

    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out", shards_per_task=2, n_workers=2)  # groups 00000..00001 and 00002
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # as after Dask's last reschedule
        outcome, _ = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    assert sorted(outcome.failures) == ["00001"] and "KilledWorker" in outcome.failures["00001"]
    assert sorted(outcome.manifest["shards"]) == ["00000", "00002"]
    assert outcome.manifest["shards"]["00000"]["status"] == "computed"
    check_outputs(config, ["00000", "00002"])


def test_a_group_run_again_after_its_worker_died_keeps_the_shards_it_had_written(tmp_path, monkeypatch):
    """A group's worker killed in its second shard, after its first was written: Dask ran the task again (not a
    Prefect retry), and that run took itself for the first attempt, skipped looking for the outputs the planning
    had found absent, and embedded 00000 a second time. It finds 00000 written instead."""
    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out", shards_per_task=2)  # groups 00000..00001 and 00002
    counted = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0}, "00002": {"fail_attempts": 0},
                                             "00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert counted.attempts("00001") == 2  # killed at its first batch, then one pass through
    assert counted.attempts("00000") == 1 and counted.attempts("00002") == 1  # 00000 not embedded again
    assert not manifest["failed_shards"] and sorted(manifest["shards"]) == ["00000", "00001", "00002"]
    assert set(embed_states(run_id, ["00000..00001", "00002"]).values()) == {"Completed"}
    check_outputs(config, ["00000", "00001", "00002"])


# --------------------------------------------------------------------------------------------------- scale-out


def test_shard_groups_keep_a_run_within_a_thousand_task_runs_unless_the_size_is_set():
    from wdsembed.plan import TASK_RUNS_PER_RUN, shard_groups

    assert TASK_RUNS_PER_RUN == 1000

    def sizes(n, per_task=None):
        groups = shard_groups(list(range(n)), per_task)
        assert [x for g in groups for x in g] == list(range(n))  # every shard once, in order
        return [len(g) for g in groups]

    assert sizes(0) == [] and sizes(16) == [1] * 16 and sizes(1000) == [1] * 1000
    assert sizes(1001) == [2] * 500 + [1]  # the fewest per group that keep it within 1,000 task runs
    assert sizes(20_000) == [20] * 1000 and len(sizes(41_407)) == 986
    assert sizes(12, 5) == [5, 5, 2] and sizes(5000, 1) == [1] * 5000  # set: taken as it is


# The task runs of three shards in groups of two: the first two shards' and the third's.
GROUPED = ("embed-00000..00001", "embed-00002")


def test_a_run_over_the_task_run_limit_groups_its_shards_by_default(tmp_path, monkeypatch):
    from wdsembed import plan

    monkeypatch.setattr(plan, "TASK_RUNS_PER_RUN", 2)  # three shards: two task runs, of two shards and one
    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out")
    assert config.shards_per_task is None
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 3
    runs = task_runs(run_id, expected=2, names=GROUPED)
    assert {name for name in runs if name.startswith("embed-")} == {"embed-00000..00001", "embed-00002"}
    check_outputs(config, ["00000", "00001", "00002"])


def test_shards_grouped_per_task(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out", shards_per_task=2)
    stems = ["00000", "00001", "00002"]
    counted = Faults(tmp_path, monkeypatch, count_only(stems))
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 3
    runs = task_runs(run_id, expected=2, names=GROUPED)
    embed_runs = {name: r.state.name for name, r in runs.items() if name.startswith("embed-")}
    assert embed_runs == {"embed-00000..00001": "Completed", "embed-00002": "Completed"}
    # every task run is named for what it does, without Prefect's random suffix
    assert set(task_runs(run_id, expected=4, names=["index-shards", "report"])) == {
        "index-shards", "embed-00000..00001", "embed-00002", "report"}
    assert not [name for name in runs if name.startswith("validate-")]  # validated inside the group's task run
    assert [counted.attempts(s) for s in stems] == [1, 1, 1]
    check_outputs(config, stems)

    tripwire = Faults(tmp_path, monkeypatch, fail_if_run(stems))
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["cached"] == 3 and [tripwire.attempts(s) for s in stems] == [0, 0, 0]
    runs = task_runs(run_id, expected=2, names=GROUPED)
    assert {runs["embed-00000..00001"].state.name, runs["embed-00002"].state.name} == {"Cached"}

    # --force: everything again, cache or not.
    counted = Faults(tmp_path, monkeypatch, count_only(stems))
    manifest, run_id = embed(config.model_copy(update={"force": True}))
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 3 and [counted.attempts(s) for s in stems] == [1, 1, 1]
    check_outputs(config, stems)


def test_a_groups_retry_finds_the_shards_its_first_try_wrote(tmp_path, monkeypatch):
    """A group's first try writes its shards without looking for their outputs (the planning found them absent);
    its retry looks, and takes the shard the first try wrote as done, embedding only the one that failed."""
    data = make_dataset(tmp_path / "in")
    config = make_config(data, tmp_path / "out", shards_per_task=2)
    injected = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0},
                                              "00001": {"fail_attempts": 1, "error": "io"}})
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert injected.attempts("00000") == 1 and injected.attempts("00001") == 2
    runs = task_runs(run_id, expected=2, names=GROUPED)
    assert runs["embed-00000..00001"].run_count == 2
    assert manifest["totals"]["computed"] == 3
    check_outputs(config, ["00000", "00001", "00002"])


def test_existing_scheduler_with_two_workers(tmp_path):
    """As on several nodes: `dask scheduler`, then a `dask worker` per node (here two, on loopback)."""
    from distributed import Client

    data = make_dataset(tmp_path / "in")
    scheduler_file = tmp_path / "scheduler.json"
    # Unbuffered: the workers' task-run log lines must reach their log files before the processes are stopped.
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                        "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("WDSEMBED_FAULTS", None)
    procs = [start_process([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                            "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log", env)]
    try:
        address = scheduler_address(procs[0], scheduler_file, tmp_path / "scheduler.log")
        for i in range(2):
            procs.append(start_process([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                        "--no-dashboard", "--name", f"node{i}"], tmp_path / f"worker{i}.log", env))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)

        config = make_config(data, tmp_path / "out", dask_address=address, n_workers=None)
        manifest, run_id = embed(config)
        assert isinstance(manifest, dict), manifest
        assert manifest["totals"]["computed"] == 3 and manifest["totals"]["embedded"] == 3 * EMBEDDED
        assert set(embed_states(run_id, ["00000", "00001", "00002"]).values()) == {"Completed"}
        check_outputs(config, ["00000", "00001", "00002"])
        # One task per worker first (the head start), each on a worker of its own, then the third.
        timeline = manifest["timeline"]
        assert timeline["planned"] < timeline["first_started"] <= timeline["submitted"]
        assert manifest["shards"]["00000"]["timeline"]["worker"] != manifest["shards"]["00001"]["timeline"]["worker"]
        with Client(address, timeout=60) as client:  # both workers still there, and both were used
            assert len(client.scheduler_info()["workers"]) == 2
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    worked = [i for i in range(2) if "embed-" in (tmp_path / f"worker{i}.log").read_text()]
    assert worked == [0, 1], "every worker should have embedded a shard"


def test_a_run_beside_a_current_dask_client_runs_where_its_config_says_and_says_where(tmp_path):
    """A Dask client of the caller's current in the process (a notebook's `Client(...)`): prefect-dask's task runner
    ran the flow on its workers whatever the run was given, its n_workers and its dask_address dropped without a
    word. A run that sizes a cluster of its own beside it is refused, naming both, before any work; one given
    dask_address runs there; one given neither runs on the current client's workers and says so (their scheduler's
    address and their number). The caller's client stays current and its cluster up."""
    import flows.embed
    from distributed import Client, LocalCluster, default_client

    data = make_dataset(tmp_path / "in", n_shards=1)
    one_worker = dict(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1"})
    with LocalCluster(**one_worker) as theirs, LocalCluster(**one_worker) as asked, Client(theirs) as current, \
            Client(asked, set_as_default=False) as asked_client:
        pids = {"theirs": set(current.run(os.getpid).values()), "asked": set(asked_client.run(os.getpid).values())}

        def ran_on(manifest: dict) -> str:
            assert isinstance(manifest, dict) and manifest["totals"]["computed"] == 1, manifest
            pid = int(manifest["shards"]["00000"]["timeline"]["worker"].rsplit(":", 1)[1])
            return next(name for name, its in pids.items() if pid in its)

        refused_out = tmp_path / "refused"
        with pytest.raises(ValueError) as refused:
            flows.embed.run(make_config(data, refused_out, n_workers=2))
        said = str(refused.value)
        assert "n_workers=2" in said and theirs.scheduler_address in said and "1 worker(s)" in said, said
        assert "client.close()" in said, said
        assert not refused_out.exists()  # refused before the output was claimed

        manifest, _ = embed(make_config(data, tmp_path / "there", dask_address=asked.scheduler_address,
                                        n_workers=None))
        assert ran_on(manifest) == "asked"
        assert default_client() is current

        manifest, flow_run_id = embed(make_config(data, tmp_path / "here", n_workers=None))
        assert ran_on(manifest) == "theirs"
        said = f"its scheduler at {theirs.scheduler_address} and its 1 worker(s)"
        assert [m for w, m in run_logs(flow_run_id, said) if w == "flow" and said in m], said  # the UI's too
        assert default_client() is current and len(current.scheduler_info()["workers"]) == 1
    check_outputs(make_config(data, tmp_path / "there"), ["00000"])
    check_outputs(make_config(data, tmp_path / "here"), ["00000"])


def test_a_run_called_in_a_dask_task_is_refused_where_its_config_asks_for_another_cluster(tmp_path):
    """Called in a task of a Dask worker (a parent flow's task on a Dask task runner), prefect-dask's task runner
    takes that worker's client (distributed.get_client) whatever it is given, a dask_address included; the check
    for a current client asked distributed.default_client, which knows no such client: a run sizing a cluster of its
    own, or naming another scheduler, ran on the worker's scheduler without a word. Refused, naming both, before any
    work (its output not claimed)."""
    from distributed import Client, LocalCluster

    data = make_dataset(tmp_path / "in", n_shards=1)
    outs = [tmp_path / "sized", tmp_path / "elsewhere"]
    configs = [make_config(data, outs[0], n_workers=2),
               make_config(data, outs[1], n_workers=None, dask_address="tcp://127.0.0.1:9")]

    def called_in_a_task(config):
        import flows.embed

        try:
            flows.embed.run(config)
        except ValueError as exc:
            return str(exc)
        return "ran"

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}) as theirs, \
            Client(theirs, set_as_default=False) as client:
        said = [client.submit(called_in_a_task, c, pure=False).result(timeout=300) for c in configs]
    assert "n_workers=2" in said[0] and theirs.scheduler_address in said[0], said[0]
    assert "a task of a Dask worker" in said[0] and "outside a Dask task" in said[0], said[0]
    assert "tcp://127.0.0.1:9" in said[1] and theirs.scheduler_address in said[1], said[1]
    assert not any(out.exists() for out in outs)  # refused before the output was claimed


def test_a_run_beside_a_current_dask_client_keys_its_shards_by_the_gpus_its_workers_see(tmp_path):
    """The flow's planning asked this process whether the run's workers see a GPU, not the current client's workers
    it runs on: from a notebook on a host without a GPU, beside a GPU cluster's client, a --device auto
    --no-autocast run (float32 on those GPUs) was keyed as the CPU's outputs (autocast on), so a re-run with
    autocast on (bfloat16 there) took them as its own and recomputed nothing. This host has no GPU: the workers are
    told to see one (wdsembed.cluster.visible_gpus, which workers_gpus asks them), and the model still runs on their
    CPU; what is checked is the key."""
    from distributed import Client, LocalCluster

    from wdsembed import shard
    from wdsembed.plan import plan_run

    data = make_dataset(tmp_path / "in", n_shards=1)
    out = tmp_path / "out"
    config = make_config(data, out, device="auto", autocast=False, n_workers=None)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1"}) as theirs, Client(theirs) as current:
        current.run(exec, "import wdsembed.cluster as c; c.visible_gpus = lambda: 1")
        assert cluster.workers_gpus(current) == 1 and cluster.visible_gpus() == 0
        manifest, _ = embed(config)
        assert isinstance(manifest, dict) and manifest["totals"]["computed"] == 1, manifest
        key = read_output_metadata(str(out / "00000.parquet"), storage.filesystem(str(out))[0])["cache_key"]
        (plan,), _ = plan_run(config, gpus=1)
        assert not plan.on_cpu and key == shard.cache_key(config, plan)  # float32 on a GPU, not the CPU's key
        manifest, _ = embed(config.model_copy(update={"autocast": True}))
        assert isinstance(manifest, dict) and manifest["totals"]["computed"] == 1, manifest  # not taken as its own

def test_the_gpus_this_process_sees_are_torchs_count_and_need_no_torch_where_no_gpu_driver_is_installed():
    """visible_gpus (the planning of a --device auto run asks it, also a re-run with nothing to compute) imported
    torch to count GPUs: seconds of a re-run that loads no model, on a host without any GPU driver, where torch
    counts none either. It answers what torch answers, without importing it where there is no driver."""
    import subprocess

    code = ("import sys; from wdsembed import cluster; n = cluster.visible_gpus(); torch_imported = 'torch' in "
            "sys.modules; driver = cluster._gpu_driver_present(); import torch; "
            "print(n, torch.cuda.device_count(), torch_imported, driver)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          cwd=Path(__file__).parent.parent)
    seen, torchs, torch_imported, driver = done.stdout.split()
    assert seen == torchs, done.stdout
    if driver == "False":  # this host (no NVIDIA driver, no ROCm): no torch import for its answer
        assert torch_imported == "False", done.stdout


class _SchedulerAndWorker:
    """A `dask scheduler` and one single-threaded `dask worker` on loopback, in processes of their own (a cluster
    of the user's, as with --dask-address), with the test's WDSEMBED_FAULTS; `lose()` kills the scheduler."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> "_SchedulerAndWorker":
        env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        scheduler_file = self.folder / "scheduler.json"
        self.scheduler = start_process([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                       self.folder / "scheduler.log", env)
        self.worker = None
        try:
            self.address = scheduler_address(self.scheduler, scheduler_file, self.folder / "scheduler.log")
            self.worker = start_process([str(BIN / "dask"), "worker", self.address, "--nthreads", "1",
                                         "--no-dashboard"], self.folder / "worker.log", env)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in (self.worker, self.scheduler):
            if proc is not None:
                stop_process(proc)

    def signal(self, signum) -> None:
        os.killpg(self.scheduler.pid, signum)


def _wait_for(condition, thread: threading.Thread, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and thread.is_alive(), log.read_text()[-3000:]
        time.sleep(0.1)


def _manifest_agrees_with_output(config: EmbedConfig, manifest: dict, stems) -> None:
    """Each shard is in the manifest's shards where its output is whole, in its failed shards where it is not."""
    from wdsembed.plan import plan_shards

    whole = {r["stem"] for r in caching.written_results(config, plan_shards(config))}
    assert set(manifest["shards"]) == whole, (sorted(manifest["shards"]), sorted(whole))
    assert set(manifest["failed_shards"]) == set(stems) - whole, (manifest["failed_shards"], sorted(whole))


def test_a_flow_that_lost_its_scheduler_ends_without_waiting_for_it(tmp_path, monkeypatch):
    """The `dask scheduler` of --dask-address killed while 00001 is mid-shard, 00000 finished and 00002 waiting:
    the run's futures end at once, cancelled, but the flow then asked the gone scheduler for its event log and the
    workers' report, each call waiting for Dask's client to reconnect, up to Dask's connect timeout (30 s by
    default, 10 minutes here, as on a slow network), holding OUTPUT's claim. Now it ends as soon as its shards have
    come back: 00000 finished, 00001 and 00002 failed saying the scheduler was lost and that they may pass, and
    the client's close, cutting its reconnecting short, logs no traceback."""
    import logging
    import signal

    import flows.embed

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    said = Records()  # what Dask's client logs, where the terminal shows it (its logger does not propagate)
    client_log = logging.getLogger("distributed.client")
    monkeypatch.setattr(client_log, "handlers", [*client_log.handlers, said])
    data = make_dataset(tmp_path / "in", n_shards=3)
    held = Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 0, "hold_s": 900, "where": "batch"}})
    with _SchedulerAndWorker(tmp_path) as dask_cluster, \
            dask.config.set({"distributed.comm.timeouts.connect": "600s"}):
        config = make_config(data, tmp_path / "out", dask_address=dask_cluster.address, n_workers=None)
        thread, ended = in_a_thread(lambda: embed(config)[0])
        _wait_for(lambda: held.attempts("00001"), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGKILL)
        thread.join(120)  # far less than the client's 10 minutes of reconnecting
        assert not thread.is_alive(), "the flow still waits for its lost scheduler"
    outcome = ended["outcome"]
    assert isinstance(outcome, flows.embed.ShardsFailed), repr(outcome)
    assert sorted(outcome.failures) == ["00001", "00002"], outcome.failures
    for reason in outcome.failures.values():
        assert f"the Dask scheduler at {dask_cluster.address} was lost mid-run" in reason, reason
    assert sorted(outcome.transient) == ["00001", "00002"]
    _manifest_agrees_with_output(config, outcome.manifest, ["00000", "00001", "00002"])
    assert not (Path(config.output) / "_claim.json").exists()
    check_outputs(config, ["00000"])
    tracebacks = [r for r in said.records if r.exc_info]
    assert not tracebacks, [(r.getMessage(), r.exc_info[0]) for r in tracebacks]


def test_a_flow_whose_scheduler_is_lost_as_its_first_task_starts_submits_no_more(tmp_path, monkeypatch):
    """The `dask scheduler` of --dask-address killed while the flow waits for its first task to start (before it
    submits the others): the others were submitted all the same, to a client waiting for its scheduler to come
    back, and each waited that long (Dask's connect timeout: 30 s by default, 10 minutes here), then failed as
    'its Dask task was cancelled (unknown)'. Now the flow submits nothing more once its scheduler is lost, and
    each shard not submitted fails with the lost scheduler's reason, that may pass on a re-run."""
    import signal

    import flows.embed

    data = make_dataset(tmp_path / "in", n_shards=3)
    with _SchedulerAndWorker(tmp_path) as dask_cluster, \
            dask.config.set({"distributed.comm.timeouts.connect": "600s"}):
        wait = cluster.TaskStarts.wait

        def lose_the_scheduler_first(self, *args, **kwargs):  # the real wait, the scheduler gone as it begins
            dask_cluster.signal(signal.SIGKILL)
            deadline = time.monotonic() + 60
            while self.client.status == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            return wait(self, *args, **kwargs)

        monkeypatch.setattr(cluster.TaskStarts, "wait", lose_the_scheduler_first)
        config = make_config(data, tmp_path / "out", dask_address=dask_cluster.address, n_workers=None)
        thread, ended = in_a_thread(lambda: embed(config)[0])
        thread.join(120)  # far less than the client's 10 minutes of reconnecting
        assert not thread.is_alive(), "the flow still waits for its lost scheduler"
    outcome = ended["outcome"]
    assert isinstance(outcome, flows.embed.ShardsFailed), repr(outcome)
    assert sorted(outcome.failures) == ["00000", "00001", "00002"], outcome.failures
    for reason in outcome.failures.values():
        assert f"the Dask scheduler at {dask_cluster.address} was lost mid-run" in reason, reason
    assert sorted(outcome.transient) == ["00000", "00001", "00002"]
    assert not list(Path(config.output).glob("0000*.parquet"))


def test_a_shard_its_worker_wrote_whole_after_the_flow_lost_its_scheduler_counts_finished(tmp_path, monkeypatch):
    """The `dask scheduler` of --dask-address frozen while the worker finishes 00000 (held before its table), so
    that the worker writes it whole while its result cannot reach the run, then killed: the manifest listed it
    among the failed shards beside its output. A shard given up on with its scheduler is counted by its output as
    the manifest is written: 00000 finished, 00001 (never started) failed. (The run no longer waits for its lost
    scheduler, holding OUTPUT: a worker's write once the run has ended is refused. Written before the loss, here.)"""
    import signal

    import flows.embed

    data = make_dataset(tmp_path / "in", n_shards=2)
    held = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0, "hold_s": 3, "where": "table"}})
    with _SchedulerAndWorker(tmp_path) as dask_cluster:
        config = make_config(data, tmp_path / "out", dask_address=dask_cluster.address, n_workers=None)
        thread, ended = in_a_thread(lambda: embed(config)[0])
        _wait_for(lambda: held.attempts("00000"), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGSTOP)
        _wait_for(lambda: (Path(config.output) / "00000.parquet").exists(), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGKILL)
        thread.join(240)
        assert not thread.is_alive()
    outcome = ended["outcome"]
    assert isinstance(outcome, flows.embed.ShardsFailed), repr(outcome)
    _manifest_agrees_with_output(config, outcome.manifest, ["00000", "00001"])
    assert outcome.manifest["shards"]["00000"]["status"] == "computed"
    assert sorted(outcome.failures) == ["00001"] and "was lost mid-run" in outcome.failures["00001"]
    check_outputs(config, ["00000"])


def test_a_shard_lost_with_the_scheduler_is_crashed_in_the_ui(tmp_path, monkeypatch):
    """The `dask scheduler` of --dask-address killed while 00000 runs (frozen first until its worker has written
    it) and 00001 waits its turn: the run ended Failed naming 00001, and the UI had no task run of it (its task
    never started on a worker), or, for a shard whose worker went with the scheduler, one left Running. Each shard
    given up on with its scheduler is Crashed under its shard's name, its message the reason."""
    import signal

    import flows.embed

    data = make_dataset(tmp_path / "in", n_shards=2)
    held = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0, "hold_s": 3, "where": "table"}})
    with _SchedulerAndWorker(tmp_path) as dask_cluster:
        config = make_config(data, tmp_path / "out", dask_address=dask_cluster.address, n_workers=None)
        thread, ended = in_a_thread(lambda: embed(config))
        _wait_for(lambda: held.attempts("00000"), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGSTOP)
        _wait_for(lambda: (Path(config.output) / "00000.parquet").exists(), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGKILL)
        thread.join(240)
        assert not thread.is_alive()
    outcome, run_id = ended["outcome"]
    assert isinstance(outcome, flows.embed.ShardsFailed) and sorted(outcome.failures) == ["00001"], outcome
    runs = task_runs(run_id, expected=4, names=["embed-00000", "embed-00001"])
    assert "embed-00001" in runs, sorted(runs)
    crashed = runs["embed-00001"].state
    assert crashed.name == "Crashed" and "00001" in crashed.message and "was lost mid-run" in crashed.message, crashed
    assert runs["embed-00000"].state.name == "Completed", runs["embed-00000"].state  # its worker ended it


def test_a_shard_written_whole_as_the_api_lost_its_scheduler_counts_finished(tmp_path, monkeypatch):
    """The same through the Python API: 00000 written whole by its worker while the scheduler was frozen, the
    scheduler then killed before it passed the result on. The API listed 00000 among the failed shards, its output
    beside the manifest. Unlike the flow's, the API's worker may hold 00001 in its queue as the scheduler goes, and
    run it next: held here past the run's end (its worker is stopped with the cluster), so that it cannot end while
    the run ends: a shard ended just after the run has counted its outputs, while it still holds OUTPUT, is
    test_a_shard_its_worker_ends_after_the_api_counted_it_is_not_written's."""
    import signal

    from wdsembed.api import run_shards
    from wdsembed.shard import ShardsFailed

    data = make_dataset(tmp_path / "in", n_shards=2)
    held = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0, "hold_s": 1, "where": "table"},
                                          "00001": {"fail_attempts": 0, "hold_s": 600, "where": "table"}})
    with _SchedulerAndWorker(tmp_path) as dask_cluster:
        config = make_config(data, tmp_path / "out", dask_address=dask_cluster.address, n_workers=None)
        thread, ended = in_a_thread(lambda: run_shards(config))
        _wait_for(lambda: held.attempts("00000"), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGSTOP)
        _wait_for(lambda: (Path(config.output) / "00000.parquet").exists(), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGKILL)
        thread.join(240)
        assert not thread.is_alive()
    outcome = ended["outcome"]
    written = json.loads((Path(config.output) / "_manifest.json").read_text())
    assert isinstance(outcome, ShardsFailed), repr(outcome)
    _manifest_agrees_with_output(config, outcome.manifest, ["00000", "00001"])
    assert sorted(written["shards"]) == ["00000"] and sorted(written["failed_shards"]) == ["00001"]
    assert [r.stem for r in outcome.results] == ["00000"] and sorted(outcome.failures) == ["00001"]
    check_outputs(config, ["00000"])


def _count_then_let_the_worker_write(monkeypatch, gate: Path, output: Path, worker_log: Path) -> None:
    """The run's last count of the outputs of the shards it gave up on (caching.written_after_all, which the flow
    and the API call alike), then the worker's hold (`gate`) released, and the count handed back once the worker has
    written the shard (`output`) or said why not (in `worker_log`): a worker that ends a shard just after the run
    counted it, while the run holds OUTPUT."""
    count = caching.written_after_all

    def counted_then_released(*args):
        found = count(*args)
        gate.touch()
        deadline = time.monotonic() + 60
        while not (output.exists() or "gave up on it" in worker_log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return found

    monkeypatch.setattr(caching, "written_after_all", counted_then_released)


def _lose_the_scheduler_as_a_shard_ends(tmp_path, monkeypatch, start) -> tuple[EmbedConfig, object]:
    """A run of one shard on a `dask scheduler` and worker of its own (--dask-address), the scheduler killed while
    the worker holds 00000 (every image embedded, its table not yet written) until the run has counted it: the
    config and what the run (`start(config)`) ended with."""
    import signal

    data = make_dataset(tmp_path / "in", n_shards=1)
    gate = tmp_path / "gate"
    held = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0, "hold_until": str(gate), "where": "table"}})
    with _SchedulerAndWorker(tmp_path) as dask_cluster:
        config = make_config(data, tmp_path / "out", dask_address=dask_cluster.address, n_workers=None)
        _count_then_let_the_worker_write(monkeypatch, gate, Path(config.output) / "00000.parquet",
                                         tmp_path / "worker.log")
        thread, ended = in_a_thread(lambda: start(config))
        _wait_for(lambda: held.attempts("00000"), thread, tmp_path / "worker.log")
        dask_cluster.signal(signal.SIGKILL)
        thread.join(240)
        assert not thread.is_alive()
    return config, ended["outcome"]


def test_a_shard_its_worker_ends_after_the_api_counted_it_is_not_written(tmp_path, monkeypatch):
    """The Python API gave up on 00000 as its scheduler was lost, and counted its output (none yet) for the
    manifest; the worker, outliving the scheduler, then wrote it whole under the run's claim, still held: the
    manifest listed it failed beside its whole output. The run now closes the shards it gave up on before it counts
    them: the worker writes nothing of it, and the manifest and the outputs agree."""
    from wdsembed.api import run_shards
    from wdsembed.shard import ShardsFailed

    config, outcome = _lose_the_scheduler_as_a_shard_ends(tmp_path, monkeypatch, run_shards)
    assert isinstance(outcome, ShardsFailed), repr(outcome)
    _manifest_agrees_with_output(config, outcome.manifest, ["00000"])
    assert sorted(outcome.failures) == ["00000"] and not (Path(config.output) / "00000.parquet").exists()
    assert "gave up on it" in (tmp_path / "worker.log").read_text()  # the worker's one line, naming the shard
    check_outputs(config, [])  # no temp file, no marker
    assert not (Path(config.output) / "_claim.json").exists()


def test_a_shard_its_worker_ends_after_the_flow_counted_it_is_not_written(tmp_path, monkeypatch):
    """The same through the flow, which counts the shards it gave up on with the same function."""
    import flows.embed

    config, outcome = _lose_the_scheduler_as_a_shard_ends(tmp_path, monkeypatch, lambda c: embed(c)[0])
    assert isinstance(outcome, flows.embed.ShardsFailed), repr(outcome)
    _manifest_agrees_with_output(config, outcome.manifest, ["00000"])
    assert sorted(outcome.failures) == ["00000"] and not (Path(config.output) / "00000.parquet").exists()
    assert "gave up on it" in (tmp_path / "worker.log").read_text()
    check_outputs(config, [])
    assert not (Path(config.output) / "_claim.json").exists()


def test_result_storage(tmp_path):
    from prefect.blocks.core import Block
    from prefect.filesystems import RemoteFileSystem

    from tasks.embed import result_storage_for

    config = make_config(tmp_path / "in", tmp_path / "out")
    assert result_storage_for(config) == tmp_path / "out" / caching.RESULTS_FOLDER
    other = make_config(tmp_path / "in", tmp_path / "out", result_storage=str(tmp_path / "shared" / "results"))
    assert result_storage_for(other) == tmp_path / "shared" / "results"
    # An object store: a saved RemoteFileSystem block (tasks.embed.ResultFolder) with the storage options, never
    # credentials.
    remote = make_config(tmp_path / "in", "s3://bucket/embeddings",
                         storage_options={"endpoint_url": "http://127.0.0.1:9", "region_name": "x"})
    block = result_storage_for(remote)
    assert block.basepath == "s3://bucket/embeddings/_prefect_results"
    saved = Block.load(f"{block.get_block_type_slug()}/{block._block_document_name}")
    assert isinstance(saved, RemoteFileSystem) and type(saved) is type(block)
    assert saved.settings["endpoint_url"] == "http://127.0.0.1:9"
    assert storeoptions.secret_options(saved.settings) == []


# --------------------------------------------------------------------------------------------------- one shard per pipeline


def _overlaps(manifest: dict, start: str, end: str) -> list[tuple[str, str]]:
    """Pairs of shards whose [start, end] intervals overlap on one worker process."""
    return [(a[2], b[2]) for a, b in _pairs(manifest, start, end) if b[0] < a[1]]


def _most_at_once(manifest: dict, start: str, end: str) -> int:
    """The most shards whose [start, end] intervals were open at one moment on one worker process."""
    most = 0
    for spans in _by_worker(manifest, start, end).values():
        events = sorted([(t0, 1) for t0, _, _ in spans] + [(t1, -1) for _, t1, _ in spans], key=lambda e: (e[0], e[1]))
        open_now = 0
        for _, step in events:
            open_now += step
            most = max(most, open_now)
    return most


def _by_worker(manifest: dict, start: str, end: str) -> dict[str, list[tuple[float, float, str]]]:
    by_worker: dict[str, list[tuple[float, float, str]]] = {}
    for stem, shard in manifest["shards"].items():
        t = shard["timeline"]
        by_worker.setdefault(t["worker"], []).append((t[start], t[end], stem))
    return by_worker


def _pairs(manifest: dict, start: str, end: str):
    for spans in _by_worker(manifest, start, end).values():
        spans.sort()
        yield from zip(spans, spans[1:])


def test_gpu_cluster_puts_workers_per_gpu_processes_on_each_gpu(caplog):
    one = cluster.gpu_cluster(2)
    assert one == {"cluster_class": "dask_cuda.LocalCUDACluster",
                   "cluster_kwargs": {"n_workers": 2, "threads_per_worker": cluster.SHARDS_PER_GPU,
                                      "resources": {"GPU": 1}, "worker_class": cluster.local_nanny(gpu=True)}}
    two = cluster.gpu_cluster(2, workers_per_gpu=2)
    assert two["cluster_class"] == "wdsembed.gpucluster.SharedGPUCluster"
    assert two["cluster_kwargs"] == one["cluster_kwargs"] | {"n_workers": 4, "workers_per_gpu": 2}
    # a run's config reaches the same cluster (with dask_address none is started, whatever workers_per_gpu says)
    config = EmbedConfig(input="in", output="out", workers_per_gpu=3, dask_address="tcp://h:8786")
    with caplog.at_level("WARNING", logger="wdsembed"):
        assert cluster.task_runner_kwargs(config) == {"address": "tcp://h:8786"}
        assert "workers_per_gpu=3" in caplog.text and "tcp://h:8786" in caplog.text  # said where it does nothing
        caplog.clear()
        cpu = cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", workers_per_gpu=2, device="cpu"))
        assert cpu["cluster_class"] == "distributed.LocalCluster" and "has no GPU" in caplog.text
        caplog.clear()
        cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", device="cpu"))
        assert "workers_per_gpu" not in caplog.text
    with pytest.raises(ValueError, match="workers_per_gpu"):
        EmbedConfig(input="in", output="out", workers_per_gpu=0)


def test_n_workers_beside_a_dask_address_is_said_to_do_nothing(caplog):
    """--n-workers sizes the local cluster a run starts; with --dask-address none starts, and the number was dropped
    without a word (workers_per_gpu's said so): a user who meant to scale the shared cluster saw no sign."""
    with caplog.at_level("WARNING", logger="wdsembed"):
        config = EmbedConfig(input="in", output="out", n_workers=4, dask_address="tcp://h:8786")
        assert cluster.task_runner_kwargs(config) == {"address": "tcp://h:8786"}
        assert "n_workers=4" in caplog.text and "tcp://h:8786" in caplog.text, caplog.text
        caplog.clear()
        cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", dask_address="tcp://h:8786"))
        cluster.task_runner_kwargs(EmbedConfig(input="in", output="out", n_workers=1, device="cpu"))
        assert "n_workers" not in caplog.text, caplog.text


def test_a_setting_said_to_do_nothing_is_named_as_its_reader_set_it(caplog):
    """The warnings of a setting that has no effect named it by its API keyword (workers_per_gpu=3, n_workers=4),
    which the command's user never typed, though only the command and a deployed run reach them (the API refuses
    both settings). Named as the reader set it: the flag for the command, both forms in a log that anyone reads."""
    from wdsembed.config import speaking_to

    config = EmbedConfig(input="in", output="out", n_workers=4, workers_per_gpu=3, dask_address="tcp://h:8786")
    with caplog.at_level("WARNING", logger="wdsembed"):
        cluster.task_runner_kwargs(config)
        assert "--workers-per-gpu 3 (workers_per_gpu=3) is for a local cluster" in caplog.text, caplog.text
        assert "--n-workers 4 (n_workers=4) sizes a local cluster" in caplog.text, caplog.text
        caplog.clear()
        with speaking_to("command"):
            cluster.task_runner_kwargs(config)
        assert "--workers-per-gpu 3 is for" in caplog.text and "--n-workers 4 sizes" in caplog.text, caplog.text
        assert "=" not in caplog.text.replace("tcp://", ""), caplog.text


def test_shared_gpu_worker_names_keep_their_device():
    # round 0 keeps dask-cuda's own names (the device); later rounds are told apart, UUIDs included
    for device in (0, 3, "GPU-5c1f3a2e-8b0d-4c1e-9f4e-1a2b3c4d5e6f"):
        for round_ in range(3):
            name = cluster.worker_name(device, round_)
            assert (cluster.device_of(name), cluster.round_of(name)) == (device, round_)
    assert cluster.worker_name(1, 0) == 1 and cluster.worker_name(1, 2) == "1#2"


@pytest.fixture
def one_worker_cluster(request):
    """One worker process with one thread more than a GPU's shards (cluster.SHARDS_PER_GPU), declaring the resources
    the test asks for; started here, so the run connects to it cold, with no Dask client of its own yet (as a first
    run on a GPU host does)."""
    from distributed import LocalCluster

    from wdsembed.cluster import SHARDS_PER_GPU

    with LocalCluster(n_workers=1, threads_per_worker=SHARDS_PER_GPU + 1, processes=True, dashboard_address=None,
                      resources=request.param, env={"OMP_NUM_THREADS": "1"}) as cluster:
        yield cluster


@pytest.mark.parametrize("one_worker_cluster", [{"GPU": 1}], indirect=True)
def test_gpu_resource_keeps_two_shards_off_one_worker(tmp_path, one_worker_cluster):
    """Workers that declare a GPU: every embedding task asks for its share of it from the first run on, so the
    worker holds at most SHARDS_PER_GPU shards (one thread fewer than it has), and its stream reads one at a time."""
    from wdsembed.cluster import SHARDS_PER_GPU

    data = make_dataset(tmp_path / "in", n_shards=4)  # one more than a GPU worker may hold
    config = make_config(data, tmp_path / "out", dask_address=one_worker_cluster.scheduler_address, n_workers=None)
    manifest, _ = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 4 and not manifest["failed_shards"]
    assert len({s["timeline"]["worker"] for s in manifest["shards"].values()}) == 1
    # Whole task bodies, waits included: with the resource, the scheduler hands the worker SHARDS_PER_GPU at most.
    assert _most_at_once(manifest, "start", "end") <= SHARDS_PER_GPU
    # the worker's stream read one shard at a time, each right behind the previous one
    assert _overlaps(manifest, "embed_start", "embed_fed") == []
    check_outputs(config, STEMS4)


@pytest.mark.parametrize("one_worker_cluster", [{"GPU": 1}], indirect=True)
def test_first_task_starts_alone_before_the_rest_are_submitted(tmp_path, one_worker_cluster):
    """The flow lets its first embedding task start on the worker before it submits the others (flows.embed,
    FIRST_TASK_HEAD_START_S): their submits and task engines would otherwise delay the first shard's start. The
    worker has a thread for each of them; with the wait at 0 the first shard's body began after the last submit."""
    data = make_dataset(tmp_path / "in", n_shards=4)
    config = make_config(data, tmp_path / "out", dask_address=one_worker_cluster.scheduler_address, n_workers=None)
    manifest, flow_run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 4 and not manifest["failed_shards"]
    runs = task_runs(flow_run_id, expected=4, names=[f"embed-{s}" for s in STEMS4])
    first = runs[f"embed-{STEMS4[0]}"]
    # Every other task run began (Pending, on the worker) after the first one was Running, its body under way.
    for stem in STEMS4[1:]:
        assert runs[f"embed-{stem}"].expected_start_time > first.start_time, (stem, runs[f"embed-{stem}"], first)
    timeline = manifest["timeline"]
    assert timeline["planned"] < timeline["first_started"] <= timeline["submitted"]
    assert manifest["shards"][STEMS4[0]]["timeline"]["start"] <= timeline["submitted"]
    check_outputs(config, STEMS4)


def test_a_shard_that_ends_while_the_others_are_submitted_is_counted_as_it_ends(tmp_path, monkeypatch):
    """Every task run was submitted before any was collected: on a first run of 4,000 shards, Prefect's submits took
    3 minutes of 2 cores while the first shards ended on the workers, and the bar (on_shard_done), the progress
    artifact and the run's log said 0 throughout. Here the submit of 00002 is held until 00000's task has ended:
    00000 is counted before 00003 is submitted, and before the run's submitting ends (timeline["submitted"])."""
    import threading

    import flows.embed
    from prefect.tasks import Task

    events, submitted = [], []
    submit = Task.submit

    def held_submit(self, *args, **kwargs):
        group = args[1] if len(args) > 1 else None
        if not isinstance(group, list):  # not an embedding task
            return submit(self, *args, **kwargs)
        if group[0].stem == "00002":
            # The run's own done callback on 00000 was added as it was submitted: Dask calls a future's callbacks
            # in the order they were added, on one thread, so once this one has been called, so has the run's.
            called = threading.Event()
            submitted[0].add_done_callback(lambda _: called.set())
            assert called.wait(180), "00000's task did not end"
        events.append(("submit", group[0].stem, time.time()))
        future = submit(self, *args, **kwargs)
        submitted.append(future)
        return future

    def ended(result, *_):
        if result is not None:
            events.append(("ended", result["stem"], time.time()))

    monkeypatch.setattr(Task, "submit", held_submit)
    monkeypatch.setattr(flows.embed, "COLLECT_WHILE_SUBMITTING_EVERY_S", 0.0)  # after every submit
    data = make_dataset(tmp_path / "in", n_shards=4)
    config = make_config(data, tmp_path / "out")
    manifest = flows.embed.run(config, on_shard_done=ended)
    assert isinstance(manifest, dict) and manifest["totals"]["computed"] == 4, manifest
    order = [(kind, stem) for kind, stem, _ in events]
    assert order.index(("ended", "00000")) < order.index(("submit", "00003")), order
    first_end = next(at for kind, stem, at in events if kind == "ended")
    assert first_end < manifest["timeline"]["submitted"], (events, manifest["timeline"])
    assert sorted(stem for kind, stem in order if kind == "ended") == STEMS4, order  # each counted once
    check_outputs(config, STEMS4)


def test_task_starts_are_heard_per_run_and_shard():
    """What the head start waits on (wdsembed.cluster): a worker process announces a task's start on a Dask topic, and
    a client hears those of its own run only; a wait gives up at its timeout, or at once when `done()` says the task
    ended without announcing anything (a cached one). Outside a Dask worker an announcement is a no-op."""
    from distributed import Client, LocalCluster

    from wdsembed import cluster

    cluster.announce_task_start("run-a", "00000")  # not on a worker: nothing to tell, no error
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as dask_cluster, \
            Client(dask_cluster) as client, cluster.TaskStarts(client, "run-a") as starts:
        client.submit(cluster.announce_task_start, "run-b", "00001", pure=False).result()
        client.submit(cluster.announce_task_start, "run-a", "00002", pure=False).result()
        assert starts.wait("00002", timeout=30)
        assert not starts.wait("00001", timeout=0.5)  # another run's
        began = time.monotonic()
        assert not starts.wait("00003", timeout=30, done=lambda: True)
        assert time.monotonic() - began < 5


@pytest.mark.parametrize("one_worker_cluster", [None], indirect=True)
def test_worker_serialises_shards_where_no_resource_is_declared(tmp_path, one_worker_cluster):
    """Workers that declare nothing (any external scheduler): several shards can reach one worker's threads at
    once; each waits for its turn in the worker's stream instead of failing."""
    data = make_dataset(tmp_path / "in", n_shards=4)
    config = make_config(data, tmp_path / "out", dask_address=one_worker_cluster.scheduler_address, n_workers=None)
    manifest, _ = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 4 and not manifest["failed_shards"]
    assert _overlaps(manifest, "embed_start", "embed_fed") == []  # the stream read one shard at a time
    assert _overlaps(manifest, "start", "end"), "the threads should have been handed shards together"
    check_outputs(config, STEMS4)
    # The worker's task engines shared one TLS context for their API clients (tasks.prefect_tls, installed as the
    # worker imported tasks.embed): a task run's start makes two clients.
    from distributed import Client

    # And their hydrated settings (tasks.prefect_settings): validated as the first task runs start (several threads
    # may start together), then reused.
    with Client(one_worker_cluster) as client:
        (shared,) = client.run(_shared_tls).values()
        (settings,) = client.run(_shared_settings).values()
    assert shared["installed"] and shared["contexts"] == 1 and shared["served"] >= 2 * 4, shared
    assert settings["installed"] and settings["shared"] >= 1 and settings["validated"] + settings["shared"] >= 4, settings


def _shared_settings() -> dict:
    import prefect.context

    from tasks import prefect_settings

    return {"installed": getattr(prefect.context.SettingsContext, "_shares_validated_settings", False),
            "validated": prefect_settings.validated, "shared": prefect_settings.shared}


def _shared_tls() -> dict:
    import prefect.client.orchestration

    from tasks import prefect_tls

    return {"installed": isinstance(prefect.client.orchestration.ssl, prefect_tls._SharedTLS),
            "contexts": len(prefect_tls._contexts), "served": prefect_tls.served}


# --------------------------------------------------------------------------------------------------- the task cache


def _same_size_and_mtime_shards(folder: Path) -> None:
    """Two shards of other images whose tars have one size and one whole-second mtime (unpacked from an archive,
    copied with rsync -a): their fingerprints, and so their cache keys, are the same."""
    from wdsembed.synthetic import EncodedImage, from_encoded, make_image, write_shard

    def bmp(seed: int) -> EncodedImage:
        import io

        buf = io.BytesIO()
        make_image(64, 48, seed=seed).save(buf, format="BMP")
        return EncodedImage(data=buf.getvalue(), ext="bmp", width=64, height=48, mode="RGB")

    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(["00000", "00001"]):
        write_shard(folder, stem, from_encoded([bmp(10 * i + j) for j in range(4)]), parquet=False, stats=False)
    tars = [folder / "00000.tar", folder / "00001.tar"]
    assert tars[0].stat().st_size == tars[1].stat().st_size and tars[0].read_bytes() != tars[1].read_bytes()
    for tar in tars:
        os.utime(tar, (1_700_000_000, 1_700_000_000))


def test_cached_task_results_come_back_for_their_own_shard_and_output(tmp_path):
    """Prefect's stored result names its shard and output: it must come back only for them. Two shards with one
    fingerprint are each reported as themselves, and a result storage shared by two outputs reports each run's
    own output."""
    data, out = tmp_path / "in", tmp_path / "out"
    _same_size_and_mtime_shards(data)
    config = make_config(data, out)
    embed(config)
    again, _ = embed(config)
    assert {s: v["status"] for s, v in again["shards"].items()} == {"00000": "cached", "00001": "cached"}
    assert {s: v["output"] for s, v in again["shards"].items()} == {s: str(out / f"{s}.parquet")
                                                                     for s in ("00000", "00001")}

    shared = str(tmp_path / "results")
    one = make_config(data, tmp_path / "out1", result_storage=shared)
    two = make_config(data, tmp_path / "out2", result_storage=shared)
    embed(one)
    embed(two)
    third, _ = embed(one)
    assert third["shards"]["00000"]["status"] == "cached"
    assert third["shards"]["00000"]["output"] == str(tmp_path / "out1" / "00000.parquet")


def test_the_flow_gives_a_shard_without_a_parquet_the_runs_integer_ids(tmp_path):
    """Integer ids and one shard without a parquet: through the flow (its planning task, the plans sent to Dask
    workers) that shard's output and kNN view had string keys, and OUTPUT read as one dataset (the README's merged
    read) failed on 'Field key has incompatible types: int64 vs string'. Both now hold int64 keys."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    data = make_dataset(tmp_path / "in", n_shards=2)
    t = pq.read_table(data / "00000.parquet")
    pq.write_table(t.set_column(0, "key", t.column("key").cast(pa.int64())), data / "00000.parquet")
    (data / "00001.parquet").unlink()
    (data / "00001_stats.json").unlink()
    config = make_config(data, tmp_path / "out")
    manifest, _ = embed(config)
    assert sorted(manifest["shards"]) == ["00000", "00001"], manifest
    for name in ("00001.parquet", "_embeddings/00001.parquet"):
        assert pq.read_schema(tmp_path / "out" / name).field("key").type == pa.int64(), name
    dataset = ds.dataset(str(tmp_path / "out"), format="parquet")
    schema = pa.unify_schemas([f.physical_schema for f in dataset.get_fragments()])
    table = ds.dataset(str(tmp_path / "out"), format="parquet", schema=schema).to_table()
    assert table.num_rows == ROWS + EMBEDDED and table.column("key").null_count == 0


# --------------------------------------------------------------------------------------------------- the UI's view


def run_logs(flow_run_id: str, expected: str, timeout: float = 30.0) -> list[tuple[str, str]]:
    """(task run name, or 'flow', message) of every log line the API holds for the flow run, once one of them holds
    `expected` (lines reach the server in batches, a moment later), or at `timeout`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            names = {r.id: r.name for r in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
        said = [(names.get(line.task_run_id, "flow"), line.message) for line in logs]
        if any(expected in message for _, message in said) or time.monotonic() > deadline:
            return said
        time.sleep(0.5)


def test_the_plannings_warnings_show_in_the_index_task_runs_log(tmp_path, monkeypatch):
    """The planning reads each shard's _stats.json and indexes its tar in threads of its own. Their warnings (a
    _stats.json that is no JSON, a tar that cannot be indexed) reached the terminal only: the UI's user, who reads
    the run's logs there, never saw them. They now show in the index task run's log."""
    import logging

    from prefect import flow
    from prefect.runtime import flow_run
    from tasks.index import index_shards

    data = make_dataset(tmp_path / "in", n_shards=2)
    (data / "00000_stats.json").write_text("garbage")
    tar = data / "00001.tar"
    os.truncate(tar, tar.stat().st_size // 2 + 100)  # cut inside a member: damaged after its start
    # As PREFECT_LOGGING_EXTRA_LOGGERS=wdsembed does in a run's own process, where it is set before Prefect's import
    monkeypatch.setattr(logging.getLogger("wdsembed"), "handlers", logging.getLogger("prefect.extra").handlers)

    @flow(name="plan-only")
    def plan_only(config: EmbedConfig) -> str:
        index_shards(config)
        return str(flow_run.id)

    run_id = plan_only(make_config(data, tmp_path / "out"))
    said = run_logs(run_id, "cannot be indexed")
    index_lines = [message for name, message in said if name.startswith("index-shards")]
    assert any("00000_stats.json" in line and "ignored" in line for line in index_lines), said
    assert any("00001.tar cannot be indexed" in line for line in index_lines), said


def test_a_task_run_lost_with_its_worker_is_named_for_its_shard_and_says_it_in_its_state(tmp_path, monkeypatch):
    """A worker process killed as the shard's task began (the OOM killer): the task run's name, which the task engine
    sets on the worker, died with it, and the run the flow then marked Crashed showed in the UI as 'embed-shards-28a',
    its message Dask's KilledWorker words, which name no shard. It is now 'embed-00001', its message naming it."""
    import flows.embed

    data = make_dataset(tmp_path / "in", n_shards=2)
    config = make_config(data, tmp_path / "out")
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill"}})
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # as after Dask's last reschedule
        outcome, run_id = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    runs = task_runs(run_id, expected=4, names=["embed-00000", "embed-00001"])
    assert "embed-00001" in runs, sorted(runs)
    crashed = runs["embed-00001"].state
    assert crashed.name == "Crashed" and "00001" in crashed.message and "KilledWorker" in crashed.message, crashed


KILLED_137 = "exited with status 137: SIGKILL, most often the system's out-of-memory killer"


def test_a_worker_killed_under_a_shard_says_how_its_process_ended(tmp_path, monkeypatch):
    """A worker process of the run's own cluster killed mid-shard (exit status 137, as the OOM killer's SIGKILL reads
    through a shell or container): the nanny logged 'Worker process N exited with status 137', but the summary, the
    manifest and the task run Crashed in the UI said only 'killed from outside ... or crashed: the worker's log, or
    the kernel's (dmesg), says which'. The nanny is this process's: each says how the process ended."""
    import flows.embed

    data = make_dataset(tmp_path / "in", n_shards=2)
    config = make_config(data, tmp_path / "out")
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # as after Dask's last reschedule
        outcome, run_id = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed), outcome
    assert sorted(outcome.failures) == ["00001"] and KILLED_137 in outcome.failures["00001"], outcome.failures
    assert KILLED_137 in str(outcome)  # the summary's line
    written = json.loads((Path(config.output) / "_manifest.json").read_text())
    assert KILLED_137 in written["failed_shards"]["00001"], written["failed_shards"]
    crashed = task_runs(run_id, expected=4, names=["embed-00001"])["embed-00001"].state
    assert crashed.name == "Crashed" and KILLED_137 in crashed.message, crashed


def test_the_api_says_how_a_worker_process_of_a_local_cluster_ended(tmp_path, monkeypatch):
    """The same through the Python API, on a local cluster of wdsembed's workers (as wdsembed.nemo.get_client starts
    one): its shard's reason, and the run-again warning where Dask ran the shard again, say how the process ended."""
    from distributed import LocalCluster

    from wdsembed.api import run_shards
    from wdsembed.shard import ShardsFailed

    def local_cluster():
        return LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                            worker_class=cluster.local_nanny())

    data = make_dataset(tmp_path / "in", n_shards=2)
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), local_cluster() as local:
        config = make_config(data, tmp_path / "out", dask_address=local.scheduler_address, n_workers=None)
        with pytest.raises(ShardsFailed) as failed:
            run_shards(config)
    assert sorted(failed.value.failures) == ["00001"], failed.value.failures
    assert KILLED_137 in failed.value.failures["00001"], failed.value.failures
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "kill", "where": "batch"}})
    with local_cluster() as local:
        results = run_shards(config.model_copy(update={"dask_address": local.scheduler_address}))
    warned = [w for w in results[1].warnings if "its Dask worker died" in w]
    assert len(warned) == 1 and KILLED_137 in warned[0], results[1].warnings


def test_a_task_run_whose_worker_died_before_it_said_anything_is_made_crashed_under_its_shards_name():
    """A worker killed as the task began can die before its task engine sent a single state (they reach the API as
    events, from a thread of the worker process): the flow found no task run to mark (ObjectNotFound), and the UI
    showed nothing of the lost shard. (A fresh-clone CI run under load failed the test above on it.) The task run is
    made under its future's id, named for its shard, Crashed with the reason."""
    import uuid
    from types import SimpleNamespace

    from prefect import flow
    from prefect.client.orchestration import get_client

    import flows.embed
    from tasks.embed import embed_shards

    lost = SimpleNamespace(task_run_id=uuid.uuid4())  # a future whose task run the API never heard of
    group = [SimpleNamespace(stem="00001")]

    @flow
    def a_run_that_lost_a_worker() -> None:
        flows.embed._record_lost_run(lost, group, {"00001": "its Dask worker process died (KilledWorker)"},
                                     embed_shards)

    a_run_that_lost_a_worker()
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(lost.task_run_id)
    assert task_run.name == "embed-00001", task_run.name
    assert task_run.state.name == "Crashed" and "00001" in task_run.state.message, task_run.state
    assert "KilledWorker" in task_run.state.message, task_run.state


def test_a_worker_that_dies_does_not_run_again_the_tasks_it_had_finished(tmp_path, monkeypatch):
    """The flow kept every task's Dask future to its end, so Dask kept each result on the worker that made it, and
    a worker that died (here at 00001) lost them: Dask ran each of its finished task runs again, once per death, to
    make them again. In the UI a finished shard's task run went back to Pending and Running and logged its shard
    again (a run of thousands of shards: hundreds of them, per death). A result the flow has taken is released."""
    import flows.embed

    data = make_dataset(tmp_path / "in", n_shards=2)
    config = make_config(data, tmp_path / "out")
    # 00001 waits a moment first, so that the flow has taken 00000's result before its worker dies
    counted = Faults(tmp_path, monkeypatch, {"00000": {"fail_attempts": 0},
                                            "00001": {"fail_attempts": 1, "error": "kill", "hold_s": 3}})
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        outcome, run_id = embed(config)
    assert isinstance(outcome, flows.embed.ShardsFailed) and sorted(outcome.failures) == ["00001"], outcome
    assert counted.attempts("00000") == 1
    from prefect.client.orchestration import get_client

    finished = task_runs(run_id, expected=4, names=["embed-00000"])["embed-00000"]
    with get_client(sync_client=True) as client:
        assert [s.name for s in client.read_task_run_states(finished.id)] == ["Pending", "Running", "Completed"]


def test_a_shard_its_groups_earlier_attempt_wrote_has_no_made_up_speed(tmp_path, monkeypatch):
    """A group's task retried (00001's transient error): its retry found 00000, written by the attempt before, done,
    in no time. The run counts it computed, as it is, and the UI's table gave it 0.0 s and 0.0 images/s, a speed
    it never had. Its figures are unknown to the run: the table says so ('-' in the summary, null in the manifest)."""
    data = make_dataset(tmp_path / "in", n_shards=2)
    config = make_config(data, tmp_path / "out", shards_per_task=2)
    Faults(tmp_path, monkeypatch, {"00001": {"fail_attempts": 1, "error": "io"}})
    manifest, run_id = embed(config)
    assert isinstance(manifest, dict), manifest
    assert manifest["totals"]["computed"] == 2 and manifest["totals"]["embedded_this_run"] == 2 * EMBEDDED
    figures = manifest["shards"]["00000"]
    assert figures["status"] == "computed"
    assert (figures["seconds"], figures["images_per_second"]) == (None, None), figures
    row = table_rows(run_id)["00000"]
    assert (row["seconds"], row["images_per_second"]) == (None, None), row
    assert "| 00000 | 5 | 4 | 1 | computed | - | - |" in artifacts(run_id)["markdown"].data
    assert manifest["shards"]["00001"]["images_per_second"] > 0  # its own attempt's figures
