"""The output schema, the key join onto a shard's rows, atomic parquet writes and the manifest.

One output parquet per shard: every row of the shard's img2dataset parquet (all its columns, its row order), then
one row per tar sample the parquet lacks, plus two columns:

* the embedding column, ``list<float32>`` holding exactly ``dim`` values, or null where the row has no embedding;
* the error column, a nullable string saying why the embedding is null (null where there is an embedding).

Beside it, a kNN-ready view of the same shard, ``OUTPUT/_embeddings/<stem>.parquet``: only the rows that have an
embedding (id, embedding, shard), which embedding-reader and autofaiss read as they are (they stack the embedding
column and fail on a null). Nothing is lost by it: every row, with its reason, stays in the full table.

A variable-size ``list<float32>`` (not ``fixed_size_list``) because that is what parquet stores anyway (LIST) and what
pandas, DuckDB, Polars, Spark and Hugging Face datasets all read back as the same type; the dimension is recorded in
the field's metadata (``dim``) and in the footer metadata instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wdsembed import storage
from wdsembed.config import option

if TYPE_CHECKING:
    from wdsembed.config import EmbedConfig

# img2dataset's parquet columns.
STATUS_COLUMN = "status"
ERROR_MESSAGE_COLUMN = "error_message"
SUCCESS = "success"

NOT_IN_TAR = "not in tar"
# Part of every cache key: bumped whenever a change alters the tables written (columns, types, values, footer). Not
# for a footer entry that is only read where present (cache_key_parts: outputs without it are finished all the same).
OUTPUT_FORMAT_VERSION = 1
FOOTER_KEY = b"wdsembed"  # the parquet footer key-value entry that holds our JSON metadata
MANIFEST_NAME = "_manifest.json"
# OUTPUT/_embeddings/<stem>.parquet: the embedded rows only, for kNN tools (see embeddings_view). The leading "_"
# keeps dataset readers of OUTPUT (pyarrow, pandas, Spark) out of it, as they skip "_" and "." paths.
EMBEDDINGS_FOLDER = "_embeddings"
SHARD_COLUMN = "shard"  # in the view: the shard's stem, i.e. which OUTPUT/<stem>.parquet the row comes from


def view_shard_column(id_column: str, embedding_column: str) -> str:
    """The name of the view's stem column: `shard`, with `_` appended while the id or embedding column has that
    name (`--id-column shard` gives `shard_`), so that the view always holds the id and the stem."""
    name = SHARD_COLUMN
    while name in (id_column, embedding_column):
        name += "_"
    return name


# --------------------------------------------------------------------------------------------------- key join


# The types `embedding_dtype` names: NumPy's and Arrow's.
EMBEDDING_TYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def _embedding_array(embeddings: np.ndarray, src: np.ndarray, dim: int, dtype: str = "float32") -> pa.ListArray:
    """Output row i gets embeddings[src[i]], or null where src[i] < 0. Vectorised: one gather, no per-row Python,
    and no gather at all where the embedded rows come in the embeddings' own order (the usual img2dataset shard)."""
    np_type, arrow_type = EMBEDDING_TYPES[dtype]
    valid = src >= 0
    rows = src[valid]
    if len(rows) == len(embeddings) and np.array_equal(rows, np.arange(len(rows))):
        values = np.ascontiguousarray(embeddings, dtype=np_type).reshape(-1)  # rows in the tar's order: no gather
    else:
        values = np.ascontiguousarray(embeddings[rows], dtype=np_type).reshape(-1)
    if values.size >= 2**31:
        raise ValueError(f"{values.size} embedding values exceed one parquet list column chunk; split the shard")
    offsets = np.zeros(len(src) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.where(valid, dim, 0), dtype=np.int64)  # fits: checked above
    return pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), pa.array(values, type=arrow_type), mask=pa.array(~valid)
    )


def id_column_problem(id_column: str, parquet: str, schema: pa.Schema) -> Optional[str]:
    """What keeps a shard's parquet from the key join, said naming the file, or None: no id column, or one of a type
    the join refuses. Asked before anything is embedded (the pre-flight of the first shard, each shard as it
    starts), so that no shard is embedded and then thrown away, and by the join itself."""
    if id_column not in schema.names:
        return (f"id column {id_column!r} is not in {parquet} (columns: {', '.join(schema.names)}): pass "
                f"{option('id_column')} one of them (the key of each row), or leave it out for 'key'")
    t = schema.field(id_column).type
    if _joins(t) or holds_no_ids(id_column, schema):
        return None
    said = f"id column {id_column!r} of {parquet} has type {t}; the key join matches a string or integer column"
    if pa.types.is_floating(_id_value_type(t)):
        # Not joined by value, though whole floats could be: past 2**53 a float is no longer the key it was, and a
        # float id column would give this shard's output a key type that the others' outputs do not have.
        return (f"{said}. Float keys come from a broken export (pandas writes an integer column that holds a null "
                "as float64; img2dataset's keys are strings such as '000010012'): write the column as strings, or "
                "integers, and run again")
    return f"{said}: pass {option('id_column')} the column that holds each row's key"


def column_clash_problem(parquet: str, schema: pa.Schema, embedding_column: str, error_column: str) -> Optional[str]:
    """Where a shard's parquet already has a column named like the embedding or error column, what to pass, naming
    the file; else None. Every column of the parquet is kept: one of the same name would be replaced, its data lost
    from the output (`--embedding-column caption` would replace the captions). Asked before anything is embedded
    (the pre-flight of the first shard, each shard as it starts), and by the join itself."""
    clash = [c for c in (embedding_column, error_column) if c in schema.names]
    if not clash:
        return None
    flags = " and ".join(f"{option(name)} another name" for name, c in (("embedding_column", embedding_column),
                                                                        ("error_column", error_column)) if c in clash)
    return (f"{parquet} already has column(s) {', '.join(map(repr, clash))}, which the output would replace with "
            f"its own: pass {flags}, so that every column of the parquet is kept")


