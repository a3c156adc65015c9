"""Checks of an output table, before it is written and after: the row count, the embedding's dimension, finite
values, L2 norms; and of a written output's kNN view (OUTPUT/_embeddings/<stem>.parquet): the output's embedded rows,
its ids and embeddings bit for bit, in its order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wdsembed import output, storage
from wdsembed.config import EmbedConfig

NORM_TOLERANCE = 1e-3
NON_FINITE = "embedding holds NaN or infinite values"
ALL_ZEROS = "embedding is all zeros: cannot be L2-normalized"
TOO_SMALL = "embedding's L2 norm is below 1e-12: too small to L2-normalize"  # F.normalize's eps


def unusable_rows(embeddings: np.ndarray, *, normalized: bool) -> dict[int, str]:
    """The rows of a batch of embeddings, as the model gave them (L2-normalized with `normalized`), that no output
    may hold, by position, with why: NaN or infinite values (a bfloat16 overflow, a broken checkpoint), and with
    `normalized`, those that normalizing could not bring to unit norm (all zeros: a ReLU-pooled feature of a blank
    image, a zero head). Each is one image's failure, not its shard's; validate_table still checks what is
    written."""
    if not len(embeddings):
        return {}
    # One pass over the shard's embeddings (it runs for every shard, beside the GPU's next one): a row's sum of
    # squares is finite unless a value is not, or a huge finite row overflows it (looked at value by value).
    with np.errstate(over="ignore", invalid="ignore"):
        squares = np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float32)
    summed = np.isfinite(squares)
    bad = {int(i): NON_FINITE for i in np.flatnonzero(~summed) if not np.isfinite(embeddings[i]).all()}
    if normalized:
        for i in np.flatnonzero(summed & (squares < (1.0 - NORM_TOLERANCE) ** 2)):
            bad[int(i)] = ALL_ZEROS if not embeddings[i].any() else TOO_SMALL
    return bad


@dataclass
class Validation:
    output: str
    ok: bool
    problems: list[str] = field(default_factory=list)


def validate_output(
    config: EmbedConfig, output_url: str, *, dim: int, expected_rows: Optional[int] = None,
    expected_embedded: Optional[int] = None, every_column: bool = False,
) -> Validation:
    """Re-read a written output and check what downstream users rely on. Reads the embedding and error columns,
    and with `knn_view` the id column and the shard's view (each once); with `every_column`, every column of the
    output, so that damage in any of them is found (verify_outputs)."""
    fs, path = storage.filesystem(output_url, config.storage_options)
    columns = [config.embedding_column, config.error_column] + ([config.id_column] if config.knn_view else [])
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=None if every_column else columns)
    except Exception as exc:  # noqa: BLE001 - any unreadable output is a validation failure, said plainly
        return Validation(output_url, False, [f"output cannot be read: {exc}"])
    problems = validate_table(config, table, dim=dim, expected_rows=expected_rows,
                              expected_embedded=expected_embedded)
    view_problem = _check_view(config, output_url, table) if config.knn_view else None
    if view_problem:
        problems.append(view_problem)
    return Validation(output_url, not problems, problems)


def validate_table(
    config: EmbedConfig, table: pa.Table, *, dim: int, expected_rows: Optional[int] = None,
    expected_embedded: Optional[int] = None,
) -> list[str]:
    """The problems of an output table, none when it is sound: the row and embedding counts, one of an embedding
    and an error per row, the dimension, finite values, and unit L2 norms when normalizing."""
    problems: list[str] = []
    if expected_rows is not None and table.num_rows != expected_rows:
        problems.append(f"{table.num_rows} rows, expected {expected_rows}")
    column = table.column(config.embedding_column).combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    if expected_embedded is not None and int(valid.sum()) != expected_embedded:
        problems.append(f"{int(valid.sum())} embeddings, expected {expected_embedded}")
    errors_valid = table.column(config.error_column).is_valid().to_numpy(zero_copy_only=False)
    if np.any(valid & errors_valid) or np.any(~valid & ~errors_valid):
        problems.append("every row must have exactly one of an embedding and an error")
    stored = column.type.value_type if pa.types.is_list(column.type) else column.type
    if stored != output.EMBEDDING_TYPES[config.embedding_dtype][1]:
        problems.append(f"embedding values are {stored}, expected {output.EMBEDDING_TYPES[config.embedding_dtype][1]}")
    if valid.any():
        # the lengths of the non-null rows, from the offsets: filtering the column first would copy every value
        lengths = pc.list_value_length(column).drop_null().to_numpy(zero_copy_only=False)
        if np.any(lengths != dim):
            problems.append(f"embedding lengths {sorted(set(lengths.tolist()))[:5]}, expected {dim}")
        else:
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dim)
            if not np.isfinite(values).all():
                problems.append("embeddings hold NaN or infinite values")
            elif config.normalize_embeddings:
                # float32 sums of squares: off by ~1e-6 at most for unit vectors, far inside the tolerance, and
                # ten times faster than a float64 copy of every embedding
                norms = np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float32))
                worst = float(np.max(np.abs(norms - 1.0)))
                if worst > NORM_TOLERANCE:
                    problems.append(f"L2 norm off by {worst:.2e} (tolerance {NORM_TOLERANCE})")
    return problems


def _check_view(config: EmbedConfig, output_url: str, table: pa.Table) -> Optional[str]:
    """The shard's kNN view must exist, come from the same run (the output's `cache_key`, where it has one) and be
    exactly what output.embeddings_view makes of the output `table` (its id and embedding columns at least): its
    columns and types, the embedded rows' ids in the output's order, their embeddings bit for bit, and the stem in
    every row's `shard`. Checked for outputs under config.output only (their stem is the path below it); reads the
    view once, whole, after its footer."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    path = storage.filesystem(output_url, config.storage_options)[1]
    prefix = root.rstrip("/") + "/"
    if not (path.startswith(prefix) and path.endswith(".parquet")):
        return None
    stem = path[len(prefix) : -len(".parquet")]
    view_url = output.embeddings_view_url(root, stem)
    shown = f"kNN view {output.EMBEDDINGS_FOLDER}/{stem}.parquet"
    embeddings = table.column(config.embedding_column)
    embedded = len(embeddings) - embeddings.null_count
    cache_key = (output.footer_metadata(table.schema.metadata) or {}).get("cache_key")
    try:
        with fs.open(view_url, "rb") as f:
            parquet = pq.ParquetFile(f)
            footer = parquet.metadata
            if footer.num_rows != embedded:
                return f"{shown} holds {footer.num_rows} rows, the output {embedded} embeddings"
            made_with = (output.footer_metadata(footer.metadata) or {}).get("cache_key")
            if cache_key and made_with != cache_key:
                return (f"{shown} was made by another run (cache key {made_with}) than the output ({cache_key}): "
                        "run again to rebuild it from the output")
            view = parquet.read()
    except FileNotFoundError:
        return f"{shown} is missing"
    except Exception as exc:  # noqa: BLE001 - unreadable is a validation failure, said plainly
        return f"{shown} cannot be read: {exc}"
    return _view_differs(config, table, view, stem, shown)


