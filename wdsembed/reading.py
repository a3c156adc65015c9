"""Reading a run's outputs back: the embeddings of a table as one NumPy matrix."""
from __future__ import annotations

from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def embedding_matrix(data: Union[pa.Table, pa.RecordBatch, pa.ChunkedArray, pa.Array],
                     column: str = "image_embedding", dtype=None) -> np.ndarray:
    """The embeddings of `data` as one (rows, dim) array, its row i being row i of `data`, in their stored type
    (float32, or float16 with --embedding-dtype float16) unless `dtype` is given. `data`: a table read with pyarrow
    (a kNN view from OUTPUT/_embeddings, or full tables filtered to their embedded rows), or its embedding column.
    `dtype=np.float32` before arithmetic on float16 outputs: NumPy multiplies float16 matrices without BLAS (a
    3,000 x 512 Gram matrix took 33 s in float16, 0.2 s in float32); float32 values stay uncopied.

    Where the column is one chunk (one file of one row group, or a table after `combine_chunks()`), the matrix is
    its values without a copy, read-only; otherwise they are copied once into it. The pandas way,
    `np.stack(df.image_embedding.to_numpy())`, first makes one array object per row and then copies them all.

    A null embedding (a full table's row without one) is refused, not skipped: skipping it would shift every later
    row of the matrix against the table's keys."""
    dim = None
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        if column not in data.schema.names:
            raise KeyError(f"no column {column!r} in the table (columns: {', '.join(data.schema.names)}); "
                           f"pass column= the embedding column's name (--embedding-column)")
        dim = (data.schema.field(column).metadata or {}).get(b"dim")  # an empty table still says its width
        data = data.column(column)
    if isinstance(data, pa.Array):
        chunks = [data]
    elif isinstance(data, pa.ChunkedArray):
        chunks = data.chunks
    else:
        raise TypeError(f"embedding_matrix takes a pyarrow Table, RecordBatch, ChunkedArray or Array, not "
                        f"{type(data).__name__}: read the output with pyarrow (pyarrow.parquet.read_table, "
                        f"pyarrow.dataset), or use np.stack on a pandas column")
    kind = data.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise TypeError(f"{column!r} is {kind}, not a list of floats: pass column= the embedding column")
    rows = sum(len(chunk) for chunk in chunks)
    nulls = sum(chunk.null_count for chunk in chunks)
    if nulls:
        raise ValueError(f"{nulls} of {rows} row(s) have no embedding (null in {column!r}): keep the embedded rows "
                         f"first, table.filter(pyarrow.compute.is_valid(table[{column!r}])), or read the kNN view "
                         f"(OUTPUT/_embeddings), which holds only them")
    values = [pc.list_flatten(chunk) for chunk in chunks if len(chunk)]  # each chunk's own slice of its values
    if not values:
        return np.empty((0, int(dim) if dim else 0), dtype=dtype or kind.value_type.to_pandas_dtype())
    lengths = pc.min_max(pc.list_value_length(pa.chunked_array(chunks, kind)))
    shortest, longest = lengths["min"].as_py(), lengths["max"].as_py()
    if shortest != longest:
        raise ValueError(f"the embeddings in {column!r} differ in length ({shortest} to {longest}): not one model's")
    if any(v.null_count for v in values):
        raise ValueError(f"an embedding in {column!r} holds a null value")
    flat = values[0].to_numpy() if len(values) == 1 else np.concatenate([v.to_numpy() for v in values])
    matrix = flat.reshape(rows, longest)
    return matrix if dtype is None else matrix.astype(dtype, copy=False)
