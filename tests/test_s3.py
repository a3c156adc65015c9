"""Shards and outputs on S3, against a real S3-compatible server on loopback (moto in server mode, IAM auth on),
with a fault-injecting proxy in front of it for the retry tests.

The storage tests run in seconds; the flow tests (marked slow) run the Prefect flow with a Dask worker and the
tiny timm test model, and compare the S3 outputs with a local run of the same shards.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from s3server import FaultProxy, MotoS3, aws_from_environment_only
from wdsembed import faults, inputs, output, plan, prefetch, s3fetch, shard, shardindex, shards, storage
from wdsembed.config import EmbedConfig
from wdsembed.outputclaim import CLAIM_NAME
from wdsembed.synthetic import ShardSample, encode_image, make_image, write_demo_dataset, write_shard

IN_BUCKET, OUT_BUCKET = "wds-in", "wds-out"
EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
TINY_MODEL = "test_resnet.r160_in1k"


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def server():
    srv = MotoS3(writable=[OUT_BUCKET]).start()  # "reader" may write to the output bucket only
    s3 = srv.boto()
    s3.create_bucket(Bucket=IN_BUCKET)
    s3.create_bucket(Bucket=OUT_BUCKET)
    yield srv
    srv.stop()


def _clear_s3fs_cache():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # cached instances keep the credentials they were made with


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path_factory, server):
    """Credentials only from the environment (the admin's keys), nothing from this machine's ~/.aws."""
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    aws_from_environment_only(monkeypatch, nowhere)
    use_keys(monkeypatch, server.admin)
    yield
    _clear_s3fs_cache()


def use_keys(monkeypatch, keys: tuple[str, str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[1])
    _clear_s3fs_cache()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 img2dataset shards of 6 images (tar + parquet + _stats.json), as the flow tests use."""
    folder = tmp_path_factory.mktemp("dataset")
    write_demo_dataset(folder, n_shards=2, per_shard=6)
    for idx in folder.glob("*.idx"):
        idx.unlink()
    return folder


def upload(server: MotoS3, folder: Path, bucket: str = IN_BUCKET, name: str = "") -> str:
    """Copy the shard files of `folder` under a fresh prefix (ending in `name`); returns s3://bucket/prefix."""
    prefix = f"run-{uuid.uuid4().hex[:8]}{name}"
    s3 = server.boto()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".tar", ".parquet", ".json"):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def options(endpoint: str, **extra) -> dict:
    return {"endpoint_url": endpoint, **extra}


def s3fs_for(endpoint: str, **extra):
    return storage.filesystem(f"s3://{IN_BUCKET}", options(endpoint, **extra))[0]


def config_for(input: str, output: str, endpoint: str | None = None, **kw) -> EmbedConfig:
    base = dict(model_name=TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                n_workers=1, storage_options=options(endpoint) if endpoint else {})
    return EmbedConfig(input=input, output=output, **(base | kw))


# ---------------------------------------------------------------------------------------------------------------
# credentials stay out of the run's parameters


@pytest.mark.parametrize("opts", [
    {"key": "AKIAEXAMPLESECRET"},
    {"secret": "AKIAEXAMPLESECRET"},
    {"token": "AKIAEXAMPLESECRET"},
    {"aws_secret_access_key": "AKIAEXAMPLESECRET"},
    {"password": "AKIAEXAMPLESECRET"},
    {"endpoint_url": "http://user:AKIAEXAMPLESECRET@127.0.0.1:9000"},
])
def test_credentials_in_storage_options_are_refused(opts):
    with pytest.raises(ValidationError) as err:
        EmbedConfig(input="s3://b/in", output="s3://b/out", storage_options=opts)
    text = str(err.value)
    assert "AKIAEXAMPLESECRET" not in text  # the refusal must not echo the secret
    assert "AWS_ACCESS_KEY_ID" in text  # and says where credentials go instead


@pytest.mark.parametrize("url", [
    "ftp://me:hunter2@host/shards",
    "simplecache::ftp://me:hunter2@host/shards",  # a chained URL: the password is in its second link
    "blockcache::s3://AKIA:hunter2@bucket/shards",
    "s3://AKIA:hunter2@bu]cket/shards",  # one urlsplit cannot parse
    "s3://hunter2@bucket/shards",  # a user name alone: an access key ID, say
    "simplecache::gs://hunter2@bucket/shards",
    "https://hunter2@host/shards",  # a token as user name, as GitHub's https URLs take it
])
def test_credentials_in_urls_are_refused(url):
    with pytest.raises(ValidationError) as err:
        EmbedConfig(input=url, output="/tmp/out")
    assert "hunter2" not in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)
    with pytest.raises(ValidationError):
        EmbedConfig(input="/tmp/in", output="/tmp/out", storage_options={"endpoint_url": url})


@pytest.mark.parametrize("url", [
    "github://fsspec:filesystem_spec@6f2c3d1/shards",  # fsspec's GitHub form: org:repo@sha
    "github://fsspec:filesystem_spec@/shards",
    "simplecache::GitHub://fsspec:filesystem_spec@main/shards",
    "git://repo:main@shards",  # fsspec's git form: repo:ref@path
    "oci://bucket@namespace/shards",  # ocifs's form: the bucket before its namespace
    "hdfs://alice@namenode:8020/shards",  # HDFS's user name: a login, as ssh's user@host, not a secret
    "webhdfs://alice@namenode:9870/shards",
])
def test_urls_whose_user_part_names_a_place_are_no_credentials(url):
    """fsspec's `github://org:repo@sha/path` was refused as a URL with a password ('org:repo@' reads as
    'user:password@'), on every path; so were git's `repo:ref@` and OCI's `bucket@namespace`. Their user part is
    a place by the protocol's own definition (GitHub's token goes in storage options, which refuse it): taken by
    EmbedConfig and the run form, while the same form in another store's URL, or gist's username:TOKEN, is not."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as FormError
    from prefect.utilities.schema_tools import validate

    from flows.deployed import embed
    from wdsembed.storeoptions import url_has_credentials

    schema = parameter_schema(embed).model_dump()
    assert not url_has_credentials(url)
    config = {"input": url, "output": "/tmp/out"}
    assert EmbedConfig(**config).input == url.rstrip("/")
    validate({"config": config}, schema, raise_on_error=True)
    scheme, rest = url.rsplit("://", 1)
    for other in ("s3", "https", "gist", "ftp"):
        refused_url = f"{scheme.rsplit('::', 1)[0] + '::' if '::' in scheme else ''}{other}://{rest}"
        assert url_has_credentials(refused_url), refused_url
        with pytest.raises(ValidationError, match="the URL holds"):
            EmbedConfig(**(config | {"input": refused_url}))
        with pytest.raises(FormError):
            validate({"config": config | {"input": refused_url}}, schema, raise_on_error=True)


def test_plain_options_pass_and_stay_out_of_repr():
    c = EmbedConfig(input="s3://b/in", output="s3://b/out",
                    storage_options={"endpoint_url": "http://127.0.0.1:9000", "profile": "lab", "region_name": "x"})
    assert "storage_options" not in repr(c) and "127.0.0.1:9000" not in str(c)


@pytest.mark.parametrize("values", [
    *({"storage_options": {name: "x"}} for name in ("key", "secret", "token", "aws_secret_access_key",
                                                    "AWS_SECRET_ACCESS_KEY", "Secret", "Account_Key")),
    {"storage_options": {"endpoint_url": "http://minio:hunter2@127.0.0.1:9000"}},
    {"input": "s3://user:hunter2@bucket/shards"},
    {"input": "simplecache::s3://user:hunter2@bucket/shards"},
    {"output": "ftp://me:@host/out"},  # an empty password is one too
    {"checkpoint": "file://me:pw@host/w.pth"},
    # was taken, as the folder './me:hunter2@host/idx', kept with the run's parameters and named in its messages
    {"index_cache_dir": "file://me:hunter2@host/idx"},
    {"result_storage": "s3://a@b:pw@bucket/x"},
    {"result_storage": "s3://AKIAIOSFODNN7EXAMPLE@b/r"},  # a user name alone (an access key ID) is one too
    {"input": "simplecache::S3://AKIAIOSFODNN7EXAMPLE@bucket/shards"},
    {"storage_options": {"endpoint_url": "https://AKIAIOSFODNN7EXAMPLE@127.0.0.1:9000"}},
    {"index_cache_dir": "file://me@host/idx"},
    {"image_extensions": []},
    {"input": ""},
    {"output": "  "},
    {"model_name": ""},
    {"dask_address": "scheduler"},  # no port
    # were taken into the run's parameters: every text field refuses credentials
    {"model_name": "s3://AKIA:hunter2@b/x"},
    {"id_column": "https://hunter2@host/key"},
    {"embedding_column": "s3://AKIAIOSFODNN7EXAMPLE@b/e"},
    {"error_column": "gs://me:hunter2@b/e"},
    {"dask_address": "inproc://me:hunter2@host/1"},
], ids=lambda v: next(iter(v)))
def test_the_run_form_refuses_what_embedconfig_refuses(values):
    """Runs started from the Prefect UI/API are checked against the flow's JSON schema before their parameters are
    stored and shown: a credential EmbedConfig refuses (any letter case, a password in any URL) never gets that
    far; nor does an empty input, output or model name. What EmbedConfig takes, the form takes, nulls included. The
    same validate() as Prefect's server, on the deployed flow's parameter schema."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as FormError
    from prefect.utilities.schema_tools import validate

    from flows.deployed import embed

    schema = parameter_schema(embed).model_dump()
    config = {"input": "s3://b/in", "output": "s3://b/out"} | values
    with pytest.raises(ValueError):
        EmbedConfig(**config)
    with pytest.raises(FormError):
        validate({"config": config}, schema, raise_on_error=True)
    # '@' past the host (a path, a query) is no user name; nor, in Azure's URLs, the container before its account's
    plain = {"input": "/data/user@host/shards", "output": "http://host:9000/out?a=b:c@d",
             "result_storage": "abfs://container@account.dfs.core.windows.net/r",
             "dask_address": "tls://[fd00::1]:8786",
             "storage_options": {"endpoint_url": "http://127.0.0.1:9000", "profile": "keyring", "monkey": "1"}}
    EmbedConfig(**plain)
    validate({"config": plain}, schema, raise_on_error=True)
    # a whole config as pydantic dumps it, every optional field null (run_deployment(parameters={"config": ...}),
    # a client sending null for a field left unset), is a valid run too
    whole = EmbedConfig(**plain).model_dump(mode="json")
    assert whole["checkpoint"] is None and whole["index_cache_dir"] is None and whole["n_workers"] is None
    validate({"config": whole}, schema, raise_on_error=True)


def test_cli_strings_become_s3fs_types():
    got = storage.fsspec_options("s3://b/x", {"endpoint_url": "http://e", "read_timeout": "2.5",
                                               "max_attempts": "3", "anon": "false", "default_block_size": "1024"})
    assert got["anon"] is False and got["default_block_size"] == 1024 and got["endpoint_url"] == "http://e"
    # botocore's own retries off: s3fs's are the one layer, max_attempts tries per request (storage.filesystem)
    assert got["config_kwargs"] == {"connect_timeout": 10.0, "read_timeout": 2.5,
                                    "retries": {"total_max_attempts": 1, "mode": "standard"}}
    assert "max_attempts" not in got and "retries" not in got
    assert storage.filesystem("s3://b/x", {"endpoint_url": "http://e", "max_attempts": "3"})[0].retries == 3
    assert storage.filesystem("s3://b/x", {"endpoint_url": "http://e", "retries": "2"})[0].retries == 2
    # a user's own botocore retries are theirs
    mine = {"retries": {"max_attempts": 4, "mode": "adaptive"}}
    assert storage.fsspec_options("s3://b/x", {"config_kwargs": mine})["config_kwargs"]["retries"] == mine["retries"]
    assert storage.fsspec_options("/local/x", {"auto_mkdir": "true"}) == {"auto_mkdir": True}


# ---------------------------------------------------------------------------------------------------------------
# listing, fingerprints, streaming reads


def test_listing_and_fingerprints(server, dataset):
    url = upload(server, dataset)
    fs, root = storage.filesystem(url, options(server.endpoint))
    tars = shards.list_shards(root, fs)
    assert [os.path.basename(t) for t in tars] == ["00000.tar", "00001.tar"]
    fp = shardindex.fingerprint(tars[0], fs)
    assert fp.size == (dataset / "00000.tar").stat().st_size
    assert fp.etag and fp.mtime

    # the same size, other bytes: a new ETag, so a new cache key
    data = bytearray((dataset / "00000.tar").read_bytes())
    data[-1] ^= 1
    bucket, key = tars[0].split("/", 1)
    server.boto().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    fs.invalidate_cache()
    assert shardindex.fingerprint(tars[0], fs).etag != fp.etag