def unmatched_keys_problem(ids: pa.ChunkedArray, keys: Sequence[str], id_column: str, parquet: str,
                           keys_said: str, *, advice: Optional[str] = None) -> Optional[str]:
    """Where a shard's parquet has rows and its tar has samples but not one sample key is an id of the parquet
    (`ids`, its id column), what to check, naming the parquet and a few values of each side; else None. Many
    parquet rows without a sample are usual (img2dataset's failed downloads), but not one match is a wrong
    --id-column, or a parquet of another tar: joined, every row would be "not in tar" and every sample a row of
    its own with the other columns null. `keys_said`: which keys these are ("the tar's 6 sample keys");
    `advice`: what to do, where the caller knows better than "check that"."""
    if not len(ids) or not len(keys):
        return None
    canon = pa.array(_canonical_tar_keys(keys, ids.type), type=pa.string())
    row_ids = _id_strings(ids).combine_chunks()
    if pc.any(pc.is_in(canon, value_set=row_ids)).as_py():
        return None
    values = pc.unique(row_ids.drop_null())
    shown = ", ".join(repr(v) for v in values.slice(0, 2).to_pylist()) if len(values) else "all null"
    advice = advice or (f": check that {option('id_column')} names the column holding each sample's key "
                        "(img2dataset's is 'key') and that this parquet is the tar's own")
    return (f"not one of {keys_said} is in id column {id_column!r} of {parquet} (keys such as "
            f"{', '.join(repr(k) for k in keys[:2])}; {id_column!r} holds {shown}){advice}")


def columns_holding_keys(table: pa.Table, keys: Sequence[str], id_column: str) -> list[str]:
    """The columns of a shard's parquet rows, but `id_column`, that the key join could take and that hold at least
    one of the tar's sample `keys`, in the parquet's order."""
    return [name for name in table.column_names
            if name != id_column and _joins(table.schema.field(name).type)
            and unmatched_keys_problem(table.column(name), keys, name, "", "") is None]


def holds_no_ids(id_column: str, schema: pa.Schema) -> bool:
    """Whether a parquet's id column is of Arrow's `null` type, which holds no value: pandas writes an empty
    frame's columns so (an emptied shard's). It gives the run no id type; its rows (if any) have no key, and the
    tar's samples take the run's id type, as in a shard without a parquet (join_embeddings)."""
    return id_column in schema.names and pa.types.is_null(schema.field(id_column).type)


def _id_value_type(t: pa.DataType) -> pa.DataType:
    return plain_type(t.value_type if pa.types.is_dictionary(t) else t)


def plain_type(t: pa.DataType) -> pa.DataType:
    """`t` with Arrow's view types, also inside a list, struct, map or dictionary, as their plain types:
    string_view as string, binary_view as binary. pyarrow has no take or filter for those two, which the key join
    uses; a parquet holds them where its writer recorded them (polars 1.38.0 wrote its strings as string_view)."""
    if pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_struct(t):
        return pa.struct([_plain_field(t.field(i)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(_plain_field(t.key_field), _plain_field(t.item_field), t.keys_sorted)
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, plain_type(t.value_type), t.ordered)
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_plain_field(t.value_field), t.list_size)
    for is_kind, make in ((pa.types.is_list, pa.list_), (pa.types.is_large_list, pa.large_list),
                          (pa.types.is_list_view, pa.list_view), (pa.types.is_large_list_view, pa.large_list_view)):
        if is_kind(t):
            return make(_plain_field(t.value_field))
    return t


def _plain_field(f: pa.Field) -> pa.Field:
    return f.with_type(plain_type(f.type))


def without_view_types(table: pa.Table) -> pa.Table:
    """`table` with every column of a view type (plain_type) cast to its plain type, values, field metadata and
    schema metadata unchanged; the same table where it has none."""
    schema = pa.schema([_plain_field(f) for f in table.schema], metadata=table.schema.metadata)
    return table if schema.equals(table.schema) else table.cast(schema)


def id_type_name(id_column: str, schema: pa.Schema) -> Optional[str]:
    """The type of a parquet's id column as the outputs hold it ("int64", "string"; a dictionary's values), or None
    where it has none the key join takes (id_column_problem says why)."""
    if id_column not in schema.names or not _joins(schema.field(id_column).type):
        return None
    return str(_id_value_type(schema.field(id_column).type))


def _joins(t: pa.DataType) -> bool:
    """Whether the key join takes an id column of type `t`: strings, integers, or a dictionary of either."""
    t = _id_value_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def as_stored(embeddings: np.ndarray, keys: Sequence[str], dtype: str, shard: str) -> np.ndarray:
    """The embeddings in the type they are stored in (`embedding_dtype`), so that the checks after it (the fidelity
    check, validation) see what is written. A value beyond float16's range would be stored as infinite: refused,
    naming the shard and the key that holds it."""
    np_type = EMBEDDING_TYPES[dtype][0]
    if np_type is np.float32 or not len(embeddings):
        return np.asarray(embeddings, dtype=np_type)
    limit = float(np.finfo(np_type).max)
    peaks = np.max(np.abs(embeddings), axis=1)
    worst = int(np.argmax(peaks))
    if peaks[worst] > limit:  # NaN compares false: left to validation, which names it as such
        raise ValueError(f"shard {shard}: key {keys[worst]!r} has an embedding value of {float(peaks[worst]):.6g}, "
                         f"beyond {dtype}'s largest ({limit:g}): store these embeddings as float32, or normalize them")
    return np.asarray(embeddings, dtype=np_type)


def _img2dataset_text(table: pa.Table, name: str) -> Optional[pa.Array]:
    """img2dataset's `status` or `error_message` column of a shard's parquet, as strings; None where it has none,
    or one of other values (a crawler's HTTP code, a struct): another source's column of that name, no reason."""
    if name not in table.column_names:
        return None
    column = table.column(name)
    t = _id_value_type(column.type)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return None
    return column.combine_chunks().cast(pa.string())


def _canonical_tar_keys(keys: Sequence[str], id_type: pa.DataType) -> list[str]:
    """Tar keys as the string form of the parquet's id values: for an integer id column `000123` matches 123."""
    if not pa.types.is_integer(id_type):
        return list(keys)
    out = []
    for k in keys:
        try:
            out.append(str(int(k)))
        except ValueError:
            out.append(k)  # matches nothing in an integer column; see the appended-rows rule below
    return out


def _id_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An id column the join takes (id_column_problem), as strings."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.cast(pa.string())


def _ids_decoded(table: pa.Table, id_column: str) -> pa.Table:
    """The table with a dictionary-encoded id column as its values: every output and kNN view then has the plain
    id type that shards without a parquet, or with a plain one, have (a merged read refuses the two types side by
    side), and an integer dictionary joins by value."""
    i = table.schema.get_field_index(id_column)
    f = table.schema.field(i)
    if not pa.types.is_dictionary(f.type):
        return table
    return table.set_column(i, f.with_type(f.type.value_type), table.column(i).cast(f.type.value_type))


_PICKLED_EXTENSION = b"arrow.py_extension_type"


def _without_pickled_types(table: pa.Table) -> pa.Table:
    """Input parquet is data: never carry a pickled extension-type payload from it into our outputs."""
    fields, changed = [], False
    for f in table.schema:
        meta = f.metadata or {}
        if meta.get(b"ARROW:extension:name") == _PICKLED_EXTENSION:
            meta = {k: v for k, v in meta.items() if not k.startswith(b"ARROW:extension:")}
            f = f.with_metadata(meta) if meta else f.remove_metadata()
            changed = True
        fields.append(f)
    if not changed:
        return table
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields, metadata=table.schema.metadata))


