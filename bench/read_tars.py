"""Reading indexed tars: shards.iter_samples with its fast path (fast=True) against the general parser (fast=False).

    python bench/read_tars.py                      # 10,000 samples a shard, GNU and pax tars
    python bench/read_tars.py --formats pax --passes 9

Builds, in a temporary folder, two shards per tar format with synthetic.write_shard: 10,000 samples of one ~38 KB
JPEG member, and 10,000 img2dataset-like samples of a ~5 KB jpg, a txt and a json member. "gnu" tars have one header per
member; "pax" tars have a pax header before each (a float mtime), as webdataset's TarWriter (img2dataset) writes
them. Each shard is indexed (shardindex.ensure_index), then read whole with each variant in turn, `--passes`
times, from the page cache. Printed per shard and variant: the best pass in microseconds per sample, all of it
and without the time spent inside f.read (local reads let the GIL go, so that part is what a GPU worker's other
threads wait for), and the fast/general ratio of each. Then what comes before the read: the shard's .idx parsed
and the fast path planned, read line by line (IndexMember tuples) and as columns (what a worker does now).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import fsspec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wdsembed import shardindex, shards, synthetic  # noqa: E402


class TimedFile:
    """A file whose reads are timed."""

    def __init__(self, f):
        self.f, self.read_seconds = f, 0.0

    def read(self, n: int = -1) -> bytes:
        start = time.perf_counter()
        data = self.f.read(n)
        self.read_seconds += time.perf_counter() - start
        return data


def jpegs(count: int, target: int = 38_000) -> list[bytes]:
    """`count` distinct JPEGs of about `target` bytes."""
    out = []
    for seed in range(count):
        buf = io.BytesIO()
        synthetic.make_image(300, 220, seed=seed).save(buf, "JPEG", quality=97)
        out.append(buf.getvalue())
    scale = target / (sum(map(len, out)) / count)
    if abs(scale - 1) > 0.15:  # resize once to land near the target size
        side = int(300 * scale ** 0.5)
        out = []
        for seed in range(count):
            buf = io.BytesIO()
            synthetic.make_image(side, int(side * 220 / 300), seed=seed).save(buf, "JPEG", quality=97)
            out.append(buf.getvalue())
    return out


def build(folder: str, n: int, tar_format: str) -> dict[str, str]:
    images, small = jpegs(16), jpegs(16, target=5_000)
    one = [synthetic.ShardSample(image=images[i % 16], txt=False, json=False) for i in range(n)]
    three = [synthetic.ShardSample(image=small[i % 16], caption=f"a caption for sample {i}") for i in range(n)]
    paths = {}
    for name, samples in (("one", one), ("three", three)):
        written = synthetic.write_shard(os.path.join(folder, f"{tar_format}-{name}"), "00000", samples,
                                        parquet=False, stats=False, tar_format=tar_format)
        paths[f"{tar_format} {name}"] = written.tar
    return paths


def one_pass(path: str, index: shardindex.ShardIndex, fast: bool) -> tuple[float, float, int]:
    with open(path, "rb") as raw:
        f = TimedFile(raw)
        start = time.perf_counter()
        n = sum(1 for _ in shards.iter_samples(f, extensions=("jpg",), shard=path, index=index, fast=fast))
        total = time.perf_counter() - start
    return total, total - f.read_seconds, n


def index_costs(idx_path: str, passes: int) -> tuple[float, float]:
    """Best times in ms of what a worker does with a shard's .idx before reading the tar: parse it and plan the
    fast path, with the line-by-line reading (IndexMember tuples) and with the columnar one (ShardIndex.parse)."""
    with open(idx_path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    rank = {"jpg": 0}

    def line_by_line(text: str) -> shardindex.ShardIndex:
        body = shardindex._body_lines(text)
        return shardindex.ShardIndex(tuple(shardindex._parse_line(line, i) for i, line in enumerate(body, start=2)))

    best = {}
    for name, parse in (("lines", line_by_line), ("columns", shardindex.ShardIndex.parse)):
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            shards._plan_index(parse(text), rank, 8 << 20)
            times.append(time.perf_counter() - start)
        best[name] = min(times) * 1e3
    return best["lines"], best["columns"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--formats", default="gnu,pax", help="comma-separated: gnu, pax, ustar")
    p.add_argument("--passes", type=int, default=5)
    args = p.parse_args(argv)
    fs = fsspec.filesystem("file")
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for tar_format in args.formats.split(","):
            paths.update(build(folder, args.samples, tar_format))
        print(f"{'shard':10s} {'MB':>6s}  {'variant':8s} {'us/sample':>10s} {'w/o read':>9s}")
        for label, path in paths.items():
            index = shardindex.ensure_index(path, fs)
            best = {True: (float("inf"), float("inf")), False: (float("inf"), float("inf"))}
            for _ in range(args.passes):
                for fast in (True, False):  # interleaved: the machine's speed drifts
                    total, outside, n = one_pass(path, index, fast)
                    assert n == args.samples
                    best[fast] = (min(best[fast][0], total / n * 1e6), min(best[fast][1], outside / n * 1e6))
            size = os.path.getsize(path) / 1e6
            for fast in (False, True):
                print(f"{label:10s} {size:6.0f}  {'fast' if fast else 'general':8s} {best[fast][0]:10.2f} "
                      f"{best[fast][1]:9.2f}")
            print(f"{'':10s} {'':6s}  {'ratio':8s} {best[True][0] / best[False][0]:10.2f} "
                  f"{best[True][1] / best[False][1]:9.2f}")
            lines, columns = index_costs(index.path, args.passes)
            print(f"{'':10s} {'':6s}  index parse + fast-path plan, ms: line by line {lines:.1f}, as columns "
                  f"{columns:.1f} (ratio {columns / lines:.2f})")


if __name__ == "__main__":
    main()