def test_a_url_naming_an_objects_version_opens_that_version_with_version_aware_among_the_options(server):
    """s3fs reads `?versionId=` in a URL as version_aware; the same said in the options too (as a user of versioned
    buckets passes it) opens that version, as it did through fsspec's url_to_fs, not a TypeError (version_aware
    given twice)."""
    s3, bucket = server.boto(), f"wds-versioned-{uuid.uuid4().hex[:8]}"  # a bucket of its own: the others stay plain
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old = s3.put_object(Bucket=bucket, Key="00000.parquet", Body=b"old")["VersionId"]
    s3.put_object(Bucket=bucket, Key="00000.parquet", Body=b"new")
    url = f"s3://{bucket}/00000.parquet?versionId={old}"
    for extra in ({}, {"version_aware": "true"}):
        fs, path = storage.filesystem(url, options(server.endpoint, **extra))
        assert fs.cat_file(path) == b"old", extra


def test_a_new_shard_is_seen_by_a_long_lived_process(server, dataset):
    url = upload(server, dataset)
    config = config_for(url, f"s3://{OUT_BUCKET}/x", server.endpoint, use_index_files=False)
    assert len(plan.plan_shards(config)) == 2
    bucket, prefix = url[len("s3://"):].split("/", 1)
    server.boto().upload_file(str(dataset / "00000.tar"), bucket, f"{prefix}/00009.tar")
    assert len(plan.plan_shards(config)) == 3  # not the cached listing of the first plan


def upload_tree(server: MotoS3, folder: Path, layout: dict[str, str]) -> str:
    """Copy shard files of `folder` to `<prefix>/<where>`: layout maps a shard's stem in `folder` to the stems it
    gets in the bucket (subfolders allowed); returns s3://bucket/prefix."""
    prefix = f"tree-{uuid.uuid4().hex[:8]}"
    s3 = server.boto()
    for where, stem in layout.items():
        for suffix in (".tar", ".parquet", "_stats.json"):
            s3.upload_file(str(folder / f"{stem}{suffix}"), IN_BUCKET, f"{prefix}/{where}{suffix}")
    return f"s3://{IN_BUCKET}/{prefix}"


def upload_files(server: MotoS3, folder: Path) -> str:
    """Every file below `folder` (hidden ones, and those of subfolders, too) under a fresh prefix, as `aws s3 cp
    --recursive` copies a folder; returns s3://bucket/prefix."""
    prefix = f"files-{uuid.uuid4().hex[:8]}"
    s3 = server.boto()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.upload_file(str(path), IN_BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{IN_BUCKET}/{prefix}"


def _with_spark_parquet(dataset: Path, folder: Path, stems=("00000",)) -> Path:
    """A copy of `dataset` whose shards `stems` have their parquet as Spark writes it: a folder of 3 part files, a
    .crc beside each, _SUCCESS (conftest.write_parquet_folder)."""
    from conftest import write_parquet_folder

    folder.mkdir()
    for path in dataset.iterdir():
        if path.suffix in (".tar", ".parquet", ".json"):
            (folder / path.name).write_bytes(path.read_bytes())
    for stem in stems:
        write_parquet_folder(pq.read_table(dataset / f"{stem}.parquet"), folder / f"{stem}.parquet")
    return folder


def test_a_parquet_file_rewritten_as_a_folder_is_read_past_a_stale_listing(server, dataset, tmp_path):
    """A long-lived process listed a shard's folder while its parquet was one file (s3fs keeps that listing), then
    the parquet was rewritten as a folder of part files: its rows are read, not taken for a parquet gone (None: the
    shard embedded from its tar alone without a word), and its schema is the folder's; one gone raises, naming it."""
    from conftest import write_parquet_folder

    url = upload(server, dataset)
    fs = s3fs_for(server.endpoint)
    path = fs._strip_protocol(f"{url}/00000.parquet")
    fs.ls(url)  # the listing s3fs keeps: 00000.parquet a file
    expected = pq.read_table(dataset / "00000.parquet")
    write_parquet_folder(expected, tmp_path / "00000.parquet")
    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3 = server.boto()
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/00000.parquet")
    for part in sorted((tmp_path / "00000.parquet").iterdir()):
        s3.upload_file(str(part), bucket, f"{prefix}/00000.parquet/{part.name}")
    assert shards.read_rows(path, fs).equals(expected)
    assert shards.read_rows_schema(path, fs) == expected.schema
    with pytest.raises(FileNotFoundError, match="gone since the run listed it"):  # one gone is no parquet's rows
        shards.read_rows(fs._strip_protocol(f"{url}/00002.parquet"), fs)


@pytest.mark.parametrize("form", ["folder", "pattern", "recursive"])
def test_a_parquet_written_as_a_folder_on_s3_is_the_shards_parquet(server, dataset, tmp_path, caplog, form):
    """On S3 a parquet written as a folder of part files (`00000.parquet/part-00000-....snappy.parquet`) is a
    prefix, which the listing gives as a folder: it is the shard's parquet, as on a local disk (test_shards), its
    part objects read in their order and Spark's `_SUCCESS` and `.crc` objects skipped; its fingerprint is its
    parts' ETags."""
    url = upload_files(server, _with_spark_parquet(dataset, tmp_path / "in"))
    given = {"folder": url, "pattern": f"{url}/{{00000..00001}}.tar", "recursive": url}
    config = config_for(given[form], f"s3://{OUT_BUCKET}/pf", server.endpoint, use_index_files=False,
                        recursive=form == "recursive")
    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        first, second = plan.plan_shards(config)
    assert not [r for r in caplog.records if "parquet" in r.getMessage()], caplog.text
    assert first.rows == f"{url}/00000.parquet" and second.rows == f"{url}/00001.parquet"
    fs, path = storage.filesystem(first.rows, config.storage_options)
    assert [p.rsplit("/", 1)[1][:10] for p in shards.parquet_parts(path, fs)] == ["part-00000", "part-00001",
                                                                                  "part-00002"]
    assert shards.read_rows(path, fs).equals(pq.read_table(dataset / "00000.parquet"))
    assert shards.read_rows_schema(path, fs) == pq.read_schema(dataset / "00000.parquet")
    assert plan.plan_shards(config)[0].fingerprint == first.fingerprint
    bucket, prefix = url[len("s3://"):].split("/", 1)
    [part] = [k for k in server.keys(bucket) if k.startswith(f"{prefix}/00000.parquet/part-00002")]
    server.boto().delete_object(Bucket=bucket, Key=part)
    assert plan.plan_shards(config)[0].fingerprint != first.fingerprint


def test_a_shard_whose_parquet_is_a_spark_folder_on_s3_is_embedded_with_its_columns(server, dataset, tmp_path,
                                                                                   caplog):
    """Through the Python API, from and to S3: a shard whose parquet is a Spark folder gets the same output as with
    that parquet as one file (every input column, then the embedding and error columns), as one object
    OUTPUT/00000.parquet. A shard whose folder holds no part (`_SUCCESS` alone: a write that did not finish) is
    embedded from its tar, with a warning naming the folder and why, as for a .parquet that is not parquet."""
    from wdsembed.api import TimmImageEmbedder

    folder = _with_spark_parquet(dataset, tmp_path / "in")
    (folder / "00001.parquet").unlink()
    (folder / "00001.parquet").mkdir()
    (folder / "00001.parquet" / "_SUCCESS").write_bytes(b"")
    url = upload_files(server, folder)
    settings = dict(pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1, fidelity_sample=0,
                    index_cache_dir=str(tmp_path / "idx"))
    reference = tmp_path / "reference"
    TimmImageEmbedder(TINY_MODEL, **settings)(str(dataset), str(reference))
    out_bucket = f"wds-folders-{uuid.uuid4().hex[:8]}"  # a bucket of its own: other tests list OUT_BUCKET whole
    server.boto().create_bucket(Bucket=out_bucket)
    out = f"s3://{out_bucket}/emb"
    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        first, second = TimmImageEmbedder(TINY_MODEL, storage_options=options(server.endpoint), **settings)(url, out)
    objects = _s3_outputs(server, out)
    assert sorted(k for k in objects if not k.startswith("_embeddings/")) == [
        "00000.parquet", "00001.parquet", "_manifest.json"]
    local = pq.read_table(reference / "00000.parquet").replace_schema_metadata(None)
    assert _table_of(objects["00000.parquet"]).equals(local) and not first.warnings
    assert local.column_names[-2:] == ["image_embedding", "embedding_error"] and "caption" in local.column_names
    bucket, prefix = url[len("s3://"):].split("/", 1)
    [warning] = second.warnings
    assert warning == (f"{bucket}/{prefix}/00001.parquet: cannot read as parquet: a folder with no part files (it "
                       "holds _SUCCESS): a write that did not finish, or was not of a parquet; the output holds the "
                       "tar's samples only (no img2dataset columns)")
    assert f"shard 00001: {warning}" in caplog.text
    assert _table_of(objects["00001.parquet"]).column_names == ["key", "image_embedding", "embedding_error"]
    assert second.embedded == 6


@pytest.mark.parametrize("recursive", [False, True])
def test_a_parquet_folder_of_a_folder_marker_alone_on_s3_is_said_as_an_empty_local_one(server, dataset, tmp_path,
                                                                                       recursive):
    """A shard's `00000.parquet/` that holds only its folder marker (a zero-byte object `00000.parquet/`, as the S3
    console's "Create folder" or a writer makes one before its first part) is an empty parquet folder, as an empty
    local one is (test_shards::test_an_empty_parquet_folder_is_said_with_and_without_recursive): the shard is
    embedded from its tar with the warning naming the folder. It ran as a shard without a parquet, without a word.
    The input's own marker (`in/`) and a subfolder's (`in/empty/`) are no shards and no parquets."""
    from wdsembed.api import TimmImageEmbedder

    prefix = f"marker-{uuid.uuid4().hex[:8]}"
    s3 = server.boto()
    s3.upload_file(str(dataset / "00000.tar"), IN_BUCKET, f"{prefix}/in/00000.tar")
    for marker in ("in/", "in/00000.parquet/", "in/empty/", "in/x.tar/"):
        s3.put_object(Bucket=IN_BUCKET, Key=f"{prefix}/{marker}", Body=b"")
    given = f"s3://{IN_BUCKET}/{prefix}" + ("" if recursive else "/in")
    [result] = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 recursive=recursive, index_cache_dir=str(tmp_path / "idx"), fidelity_sample=0,
                                 storage_options=options(server.endpoint))(given, str(tmp_path / "out"))
    assert result.warnings == [f"{IN_BUCKET}/{prefix}/in/00000.parquet: cannot read as parquet: a folder with no "
                               "part files (it holds nothing): a write that did not finish, or was not of a parquet; "
                               "the output holds the tar's samples only (no img2dataset columns)"], result.warnings
    assert (result.rows, result.embedded) == (6, 6)


def test_folder_markers_are_no_files_of_a_listing(server, dataset, tmp_path):
    """Markers below a parquet folder of parts (its own `00000.parquet/`, an empty subfolder's) are neither parts nor
    a partitioned write's subfolder: its rows are read as without them. A prefix holding a folder marker alone is
    an input without shards, said so, with and without recursive."""
    url = upload_files(server, _with_spark_parquet(dataset, tmp_path / "in"))
    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3 = server.boto()
    for marker in ("00000.parquet/", "00000.parquet/_temporary/", "00000.parquet/empty/", "only/"):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{marker}", Body=b"")
    fs, path = storage.filesystem(f"{url}/00000.parquet", options(server.endpoint))
    assert [p.rsplit("/", 1)[1][:10] for p in shards.parquet_parts(path, fs)] == ["part-00000", "part-00001",
                                                                                  "part-00002"]
    assert shards.read_rows(path, fs).equals(pq.read_table(dataset / "00000.parquet"))
    for recursive, said in ((False, ""), (True, ", in no subfolder either")):
        with pytest.raises(inputs.InputError, match=rf"^input '{url}/only' holds no \*\.tar shards{said}$"):
            inputs.find_shards(config_for(f"{url}/only", f"s3://{OUT_BUCKET}/x", server.endpoint,
                                          recursive=recursive))


