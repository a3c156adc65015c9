"""The output keeps the input parquet as it is: every column with its type, values, field metadata and row order,
the schema's key/value metadata (pandas' own included), beside the embedding and error columns; and OUTPUT reads
as one dataset. Real embedding runs (CPU DALI, a tiny timm model on random weights)."""
from __future__ import annotations

import datetime
import decimal
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL
from wdsembed.synthetic import ShardSample, corrupt_image_bytes, encode_image, make_image, write_shard

pytest.importorskip("nvidia.dali")
pd = pytest.importorskip("pandas")

UTC = datetime.timezone.utc


def _image(seed: int, **kw) -> ShardSample:
    return ShardSample(encode_image(make_image(32, 24, seed=seed), "png"), ext="png", **kw)


def _cycle(values: list, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


def _rich_columns(n: int) -> dict:
    """Arrow types a metadata parquet may hold, each with nulls."""
    return {
        "caption_large": pa.array(_cycle(["a", None, "ccc"], n), pa.large_string()),
        "lang": pa.array(_cycle(["en", "fr", None], n)).dictionary_encode(),
        "seen": pa.array(_cycle([datetime.datetime(2024, 1, 1, tzinfo=UTC), None], n),
                         pa.timestamp("us", tz="Europe/Paris")),
        "price": pa.array(_cycle([decimal.Decimal("1.23"), None], n), pa.decimal128(10, 2)),
        "tags": pa.array(_cycle([[{"a": 1, "b": "x"}], None, [], [None]], n),
                         pa.list_(pa.struct([("a", pa.int32()), ("b", pa.string())]))),
        "attrs": pa.array(_cycle([[("k", 1)], None], n), pa.map_(pa.string(), pa.int64())),
        "blob": pa.array(_cycle([b"\x00\x01", None], n), pa.binary()),
        "half": pa.array(_cycle([np.float16(1.5), None], n), pa.float16()),
        "clip": pa.array(_cycle([[0.5, 0.25], None], n), pa.list_(pa.float32())),  # an earlier embedding
        "pair": pa.array(_cycle([[1.0, 2.0], None], n), pa.list_(pa.float32(), 2)),
        "nothing": pa.nulls(n),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from wdsembed import TimmImageEmbedder

    root = tmp_path_factory.mktemp("fidelity")
    inp = root / "in"
    # 00000: Arrow types of every kind, metadata on the schema and its fields, three row groups; a corrupt image,
    # two failed downloads and a tar sample the parquet lacks (an appended row)
    samples = [_image(i) for i in range(5)] + [_image(9, in_parquet=False)]
    samples[3] = ShardSample(corrupt_image_bytes("truncated", seed=1), ext="jpg")
    rich = write_shard(inp, "00000", samples, failed_rows=2)
    base = pq.read_table(rich.parquet)
    table = base.select(["key", "status", "error_message"])
    for name, column in _rich_columns(base.num_rows).items():
        table = table.append_column(name, column)
    fields = [f.with_metadata({"desc": f"about {f.name}"}) for f in table.schema]
    table = pa.Table.from_arrays(table.columns, schema=pa.schema(fields, metadata={"owner": "data-eng"}))
    pq.write_table(table, rich.parquet, row_group_size=3)
    # 00001: written by pandas, with a named index and its nullable dtypes; 'nothing' holds strings here
    frame = write_shard(inp, "00001", [_image(10 + i) for i in range(3)], shard_id=1)
    df = pq.read_table(frame.parquet).to_pandas()
    df["score"] = pd.array([1, None, 3], dtype="Int64")
    df["flag"] = pd.array([True, None, False], dtype="boolean")
    df["note"] = pd.array(["a", None, "b"], dtype="string")
    df["nothing"] = ["x", None, "z"]
    df.index = pd.Index(["r0", "r1", "r2"], name="rowid")
    df.to_parquet(frame.parquet)

    out = root / "out"
    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4,
                                num_threads_per_worker=1)(str(inp), str(out))
    assert sorted((r.stem, r.rows, r.embedded) for r in results) == [("00000", 8, 5), ("00001", 3, 3)]
    return inp, out


def test_every_input_column_keeps_its_type_values_metadata_and_order(run):
    inp, out = run
    given = pq.read_table(inp / "00000.parquet")
    got = pq.read_table(out / "00000.parquet")
    assert got.column_names == given.column_names + ["image_embedding", "embedding_error"]
    for field in given.schema:
        assert got.schema.field(field.name).equals(field, check_metadata=True), field.name
        assert got.column(field.name).slice(0, given.num_rows).equals(given.column(field.name)), field.name
        # the appended tar sample: its key and nothing else
        assert got.column(field.name).slice(given.num_rows).to_pylist() == (
            ["000000005"] if field.name == "key" else [None]), field.name
    assert {k: v for k, v in got.schema.metadata.items() if k != b"wdsembed"} == given.schema.metadata
    emb = got.schema.field("image_embedding")
    assert emb.type == pa.list_(pa.float32()) and int(emb.metadata[b"dim"]) > 0  # as README's Output table says
    assert got.schema.field("embedding_error").type == pa.string()
    errors = dict(zip(got.column("key").to_pylist(), got.column("embedding_error").to_pylist()))
    assert [k for k, e in errors.items() if e is None] == [
        k for k, v in zip(got.column("key").to_pylist(), got.column("image_embedding").to_pylist()) if v is not None]
    assert sum(e is not None for e in errors.values()) == 3  # two failed downloads, one corrupt image


def test_pandas_reads_back_its_own_dtypes_and_index(run):
    """A parquet written by pandas carries its dtypes (nullable Int64, boolean, string) and index in the schema's
    'pandas' metadata. The output dropped it: pd.read_parquet gave the Int64 column as float64 (1 -> 1.0), boolean
    and string as object, and the index as an ordinary last column beside a new RangeIndex. It is kept."""
    inp, out = run
    given = pd.read_parquet(inp / "00001.parquet")
    got = pd.read_parquet(out / "00001.parquet")
    assert got.index.equals(given.index) and got.index.name == "rowid"
    assert list(got.columns) == list(given.columns) + ["image_embedding", "embedding_error"]
    assert got.dtypes[given.columns].equals(given.dtypes)
    pd.testing.assert_frame_equal(got[given.columns], given)
    assert got.image_embedding.notna().all() and got.embedding_error.isna().all()


def test_output_folder_reads_as_one_dataset(run):
    """With README's recipe (the files' schemas merged): a column typed null in one shard and string in another,
    and columns only some shards have, read as one table, every row once."""
    inp, out = run
    with pytest.raises(pa.ArrowNotImplementedError, match="from string to null"):
        ds.dataset(out, format="parquet").to_table()  # the first file's schema alone, as README says
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "unify_schemas" in b)
    scope: dict = {}
    exec(snippet.replace('"demo-output"', repr(str(out))), scope)  # run as written
    table = scope["table"]
    assert table.num_rows == 8 + 3
    assert table.schema.field("nothing").type == pa.string()
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32())
    manifest = json.loads((out / "_manifest.json").read_text())
    assert set(manifest["shards"]) == {"00000", "00001"}