def _pandas_metadata_fits(raw: Optional[bytes]) -> bool:
    """Whether a parquet's pandas metadata can stay on its output, whose two new columns it does not list: pandas
    then reads back its dtypes (nullable Int64, boolean, string) and index, and the new columns as it would without
    it (a RangeIndex of other length than the rows, after appended ones, falls back to the default one). Not where
    the DataFrame's column names were other than one level of strings: pandas would parse `image_embedding` as a
    tuple or an integer name and fail."""
    if raw is None:
        return False
    try:
        levels = json.loads(raw).get("column_indexes") or []
    except (ValueError, AttributeError):
        return False
    return len(levels) <= 1 and all(isinstance(c, dict) and c.get("pandas_type") == "unicode" for c in levels)


def _nullable_where_null(table: pa.Table) -> pa.Table:
    """`table` with each field declared non-nullable that holds a null declared nullable: a parquet's `required`
    column (Spark writes one for a column it knows has no null) is null on the rows appended for samples the parquet
    lacks, and parquet's writer refuses a null in a required column (the whole shard would fail). Its type, values
    and metadata stay; the same table where no such field holds a null."""
    relaxed = [i for i, f in enumerate(table.schema) if not f.nullable and table.column(i).null_count]
    if not relaxed:
        return table
    fields = [f.with_nullable(True) if i in relaxed else f for i, f in enumerate(table.schema)]
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields, metadata=table.schema.metadata))


@dataclass
class JoinedOutput:
    """A shard's output table (join_embeddings) and what the join did with the embedded samples."""

    table: pa.Table
    embedded: int  # embedded samples whose embedding is in the table (on one row, or on each row of a repeated key)
    embedded_rows: int  # rows with an embedding: `embedded` plus the parquet's repeats of embedded keys
    errors: dict[str, str]  # embedded samples the join gave an error instead (no usable id): key -> reason


def build_output_table(**kwargs: Any) -> pa.Table:
    """The output table of join_embeddings(**kwargs)."""
    return join_embeddings(**kwargs).table


