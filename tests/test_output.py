"""wdsembed.output: the key join, the schema, atomic writes, footer metadata and the manifest."""
from __future__ import annotations

import errno
import json
import os
import posixpath
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wdsembed.output import (
    NOT_IN_TAR,
    build_output_table,
    read_manifest,
    read_output_metadata,
    write_manifest,
    write_parquet_atomic,
)

DIM = 8


def _emb(key: str) -> np.ndarray:
    """A distinct, recognisable embedding per key."""
    return np.arange(DIM, dtype=np.float32) + np.float32(int(key) * 100)


def _img2dataset_rows(key_type=pa.string()) -> pa.Table:
    keys = ["000000", "000001", "000002", "000003", "000004", "000005"]
    return pa.table(
        {
            "key": pa.array(keys if key_type == pa.string() else [int(k) for k in keys], type=key_type),
            "url": [f"http://x/{k}.jpg" for k in keys],
            "caption": [f"cap {k}" for k in keys],
            "status": ["success", "failed_to_download", "success", "success", "failed_to_resize", "success"],
            "error_message": [None, "HTTP Error 404", None, None, "", None],
            "width": pa.array([10, None, 30, 40, None, 60], type=pa.int32()),
        }
    )


def _by_key(table: pa.Table) -> dict:
    return {r["key"]: r for r in table.to_pylist()}


def test_join_by_key_not_position():
    rows = _img2dataset_rows()
    rows = pa.concat_tables([rows.slice(0, 2), rows.slice(2)])  # as read from parquet: several chunks
    assert rows.column("key").num_chunks == 2
    # the tar in completion order, not key order; 000003 failed to decode; 000005 is not in the tar at all;
    # 000042 is in the tar but not in the parquet
    keys = ["000002", "000042", "000000"]
    emb = np.stack([_emb(k) for k in keys])
    t = build_output_table(rows=rows, keys=keys, embeddings=emb, errors={"000003": "decode error: truncated"}, dim=DIM)

    assert t.column("key").to_pylist() == ["000000", "000001", "000002", "000003", "000004", "000005", "000042"]
    got = _by_key(t)
    for k in ("000000", "000002", "000042"):
        assert got[k]["image_embedding"] == _emb(k).tolist()  # exact: float32 values survive unchanged
        assert got[k]["embedding_error"] is None
    assert got["000001"]["image_embedding"] is None and got["000001"]["embedding_error"] == "HTTP Error 404"
    assert got["000004"]["image_embedding"] is None and got["000004"]["embedding_error"] == "failed_to_resize"
    assert got["000003"]["image_embedding"] is None and got["000003"]["embedding_error"] == "decode error: truncated"
    assert got["000005"]["image_embedding"] is None and got["000005"]["embedding_error"] == NOT_IN_TAR
    # every input column kept, failed rows included
    assert got["000001"]["url"] == "http://x/000001.jpg" and got["000001"]["caption"] == "cap 000001"
    assert got["000002"]["width"] == 30
    # the appended sample has its key and nothing else
    assert got["000042"]["url"] is None and got["000042"]["status"] is None


@pytest.mark.parametrize("key_type", [pa.string(), pa.int64()])
def test_rows_a_member_without_an_extension_holds_get_its_own_reason_and_no_row_of_their_own(key_type):
    """missing_reasons: a tar key whose only member has no extension (shard.TarRead.missing_reasons) names that
    member on its parquet row, matched as sample keys are (`000005` is 5 in an integer id column); a key of it the
    parquet lacks (`README`) makes no row."""
    why = {"000005": "no image member: the tar's member '000005' has no extension", "README": "no row"}
    t = build_output_table(rows=_img2dataset_rows(key_type), keys=["000000"], embeddings=_emb("000000")[None],
                           errors={}, dim=DIM, missing_reasons=why)
    got = {str(int(k)): r["embedding_error"] for k, r in _by_key(t).items()}
    assert got == {"0": None, "1": "HTTP Error 404", "2": NOT_IN_TAR, "3": NOT_IN_TAR, "4": "failed_to_resize",
                   "5": why["000005"]}


def test_schema_types():
    t = build_output_table(
        rows=_img2dataset_rows(), keys=["000000"], embeddings=_emb("000000")[None], errors={}, dim=DIM
    )
    assert t.schema.field("key").type == pa.string()
    assert t.schema.field("width").type == pa.int32()
    emb_field = t.schema.field("image_embedding")
    assert emb_field.type == pa.list_(pa.float32())
    assert emb_field.metadata == {b"dim": str(DIM).encode()}
    assert t.schema.field("embedding_error").type == pa.string()
    lengths = [len(v) for v in t.column("image_embedding").to_pylist() if v is not None]
    assert lengths == [DIM]


def test_validation_counts_only_the_rows_with_an_embedding():
    from wdsembed.config import EmbedConfig
    from wdsembed.validate import validate_table

    config = EmbedConfig(input="/in", output="/out")
    unit = {k: _emb(k) / np.linalg.norm(_emb(k)) for k in ("1", "3", "4")}
    # in the tar's order (no gather), then out of it (gathered): a row without embedding between embedded ones
    for keys, rows in ((["1", "3", "4"], None), (["4", "1", "3"], pa.table({"key": ["1", "2", "3", "4"]}))):
        table = build_output_table(rows=rows, keys=keys, embeddings=np.stack([unit[k] for k in keys]),
                                   errors={"2": "bad image"}, dim=DIM)
        got = {k: r["image_embedding"] for k, r in _by_key(table).items()}
        assert got["2"] is None and all(np.allclose(got[k], v) for k, v in unit.items())
        assert validate_table(config, table, dim=DIM, expected_embedded=3) == []
        # the count is checked: the row without embedding is not counted as one, and a missing one is said
        assert validate_table(config, table, dim=DIM, expected_embedded=4) == ["3 embeddings, expected 4"]
        assert validate_table(config, table, dim=2 * DIM) == [f"embedding lengths [{DIM}], expected {2 * DIM}"]
        # a row with neither an embedding nor an error, and one with both, are each a problem
        for broken in (pa.array([None] * table.num_rows, pa.string()),
                       pa.array(["x"] * table.num_rows, pa.string())):
            t = table.set_column(table.schema.get_field_index("embedding_error"), "embedding_error", broken)
            assert validate_table(config, t, dim=DIM, expected_embedded=3) == [
                "every row must have exactly one of an embedding and an error"]


def test_integer_key_column_keeps_its_type():
    rows = _img2dataset_rows(pa.int64())
    keys = ["000005", "000000", "000077"]  # the tar's zero-padded strings
    emb = np.stack([_emb(k) for k in keys])
    t = build_output_table(rows=rows, keys=keys, embeddings=emb, errors={}, dim=DIM)
    assert t.schema.field("key").type == pa.int64()
    got = _by_key(t)
    assert set(got) == {0, 1, 2, 3, 4, 5, 77}
    for k in keys:
        assert got[int(k)]["image_embedding"] == _emb(k).tolist()
    assert got[2]["embedding_error"] == NOT_IN_TAR
    assert got[1]["embedding_error"] == "HTTP Error 404"


def test_duplicate_parquet_keys_each_get_the_embedding():
    from wdsembed.config import EmbedConfig
    from wdsembed.output import join_embeddings
    from wdsembed.validate import validate_table

    rows = pa.table({"key": ["000001", "000002", "000001"], "n": [1, 2, 3]})
    joined = join_embeddings(
        rows=rows, keys=["000001", "000002"], embeddings=np.stack([_emb("1"), _emb("2")]), errors={}, dim=DIM
    )
    t = joined.table
    assert t.column("n").to_pylist() == [1, 2, 3]
    assert t.column("image_embedding").to_pylist() == [_emb("1").tolist(), _emb("2").tolist(), _emb("1").tolist()]
    # two samples embedded, on three rows: what the shard's validation expects is the join's row count
    assert (joined.embedded, joined.embedded_rows, joined.errors) == (2, 3, {})
    config = EmbedConfig(input="/in", output="/out", normalize_embeddings=False)
    assert validate_table(config, t, dim=DIM, expected_embedded=joined.embedded_rows) == []