def test_brace_patterns_and_recursive_folders_on_s3(server, dataset):
    url = upload_tree(server, dataset, {"00000": "00000", "00001": "00001", "train/00000": "00000",
                                        "val/00000": "00001", "val/deep/00003": "00000", "nested/a/00000": "00000",
                                        "nested/b/00000": "00001"})
    out = f"s3://{OUT_BUCKET}/sel"

    def planned(input: str, **kw) -> list[shard.ShardPlan]:
        return plan.plan_shards(config_for(input, out, server.endpoint, use_index_files=False, **kw))

    plans = planned(f"{url}/{{00000..00001}}.tar")
    assert [(p.stem, p.shard, p.rows, p.expected_samples) for p in plans] == [
        (f"{i:05d}", f"{url}/{i:05d}.tar", f"{url}/{i:05d}.parquet", 6) for i in (0, 1)]
    plans = planned(f"{url}/{{train,val}}/00000.tar")
    assert [(p.stem, p.output, p.rows) for p in plans] == [
        ("train/00000", f"{out}/train/00000.parquet", f"{url}/train/00000.parquet"),
        ("val/00000", f"{out}/val/00000.parquet", f"{url}/val/00000.parquet")]
    with pytest.raises(inputs.InputError, match=rf"1 of the 3 shard\(s\) .* do not exist: {url}/00002\.tar$"):
        planned(f"{url}/{{00000..00002}}.tar")
    assert [p.stem for p in planned(url)] == ["00000", "00001"]
    assert [p.stem for p in planned(url, recursive=True)] == ["00000", "00001", "nested/a/00000", "nested/b/00000",
                                                            "train/00000", "val/00000", "val/deep/00003"]
    with pytest.raises(inputs.InputError, match=r"holds no \*\.tar shards directly, but its subfolders hold 2 "
                                              r"\(e\.g\. a/00000\.tar\): pass --recursive \(recursive=True\)"):
        planned(f"{url}/nested")
    assert [p.stem for p in planned(f"{url}/nested", recursive=True)] == ["a/00000", "b/00000"]
    assert [p.stem for p in planned(f"{url}/val", recursive=True)] == ["00000", "deep/00003"]
    with pytest.raises(inputs.InputError, match="bucket does not exist"):
        planned(f"s3://no-such-bucket/{{00000..00001}}.tar")
    plan.check_config(config_for(f"{url}/{{train,val}}/00000.tar", out, server.endpoint))


def test_names_with_braces_or_wildcard_characters_that_exist_on_s3_are_what_they_name(server, dataset, tmp_path):
    """`{`, `}`, `*`, `?` and `[` are legal in S3 keys. A folder `runs{1,2}/` or a shard `a{b,c}.tar` was brace-
    expanded into keys that did not exist, and a key holding `*` (`best*photos/`, `a*b.tar`) refused as a wildcard
    pattern, though the object or prefix existed as written. Where it exists, the name is what it names (as INPUT,
    in a brace pattern, as a list line); where it does not, a brace pattern expands, and a `*` is refused as a
    wildcard, as INPUT or from a pattern or list line alike. Two of them embedded end to end."""
    from wdsembed.api import TimmImageEmbedder

    tree = {"runs{1,2}/a{b,c}": "00000", "runs{1,2}/x{1..2}": "00001", "runs{1,2}/c{": "00000",
            "best*photos/a*b": "00000", "best*photos/c": "00001", "best*photos/x?[1]": "00000"}
    url = upload_tree(server, dataset, tree)
    out = f"s3://{OUT_BUCKET}/names"

    def planned(input: str, **kw) -> list[str]:
        return [p.stem for p in plan.plan_shards(config_for(input, out, server.endpoint, use_index_files=False,
                                                            **kw))]

    assert planned(f"{url}/runs{{1,2}}") == ["a{b,c}", "c{", "x{1..2}"]
    assert planned(f"{url}/best*photos") == ["a*b", "c", "x?[1]"]
    for where in tree:
        stem = where.split("/")[1]
        [one] = plan.plan_shards(config_for(f"{url}/{where}.tar", out, server.endpoint, use_index_files=False))
        assert (one.stem, one.shard, one.rows) == (stem, f"{url}/{where}.tar", f"{url}/{where}.parquet")
    assert planned(f"{url}/best*photos/{{a*b,c}}.tar") == ["a*b", "c"]
    bucket, prefix = url[len("s3://"):].split("/", 1)
    server.boto().put_object(Bucket=bucket, Key=f"{prefix}/shards.txt",
                             Body="".join(f"{where}.tar\n" for where in tree).encode())
    assert planned(f"{url}/shards.txt") == sorted(tree)
    plan.check_config(config_for(f"{url}/best*photos/a*b.tar", out, server.endpoint))  # the command's checks too

    wildcard = r"is a wildcard pattern, which is not expanded: name the shards with a brace pattern"
    for given in (f"{url}/best*photos/*.tar", f"{url}/no*such/{{00000..00001}}.tar",
                  f"{url}/best*photos/{{00000..00001}}*.tar"):
        with pytest.raises(inputs.InputError, match=wildcard):
            planned(given)
    server.boto().put_object(Bucket=bucket, Key=f"{prefix}/wild.txt", Body=b"best*photos/*.tar\n")
    with pytest.raises(inputs.InputError, match=rf"'{url}/best\*photos/\*\.tar' \(named by input "
                                              rf"'{url}/wild\.txt'\) {wildcard}"):
        planned(f"{url}/wild.txt")
    with pytest.raises(inputs.InputError, match="unbalanced braces"):
        planned(f"{url}/runs{{1,2}}/d{{.tar")

    settings = dict(pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1, fidelity_sample=0,
                    index_cache_dir=str(tmp_path / "idx"), storage_options=options(server.endpoint))
    for given, where in ((f"{url}/runs{{1,2}}/x{{1..2}}.tar", "runs{1,2}/x{1..2}"),
                         (f"{url}/best*photos", "best*photos/a*b")):
        result = TimmImageEmbedder(TINY_MODEL, **settings)(given, str(tmp_path / "emb"))[0]
        rows = pq.read_metadata(dataset / f"{tree[where]}.parquet").num_rows  # with its failed downloads
        assert (result.stem, result.rows, result.warnings) == (where.split("/")[1], rows, []), result
        assert pq.read_table(tmp_path / "emb" / f"{result.stem}.parquet").num_rows == rows


class CountingFS:
    """Delegates to an fsspec filesystem, recording every ranged read."""

    def __init__(self, fs):
        self.fs, self.ranges = fs, []

    def size(self, path):
        return self.fs.size(path)

    def cat_file(self, path, start=None, end=None):
        self.ranges.append((start, end))
        return self.fs.cat_file(path, start=start, end=end)


def test_read_ahead_returns_the_exact_bytes_and_stays_bounded(server):
    fs = s3fs_for(server.endpoint)
    data = os.urandom(1_000_003)
    fs.pipe_file(f"{IN_BUCKET}/blob.bin", data)
    counting = CountingFS(fs)
    block, depth = 64 * 1024, 3
    with prefetch.ReadAhead(counting, f"{IN_BUCKET}/blob.bin", block_size=block, depth=depth) as f:
        time.sleep(0.5)  # the background threads run ahead, but only `depth` blocks ahead
        assert len(counting.ranges) == depth
        parts = [f.read(1), f.read(block - 1), f.read(block), f.read(3 * block + 17)]
        assert len(counting.ranges) <= 5 + depth + 1
        while chunk := f.read(77_777):
            parts.append(chunk)
        assert f.read(10) == b""
    assert b"".join(parts) == data
    assert sorted(counting.ranges) == [(s, min(s + block, len(data))) for s in range(0, len(data), block)]


def test_tar_streamed_from_s3_reads_as_the_local_file_and_yields_its_index(server, dataset):
    url = upload(server, dataset)
    fs, root = storage.filesystem(url, options(server.endpoint))
    local = dataset / "00000.tar"
    with open(local, "rb") as f:
        expected = list(shards.iter_samples(f, extensions=EXTS, shard=str(local)))
        f.seek(0)
        expected_index = shardindex.build_index(f)
    builder = shardindex.IndexBuilder()
    with storage.open_sequential(fs, f"{root}/00000.tar") as f:
        assert isinstance(f, s3fetch.ShardReader)  # S3 shards come through the process's shard fetcher
        got = list(shards.iter_samples(f, extensions=EXTS, shard=url, index_builder=builder))
    assert [(s.key, bytes(s.image) if s.image is not None else None, s.error) for s in got] == \
        [(s.key, bytes(s.image) if s.image is not None else None, s.error) for s in expected]
    assert builder.index().render() == expected_index.render()


@pytest.mark.parametrize("kind, raised", [("internal", None), ("truncate", "ClientPayloadError")])
def test_a_parquet_the_store_fails_to_deliver_is_a_store_error_not_a_bad_file(server, dataset, kind, raised):
    """read_rows takes every error of decoding a parquet as the file's (MetadataFileError: the shard is embedded
    without its columns, never retried). An error of the store delivering its bytes must stay what it is, retried by
    the flow's tasks: the store answering 500 on every try, past the client's retries, is not a bad file; nor a body
    cut short past s3fs's retries, which raises aiohttp's ClientPayloadError (botocore a ConnectionClosedError for a
    dropped connection): neither is an OSError, and the tasks did not retry them. Both are raised naming the file."""
    url = upload(server, dataset)
    proxy = FaultProxy(server.endpoint, every=1, kinds=(kind,), methods=("GET",), outlast_retries=True).start()
    try:
        fs, root = storage.filesystem(url, options(proxy.endpoint, max_attempts="1"))
        with pytest.raises(Exception) as caught:
            shards.read_rows(f"{root}/00000.parquet", fs)
    finally:
        proxy.stop()
    assert proxy.injected[kind] >= 1 and not isinstance(caught.value, shards.MetadataFileError)
    # raised again as an OSError naming the file, the client's own error as its cause
    assert isinstance(caught.value, OSError) and f"{url}/00000.parquet" in str(caught.value), caught.value
    assert raised is None or type(caught.value.__cause__).__name__ == raised, caught.value
    assert faults.is_transient(caught.value), caught.value


def test_a_parquet_folder_is_read_through_store_errors_and_never_taken_for_a_bad_one(server, dataset, tmp_path):
    """A folder's listing and part objects are requests like a file's: the store failing each one's first try
    (s3fs retries) loses nothing, the rows as they are; failing every try, past the client's retries, is a store
    error (retried by the flow's tasks), never MetadataFileError (the shard embedded without its columns, never
    retried)."""
    url = upload_files(server, _with_spark_parquet(dataset, tmp_path / "in"))
    expected = pq.read_table(dataset / "00000.parquet")
    for outlast in (False, True):
        proxy = FaultProxy(server.endpoint, every=1, kinds=("internal", "reset", "truncate"), methods=("GET",),
                           outlast_retries=outlast).start()
        try:
            fs, root = storage.filesystem(url, options(proxy.endpoint, max_attempts="3"))
            if not outlast:
                assert shards.read_rows(f"{root}/00000.parquet", fs).equals(expected)
            else:
                with pytest.raises(Exception) as caught:
                    shards.read_rows(f"{root}/00000.parquet", fs)
        finally:
            proxy.stop()
            _clear_s3fs_cache()
        assert proxy.injected["internal"] >= 1
    assert not isinstance(caught.value, shards.MetadataFileError) and faults.is_transient(caught.value), caught.value


def test_nemo_dataset_on_s3_reads_its_metadata_with_the_documented_storage_options(server, dataset):
    """docs/nemo.md: `from_webdataset(path, ..., storage_options=...)` for a store that needs them. The options the
    docs name for S3 (region_name, read_timeout) went to Dask's read_parquet as given, where s3fs hands them to
    botocore's session, which refuses them: `metadata` failed with a FileNotFoundError naming a parquet that is
    there."""
    from wdsembed import ImageTextPairDataset

    url = upload(server, dataset)
    ds = ImageTextPairDataset.from_webdataset(
        url, "key", storage_options=options(server.endpoint, region_name="us-east-1", read_timeout="60"))
    frame = ds.metadata.compute()
    expected = sum(pq.read_metadata(dataset / f"{s:05d}.parquet").num_rows for s in range(2))
    assert ds.metadata.npartitions == 2 and len(frame) == expected
    assert set(frame["key"]) == set(pq.read_table(dataset / "00000.parquet").column("key").to_pylist()) \
        | set(pq.read_table(dataset / "00001.parquet").column("key").to_pylist())


def test_nemo_metadata_on_s3_reads_a_prefix_whose_name_holds_glob_characters(server, dataset):
    """Dask's read_parquet globs each path of a list holding `*`, `?` or `[`: the metadata of a dataset under
    `photos [2024]?/` was empty, without a word."""
    from wdsembed import ImageTextPairDataset

    ds = ImageTextPairDataset.from_webdataset(upload(server, dataset, name=" photos [2024]?"), "key",
                                              storage_options=options(server.endpoint))
    expected = sum(pq.read_metadata(dataset / f"{s:05d}.parquet").num_rows for s in range(2))
    assert ds.metadata.npartitions == 2 and len(ds.metadata.compute()) == expected


# ---------------------------------------------------------------------------------------------------------------
# .idx files: beside the shard when present, written back where the bucket allows, else cached locally