def join_embeddings(
    *,
    rows: "Optional[pa.Table]",
    keys: Sequence[str],
    embeddings: "np.ndarray",
    errors: Mapping[str, str],
    dim: int,
    id_column: str = "key",
    embedding_column: str = "image_embedding",
    error_column: str = "embedding_error",
    missing_reason: str = NOT_IN_TAR,
    embedding_dtype: str = "float32",
    id_type: "Optional[pa.DataType]" = None,
    missing_reasons: Optional[Mapping[str, str]] = None,
    repeats: Sequence[tuple[str, str]] = (),
) -> JoinedOutput:
    """Join embeddings onto a shard's rows by key, never by position.

    rows: the img2dataset parquet of the shard (every input row, failed downloads included) or None.
    keys[i] owns embeddings[i]; errors maps key -> reason for samples of the tar that got no embedding.
    Every row of `rows` is kept with all its columns; rows whose key is in neither keys nor errors get a null
    embedding and a reason (their img2dataset status/error_message, or "not in tar"); tar samples missing from
    `rows` are appended (id column set, other columns null). Without `rows`, one row per sample with `id_column`.
    The embedding column is list<float32> (list<halffloat> with embedding_dtype "float16"; fixed `dim` values or
    null); the error column is a nullable string.

    Details:
    * Keys match on their string form. A string id column matches exactly; an integer id column (some users convert
      img2dataset's zero-padded keys) matches the tar key's integer value and keeps its integer type.
    * Duplicate keys in `rows`: every such row is kept and each gets the embedding (or error) of that key.
    * The reason for a row without embedding, first that applies: the tar's error for the key; the img2dataset
      `error_message` (or, where empty, its `status`) for rows whose status is not "success" (string columns
      only: a `status` of other values is another source's, no reason); "no key (its
      '<id_column>' is null)" for a row whose id is null (it can match no sample); "not in tar".
    * Order: `rows`' order, then appended samples in the order of `keys` followed by the remaining `errors` keys,
      then `repeats`. Without `rows` the same sample order.
    * A column that `rows` declares non-nullable is declared nullable where the output holds a null in it (the
      appended rows): _nullable_where_null.
    * An appended sample whose key is not an integer, for an integer id column, gets a null id and an error that
      names the key (the column keeps its type so all shards share one schema).
    * Two tar keys with one integer value (`000123` and `123`, for an integer id column): the first owns the id's
      row; the other is appended with its id and an error naming both keys, not joined to a row that is not its.
    * Every embedded sample ends up on a row, with its embedding or with an error from one of the two rules above
      (`JoinedOutput.errors`); anything else is a fault of the join and raises.
    * Columns of `rows` named like the embedding or error column are refused (column_clash_problem), never
      replaced. The schema's metadata stays, pandas' included (_pandas_metadata_fits: dropped where pandas could
      not read the new columns beside it); field metadata naming a pickled extension type is dropped
      (``arrow.py_extension_type``: a pickle that old pyarrow versions would run on reading the output).
    * A dictionary-encoded id column is written as its values (the type every other shard's keys have).
    * `missing_reason` replaces "not in tar" for successful rows the tar lacks (e.g. a damaged tar's unread part);
      `missing_reasons` (tar key -> reason, matched as sample keys are) replaces it for the rows of those keys (a
      member of the key's name that is no sample's: shard.TarRead.missing_reasons). Never rows of their own.
    * `repeats`: (key, reason) of tar samples that repeat an earlier sample's key (shard.TarRead.repeats), each
      appended as a row of its own after the other samples, with its key and reason and never an embedding (the
      key's first sample owns the key's row), so that every sample of the tar is a row.
    * `id_type`, without `rows` (or where their id column is of the `null` type: holds_no_ids): the run's id type
      (its other shards' parquets'), which the tar keys take, so that every shard's output has one schema; a key
      that is not an integer, for an integer type, gets a null id and an error naming it. Without it (or with
      `rows` of another id type), the keys are strings.
    """
    keys = list(keys)
    emb = np.asarray(embeddings, dtype=EMBEDDING_TYPES[embedding_dtype][0])
    if emb.size == 0 and not keys:
        emb = emb.reshape(0, dim)
    if emb.ndim != 2 or emb.shape != (len(keys), dim):
        raise ValueError(f"embeddings have shape {emb.shape}; expected ({len(keys)}, {dim}) for {len(keys)} keys")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique (a duplicate tar sample belongs in errors)")
    both = set(keys).intersection(errors)
    if both:
        raise ValueError(f"{len(both)} keys have both an embedding and an error, e.g. {sorted(both)[0]!r}")

    # Every tar sample: embedded ones first (their index in `emb`), then the failed ones, then the repeats of a key
    # (after their key's first sample, which index_in below finds first: a repeat never takes a row of `rows`).
    error_keys = [k for k in errors]
    sample_keys = keys + error_keys + [k for k, _ in repeats]
    owners = len(keys) + len(error_keys)  # the samples before the repeats
    sample_errors = pa.array([None] * len(keys) + [str(errors[k]) for k in error_keys] + [str(r) for _, r in repeats],
                             type=pa.string())

    if rows is None:
        id_type = id_type or pa.string()
        base = pa.table({id_column: pa.array([], type=id_type)})
    else:
        problem = (id_column_problem(id_column, "the shard's parquet", rows.schema)
                   or column_clash_problem("the shard's parquet", rows.schema, embedding_column, error_column))
        if problem:
            raise ValueError(problem)
        base = _ids_decoded(_without_pickled_types(rows), id_column)
        if holds_no_ids(id_column, base.schema):  # no value to join, no type of its own: the run's, as without rows
            i = base.schema.get_field_index(id_column)
            typed = id_type or pa.string()
            base = base.set_column(i, base.schema.field(i).with_type(typed), base.column(i).cast(typed))
        id_type = base.schema.field(id_column).type
    row_ids = _id_strings(base.column(id_column)).combine_chunks()

    canon = _canonical_tar_keys(sample_keys, id_type)
    sample_canon = pa.array(canon, type=pa.string())
    # Tar keys that repeat an earlier key's integer id (only an integer id column makes two keys one id).
    collided: dict[int, str] = {}  # sample -> its error
    if pa.types.is_integer(id_type):
        first_of: dict[str, int] = {}
        for i, c in enumerate(canon[:owners]):  # a repeat's own reason says why it has no row of `rows`
            first = first_of.setdefault(c, i)
            if first != i:
                collided[i] = (f"key {sample_keys[i]!r} has the same integer id as key {sample_keys[first]!r}, "
                               "which owns its row")

    # Rows of the parquet: which tar sample (if any) each one is, vectorised.
    null_str = pa.scalar(None, pa.string())
    sample_idx = np.asarray(pc.fill_null(pc.index_in(row_ids, value_set=sample_canon), -1), dtype=np.int64)
    row_reason = sample_errors.take(pa.array(sample_idx, mask=sample_idx < 0))  # the tar's error, if any
    status = _img2dataset_text(base, STATUS_COLUMN)
    if status is not None:
        download_reason = status
        msg = _img2dataset_text(base, ERROR_MESSAGE_COLUMN)
        if msg is not None:
            msg = pc.if_else(pc.equal(pc.utf8_trim_whitespace(msg), ""), null_str, msg)
            download_reason = pc.coalesce(msg, status)
        failed = pc.fill_null(pc.not_equal(status, SUCCESS), False)
        row_reason = pc.coalesce(row_reason, pc.if_else(failed, download_reason, null_str))
    row_embedded = np.where(sample_idx < len(keys), sample_idx, -1)  # samples with an error have no embedding
    # Not embedded, no tar error, not a failed download: a row without a key matches no sample; else the tar lacks it.
    missing = pa.scalar(missing_reason)
    if missing_reasons:
        said = list(missing_reasons)
        which = pc.index_in(row_ids, value_set=pa.array(_canonical_tar_keys(said, id_type), type=pa.string()))
        missing = pc.coalesce(pa.array([missing_reasons[k] for k in said], type=pa.string()).take(which), missing)
    unmatched = pc.if_else(pc.is_null(row_ids), pa.scalar(f"no key (its {id_column!r} is null)"), missing)
    row_reason = pc.if_else(pa.array(row_embedded >= 0), null_str, pc.coalesce(row_reason, unmatched))

    # Tar samples the parquet lacks, and those whose integer id an earlier key owns: appended after, in sample order.
    extra_mask = np.asarray(pc.invert(pc.is_in(sample_canon, value_set=row_ids)), dtype=bool)
    extra_mask[list(collided)] = True  # never on the first key's row (index_in above picks the first)
    extra_mask[owners:] = True  # each repeat a row of its own
    extra = np.flatnonzero(extra_mask)
    extra_reason = sample_errors.take(pa.array(extra, type=pa.int64()))
    extra_src = np.where(extra < len(keys), extra, -1)
    dropped: dict[str, str] = {}  # embedded samples turned into errors here
    if collided:
        note = pa.array([collided.get(int(i)) for i in extra], type=pa.string())
        extra_reason = pc.coalesce(extra_reason, note)
        for j, i in enumerate(extra):
            if int(i) in collided:
                if i < len(keys):
                    dropped[sample_keys[i]] = collided[int(i)]
                extra_src[j] = -1
    if pa.types.is_integer(id_type):
        extra_ids, bad = [], []
        limits = np.iinfo(id_type.to_pandas_dtype())
        said = ("is not in the parquet and not an integer" if rows is not None
                else f"is not an integer, as the run's ids ({id_type}) are")
        for i in extra:
            k = sample_keys[i]
            try:
                n = int(k)
            except ValueError:
                n, why = None, said
            else:  # a long run of digits: its own row's error, not the shard's (pa.array would raise)
                why = None if limits.min <= n <= limits.max else f"is an integer beyond {id_type}, the id column's type"
            extra_ids.append(None if why else n)
            bad.append(why)
        extra_id_array = pa.array(extra_ids, type=id_type)
        if any(bad):
            notes = [f"key {sample_keys[i]!r} {why}" if why else None for i, why in zip(extra, bad)]
            bad = [why is not None for why in bad]
            extra_reason = pc.coalesce(extra_reason, pa.array(notes, type=pa.string()))
            extra_src[np.asarray(bad)] = -1  # an embedding without its key is of no use; the error names the key
            dropped.update((sample_keys[i], note) for i, note in zip(extra, notes) if note and i < len(keys))
    else:
        extra_id_array = pa.array([sample_keys[i] for i in extra], type=pa.string()).cast(id_type)

    extra_cols = []
    for field in base.schema:
        if field.name == id_column:
            extra_cols.append(extra_id_array)
        else:
            extra_cols.append(pa.nulls(len(extra), field.type))
    extra_table = pa.Table.from_arrays(extra_cols, schema=base.schema)

    table = _nullable_where_null(pa.concat_tables([base, extra_table]))
    src = np.concatenate([row_embedded, extra_src]).astype(np.int64)
    reasons = pa.concat_arrays([row_reason, extra_reason])

    emb_field = pa.field(embedding_column, pa.list_(EMBEDDING_TYPES[embedding_dtype][1]), metadata={"dim": str(dim)})
    table = table.append_column(emb_field, _embedding_array(emb, src, dim, embedding_dtype))
    table = table.append_column(pa.field(error_column, pa.string()), reasons)
    meta = dict(table.schema.metadata or {})
    if not _pandas_metadata_fits(meta.get(b"pandas")):
        meta.pop(b"pandas", None)
    placed = np.zeros(len(keys), dtype=bool)
    placed[src[src >= 0]] = True
    lost = [k for k, p in zip(keys, placed) if not p and k not in dropped]
    if lost:
        raise ValueError(f"the key join placed {len(lost)} embedded samples on no row, e.g. key {lost[0]!r}")
    return JoinedOutput(table.replace_schema_metadata(meta or None), embedded=int(placed.sum()),
                        embedded_rows=int((src >= 0).sum()), errors=dropped)


