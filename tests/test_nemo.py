"""NeMo Curator users' code, with only its import changed, runs here; the decoder's own stderr lines go to the log.

The reference script and the API runs are real: separate Python processes, DALI on the CPU, the tiny timm test
model, a Dask cluster started by get_client.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]

REFERENCE_SCRIPT = f'''
from wdsembed import get_client, ImageTextPairDataset, TimmImageEmbedder

if __name__ == "__main__":
    client = get_client(cluster_type="gpu")
    dataset = ImageTextPairDataset.from_webdataset(path="dataset", id_col="key")
    embedding_model = TimmImageEmbedder("{TINY_MODEL}", pretrained=False,
                                        batch_size=4, num_threads_per_worker=1, normalize_embeddings=True)
    dataset_with_embeddings = embedding_model(dataset)
    dataset_with_embeddings.save_metadata()
'''


def env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_reference_usage_runs_unchanged(tmp_path):
    from wdsembed.synthetic import write_demo_dataset

    # the demo data, with a truncated JPEG and a damaged PNG per shard: the PNG decoder's lines must not reach the
    # terminal
    written = write_demo_dataset(tmp_path / "dataset", corrupt_per_shard=2)
    inputs_before = {p.name: p.read_bytes() for p in (tmp_path / "dataset").glob("*.parquet")}
    (tmp_path / "reference.py").write_text(REFERENCE_SCRIPT)
    script = subprocess.Popen([sys.executable, "reference.py"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = script.communicate(timeout=850)
    finally:
        script.kill()
    done = subprocess.CompletedProcess(script.args, script.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no GPU is visible; starting a CPU cluster instead" in done.stderr  # this machine: the CPU fallback
    assert "libpng" not in done.stdout + done.stderr and "[ERROR]" not in done.stdout + done.stderr

    out = tmp_path / "dataset_embeddings"  # beside the dataset; its own parquets untouched
    assert {p.name: p.read_bytes() for p in (tmp_path / "dataset").glob("*.parquet")} == inputs_before
    manifest = json.loads((out / "_manifest.json").read_text())
    workers = {s["timeline"]["worker"] for s in manifest["shards"].values()}
    assert workers and all(int(w.rsplit(":", 1)[1]) != script.pid for w in workers)  # on the Dask workers
    for shard in written:
        table = pq.read_table(out / f"{Path(shard.tar).stem}.parquet").to_pylist()
        assert len(table) == len(shard.parquet_keys)
        for row in table:
            good = row["status"] == "success" and not (row["caption"] or "").startswith("corrupt image")
            assert (row["image_embedding"] is not None) == good, row
            if good:
                assert len(row["image_embedding"]) > 0 and row["embedding_error"] is None


@pytest.mark.slow
def test_a_script_that_ends_before_it_embeds_ends_without_dasks_tracebacks(tmp_path):
    """A NeMo Curator script that starts get_client's cluster and ends (done, stopped on its own error, or
    Ctrl-C) before its first embedding call, leaving the cluster to close as the interpreter exits: each worker's
    nanny imported wdsembed.faults as it closed, too late to import it then ("can't register atexit after
    shutdown"), and two tracebacks of distributed's followed the script's own end."""
    (tmp_path / "script.py").write_text(textwrap.dedent('''
        from wdsembed import get_client, ImageTextPairDataset

        if __name__ == "__main__":
            client = get_client(n_workers=1, dashboard_address=":0")
            print(len(client.scheduler_info()["workers"]), "worker")
    '''))
    done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "1 worker\n", done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr


@pytest.mark.slow
def test_a_script_without_the_main_guard_stops_saying_so(tmp_path):
    """docs/nemo.md: a script that starts get_client's cluster without `if __name__ == "__main__":` stops with
    multiprocessing's "bootstrapping phase" message. Each worker process imports the script again and so called
    get_client again, whose own cluster could not start there: the message was logged, but the worker never came
    up, and the script waited for it forever."""
    import signal

    (tmp_path / "script.py").write_text(textwrap.dedent('''
        from wdsembed import get_client

        client = get_client(n_workers=1, dashboard_address=":0")
        print("started")
    '''))
    script = subprocess.Popen([sys.executable, "script.py"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGKILL)  # the script and the worker processes it started
        stdout, stderr = script.communicate()
        pytest.fail("the script did not end: " + stderr[-2000:])
    assert script.returncode != 0 and "started" not in stdout, stdout + stderr[-3000:]
    assert "bootstrapping phase" in stderr and 'if __name__ == "__main__":' in stderr, stderr[-3000:]


def test_doc_states_get_clients_thread_default_and_each_tasks_share_of_a_gpu():
    """docs/nemo.md gives get_client's signature with its defaults (threads_per_worker=None: SHARDS_PER_GPU threads
    on a GPU cluster, 1 on a CPU one) and each shard task's share of a GPU (GPU_SHARE_PER_SHARD, a third)."""
    import inspect

    from wdsembed.cluster import GPU_SHARE_PER_SHARD, SHARDS_PER_GPU
    from wdsembed.nemo import get_client

    doc = (ROOT / "docs" / "nemo.md").read_text()
    default = inspect.signature(get_client).parameters["threads_per_worker"].default
    assert f"threads_per_worker={default}," in doc
    assert (SHARDS_PER_GPU, GPU_SHARE_PER_SHARD) == (3, 0.33)
    assert "asks for a third of a `GPU` (0.33)" in doc and "half a `GPU`" not in doc


def test_embedder_takes_reference_names():
    from wdsembed import TimmImageEmbedder

    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, image_embedding_column="emb", id_col="id",
                                 classifiers=[])
    config = embedder.config("in", "out")
    assert (config.embedding_column, config.id_column) == ("emb", "id")
    with pytest.raises(ValueError, match="classifiers are not supported"):
        TimmImageEmbedder(classifiers=["aesthetic"])
    with pytest.raises(TypeError, match="not both"):
        TimmImageEmbedder(embedding_column="a", image_embedding_column="b")


@pytest.mark.parametrize("args", [(TINY_MODEL, False, 4, 1, "image_embedding"),
                                  (TINY_MODEL, False, 4, 1, "image_embedding", True, [])])
def test_the_references_positional_order_is_refused_saying_to_pass_keywords(args):
    """NeMo Curator's positional order (image_embedding_column 5th, classifiers 7th) differs here after
    num_threads_per_worker (docs/nemo.md): a script that passed them so got pydantic's 'normalize_embeddings: Input
    should be a valid boolean', which names neither the order nor the fix."""
    from wdsembed import TimmImageEmbedder

    with pytest.raises(TypeError, match="positional order.*pass the arguments after batch_size by keyword"):
        TimmImageEmbedder(*args)
    assert TimmImageEmbedder(TINY_MODEL, False, 4, 1, "false").config("in", "out").normalize_embeddings is False


def test_id_col_that_is_the_embedding_column_is_refused_before_any_work(tmp_path):
    """The dataset's id_col and the embedder's image_embedding_column name one column of the output: refused when
    the embedder is called, before a shard is read (it was found after every shard was embedded)."""
    from pydantic import ValidationError

    from wdsembed import ImageTextPairDataset, TimmImageEmbedder
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    image = encode_image(make_image(32, 24, seed=0), "bmp")
    write_shard(tmp_path / "dataset", "00000", [ShardSample(image, ext="bmp")])
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "dataset"), id_col="uid")
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, image_embedding_column="uid")
    # each named as the caller did: the dataset's id_col, the embedder's image_embedding_column
    with pytest.raises(ValidationError, match="id_col and image_embedding_column are both 'uid': the output's id, "
                                              "embedding and error columns need three different names"):
        embedder(dataset)
    assert not (tmp_path / "dataset_embeddings").exists()
    with pytest.raises(ValidationError, match="id_col and image_embedding_column are both 'uid'"):
        TimmImageEmbedder(TINY_MODEL, pretrained=False, image_embedding_column="uid", id_col="uid")