def test_index_is_written_back_beside_the_shard(server, dataset, tmp_path, monkeypatch):
    url = upload(server, dataset)
    fs, root = storage.filesystem(url, options(server.endpoint))
    idx = shardindex.ensure_index(f"{root}/00000.tar", fs, tmp_path / "cache")
    assert idx.path == f"{root}/00000.idx"
    bucket, prefix = root.split("/", 1)
    with open(dataset / "00000.tar", "rb") as f:
        expected = shardindex.build_index(f).render()
    assert server.boto().get_object(Bucket=bucket, Key=f"{prefix}/00000.idx")["Body"].read().decode() == expected
    assert not (tmp_path / "cache").exists()
    assert [k for k in server.keys(bucket) if k.startswith(prefix) and ".tmp" in k] == []  # no temp objects

    # found again by the plan, without reading the tar, and read by the worker from the bucket
    monkeypatch.setattr(shardindex, "build_index", lambda *a, **k: pytest.fail("rebuilt an index that exists"))
    plans = plan.plan_shards(config_for(url, f"s3://{OUT_BUCKET}/x", server.endpoint,
                                        index_cache_dir=str(tmp_path / "cache")))
    assert plans[0].index == f"{url}/00000.idx"
    assert shard.TarRead(config_for(url, "/tmp/x", server.endpoint), plans[0]).index.render() == expected


def test_index_goes_to_the_local_cache_when_the_bucket_refuses_writes(server, dataset, tmp_path, monkeypatch):
    url = upload(server, dataset)
    use_keys(monkeypatch, server.reader)  # may read the input bucket, not write it
    fs, root = storage.filesystem(url, options(server.endpoint))
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{root}/probe", b"x")
    idx = shardindex.ensure_index(f"{root}/00000.tar", fs, tmp_path / "cache")
    assert idx.path and Path(idx.path).parent == tmp_path / "cache"
    with open(dataset / "00000.tar", "rb") as f:
        assert Path(idx.path).read_text() == shardindex.build_index(f).render()
    bucket, prefix = root.split("/", 1)
    assert [k.rsplit("/", 1)[1] for k in server.keys(bucket) if k.startswith(prefix + "/")] == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]


def test_plan_does_not_download_shards_to_index_them(server, dataset, tmp_path):
    """A missing index on a store comes out of the worker's one read of the tar, not an extra pass up front."""
    url = upload(server, dataset)
    proxy = FaultProxy(server.endpoint, kinds=(), every=10**9).start()  # a counter, no faults
    seen = []
    orig = proxy.choose
    proxy.choose = lambda method, path, range_, headers=None: (seen.append((method, path, range_))
                                                                or orig(method, path, range_, headers=headers))
    try:
        plans = plan.plan_shards(config_for(url, f"s3://{OUT_BUCKET}/x", proxy.endpoint,
                                            index_cache_dir=str(tmp_path / "cache")))
    finally:
        proxy.stop()
    assert [p.index for p in plans] == [None, None]
    tar_gets = [(m, p) for m, p, r in seen if m == "GET" and p.split("?")[0].endswith(".tar")]
    assert tar_gets == []
    assert "s3://" in plans[0].shard and plans[0].rows.endswith("00000.parquet") and plans[0].expected_samples == 6


def test_a_parquet_wdsembed_did_not_write_at_an_output_key_is_refused_before_prefect_starts(server, dataset,
                                                                                             tmp_path, capsys):
    """A user's own parquet at OUTPUT/00000.parquet on a store: the command refuses it with exit 2 before Prefect
    starts, in the words it uses for a local folder (it went on to Prefect, and its planning refused it there);
    the planning's footer reads (with force, read for this alone) refuse the run too, before any shard could
    overwrite it."""
    from wdsembed.cli import main

    url = upload(server, dataset)
    prefix = f"foreign-{uuid.uuid4().hex[:8]}"
    server.boto().upload_file(str(dataset / "00000.parquet"), OUT_BUCKET, f"{prefix}/00000.parquet")

    def run(config, **kw):  # the flow (Prefect starts here): never reached
        pytest.fail("the run started: the checks let a parquet that wdsembed did not write through")

    try:
        for force in ([], ["--force"]):
            code = main(run, [url, "--output", f"s3://{OUT_BUCKET}/{prefix}", "--device", "cpu", "--model",
                              TINY_MODEL, "--no-pretrained", "--storage-option", f"endpoint_url={server.endpoint}",
                              "--index-cache-dir", str(tmp_path / "cache"), *force])
            err = capsys.readouterr().err.strip()
            assert code == 2, (code, err)
            assert err == (f"error: output 's3://{OUT_BUCKET}/{prefix}' already holds 1 parquet file(s) that wdsembed "
                           "did not write, where this run writes its shards' outputs: 00000.parquet. They are never "
                           "overwritten: choose another output folder, or move them out of it"), err
        for force in (False, True):
            config = config_for(url, f"s3://{OUT_BUCKET}/{prefix}", server.endpoint, force=force,
                                index_cache_dir=str(tmp_path / "cache"))
            with pytest.raises(output.ForeignOutputError, match=r"holds 1 parquet file\(s\) that wdsembed did not"):
                plan.plan_run(config)
        assert [k for k in server.keys(OUT_BUCKET) if k.startswith(prefix + "/")] == [f"{prefix}/00000.parquet"]
    finally:  # the bucket is the module's: other tests list it whole
        server.boto().delete_object(Bucket=OUT_BUCKET, Key=f"{prefix}/00000.parquet")


# ---------------------------------------------------------------------------------------------------------------
# a wrong --id-column: refused before any work from the first shard's .idx


def _shards_of(folder: Path, n_shards: int, per_shard: int, first: int = 0) -> Path:
    """img2dataset shards `first`, `first` + 1, ... of small BMPs (width 40, height 30): no key of theirs is the
    integer 40."""
    for s in range(first, first + n_shards):
        write_shard(folder, f"{s:05d}", [ShardSample(encode_image(make_image(40, 30, seed=100 * s + i), "bmp"),
                                                     ext="bmp", caption=f"image {i}", width=40, height=30)
                                         for i in range(per_shard)])
    return folder


def test_a_wrong_id_column_is_refused_before_any_work_once_a_run_has_indexed_the_shards(server, tmp_path, capsys):
    """A valid --id-column of the wrong column (`width`) matches none of the first shard's first keys. On a local
    disk every key of its tar is then read from its headers; on S3 that would be the whole tar, so the command went
    on, and every shard was downloaded and embedded before failing at the key join. The .idx that a first run
    writes beside each shard lists every key: read instead (a few small reads), the command refuses with exit 2
    before Prefect starts, writing nothing."""
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.cli import main

    url = upload(server, _shards_of(tmp_path / "in", 2, 6))
    cache = str(tmp_path / "idx")
    settings = dict(pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1, index_cache_dir=cache,
                    storage_options=options(server.endpoint))
    TimmImageEmbedder(TINY_MODEL, **settings)(url, str(tmp_path / "first-out"))  # other tests list OUT_BUCKET whole
    bucket, prefix = url[len("s3://"):].split("/", 1)
    assert {f"{prefix}/00000.idx", f"{prefix}/00001.idx"} <= set(server.keys(bucket))  # the first run's

    def run(config, **kw):  # the flow (Prefect starts here): never reached
        pytest.fail("the run started: the checks let --id-column width through")

    out_prefix = f"emb-{uuid.uuid4().hex[:8]}"
    code = main(run, [url, "--output", f"s3://{OUT_BUCKET}/{out_prefix}", "--device", "cpu", "--model", TINY_MODEL,
                      "--no-pretrained", "--id-column", "width", "--storage-option", f"endpoint_url={server.endpoint}",
                      "--index-cache-dir", cache])
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err == ("error: not one of the 6 sample key(s) of 00000.tar is in id column 'width' of 00000.parquet "
                   "(keys such as '000000000', '000000001'; 'width' holds '40'): check that --id-column "
                   "names the column holding each sample's key (img2dataset's is 'key') and that this parquet is the "
                   "tar's own"), err
    assert [k for k in server.keys(OUT_BUCKET) if k.startswith(out_prefix + "/")] == []


@pytest.mark.parametrize("wrong, holds", [("width", "'40'"), ("caption", "'image 0', 'image 1'")])
def test_a_wrong_id_column_is_refused_before_any_work_on_shards_never_indexed(server, tmp_path, capsys, wrong,
                                                                              holds):
    """A first run on S3 shards without .idx files: every key of a tar would be the whole tar, so a valid but wrong
    --id-column (`width`, `caption`) went on to Prefect, and every shard was downloaded and embedded before failing
    at its key join. The first shard's parquet tells it without the tar: another of its columns (`key`) holds the
    tar's first keys, which the id column does not. Refused with exit 2 before Prefect starts, naming the column."""
    from wdsembed.cli import main

    url = upload(server, _shards_of(tmp_path / "in", 2, 6))
    bucket, prefix = url[len("s3://"):].split("/", 1)
    assert not [k for k in server.keys(bucket) if k.startswith(prefix + "/") and k.endswith(".idx")]

    def run(config, **kw):  # the flow (Prefect starts here): never reached
        pytest.fail(f"the run started: the checks let --id-column {wrong} through")

    out_prefix = f"emb-{uuid.uuid4().hex[:8]}"
    code = main(run, [url, "--output", f"s3://{OUT_BUCKET}/{out_prefix}", "--device", "cpu", "--model", TINY_MODEL,
                      "--no-pretrained", "--id-column", wrong, "--storage-option", f"endpoint_url={server.endpoint}",
                      "--index-cache-dir", str(tmp_path / "idx")])
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err == (f"error: not one of the first 6 sample key(s) of 00000.tar is in id column {wrong!r} of "
                   f"00000.parquet (keys such as '000000000', '000000001'; {wrong!r} holds {holds}), but its column "
                   "'key' holds them: pass --id-column key"), err
    assert [k for k in server.keys(OUT_BUCKET) if k.startswith(out_prefix + "/")] == []
    assert not [k for k in server.keys(bucket) if k.startswith(prefix + "/") and k.endswith(".idx")]


def test_image_extensions_no_member_of_the_first_shard_has_are_refused_on_s3(server, tmp_path):
    """`--image-extensions gif` on shards of BMPs: refused before any work, from the first shard's first tar headers
    (ranged reads of its start, not the whole tar), or from its .idx where one fits it; extensions it has pass."""
    url = upload(server, _shards_of(tmp_path / "in", 2, 3))
    config = config_for(url, f"s3://{OUT_BUCKET}/exts-{uuid.uuid4().hex[:8]}", server.endpoint,
                        index_cache_dir=str(tmp_path / "idx"), image_extensions=("gif",))
    said = (rf"^--image-extensions \(image_extensions=\) gif: no member of shard {url}/00000\.tar has that "
            r"extension \(%s: bmp, json, txt\), and every row would fail with 'no image member': pass the "
            r"extensions of its images, e\.g\. --image-extensions \(image_extensions=\) bmp$")
    with pytest.raises(inputs.InputError, match=said % "its 9 members have"):  # the whole tar: no more to see
        plan.check_config(config)
    fs, root = storage.filesystem(url, options(server.endpoint))
    assert shardindex.ensure_index(f"{root}/00000.tar", fs).path == f"{IN_BUCKET}/{root.split('/', 1)[1]}/00000.idx"
    with pytest.raises(inputs.InputError, match=said % r"its \.idx lists"):
        plan.check_config(config)
    plan.check_config(config.model_copy(update={"image_extensions": ("png", "bmp")}))


def _tar_on_s3(server, tmp_path: Path, name: str, members: list[tuple[str, bytes]]) -> str:
    import io
    import tarfile

    folder = tmp_path / name
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return upload(server, folder)