# --------------------------------------------------------------------------------------------------- kNN view


def embeddings_view(table: pa.Table, *, id_column: str, embedding_column: str, shard: str) -> pa.Table:
    """The embedded rows of an output table (as built by build_output_table), in its order: the id column, the
    embedding column (never null here, same type and `dim` metadata) and `shard` (the stem; view_shard_column),
    which names the full table the row comes from where ids repeat across shards. A shard with no embedded row gives
    0 rows with the same schema (embedding-reader skips such files)."""
    view = table.select([id_column, embedding_column])
    if view.column(embedding_column).null_count:
        # Arrow's filter copies every row, even when it keeps all of them: a shard of 10,000 x 2,048 floats cost
        # 0.29 s and 78 MB that way on the 2-core machine. Most shards have every row embedded.
        view = view.filter(pc.is_valid(view.column(embedding_column)))
    view = view.append_column(pa.field(view_shard_column(id_column, embedding_column), pa.string()),
                              pa.array([shard] * view.num_rows, type=pa.string()))
    return view.replace_schema_metadata(None)


def embeddings_view_url(output_root: str, stem: str) -> str:
    """Where a shard's view goes: `<output_root>/_embeddings/<stem>.parquet` (a stem may hold subfolders)."""
    return f"{output_root.rstrip('/')}/{EMBEDDINGS_FOLDER}/{stem}.parquet"