@pytest.mark.parametrize("name", ["id_column", "id_col"])
def test_an_embedders_id_column_that_the_dataset_contradicts_is_refused_before_any_work(tmp_path, name):
    """TimmImageEmbedder(id_column='uid') called on a dataset opened with id_col 'key' (from_webdataset's default)
    ran with 'key': the embedder's own setting was dropped without a word. The two must agree; where they do, or
    the embedder leaves it out, the dataset's is the run's."""
    from wdsembed import ImageTextPairDataset, TimmImageEmbedder
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    write_shard(tmp_path / "dataset", "00000", [ShardSample(encode_image(make_image(32, 24, seed=0), "bmp"),
                                                            ext="bmp")])
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "dataset"))
    with pytest.raises(ValueError, match=re.escape(
            f"{name}='uid' and the dataset's id_col 'key' differ: give the id column once, "
            "ImageTextPairDataset.from_webdataset(path, id_col='uid')")):
        TimmImageEmbedder(TINY_MODEL, pretrained=False, **{name: "uid"})(dataset)
    assert not (tmp_path / "dataset_embeddings").exists()
    embedded = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", **{name: "key"})(dataset)
    assert [r.embedded for r in embedded.results] == [1]


def _one_shard(folder: Path) -> Path:
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    write_shard(folder, "00000", [ShardSample(encode_image(make_image(32, 24, seed=i), "bmp"), ext="bmp")
                                  for i in range(2)])
    return folder


def test_api_runs_on_the_scheduler_at_dask_address_and_leaves_the_current_client(tmp_path, monkeypatch):
    """dask_address, as for the CLI and the flow: the shards run on that scheduler's workers, through a client of
    the call's own (closed after), never in the calling process, and a client the caller made current stays so."""
    from distributed import Client, LocalCluster, default_client

    from wdsembed import api

    monkeypatch.setattr(api, "_run_here", lambda config, plans: pytest.fail("shards ran in the calling process"))
    shards = _one_shard(tmp_path / "in")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as there, \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as mine, \
            Client(mine) as current:
        embedder = _embedder_with(dask_address=there.scheduler_address)
        results = embedder(str(shards), str(tmp_path / "out"))
        assert [r.stem for r in results] == ["00000"] and results[0].embedded == 2
        assert any(str(entry[0]).startswith("wdsembed-00000-") for entry in there.scheduler.transition_log)
        assert not mine.scheduler.transition_log  # nothing went to the current client's cluster
        assert default_client() is current
        assert len(there.scheduler.clients) == 1  # the call's client is closed (the scheduler's own remains)


def test_api_at_dask_address_runs_where_no_client_is_current(tmp_path, monkeypatch):
    """dask_address from a plain script, where no Dask client is current: the call's own client (never made
    current) collects the shards' results and the manifest is written. Waiting on its futures once asked for the
    current client, and failed ("No clients found") after every shard was written, with no manifest."""
    import fsspec
    from distributed import LocalCluster
    from distributed.client import _get_global_client

    from wdsembed import api
    from wdsembed.output import read_manifest

    monkeypatch.setattr(api, "_run_here", lambda config, plans: pytest.fail("shards ran in the calling process"))
    shards = _one_shard(tmp_path / "in")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as there:
        assert _get_global_client() is None
        results = _embedder_with(dask_address=there.scheduler_address)(str(shards), str(tmp_path / "out"))
        assert _get_global_client() is None
    assert [r.stem for r in results] == ["00000"] and results[0].embedded == 2
    assert read_manifest(str(tmp_path / "out"), fsspec.filesystem("file"))["shards"].keys() == {"00000"}