def test_the_image_extension_check_reads_a_shard_on_s3_up_to_its_first_image_of_those_extensions(server, tmp_path):
    """Without an .idx, the check of --image-extensions read the headers of the first shard's first 64 members
    whatever they were: on S3, where each image member bigger than a read block makes the next header a request
    of its own, a shard of large images cost about one GET (of 1 MiB) per image, 30 here, before any work, to learn
    what its first member had told. It stops at the first member of those extensions now. And a shard whose first
    64 members are captions (a folder tarred with `tar cf`) is read on to its images, which were never seen: its
    wrong extensions went unrefused, and every row failed 'no image member'."""
    from s3server import CountingProxy

    big = [(f"{i:09d}.{ext}", bytes([i]) * (1536 << 10 if ext == "jpg" else 20)) for i in range(30)
           for ext in ("jpg", "txt")]
    url = _tar_on_s3(server, tmp_path, "big", big)
    proxy = CountingProxy(server.endpoint).start()
    try:
        config = config_for(url, f"s3://{OUT_BUCKET}/x", proxy.endpoint, use_index_files=False)
        found = inputs.find_shards(config)
        proxy.reset()
        plan._check_image_extensions(config, found)  # jpg: passes
        gets = proxy.requests_by(f"/{IN_BUCKET}/{url.split('/')[-1]}/00000.tar")["GetObject"]
        assert gets == 1, proxy.seen
    finally:
        proxy.stop()
    captions_first = [(f"{i:09d}.txt", b"caption") for i in range(70)] + [(f"{i:09d}.jpg", b"J") for i in range(70)]
    url = _tar_on_s3(server, tmp_path, "captions", captions_first)
    config = config_for(url, f"s3://{OUT_BUCKET}/x", server.endpoint, use_index_files=False,
                        image_extensions=("gif",))
    with pytest.raises(inputs.InputError, match=r"no member of shard .* has that extension \(its first 102 members "
                                                r"have: txt, jpg\)"):
        plan._check_image_extensions(config, inputs.find_shards(config))
    plan._check_image_extensions(config.model_copy(update={"image_extensions": ("jpg",)}),
                                 inputs.find_shards(config))
    # Past the look's bounds (32 PNGs, then JPEGs): refused from the first members alone, saying so and how to have
    # every member seen; with the shard's .idx, every one is, and the run passes (a local disk reads on: test_cli)
    pngs_first = [(f"{i:09d}.{ext}", b"P") for i in range(40) for ext in ("png", "txt")] + [
        (f"{i:09d}.{ext}", b"J") for i in range(40, 43) for ext in ("jpg", "txt")]
    url = _tar_on_s3(server, tmp_path, "pngs", pngs_first)
    config = config_for(url, f"s3://{OUT_BUCKET}/x", server.endpoint, image_extensions=("jpg",))
    with pytest.raises(inputs.InputError) as refused:
        plan._check_image_extensions(config, inputs.find_shards(config))
    assert str(refused.value).endswith(
        "(its first 63 members have: png, txt), and every row would fail with 'no image member': pass the "
        "extensions of its images, e.g. --image-extensions (image_extensions=) png; only its first 63 members were "
        "read (on an object store each further one can cost a request): where later ones have jpg, a .idx beside "
        "the shard (DALI's wds2idx writes one, as runs with index files do) lets this check read every member's "
        "name"), refused.value
    with pytest.raises(inputs.InputError, match=r"every member's name, in a run without --no-index-files "
                                                r"\(use_index_files=False\)$"):
        plan._check_image_extensions(config.model_copy(update={"use_index_files": False}), inputs.find_shards(config))
    fs, root = storage.filesystem(url, options(server.endpoint))
    assert shardindex.ensure_index(f"{root}/00000.tar", fs, tmp_path / "idx").path.endswith(f"{root}/00000.idx")
    plan._check_image_extensions(config, inputs.find_shards(config))


def test_a_parquet_filtered_down_to_later_keys_on_s3_is_not_refused(server, tmp_path, monkeypatch):
    """Rows only for keys past the tar's first ones (curated rows): the right column, which only every key of the
    tar tells from a wrong one. With the shard's .idx (here in the local index cache: the bucket refuses this
    user's writes) it is not refused, and `width` is. A stale .idx beside the shard (another tar's, whose last
    member still ends inside this tar) is never read as this tar's keys; without a usable index nothing is refused
    (each shard's own check says it)."""
    data = _shards_of(tmp_path / "in", 1, plan.FIRST_KEYS + 4)
    rows = pq.read_table(data / "00000.parquet")
    pq.write_table(rows.slice(plan.FIRST_KEYS + 2), data / "00000.parquet")
    url = upload(server, data)
    config = config_for(url, f"s3://{OUT_BUCKET}/curated-{uuid.uuid4().hex[:8]}", server.endpoint,
                        index_cache_dir=str(tmp_path / "idx"))
    wrong = config.model_copy(update={"id_column": "width"})
    plan.check_config(config)
    plan.check_config(wrong)

    other = _shards_of(tmp_path / "other", 1, 4, first=5) / "00005.tar"  # keys 000050000...: a smaller tar
    with open(other, "rb") as f:
        stale = shardindex.build_index(f).render().encode()
    fs, root = storage.filesystem(url, options(server.endpoint))
    fs.pipe_file(f"{root}/00000.idx", stale)
    plan.check_config(config)
    plan.check_config(wrong)

    use_keys(monkeypatch, server.reader)  # may read the input bucket, not write it: the index goes to the cache
    fs, root = storage.filesystem(url, options(server.endpoint))
    assert Path(shardindex.ensure_index(f"{root}/00000.tar", fs, tmp_path / "idx").path).parent == tmp_path / "idx"
    plan.check_config(config)
    with pytest.raises(inputs.InputError, match=r"^not one of the 12 sample key\(s\) of 00000.tar is in id column "
                                              r"'width' of 00000.parquet \(keys such as '000000000', '000000001'; "
                                              r"'width' holds '40'\)"):
        plan.check_config(wrong)


# ---------------------------------------------------------------------------------------------------------------
# writes: whole objects only


def _table(n: int = 50) -> pa.Table:
    return pa.table({"key": [f"{i:06d}" for i in range(n)],
                     "image_embedding": pa.array([np.arange(4, dtype=np.float32) + i for i in range(n)],
                                                 type=pa.list_(pa.float32()))})


def test_output_put_whole_through_store_errors(server):
    proxy = FaultProxy(server.endpoint, every=1, kinds=("slowdown", "internal", "reset")).start()
    try:
        fs, root = storage.filesystem(f"s3://{OUT_BUCKET}/puts", options(proxy.endpoint))
        table = _table()
        output.write_parquet_atomic(table, f"{root}/00000.parquet", fs, metadata={"cache_key": "k"})
        output.write_manifest(root, fs, {"shards": {"00000": {}}})
    finally:
        proxy.stop()
    assert sum(proxy.injected.values()) >= 2 and proxy.injected["slowdown"] >= 1  # errors were really served
    assert server.keys(OUT_BUCKET) == ["puts/00000.parquet", "puts/_manifest.json"]  # nothing else, no temp objects
    s3fs_direct = storage.filesystem(f"s3://{OUT_BUCKET}", options(server.endpoint))[0]
    with s3fs_direct.open(f"{OUT_BUCKET}/puts/00000.parquet", "rb") as f:
        assert pq.read_table(f).replace_schema_metadata(None).equals(table)
    assert output.read_output_metadata(f"{OUT_BUCKET}/puts/00000.parquet", s3fs_direct) == {"cache_key": "k"}


def test_a_shards_view_is_removed_from_a_bucket(server):
    """What a run without kNN views does to a shard it embeds again (output.remove_embeddings_view), on S3: the
    view's object goes, nothing else does, and a second removal finds nothing."""
    config = config_for(f"s3://{IN_BUCKET}", f"s3://{OUT_BUCKET}/views", server.endpoint)
    full = _table(6)
    assert output.write_embeddings_view(full, config, "sub/00000", cache_key="k") == 6
    output.write_embeddings_view(full, config, "sub/00001", cache_key="k")
    def views() -> list[str]:  # the bucket is the module's: other tests' objects are in it too
        return [k for k in server.keys(OUT_BUCKET) if k.startswith("views/")]

    assert views() == ["views/_embeddings/sub/00000.parquet", "views/_embeddings/sub/00001.parquet"]
    assert output.remove_embeddings_view(config, "sub/00000")
    assert views() == ["views/_embeddings/sub/00001.parquet"]
    assert not output.remove_embeddings_view(config, "sub/00000")


def _incomplete_upload(server: MotoS3, key: str) -> None:
    """An upload of `key` to the output bucket as a process killed mid-upload leaves it: a part stored, never
    completed (so in no listing of objects)."""
    s3 = server.boto()
    upload = s3.create_multipart_upload(Bucket=OUT_BUCKET, Key=key)["UploadId"]
    s3.upload_part(Bucket=OUT_BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)


def _incomplete_uploads(server: MotoS3, prefix: str) -> list[str]:
    uploads = server.boto().list_multipart_uploads(Bucket=OUT_BUCKET, Prefix=prefix).get("Uploads", [])
    return sorted(u["Key"] for u in uploads)


def test_a_run_aborts_the_incomplete_uploads_of_its_outputs_that_killed_runs_left(server, dataset, tmp_path,
                                                                                 monkeypatch, caplog):
    """Incomplete multipart uploads under OUTPUT with the names of wdsembed's outputs (a table, a kNN view), left by
    runs killed mid-upload, are aborted by the next run once it holds the claim, with a line saying how many; one
    of a name wdsembed never writes under OUTPUT, and one outside OUTPUT (beside it, sharing its name's start), stay.
    Keys that may not list uploads (s3:ListBucketMultipartUploads) leave them, with a line, and the run succeeds."""
    from wdsembed.api import TimmImageEmbedder

    url = upload(server, dataset)
    out = f"emb-{uuid.uuid4().hex[:8]}"
    own = [f"{out}/00000.parquet", f"{out}/_embeddings/00001.parquet"]
    others = [f"{out}-old/00000.parquet", f"{out}/backup/00000.tar"]
    for key in own + others:
        _incomplete_upload(server, key)
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0, index_cache_dir=str(tmp_path / "idx"),
                                 storage_options=options(server.endpoint))
    try:
        use_keys(monkeypatch, server.reader)  # may write the output bucket, not list nor abort its uploads
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            assert len(embedder(url, f"s3://{OUT_BUCKET}/{out}")) == 2
        said = [r.getMessage() for r in caplog.records if "multipart" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].startswith(f"output s3://{OUT_BUCKET}/{out}: could not abort the incomplete multipart uploads")
        assert f"(PermissionError: listing the uploads under s3://{OUT_BUCKET}/{out}/: Access Denied)" in said[0]
        assert "AbortIncompleteMultipartUpload" in said[0]
        assert _incomplete_uploads(server, out) == sorted(own + others)

        use_keys(monkeypatch, server.admin)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wdsembed"):
            assert all(r.cached for r in embedder(url, f"s3://{OUT_BUCKET}/{out}"))  # a re-run claims OUTPUT too
        said = [r.getMessage() for r in caplog.records if "multipart" in r.getMessage()]
        assert said == [f"output s3://{OUT_BUCKET}/{out}: aborted 2 incomplete multipart upload(s) that runs killed "
                        "mid-upload had left: 00000.parquet, _embeddings/00001.parquet"], said
        assert _incomplete_uploads(server, out) == sorted(others)
    finally:  # the bucket is the module's
        s3 = server.boto()
        for u in s3.list_multipart_uploads(Bucket=OUT_BUCKET).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=OUT_BUCKET, Key=u["Key"], UploadId=u["UploadId"])


def test_embedding_reader_reads_a_runs_knn_view_straight_from_the_bucket(server, tmp_path, monkeypatch):
    """docs/knn.md: autofaiss's reader (embedding-reader, through fsspec) takes OUTPUT's `_embeddings/` as an s3://
    URL, with the store's endpoint from AWS_ENDPOINT_URL (it takes no storage options): every embedded row, as the
    run's tables hold it, none of the rows without an embedding (each shard here has a corrupt image and failed
    downloads)."""
    er = pytest.importorskip("embedding_reader")
    from wdsembed.api import TimmImageEmbedder

    data = tmp_path / "data"
    write_demo_dataset(data, n_shards=2, per_shard=6, corrupt_per_shard=1)
    url = upload(server, data)
    out = f"s3://{OUT_BUCKET}/knn-{uuid.uuid4().hex[:8]}"
    embedder = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 fidelity_sample=0, index_cache_dir=str(tmp_path / "idx"),
                                 storage_options=options(server.endpoint))
    results = embedder(url, out)
    assert len(results) == 2 and all(r.failed for r in results)  # rows without an embedding in each shard
    fs, root = storage.filesystem(out, options(server.endpoint))
    want = {}
    for stem in ("00000", "00001"):
        with fs.open(f"{root}/{stem}.parquet", "rb") as f:
            rows = pq.read_table(f).to_pylist()
        want |= {(row["key"], stem): row["image_embedding"] for row in rows if row["image_embedding"] is not None}
    assert len(want) == sum(r.embedded for r in results) > 0

    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    _clear_s3fs_cache()
    reader = er.EmbeddingReader(f"{out}/_embeddings", file_format="parquet", embedding_column="image_embedding",
                                meta_columns=["key", "shard"])
    assert reader.count == len(want)
    seen = {}
    for vectors, meta in reader(batch_size=4, show_progress=False):
        for vector, key, stem in zip(vectors, meta["key"], meta["shard"]):
            seen[(key, stem)] = vector
    assert sorted(seen) == sorted(want)
    assert all(np.allclose(seen[k], want[k], rtol=0, atol=0) for k in want)