def is_output_name(rel: str) -> bool:
    """Whether `rel`, a path relative to OUTPUT, names a file that wdsembed writes there: a shard's table
    (`<stem>.parquet`), its kNN view (`_embeddings/<stem>.parquet`) or the manifest. A stem's parts never start with
    `_` or `.` (plan refuses such shards), so Prefect's results, the claim and temp names are not among them."""
    if rel == MANIFEST_NAME:
        return True
    parts = rel.split("/")
    if parts[0] == EMBEDDINGS_FOLDER and len(parts) > 1:
        parts = parts[1:]
    return parts[-1].endswith(".parquet") and not any(not part or part.startswith(("_", ".")) for part in parts)


def view_columns(fs: Any, url: str) -> Optional[list[str]]:
    """The column names of the kNN view at `url`, from its footer; None where there is none, or it cannot be read."""
    try:
        with fs.open(url, "rb") as f:
            return pq.read_schema(f).names
    except (OSError, pa.ArrowException, ValueError):  # missing, cut short, unreadable: nothing to judge
        return None


def write_embeddings_view(table: pa.Table, config: "EmbedConfig", stem: str, *, cache_key: str = "",
                          before_commit: Callable[[], None] = lambda: None) -> int:
    """Write the shard's kNN view (embeddings_view) to OUTPUT/_embeddings/<stem>.parquet, whole or not at all
    (write_parquet_atomic, which runs `before_commit` just before the view appears); returns its row count. Call it
    before writing the shard's full table: the full table is what marks a shard finished, so a finished shard
    always has its view."""
    view = embeddings_view(table, id_column=config.id_column, embedding_column=config.embedding_column, shard=stem)
    fs, root = storage.filesystem(config.output, config.storage_options)
    write_parquet_atomic(view, embeddings_view_url(root, stem), fs, {"cache_key": cache_key, "shard": stem},
                         before_commit)
    return view.num_rows


def remove_embeddings_view(config: "EmbedConfig", stem: str) -> bool:
    """Remove the shard's view where one exists (a run without views embeds the shard again); True when removed."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    url = embeddings_view_url(root, stem)
    if not fs.exists(url):
        return False
    try:
        fs.rm_file(url)
    except FileNotFoundError:  # removed meanwhile
        return False
    return True


class DamagedOutputError(ValueError):
    """An output whose footer reads but whose data does not (bit rot, a bad copy): not finished work."""


def ensure_embeddings_view(config: "EmbedConfig", stem: str, output_url: str, cache_key: str,
                           before_commit: Callable[[], None] = lambda: None) -> bool:
    """Rebuild a finished shard's view from its full table (made with `cache_key`) where the view is missing
    (deleted, or the output is from before views existed), was made with another cache key (a run that crashed
    between writing its view and its table) or lacks a column this version writes (the stem, where an earlier one
    named it as the id column); True when it was rebuilt. One footer read otherwise. Raises
    DamagedOutputError, naming the output, where its table cannot be decoded. `before_commit` runs just before a
    rebuilt view appears; where it raises, none does."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    url = embeddings_view_url(root, stem)
    footer = read_footer(url, fs)
    if footer is not None and (footer_metadata(footer.metadata) or {}).get("cache_key") == cache_key:
        columns = [config.id_column, config.embedding_column,
                   view_shard_column(config.id_column, config.embedding_column)]
        if footer.schema.to_arrow_schema().names == columns:
            return False
    out_fs, out_path = storage.filesystem(output_url, config.storage_options)
    try:
        with out_fs.open(out_path, "rb") as f:
            table = pq.read_table(f, columns=[config.id_column, config.embedding_column])
    except (pa.ArrowException, OSError) as exc:
        if not undecodable(exc):
            raise
        raise DamagedOutputError(f"output {output_url} is damaged: its footer reads, its data does not "
                                 f"({type(exc).__name__}: {exc})") from exc
    write_embeddings_view(table, config, stem, cache_key=cache_key, before_commit=before_commit)
    return True


def dictionary_ids(footer: Optional[pq.FileMetaData], id_column: str) -> bool:
    """Whether a table's footer shows its id column dictionary-encoded (an earlier version's: ensure_plain_ids)."""
    try:
        return footer is not None and pa.types.is_dictionary(footer.schema.to_arrow_schema().field(id_column).type)
    except (KeyError, pa.ArrowException, ValueError):
        return False