def test_api_with_an_unreachable_dask_address_fails_naming_it_and_runs_nothing_here(tmp_path, monkeypatch):
    """dask_address is never ignored: nothing listens at the address, so the call is refused by the checks, as the
    command is, naming it; no shard runs in the calling process instead, and no output is claimed."""
    from wdsembed import api
    from wdsembed.preflight import PreflightError

    ran_here = []
    monkeypatch.setattr(api, "_run_here", lambda config, plans: ran_here.append(plans) or ([], {}))
    shards = _one_shard(tmp_path / "in")
    embedder = _embedder_with(dask_address="tcp://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(PreflightError, match="Dask address tcp://127.0.0.1:9: no Dask scheduler answers there"):
        embedder(str(shards), str(tmp_path / "out"))
    assert ran_here == [] and not (tmp_path / "out").exists()


def test_interrupted_call_on_a_dask_client_leaves_none_of_its_shards_running_there(tmp_path, monkeypatch, request):
    """Ctrl-C in a notebook while the shards run on the current client's workers: the call's shards not yet done
    are cancelled there. They ran on, kept alive by the traceback that the REPL keeps, each embedded and then
    refused at its write (the call's claim is released as it ends) with a "Compute Failed" traceback, and the next
    call's shards waited behind them."""
    import signal
    import threading
    import time

    from distributed import Client, LocalCluster

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "dataset", tmp_path / "out"
    for s in range(6):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(6, seed=s)))
    # The last shard held: the call cannot end before its Ctrl-C however late this thread runs on a loaded machine
    # (the workers are threads of this process, which read the spec; the second call holds nothing).
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"00005": {"fail_attempts": 0, "hold_s": 8}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(faults))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a REPL has it, whatever ran here before
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))

    def ctrl_c_once_a_shard_is_written():
        while not any(out.glob("*.parquet")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # a real one, as a terminal sends it: it wakes the main thread's wait

    def tasks_left():
        return [key for key in list(cluster.scheduler.tasks) if str(key).startswith("wdsembed-")]

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        embedder = _embedder_with()
        threading.Thread(target=ctrl_c_once_a_shard_is_written, daemon=True).start()
        with pytest.raises(KeyboardInterrupt) as interrupted:  # its traceback kept, as a REPL keeps the last one
            embedder(str(data), str(out))
        deadline = time.monotonic() + 10
        while tasks_left() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tasks_left() == [], [(key, cluster.scheduler.tasks[key].state) for key in tasks_left()]
        assert interrupted.traceback  # still held
        faults.write_text("{}")
        results = embedder(str(data), str(out))
    assert sorted(r.stem for r in results) == [f"{s:05d}" for s in range(6)]



def test_a_call_on_a_dask_client_takes_each_shard_as_it_ends_while_the_others_are_submitted(tmp_path, monkeypatch):
    """Every shard was submitted before any was taken: a finished shard's result (and its failure, had it failed)
    stayed in Dask until the last submit. Here the submit of 00002 is held until 00000's task has ended: 00000 is
    taken and released before 00003 is submitted."""
    import threading

    from distributed import Client, Future, LocalCluster

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "dataset", tmp_path / "out"
    for s in range(5):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(4, seed=s)))
    events, submitted = [], []
    submit, release = Client.submit, Future.release

    def held_submit(self, fn, *args, **kwargs):
        plan = args[1] if len(args) > 1 else None
        if getattr(plan, "stem", None) is None:  # not a shard's task (the workers' checks)
            return submit(self, fn, *args, **kwargs)
        if plan.stem == "00002":
            # The call's own done callback on 00000 was added as it was submitted: Dask calls a future's callbacks
            # in the order they were added, on one thread, so once this one has been called, so has the call's.
            called = threading.Event()
            submitted[0].add_done_callback(lambda _: called.set())
            assert called.wait(180), "00000's task did not end"
        events.append(("submit", plan.stem))
        future = submit(self, fn, *args, **kwargs)
        submitted.append(future)
        return future

    def noted_release(self):
        events.append(("released", str(self.key).split("-")[1]))
        return release(self)

    monkeypatch.setattr(Client, "submit", held_submit)
    monkeypatch.setattr(Future, "release", noted_release)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        results = _embedder_with()(str(data), str(out))
    assert sorted(r.stem for r in results) == [f"{s:05d}" for s in range(5)]
    assert events.index(("released", "00000")) < events.index(("submit", "00003")), events
    assert sorted(stem for kind, stem in events if kind == "released") == [f"{s:05d}" for s in range(5)], events


def test_a_ctrl_c_while_a_call_submits_its_shards_leaves_none_of_them_running(tmp_path, monkeypatch, request):
    """Ctrl-C in the middle of a call's submits (a notebook's Interrupt, seconds into a call of thousands of shards):
    the shards submitted until then were never cancelled, nor the one whose submit it interrupted, and ran on, kept
    alive by the traceback that the REPL keeps. Here the Ctrl-C comes during the third shard's submit."""
    import signal

    from distributed import Client, LocalCluster

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "dataset", tmp_path / "out"
    for s in range(5):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(4, seed=s)))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a REPL has it
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, before))
    submitted = []
    submit = Client.submit

    def interrupted_submit(self, fn, *args, **kwargs):
        plan = args[1] if len(args) > 1 else None
        future = submit(self, fn, *args, **kwargs)
        if getattr(plan, "stem", None) is not None:
            submitted.append(future)
            if plan.stem == "00002":
                signal.raise_signal(signal.SIGINT)  # a real one, in the middle of the submit
        return future

    monkeypatch.setattr(Client, "submit", interrupted_submit)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        with pytest.raises(KeyboardInterrupt) as interrupted:  # its traceback kept, as a REPL keeps the last one
            _embedder_with()(str(data), str(out))
        assert interrupted.traceback
        assert len(submitted) == 3 and all(f.status == "cancelled" for f in submitted), \
            [(f.key, f.status) for f in submitted]


def _embedder_with(**options):
    from wdsembed import TimmImageEmbedder

    return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1,
                             fidelity_sample=0, **options)


def _embedded_dataset(tmp_path):
    """A dataset as the embedder leaves it: tars and img2dataset parquets in `dataset`, outputs beside."""
    from wdsembed import output
    from wdsembed.nemo import ImageTextPairDataset

    data, out = tmp_path / "dataset", tmp_path / "dataset_embeddings"
    data.mkdir()
    out.mkdir()
    for stem in ("00000", "00001"):
        (data / f"{stem}.tar").write_bytes(b"")
        pq.write_table(pa.table({"key": [f"{stem}1"], "caption": ["a cat"]}), data / f"{stem}.parquet")
        table = pa.table({"key": [f"{stem}1"], "caption": ["a cat"], "image_embedding": [[0.6, 0.8]],
                          "embedding_error": pa.array([None], pa.string())})
        output.write_parquet_atomic(table, str(out / f"{stem}.parquet"), __import__("fsspec").filesystem("file"),
                                    metadata={"cache_key": "k"})
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key")
    assert dataset.default_embeddings_path() == str(out)
    return dataset.with_embeddings(str(out), []), data, out


