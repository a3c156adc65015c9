"""The Python API called where a notebook or a service calls it: inside a running event loop, from a worker
thread, with the caller's own Dask client current."""
import asyncio
import threading

import pytest

from tests.conftest import TINY_MODEL
from wdsembed.synthetic import write_demo_dataset

SETTINGS = dict(pretrained=False, device="cpu", num_threads_per_worker=1, fidelity_sample=0, batch_size=2)


@pytest.fixture
def demo(tmp_path):
    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=3, failed_per_shard=0)
    return str(tmp_path / "data")


def test_a_call_on_the_loop_of_the_current_asynchronous_client_is_refused_saying_how_to_call_it(demo, tmp_path):
    """With the caller's own `Client(asynchronous=True)` current (a notebook's `await Client(...)`), a call made
    on that client's event loop (a cell calling the embedder directly) failed deep in its worker check with
    "AttributeError: 'coroutine' object has no attribute 'items'" (the client answers coroutines there), having
    claimed the output; had it gone on, it would have blocked the very loop the client needs. It is refused before
    any work, saying to call it from a thread; called so, it embeds on that client's workers."""
    from distributed import LocalCluster, Client

    from wdsembed.api import TimmImageEmbedder

    embedder = TimmImageEmbedder(TINY_MODEL, **SETTINGS)
    out = tmp_path / "out"

    async def main():
        async with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                                asynchronous=True) as cluster, Client(cluster, asynchronous=True):
            with pytest.raises(RuntimeError, match=r"asyncio\.to_thread\(embedder") as refused:
                embedder(demo, str(out))
            assert not out.exists()  # refused before the output was claimed
            results = await asyncio.to_thread(embedder, demo, str(out))
            return refused.value, results

    refused, results = asyncio.run(main())
    assert "asynchronous" in str(refused)
    assert [(r.stem, r.embedded, r.cached) for r in results] == [("00000", 3, False)]


def test_calls_in_a_running_event_loop_and_a_worker_thread_embed_as_a_plain_call(demo, tmp_path):
    """A notebook cell (a running event loop), `asyncio.to_thread` and a service's worker thread (where no signal
    handler can be set) get the plain call's embeddings, and leave no thread of theirs behind but the model's
    stream, which the next call reuses (docs/nemo.md)."""
    import pyarrow.parquet as pq

    from wdsembed.api import TimmImageEmbedder

    embedder = TimmImageEmbedder(TINY_MODEL, **SETTINGS)

    def embeddings(name):
        return pq.read_table(tmp_path / name / "00000.parquet").column("image_embedding").to_pylist()

    embedder(demo, str(tmp_path / "plain"))
    before = set(threading.enumerate())

    async def main():
        embedder(demo, str(tmp_path / "in_loop"))
        await asyncio.to_thread(embedder, demo, str(tmp_path / "to_thread"))

    asyncio.run(main())
    thread = threading.Thread(target=embedder, args=(demo, str(tmp_path / "thread")))
    thread.start()
    thread.join()
    for name in ("in_loop", "to_thread", "thread"):
        assert embeddings(name) == embeddings("plain"), name
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left