def ensure_plain_ids(config: "EmbedConfig", stem: str, output_url: str, footer: Optional[pq.FileMetaData],
                     cache_key: str, before_commit: Callable[[], None] = lambda: None) -> bool:
    """Rewrite a finished shard's table, and its kNN view, whose id column is dictionary-encoded (`footer`: the
    table's, already read), with the ids' values; True when rewritten. Versions before 2026-12-06 wrote a
    dictionary-encoded parquet key column so (its cache key is unchanged since), and a merged read of OUTPUT refuses
    it beside the plain ids of the shards written since. The rows, embeddings and footer stay: nothing is embedded
    again. The view goes first, as a shard's view always does. Raises DamagedOutputError where the table cannot be
    decoded; `before_commit` runs just before each file appears."""
    try:
        field = footer.schema.to_arrow_schema().field(config.id_column) if footer is not None else None
    except (KeyError, pa.ArrowException, ValueError):
        return False
    if field is None or not pa.types.is_dictionary(field.type):
        return False
    fs, path = storage.filesystem(output_url, config.storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowException, OSError) as exc:
        if not undecodable(exc):
            raise
        raise DamagedOutputError(f"output {output_url} is damaged: its footer reads, its data does not "
                                 f"({type(exc).__name__}: {exc})") from exc
    meta = footer_metadata(footer.metadata) or {}
    # pyarrow stores the schema it writes itself; the old one would bring the dictionary type back on reading
    kept = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"ARROW:schema"}
    table = _ids_decoded(table, config.id_column).replace_schema_metadata(kept)
    if config.knn_view:
        write_embeddings_view(table, config, stem, cache_key=cache_key, before_commit=before_commit)
    write_parquet_atomic(table, path, fs, meta, before_commit)
    return True


# --------------------------------------------------------------------------------------------------- counts


# --------------------------------------------------------------------------------------------------- atomic writes