def _view_differs(config: EmbedConfig, table: pa.Table, view: pa.Table, stem: str, shown: str) -> Optional[str]:
    """What differs between `view` (as read, as many rows as the output has embeddings) and the output's embedded
    rows, or None. Arrow and NumPy over whole columns: no per-row Python."""
    id_column, embedding_column = config.id_column, config.embedding_column
    want = output.embeddings_view(table.slice(0, 0), id_column=id_column, embedding_column=embedding_column,
                                  shard=stem).schema
    if not view.schema.remove_metadata().equals(want, check_metadata=True):
        got = ", ".join(f"{f.name}: {f.type}" for f in view.schema)
        wanted = ", ".join(f"{f.name}: {f.type}" for f in want)
        return f"{shown} has the columns ({got}), expected ({wanted}) with the output's field metadata"
    full = table.column(embedding_column)
    valid = full.is_valid()
    ids = table.column(id_column).filter(valid).combine_chunks()
    view_ids = view.column(id_column).combine_chunks()
    if not view_ids.equals(ids):
        row = _first_difference(view_ids, ids)
        return (f"{shown} row {row} has {id_column} {view_ids[row].as_py()!r}, the output's embedded row {row} "
                f"{ids[row].as_py()!r}")
    vectors = view.column(embedding_column)
    if vectors.null_count:
        row = int(np.flatnonzero(vectors.is_null().to_numpy(zero_copy_only=False))[0])
        return f"{shown} row {row} ({id_column} {ids[row].as_py()!r}) has a null embedding"
    lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    want_lengths = pc.list_value_length(full).drop_null().to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, want_lengths):
        row = int(np.flatnonzero(lengths != want_lengths)[0])
        return (f"{shown} row {row} ({id_column} {ids[row].as_py()!r}) has an embedding of {lengths[row]} values, "
                f"the output {want_lengths[row]}")
    # bit for bit: the view is a copy, so -0.0 for 0.0 or another NaN payload is a difference too
    values = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
    want_values = pc.list_flatten(full).to_numpy(zero_copy_only=False)
    bits = np.dtype(f"u{values.dtype.itemsize}")
    if not np.array_equal(values.view(bits), want_values.view(bits)):
        first = int(np.flatnonzero(values.view(bits) != want_values.view(bits))[0])
        row = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
        return (f"{shown} row {row} ({id_column} {ids[row].as_py()!r}) has another embedding than the output's: "
                f"value {first - int(np.sum(lengths[:row]))} is {values[first]}, the output's {want_values[first]}")
    stems = view.column(output.view_shard_column(id_column, embedding_column))  # the schema check above: it is there
    same = pc.fill_null(pc.equal(stems, pa.scalar(stem)), False).to_numpy(zero_copy_only=False)
    if not same.all():
        row = int(np.flatnonzero(~same)[0])
        return (f"{shown} row {row} ({id_column} {ids[row].as_py()!r}) names shard {stems[row].as_py()!r}, "
                f"not {stem!r}")
    return None


def _first_difference(a: pa.Array, b: pa.Array) -> int:
    """The first position where two arrays of one type and length differ (a null equals only a null)."""
    if pa.types.is_dictionary(a.type):
        a, b = a.cast(a.type.value_type), b.cast(b.type.value_type)
    equal = pc.fill_null(pc.equal(a, b), False).to_numpy(zero_copy_only=False)
    both_null = (a.is_null().to_numpy(zero_copy_only=False) & b.is_null().to_numpy(zero_copy_only=False))
    return int(np.flatnonzero(~(equal | both_null))[0])