def test_tar_keys_without_an_integer_id_of_their_own_get_an_error_row_not_another_rows_embedding():
    """An integer id column: a tar key that is no integer, and one whose integer an earlier key has ('0' after
    '000000'), each get a row of their own with an error naming the key; the join says which embedded samples it
    turned into errors, so that the shard's counts and validation agree with the table."""
    from wdsembed.output import join_embeddings

    rows = pa.table({"key": pa.array([0, 1], type=pa.int64()), "n": [10, 11]})
    keys = ["000000", "000001", "extra-a", "0", "000009", "9"]
    emb = np.stack([_emb(str(i)) for i in range(len(keys))])
    joined = join_embeddings(rows=rows, keys=keys, embeddings=emb, errors={"00001": "bad image"}, dim=DIM)
    got = joined.table.to_pylist()
    assert [r["key"] for r in got] == [0, 1, None, 0, 9, 9, 1]
    assert [r["n"] for r in got] == [10, 11, None, None, None, None, None]
    assert [r["image_embedding"] is not None for r in got] == [True, True, False, False, True, False, False]
    assert got[0]["image_embedding"] == _emb("0").tolist() and got[4]["image_embedding"] == _emb("4").tolist()
    assert [r["embedding_error"] for r in got] == [
        None, None,
        "key 'extra-a' is not in the parquet and not an integer",
        "key '0' has the same integer id as key '000000', which owns its row",
        None,
        "key '9' has the same integer id as key '000009', which owns its row",
        "bad image",  # an error sample whose id is taken gets its own error
    ]
    assert (joined.embedded, joined.embedded_rows) == (3, 3)
    assert joined.errors == {"extra-a": got[2]["embedding_error"], "0": got[3]["embedding_error"],
                             "9": got[5]["embedding_error"]}


def test_a_row_without_a_key_is_said_to_have_none_not_to_be_missing_from_the_tar():
    """A parquet row whose id is null can match no sample: 'not in tar' would say the tar was searched for its key.
    A failed download keeps img2dataset's own reason, as any row does."""
    for id_type, ids in ((pa.string(), ["000001", None, "000002", None]), (pa.int64(), [1, None, 2, None])):
        rows = pa.table({"id": pa.array(ids, type=id_type), "status": ["success", "success", "success", "failed"],
                         "error_message": [None, None, None, "HTTP Error 404"]})
        t = build_output_table(rows=rows, keys=["000001"], embeddings=_emb("1")[None], errors={}, dim=DIM,
                               id_column="id")
        assert t.column("embedding_error").to_pylist() == [None, "no key (its 'id' is null)", NOT_IN_TAR,
                                                          "HTTP Error 404"], id_type


def test_without_parquet():
    keys = ["000003", "000001"]
    t = build_output_table(
        rows=None, keys=keys, embeddings=np.stack([_emb(k) for k in keys]), errors={"000002": "no image"}, dim=DIM
    )
    assert t.column_names == ["key", "image_embedding", "embedding_error"]
    assert t.to_pylist() == [
        {"key": "000003", "image_embedding": _emb("000003").tolist(), "embedding_error": None},
        {"key": "000001", "image_embedding": _emb("000001").tolist(), "embedding_error": None},
        {"key": "000002", "image_embedding": None, "embedding_error": "no image"},
    ]


def test_without_parquet_the_keys_take_the_runs_id_type():
    """A shard without a parquet in a run of integer ids: its keys take the run's type, so every output has one
    schema; a key that is no integer (or one beyond the type) is a row of its own with an error naming it, every
    other image embedded."""
    from wdsembed.output import join_embeddings

    keys = ["000003", "abc", "99999999999999999999", "000001"]
    joined = join_embeddings(rows=None, keys=keys, embeddings=np.stack([_emb(str(i)) for i in range(4)]),
                             errors={"000002": "no image"}, dim=DIM, id_type=pa.int64())
    t = joined.table
    assert t.schema.field("key").type == pa.int64()
    assert t.column("key").to_pylist() == [3, None, None, 1, 2]
    assert [e is not None for e in t.column("image_embedding").to_pylist()] == [True, False, False, True, False]
    assert t.column("embedding_error").to_pylist() == [
        None, "key 'abc' is not an integer, as the run's ids (int64) are",
        "key '99999999999999999999' is an integer beyond int64, the id column's type", None, "no image"]
    assert (joined.embedded, sorted(joined.errors)) == (2, ["99999999999999999999", "abc"])
    # A string type (or none) keeps the keys as the tar names them.
    t = build_output_table(rows=None, keys=keys[:1], embeddings=_emb("3")[None], errors={}, dim=DIM,
                           id_type=pa.string())
    assert t.schema.field("key").type == pa.string() and t.column("key").to_pylist() == ["000003"]


def test_a_repeated_tar_key_is_a_row_of_its_own_without_an_embedding():
    """A tar sample whose key an earlier sample has (shard.TarRead.repeats) is a row after every other sample, with
    its key (in the id column's type) and reason, never an embedding and never on the parquet's row of the key,
    which keeps its first sample's embedding; an integer id column's repeat is no collision of two keys."""
    from wdsembed.output import join_embeddings

    rows = _img2dataset_rows(pa.int64())
    keys = ["000000", "000002", "000003", "000005"]
    repeats = [("000002", "duplicate key: sample 2"), ("000002", "duplicate key: sample 3"),
               ("000009", "duplicate key: sample 2")]
    joined = join_embeddings(rows=rows, keys=keys, embeddings=np.stack([_emb(k) for k in keys]),
                             errors={"000009": "no image"}, dim=DIM, repeats=repeats)
    t = joined.table
    assert t.column("key").to_pylist() == [0, 1, 2, 3, 4, 5, 9, 2, 2, 9]
    assert t.column("image_embedding").to_pylist()[2] == _emb("000002").tolist()
    assert t.column("image_embedding").to_pylist()[6:] == [None] * 4
    assert t.column("embedding_error").to_pylist()[6:] == ["no image"] + [r for _, r in repeats]
    assert t.column("caption").to_pylist()[7:] == [None] * 3
    assert (joined.embedded, joined.embedded_rows, joined.errors) == (4, 4, {})
    without = build_output_table(rows=None, keys=["a"], embeddings=_emb("1")[None], errors={}, dim=DIM,
                                 repeats=[("a", "duplicate key: sample 2")])
    assert without.column("key").to_pylist() == ["a", "a"]
    assert without.column("embedding_error").to_pylist() == [None, "duplicate key: sample 2"]


def test_an_id_column_of_the_null_type_takes_the_runs_id_type():
    """pandas writes an empty frame's columns (an emptied shard's parquet) as Arrow's `null` type. The join refused
    such an id column ("has type null; the key join matches a string or integer column"), so the shard failed on
    every run. It holds no key: its rows, if any, say so, and the tar's samples take the run's id type, as in a
    shard without a parquet."""
    from wdsembed.output import id_column_problem, id_type_name, join_embeddings

    empty = pa.table({"key": pa.nulls(0), "caption": pa.nulls(0)})
    assert id_column_problem("key", "p", empty.schema) is None and id_type_name("key", empty.schema) is None
    t = build_output_table(rows=empty, keys=[], embeddings=np.zeros((0, DIM)), errors={}, dim=DIM,
                           id_type=pa.int64())
    assert t.num_rows == 0 and t.schema.field("key").type == pa.int64()
    assert t.schema.field("caption").type == pa.null()  # the parquet's other columns keep their types

    keyless = pa.table({"key": pa.nulls(1), "caption": ["a cat"]})
    joined = join_embeddings(rows=keyless, keys=["000003"], embeddings=_emb("000003")[None], errors={}, dim=DIM,
                             id_type=pa.int64())
    assert joined.table.schema.field("key").type == pa.int64()
    assert joined.table.select(["key", "caption", "embedding_error"]).to_pylist() == [
        {"key": None, "caption": "a cat", "embedding_error": "no key (its 'key' is null)"},
        {"key": 3, "caption": None, "embedding_error": None}]
    t = build_output_table(rows=empty, keys=["000003"], embeddings=_emb("000003")[None], errors={}, dim=DIM)
    assert t.schema.field("key").type == pa.string() and t.column("key").to_pylist() == ["000003"]