def test_save_metadata_never_overwrites_the_dataset(tmp_path):
    from wdsembed import output

    embedded, data, out = _embedded_dataset(tmp_path)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    assert embedded.save_metadata() == str(out)  # already there: nothing written
    with pytest.raises(ValueError, match="would write into the dataset's own folder"):
        embedded.save_metadata(str(data))
    with pytest.raises(ValueError, match="would write into the dataset's own folder"):
        embedded.save_metadata(str(data / "copy"))
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before

    copy = embedded.save_metadata(str(tmp_path / "copy"), columns=["key", "image_embedding"])
    table = pq.read_table(Path(copy) / "00001.parquet")
    assert table.column_names == ["key", "image_embedding"] and table.column("image_embedding").to_pylist() == [[0.6, 0.8]]
    meta = output.read_output_metadata(str(Path(copy) / "00001.parquet"), __import__("fsspec").filesystem("file"))
    assert "cache_key" not in meta  # a copy is never taken for a finished output
    assert embedded.metadata.compute().shape == (2, 4)
    with pytest.raises(KeyError, match="no column"):
        embedded.save_metadata(str(tmp_path / "copy2"), columns=["nope"])


def test_changes_to_metadata_stay_and_save_metadata_writes_them(tmp_path):
    """`metadata` is an attribute, as NeMo Curator's is: a column set on it (its tutorial's
    `dataset.metadata["passes_aesthetic_check"] = ...`) and a frame assigned to it stay the dataset's metadata, and
    save_metadata(path) writes them, each shard's rows to its file, in the file's column types. It was read anew at
    each access: the column was lost without a word, the assignment raised FrozenInstanceError, and save_metadata
    wrote the files as they were."""
    embedded, data, out = _embedded_dataset(tmp_path)
    written = _parquets(out)
    metadata = embedded.metadata
    metadata["long_caption"] = metadata["caption"].str.len() > 3
    assert embedded.metadata is metadata and "long_caption" in embedded.metadata.columns
    with pytest.raises(ValueError, match="the metadata was changed since it was read, and .* holds the embedder's "
                                         "outputs, which the next run resumes from: pass another folder"):
        embedded.save_metadata()  # the outputs' finished-shard keys would go: the next run would embed all again
    assert _parquets(out) == written

    embedded.metadata = embedded.metadata[embedded.metadata["key"] != "000011"]
    saved = Path(embedded.save_metadata(str(tmp_path / "saved")))
    first, second = (pq.read_table(saved / f"{stem}.parquet") for stem in ("00000", "00001"))
    assert first.column("long_caption").to_pylist() == [True] and second.num_rows == 0
    source = pq.read_schema(out / "00000.parquet").remove_metadata()
    assert first.drop_columns(["long_caption"]).schema.remove_metadata() == source  # no large_string, no double
    assert pq.read_table(saved / "00001.parquet", columns=["key"]).column("key").type == pa.string()

    embedded.metadata = embedded.metadata.repartition(npartitions=1)
    with pytest.raises(ValueError, match="1 partitions, not one per shard's metadata file"):
        embedded.save_metadata(str(tmp_path / "saved2"))


def test_metadata_reads_every_shard_when_one_had_no_img2dataset_parquet(tmp_path):
    """The output of a shard without an img2dataset parquet has only the key, embedding and error columns. Dask
    took the columns from one file, and computing `metadata` then failed on that shard's partition (KeyError:
    "['caption', ...] not in index"). Every shard is a partition, in shard order, with every column."""
    from wdsembed import ImageTextPairDataset, TimmImageEmbedder
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = tmp_path / "dataset"
    for s in range(3):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(2, seed=s)), parquet=s != 1, stats=s != 1)
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4,
                                 num_threads_per_worker=1, fidelity_sample=0)
    metadata = embedder(ImageTextPairDataset.from_webdataset(str(data), id_col="key")).metadata
    assert metadata.npartitions == 3
    frame = metadata.compute()
    assert list(frame["key"]) == ["000000000", "000000001", "000010000", "000010001", "000020000", "000020001"]
    assert frame["caption"].notna().tolist() == [True, True, False, False, True, True]
    assert frame["image_embedding"].notna().all() and frame["embedding_error"].isna().all()


def test_metadata_is_every_shards_rows_whatever_the_names_of_its_files_and_folders(tmp_path):
    """Dask's read_parquet globs each path of a list that holds `*`, `?` or `[` (fsspec's expand_paths_if_needed):
    a dataset in `photos [2024]/`, or a shard `[1].tar`, read no rows of those files without a word (the metadata
    of `photos [2024]` was empty; save_metadata of an edit wrote nothing of it). And it takes a folder named
    `name=value` for a hive partition: a dataset under `version=2/` got a `version` column in every row, and one
    under `status=new/` failed to read (the column `status` of img2dataset's parquets). Every shard's rows are
    read, with the files' own columns."""
    from conftest import write_parquet_folder
    from wdsembed import ImageTextPairDataset
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = tmp_path / "status=new" / "photos [2024]?=x"
    stems = ["00000", "[1]", "a?b", "c*d"]
    for s, stem in enumerate(stems):
        write_shard(data, stem, from_encoded(synthetic_images(2, seed=s)), shard_id=s, parquet=stem != "a?b")
    write_parquet_folder(pq.read_table(data / "c*d.parquet"), data / "c*d.parquet", parts=2, layout="dask")
    source = ImageTextPairDataset.from_webdataset(str(data), id_col="key")  # the dataset's own parquets
    columns = pq.read_schema(data / "00000.parquet").names
    assert list(source.metadata.columns) == columns and len(source.metadata.compute()) == 6
    embedded = _embedder_with()(source)
    assert [Path(f).name for f in embedded.metadata_files()] == [f"{stem}.parquet" for stem in sorted(stems)]
    frame = embedded.metadata.compute()
    assert list(frame.columns) == columns + ["image_embedding", "embedding_error"]
    assert list(frame["key"]) == ["000000000", "000000001", "000010000", "000010001", "000020000", "000020001",
                                  "000030000", "000030001"]  # shard order: 00000, [1], a?b, c*d
    assert frame["image_embedding"].notna().all()
    assert frame["caption"].isna().tolist() == [False] * 4 + [True] * 2 + [False] * 2  # a?b had no parquet