def test_the_readmes_read_of_a_folder_names_each_rows_shard_where_keys_repeat_across_shards(tmp_path):
    """Shards not made by img2dataset may reuse their keys (each numbered from 0): the full outputs have no shard
    column, so the README's folder read gives each row's file. Run as written on such outputs, it tells the two
    rows of one key apart, and leaves the kNN copy in _embeddings/ out of the folder's rows."""
    from wdsembed import TimmImageEmbedder

    inp, out = tmp_path / "in", tmp_path / "out"
    for stem in ("00000", "00001"):
        write_shard(inp, stem, [_image(int(stem) * 10 + i) for i in range(2)], shard_id=0, parquet=False)
    TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                      fidelity_sample=0)(str(inp), str(out))
    assert (out / "_embeddings").is_dir()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "__filename" in b)
    scope: dict = {}
    exec(snippet.replace('"demo-output', f'"{out}'), scope)  # run as written
    # one shard's rows read with pandas, then every shard's embedded rows as one matrix
    assert len(scope["ok"]) == 2 and scope["X"].shape[0] == scope["table"].num_rows == 4
    named = scope["named"]
    rows = sorted(zip(named.column("key").to_pylist(), (Path(f).name for f in named.column("__filename").to_pylist())))
    keys = [k for k, _ in rows]
    assert len(set(keys)) == 2 and len(keys) == 4  # each key twice, once per shard
    assert rows == sorted((k, f"{stem}.parquet") for k in set(keys) for stem in ("00000", "00001"))