def test_custom_column_names_and_columns_never_replaced():
    rows = pa.table({"id": ["a", "b"], "caption": ["x", "y"]})
    t = build_output_table(
        rows=rows, keys=["b"], embeddings=_emb("2")[None], errors={}, dim=DIM,
        id_column="id", embedding_column="emb", error_column="why",
    )
    assert t.column_names == ["id", "caption", "emb", "why"]
    assert t.column("emb").to_pylist() == [None, _emb("2").tolist()]
    assert t.column("why").to_pylist() == [NOT_IN_TAR, None]
    # A column of the parquet named like the embedding or error column is the user's data: never replaced.
    for names, clash in (({"embedding_column": "caption"}, "'caption'"),
                         ({"error_column": "caption"}, "'caption'"),
                         ({"embedding_column": "caption", "error_column": "id2"}, "'caption', 'id2'")):
        with pytest.raises(ValueError) as refused:
            build_output_table(rows=rows.append_column("id2", rows.column("id")), keys=["b"],
                               embeddings=_emb("2")[None], errors={}, dim=DIM, id_column="id", **names)
        flags = " and ".join(f"--{flag} ({field}=) another name" for flag, field in (("embedding-column",
                                                                                       "embedding_column"),
                                                                                      ("error-column", "error_column"))
                             if field in names)
        assert str(refused.value) == (f"the shard's parquet already has column(s) {clash}, which the output would "
                                      f"replace with its own: pass {flags}, so that every column of the parquet is "
                                      "kept")


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        build_output_table(rows=None, keys=["a", "b"], embeddings=np.zeros((1, DIM)), errors={}, dim=DIM)
    with pytest.raises(ValueError, match="both"):
        build_output_table(rows=None, keys=["a"], embeddings=np.zeros((1, DIM)), errors={"a": "x"}, dim=DIM)
    with pytest.raises(ValueError, match="idx"):
        build_output_table(rows=pa.table({"key": ["a"]}), keys=[], embeddings=np.zeros((0, DIM)), errors={},
                           dim=DIM, id_column="idx")
    with pytest.raises(ValueError, match="has type double; the key join matches a string or integer column"):
        build_output_table(rows=pa.table({"key": [1.0]}), keys=[], embeddings=np.zeros((0, DIM)), errors={}, dim=DIM)


def test_id_column_types_the_join_takes_and_those_it_refuses():
    """Asked of each shard's parquet schema before it is embedded (and of the first shard's before the run starts):
    strings, integers and dictionaries of either join; a float key column is said to be a broken export."""
    from wdsembed.output import id_column_problem

    for t in (pa.string(), pa.large_string(), pa.int64(), pa.uint16(), pa.dictionary(pa.int32(), pa.string())):
        assert id_column_problem("key", "00000.parquet", pa.schema([("key", t)])) is None, t
    assert id_column_problem("key", "00000.parquet", pa.schema([("key", pa.float64())])) == (
        "id column 'key' of 00000.parquet has type double; the key join matches a string or integer column. Float "
        "keys come from a broken export (pandas writes an integer column that holds a null as float64; "
        "img2dataset's keys are strings such as '000010012'): write the column as strings, or integers, and run "
        "again")
    assert id_column_problem("key", "00000.parquet", pa.schema([("key", pa.binary())])) == (
        "id column 'key' of 00000.parquet has type binary; the key join matches a string or integer column: pass "
        "--id-column (id_column=) the column that holds each row's key")
    assert id_column_problem("uid", "00000.parquet", pa.schema([("key", pa.string())])).startswith(
        "id column 'uid' is not in 00000.parquet (columns: key): ")


def test_parquet_without_rows_but_tar_samples():
    rows = _img2dataset_rows().slice(0, 0)
    t = build_output_table(rows=rows, keys=["000007"], embeddings=_emb("7")[None], errors={}, dim=DIM)
    assert t.column("key").to_pylist() == ["000007"]
    assert t.column("image_embedding").to_pylist() == [_emb("7").tolist()]
    assert t.column_names == rows.column_names + ["image_embedding", "embedding_error"]


def test_empty_shard():
    t = build_output_table(rows=None, keys=[], embeddings=np.zeros((0, DIM), np.float32), errors={}, dim=DIM)
    assert t.num_rows == 0 and t.schema.field("image_embedding").type == pa.list_(pa.float32())


# --------------------------------------------------------------------------------------------------- writes


def _table() -> pa.Table:
    keys = ["000002", "000000"]
    return build_output_table(
        rows=_img2dataset_rows(), keys=keys, embeddings=np.stack([_emb(k) for k in keys]), errors={}, dim=DIM
    )


def _codecs(url: str) -> dict[str, tuple[str, tuple]]:
    meta = pq.ParquetFile(url).metadata
    return {meta.schema.column(i).path: (meta.row_group(0).column(i).compression,
                                         meta.row_group(0).column(i).encodings) for i in range(meta.num_columns)}


def test_bfloat16_valued_embeddings_are_split_into_byte_streams_and_zstd_compressed(tmp_path):
    """A bfloat16 model's float32 values (low 16 bits zero) are stored byte-stream-split and zstd-compressed and
    read back bit for bit; float32 values are not compressed; other columns, nested lists included, keep snappy."""
    import torch

    rng = np.random.default_rng(0)
    fs = fsspec.filesystem("file")
    n, dim = 300, 64
    fp32 = rng.standard_normal((n, dim)).astype(np.float32)
    bf16 = torch.from_numpy(fp32).to(torch.bfloat16).float().numpy()
    sizes = {}
    for name, values in (("bf16", bf16), ("fp32", fp32)):
        table = pa.table({
            "key": [f"{i:06d}" for i in range(n)],
            "tags": [[["a", "b"]]] * n,  # a user's nested list column
            "image_embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)),
                                                        pa.array(values.reshape(-1))),
        })
        url = str(tmp_path / f"{name}.parquet")
        write_parquet_atomic(table, url, fs, {"v": 1})
        back = pq.read_table(url)
        got = np.asarray(back.column("image_embedding").combine_chunks().values).reshape(n, dim)
        assert got.view(np.uint32).tolist() == values.view(np.uint32).tolist()  # bit for bit
        assert back.column("tags").to_pylist() == table.column("tags").to_pylist()
        codecs, sizes[name] = _codecs(url), os.path.getsize(url)
        assert codecs["key"][0] == codecs["tags.list.element.list.element"][0] == "SNAPPY"
        codec, encodings = codecs["image_embedding.list.element"]
        if name == "bf16":
            assert codec == "ZSTD" and "BYTE_STREAM_SPLIT" in encodings
        else:
            assert codec == "UNCOMPRESSED" and "BYTE_STREAM_SPLIT" not in encodings
    assert sizes["bf16"] < 0.6 * sizes["fp32"]


