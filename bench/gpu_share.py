"""Does a second worker process on the same GPU raise the rate? (GPU only)

A GPU worker feeds DALI from one Python thread, which holds the GIL for the tar reader, the host checks and
`feed_input`; for ResNet-50 on an H200 that thread, not the GPU, was the limit (docs/benchmarks.md, thirty-eighth
session). On a machine without a GPU the same runs on the CPU path (a check of this script, not a measurement).
Two processes have two GILs but share the GPU by time-slicing, unless CUDA's Multi-Process Service runs
(`bash bench/device.sh mps share ...`). This measures it: `--processes` worker processes on GPU 0, each with its
own `Worker` (the model compiled as the flow runs it) over the same in-memory shards, taking turns pass after pass:
one process alone, then all of them at once, so the machine's swings hit both alike.

    python bench/gpu_share.py --model resnet50.a1_in1k --processes 2 --passes 4 --images 16000 --threads 12 6
    bash bench/device.sh mps share --model resnet50.a1_in1k --processes 2 --passes 3 --images 16000 --threads 4
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_worker(rank: int, args: argparse.Namespace, tars: list[str], threads: int, barrier, results) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    from wdsembed.worker import Worker, set_gpu_process_environment

    set_gpu_process_environment()
    from wdsembed import shards
    from wdsembed.config import EmbedConfig

    config = EmbedConfig(input="x", output="y", model_name=args.model, pretrained=False,
                         batch_size=args.batch_size, num_threads_per_worker=threads)
    worker = Worker.for_config(config)
    tar_bytes = []
    for tar in tars:
        with open(tar, "rb") as f:
            tar_bytes.append((tar, f.read()))

    def from_tars():
        for tar, data in tar_bytes:
            for s in shards.iter_samples(io.BytesIO(data), extensions=("jpg",), shard=tar):
                yield s.key, s.image

    worker.embed(from_tars(), autocast=True, normalize=True)  # warm-up: compile, capture, DALI's buffers
    for p in range(args.passes):
        for together in (False, True):
            barrier.wait()
            if together or rank == 0:
                t0 = time.perf_counter()
                n = len(worker.embed(from_tars(), autocast=True, normalize=True)[0])
                results.put((p, together, rank, t0, time.perf_counter(), n))
            barrier.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50.a1_in1k")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, nargs="+", default=[12], help="DALI threads per process; several: one "
                   "experiment each")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    from bench.dali_probe import photographs

    tars, samples = photographs(args.images)
    ctx = mp.get_context("spawn")
    report = []
    for threads in args.threads:
        barrier, results = ctx.Barrier(args.processes), ctx.Queue()
        procs = [ctx.Process(target=run_worker, args=(r, args, tars, threads, barrier, results))
                 for r in range(args.processes)]
        for proc in procs:
            proc.start()
        rows = []
        while len(rows) < args.passes * (1 + args.processes):
            try:
                rows.append(results.get(timeout=5))
            except queue.Empty:
                if any(proc.exitcode not in (None, 0) for proc in procs):  # a worker died: do not wait forever
                    for proc in procs:
                        proc.kill()
                    raise SystemExit(f"a worker process failed: exit codes {[pr.exitcode for pr in procs]}")
        for proc in procs:
            proc.join()
        counts = {r[5] for r in rows}
        if counts != {len(samples)}:  # every process embeds every image of every pass, or the rates mean nothing
            raise SystemExit(f"images embedded per pass: {sorted(counts)}, not {len(samples)}")
        solo, shared = [], []
        for pass_ in range(args.passes):
            for together, out in ((False, solo), (True, shared)):
                these = [r for r in rows if r[0] == pass_ and r[1] == together]
                wall = max(r[4] for r in these) - min(r[3] for r in these)
                out.append(sum(r[5] for r in these) / wall)
        line = {"threads_per_process": threads, "processes": args.processes, "images_per_pass": len(samples),
                "one_process": [round(x) for x in solo], "all_processes": [round(x) for x in shared],
                "ratio_of_medians": round(statistics.median(shared) / statistics.median(solo), 3)}
        print(json.dumps(line), flush=True)
        report.append(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "images": args.images, "batch_size": args.batch_size,
                       "cuda_mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")), "runs": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
