"""A shard's output write (wdsembed.output.write_parquet_atomic: the table and its 80 MB of embeddings, fsynced)
while other threads of the process run Python, as a GPU worker's do (the tar parser, the DALI feed, the model's
launches, Dask, Prefect). Prints the median seconds per write with 0, 1 and 3 busy threads.

    python bench/writes.py [--rows 10000] [--dim 2048] [--repeats 5] [--folder /tmp] [--dtype float32 float16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wdsembed import storage  # noqa: E402
from wdsembed.output import build_output_table, write_parquet_atomic  # noqa: E402


def table(rows: int, dim: int, dtype: str = "float32") -> pa.Table:
    """A shard's output as build_output_table makes it: normalized embeddings, stored as `embedding_dtype`."""
    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return build_output_table(rows=None, keys=[f"{i:09d}" for i in range(rows)], embeddings=x, errors={}, dim=dim,
                              embedding_dtype=dtype)


def busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))  # pure Python: holds the GIL until the interpreter asks it to switch


def seconds_per_write(t: pa.Table, folder: str, busy_threads: int, repeats: int) -> float:
    fs, root = storage.filesystem(folder)
    stop = threading.Event()
    threads = [threading.Thread(target=busy, args=(stop,), daemon=True) for _ in range(busy_threads)]
    for th in threads:
        th.start()
    try:
        spans = []
        for i in range(repeats):
            start = time.perf_counter()
            write_parquet_atomic(t, f"{root}/w{i}.parquet", fs, {"bench": i})
            spans.append(time.perf_counter() - start)
        return statistics.median(spans)
    finally:
        stop.set()
        for th in threads:
            th.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--folder", default=None, help="where to write (default: a temp folder)")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float16"],
                    help="embedding_dtype of the table, one line each (default: float32)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for dtype in args.dtype:
            t = table(args.rows, args.dim, dtype)
            for n in (0, 1, 3):
                print(f"{dtype}, {n} busy thread(s): {seconds_per_write(t, folder, n, args.repeats):.3f} s per "
                      f"write ({t.nbytes / 2**20:.0f} MiB table)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