def test_float16_embeddings_are_stored_as_half_floats_plain_and_read_back_as_stored(tmp_path):
    """embedding_dtype "float16": list<halffloat>, nulls where rows have no embedding, values as NumPy rounds them,
    stored plain (no codec, no byte stream split) in half the bytes; validation asks for the type the config names."""
    from wdsembed.config import EmbedConfig
    from wdsembed.validate import validate_table

    rng = np.random.default_rng(1)
    n, dim = 200, 64
    unit = rng.standard_normal((n, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    keys = [f"{i:06d}" for i in range(n)]
    fs = fsspec.filesystem("file")
    sizes, tables = {}, {}
    for dtype in ("float32", "float16"):
        table = build_output_table(rows=None, keys=keys[1:], embeddings=unit[1:], errors={keys[0]: "bad image"},
                                   dim=dim, embedding_dtype=dtype)
        url = str(tmp_path / f"{dtype}.parquet")
        write_parquet_atomic(table, url, fs, {"v": 1})
        tables[dtype], sizes[dtype] = pq.read_table(url), os.path.getsize(url)
        config = EmbedConfig(input="/in", output="/out", embedding_dtype=dtype)
        assert validate_table(config, tables[dtype], dim=dim, expected_embedded=n - 1) == []
    half = tables["float16"]
    assert half.schema.field("image_embedding").type == pa.list_(pa.float16())
    rows = _by_key(half)
    assert rows[keys[0]]["image_embedding"] is None and rows[keys[0]]["embedding_error"] == "bad image"
    got = np.stack([np.asarray(rows[k]["image_embedding"], dtype=np.float16) for k in keys[1:]])
    assert got.tobytes() == unit[1:].astype(np.float16).tobytes()
    codec, encodings = _codecs(str(tmp_path / "float16.parquet"))["image_embedding.list.element"]
    assert codec == "UNCOMPRESSED" and "PLAIN" in encodings and "BYTE_STREAM_SPLIT" not in encodings
    assert sizes["float16"] < 0.6 * sizes["float32"]
    as_float32 = EmbedConfig(input="/in", output="/out")
    assert validate_table(as_float32, half, dim=dim) == ["embedding values are halffloat, expected float"]


def test_values_beyond_float16_are_refused_naming_the_shard_and_key():
    from wdsembed.output import as_stored

    embeddings = np.array([[1.0, -2.0], [3.0, -70000.0], [5.0, 6.0]], dtype=np.float32)
    keys = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"shard s3://b/00007.tar: key 'b' has an embedding value of 70000, beyond "
                                         r"float16's largest \(65504\): store these embeddings as float32"):
        as_stored(embeddings, keys, "float16", "s3://b/00007.tar")
    assert as_stored(embeddings, keys, "float32", "x").dtype == np.float32  # float32 has room for any of them
    assert as_stored(embeddings[[0, 2]], ["a", "c"], "float16", "x").dtype == np.float16
    assert as_stored(np.zeros((0, 2), np.float32), [], "float16", "x").shape == (0, 2)


def test_atomic_write_roundtrip(tmp_path):
    fs = fsspec.filesystem("file")
    url = str(tmp_path / "out" / "00000.parquet")
    meta = {"model": "resnet18", "dim": DIM, "fingerprint": "abc", "input": {"size": 123}}
    write_parquet_atomic(_table(), url, fs, meta)
    assert os.listdir(tmp_path / "out") == ["00000.parquet"]  # no temp files left
    back = pq.read_table(url)
    assert back.column("image_embedding").to_pylist() == _table().column("image_embedding").to_pylist()
    assert back.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert read_output_metadata(url, fs) == meta
    # overwrite replaces whole
    write_parquet_atomic(_table().slice(0, 2), url, fs, {"v": 2})
    assert pq.read_table(url).num_rows == 2 and read_output_metadata(url, fs) == {"v": 2}
    assert os.listdir(tmp_path / "out") == ["00000.parquet"]


def test_an_output_named_as_long_as_a_file_name_may_be_is_written_through_a_temp_name_that_fits(tmp_path):
    """The temp file beside the target carried its whole name, 38 bytes more: a shard whose output name took 218
    bytes or more (a legal one) could never be written. The temp name now cuts the name it carries."""
    fs = fsspec.filesystem("file")
    url = str(tmp_path / "out" / ("ü" * 123 + "x.parquet"))  # 255 bytes
    write_parquet_atomic(_table(), url, fs, {"v": 1})
    assert os.listdir(tmp_path / "out") == [os.path.basename(url)] and read_output_metadata(url, fs) == {"v": 1}


def test_row_groups_hold_a_bounded_share_of_the_embeddings_whatever_the_shard_size(tmp_path, monkeypatch):
    """The writer builds a row group's list levels at once (as many bytes as its float32 values): a long shard is
    written in row groups of about ROW_GROUP_LIST_BYTES of embeddings each, and reads back the same, in order; a
    table without list values keeps one group."""
    import wdsembed.output as output

    monkeypatch.setattr(output, "ROW_GROUP_LIST_BYTES", 64 << 10)  # 64 KiB: 16 rows of 1,024 floats (plus offsets)
    fs = fsspec.filesystem("file")
    n, dim = 100, 1024
    values = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    table = pa.table({"key": [f"{i:06d}" for i in range(n)],
                      "image_embedding": pa.ListArray.from_arrays(
                          pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(values.reshape(-1)))})
    url = str(tmp_path / "00000.parquet")
    write_parquet_atomic(table, url, fs, {"v": 1})
    meta = pq.ParquetFile(url).metadata
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(rows) == n and len(rows) == 7 and max(rows) == 15  # 64 KiB / (4,096 value + 4 offset bytes a row)
    back = pq.read_table(url)
    assert back.column("key").to_pylist() == table.column("key").to_pylist()
    assert np.array_equal(np.stack(back.column("image_embedding").to_numpy(zero_copy_only=False)), values)
    assert read_output_metadata(url, fs) == {"v": 1}

    write_parquet_atomic(table.select(["key"]), url, fs, {"v": 2})
    assert pq.ParquetFile(url).metadata.num_row_groups == 1


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    url = str(tmp_path / "00000.parquet")

    def exploding_write_table(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", exploding_write_table)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(_table(), url, fs, {"a": 1})
    assert os.listdir(tmp_path) == []


def test_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    url = str(tmp_path / "00000.parquet")
    write_parquet_atomic(_table(), url, fs, {"run": 1})

    def exploding_write_table(table, where, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(pq, "write_table", exploding_write_table)
    with pytest.raises(RuntimeError):
        write_parquet_atomic(_table(), url, fs, {"run": 2})
    assert os.listdir(tmp_path) == ["00000.parquet"]
    assert read_output_metadata(url, fs) == {"run": 1}


def test_object_store_put_in_one_piece():
    fs = fsspec.filesystem("memory")
    url = "memory://bucket/out/00001.parquet"
    write_parquet_atomic(_table(), url, fs, {"x": 1})
    assert fs.ls("memory://bucket/out", detail=False) == ["/bucket/out/00001.parquet"]
    assert read_output_metadata(url, fs) == {"x": 1}
    with fs.open(url, "rb") as f:
        assert pq.read_table(f).num_rows == _table().num_rows


def test_metadata_of_missing_damaged_or_foreign_files(tmp_path):
    fs = fsspec.filesystem("file")
    assert read_output_metadata(str(tmp_path / "missing.parquet"), fs) is None
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 100)
    assert read_output_metadata(str(garbage), fs) is None
    url = str(tmp_path / "good.parquet")
    write_parquet_atomic(_table(), url, fs, {"ok": True})
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(open(url, "rb").read()[:-100])
    assert read_output_metadata(str(truncated), fs) is None
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert read_output_metadata(str(empty), fs) is None
    # A footer damaged at its start: pyarrow's bare OSError ("Couldn't deserialize thrift"), not an ArrowException.
    whole = open(url, "rb").read()
    footer_start = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")
    damaged = tmp_path / "damaged_footer.parquet"
    damaged.write_bytes(whole[:footer_start + 10] + b"\xff" * 20 + whole[footer_start + 30:])
    assert read_output_metadata(str(damaged), fs) is None
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    assert read_output_metadata(str(foreign), fs) is None


def test_manifest(tmp_path):
    fs = fsspec.filesystem("file")
    manifest = {"model": "resnet18", "shards": [{"shard": "00000", "rows": 7}], "totals": {"embedded": 3}}
    path = write_manifest(str(tmp_path), fs, manifest)
    assert path == str(tmp_path / "_manifest.json")
    assert os.listdir(tmp_path) == ["_manifest.json"]
    assert json.loads((tmp_path / "_manifest.json").read_text()) == manifest
    assert read_manifest(str(tmp_path), fs) == manifest
    assert read_manifest(str(tmp_path / "nowhere"), fs) is None


def test_the_names_wdsembed_writes_under_output_and_no_others():
    """What a run may clean up as its own under OUTPUT (outputclaim.abort_stale_uploads): the shards' tables, their
    kNN views and the manifest; not the claim, Prefect's results, temp names or a user's files."""
    from wdsembed.output import is_output_name

    for rel in ("00000.parquet", "train/00001.parquet", "_embeddings/00000.parquet",
                "_embeddings/train/00001.parquet", "_manifest.json"):
        assert is_output_name(rel), rel
    for rel in ("_claim.json", "_prefect_results/x.parquet", ".00000.parquet.tmp-" + "a" * 32, "backup/00000.tar",
                "_embeddings", "_embeddings/_x.parquet", "_other/00000.parquet", "train/_manifest.json", "a//b.parquet"):
        assert not is_output_name(rel), rel


# --------------------------------------------------------------------------------------------------- kNN view


def _view_config(out):
    from wdsembed.config import EmbedConfig

    return EmbedConfig(input="/nowhere/in", output=str(out))


def _shard_with_failures(stem_key: int) -> pa.Table:
    """6 rows: 2 failed downloads, 1 undecodable image, 3 embedded (keys offset by stem_key * 10)."""
    rows = _img2dataset_rows()
    rows = rows.set_column(0, "key", pa.array([f"{stem_key}{k}" for k in rows.column("key").to_pylist()]))
    keys = [f"{stem_key}000000", f"{stem_key}000003", f"{stem_key}000005"]
    return build_output_table(rows=rows, keys=keys, embeddings=np.stack([_emb(k) for k in keys]),
                              errors={f"{stem_key}000002": "decoder error"}, dim=DIM)


def test_embeddings_view_keeps_only_embedded_rows():
    from wdsembed.output import embeddings_view

    full = _shard_with_failures(1)
    assert full.num_rows == 6 and full.column("image_embedding").null_count == 3
    view = embeddings_view(full, id_column="key", embedding_column="image_embedding", shard="train/00001")
    assert view.column_names == ["key", "image_embedding", "shard"]
    assert view.column("key").to_pylist() == ["1000000", "1000003", "1000005"]
    assert view.column("image_embedding").null_count == 0
    assert view.column("image_embedding").to_pylist() == [_emb(k).tolist() for k in ("1000000", "1000003", "1000005")]
    assert view.column("shard").to_pylist() == ["train/00001"] * 3
    assert view.schema.field("image_embedding").metadata == {b"dim": str(DIM).encode()}
    # a shard where nothing was embedded: no rows, the same schema
    none = build_output_table(rows=_img2dataset_rows(), keys=[], embeddings=np.zeros((0, DIM), np.float32),
                              errors={}, dim=DIM)
    empty = embeddings_view(none, id_column="key", embedding_column="image_embedding", shard="x")
    assert empty.num_rows == 0 and empty.schema == view.schema
    # every row embedded: the view is the table's own columns, its embeddings not copied
    keys = [f"{i:07d}" for i in range(4)]
    whole = build_output_table(rows=None, keys=keys, embeddings=np.stack([_emb(k) for k in keys]), errors={}, dim=DIM)
    same = embeddings_view(whole, id_column="key", embedding_column="image_embedding", shard="y")
    assert same.column("key").to_pylist() == keys and same.schema == view.schema
    assert same.column("image_embedding").to_pylist() == [_emb(k).tolist() for k in keys]
    values = [t.column("image_embedding").chunk(0).values.buffers()[1].address for t in (whole, same)]
    assert values[0] == values[1]


def test_view_written_atomically_beside_the_outputs_and_out_of_dataset_readers(tmp_path):
    import pyarrow.dataset as ds

    from wdsembed.output import EMBEDDINGS_FOLDER, write_embeddings_view

    out = tmp_path / "out"
    config = _view_config(out)
    fs = fsspec.filesystem("file")
    for i, stem in enumerate(["00000", "sub/00000"]):
        full = _shard_with_failures(i + 1)
        assert write_embeddings_view(full, config, stem, cache_key="k") == 3
        write_parquet_atomic(full, str(out / f"{stem}.parquet"), fs, {"cache_key": "k"})
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "00000.parquet", f"{EMBEDDINGS_FOLDER}/00000.parquet", f"{EMBEDDINGS_FOLDER}/sub/00000.parquet",
        "sub/00000.parquet"]
    assert read_output_metadata(str(out / EMBEDDINGS_FOLDER / "sub" / "00000.parquet"), fs) == {
        "cache_key": "k", "shard": "sub/00000"}
    # reading OUTPUT as a dataset (pyarrow, pandas) sees the full tables only, never the view
    whole = ds.dataset(str(out), format="parquet").to_table()
    assert whole.num_rows == 12 and "embedding_error" in whole.column_names


@pytest.fixture
def knn_output(tmp_path):
    """An output folder as a run leaves it: two shards with failed rows (one in a subfolder), one shard where
    nothing was embedded."""
    from wdsembed.output import write_embeddings_view

    out = tmp_path / "out"
    config = _view_config(out)
    fs = fsspec.filesystem("file")
    fulls = {"00001": _shard_with_failures(1), "part/00002": _shard_with_failures(2),
             "00003": build_output_table(rows=_img2dataset_rows(), keys=[], embeddings=np.zeros((0, DIM), np.float32),
                                         errors={"000000": "decoder error"}, dim=DIM)}
    for stem, full in fulls.items():
        write_embeddings_view(full, config, stem)
        write_parquet_atomic(full, str(out / f"{stem}.parquet"), fs, {})
    return out, fulls


def test_embedding_reader_reads_the_view_of_shards_with_failed_rows(knn_output):
    """embedding-reader's parquet mode stacks the embedding column: the full tables (nulls) fail it, the view
    gives exactly the embedded rows' ids and vectors."""
    er = pytest.importorskip("embedding_reader")
    out, fulls = knn_output
    with pytest.raises(ValueError):  # what users hit before: "all input arrays must have the same shape"
        reader = er.EmbeddingReader(str(out / "00001.parquet"), file_format="parquet",
                                    embedding_column="image_embedding", meta_columns=["key"])
        list(reader(batch_size=100, show_progress=False))
    reader = er.EmbeddingReader(str(out / "_embeddings"), file_format="parquet", embedding_column="image_embedding",
                                meta_columns=["key", "shard"])
    assert reader.count == 6 and reader.dimension == DIM
    got_keys, got_vectors, shards_seen = [], [], []
    for vectors, meta in reader(batch_size=4, show_progress=False):
        got_vectors.append(vectors)
        got_keys += meta["key"].tolist()
        shards_seen += meta["shard"].tolist()
    want = {}
    for stem, full in fulls.items():
        for row in full.to_pylist():
            if row["image_embedding"] is not None:
                want[row["key"]] = (np.asarray(row["image_embedding"], np.float32), stem)
    assert sorted(got_keys) == sorted(want)
    vectors = np.concatenate(got_vectors)
    assert vectors.dtype == np.float32 and vectors.shape == (6, DIM)
    for key, vector, stem in zip(got_keys, vectors, shards_seen):
        assert np.array_equal(vector, want[key][0]) and stem == want[key][1]


def _tampered(view: pa.Table, how: str, config) -> pa.Table:
    """The view as read, changed in one way, its footer kept (same row count, same cache key)."""
    emb, key = config.embedding_column, config.id_column
    if how == "one value":  # one bit of one value of the last row
        vectors = view.column(emb).combine_chunks()
        values = np.asarray(vectors.values).copy()
        bits = values.view(f"u{values.itemsize}")
        bits[-1] ^= 1
        flat = pa.ListArray.from_arrays(vectors.offsets, pa.array(values, vectors.type.value_type))
        return view.set_column(1, view.schema.field(emb), flat)
    if how == "negative zero":  # equal as floats, not as the output's bits
        vectors = view.column(emb).combine_chunks()
        values = np.asarray(vectors.values).copy()
        assert values[0] == 0 and not np.signbit(values[0])
        values[0] = -values[0]
        flat = pa.ListArray.from_arrays(vectors.offsets, pa.array(values, vectors.type.value_type))
        return view.set_column(1, view.schema.field(emb), flat)
    if how == "reordered":
        return view.take(pa.array(list(range(1, view.num_rows)) + [0]))
    if how == "other key":
        keys = view.column(key).to_pylist()
        keys[1] = keys[1] + 7 if isinstance(keys[1], int) else keys[1] + "x"
        return view.set_column(0, view.schema.field(key), pa.array(keys, view.schema.field(key).type))
    if how == "other shard":
        return view.set_column(2, view.schema.field("shard"), pa.array(["00009"] * view.num_rows))
    if how == "float32 values":
        return view.set_column(1, pa.field(emb, pa.list_(pa.float32()), metadata=view.schema.field(emb).metadata),
                               view.column(emb).cast(pa.list_(pa.float32())))
    if how == "extra column":
        return view.append_column("extra", pa.array([1] * view.num_rows))
    raise AssertionError(how)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("id_type", ["string", "int64", "custom name"])
def test_validate_output_compares_the_view_with_the_outputs_embedded_rows(tmp_path, dtype, id_type):
    """The view must be exactly the output's embedded rows, in its order: the same ids, the same embeddings bit for
    bit, the stem in `shard`, the same columns and types. A view changed in any one way, with its row count and its
    footer (cache key) kept, fails validate_output, which names the view and the first row that differs."""
    from wdsembed.output import write_embeddings_view
    from wdsembed.validate import validate_output

    out = tmp_path / "out"
    key = "id" if id_type == "custom name" else "key"
    config = _view_config(out).model_copy(update={"normalize_embeddings": False, "embedding_dtype": dtype,
                                                  "id_column": key})
    rows = _img2dataset_rows(pa.int64() if id_type == "int64" else pa.string()).rename_columns(
        [key, "url", "caption", "status", "error_message", "width"])
    keys = ["000000", "000003", "000005"]
    embeddings = np.stack([_emb(k) for k in keys])
    embeddings[0, 0] = 0.0  # a zero, to turn into -0.0
    full = build_output_table(rows=rows, keys=keys, embeddings=embeddings, errors={"000002": "decoder error"},
                              dim=DIM, id_column=key, embedding_column=config.embedding_column,
                              embedding_dtype=dtype)
    fs = fsspec.filesystem("file")
    write_embeddings_view(full, config, "00001", cache_key="k")
    write_parquet_atomic(full, str(out / "00001.parquet"), fs, {"cache_key": "k"})
    url, view_path = str(out / "00001.parquet"), out / "_embeddings" / "00001.parquet"
    assert validate_output(config, url, dim=DIM, expected_rows=6, expected_embedded=3).problems == []
    view = pq.read_table(view_path)
    shown = "kNN view _embeddings/00001.parquet"
    first = {"string": "'000003'", "int64": "3", "custom name": "'000003'"}[id_type]
    expected = {
        "one value": f"{shown} row 2 ({key} ", "negative zero": f"{shown} row 0 ({key} ",
        "reordered": f"{shown} row 0 has {key} {first}", "other key": f"{shown} row 1 has {key} ",
        "other shard": f"{shown} row 0 ({key} ", "float32 values": f"{shown} has the columns",
        "extra column": f"{shown} has the columns"}
    if dtype == "float32":
        del expected["float32 values"]
    for how, start in expected.items():
        pq.write_table(_tampered(view, how, config).replace_schema_metadata(view.schema.metadata), view_path)
        assert pq.read_metadata(view_path).num_rows == 3
        check = validate_output(config, url, dim=DIM, expected_rows=6, expected_embedded=3)
        assert not check.ok and len(check.problems) == 1, (how, check.problems)
        assert check.problems[0].startswith(start), (how, check.problems)
    pq.write_table(view, view_path)  # as written: sound again
    assert validate_output(config, url, dim=DIM).ok


def test_other_filesystems_write_a_temp_name_then_move(tmp_path, monkeypatch):
    """Neither local nor an object store (here fsspec's DirFileSystem, protocol "dir"): a temp name through the
    filesystem, then fs.mv; a failed write leaves the previous file and no temp file."""
    from fsspec.implementations.dirfs import DirFileSystem

    from wdsembed import storage

    fs = DirFileSystem(str(tmp_path), fs=fsspec.filesystem("file"))
    assert not storage.is_local(fs)
    moves = []
    real_mv = fs.mv
    monkeypatch.setattr(fs, "mv", lambda a, b, **kw: (moves.append((a, b)), real_mv(a, b, **kw))[1])
    write_manifest("", fs, {"run": 1})
    assert os.listdir(tmp_path) == ["_manifest.json"] and read_manifest("", fs) == {"run": 1}
    assert len(moves) == 1 and moves[0][1] == "/_manifest.json" and ".tmp-" in moves[0][0]

    def half_written(f):
        f.write(b"{half")
        raise OSError("connection lost")

    with pytest.raises(OSError, match="connection lost"):
        storage.write_atomic(fs, "_manifest.json", half_written)
    assert os.listdir(tmp_path) == ["_manifest.json"] and read_manifest("", fs) == {"run": 1}


@pytest.mark.parametrize("where", ["file", "memory"])
def test_what_must_exist_first_finishes_before_the_file_appears(tmp_path, where):
    """before_commit runs after the content is written and before the file appears; where it fails, the file
    keeps what it held, and no temp file is left."""
    fs = fsspec.filesystem(where)
    folder = str(tmp_path) if where == "file" else "memory://bucket/commit"
    url = f"{folder}/00000.parquet"
    write_parquet_atomic(_table(), url, fs, {"run": 1})
    seen = []
    write_parquet_atomic(_table().slice(0, 2), url, fs, {"run": 2},
                         before_commit=lambda: seen.append(read_output_metadata(url, fs)))
    assert seen == [{"run": 1}] and read_output_metadata(url, fs) == {"run": 2}

    def view_failed():
        raise OSError("the view could not be written")

    with pytest.raises(OSError, match="view"):
        write_parquet_atomic(_table(), url, fs, {"run": 3}, before_commit=view_failed)
    assert read_output_metadata(url, fs) == {"run": 2}
    assert [posixpath.basename(p) for p in fs.ls(folder, detail=False)] == ["00000.parquet"]

    # The view's own full disk, already explained where it happened, comes out as it is: not explained twice, and
    # not as this file's.
    explained = OSError(errno.ENOSPC, "No space left on device: cannot write VIEW (nothing partial is left)")

    def view_disk_full():
        raise explained

    with pytest.raises(OSError) as raised:
        write_parquet_atomic(_table(), url, fs, {"run": 4}, before_commit=view_disk_full)
    assert raised.value is explained and str(raised.value).count("cannot write") == 1
    assert read_output_metadata(url, fs) == {"run": 2}
    assert [posixpath.basename(p) for p in fs.ls(folder, detail=False)] == ["00000.parquet"]


def test_a_shard_whose_view_cannot_be_written_is_not_finished(tmp_path):
    """The shard's table marks it finished and is written beside its kNN view, in parallel: it must never appear
    without the view."""
    from wdsembed.config import EmbedConfig
    from wdsembed.output import EMBEDDINGS_FOLDER, embeddings_view_url
    from wdsembed.shard import ShardPlan, ShardResult, write_output

    out = tmp_path / "out"
    out.mkdir()
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(out))
    plan = ShardPlan(shard=str(tmp_path / "in" / "00001.tar"), stem="00001", fingerprint="f", rows=None,
                     index=None, output=str(out / "00001.parquet"), expected_samples=None)
    full = _shard_with_failures(1)
    result = ShardResult(shard=plan.shard, stem="00001", output=plan.output, rows=6, embedded=3, dim=DIM)
    (out / EMBEDDINGS_FOLDER).write_text("a file where the views' folder should be")
    with pytest.raises(OSError):
        write_output(config, plan, full, "k", result)
    assert sorted(os.listdir(out)) == [EMBEDDINGS_FOLDER]  # no table, no temp file
    (out / EMBEDDINGS_FOLDER).unlink()
    write_output(config, plan, full, "k", result)
    view = pq.read_table(embeddings_view_url(str(out), "00001"))
    assert view.column("key").to_pylist() == ["1000000", "1000003", "1000005"]
    assert pq.read_table(out / "00001.parquet").num_rows == 6