def test_an_upload_begun_since_the_cutoff_is_a_live_writers_and_kept(server):
    """storage.abort_incomplete_uploads aborts only uploads initiated before its cutoff (the claim's time): one begun
    at or after it is kept, and aborted once the cutoff is past it."""
    key = f"live-{uuid.uuid4().hex[:8]}/00000.parquet"
    _incomplete_upload(server, key)
    [listed] = server.boto().list_multipart_uploads(Bucket=OUT_BUCKET, Prefix=key)["Uploads"]
    begun = listed["Initiated"].timestamp()  # by the store's clock
    fs, root = storage.filesystem(f"s3://{OUT_BUCKET}/{key.split('/')[0]}", options(server.endpoint))
    assert storage.abort_incomplete_uploads(fs, root, output.is_output_name, begun) == []
    assert _incomplete_uploads(server, key) == [key]
    assert storage.abort_incomplete_uploads(fs, root, output.is_output_name, begun + 1) == ["00000.parquet"]
    assert _incomplete_uploads(server, key) == []


def test_output_never_creates_a_bucket(server):
    config = config_for(f"s3://{IN_BUCKET}", "s3://no-such-out-bucket/emb", server.endpoint)
    with pytest.raises(inputs.InputError, match="s3://no-such-out-bucket/emb.*bucket does not exist"):
        plan.check_storage(config)
    assert "no-such-out-bucket" not in [b["Name"] for b in server.boto().list_buckets()["Buckets"]]


# ---------------------------------------------------------------------------------------------------------------
# errors that retries cannot fix fail at once, naming the URL, writing nothing


def test_missing_input_bucket(server):
    config = config_for("s3://no-such-in-bucket/shards", f"s3://{OUT_BUCKET}/emb", server.endpoint)
    start = time.perf_counter()
    with pytest.raises(inputs.InputError, match="s3://no-such-in-bucket/shards.*bucket does not exist"):
        plan.plan_shards(config)
    assert time.perf_counter() - start < 5


def test_missing_input_prefix(server):
    config = config_for(f"s3://{IN_BUCKET}/nothing-here", f"s3://{OUT_BUCKET}/emb", server.endpoint)
    with pytest.raises(inputs.InputError, match=f"s3://{IN_BUCKET}/nothing-here does not exist"):
        plan.plan_shards(config)


# s3fs's FileNotFoundError names the path: whether the bucket exists is asked of the store, not read in that text.


def test_a_new_output_prefix_of_a_bucket_named_bucket_is_accepted(server):
    server.boto().create_bucket(Bucket="team-bucket")
    server.boto().put_object(Bucket="team-bucket", Key="shards/00000.tar", Body=b"x" * 10)
    storage.check_output("s3://team-bucket/shards", options(server.endpoint))  # an existing prefix
    storage.check_output("s3://team-bucket/embeddings", options(server.endpoint))  # a new one: a first run


def test_a_new_output_prefix_named_bucket_is_accepted(server):
    server.boto().create_bucket(Bucket="ml-data")
    storage.check_output("s3://ml-data/bucketed/embeddings", options(server.endpoint))


def test_missing_input_prefix_of_a_bucket_named_bucket_is_not_a_missing_bucket(server):
    server.boto().create_bucket(Bucket="input-bucket")
    with pytest.raises(storage.StoreError) as err:
        storage.check_input("s3://input-bucket/nothing-here", options(server.endpoint))
    assert str(err.value) == "input s3://input-bucket/nothing-here does not exist"


class NotS3Endpoint:
    """An HTTP service that is no S3 store on loopback (a store's web console port, a Prefect server), as
    endpoint_url may name by mistake: it answers GET and HEAD with `answer` (a JSON 404, or an HTML page with 200;
    "head-200": HEAD with 200, GET with a JSON 404), and any other method with 501, as Python's own http.server
    does."""

    def __init__(self, answer: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class NotS3(BaseHTTPRequestHandler):
            def answer_it(self):
                not_found = answer == "json-404" or (answer == "head-200" and self.command == "GET")
                status, kind, body = ((404, "application/json", b'{"detail": "Not Found"}') if not_found
                                      else (200, "text/html", b"<!doctype html><html><body>console</body></html>"))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = answer_it

            def log_message(self, *args):
                pass

        self.web = ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
        self.endpoint = f"http://127.0.0.1:{self.web.server_address[1]}"

    def __enter__(self) -> "NotS3Endpoint":
        import threading

        threading.Thread(target=self.web.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.web.shutdown()
        self.web.server_close()


@pytest.mark.parametrize("answer", ["json-404", "html-200"])
def test_an_endpoint_that_is_no_s3_store_is_said_so_not_taken_for_a_missing_bucket(answer):
    """endpoint_url naming another HTTP service (a store's web console port, a Prefect server): botocore makes its
    answers bare HTTP errors, and the refusal said 'the bucket data does not exist' (a 404) or 'OSError: [Errno 121]
    Internal Server Error' (a page it could not parse), sending the user after the bucket or the store. A page
    answering HEAD with 200 passed the output's check as an existing object: a listing under it tells."""
    with NotS3Endpoint(answer) as web:
        said = f"the endpoint {web.endpoint} does not answer as an S3 store.*check endpoint_url"
        with pytest.raises(inputs.InputError, match=f"cannot read input s3://data/shards: {said}"):
            plan.check_storage(config_for("s3://data/shards", "s3://out/emb", web.endpoint))
        with pytest.raises(storage.StoreError, match=f"cannot write output s3://out/emb: {said}"):
            storage.check_output("s3://out/emb", options(web.endpoint))


def _command_argv(input: str, output: str, endpoint: str, tmp_path: Path) -> list[str]:
    return [input, "--output", output, "--device", "cpu", "--model", TINY_MODEL, "--no-pretrained",
            "--storage-option", f"endpoint_url={endpoint}", "--index-cache-dir", str(tmp_path / "cache")]


def _never_started(config, **kw):  # the flow (Prefect and Dask start here)
    pytest.fail("the run started: the command's checks let an output it cannot write through")


@pytest.mark.parametrize("answer", ["json-404", "html-200", "head-200"])
def test_a_local_input_with_an_s3_output_at_an_endpoint_that_is_no_s3_store_is_refused_before_prefect(
        answer, dataset, tmp_path, capsys):
    """With a local input, OUTPUT is the only thing asked of the endpoint: a web page answering HEAD with 200 passed
    its check, and then the look for another run's claim took the page for an unreadable claim ('is claimed') or,
    where GET answered 404, the run went on to Prefect and Dask and failed at its own claim. Refused in the checks,
    in the words used for an input there (exit 2)."""
    from wdsembed.cli import main

    with NotS3Endpoint(answer) as web:
        code = main(_never_started, _command_argv(str(dataset), "s3://out/emb", web.endpoint, tmp_path))
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err == (f"error: cannot write output s3://out/emb: the endpoint {web.endpoint} does not answer as an "
                       f"S3 store (HTTP {'500, text/html' if answer == 'html-200' else '404, application/json'}): "
                       "check endpoint_url (a storage option, or AWS_ENDPOINT_URL)"), err


def test_an_s3_output_these_keys_may_read_but_not_write_is_refused_before_prefect(server, dataset, tmp_path,
                                                                                  monkeypatch, capsys):
    """Keys that may list and read the output bucket but not write to it (403 AccessDenied on PUT): every check
    passed, Prefect's server started and the Dask cluster with it, and the run failed at its claim, 8 s later on 2
    cores. The command takes the claim as its checks end: the refusal is its one line, exit 2, naming OUTPUT and
    what to change, before the run (Prefect) starts; nothing is written."""
    from wdsembed.cli import main

    server.boto().create_bucket(Bucket="read-only-out")  # "reader" may write to OUT_BUCKET only
    use_keys(monkeypatch, server.reader)
    start = time.perf_counter()
    code = main(_never_started, _command_argv(str(dataset), "s3://read-only-out/emb", server.endpoint, tmp_path))
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: cannot write output s3://read-only-out/emb (its claim _claim.json): access denied "
                          "(Access Denied); let these credentials write there (on S3 s3:PutObject"), err
    assert "AWS_ACCESS_KEY_ID" in err and "\n" not in err
    assert server.keys("read-only-out") == []
    print(f"refused in {seconds:.1f} s (the checks' model build included)")


def test_the_claim_the_command_takes_on_an_s3_output_is_the_one_its_run_holds(server, dataset, tmp_path,
                                                                              monkeypatch):
    """The command's claim on an S3 output (taken as its checks end) is handed to the run it starts, whose own
    claim (flows.embed.run: outputclaim.held) takes it rather than claiming the output again, which its own claim
    would refuse; released as the run ends."""
    from wdsembed import outputclaim
    from wdsembed.cli import main

    out = f"s3://{OUT_BUCKET}/emb-{uuid.uuid4().hex[:8]}"
    key = f"{out.split('/', 3)[3]}/{CLAIM_NAME}"
    held = []

    def run(config, **kw):  # where the flow would start: Prefect imported, then run()'s claim
        stored = json.loads(server.boto().get_object(Bucket=OUT_BUCKET, Key=key)["Body"].read())
        with outputclaim.held(config) as claim:
            held.append((stored["run"], claim.run))
        raise RuntimeError("stop here")

    assert main(run, _command_argv(str(dataset), out, server.endpoint, tmp_path)) == 1
    assert len(held) == 1 and held[0][0] == held[0][1]
    assert key not in server.keys(OUT_BUCKET)  # released


def test_wrong_credentials_fail_at_once_and_write_nothing(server, dataset, monkeypatch, tmp_path):
    url = upload(server, dataset)
    before = (server.keys(IN_BUCKET), server.keys(OUT_BUCKET))
    use_keys(monkeypatch, ("AKIAWRONGWRONGWRONG0", "not-the-secret"))
    config = config_for(url, f"s3://{OUT_BUCKET}/emb", server.endpoint, index_cache_dir=str(tmp_path / "c"))
    import timm  # noqa: F401 - its first import (seconds) is not what is timed here

    for check in (plan.check_config, plan.plan_shards):
        start = time.perf_counter()
        with pytest.raises(inputs.InputError) as err:
            check(config)
        assert time.perf_counter() - start < 5  # 403 is not retried
        assert url in str(err.value) and "access denied" in str(err.value)
        assert "AWS_ACCESS_KEY_ID" in str(err.value)
    assert (server.keys(IN_BUCKET), server.keys(OUT_BUCKET)) == before
    assert not (tmp_path / "c").exists()


def test_no_credentials_at_all_say_where_they_come_from(server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _clear_s3fs_cache()
    start = time.perf_counter()
    with pytest.raises(inputs.InputError, match=f"s3://{IN_BUCKET}/x: no usable credentials.*AWS_ACCESS_KEY_ID"):
        plan.check_storage(config_for(f"s3://{IN_BUCKET}/x", f"s3://{OUT_BUCKET}/y", server.endpoint))
    assert time.perf_counter() - start < 5


def test_a_nemo_dataset_on_s3_without_credentials_says_where_they_come_from(server, monkeypatch):
    """ImageTextPairDataset.from_webdataset('s3://...') with no credentials raised botocore's NoCredentialsError with
    its traceback, where the command says it in one line naming the URL and where credentials come from."""
    from wdsembed import ImageTextPairDataset

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _clear_s3fs_cache()
    with pytest.raises(storage.StoreError, match=f"s3://{IN_BUCKET}/x: no usable credentials.*AWS_ACCESS_KEY_ID"):
        ImageTextPairDataset.from_webdataset(f"s3://{IN_BUCKET}/x", "key", storage_options=options(server.endpoint))
    with pytest.raises(storage.StoreError) as err:  # its caller set storage_options=, not the command's flag
        ImageTextPairDataset.from_webdataset(f"s3://{IN_BUCKET}/x", "key", storage_options=options(server.endpoint))
    assert 'AWS_PROFILE or storage_options={"profile": NAME})' in str(err.value), err.value


def test_denied_read_mid_run_names_the_object(server, monkeypatch):
    fs = s3fs_for(server.endpoint)
    fs.pipe_file(f"{IN_BUCKET}/denied.tar", b"x" * 1000)
    use_keys(monkeypatch, ("AKIAWRONGWRONGWRONG0", "not-the-secret"))
    fs = s3fs_for(server.endpoint)
    with pytest.raises(PermissionError, match=f"s3://{IN_BUCKET}/denied.tar"):
        with storage.open_sequential(fs, f"{IN_BUCKET}/denied.tar", size=1000) as f:
            f.read(10)


def test_an_outputs_footer_refused_mid_run_names_the_output(server, monkeypatch):
    """Credentials that stop working mid-run (expired, rotated) as a shard's retry looks for its finished output: s3fs
    says the refused HEAD as 'Forbidden' alone, and the shard failed with 'PermissionError: Forbidden', naming no
    object. It names the output, and stays a PermissionError (not retried)."""
    fs = s3fs_for(server.endpoint)
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["0"]}), buf)
    fs.pipe_file(f"{OUT_BUCKET}/footer/00000.parquet", buf.getvalue())
    assert output.read_footer(f"{OUT_BUCKET}/footer/00000.parquet", fs).num_rows == 1
    use_keys(monkeypatch, ("AKIAWRONGWRONGWRONG0", "not-the-secret"))
    fs = s3fs_for(server.endpoint)
    with pytest.raises(PermissionError) as err:
        output.read_footer(f"{OUT_BUCKET}/footer/00000.parquet", fs)
    assert str(err.value) == f"s3://{OUT_BUCKET}/footer/00000.parquet: Forbidden"
    assert not faults.is_transient(err.value)


