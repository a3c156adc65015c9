"""A flaky store under a run: faults aimed at one object (a shard's tar, parquet, _stats.json, an output) by a real
HTTP proxy on loopback in front of moto's S3 server, the run going through the Python API (in this process, no
Prefect). What a user should see: a fault that passes is retried and the outputs are whole; one that outlasts the
retries fails the shard with a reason naming the object and the cause on one line, leaves nothing of that shard in
OUTPUT, and a re-run finishes it.

Each run starts the store's retries at their least (`max_attempts=1`: one try per request) so that an outlasting
fault fails in seconds.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from s3server import KeyedFaultProxy, MotoS3, aws_from_environment_only
from wdsembed.synthetic import write_demo_dataset

IN_BUCKET, OUT_BUCKET = "wds-in", "wds-out"
TINY_MODEL = "test_resnet.r160_in1k"


@pytest.fixture(scope="module")
def server():
    srv = MotoS3().start()
    s3 = srv.boto()
    s3.create_bucket(Bucket=IN_BUCKET)
    s3.create_bucket(Bucket=OUT_BUCKET)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path_factory, server):
    import s3fs

    aws_from_environment_only(monkeypatch, str(tmp_path_factory.mktemp("aws") / "none"), server.admin)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    write_demo_dataset(folder, n_shards=2, per_shard=6)
    return folder


def upload(server: MotoS3, folder: Path) -> str:
    prefix = f"in-{uuid.uuid4().hex[:8]}"
    s3 = server.boto()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".tar", ".parquet", ".json"):
            s3.upload_file(str(path), IN_BUCKET, f"{prefix}/{path.name}")
    return f"s3://{IN_BUCKET}/{prefix}"


def embed(endpoint: str, url: str, out: str):
    from wdsembed import TimmImageEmbedder

    return TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                             storage_options={"endpoint_url": endpoint, "max_attempts": "1"})(url, out)


def outputs(server: MotoS3, out: str) -> list[str]:
    bucket, prefix = out[len("s3://"):].split("/", 1)
    return [k[len(prefix) + 1:] for k in server.keys(bucket) if k.startswith(prefix + "/")
            and not k[len(prefix) + 1:].startswith("_prefect_results/")]


def embed_both_warned(server, url: str, rules, caplog) -> tuple[KeyedFaultProxy, list[str]]:
    """A run through a proxy with `rules` that embeds both shards whole all the same: the proxy (what it injected)
    and the warnings logged."""
    out = f"s3://{OUT_BUCKET}/out-{uuid.uuid4().hex[:8]}"
    proxy = KeyedFaultProxy(server.endpoint, rules).start()
    try:
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            results = embed(proxy.endpoint, url, out)
    finally:
        proxy.stop()
    assert sorted(r.stem for r in results) == ["00000", "00001"] and all(r.embedded == 6 for r in results)
    return proxy, [r.getMessage() for r in caplog.records]


def test_a_stats_file_the_store_cuts_short_is_ignored_with_a_warning_naming_it(server, dataset, caplog):
    """`_stats.json` is advisory (img2dataset's counts; the shard is read from its tar and parquet): one that cannot
    be read costs a warning naming it. A body cut short on every try (past s3fs's retries) raised aiohttp's
    ClientPayloadError out of the run's planning: the whole run failed before any shard, naming no object."""
    url = upload(server, dataset)
    proxy, said = embed_both_warned(server, url, [("GET", r"/00000_stats\.json$", "truncate", None)], caplog)
    assert proxy.injected["truncate"] >= 1
    warned = [m for m in said if f"{url}/00000_stats.json" in m]
    assert warned and "ignored" in warned[0], said


@pytest.mark.parametrize("kind, cause", [("truncate", "ClientPayloadError"), ("internal", "internal error")])
def test_a_parquet_the_store_never_delivers_fails_its_shard_naming_the_object_and_a_rerun_finishes_it(
        server, dataset, kind, cause):
    """The shard's img2dataset parquet answered 500, or cut short, on every try: the shard fails (after its
    retries), the other is written, nothing of the failed shard is left in OUTPUT, and a re-run finishes it. Its
    reason said 'ClientPayloadError: Response payload is not completed: ...' or 'OSError: [Errno 121] We encountered
    an internal error', naming no object: which of the shard's files (tar, parquet, .idx) the store failed to give was
    left to guess."""
    from wdsembed.shard import ShardsFailed

    url = upload(server, dataset)
    out = f"s3://{OUT_BUCKET}/out-{uuid.uuid4().hex[:8]}"
    proxy = KeyedFaultProxy(server.endpoint, [("GET", rf"{url[len('s3:/'):]}/00000\.parquet$", kind, None)]).start()
    try:
        with pytest.raises(ShardsFailed) as raised:
            embed(proxy.endpoint, url, out)
    finally:
        proxy.stop()
    assert proxy.injected[kind] >= 1
    why = raised.value.failures["00000"]
    assert f"{url}/00000.parquet" in why and cause in why and "\n" not in why, why
    assert sorted(raised.value.failures) == ["00000"], raised.value.failures
    assert not [k for k in outputs(server, out) if "00000" in k], outputs(server, out)

    again = {r.stem: r for r in embed(server.endpoint, url, out)}
    assert again["00000"].embedded == 6 and not again["00000"].cached and again["00001"].cached
    assert sorted(outputs(server, out)) == ["00000.parquet", "00001.parquet", "_embeddings/00000.parquet",
                                             "_embeddings/00001.parquet", "_manifest.json"]


def upload_indexes(server: MotoS3, folder: Path, url: str) -> None:
    """A .idx beside each uploaded tar, as wds2idx (or an earlier run) leaves it: the run then reads it from S3."""
    from wdsembed import shardindex

    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            text = shardindex.build_index(f).render()
        server.boto().put_object(Bucket=IN_BUCKET, Key=f"{url.split('/', 3)[3]}/{tar.stem}.idx", Body=text.encode())


def test_an_index_the_store_cuts_short_at_planning_is_ignored_with_a_warning_naming_it(server, dataset, caplog):
    """A shard's .idx is optional (the tar is read front to back either way): one the planning cannot read is
    ignored and rebuilt from the tar. A body cut short on every try raised aiohttp's ClientPayloadError, naming no
    object, out of the run's checks: the whole run failed before any shard."""
    url = upload(server, dataset)
    upload_indexes(server, dataset, url)
    proxy, said = embed_both_warned(server, url, [("GET", r"/00000\.idx$", "truncate", None)], caplog)
    assert proxy.injected["truncate"] >= 1
    warned = [m for m in said if f"{url}/00000.idx" in m]
    assert warned and "ignoring" in warned[0] and "ClientPayloadError" in warned[0], said
    assert warned[0].count(f"{url}/00000.idx") == 1, warned[0]


def test_a_tar_the_store_fails_while_its_index_is_checked_leaves_the_index_ignored_naming_the_tar(
        server, dataset, monkeypatch, caplog):
    """The planning checks a shard's .idx against two small ranged reads of its tar (the last member's header and
    what follows it). Those reads failing on every try (a body cut short) raised aiohttp's ClientPayloadError out of
    the planning, naming no object: the whole run failed. The index is optional: it is ignored, the warning names
    the tar, and the worker reads the tar without it."""
    from wdsembed import api

    url = upload(server, dataset)
    upload_indexes(server, dataset, url)
    out = f"s3://{OUT_BUCKET}/out-{uuid.uuid4().hex[:8]}"
    tar_gets = ["GET", rf"{url[len('s3:/'):]}/00000\.tar$", "truncate", None]
    proxy = KeyedFaultProxy(server.endpoint, [tar_gets]).start()
    planned = api.plan_run

    def plan_then_deliver(*args, **kwargs):
        try:
            return planned(*args, **kwargs)
        finally:
            proxy.rules.clear()  # the worker's reads of the tar get through

    monkeypatch.setattr(api, "plan_run", plan_then_deliver)
    try:
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            results = embed(proxy.endpoint, url, out)
    finally:
        proxy.stop()
    assert proxy.injected["truncate"] >= 1
    assert sorted(r.stem for r in results) == ["00000", "00001"] and all(r.embedded == 6 for r in results)
    warned = [r.getMessage() for r in caplog.records if f"{url}/00000.tar" in r.getMessage()]
    assert warned and "ignoring index" in warned[0] and f"{url}/00000.idx" in warned[0], \
        [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind, cause", [("truncate", "ClientPayloadError"), ("slowdown", "reduce your request rate")])
def test_an_index_the_store_never_delivers_to_the_worker_fails_its_shard_naming_it_and_a_rerun_finishes_it(
        server, dataset, monkeypatch, kind, cause):
    """The planning read the shard's .idx beside it; the worker's read of it (TarRead._read_index) then failed on
    every try: the shard fails, naming the .idx, and a re-run finishes it. Its reason said 'ClientPayloadError:
    Response payload is not completed: ...' or 'OSError: [Errno 16] Please reduce your request rate.', naming no
    object."""
    from wdsembed import api
    from wdsembed.shard import ShardsFailed

    url = upload(server, dataset)
    upload_indexes(server, dataset, url)
    out = f"s3://{OUT_BUCKET}/out-{uuid.uuid4().hex[:8]}"
    proxy = KeyedFaultProxy(server.endpoint, []).start()
    planned = api.plan_run

    def plan_then_fail_the_index(*args, **kwargs):
        found = planned(*args, **kwargs)
        assert [p.index for p in found[0]] == [f"{url}/00000.idx", f"{url}/00001.idx"]
        proxy.rules.append(["GET", rf"{url[len('s3:/'):]}/00000\.idx$", kind, None])  # the worker's reads, from now
        return found

    monkeypatch.setattr(api, "plan_run", plan_then_fail_the_index)
    try:
        with pytest.raises(ShardsFailed) as raised:
            embed(proxy.endpoint, url, out)
    finally:
        proxy.stop()
    assert proxy.injected[kind] >= 1
    why = raised.value.failures["00000"]
    assert f"{url}/00000.idx" in why and cause in why and "\n" not in why, why
    assert why.count(f"{url}/00000.idx") == 1, why
    assert sorted(raised.value.failures) == ["00000"], raised.value.failures
    assert not [k for k in outputs(server, out) if "00000" in k], outputs(server, out)

    monkeypatch.setattr(api, "plan_run", planned)
    again = {r.stem: r for r in embed(server.endpoint, url, out)}
    assert again["00000"].embedded == 6 and not again["00000"].cached and again["00001"].cached


def test_an_output_the_store_never_takes_fails_its_shard_naming_the_output_and_a_rerun_finishes_it(server, dataset):
    """Every PUT of shard 00000's table answered 503 SlowDown, past the retries: the shard fails, its kNN view
    (written first) is removed, nothing of it is left in OUTPUT, and a re-run finishes it. Its reason said 'OSError:
    [Errno 16] Please reduce your request rate.', naming no object."""
    from wdsembed.shard import ShardsFailed

    url = upload(server, dataset)
    out = f"s3://{OUT_BUCKET}/out-{uuid.uuid4().hex[:8]}"
    proxy = KeyedFaultProxy(server.endpoint, [("PUT", rf"{out[len('s3:/'):]}/00000\.parquet$", "slowdown",
                                               None)]).start()
    try:
        with pytest.raises(ShardsFailed) as raised:
            embed(proxy.endpoint, url, out)
    finally:
        proxy.stop()
    assert proxy.injected["slowdown"] >= 1
    why = raised.value.failures["00000"]
    assert f"{out}/00000.parquet" in why and "reduce your request rate" in why and "\n" not in why, why
    assert why.count(f"{out}/00000.parquet") == 1 and why.count("[Errno") <= 1, why
    assert sorted(raised.value.failures) == ["00000"], raised.value.failures
    assert not [k for k in outputs(server, out) if "00000" in k], outputs(server, out)

    again = {r.stem: r for r in embed(server.endpoint, url, out)}
    assert again["00000"].embedded == 6 and not again["00000"].cached and again["00001"].cached
    assert sorted(outputs(server, out)) == ["00000.parquet", "00001.parquet", "_embeddings/00000.parquet",
                                             "_embeddings/00001.parquet", "_manifest.json"]


def test_a_store_error_named_by_its_object_says_the_name_and_the_errno_once():
    """storage.naming_url put the object's address in front of the store's words, and the callers that name what
    they could not write named it again: 'cannot write s3://b/o/00000.parquet: s3://b/o/00000.parquet: [Errno 13]
    Access Denied', and a manifest's '[Errno 16] s3://b/o/_manifest.json: [Errno 16] Please reduce your request
    rate.'. An OSError with an errno now carries the address as its filename, as Python's own errors do."""
    from wdsembed import storage
    from wdsembed.report import ManifestNotWritten

    manifest = "s3://b/o/_manifest.json"
    slow = storage.naming_url(manifest, OSError(16, "Please reduce your request rate."))
    assert slow.errno == 16 and slow.filename == manifest
    said = str(ManifestNotWritten(slow.errno, str(slow).removeprefix(f"[Errno {slow.errno}] ")))
    assert said.count(manifest) == 1 and said.count("[Errno 16]") == 1 and "reduce your request rate" in said, said

    table = "s3://b/o/00000.parquet"
    denied = storage.naming_url(table, PermissionError(13, "Access Denied"))
    assert isinstance(denied, PermissionError) and denied.filename == table  # still not retried (faults.is_transient)
    assert f"cannot write {denied.filename}: {denied.strerror}" == f"cannot write {table}: Access Denied"
    # without an errno, the address goes in front of the words, once
    plain = storage.naming_url(table, OSError("We encountered an internal error"))
    assert str(plain) == f"{table}: We encountered an internal error"
    assert storage.naming_url(table, plain) is plain


# ---------------------------------------------------------------------------------------------------------------
# One retry policy per key (storeoptions.S3_DEFAULTS, README's "Errors")


def _attempts_default() -> int:
    from wdsembed.storeoptions import S3_DEFAULTS

    return S3_DEFAULTS["max_attempts"]


@pytest.mark.parametrize("extra, tries", [
    ({}, None),  # the default: S3_DEFAULTS' max_attempts
    ({"max_attempts": "3"}, 3),
    ({"max_attempts": "4", "retries": "2"}, 2),  # s3fs's own name for it wins
    # botocore's own retries, where the user turns them on, run inside each of those tries, as asked
    ({"max_attempts": "2", "config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}, 4),
])
def test_a_steady_slowdown_is_tried_as_many_times_as_documented_and_the_error_names_the_key(
        server, dataset, extra, tries):
    """Every GET of one object answered 503 SlowDown: the read gives up after max_attempts requests in all, not
    after botocore's retries inside s3fs's (9 x 5 = 45 requests, and minutes, per key), and says which object and
    why."""
    from wdsembed import storage

    tries = tries or _attempts_default()
    url = upload(server, dataset)
    proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.parquet$", "slowdown", None)]).start()
    try:
        fs, root = storage.filesystem(url, {"endpoint_url": proxy.endpoint, **extra})
        with pytest.raises(OSError) as raised:
            storage.read_whole(fs, f"{root}/00000.parquet")
    finally:
        proxy.stop()
    assert proxy.injected["slowdown"] == tries and proxy.requests == tries, (proxy.injected, proxy.requests)
    said = str(raised.value)
    assert f"{url}/00000.parquet" in said and "reduce your request rate" in said, said


def test_two_runs_asking_different_try_counts_in_one_process_each_keep_their_own(server, dataset):
    """s3fs shares one filesystem instance among all threads of a process that ask for the same options (two runs
    on one shared Dask worker): a count set on that shared instance would let the later run's win for both. Each
    count has an instance of its own, and the earlier run still tries its requests as often as it asked."""
    from wdsembed import storage

    url = upload(server, dataset)
    proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.parquet$", "internal", None)]).start()
    try:
        fs_two, root = storage.filesystem(url, {"endpoint_url": proxy.endpoint, "max_attempts": "2"})
        fs_four, _ = storage.filesystem(url, {"endpoint_url": proxy.endpoint, "max_attempts": "4"})
        with pytest.raises(OSError):
            storage.read_whole(fs_two, f"{root}/00000.parquet")
        assert proxy.requests == 2, proxy.requests
        with pytest.raises(OSError):
            storage.read_whole(fs_four, f"{root}/00000.parquet")
        assert proxy.requests == 2 + 4, proxy.requests
    finally:
        proxy.stop()
    # The same options again give the same instance (its connections kept), and s3fs's own cache clearing drops it.
    import s3fs

    assert storage.filesystem(url, {"endpoint_url": proxy.endpoint, "max_attempts": "2"})[0] is fs_two
    s3fs.S3FileSystem.clear_instance_cache()
    assert storage.filesystem(url, {"endpoint_url": proxy.endpoint, "max_attempts": "2"})[0] is not fs_two


@pytest.mark.parametrize("kind, cause", [("internal", "internal error"), ("unavailable", "unable to handle")])
def test_a_steady_5xx_is_tried_max_attempts_times_though_botocore_no_longer_retries_it(server, dataset, kind, cause):
    """s3fs's own retries take SlowDown, timeouts and cut bodies, not a 500 or a plain 503 (botocore's did): with
    botocore's off, storeoptions.s3_retry_handler gives s3fs those too."""
    from wdsembed import storage

    url = upload(server, dataset)
    proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.parquet$", kind, None)]).start()
    try:
        fs, root = storage.filesystem(url, {"endpoint_url": proxy.endpoint, "max_attempts": "3"})
        with pytest.raises(OSError) as raised:
            storage.read_whole(fs, f"{root}/00000.parquet")
    finally:
        proxy.stop()
    assert proxy.injected[kind] == 3 and proxy.requests == 3, (proxy.injected, proxy.requests)
    said = str(raised.value)
    assert f"{url}/00000.parquet" in said and cause in said, said


def test_a_steady_slowdown_on_a_tars_parts_is_tried_max_attempts_times_and_named(server, dataset):
    """The shard fetcher (s3fetch, boto3 with botocore's retries off) tries a tar's part as often as any other S3
    request: the user's max_attempts."""
    from wdsembed import storage

    url = upload(server, dataset)
    tar = f"{url}/00000.tar"
    proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.tar$", "slowdown", None)]).start()
    try:
        fs, root = storage.filesystem(url, {"endpoint_url": proxy.endpoint, "max_attempts": "3"})
        with pytest.raises(OSError) as raised:
            with storage.open_sequential(fs, f"{root}/00000.tar", size=(dataset / "00000.tar").stat().st_size) as f:
                f.read()
    finally:
        proxy.stop()
    assert proxy.injected["slowdown"] == 3 and proxy.requests == 3, (proxy.injected, proxy.requests)
    said = str(raised.value)
    assert tar in said and "SlowDown" in said and "reduce your request rate" in said, said


# ---------------------------------------------------------------------------------------------------------------
# Bodies cut short: retried on every path that reads an object


def test_a_body_cut_short_is_retried_where_s3fs_would_read_the_object_in_concurrent_parts(server, dataset):
    """s3fs reads an object larger than its block size (default_block_size) by concurrent ranged GETs
    (max_concurrency > 1) and does not retry a body of theirs cut short: read_whole (a shard's parquet, _stats.json,
    .idx) raised aiohttp's ClientPayloadError for one cut. It reads in one GET, retried as a whole."""
    from wdsembed import storage

    url = upload(server, dataset)
    proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.parquet$", "truncate", 1)]).start()
    try:
        fs, root = storage.filesystem(url, {"endpoint_url": proxy.endpoint, "default_block_size": "1024"})
        got = storage.read_whole(fs, f"{root}/00000.parquet")
    finally:
        proxy.stop()
    assert proxy.injected["truncate"] == 1
    assert got == (dataset / "00000.parquet").read_bytes()


def test_a_tar_part_cut_short_is_fetched_again(server, dataset):
    """The shard fetcher checks every part's length (and Content-Range, ETag): a cut body is asked for again."""
    from wdsembed import storage

    url = upload(server, dataset)
    proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.tar$", "truncate", 1)]).start()
    try:
        fs, root = storage.filesystem(url, {"endpoint_url": proxy.endpoint})
        with storage.open_sequential(fs, f"{root}/00000.tar") as f:
            got = f.read()
    finally:
        proxy.stop()
    assert proxy.injected["truncate"] == 1
    assert got == (dataset / "00000.tar").read_bytes()


def test_options_for_a_process_without_wdsembed_still_retry_a_500_there(server, dataset, tmp_path):
    """The NeMo export hands its options to Dask's read_parquet, which runs on workers that may never import
    wdsembed, so s3_retry_handler is not there to retry a 500 for s3fs: those options (elsewhere=True) keep
    botocore's retries, and a read there outlasts two 500s, where this process's options would fail on the first."""
    import json
    import subprocess
    import sys

    from wdsembed.storeoptions import fsspec_options

    url = upload(server, dataset)
    key = f"{url[len('s3://'):]}/00000.parquet"
    script = tmp_path / "read_elsewhere.py"
    script.write_text(
        "import json, sys, s3fs\n"
        "assert 'wdsembed' not in sys.modules\n"
        "fs = s3fs.S3FileSystem(**json.loads(sys.argv[1]))\n"
        "try:\n"
        "    sys.stdout.write(str(len(fs.cat_file(sys.argv[2]))))\n"
        "except Exception as e:\n"
        "    sys.stdout.write(f'failed: {e}')\n")
    seen = {}
    for elsewhere in (True, False):
        proxy = KeyedFaultProxy(server.endpoint, [("GET", r"/00000\.parquet$", "internal", 2)]).start()
        try:
            options = fsspec_options(url, {"endpoint_url": proxy.endpoint, "max_attempts": "3"}, elsewhere=elsewhere)
            done = subprocess.run([sys.executable, str(script), json.dumps(options), key], capture_output=True,
                                  text=True, timeout=120)
        finally:
            proxy.stop()
        seen[elsewhere] = (done.stdout, proxy.injected["internal"])
    assert seen[True] == (str((dataset / "00000.parquet").stat().st_size), 2), seen
    assert seen[False][0].startswith("failed") and seen[False][1] == 1, seen