def test_an_output_folder_this_user_may_not_write_is_one_cause_for_every_shard(tmp_path):
    """OUTPUT made read-only mid-run: each shard's failure named the temp file it could not create
    ('.00002.parquet.tmp-e1360694...'), random in every shard's words, so the summary and the run's closing message
    told one cause as one per shard (at 2,000 shards: 5 of them, then '... and 1,995 more cause(s)'). Now the
    reason names the file the shard writes, and the shards' reasons are one cause. Written in a process without
    root's permission override, as any user's."""
    import json
    import subprocess
    import sys

    from conftest import CANNOT_DROP_OVERRIDE, without_file_permission_override
    from wdsembed.report import failure_causes

    out = tmp_path / "out"
    out.mkdir()
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_output import _shard_with_failures
from wdsembed.config import EmbedConfig
from wdsembed.shard import ShardPlan, ShardResult, write_output
config = EmbedConfig(input={str(tmp_path / "in")!r}, output={str(out)!r}, normalize_embeddings=False)
reasons = {{}}
for stem in ("00001", "00002"):
    plan = ShardPlan(shard=f"{tmp_path}/in/{{stem}}.tar", stem=stem, fingerprint="f", rows=None, index=None,
                     output=f"{out}/{{stem}}.parquet", expected_samples=None)
    result = ShardResult(shard=plan.shard, stem=stem, output=plan.output, rows=6, embedded=3, dim=8)
    try:
        write_output(config, plan, _shard_with_failures(int(stem)), "k", result)
    except OSError as exc:
        reasons[stem] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps(reasons))
