"""A nightly re-run of many finished shards, through the command line: with nothing to compute, and with 1% new
shards beside them. Builds N tiny img2dataset shards (2 small JPEGs each) under FOLDER, embeds them once with the
tiny timm test model on the CPU (the slow part: about 14 min for 2,000 shards on 2 busy cores; kept for later
calls), then times each re-run REPEATS times (the output of the finished shards copied back before each 1% run).

    python bench/rerun.py [--shards 2000] [--repeats 2] [--folder /tmp/wdsembed-rerun]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wdsembed.synthetic import from_encoded, synthetic_images, write_shard  # noqa: E402

MODEL = ["--model", "test_resnet.r160_in1k", "--no-pretrained", "--device", "cpu", "--n-workers", "2"]


def shards(folder: Path, first: int, count: int) -> None:
    samples = from_encoded(synthetic_images(2, formats=("jpeg",), sizes=((48, 40),)))
    for i in range(first, first + count):
        write_shard(folder, f"{i:05d}", samples, shard_id=i)


def embed(data: Path, out: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "flows" / "embed.py"), str(data), "-o", str(out), *MODEL],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--folder", type=Path, default=Path("/tmp/wdsembed-rerun"))
    args = p.parse_args()
    data, out, kept = (args.folder / f"in{args.shards}", args.folder / f"out{args.shards}",
                       args.folder / f"out{args.shards}.finished")
    if not kept.exists():
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shards(data, 0, args.shards)
        print(f"first run of {args.shards} shards: {embed(data, out):.1f} s", flush=True)
        shutil.copytree(out, kept, symlinks=True)
    more = args.folder / f"in{args.shards}+1%"
    if not more.exists():  # the same shards (hard links: same size and mtime, so finished) and 1% new ones
        shutil.copytree(data, more, copy_function=os.link)
        shards(more, args.shards, max(1, args.shards // 100))
    for _ in range(args.repeats):
        print(f"re-run, nothing to compute: {embed(data, out):.1f} s", flush=True)
    for _ in range(args.repeats):
        shutil.rmtree(out)
        shutil.copytree(kept, out, symlinks=True)
        print(f"re-run, 1% new shards: {embed(more, out):.1f} s", flush=True)


if __name__ == "__main__":
    main()