def test_denied_output_fails_before_any_shard(server, dataset, monkeypatch):
    """Keys that may read the input but not the output bucket's listing: refused up front, naming the output."""
    server.boto().create_bucket(Bucket="locked-out")
    url = upload(server, dataset)
    # reader may list every bucket; take a user with no rights at all on the output instead
    iam = server.boto("iam")
    iam.create_user(UserName="inputonly")
    iam.put_user_policy(UserName="inputonly", PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                "Resource": [f"arn:aws:s3:::{IN_BUCKET}", f"arn:aws:s3:::{IN_BUCKET}/*"]}]}))
    k = iam.create_access_key(UserName="inputonly")["AccessKey"]
    use_keys(monkeypatch, (k["AccessKeyId"], k["SecretAccessKey"]))
    with pytest.raises(inputs.InputError, match="s3://locked-out/emb.*access denied"):
        plan.check_storage(config_for(url, "s3://locked-out/emb", server.endpoint))
    assert server.keys("locked-out") == []


# ---------------------------------------------------------------------------------------------------------------
# what a run asks of the store: at 100,000 shards each listing of INPUT or OUTPUT is hundreds of LIST requests


def _listings(proxy, url: str) -> int:
    """The listings of `url`'s prefix (or of a folder below it) that `proxy` served: one per LIST request here,
    where every listing is one page; probes of one key (s3fs's info of a folder) left out, and so are the listings
    of the markers beside the claim (a prefix no output's name starts with: one small page as the run takes its
    claim, for a killed run's, and one as it ends, for its own)."""
    markers = f"/.{CLAIM_NAME}.commit-"
    where = "/" + url[len("s3://"):]
    return sum(1 for op, listed in proxy.seen
               if op == "ListObjectsV2" and listed.startswith(where) and markers not in listed)


def _demo_without_indexes(server, tmp_path) -> tuple[str, str]:
    """A demo dataset of 3 shards uploaded without .idx files (the planning writes them: requests of their own), and
    a fresh output URL."""
    folder = tmp_path / "ds"
    folder.mkdir()
    write_demo_dataset(folder, n_shards=3, per_shard=3)
    for idx in folder.glob("*.idx"):
        idx.unlink()
    return upload(server, folder), f"s3://{OUT_BUCKET}/emb-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("kind", ["folder", "pattern", "recursive"])
def test_the_checks_list_input_and_output_once(server, tmp_path, kind):
    """check_config lists INPUT once and OUTPUT once, on a first run and on a re-run with nothing to compute: its
    question whether every output is finished (nothing_to_compute) and its own checks share the listings (they
    listed INPUT twice and OUTPUT three times, four times for a pattern's INPUT). A recursive INPUT is listed twice:
    its top level (the store check, which sees its subfolders only, in the layout recursive is for), then whole."""
    from s3server import CountingProxy
    from wdsembed import api

    url, out_url = _demo_without_indexes(server, tmp_path)
    given = {"folder": url, "pattern": url + "/{00000..00002}.tar", "recursive": url}[kind]
    proxy = CountingProxy(server.endpoint).start()
    try:
        config = config_for(given, out_url, proxy.endpoint, index_cache_dir=str(tmp_path / "idx"),
                            recursive=kind == "recursive", n_workers=None)  # the Python API's: no cluster of its own
        once = (2 if kind == "recursive" else 1, 1)
        assert plan.check_config(config) is False
        assert (_listings(proxy, url), _listings(proxy, out_url)) == once, proxy.seen
        api.run_shards(config)
        proxy.reset()
        assert plan.check_config(config) is True
        assert (_listings(proxy, url), _listings(proxy, out_url)) == once, proxy.seen
    finally:
        proxy.stop()


@pytest.mark.slow
def test_a_run_lists_input_and_output_once_per_step(server, tmp_path, prefect_api):
    """A run, as the command makes it (check_config, then the flow), lists INPUT once, for its checks, whose listing
    its planning takes (it listed INPUT again, seconds later), and OUTPUT once for its checks and once for its
    planning (which holds OUTPUT's claim: another run may have written there since the checks): retire_manifest
    takes the planning's listing, where a first run listed OUTPUT again, and so does the search for kNN views
    without a table at the run's end (remove_views_without_tables), where no shard failed: under the claim only a
    shard of the run that failed can have left one since (test_knn: a failed shard's view is removed)."""
    from flows.embed import run
    from s3server import CountingProxy

    url, out_url = _demo_without_indexes(server, tmp_path)
    proxy = CountingProxy(server.endpoint).start()
    try:
        config = config_for(url, out_url, proxy.endpoint, index_cache_dir=str(tmp_path / "idx"))
        for computed in (3, 0):  # a first run, then a re-run with nothing to compute
            proxy.reset()
            manifest = run(config, all_finished=plan.check_config(config))
            assert manifest["totals"]["computed"] == computed
            assert (_listings(proxy, url), _listings(proxy, out_url)) == (1, 2), proxy.seen
    finally:
        proxy.stop()


def _requests_of_runs(server, tmp_path, **kw) -> list:
    """The requests the store served, by (operation, key or listed prefix), to a first run of 3 shards and to a re-run
    with nothing to compute, each made as the command makes it (check_config, then the flow)."""
    from flows.embed import run
    from s3server import CountingProxy

    url, out_url = _demo_without_indexes(server, tmp_path)
    proxy = CountingProxy(server.endpoint).start()
    seen = []
    try:
        config = config_for(url, out_url, proxy.endpoint, index_cache_dir=str(tmp_path / "idx"), **kw)
        for computed in (3, 0):
            proxy.reset()
            manifest = run(config, all_finished=plan.check_config(config))
            assert manifest["totals"]["computed"] == computed
            seen.append(list(proxy.seen))
    finally:
        proxy.stop()
    return seen


@pytest.mark.slow
def test_a_runs_dask_workers_put_a_marker_beside_the_claim_per_shard(server, tmp_path, prefect_api):
    """Each shard a Dask worker process puts in place costs a marker beside OUTPUT's claim (a PUT, then a DELETE):
    its run, which may give up on the worker's task, waits for it to end before it counts the shard
    (outputclaim.ShardCommit). A shard written outside Dask in the claim's own process puts none
    (test_outputclaim)."""
    import collections

    first, rerun = _requests_of_runs(server, tmp_path)

    def markers(seen: list) -> collections.Counter:
        return collections.Counter(op for op, key in seen if f"/.{CLAIM_NAME}.commit-" in key
                                   and not op.startswith("List"))

    assert markers(first) == {"PutObject": 3, "DeleteObject": 3}, first
    assert markers(rerun) == {}, rerun  # nothing to put in place


@pytest.mark.slow
def test_a_rerun_reads_each_cached_result_once(server, tmp_path, prefect_api):
    """A re-run's task runs come back Cached from Prefect's task cache under OUTPUT/_prefect_results: one GET of each
    stored result. Prefect asks whether the result exists, then reads it, and each read the whole object: two GETs
    per cached task run (20,000 on a re-run of 10,000 shards, besides the outputs' footers)."""
    import collections

    first, rerun = _requests_of_runs(server, tmp_path)
    stored = {key for op, key in first if op == "PutObject" and "/_prefect_results/" in key}
    assert len(stored) == 3, first
    reads = collections.Counter(key for op, key in rerun if op == "GetObject" and "/_prefect_results/" in key)
    assert reads == {key: 1 for key in stored}, rerun


def _rerun_reads(seen: list, folder: str = "") -> dict:
    """The GETs of the outputs' tables (or of their kNN views: `folder` _embeddings/) among a run's requests, by key."""
    import collections

    return collections.Counter(key for op, key in seen if op == "GetObject" and "/emb-" in key
                               and key.endswith(".parquet")
                               and (f"/{output.EMBEDDINGS_FOLDER}/" in key) == bool(folder))


@pytest.mark.slow
def test_a_rerun_reads_each_outputs_footer_once(server, tmp_path, prefect_api):
    """A re-run with nothing to compute reads each output's footer once: the checks read it (nothing_to_compute) and
    the planning, which lists OUTPUT again holding its claim, takes that read for each output its listing shows
    unchanged (the same size, ETag and time). Read by both, that was two GETs per shard (20,000 on a re-run of 10,000
    shards), besides those of the kNN views and the task cache's results."""
    first, rerun = _requests_of_runs(server, tmp_path)
    tables = {key for op, key in first if op == "PutObject" and "/emb-" in key and key.endswith(".parquet")
              and f"/{output.EMBEDDINGS_FOLDER}/" not in key}
    assert len(tables) == 3, first
    assert _rerun_reads(rerun) == {key: 1 for key in tables}, rerun


@pytest.mark.slow
def test_a_rerun_grouped_otherwise_reads_each_output_and_view_once(server, tmp_path, prefect_api):
    """A re-run that groups the finished shards otherwise (more shards, another shards_per_task) finds no result in
    Prefect's task cache for its groups: their task runs take the planning's verdict on each output, made holding
    OUTPUT's claim. They read each footer and each kNN view's footer again: two GETs per shard more."""
    from flows.embed import run
    from s3server import CountingProxy

    url, out_url = _demo_without_indexes(server, tmp_path)
    proxy = CountingProxy(server.endpoint).start()
    try:
        config = config_for(url, out_url, proxy.endpoint, index_cache_dir=str(tmp_path / "idx"))
        assert run(config, all_finished=plan.check_config(config))["totals"]["computed"] == 3
        config = config.model_copy(update={"shards_per_task": 3})
        proxy.reset()
        assert run(config, all_finished=plan.check_config(config))["totals"]["cached"] == 3
        rerun = list(proxy.seen)
    finally:
        proxy.stop()
    tables, views = _rerun_reads(rerun), _rerun_reads(rerun, output.EMBEDDINGS_FOLDER)
    assert sorted(tables.values()) == sorted(views.values()) == [1, 1, 1], rerun


@pytest.mark.slow
def test_a_rerun_with_a_new_shard_reads_each_finished_outputs_footer_once(server, tmp_path, prefect_api):
    """A re-run with a shard to compute beside finished ones: the checks read each output there, to refuse a user's
    own parquet before Prefect starts (check_own_outputs), and the planning takes those reads for the files its
    listing shows unchanged. Both read them: two GETs per finished shard."""
    from flows.embed import run
    from s3server import CountingProxy

    url, out_url = _demo_without_indexes(server, tmp_path)
    proxy = CountingProxy(server.endpoint).start()
    try:
        config = config_for(url + "/{00000..00001}.tar", out_url, proxy.endpoint,
                            index_cache_dir=str(tmp_path / "idx"))
        assert run(config, all_finished=plan.check_config(config))["totals"]["computed"] == 2
        config = config.model_copy(update={"input": url})
        proxy.reset()
        assert run(config, all_finished=plan.check_config(config))["totals"]["computed"] == 1
        rerun = list(proxy.seen)
    finally:
        proxy.stop()
    assert _rerun_reads(rerun) == {f"/{out_url[len('s3://'):]}/{stem}.parquet": 1 for stem in ("00000", "00001")}, \
        rerun


@pytest.mark.slow
def test_a_first_run_asks_nothing_of_the_outputs_the_planning_found_absent(server, tmp_path, prefect_api):
    """The planning lists OUTPUT holding its claim, under which only this run writes there: a shard whose output it
    found absent is embedded and written on its task's first attempt without asking whether its output exists. Each
    worker asked (a HEAD, and on its 404 a one-key LIST, which S3 bills as a listing) for every shard of a first
    run: 20,000 requests at 10,000 shards. A retried attempt still asks (test_orchestration: a group's retry finds
    the shards its earlier attempt wrote)."""
    from wdsembed import output

    first, _ = _requests_of_runs(server, tmp_path, shards_per_task=2)
    tables = [(op, key) for op, key in first if key.rstrip("/").endswith(".parquet") and "/emb-" in key
              and f"/{output.EMBEDDINGS_FOLDER}/" not in key]
    assert sorted(tables) == sorted(("PutObject", key) for op, key in tables if op == "PutObject"), tables
    assert len(tables) == 3, first


