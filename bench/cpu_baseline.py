"""The CPU path against what a user would write without this tool, on the same shards, model, batch size and cores.

    python bench/cpu_baseline.py --model resnet18 --images 1024 --rounds 3
    python bench/cpu_baseline.py --model resnet18 --batch-sizes 32 256      # each batch size, both ways
    python bench/cpu_baseline.py --tools /tmp/old-checkout .                 # two versions of the tool, paired

The baseline is timm.create_model + timm.data.create_transform (PIL) + a torch DataLoader (2 worker processes,
or as many as the cores this process may use) over the same tars, read with tarfile; the tool is the command
`python flows/embed.py DATA --output OUT --model M --no-pretrained --batch-size B`, its defaults otherwise. Both run
as fresh processes, interleaved round by round (tool, baseline, tool, ...), so that a busy shared machine weighs on
both alike; medians of the rounds are printed. Each gives two rates: over its whole command (process start to exit:
imports, for the tool also Prefect's temporary server and the Dask cluster) and over its run (the tool's own
summary line, "images this run at ... images/s", from the flow's start; the baseline's from building its model).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def baseline(folder: str, model_name: str, batch_size: int, workers: int) -> dict:
    """timm + PIL + DataLoader, as its documentation shows; the tars split between the loader's workers."""
    import timm
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Tars(IterableDataset):
        def __init__(self, tars, transform):
            self.tars, self.transform = tars, transform

        def __iter__(self):
            info = get_worker_info()
            mine = self.tars if info is None else self.tars[info.id::info.num_workers]
            for path in mine:
                with tarfile.open(path) as tf:
                    for m in tf:
                        if m.isfile() and m.name.endswith(".jpg"):
                            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                            yield m.name.rsplit(".", 1)[0], self.transform(img)

    start = time.perf_counter()
    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    loader = DataLoader(Tars(sorted(glob.glob(os.path.join(folder, "*.tar"))), transform),
                        batch_size=batch_size, num_workers=workers)
    n = 0
    with torch.inference_mode():
        for _keys, x in loader:
            torch.nn.functional.normalize(model(x), dim=-1).numpy()
            n += len(x)
    return {"images": n, "run_seconds": time.perf_counter() - start, "torch_threads": torch.get_num_threads()}


def run_tool(root: str, data: str, out: str, model: str, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(root, "flows", "embed.py"), data, "--output", out,
                           "--model", model, "--no-pretrained", "--batch-size", str(batch_size)],
                          capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=os.path.abspath(root)))
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    found = re.search(r"(\d+) images this run at ([\d.]+) images/s", proc.stdout + proc.stderr)
    return {"images": int(found.group(1)), "run_rate": float(found.group(2)), "wall_rate": int(found.group(1)) / wall}


def run_baseline(data: str, model: str, batch_size: int, workers: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--baseline-only", data, "--model", model,
                           "--batch-sizes", str(batch_size), "--loader-workers", str(workers)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images": got["images"], "run_rate": got["images"] / got["run_seconds"], "wall_rate": got["images"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--images", type=int, default=1024, help="photographs in all, 256 a shard")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-workers", type=int, default=None, help="the baseline's DataLoader workers")
    p.add_argument("--tools", nargs="+", default=[ROOT], help="checkouts of the tool to run, each every round "
                   "(default: this one)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--baseline-only", metavar="DATA", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from dask.system import cpu_count  # the cores this process may use, as the tool counts them

    workers = args.loader_workers or min(2, cpu_count())
    if args.baseline_only:
        print(json.dumps(baseline(args.baseline_only, args.model, args.batch_sizes[0], workers)))
        return

    from bench.throughput import build_shards

    work = args.workdir or tempfile.mkdtemp(prefix="wdsembed-cpu-baseline-")
    data = os.path.join(work, "data")
    per_shard = 256
    build_shards(data, max(1, args.images // per_shard), per_shard, unique=64)
    results: dict = {"model": args.model, "cores": cpu_count(), "loader_workers": workers, "batch_sizes": {}}
    for batch_size in args.batch_sizes:
        names = [f"tool {i + 1}" if len(args.tools) > 1 else "tool" for i in range(len(args.tools))]
        rows: dict = {name: [] for name in names + ["baseline"]}
        for r in range(args.rounds):
            for name, root in zip(names, args.tools):
                rows[name].append(run_tool(root, data, os.path.join(work, "out"), args.model, batch_size))
            rows["baseline"].append(run_baseline(data, args.model, batch_size, workers))
            print(f"batch {batch_size} round {r + 1}: " + ", ".join(f"{n} {v[-1]}" for n, v in rows.items()),
                  flush=True)
        summary: dict = {}
        for key in ("run_rate", "wall_rate"):
            base = statistics.median(x[key] for x in rows["baseline"])
            summary[key] = {"baseline": round(base, 2)}
            for name, root in zip(names, args.tools):
                tool = statistics.median(x[key] for x in rows[name])
                pairs = statistics.median(t[key] / b[key] for t, b in zip(rows[name], rows["baseline"]))
                summary[key][name] = {"root": root, "images_per_second": round(tool, 2),
                                      "over_baseline_paired": round(pairs, 3)}
                print(f"batch {batch_size}, {key}: {name} ({root}) {tool:.2f} images/s, baseline {base:.2f}, "
                      f"{name} / baseline (median of rounds) {pairs:.3f}", flush=True)
        results["batch_sizes"][str(batch_size)] = {"rounds": rows, "summary": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