def test_a_datasets_parquets_written_as_folders_are_its_metadata(tmp_path):
    """A shard's parquet written as a folder of part files (Spark's `part-00000-<uuid>.snappy.parquet`, Dask's
    `part.0.parquet` ... `part.11.parquet`) is its metadata, as one file is: one partition per shard, its rows in
    its parts' order (Dask's read_parquet takes no folder among files, and reads each part as a partition of its
    own); save_metadata writes it as one file; the embedder's outputs keep its columns."""
    from conftest import write_parquet_folder
    from wdsembed import ImageTextPairDataset, TimmImageEmbedder
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = tmp_path / "dataset"
    for s, n in enumerate((2, 12, 3)):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(n, seed=s)))
    tables = [pq.read_table(data / f"{s:05d}.parquet") for s in range(3)]
    write_parquet_folder(tables[1], data / "00001.parquet", parts=12, layout="dask")
    write_parquet_folder(tables[2], data / "00002.parquet", parts=2)
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key")
    assert [Path(f).name for f in dataset.metadata_files()] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    metadata = dataset.metadata
    assert metadata.npartitions == 3
    assert list(metadata.compute()["key"]) == [k for t in tables for k in t.column("key").to_pylist()]
    saved = Path(dataset.save_metadata(str(tmp_path / "saved"), columns=["key", "caption"]))
    for s, table in enumerate(tables):
        assert pq.read_table(saved / f"{s:05d}.parquet").equals(table.select(["key", "caption"]))

    metadata["long_caption"] = metadata["caption"].str.len() > 3
    edited = Path(dataset.save_metadata(str(tmp_path / "edited")))
    assert pq.read_table(edited / "00001.parquet").column("key").to_pylist() == tables[1].column("key").to_pylist()

    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4,
                                 num_threads_per_worker=1, fidelity_sample=0)
    out = pq.read_table(Path(embedder(dataset).metadata_path) / "00001.parquet")
    assert out.column_names == tables[1].column_names + ["image_embedding", "embedding_error"]
    assert out.column("key").equals(tables[1].column("key")) and out.column("image_embedding").null_count == 0


def test_default_output_needs_a_parent():
    from wdsembed.nemo import ImageTextPairDataset

    with pytest.raises(ValueError, match="no parent folder"):
        ImageTextPairDataset(path="s3://bucket", tar_files=["s3://bucket/00000.tar"]).default_embeddings_path()
    assert ImageTextPairDataset(path="s3://bucket/shards", tar_files=[]).default_embeddings_path() \
        == "s3://bucket/shards_embeddings"


def test_default_embeddings_folder_of_the_current_folder_is_beside_it(tmp_path, monkeypatch):
    """A script run from inside the dataset, from_webdataset(path="."), gets `<dataset>_embeddings` beside it,
    not "._embeddings", a hidden folder inside the dataset."""
    from wdsembed.nemo import ImageTextPairDataset

    (tmp_path / "dataset" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "dataset" / "sub")
    for spelled in ("..", "../", "../.", str(tmp_path / "dataset") + "/"):
        target = ImageTextPairDataset(path=spelled, tar_files=[]).default_embeddings_path()
        assert target == str(tmp_path / "dataset_embeddings"), spelled
    monkeypatch.chdir(tmp_path / "dataset")
    target = ImageTextPairDataset(path=".", tar_files=[]).default_embeddings_path()
    assert target == str(tmp_path / "dataset_embeddings")


def _image(i: int):
    from wdsembed.synthetic import ShardSample, encode_image, make_image

    return ShardSample(encode_image(make_image(40, 30, seed=i), "bmp"), ext="bmp", caption=f"image {i}")


def _embedder():
    from wdsembed import TimmImageEmbedder

    return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                             fidelity_sample=0)