# ---------------------------------------------------------------------------------------------------------------
# the flow, end to end: s3:// input and output against a local run of the same shards


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory, prefect_api):
    """The reference: the same shards embedded from and to local folders."""
    from flows.embed import run

    src = tmp_path_factory.mktemp("local-in")
    for path in dataset.iterdir():
        if path.suffix in (".tar", ".parquet", ".json"):
            (src / path.name).write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("local-out")
    manifest = run(config_for(str(src), str(out), index_cache_dir=str(tmp_path_factory.mktemp("idx"))))
    assert manifest["totals"]["shards"] == 2 and manifest["totals"]["embedded"] == 12
    return out


def _s3_outputs(server: MotoS3, out_url: str) -> dict[str, bytes]:
    bucket, prefix = out_url[len("s3://"):].split("/", 1)
    s3 = server.boto()
    return {k[len(prefix) + 1:]: s3.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in server.keys(bucket) if k.startswith(prefix + "/")}


def _table_of(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data)).replace_schema_metadata(None)


def assert_same_as_local(objects: dict[str, bytes], local_out: Path) -> None:
    # besides the outputs and their kNN views: only Prefect's task results (the task cache), kept under OUTPUT
    assert sorted(k for k in objects if not k.startswith("_prefect_results/")) == [
        "00000.parquet", "00001.parquet", "_embeddings/00000.parquet", "_embeddings/00001.parquet", "_manifest.json"]
    for stem in ("00000", "00001"):
        local = pq.read_table(local_out / f"{stem}.parquet").replace_schema_metadata(None)
        remote = _table_of(objects[f"{stem}.parquet"])
        assert remote.schema == local.schema
        assert remote.num_rows == local.num_rows == 8  # 6 images + 2 failed downloads per shard
        assert remote.equals(local), f"shard {stem} differs from the local run"
        view = _table_of(objects[f"_embeddings/{stem}.parquet"])
        assert view.num_rows == 6 and view.equals(
            pq.read_table(local_out / "_embeddings" / f"{stem}.parquet").replace_schema_metadata(None))
    manifest = json.loads(objects["_manifest.json"])
    assert manifest["totals"]["embedded"] == 12 and manifest["failed_shards"] == {}


def every_page(read, **filters) -> list:
    """All that a Prefect client `read_*` call matches: one call returns at most the server's default limit (200),
    and the session's one test server holds the runs and logs of every test before this one."""
    found = []
    while batch := read(**filters, offset=len(found)):
        found += batch
    return found


def assert_no_secret_anywhere(secret: str, endpoint: str, objects: dict[str, bytes]) -> None:
    """Not in the outputs (parquet footers included), the manifest, Prefect's stored parameters, blocks, results
    or logs."""
    for name, data in objects.items():
        assert secret.encode() not in data, name
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    with get_client(sync_client=True) as client:
        params = [json.dumps(fr.parameters, default=str) for fr in every_page(client.read_flow_runs)]
        assert any(endpoint in p for p in params)  # the S3 run's parameters are stored: they were checked
        assert not [p for p in params if secret in p]
        blocks = [json.dumps(b.data, default=str) for b in client.read_block_documents(include_secrets=True)]
        assert not [b for b in blocks if secret in b]
        for log in every_page(client.read_logs):
            assert secret not in log.message
    results = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    for path in results.rglob("*") if results.exists() else []:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_flow_on_s3_matches_a_local_run(server, dataset, local_run, tmp_path):
    """The flow from and to S3 writes what a local run writes; shard 00001's parquet is uploaded as Spark writes one
    (a folder of part files, _SUCCESS, .crc files), and gives the output its single file gives."""
    from flows.embed import run

    url = upload_files(server, _with_spark_parquet(dataset, tmp_path / "in", stems=("00001",)))
    out_url = f"s3://{OUT_BUCKET}/emb-{uuid.uuid4().hex[:8]}"
    manifest = run(config_for(url, out_url, server.endpoint, index_cache_dir=str(tmp_path / "idx")))
    assert manifest["totals"]["computed"] == 2
    objects = _s3_outputs(server, out_url)
    assert_same_as_local(objects, local_run)

    # the manifest is the last object written
    bucket, prefix = out_url[len("s3://"):].split("/", 1)
    s3 = server.boto()
    modified = {k: s3.head_object(Bucket=bucket, Key=f"{prefix}/{k}")["LastModified"] for k in objects}
    assert modified["_manifest.json"] == max(modified.values())
    # indexes built during the embedding read were written back beside the shards
    in_bucket, in_prefix = url[len("s3://"):].split("/", 1)
    with open(dataset / "00000.tar", "rb") as f:
        expected_idx = shardindex.build_index(f).render()
    assert s3.get_object(Bucket=in_bucket, Key=f"{in_prefix}/00000.idx")["Body"].read().decode() == expected_idx
    assert not (tmp_path / "idx").exists()
    assert_no_secret_anywhere(server.admin[1], server.endpoint, objects)

    # a second run finds every shard done (cache keys from ETags), and reads the .idx files from the bucket
    again = run(config_for(url, out_url, server.endpoint, index_cache_dir=str(tmp_path / "idx")))
    assert again["totals"]["cached"] == 2


@pytest.mark.slow
def test_flow_completes_through_injected_store_errors(server, dataset, local_run, tmp_path):
    from flows.embed import run

    url = upload(server, dataset)
    out_url = f"s3://{OUT_BUCKET}/emb-{uuid.uuid4().hex[:8]}"
    proxy = FaultProxy(server.endpoint, every=2, kinds=("slowdown", "internal", "reset", "truncate", "stall",
                                                         "unavailable"), stall_seconds=6).start()
    try:
        config = config_for(url, out_url, proxy.endpoint, index_cache_dir=str(tmp_path / "idx"))
        config = config.model_copy(update={"storage_options": {**config.storage_options, "read_timeout": "3"}})
        manifest = run(config)
    finally:
        proxy.stop()
    # every kind of fault was served at least once, and the run lost nothing
    assert set(proxy.injected) == {"slowdown", "internal", "reset", "truncate", "stall", "unavailable"}, proxy.injected
    assert manifest["totals"]["computed"] == 2 and manifest["failed_shards"] == {}
    assert_same_as_local(_s3_outputs(server, out_url), local_run)
    # the store calls' own retries absorbed the faults: no task (no shard's embedding) had to run again
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = max(every_page(client.read_flow_runs), key=lambda fr: fr.created)
        assert out_url in json.dumps(flow_run.parameters)
        # Task-run states reach the server as events, recorded a moment later: wait for every one to be final.
        deadline = time.monotonic() + 60
        while True:
            runs = every_page(client.read_task_runs,
                              flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            names = {tr.name for tr in runs}
            ended = all(tr.state and tr.state.is_final() for tr in runs)
            if (ended and {"index-shards", "report"} <= names and any(n.startswith("embed-") for n in names)) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert runs and all(tr.run_count == 1 for tr in runs), [(tr.name, tr.run_count) for tr in runs]


@pytest.mark.slow
def test_flow_with_wrong_credentials_fails_clearly_and_writes_nothing(server, dataset, tmp_path, monkeypatch,
                                                                       prefect_api):
    from flows.embed import run

    url = upload(server, dataset)
    out_url = f"s3://{OUT_BUCKET}/emb-{uuid.uuid4().hex[:8]}"
    before = (server.keys(IN_BUCKET), server.keys(OUT_BUCKET))
    use_keys(monkeypatch, ("AKIAWRONGWRONGWRONG0", "not-the-secret"))
    with pytest.raises(Exception) as err:
        run(config_for(url, out_url, server.endpoint, index_cache_dir=str(tmp_path / "idx")))
    assert url in str(err.value) and "access denied" in str(err.value), err.value
    assert (server.keys(IN_BUCKET), server.keys(OUT_BUCKET)) == before


def test_a_full_local_temp_folder_fails_an_s3_output_naming_it(server, dataset, tmp_path, monkeypatch):
    """An output on S3 is written to a local temp file (TMPDIR) first, then uploaded in one PUT. With that folder
    full (a tmpfs of 16 KB, filled), each shard failed with pyarrow's '[Errno 28] Error writing bytes to file',
    naming neither the output nor the temp folder: a user writing to S3 looked for a full bucket. The reason now
    names the output, the local temp folder and what to set; nothing is uploaded, no temp file is left."""
    import subprocess
    import tempfile

    from wdsembed import TimmImageEmbedder
    from wdsembed.shard import ShardsFailed

    small = tmp_path / "tmp"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        with open(small / "filler", "wb", buffering=0) as filler, pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 4096)
        monkeypatch.setattr(tempfile, "tempdir", str(small))  # what TMPDIR sets, read once per process
        out = f"s3://{OUT_BUCKET}/tmpfull-{uuid.uuid4().hex[:8]}"
        with pytest.raises(ShardsFailed) as raised:
            TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                              storage_options=options(server.endpoint))(str(dataset), out)
        left = sorted(p.name for p in small.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
    failures = {stem: why for stem, why in raised.value.failures.items() if stem != output.MANIFEST_NAME}
    assert sorted(failures) == ["00000", "00001"], raised.value.failures
    for stem, why in failures.items():
        assert why.startswith(f"OSError: [Errno 28] No space left on device: cannot write {out}/{stem}.parquet: "
                              f"its local temp file in {small} (TMPDIR) ran out of space"), why
        assert "set TMPDIR to a folder with room" in why, why
    assert not [name for name in left if name.startswith("wdsembed-")], left  # no temp file left
    bucket, prefix = out[len("s3://"):].split("/", 1)
    assert not [k for k in server.keys(bucket) if k.startswith(prefix) and k.endswith(".parquet")]



# A process writing an output to S3 (storage.write_atomic), killed outright (SIGKILL, as the OOM killer ends a
# worker) while its local temp file holds the output: as the writer writes it, or once written, before the upload.
_KILLED_WRITING_TO_S3 = """
import os, signal, sys
from wdsembed import storage

fs, path = storage.filesystem(sys.argv[1], {"endpoint_url": sys.argv[2]})
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def write(f):
    f.write(b"PAR1" * (1 << 18))
    if sys.argv[3] == "writing":
        die()

storage.write_atomic(fs, path, write, before_commit=die)
"""


@pytest.mark.parametrize("when", ["writing", "before the upload"])
def test_a_process_killed_while_writing_an_s3_output_leaves_no_local_temp_file(server, tmp_path, when):
    """An output on S3 is written to a local temp file first, then uploaded. A worker killed meanwhile (by the OOM
    killer; by its nanny, as a stopped run closes its cluster) left that file in TMPDIR, named
    wdsembed-<random>.tmp and as large as the output, in a folder that no run clears: each such kill took an
    output's size of the worker's local disk for good. Now the file has no name there (Linux: it is reached
    through the process's descriptor), and goes with the process however it ends; nothing is uploaded."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    temp = tmp_path / "tmp"
    temp.mkdir()
    url = f"s3://{OUT_BUCKET}/killed-{uuid.uuid4().hex[:8]}/00000.parquet"
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITING_TO_S3, url, server.endpoint, when], cwd=root,
                          env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert sorted(p.name for p in temp.iterdir()) == []
    assert not storage.filesystem(url, options(server.endpoint))[0].exists(url)


# Last in this file: stopping its own moto server resets moto's state for the whole process (MotoS3.stop), the
# module's server's buckets and users with it; a test after it finds no bucket.
def test_a_new_output_prefix_is_accepted_for_a_user_who_may_list_and_write_only_that_prefix(monkeypatch, tmp_path):
    """A user whose policy lets them list and write only their prefix of a shared bucket (s3:ListBucket with an
    s3:prefix condition, the usual shape of a shared bucket's policy) is refused HEAD bucket (403): a new prefix
    there is still taken, not refused as "access denied"."""
    from wdsembed import storage

    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    nowhere = str(tmp_path / "none")
    for name, value in (("AWS_CONFIG_FILE", nowhere), ("AWS_SHARED_CREDENTIALS_FILE", nowhere),
                        ("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    srv = MotoS3().start()
    try:
        srv.boto().create_bucket(Bucket="shared")
        team = srv._user(srv.boto("iam"), "team", [
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::shared",
             "Condition": {"StringLike": {"s3:prefix": ["team/*"]}}},
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
             "Resource": "arn:aws:s3:::shared/team/*"}])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", team[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", team[1])
        options = {"endpoint_url": srv.endpoint}
        user = srv.boto("s3", team)
        # what this user can do: list under team/ and write there
        assert user.list_objects_v2(Bucket="shared", Prefix="team/emb/", Delimiter="/", MaxKeys=1)["KeyCount"] == 0
        storage.check_output("s3://shared/team/emb", options)  # a first run's new prefix: must pass
    finally:
        srv.stop()