def test_the_readmes_merged_read_takes_shards_whose_writers_typed_a_column_otherwise(tmp_path):
    """Parquets that pandas wrote hold an integer column with a null as double, and those that polars wrote hold
    strings as large_string: each output keeps its parquet's types, and the README's merged read failed on them
    ("Field width has incompatible types: int64 vs double"). Run as written, it reads every shard, each column in
    the type that holds every shard's values."""
    from wdsembed import TimmImageEmbedder

    inp = tmp_path / "in"
    for s in range(2):
        shard = write_shard(inp, f"{s:05d}", [_image(10 * s + i, width=32) for i in range(2)], shard_id=s)
        if s:  # as pandas (a null among integers) and polars (large strings) write it
            table = pq.read_table(shard.parquet)
            table = table.set_column(table.schema.get_field_index("width"), "width",
                                     pa.array([None, 32.0], pa.float64()))
            table = table.set_column(table.schema.get_field_index("caption"), "caption",
                                     table.column("caption").cast(pa.large_string()))
            pq.write_table(table, shard.parquet)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                      fidelity_sample=0)(str(inp), str(out))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "unify_schemas" in b)
    scope: dict = {}
    exec(snippet.replace('"demo-output"', repr(str(out))), scope)  # run as written
    table = scope["table"]
    assert table.num_rows == 4 and table.column("width").to_pylist() == [32, 32, None, 32]
    assert table.column("image_embedding").null_count == 0


def test_a_parquet_of_view_types_is_joined_with_its_columns_as_their_plain_types(tmp_path):
    """Arrow's view types (string_view, binary_view: polars 1.38.0 wrote its strings as string_view, and pyarrow
    reads a parquet back in the types its writer recorded) have no take or filter kernel in pyarrow: the shard was
    embedded and then failed at the key join with "ArrowNotImplementedError: Function 'array_take' has no kernel
    matching input types (string_view, uint16)", no output; a string_view id column was refused before any work as
    "has type string_view; the key join matches a string or integer column". Each such column, also inside a list,
    struct or map, is now its plain type (string, binary), values unchanged, and the id column joins as a string."""
    from wdsembed import TimmImageEmbedder

    inp, out = tmp_path / "in", tmp_path / "out"
    shard = write_shard(inp, "00000", [_image(i) for i in range(3)] + [_image(9, in_parquet=False)], failed_rows=1)
    write_shard(inp, "00001", [_image(20)], shard_id=1, parquet=False)  # its keys take the run's id type
    base = pq.read_table(shard.parquet)
    n = base.num_rows
    views = {
        "key": base.column("key").cast(pa.string_view()),
        "caption": base.column("caption").cast(pa.string_view()),
        "blob": pa.array(_cycle([b"\x00\x01", None], n), pa.binary_view()),
        "tags": pa.array(_cycle([["a", None], None, []], n), pa.list_(pa.string_view())),
        "meta": pa.array(_cycle([{"src": "web", "raw": b"x"}, None], n),
                         pa.struct([("src", pa.string_view()), ("raw", pa.binary_view())])),
        "attrs": pa.array(_cycle([[("k", "v")], None], n), pa.map_(pa.string_view(), pa.string_view())),
        "status": base.column("status").cast(pa.string_view()),  # img2dataset's, read for the failed rows
    }
    given = pa.table(views, metadata={"owner": "data-eng"})
    given = given.cast(pa.schema([f.with_metadata({"desc": f.name}) for f in given.schema],
                                 metadata=given.schema.metadata))
    pq.write_table(given, shard.parquet)
    assert pq.read_schema(shard.parquet).field("key").type == pa.string_view()  # as its writer recorded it

    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4,
                                num_threads_per_worker=1)(str(inp), str(out))
    assert sorted((r.stem, r.rows, r.embedded) for r in results) == [("00000", 5, 4), ("00001", 1, 1)]
    got = pq.read_table(out / "00000.parquet")
    plain = {"key": pa.string(), "caption": pa.string(), "blob": pa.binary(), "tags": pa.list_(pa.string()),
             "meta": pa.struct([("src", pa.string()), ("raw", pa.binary())]),
             "attrs": pa.map_(pa.string(), pa.string()), "status": pa.string()}
    assert got.column_names == list(views) + ["image_embedding", "embedding_error"]
    for name, t in plain.items():
        assert got.schema.field(name).type == t, name
        assert got.schema.field(name).metadata == {b"desc": name.encode()}, name
        assert got.column(name).slice(0, n).to_pylist() == given.column(name).to_pylist(), name
    assert got.column("key").slice(n).to_pylist() == [shard.keys[-1]]  # the sample the parquet lacks, appended
    reasons = dict(zip(got.column("key").to_pylist(), got.column("embedding_error").to_pylist()))
    assert reasons == {k: ("failed_to_download" if k in shard.failed_keys else None) for k in reasons}
    # one key type across OUTPUT: the shard without a parquet, its kNN view and the views read as one dataset
    assert pq.read_schema(out / "00001.parquet").field("key").type == pa.string()
    knn = ds.dataset(out / "_embeddings", format="parquet").to_table()
    assert knn.schema.field("key").type == pa.string() and knn.num_rows == 5


