"""Checks of an output table, before it is written and after: the row count, the embedding's dimension, finite
values, L2 norms; and of a written output's kNN view (OUTPUT/_embeddings/<stem>.parquet): one row per embedding."""
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


@dataclass
class Validation:
    output: str
    ok: bool
    problems: list[str] = field(default_factory=list)


def validate_output(
    config: EmbedConfig, output_url: str, *, dim: int, expected_rows: Optional[int] = None,
    expected_embedded: Optional[int] = None,
) -> Validation:
    """Re-read a written output and check what downstream users rely on. Reads two columns only."""
    fs, path = storage.filesystem(output_url, config.storage_options)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[config.embedding_column, config.error_column])
    except Exception as exc:  # noqa: BLE001 - any unreadable output is a validation failure, said plainly
        return Validation(output_url, False, [f"output cannot be read: {exc}"])
    problems = validate_table(config, table, dim=dim, expected_rows=expected_rows,
                              expected_embedded=expected_embedded)
    embedded = int(table.column(config.embedding_column).is_valid().to_numpy(zero_copy_only=False).sum())
    cache_key = (output.footer_metadata(table.schema.metadata) or {}).get("cache_key")
    view_problem = _check_view(config, output_url, embedded, cache_key) if config.knn_view else None
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


def _check_view(config: EmbedConfig, output_url: str, embedded: int, cache_key: Optional[str]) -> Optional[str]:
    """The shard's kNN view must exist, hold exactly its embedded rows and come from the same run (the output's
    `cache_key`, where it has one). Checked for outputs under config.output only (their stem is the path below it);
    reads the view's footer only."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    path = storage.filesystem(output_url, config.storage_options)[1]
    prefix = root.rstrip("/") + "/"
    if not (path.startswith(prefix) and path.endswith(".parquet")):
        return None
    stem = path[len(prefix) : -len(".parquet")]
    view = output.embeddings_view_url(root, stem)
    shown = f"{output.EMBEDDINGS_FOLDER}/{stem}.parquet"
    try:
        with fs.open(view, "rb") as f:
            footer = pq.read_metadata(f)
    except FileNotFoundError:
        return f"kNN view {shown} is missing"
    except Exception as exc:  # noqa: BLE001 - unreadable is a validation failure, said plainly
        return f"kNN view {shown} cannot be read: {exc}"
    if footer.num_rows != embedded:
        return f"kNN view {shown} holds {footer.num_rows} rows, the output {embedded} embeddings"
    made_with = (output.footer_metadata(footer.metadata) or {}).get("cache_key")
    if cache_key and made_with != cache_key:
        return (f"kNN view {shown} was made by another run (cache key {made_with}) than the output ({cache_key}): "
                "run again to rebuild it from the output")
    return None