def write_parquet_atomic(table: pa.Table, url: str, fs: Any, metadata: Mapping[str, Any],
                         before_commit: Callable[[], None] = lambda: None) -> None:
    """Write `table` to `url` (a path on fsspec filesystem `fs`) whole or not at all (storage.write_atomic, which
    runs `before_commit` just before the table appears), `metadata` as JSON in the footer.

    Columns other than the embeddings are snappy-compressed (parquet's default). The float32 embeddings (list
    columns) are encoded by what their values are (_embedding_encoding): bfloat16 values (a bfloat16 model's, the
    default on a GPU, when not normalized) byte-stream-split and zstd-compressed, float32 ones not compressed.

    The JSON goes under the footer key ``wdsembed``; read it back cheaply with read_output_metadata.
    """
    meta = dict(table.schema.metadata or {})
    meta[FOOTER_KEY] = json.dumps(dict(metadata), sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    # Dictionary encoding never pays off for float embeddings, nor do min/max statistics over their values (no
    # reader prunes on them; 15% of a 2,048-d table's write); both stay for the other columns.
    list_cols = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    others = [c for c in table.column_names if c not in list_cols]
    # Codecs per parquet leaf column (a dict applies to the leaves it names, and leaves others uncompressed).
    compression = {leaf: "snappy" for f in table.schema if f.name in others for leaf in _parquet_leaves(f)}
    levels: dict[str, int] = {}
    split: list[str] = []
    for name in list_cols:
        codec = _embedding_encoding(table.column(name))
        for leaf in _parquet_leaves(table.schema.field(name)):
            compression[leaf] = codec
            if codec == "zstd":
                levels[leaf] = 1
                split.append(leaf)
    storage.write_atomic(fs, url, lambda f: pq.write_table(
        table, f, row_group_size=_row_group_rows(table, list_cols), use_dictionary=others, write_statistics=others,
        compression=compression, compression_level=levels or None, use_byte_stream_split=split or False),
        before_commit)


# The most bytes of list values (embeddings) in one row group. Parquet's writer builds a column chunk's repetition
# and definition levels for the whole row group at once, two int16 per list value: as many bytes as the float32
# values themselves. In one row group a 10,000 x 2,048 shard's write took 110 MB beside its table, in groups of
# 2,048 rows 64 MB, no slower (2-core machine; docs/benchmarks.md, seventeenth session); and the levels no longer
# grow with the shard.
ROW_GROUP_LIST_BYTES = 16 << 20


def _row_group_rows(table: pa.Table, list_cols: Sequence[str]) -> Optional[int]:
    """Rows per row group that keep each group's list values near ROW_GROUP_LIST_BYTES (None: pyarrow's default,
    for a table without list values)."""
    value_bytes = sum(table.column(name).nbytes for name in list_cols)
    if not value_bytes or not table.num_rows:
        return None
    return max(1, int(ROW_GROUP_LIST_BYTES * table.num_rows // value_bytes))


def _parquet_leaves(field: pa.Field, prefix: str = "") -> list[str]:
    """The parquet paths of an arrow field's leaf columns, as pyarrow writes them (compliant nested names)."""
    path, t = prefix + field.name, field.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _parquet_leaves(pa.field("element", t.value_type), path + ".list.")
    if pa.types.is_map(t):
        return (_parquet_leaves(pa.field("key", t.key_type), path + ".key_value.")
                + _parquet_leaves(pa.field("value", t.item_type), path + ".key_value."))
    if pa.types.is_struct(t):
        return [leaf for i in range(t.num_fields) for leaf in _parquet_leaves(t.field(i), path + ".")]
    return [path]


def _embedding_encoding(column: pa.ChunkedArray) -> str:
    """How to store a list column: for float32 embeddings, "zstd" (byte stream split, then zstd level 1) where
    the values are bfloat16 values held as float32 (the low 16 bits of each are zero), else "none"; any other list
    column "snappy".

    Split into byte streams, a bfloat16 value's two zero bytes compress to almost nothing: a 10,000 x 2,048 shard
    took 28 MB in 0.53 s instead of 57 MB in 0.88 s with snappy (2-core machine), and reads back faster. Float32
    values (normalized embeddings, the default) gain little from any codec: snappy saved 2.6% of a normalized
    10,000 x 2,048 shard and took half again the write's CPU time (0.25 against 0.17 s on an H200 host), on the
    write that ends the run; split and zstd saved 16% in twice the time. Judged on the first values only: the
    choice changes the bytes on disk, never the values. Float16 embeddings are stored plain, uncompressed: split
    and zstd saved 15% of a normalized shard, but readers must then know both float16 and split fixed-size bytes."""
    if pa.types.is_float16(column.type.value_type):
        return "none"
    if not pa.types.is_float32(column.type.value_type):
        return "snappy"  # not embeddings: some other list column of the shard's metadata
    values = next((c.values for c in column.chunks if len(c.values)), None)
    if values is None or values.null_count:
        return "none"
    head = np.asarray(values.slice(0, 65536)).view(np.uint32)
    return "none" if (head & 0xFFFF).any() else "zstd"


class ForeignOutputError(ValueError):
    """Parquet files where this run writes shard outputs that wdsembed did not write (their footers read, and hold
    no metadata of ours): the user's own files, never overwritten. `files`: their names under `output` (or URLs)."""

    def __init__(self, files: Sequence[str], output: Optional[str] = None) -> None:
        files = list(files)
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        where = f"output {output!r} already holds" if output else "there are"
        super().__init__(f"{where} {len(files)} parquet file(s) that wdsembed did not write, where this run writes "
                         f"its shards' outputs: {', '.join(files[:3])}{more}. They are never overwritten: choose "
                         "another output folder, or move them out of it")
        self.files, self.output = files, output

    def __reduce__(self):  # crosses from Dask workers to the caller with its fields
        return type(self), (self.files, self.output)


def read_output_metadata(url: str, fs: Any) -> Optional[dict]:
    """The JSON metadata of an output written by write_parquet_atomic, reading only the footer.

    None where the file is missing, is not a readable parquet file (cut short, a damaged footer), or lacks our
    metadata. Other errors (permissions, network) propagate: they are not a reason to think the shard needs redoing.
    """
    return output_metadata(read_footer(url, fs), url)


def output_metadata(footer: Optional[pq.FileMetaData], url: str, *, refuse_foreign: bool = False) -> Optional[dict]:
    """read_output_metadata's answer from the footer of `url` already read (read_footer). With `refuse_foreign`, a
    readable parquet without our footer key raises ForeignOutputError instead: it is no output of ours (an unreadable
    footer may be one, damaged, and is None as above)."""
    meta = footer.metadata if footer is not None else None
    if footer is not None and refuse_foreign and FOOTER_KEY not in (meta or {}):
        raise ForeignOutputError([url])
    return footer_metadata(meta)


def read_footer(url: str, fs: Any) -> Optional[pq.FileMetaData]:
    """A parquet file's footer (read_output_metadata's one read), or None where the file is missing or its footer
    cannot be read; other errors (permissions, network) propagate, naming the file (s3fs says a HEAD refused by
    expired or wrong credentials as "Forbidden" alone)."""
    try:
        with fs.open(url, "rb") as f:
            return pq.read_metadata(f)
    except (FileNotFoundError, pa.ArrowException, ValueError):
        return None
    except OSError as exc:
        if undecodable(exc):
            return None
        named = storage.naming_url(storage.to_url(fs, url), exc)
        if named is exc:
            raise
        raise named from exc


def undecodable(exc: BaseException) -> bool:
    """Whether pyarrow raised `exc` because a file's bytes are not sound parquet, not because they could not be
    read: its own errors (ArrowInvalid, ...), or the bare OSError of its IOError status, without an errno ("Couldn't
    deserialize thrift" for a damaged footer or page header). A failed read of the file itself (denied, the
    network) reaches the caller as its own exception (PermissionError, ConnectionError, s3fs's OSError with errno)."""
    return isinstance(exc, pa.ArrowException) or (type(exc) is OSError and exc.errno is None)


def footer_metadata(key_values: Optional[Mapping[bytes, bytes]]) -> Optional[dict]:
    """Our JSON metadata among a parquet file's key-value metadata (a footer's, or the schema metadata of a table
    read from it), or None where it is absent or not a JSON object."""
    try:
        value = json.loads((key_values or {})[FOOTER_KEY])
    except (KeyError, ValueError):  # JSONDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def write_manifest(url: str, fs: Any, manifest: Mapping[str, Any]) -> str:
    """Write `manifest` as JSON to `<url>/_manifest.json` (url = the output folder) atomically; returns its path."""
    path = url.rstrip("/") + "/" + MANIFEST_NAME
    data = (json.dumps(dict(manifest), indent=2, sort_keys=True, default=str) + "\n").encode()
    storage.write_atomic(fs, path, data)
    return path


def remove_manifest(url: str, fs: Any) -> None:
    """Remove `<url>/_manifest.json` where there is one (one delete: never half removed)."""
    try:
        fs.rm_file(url.rstrip("/") + "/" + MANIFEST_NAME)
    except FileNotFoundError:
        pass


def read_manifest(url: str, fs: Any) -> Optional[dict]:
    """The manifest under output folder `url`, or None where it is missing or not valid JSON."""
    try:
        with fs.open(url.rstrip("/") + "/" + MANIFEST_NAME, "rb") as f:
            value = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return value if isinstance(value, dict) else None