"""
    os.chmod(out, 0o555)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parent.parent,
                              preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    finally:
        os.chmod(out, 0o755)
    if done.returncode == CANNOT_DROP_OVERRIDE:
        pytest.skip("cannot drop root's permission override here")
    assert done.returncode == 0, done.stderr[-3000:]
    reasons = json.loads(done.stdout)
    assert reasons["00002"] == f"PermissionError: cannot write {out}/00002.parquet: Permission denied", reasons
    [cause] = failure_causes(reasons)
    assert cause.shards == ["00001", "00002"]
    assert sorted(os.listdir(out)) == []


def test_a_table_that_fails_validation_appears_nowhere(tmp_path):
    """The validation runs while the table and its kNN view are written; where it fails, neither file appears, no
    temp file is left, and its error is what is raised. A valid table written the same way appears with its view."""
    import time

    from wdsembed.config import EmbedConfig
    from wdsembed.output import EMBEDDINGS_FOLDER, embeddings_view_url
    from wdsembed.shard import ShardPlan, ShardResult, write_output
    from wdsembed.validate import validate_table

    out = tmp_path / "out"
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(out))  # normalizing: unit norms expected
    plan = ShardPlan(shard=str(tmp_path / "in" / "00001.tar"), stem="00001", fingerprint="f", rows=None,
                     index=None, output=str(out / "00001.parquet"), expected_samples=None)
    full = _shard_with_failures(1)
    result = ShardResult(shard=plan.shard, stem="00001", output=plan.output, rows=6, embedded=3, dim=DIM)
    problems = validate_table(config, full, dim=DIM)
    assert problems and "L2 norm" in problems[0]  # the test rows' embeddings are not unit vectors

    def temp_files() -> list[str]:
        return sorted(p.name for p in out.rglob(".*.tmp-*"))

    seen = {}

    def check() -> None:
        deadline = time.monotonic() + 60
        while len(temp_files()) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        seen["writing"] = temp_files()  # both files begun, neither in place: the check runs beside them
        raise ValueError("shard 00001: output not written, it fails validation: " + "; ".join(problems))

    with pytest.raises(ValueError, match="fails validation: L2 norm"):
        write_output(config, plan, full, "k", result, check)
    assert [name.split(".tmp-")[0] for name in seen["writing"]] == [".00001.parquet"] * 2  # the table's, the view's
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [EMBEDDINGS_FOLDER]  # nothing, no temp files
    write_output(config, plan, full, "k", result, lambda: None)
    assert pq.read_table(out / "00001.parquet").num_rows == 6
    assert pq.read_table(embeddings_view_url(str(out), "00001")).num_rows == 3


@pytest.mark.parametrize("where", ["file", "memory"])
def test_writers_get_an_arrow_file_that_needs_no_gil(tmp_path, where):
    """On local disk, and in the temp file behind an object store's single PUT, a writer function gets Arrow's own
    file: pyarrow then writes a table without taking the GIL once per page (bench/writes.py measures what that
    costs beside busy threads). The bytes and the footer metadata arrive whole."""
    from wdsembed import storage

    fs = fsspec.filesystem(where)
    url = str(tmp_path / "t.parquet") if where == "file" else "/bucket/t.parquet"
    given = []

    def write(f):
        given.append(type(f))
        pq.write_table(_table(), f)

    storage.write_atomic(fs, url, write)
    assert given and all(issubclass(t, pa.NativeFile) for t in given), given
    with fs.open(url, "rb") as f:
        assert pq.read_table(f).equals(_table())
    write_parquet_atomic(_table(), url, fs, {"run": 5})
    assert read_output_metadata(url, fs) == {"run": 5}


def test_two_writers_of_one_shard_leave_its_table_beside_its_own_kNN_view(tmp_path, monkeypatch):
    """Two writers of one shard's output at once, with other settings (two threads of one worker process here,
    sharing its Worker; runs cannot, since each claims its output: wdsembed.outputclaim). Each commits its kNN
    view, then its table, two files one after the other: where writer A's table lands after writer B's view and
    table (A paused between its two commits; on S3 the window is the whole table's PUT), OUTPUT held A's table
    beside B's view, both writers having succeeded, and validation said the view 'was made by another run'. Now the
    writer whose table is in place finds another's view beside it and writes its own again.

    The pause is put at the project's own commit hook (faults.maybe_inject(stem, "commit"), between the view's
    commit and the table's); nothing else is changed."""
    pytest.importorskip("nvidia.dali")
    import threading

    from conftest import TINY_MODEL
    from wdsembed import faults, shard
    from wdsembed.config import EmbedConfig
    from wdsembed.plan import plan_run
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard
    from wdsembed.validate import validate_output

    shards = tmp_path / "in"
    write_shard(shards, "00000", [ShardSample(encode_image(make_image(32, 24, seed=i), "bmp"), ext="bmp")
                                  for i in range(3)])
    out = tmp_path / "out"
    common = dict(input=str(shards), output=str(out), model_name=TINY_MODEL, pretrained=False, batch_size=4,
                  num_threads_per_worker=1, device="cpu")
    config_a = EmbedConfig(**common)
    config_b = EmbedConfig(**common, embedding_dtype="float16")
    (plan_a,), _ = plan_run(config_a)
    (plan_b,), _ = plan_run(config_b)
    b_done = threading.Event()
    real = faults.maybe_inject

    def paused_commit(stem, where="start"):
        if where == "commit" and threading.current_thread().name == "run-A":
            assert b_done.wait(120)
        return real(stem, where)

    monkeypatch.setattr(faults, "maybe_inject", paused_commit)
    results, errors = {}, {}

    def run(name, config, plan):
        try:
            results[name] = shard.process_shard(config, plan)
        except BaseException as exc:  # noqa: BLE001
            errors[name] = exc
        finally:
            if name == "B":
                b_done.set()

    threads = [threading.Thread(target=run, args=("A", config_a, plan_a), name="run-A"),
               threading.Thread(target=run, args=("B", config_b, plan_b), name="run-B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors and set(results) == {"A", "B"}  # both writers succeed
    fs = fsspec.filesystem("file")
    assert read_output_metadata(str(out / "00000.parquet"), fs)["cache_key"] == results["A"].cache_key  # A's, last
    check = validate_output(config_a, str(out / "00000.parquet"), dim=results["A"].dim)
    assert check.ok, check.problems  # and its own view beside it


def test_a_dictionary_encoded_id_column_is_written_as_its_values():
    """A parquet whose id column is dictionary-encoded (pandas' category, some exporters' strings): its ids matched
    their samples, but the output and its kNN view kept the dictionary type, beside plain string (or integer) keys
    of the run's other outputs: a merged read of OUTPUT failed ('incompatible types: dictionary<values=string,
    ...> vs string'). The ids are now written as their values, each on its own row."""
    from wdsembed.output import embeddings_view

    for values, ids, appended in ((pa.string(), ["000001", "000002", None, "000003"], "000009"),
                                  (pa.int64(), [1, 2, None, 3], 9)):
        rows = pa.table({"key": pa.array(ids, type=values).dictionary_encode(), "n": [10, 20, 30, 40]})
        keys = ["000003", "000001", "000009"]
        t = build_output_table(rows=rows, keys=keys, embeddings=np.stack([_emb(k) for k in keys]), errors={},
                               dim=DIM)
        assert t.schema.field("key").type == values
        assert t.column("key").to_pylist() == ids + [appended]
        assert t.column("n").to_pylist() == [10, 20, 30, 40, None]
        emb = t.column("image_embedding").to_pylist()
        assert [e == _emb(k).tolist() if e else None for e, k in zip(emb, ["000001", "", "", "000003", "000009"])] \
            == [True, None, None, True, True]
        view = embeddings_view(t, id_column="key", embedding_column="image_embedding", shard="00000")
        assert view.schema.field("key").type == values


def test_pandas_metadata_stays_where_pandas_can_read_the_new_columns_beside_it():
    """The output keeps the parquet's pandas metadata (its dtypes and index come back from pd.read_parquet), with
    rows appended after it; where the DataFrame's column names were integers or several levels, pandas would fail
    to read `image_embedding` beside it (literal_eval, int('image_embedding')), so there it is dropped."""
    pd = pytest.importorskip("pandas")
    named = pd.DataFrame({"key": ["000001", "000002"], "n": pd.array([7, None], dtype="Int64")},
                         index=pd.Index(["a", "b"], name="rowid"))
    numbered = pd.DataFrame({0: ["000001", "000002"], 1: [1.0, 2.0]})
    levels = pd.DataFrame({("key", ""): ["000001", "000002"], ("n", "x"): [1, 2]})
    keys = ["000002", "000009"]
    for frame, id_name, kept in ((named, "key", True), (numbered, "0", False), (levels, "('key', '')", False)):
        rows = pa.Table.from_pandas(frame)
        fields = [f.with_name("key") if f.name == id_name else f for f in rows.schema]
        rows = pa.Table.from_arrays(rows.columns, schema=pa.schema(fields, metadata=rows.schema.metadata))
        t = build_output_table(rows=rows, keys=keys, embeddings=np.stack([_emb(k) for k in keys]), errors={},
                               dim=DIM)
        assert (b"pandas" in (t.schema.metadata or {})) == kept
        df = t.to_pandas()  # reads either way
        assert len(df) == 3 and df.image_embedding.iloc[1].tolist() == _emb("000002").tolist()
    df = build_output_table(rows=pa.Table.from_pandas(named), keys=keys, embeddings=np.stack([_emb(k) for k in keys]),
                            errors={}, dim=DIM).to_pandas()
    assert df.index.name == "rowid" and df.index.tolist() == ["a", "b", None]
    assert str(df.n.dtype) == "Int64" and df.n.tolist()[:2] == [7, pd.NA]


@pytest.mark.parametrize("status", [
    pa.array([200, 404, 200], pa.int64()),  # a crawler's HTTP code
    pa.array([True, False, None]),
    pa.array([{"code": 200}, {"code": 404}, None]),
    pa.array([["ok"], ["gone"], None]),
])
def test_a_status_column_of_other_than_strings_is_no_img2dataset_status(status):
    """img2dataset's `status` is a string ('success', 'failed_to_download', ...). A parquet of another source may
    have its own column of that name: one of structs or lists (or an `error_message` of them) failed the shard
    after it was embedded ("ArrowNotImplementedError: Unsupported cast from struct<code: int64> to utf8"), and
    one of integers or booleans gave a row the tar lacks the reason '200' or 'false'. Such a column is not
    img2dataset's: those rows are 'not in tar', and the column is kept as it is."""
    rows = pa.table({"key": ["a", "b", "c"], "status": status})
    t = build_output_table(rows=rows, keys=["a"], embeddings=np.stack([_emb("1")]), errors={}, dim=DIM)
    assert t.column("embedding_error").to_pylist() == [None, NOT_IN_TAR, NOT_IN_TAR]
    assert t.column("status").equals(rows.column("status"))


def test_an_error_message_column_of_other_than_strings_leaves_the_status_as_the_reason():
    rows = pa.table({"key": ["a", "b", "c"], "status": ["success", "failed_to_download", "success"],
                     "error_message": pa.array([None, [{"code": 404}], []])})
    t = build_output_table(rows=rows, keys=["a"], embeddings=np.stack([_emb("1")]), errors={}, dim=DIM)
    assert t.column("embedding_error").to_pylist() == [None, "failed_to_download", NOT_IN_TAR]
    # a dictionary of strings (pandas' category) is img2dataset's column as any string one
    rows = pa.table({"key": ["a", "b"], "status": pa.array(["success", "failed_to_resize"]).dictionary_encode(),
                     "error_message": pa.array([None, "too small"]).dictionary_encode()})
    t = build_output_table(rows=rows, keys=[], embeddings=np.zeros((0, DIM), np.float32), errors={}, dim=DIM)
    assert t.column("embedding_error").to_pylist() == [NOT_IN_TAR, "too small"]