def _own_columns(schema: pa.Schema, names: list[str]) -> list[pa.Field]:
    return [schema.field(name) for name in names]


def test_shards_where_no_image_was_embedded_have_the_schema_of_the_others(tmp_path):
    """A shard whose every image failed, and one whose every download failed (an empty tar, its parquet's rows all
    failed), first in OUTPUT's order: their outputs and kNN views carry the key, embedding (list<float>, its `dim`)
    and error columns in the types and field metadata of a shard with embeddings, never Arrow's `null` type, so
    that OUTPUT and OUTPUT/_embeddings read as one dataset with any one file's schema, every row once."""
    from wdsembed import TimmImageEmbedder

    inp, out = tmp_path / "in", tmp_path / "out"
    bad = [ShardSample(corrupt_image_bytes("random", seed=i), ext="jpg") for i in range(3)]
    write_shard(inp, "00000", bad, shard_id=0)  # every image fails
    write_shard(inp, "00001", [], shard_id=1, failed_rows=2)  # every download failed: no sample in its tar
    write_shard(inp, "00002", [_image(i) for i in range(3)], shard_id=2)
    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                fidelity_sample=0)(str(inp), str(out))
    assert sorted((r.stem, r.rows, r.embedded) for r in results) == [("00000", 3, 0), ("00001", 2, 0),
                                                                      ("00002", 3, 3)]
    own = ["key", "image_embedding", "embedding_error"]
    embedded = _own_columns(pq.read_schema(out / "00002.parquet"), own)
    assert embedded[1].type == pa.list_(pa.float32()) and embedded[1].metadata[b"dim"] != b"0"
    view = pq.read_schema(out / "_embeddings" / "00002.parquet").remove_metadata()
    for stem in ("00000", "00001"):
        got = _own_columns(pq.read_schema(out / f"{stem}.parquet"), own)
        assert all(f.equals(g, check_metadata=True) for f, g in zip(got, embedded)), (stem, got)
        assert pq.read_schema(out / f"{stem}.parquet").names == pq.read_schema(out / "00002.parquet").names
        assert pq.read_schema(out / "_embeddings" / f"{stem}.parquet").remove_metadata().equals(
            view, check_metadata=True), stem
    files = sorted(str(p) for p in out.glob("*.parquet"))
    for first in files:  # each file's schema as the dataset's: the others read in it
        table = ds.dataset(files, format="parquet", schema=pq.read_schema(first)).to_table()
        assert table.num_rows == 8 and table.column("image_embedding").null_count == 5, first
    assert ds.dataset(out, format="parquet").to_table().num_rows == 8
    knn = ds.dataset(out / "_embeddings", format="parquet").to_table()
    assert knn.num_rows == 3 and knn.column("image_embedding").null_count == 0


def test_a_parquet_of_required_columns_takes_the_tar_samples_it_lacks(tmp_path):
    """Spark (and DuckDB, for a NOT NULL column) writes a column it knows holds no null as parquet's `required`, read
    back as a non-nullable field. A tar sample that such a parquet lacks is appended as a row whose other columns are
    null: the shard was embedded and then failed at its write ("Column 'caption' is declared non-nullable but
    contains nulls"), its output lost. The columns that hold a null are now declared nullable, their types and
    values unchanged, and OUTPUT reads as one dataset beside a shard whose parquet declares them nullable."""
    from wdsembed import TimmImageEmbedder

    inp, out = tmp_path / "in", tmp_path / "out"
    shard = write_shard(inp, "00000", [_image(i) for i in range(3)] + [_image(9, in_parquet=False)])
    write_shard(inp, "00001", [_image(20 + i) for i in range(2)], shard_id=1)
    given = pq.read_table(shard.parquet)
    required = pa.schema([f.with_nullable(given.column(f.name).null_count > 0) for f in given.schema])
    pq.write_table(given.cast(required), shard.parquet)
    assert not pq.read_schema(shard.parquet).field("caption").nullable  # as its writer declared it
    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                fidelity_sample=0)(str(inp), str(out))
    assert sorted((r.stem, r.rows, r.embedded) for r in results) == [("00000", 4, 4), ("00001", 2, 2)]
    got = pq.read_table(out / "00000.parquet")
    assert got.column("key").to_pylist() == list(shard.keys)  # the sample the parquet lacks, appended with its key
    assert got.column("caption").to_pylist()[-1] is None and got.schema.field("caption").nullable
    assert not got.schema.field("key").nullable  # never null here: declared as the parquet has it
    for f in required:
        assert got.schema.field(f.name).type == f.type and got.column(f.name).slice(0, 3).equals(
            given.column(f.name)), f.name
    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows == 6 and table.column("image_embedding").null_count == 0