@pytest.mark.slow
def test_a_flow_run_from_a_script_without_the_main_guard_stops_saying_so(tmp_path):
    """flows.embed.run() called at a script's top level, without `if __name__ == "__main__":`, waited with no word
    until killed (10 minutes in a reviewer's run): each local worker process imports the script again as it starts,
    and ran the flow there too, so no worker came up. It stops with multiprocessing's "bootstrapping phase" message
    and the guard to add, as get_client() does (tests/test_nemo.py)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=3, failed_per_shard=0)
    (tmp_path / "script.py").write_text(textwrap.dedent(f'''
        from flows.embed import run
        from wdsembed.config import EmbedConfig

        run(EmbedConfig(input="data", output="out", model_name={TINY_MODEL!r}, pretrained=False, device="cpu",
                        n_workers=1, num_threads_per_worker=1, fidelity_sample=0))
        print("finished")
    '''))
    root = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    script = subprocess.Popen([sys.executable, "script.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGKILL)  # the script and the worker processes it started
        stdout, stderr = script.communicate()
        pytest.fail("the script did not end: " + stderr[-2000:])
    assert script.returncode != 0 and "finished" not in stdout, stdout + stderr[-3000:]
    assert "flows.embed.run() was called in a worker process" in stderr, stderr[-3000:]
    assert 'if __name__ == "__main__":' in stderr, stderr[-3000:]


# A caller's script: logging handlers of its own, then the flow's import and a run (under the guard: the local
# workers import the script again), then what its handlers got, and what the run's Prefect API holds of its lines.
_CALLERS_LOGGING = '''
import json, logging, sys
from pathlib import Path

if __name__ == "__main__":
    root_file = logging.FileHandler("root.log", mode="w")  # no formatter, as most add one
    app_file = logging.FileHandler("app.log", mode="w")
    app_file.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(root_file)
    root.setLevel(logging.INFO)
    app = logging.getLogger("app")
    app.addHandler(app_file)
    app.info("before the import")

    import flows.embed
    from prefect.runtime import flow_run
    from wdsembed.config import EmbedConfig

    app.info("after the import")
    seen = set()
    manifest = flows.embed.run(EmbedConfig(input="data", output="out", model_name=sys.argv[1], pretrained=False,
                                           device="cpu", n_workers=1, num_threads_per_worker=1, batch_size=2,
                                           fidelity_sample=0), on_shard_done=lambda *a: seen.add(str(flow_run.id)))
    app.info("after the run")

    from flows import apiserver
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: apiserver.api_url()}), get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(seen))))
    print(json.dumps({"computed": manifest["totals"]["computed"], "root": root.handlers == [root_file],
                      "level": root.level, "api": [line.message for line in logs]}))
'''


@pytest.mark.slow
def test_the_callers_logging_handlers_keep_their_records_through_the_flows_import_and_a_run(tmp_path):
    """Handlers a caller attached before `import flows.embed`: Prefect's logging setup, as that import first imports
    Prefect, closed every handler of the process (one of a file opened with mode "w" wrote nothing more) and took a
    root handler without a formatter (`logging.FileHandler(path)`, as most add it) off the root logger, with the
    root's level. Both keep their records after the import and after a run, and the run's lines still reach its
    Prefect API (the UI)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=3, failed_per_shard=0)
    (tmp_path / "script.py").write_text(_CALLERS_LOGGING)
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([sys.executable, "script.py", TINY_MODEL], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["computed"] == 1 and said["root"] and said["level"] == 20, said
    assert (tmp_path / "app.log").read_text().splitlines() == [
        "app: before the import", "app: after the import", "app: after the run"]
    lines = (tmp_path / "root.log").read_text().splitlines()
    assert lines[0] == "before the import" and lines.index("after the import") < lines.index("after the run"), lines
    assert any("1 shard(s) under" in line for line in lines), lines  # the run's own lines, through the root
    assert any("1 shard(s) under" in message for message in said["api"]), said["api"]


_CALLERS_DICTCONFIG = '''
import logging, logging.config

logging.config.dictConfig({"version": 1, "root": {"handlers": ["mine"], "level": "INFO"}, "handlers": {
    "mine": {"class": "logging.FileHandler", "filename": "app.log", "mode": "w", "level": "WARNING"}}})
import flows.embed  # noqa: E402,F401

# the caller's own incremental change to its handler, by name, after the import
logging.config.dictConfig({"version": 1, "incremental": True, "handlers": {"mine": {"level": "INFO"}}})
logging.getLogger("app").info("after the import")
'''


def test_the_callers_named_handlers_keep_their_names_through_the_flows_import(tmp_path):
    """A caller that set its logging up with dictConfig names its handlers: Prefect's dictConfig, as `import
    flows.embed` first imports Prefect, emptied that registry (logging._handlers), so the caller's incremental
    dictConfig after the import failed ('No handler found with name'), as would logging.getHandlerByName."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "script.py").write_text(_CALLERS_DICTCONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "app.log").read_text().splitlines() == ["after the import"]


def test_results_and_datasets_read_short_where_a_notebook_shows_them(demo, tmp_path):
    """A cell ending in the results showed about 1,200 characters per shard, most of them each shard's model
    record, timeline and fidelity record; one ending in a dataset listed every tar's path (10,000 of them). Each
    reads short now, with the counts a reader looks for; what was left out is still there."""
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.nemo import ImageTextPairDataset

    write_demo_dataset(tmp_path / "many", n_shards=40, per_shard=1, failed_per_shard=0)
    many = ImageTextPairDataset.from_webdataset(tmp_path / "many")
    assert "00039.tar" not in repr(many) and "tar_files=<40 shards>" in repr(many), repr(many)
    assert repr(many).startswith(f"ImageTextPairDataset(path={str(tmp_path / 'many')!r}, ")

    dataset = ImageTextPairDataset.from_webdataset(demo)
    embedded = TimmImageEmbedder(TINY_MODEL, **SETTINGS)(dataset, str(tmp_path / "out"))
    assert "tar_files=<1 shards>" in repr(embedded) and f"metadata_path={str(tmp_path / 'out')!r}" in repr(embedded)
    result = embedded.results[0]
    said = repr(result)
    assert len(said) < 600, said
    for part in ("stem='00000'", "rows=3", "embedded=3", "failed=0", "cached=False", "dim="):
        assert part in said, said
    for left_out in ("timeline", "preprocessing", "fidelity", "cache_key"):
        assert left_out not in said, said
    assert result.model["name"] == TINY_MODEL and result.timeline["end"] and result.cache_key
    assert result.to_dict()["model"] == result.model


def test_a_result_with_bad_images_says_each_reason_once_and_the_same_cached(tmp_path):
    """A shard with bad images read about 1,500 characters in a notebook: each reason twice, once among its examples
    (`errors`) and once among its causes (`error_causes`, which says every reason with its keys). The causes say
    it; the examples are an attribute. Those of a result found finished, read back from its footer's JSON, were
    lists, a computed one's tuples: the same shard's two results did not compare equal."""
    from wdsembed.api import TimmImageEmbedder

    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=4, failed_per_shard=1, corrupt_per_shard=2)
    embedder = TimmImageEmbedder(TINY_MODEL, **SETTINGS)
    computed, cached = (embedder(str(tmp_path / "data"), str(tmp_path / "out"))[0] for _ in range(2))
    assert not computed.cached and cached.cached
    said = repr(computed)
    assert said.count("truncated JPEG") == 1 and said.count("damaged PNG") == 1, said
    assert "errors=" not in said and len(computed.errors) == 2, said
    assert cached.errors == computed.errors and all(type(e) is tuple for e in cached.errors), cached.errors


# A notebook's run of the flow: flows.embed imported first (it imports Prefect, then Dask), then a run.
_NOTEBOOKS_RUN = '''
import json, logging, sys

if __name__ == "__main__":
    import flows.embed
    from wdsembed.config import EmbedConfig

    logging.getLogger("distributed.worker").setLevel(logging.DEBUG)  # the caller's own level, kept
    manifest = flows.embed.run(EmbedConfig(input="data", output="out", model_name=sys.argv[1], pretrained=False,
                                           device="cpu", n_workers=1, num_threads_per_worker=1, batch_size=2,
                                           fidelity_sample=0))
    levels = {name: logging.getLogger(name).level for name in ("distributed", "distributed.nanny",
                                                               "distributed.worker")}
    print(json.dumps({"computed": manifest["totals"]["computed"], "levels": levels}))
'''


@pytest.mark.slow
def test_a_python_callers_run_prints_no_dask_info_lines(tmp_path):
    """The command keeps Dask's INFO lines (its cluster's start and stop: ports, plugins, each connection) off the
    terminal, Dask reading prefect_env's setting as it is first imported. A Python caller (a notebook) imports
    flows.embed, and Dask with it, before any run sets that: each run printed some twenty such lines among its
    own. The run's own lines still show, and the caller's Dask logger levels are as they were after."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_demo_dataset(tmp_path / "data", n_shards=1, per_shard=3, failed_per_shard=0)
    (tmp_path / "script.py").write_text(_NOTEBOOKS_RUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run([sys.executable, "script.py", TINY_MODEL], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said == {"computed": 1, "levels": {"distributed": 20, "distributed.nanny": 0, "distributed.worker": 10}}
    assert "1 shard(s) under" in done.stderr, done.stderr[-3000:]
    dask_lines = [line for line in done.stderr.splitlines() if "distributed.scheduler" in line]
    assert dask_lines == [], dask_lines