def _parquets(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_save_metadata_refuses_the_datasets_folder_however_it_is_spelled(tmp_path, monkeypatch):
    """The dataset opened as "dataset" (relative, as the reference script writes it) and saved to its absolute path
    or to "./dataset": one folder, refused; img2dataset's parquets are the shards' rows in every later run."""
    pytest.importorskip("nvidia.dali")
    from wdsembed import ImageTextPairDataset
    from wdsembed.synthetic import write_shard

    write_shard(tmp_path / "dataset", "00000", [_image(i) for i in range(3)], failed_rows=1)
    monkeypatch.chdir(tmp_path)
    before = _parquets(tmp_path / "dataset")
    embedded = _embedder()(ImageTextPairDataset.from_webdataset(path="dataset", id_col="key"))
    for spelling in (str(tmp_path / "dataset"), "./dataset", "dataset/", str(tmp_path / "dataset" / "sub")):
        with pytest.raises(ValueError, match="would write into the dataset's own folder"):
            embedded.save_metadata(spelling)
        assert _parquets(tmp_path / "dataset") == before, spelling
        assert not (tmp_path / "dataset" / "sub").exists()


def test_embedding_into_the_datasets_own_folder_is_refused_before_any_work(tmp_path):
    """embedding_model(dataset, dataset.path), the reference's layout asked for directly, and the plain API's
    embedder(IN, IN) would write OUTPUT/<stem>.parquet over img2dataset's INPUT/<stem>.parquet (and every later run
    would recompute, its parquet changed): refused, as the CLI refuses it, before a shard is read."""
    pytest.importorskip("nvidia.dali")
    from wdsembed import ImageTextPairDataset
    from wdsembed.inputs import InputError
    from wdsembed.synthetic import write_shard

    data = tmp_path / "dataset"
    write_shard(data, "00000", [_image(i) for i in range(3)], failed_rows=1)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    dataset = ImageTextPairDataset.from_webdataset(path=str(data), id_col="key")
    for call in (lambda: _embedder()(dataset, str(data)), lambda: _embedder()(dataset, f"{data}/./emb"),
                 lambda: _embedder()(str(data), str(data))):
        with pytest.raises(InputError, match="is inside input"):
            call()
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # no .idx, no manifest either


def test_save_metadata_onto_the_embeddings_folder_by_another_spelling_writes_nothing(tmp_path, monkeypatch):
    """The embeddings folder named by its absolute path is where they already are: nothing is rewritten, so their
    footers keep the finished-shard key and the next run of the same script recomputes nothing."""
    pytest.importorskip("nvidia.dali")
    from wdsembed import ImageTextPairDataset
    from wdsembed.synthetic import write_shard

    write_shard(tmp_path / "dataset", "00000", [_image(i) for i in range(3)], failed_rows=1)
    monkeypatch.chdir(tmp_path)
    dataset = ImageTextPairDataset.from_webdataset(path="dataset", id_col="key")
    embedder = _embedder()
    embedded = embedder(dataset)
    written = _parquets(tmp_path / "dataset_embeddings")
    for spelling in (str(tmp_path / "dataset_embeddings"), "./dataset_embeddings/"):
        assert embedded.save_metadata(spelling) == spelling.rstrip("/")
    assert _parquets(tmp_path / "dataset_embeddings") == written
    assert [r.cached for r in embedder(dataset).results] == [True]


ROUTER_CHILD = r'''
import logging, subprocess, sys, time
logging.basicConfig(filename=sys.argv[1], level=logging.DEBUG)
if sys.argv[2] == "slow":  # a handler that takes its time (a loaded machine, a remote log): the process ends first
    logging.getLogger().handlers[0].addFilter(lambda record: time.sleep(0.5) or True)
from wdsembed.decoderlog import decoder_messages_to_log
print("before", file=sys.stderr)
with decoder_messages_to_log():
    print("python line", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write("
                    "'\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder] Could not decode\\n' 'child line\\n' "
                    "'libpng error: IDAT: invalid distance too far back'); sys.stderr.flush(); sys.stderr.write('\\n')"])
    sys.stderr.write("partial")
print(" after", file=sys.stderr)
'''


@pytest.mark.parametrize("handler", ["quick", "slow"])
def test_router_logs_decoder_lines_and_passes_the_rest(tmp_path, handler):
    """Every decoder line is logged before the context ends, however slow the log's handler."""
    log = tmp_path / "log.txt"
    done = subprocess.run([sys.executable, "-c", ROUTER_CHILD, str(log), handler], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "before\npython line\nchild line\npartial after\n"
    assert "DEBUG:wdsembed.decoder:ERROR libjpeg_turbo_decoder: Could not decode" in log.read_text()
    # libpng's own handler's line, which nvImageCodec's PNG decoder leaves in place (a damaged PNG)
    assert "DEBUG:wdsembed.decoder:ERROR libpng: IDAT: invalid distance too far back" in log.read_text()


ROUTER_OWN_LOG = r'''
import logging, sys, time
logging.basicConfig(stream=sys.stderr, level=sys.argv[1], format=sys.argv[2])
from wdsembed.decoderlog import decoder_messages_to_log
with decoder_messages_to_log():
    logging.getLogger("wdsembed").warning("shard 00000: 3 images failed")
    time.sleep(0.5)
'''
BRACKETED = "[%(levelname)s] [%(name)s] %(message)s"
COLOURED_LIKE_THE_DECODER = "\x1b[0;33m[%(levelname)s] \x1b[0m[%(name)s] %(message)s"


@pytest.mark.parametrize("level, fmt", [("INFO", BRACKETED), ("DEBUG", BRACKETED),
                                        ("DEBUG", COLOURED_LIKE_THE_DECODER)])
def test_own_log_lines_in_a_bracketed_format_pass_unchanged_and_never_loop(level, fmt):
    """A warning must reach the terminal, not the decoder's DEBUG log; at DEBUG, a line that the decoder logger
    wrote must never be routed again (each turn would log it once more, for as long as the run lasts)."""
    done = subprocess.run([sys.executable, "-c", ROUTER_OWN_LOG, level, fmt], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (fmt % {"levelname": "WARNING", "name": "wdsembed",
                                  "message": "shard 00000: 3 images failed"}) + "\n", done.stderr[:300]


API_RUN = textwrap.dedent(f'''
    import json, logging, sys
    logging.basicConfig(filename=sys.argv[3], level=logging.DEBUG)
    from wdsembed import TimmImageEmbedder
    embedder = TimmImageEmbedder("{TINY_MODEL}", pretrained=False, batch_size=4, num_threads_per_worker=1,
                                 device="cpu")
    results = embedder(sys.argv[1], sys.argv[2])
    print(json.dumps([r.errors for r in results]))
''')


@pytest.mark.slow
def test_api_run_keeps_decoder_lines_off_the_terminal(tmp_path):
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=6, corrupt_per_shard=2)  # a cut JPEG, a damaged PNG
    runs = []
    for i in (1, 2):  # the second run finds the shard done
        done = subprocess.run([sys.executable, "-c", API_RUN, str(tmp_path / "in"), str(tmp_path / "out"),
                               str(tmp_path / f"log{i}.txt")], env=env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((done, json.loads((tmp_path / "out" / "_manifest.json").read_text())))
    first, second = runs
    assert "libpng" not in first[0].stderr + first[0].stdout  # the decoder's own lines, for the damaged PNG
    assert "wdsembed.decoder:ERROR libpng: " in (tmp_path / "log1.txt").read_text()
    assert "truncated JPEG" in first[0].stdout  # the reason is on the row
    # the cached re-run keeps the computing run's figures
    computed, cached = first[1]["shards"]["00000"], second[1]["shards"]["00000"]
    assert cached["status"] == "cached" and computed["status"] == "computed"
    assert cached["seconds"] == computed["seconds"] > 0 and cached["images_per_second"] == computed["images_per_second"] > 0


def test_a_dataset_embedded_again_after_its_folder_grew_describes_the_shards_embedded(tmp_path):
    """A dataset opened once and embedded every day, as its folder grows (a shard added, one removed): the
    embedder embeds the folder as it is, but the dataset it returned kept the shards it was opened with. Its
    `results` named 00001 and 00002 while its `metadata` read 00000 (gone from the dataset) and 00001, and
    save_metadata() copied those, without the new shard's rows. It now describes the shards it embedded."""
    from wdsembed import ImageTextPairDataset
    from wdsembed.synthetic import write_shard

    data = tmp_path / "dataset"
    for s in range(2):
        write_shard(data, f"{s:05d}", [_image(10 * s + i) for i in range(2)], shard_id=s)
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key")
    _embedder()(dataset)

    write_shard(data, "00002", [_image(20 + i) for i in range(2)], shard_id=2)  # the next day's
    (data / "00000.tar").unlink()
    embedded = _embedder()(dataset)
    assert [r.stem for r in embedded.results] == ["00001", "00002"]
    assert embedded.stems == ["00001", "00002"]
    assert sorted(embedded.metadata.compute()["key"]) == ["000010000", "000010001", "000020000", "000020001"]
    copy = Path(embedded.save_metadata(str(tmp_path / "copy")))
    assert sorted(p.name for p in copy.glob("*.parquet")) == ["00001.parquet", "00002.parquet"]


def test_from_webdataset_lists_the_shards_the_embedder_embeds(tmp_path):
    """A dataset copied from a Mac carries `._00000.tar` (a resource fork, no tar) beside each shard: the embedder
    leaves hidden files out, as every folder input does, but from_webdataset listed them in tar_files (and stems),
    so the dataset named a shard the embedding never had. Both list the same shards now."""
    from wdsembed import ImageTextPairDataset, TimmImageEmbedder

    data = _one_shard(tmp_path / "dataset")
    (data / "._00000.tar").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble's magic
    (data / ".partial.tar").write_bytes((data / "00000.tar").read_bytes())
    dataset = ImageTextPairDataset.from_webdataset(str(data))
    assert dataset.tar_files == [str(data / "00000.tar")] and dataset.stems == ["00000"]
    embedded = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu")(dataset)
    assert [r.shard for r in embedded.results] == dataset.tar_files == embedded.tar_files


def test_pathlib_paths_work_where_strings_do(tmp_path):
    """Python code holds paths as pathlib.Path (pytest's tmp_path, Path.home() / "data"): from_webdataset and
    save_metadata failed with "AttributeError: 'PosixPath' object has no attribute 'rstrip'", and the embedder with
    pydantic's "input: Input should be a valid string". Every path parameter takes an os.PathLike as its str."""
    from wdsembed import ImageTextPairDataset, TimmImageEmbedder

    data = _one_shard(tmp_path / "dataset")
    dataset = ImageTextPairDataset.from_webdataset(data)
    assert dataset.path == str(data) and dataset.tar_files == [str(data / "00000.tar")]
    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu",
                                index_cache_dir=tmp_path / "idx")(data, tmp_path / "out")
    assert [r.output for r in results] == [str(tmp_path / "out" / "00000.parquet")]
    embedded = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu")(dataset, tmp_path / "emb")
    assert embedded.metadata_path == str(tmp_path / "emb")
    assert embedded.save_metadata(tmp_path / "copy") == str(tmp_path / "copy")
    assert (tmp_path / "copy" / "00000.parquet").is_file()


@pytest.mark.parametrize("url", [
    "s3://AKIA:hunter2@bucket/shards",
    "simplecache::s3://AKIA:hunter2@bucket/shards",  # a chained URL: the password is in its second link
    "ftp://me:hunter2@127.0.0.1:9/shards",
    "s3://hunter2@bucket/shards",  # a user name alone (an access key ID) was taken, and quoted by botocore
])
def test_a_url_with_a_password_is_refused_where_it_enters_without_echoing_it(tmp_path, url):
    """from_webdataset("s3://AKIA:hunter2@bucket/shards") raised botocore's 'Invalid bucket name
    "AKIA:hunter2@bucket"' within its own 'cannot read input s3://AKIA:hunter2@...': the password twice, into a
    notebook's saved output. Each place a URL enters the dataset refuses it first, in one line naming the
    parameter, before any store is asked (no server here: a request would fail otherwise, quoting it)."""
    from wdsembed import ImageTextPairDataset, TimmImageEmbedder

    embedded, data, _ = _embedded_dataset(tmp_path)
    held = "a password" if ":hunter2@" in url else "a user name"
    said = f"the URL holds {held}, which would be logged and stored (not shown here); credentials come from"
    entries = {
        "path": lambda: ImageTextPairDataset.from_webdataset(url),
        "storage_options['endpoint_url']": lambda: ImageTextPairDataset.from_webdataset(
            data, storage_options={"endpoint_url": url}),
        "metadata_path": lambda: ImageTextPairDataset(path=str(data), tar_files=[], metadata_path=url),
        "save_metadata(path)": lambda: embedded.save_metadata(url),
    }
    for name, call in entries.items():
        with pytest.raises(ValueError) as refusal:
            call()
        assert str(refusal.value).startswith(f"{name}: {said}"), refusal.value
        assert "hunter2" not in str(refusal.value) and "\n" not in str(refusal.value)
        assert 'storage_options={"profile": NAME}' in str(refusal.value)  # the API's words, not the command's
    # the embedder's own (EmbedConfig's field errors, which never show the value), input or output
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False)
    for call in (lambda: embedder(url, str(tmp_path / "out")), lambda: embedder(str(data), url)):
        with pytest.raises(ValueError, match=f"the URL holds {held}") as refusal:
            call()
        assert "hunter2" not in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_save_metadata_keeps_a_named_pandas_index(tmp_path):
    """A metadata parquet written by pandas with a named index (`df.set_index("uid").to_parquet(...)`): Dask reads
    that column as the frame's index, and save_metadata of the changed metadata wrote each partition without its
    index, so the column was gone from the saved files without a word. It stays a column, with its values."""
    import pandas as pd

    from wdsembed import ImageTextPairDataset
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = tmp_path / "dataset"
    shard = write_shard(data, "00000", from_encoded(synthetic_images(3, seed=0)))
    frame = pq.read_table(shard.parquet).to_pandas()
    frame.index = pd.Index(["u0", "u1", "u2"], name="uid")
    frame.to_parquet(shard.parquet)
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key")
    dataset.metadata["long_caption"] = dataset.metadata["caption"].str.len() > 3
    saved = pq.read_table(Path(dataset.save_metadata(str(tmp_path / "saved"))) / "00000.parquet")
    assert saved.column("uid").to_pylist() == ["u0", "u1", "u2"]
    assert saved.column("long_caption").to_pylist() == [True] * 3
    assert saved.column_names[:len(frame.columns)] == list(frame.columns)  # the file's order, new columns after
    assert pd.read_parquet(tmp_path / "saved" / "00000.parquet").index.name == "uid"


def test_save_metadata_keeps_an_unnamed_pandas_index_where_the_file_holds_one(tmp_path):
    """An img2dataset parquet that pandas wrote after a filter (`df[df.status == "success"].to_parquet(...)`) holds
    its rows' original positions as an unnamed index, the column `__index_level_0__`: save_metadata of the changed
    metadata wrote each partition without its index, so those values were gone from the saved files without a word.
    They stay where pandas wrote them; a file that held no index column gets none, even with rows filtered out."""
    import pandas as pd

    from wdsembed import ImageTextPairDataset
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = tmp_path / "dataset"
    shard = write_shard(data, "00000", from_encoded(synthetic_images(4, seed=0)))
    write_shard(data, "00001", from_encoded(synthetic_images(3, seed=1)))
    frame = pq.read_table(shard.parquet).to_pandas()
    frame[frame.index != 1].to_parquet(shard.parquet)  # rows 0, 2, 3
    assert "__index_level_0__" in pq.read_schema(shard.parquet).names
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key")
    dataset.metadata = dataset.metadata[dataset.metadata["key"] != "000000003"]
    dataset.metadata["long_caption"] = dataset.metadata["caption"].str.len() > 3
    saved = Path(dataset.save_metadata(str(tmp_path / "saved")))
    first = pq.read_table(saved / "00000.parquet")
    assert first.column("__index_level_0__").to_pylist() == [0, 2]
    assert first.column("key").to_pylist() == ["000000000", "000000002"]
    assert first.column("long_caption").to_pylist() == [True, True]
    assert pd.read_parquet(saved / "00000.parquet").index.tolist() == [0, 2]
    second = pq.read_table(saved / "00001.parquet")
    assert "__index_level_0__" not in second.column_names and second.num_rows == 3, second.column_names


def test_saved_metadata_gives_a_column_that_a_shard_lacked_the_other_shards_type(tmp_path):
    """The output of a shard without an img2dataset parquet has only the key, embedding and error columns; in the
    metadata it gets the other shards' columns, null. save_metadata(path) of the changed metadata wrote them in
    pandas' types (strings as large_string, integers with nulls as double), so the saved files disagreed: the
    README's merged read (`pa.unify_schemas`) failed on them ("caption has incompatible types: string vs
    large_string"). Such a column takes the type the other shards' files give it."""
    import fsspec
    import pyarrow.dataset as ds

    from wdsembed import output
    from wdsembed.nemo import ImageTextPairDataset

    data, out = tmp_path / "dataset", tmp_path / "dataset_embeddings"
    data.mkdir()
    out.mkdir()
    embedding = pa.array([[0.6, 0.8]], pa.list_(pa.float32()))
    error = pa.array([None], pa.string())
    tables = {"00000": pa.table({"key": ["000000000"], "caption": ["a cat"], "width": [40],
                                 "image_embedding": embedding, "embedding_error": error}),
              "00001": pa.table({"key": ["000010000"], "image_embedding": embedding, "embedding_error": error})}
    for stem, table in tables.items():
        (data / f"{stem}.tar").write_bytes(b"")
        output.write_parquet_atomic(table, str(out / f"{stem}.parquet"), fsspec.filesystem("file"),
                                    metadata={"cache_key": "k"})
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key").with_embeddings(str(out), [])
    dataset.metadata["embedded"] = dataset.metadata["embedding_error"].isna()
    saved = Path(dataset.save_metadata(str(tmp_path / "saved")))

    second = pq.read_schema(saved / "00001.parquet")
    assert second.field("caption").type == pa.string() and second.field("width").type == pa.int64()
    assert pq.read_table(saved / "00001.parquet").column("width").to_pylist() == [None]
    fragments = ds.dataset(saved, format="parquet").get_fragments()
    schema = pa.unify_schemas([f.physical_schema for f in fragments])  # the README's recipe
    table = ds.dataset(saved, format="parquet", schema=schema).to_table()
    assert table.column("caption").to_pylist() == ["a cat", None] and table.column("embedded").to_pylist() == [True] * 2


def test_saved_metadata_unchanged_has_every_column_of_the_metadata_in_each_file(tmp_path):
    """`metadata` has every column of every shard, null where a shard's file lacks it (a shard without an
    img2dataset parquet), and save_metadata(path, columns) writes "a copy of metadata as it stands". Unchanged, it
    copied the files as they were: a column the metadata has but a file lacked raised KeyError ("... has no
    column(s) ['caption']"), and without `columns` the saved files disagreed, so that pyarrow's dataset read of
    the copy, taking its columns from one file, lost the captions where that file came first."""
    import fsspec
    import pyarrow.dataset as ds

    from wdsembed import output
    from wdsembed.nemo import ImageTextPairDataset

    data, out = tmp_path / "dataset", tmp_path / "dataset_embeddings"
    data.mkdir()
    out.mkdir()
    embedding = pa.array([[0.6, 0.8]], pa.list_(pa.float32()))
    error = pa.array([None], pa.string())
    tables = {"00000": pa.table({"key": ["000000000"], "image_embedding": embedding, "embedding_error": error}),
              "00001": pa.table({"key": ["000010000"], "caption": ["a cat"], "width": [40],
                                 "image_embedding": embedding, "embedding_error": error})}
    for stem, table in tables.items():
        (data / f"{stem}.tar").write_bytes(b"")
        output.write_parquet_atomic(table, str(out / f"{stem}.parquet"), fsspec.filesystem("file"),
                                    metadata={"cache_key": "k"})
    dataset = ImageTextPairDataset.from_webdataset(str(data), id_col="key").with_embeddings(str(out), [])
    assert list(dataset.metadata.columns) == ["key", "image_embedding", "embedding_error", "caption", "width"]

    saved = Path(dataset.save_metadata(str(tmp_path / "saved")))
    schemas = [pq.read_schema(saved / f"{stem}.parquet").remove_metadata() for stem in tables]
    assert schemas[0] == schemas[1] and schemas[0].names == list(dataset.metadata.columns)
    assert schemas[0].field("width").type == pa.int64() and schemas[0].field("image_embedding").metadata is None
    table = ds.dataset(saved, format="parquet").to_table()
    assert table.column("caption").to_pylist() == [None, "a cat"] and table.column("width").to_pylist() == [None, 40]
    assert pq.read_table(saved / "00001.parquet").equals(tables["00001"].select(schemas[0].names))

    picked = Path(dataset.save_metadata(str(tmp_path / "picked"), columns=["key", "caption"]))
    assert pq.read_table(picked / "00000.parquet").to_pydict() == {"key": ["000000000"], "caption": [None]}
    assert pq.read_table(picked / "00001.parquet").to_pydict() == {"key": ["000010000"], "caption": ["a cat"]}
    assert not dataset.metadata.compute().empty  # the source files unchanged: still the embedder's outputs
    assert pq.read_schema(out / "00000.parquet").names == ["key", "image_embedding", "embedding_error"]
