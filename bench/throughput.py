"""Throughput benchmark: the model alone, DALI alone, and the full flow, measured in one process and one run.

    python bench/throughput.py                       # GPU: the three reference models, 1 GPU
    python bench/throughput.py --gpus 1 2 4          # full-flow scaling over 1, 2, 4 GPUs (ViT-B/16)
    python bench/throughput.py --small               # CPU: a tiny model on a few shards (what CI runs)
    python bench/throughput.py --small --gpus 1 2    # CPU: the scaling runs on 1 and 2 worker processes

It builds its own shards of real photographs (scikit-image's samples, re-encoded as JPEG at 300-640 px), then for
each model prints images/s for (a) the model alone on resident tensors (bf16 autocast; bfloat16 weights; and on a
GPU those as one CUDA graph of the eager kernels, and of torch.compile's as the flow runs it), (b) DALI reading +
decoding + preprocessing alone, (c) the full flow through Prefect and Dask from tar to parquet with warm workers,
the ratio of (c) to the fastest (a) (to min(a, b) where (b) ran), and the peak GPU and host memory of (c). Writes
JSON with --json.
The scaling runs (--gpus) also check that every run's outputs equal the first run's, embedding for embedding.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (bench.dali_probe and the tests take merged from here)
from wdsembed.report import embedding_by_worker, merged  # noqa: E402

GPU_MODELS = ["vit_large_patch14_clip_224.openai", "vit_base_patch16_clip_224.openai", "resnet50.a1_in1k"]
CPU_MODELS = ["test_resnet.r160_in1k"]


def build_shards(folder: str, n_shards: int, per_shard: int, unique: int, seed: int = 0) -> int:
    """Shards of re-encoded photographs; `unique` distinct images are repeated under new keys (decode cost is the
    same for a repeat, and building stays fast). A folder already built with the same arguments is kept as it is
    (the GPU machine's runs in one session share --workdir: half a minute each); any other is built afresh."""
    import io
    import random

    recipe = {"shards": n_shards, "per_shard": per_shard, "unique": unique, "seed": seed}
    marker = os.path.join(folder, ".built.json")
    try:
        with open(marker) as f:
            if json.load(f) == recipe:
                return n_shards * per_shard
    except (OSError, ValueError):
        pass
    shutil.rmtree(folder, ignore_errors=True)  # no shard of an earlier, larger build left behind

    from PIL import Image

    from wdsembed.synthetic import PHOTO_NAMES, load_photo

    rng = random.Random(seed)
    encoded = []
    photos = [load_photo(name, None) for name in PHOTO_NAMES]
    for i in range(unique):
        img = photos[i % len(photos)]
        img = img if isinstance(img, Image.Image) else Image.fromarray(img)
        long_side = rng.randint(300, 640)
        scale = long_side / max(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        # A random crop first, so repeats of one photo differ in content and size.
        cx, cy = rng.randint(0, img.width // 4), rng.randint(0, img.height // 4)
        part = img.crop((cx, cy, img.width - rng.randint(0, img.width // 4), img.height - rng.randint(0, img.height // 4)))
        buf = io.BytesIO()
        part.convert("RGB").resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=rng.randint(80, 95))
        encoded.append(buf.getvalue())

    import tarfile

    import fsspec

    from wdsembed import shardindex

    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                data = encoded[(s * per_shard + j) % len(encoded)]
                info = tarfile.TarInfo(f"{s:05d}{j:05d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        # Written now, as the first run over a dataset does once: (c) measures the steady state, not indexing.
        shardindex.ensure_index(path, fsspec.filesystem("file"))
    with open(marker, "w") as f:  # last: an interrupted build is built again
        json.dump(recipe, f)
    return n_shards * per_shard


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_model(model_name: str, device: str, batch_size: int, seconds: float, form: str = "bf16") -> dict:
    """(a) the model alone on resident tensors, through embed_batch as the flow calls it. form "bf16": bfloat16
    weights (channels_last for convnets), run eagerly; "graph": those, one CUDA graph per batch
    (wdsembed.model.BatchGraph, a GPU only), as the flow ran it with autocast=True on a GPU until the thirty-sixth
    session; "compiled": that graph of torch.compile's kernels (wdsembed.model.compile_embedding), as the flow runs it
    by default on a GPU (the compile is not timed); "autocast": float32 weights under bfloat16 autocast. For the
    bfloat16 forms, min_cosine_vs_float32: their embeddings of the first 64 inputs against the float32 model's
    (random weights on random inputs: a comparison between forms, not the fidelity target, which is measured on
    photographs)."""
    from functools import partial

    import torch

    from wdsembed.model import embed_batch, load_model, to_bfloat16

    loaded = load_model(model_name, pretrained=False, device=device)
    _, h, w = loaded.data_config["input_size"]
    x = torch.randn(batch_size, 3, h, w, device=device)
    reference = None
    if form in ("bf16", "graph", "compiled"):
        reference = embed_batch(loaded, x[:64], autocast=False, normalize=True)
        to_bfloat16(loaded)
    run = partial(embed_batch, loaded)
    extra = {}
    if form in ("graph", "compiled"):
        from wdsembed.model import BatchGraph

        # batches as DALI hands them to the GPU worker: the model's dtype and memory format
        x = x.to(loaded.dtype).contiguous(memory_format=torch.channels_last if loaded.channels_last
                                          else torch.contiguous_format)
        start = time.perf_counter()
        graph = BatchGraph(loaded, tuple(x.shape), autocast=True, normalize=True, compiled=form == "compiled")
        extra["capture_seconds"] = round(time.perf_counter() - start, 1)
        run = lambda images, **_: graph(images)  # noqa: E731
    if reference is not None:
        out = run(x, autocast=True, normalize=True)[:64].float()
        extra["min_cosine_vs_float32"] = round(float(torch.nn.functional.cosine_similarity(out, reference).min()), 7)
    for _ in range(3):
        run(x, autocast=True, normalize=True)
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(x, autocast=True, normalize=True)
        n += batch_size
    sync(device)
    rate = n / (time.perf_counter() - start)
    del loaded, x
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"images_per_second": round(rate, 1), "dim_input": [h, w], "form": form, **extra}


def bench_dali(model_name: str, folder: str, device: str, batch_size: int, threads: int, **pipeline_options) -> dict:
    """(b) reading the tars + DALI decoding and preprocessing alone, into tensors on the device."""
    import timm

    from wdsembed import shards
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.preprocess import PreprocessRecipe

    model = timm.create_model(model_name, pretrained=False)
    recipe = PreprocessRecipe.from_data_config(timm.data.resolve_model_data_config(model))
    del model
    device_id = 0 if device.startswith("cuda") else None
    pipe = ImagePipeline(recipe, batch_size=batch_size, num_threads=threads, device_id=device_id, **pipeline_options)
    tars = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))

    def samples():
        for tar in tars:
            with open(tar, "rb") as f:
                for s in shards.iter_samples(f, extensions=("jpg",), shard=tar):
                    yield s.key, s.image

    # Warm-up on one shard, then the timed pass over all.
    for _ in pipe.process((k, v) for k, v in samples() if k.startswith(os.path.basename(tars[0])[:5])):
        pass
    n, checksum = 0, 0.0
    sync(device)
    start = time.perf_counter()
    for batch in pipe.process(samples()):
        n += len(batch.keys)
        checksum += float(batch.images[:, 0, 0, 0].sum()) if n < batch_size * 2 else 0.0
    sync(device)
    rate = n / (time.perf_counter() - start)
    pipe.close()
    del pipe
    return {"images_per_second": round(rate, 1), "images": n}


def bench_flow(model_name: str, folder: str, warm_folder: str, out: str, device: str, batch_size: int,
               threads: int, n_gpus: int, repeats: int = 1, workers_per_gpu: int = 1, **options) -> dict:
    """(c) the full flow (Prefect + Dask, tar to parquet) on warm workers of a cluster started here, with
    `workers_per_gpu` worker processes on each of its `n_gpus` GPUs. That sizes the cluster only: the runs reach it
    by its address (dask_address), where EmbedConfig.workers_per_gpu does nothing (the flow would log a warning
    saying so), so it is not theirs. `options` are more EmbedConfig fields (storage options for an S3 input,
    fidelity_sample=0 to leave the check out). With `repeats`, every option set in `options["variants"]` (a dict of
    name -> fields) is run in turn, `repeats` times each, on the same warm cluster: their rates as medians, under the
    same swings of the machine. A variant's `through="api"` runs it through wdsembed.api.run_shards (the same Dask
    workers, no Prefect) instead of the flow, its `switch_interval` sets the workers' GIL switch interval for it
    (else it stays as it is: Python's 5 ms unless an earlier variant changed it), and its `worker_env` (name ->
    value, None to unset) the workers' environment variables, followed by the warm-up run again (untimed), in which
    a worker builds its Worker anew where a variable it reads as it is built changed."""
    from distributed import Client, LocalCluster, get_task_stream

    import flows.embed as fe
    from tasks.embed import embed_and_log
    from wdsembed.config import EmbedConfig

    if device.startswith("cuda"):
        # As the flow's own runner builds it (wdsembed/cluster.py), started here once so workers stay warm.
        from wdsembed.cluster import start_gpu_cluster

        cluster = start_gpu_cluster(n_gpus, workers_per_gpu)  # its nannies give the workers the GPU settings
    else:  # the CPU stand-in: workers_per_gpu worker processes per "GPU"
        cluster = LocalCluster(n_workers=n_gpus * workers_per_gpu, threads_per_worker=1, processes=True)
    client = Client(cluster)
    try:
        variants = options.pop("variants", None) or {"": {}}

        def config(inp: str, force: bool, **more) -> EmbedConfig:
            return EmbedConfig(
                input=inp, output=out, model_name=model_name, pretrained=False, batch_size=batch_size,
                num_threads_per_worker=threads, device="auto" if device.startswith("cuda") else "cpu",
                dask_address=cluster.scheduler_address, force=force, **{**options, **more},
            )

        # Warm-up: every worker loads the model and builds its pipeline once (as in any long run).
        fe.run(config(warm_folder, True))
        client.run(_reset_peaks)
        # Each worker's GPU (the first of its CUDA_VISIBLE_DEVICES, as dask-cuda orders them), so that workers
        # sharing one count as one GPU in the idle time.
        gpu_of = dict(client.run(_worker_gpu).values())
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        sampler = GpuMemorySampler(list(client.run(os.getpid).values()))
        for _ in range(repeats):
            for name, more in variants.items():
                more = dict(more)
                through = more.pop("through", "flow")
                if "switch_interval" in more:  # the workers' GIL switch interval for this variant
                    client.run(sys.setswitchinterval, more.pop("switch_interval"))
                if "worker_env" in more:  # environment variables the workers read (None: unset)
                    client.run(_set_env, more.pop("worker_env"))
                    # One the Worker reads as it is built (wdsembed.worker.BUILD_ENV) makes each worker build a new
                    # one on its next shard: here, on the warm-up shard, not inside the timed run.
                    fe.run(config(warm_folder, True))
                if "flow_env" in more:  # environment variables the flow reads per run, in this process
                    _set_env(more.pop("flow_env"))
                switch = next(iter(client.run(sys.getswitchinterval).values()))
                _reset_gc()  # this process's own (the flow's, and Dask's scheduler's): see flow_process_gc
                start, started = time.perf_counter(), time.time()
                with sampler, get_task_stream(client) as stream:
                    if through == "flow":
                        manifest = fe.run(config(folder, True, **more))
                    else:  # the same shards on the same cluster through the Python API: Dask, no Prefect
                        from wdsembed.api import FLOW_ONLY, run_shards
                        from wdsembed.config import field_default

                        # the cluster is this one, already started: the fields that size the flow's own are the API's
                        # to refuse (wdsembed.api.FLOW_ONLY)
                        api_config = config(folder, True, **more).model_copy(
                            update={name: field_default(name) for name in FLOW_ONLY})
                        manifest = {"shards": {r.stem: r.to_dict() for r in run_shards(api_config)}}
                        manifest["totals"] = {"embedded_this_run": sum(r["embedded"]
                                                                       for r in manifest["shards"].values())}
                wall = time.perf_counter() - start
                # When each embedding task's function (Prefect's task engine, then the body) began on its worker.
                computes = sorted(ss["start"] for t in stream.data if embed_and_log.__name__ in str(t.get("key"))
                                  for ss in t.get("startstops", ()) if ss.get("action") == "compute")
                embedded = manifest["totals"]["embedded_this_run"]
                runs[name].append({"images_per_second": round(embedded / wall, 1), "images": embedded,
                                   "wall_seconds": round(wall, 2), "gpu_idle_fraction": idle_fraction(manifest, gpu_of),
                                   "workers_that_embedded": len({s["timeline"]["worker"]
                                                                 for s in manifest["shards"].values()
                                                                 if "embed_start" in (s.get("timeline") or {})}),
                                   "switch_interval_s": switch, **embedding_spans(manifest, wall, started),
                                   "fidelity": _fidelity_record(manifest.get("fidelity")),
                                   # the workers' own timing of the model as they started, against the shards' rate
                                   **({"gpu_use": manifest["gpu_use"]} if manifest.get("gpu_use") else {}),
                                   # a full collection here may explain a slow start (to_flow_start)
                                   "flow_process_gc": _gc_summary(started),
                                   **({"task_computes_s": [round(c - started, 3) for c in computes[:4]]}
                                      if computes else {}),
                                   # the build-time settings the workers' Worker ran with (a --worker-env check)
                                   "worker_built_with": [json.loads(w) for w in sorted(
                                       {json.dumps(w, sort_keys=True) for ws in client.run(_worker_built_with).values()
                                        for w in ws})]})
        peaks = client.run(_peaks)
        sampled = sampler.peak_bytes()  # None where NVML lists no worker process (another PID namespace)
        memory = {"gpus": n_gpus, "worker_processes": len(gpu_of),
                  "peak_gpu_memory_gib": round(max([p["gpu"] for p in peaks.values()]
                                                   + ([sampled / 2**30] if sampled else [])), 2),
                  "sampled_gpu_memory_gib": round(sampled / 2**30, 2) if sampled else None,
                  "gpu_memory_of": next(iter(peaks.values()))["gpu_source"],
                  "gpu_memory_split": next(iter(peaks.values()))["gpu_split"],
                  "dali_memory_env": next(iter(client.run(_dali_memory_env).values())),
                  "worker_gpu_env": next(iter(client.run(_worker_gpu_env).values())),
                  "peak_host_rss_gib": round(max(p["rss"] for p in peaks.values()), 2),
                  "worker_gc": next(iter(peaks.values()))["gc"]}
        results = {}
        for name, rs in runs.items():
            median = statistics.median(r["images_per_second"] for r in rs)
            results[name] = {**rs[-1], "images_per_second": round(median, 1), "runs": [r["images_per_second"] for r in rs],
                             **memory}
        return results[""] if list(results) == [""] else results
    finally:
        client.close()
        cluster.close()


def _worker_gpu() -> tuple[str, str]:
    """This worker process as the shards' timelines name it (wdsembed.shard), and its GPU."""
    import socket

    pid = f"{socket.gethostname()}:{os.getpid()}"
    return pid, os.environ.get("CUDA_VISIBLE_DEVICES", pid).split(",")[0]


def _worker_built_with() -> list[dict]:
    """The BUILD_ENV settings of this worker process's Worker(s) (wdsembed.worker.Worker.built_with)."""
    from wdsembed.worker import Worker

    return [w.built_with for w in Worker._current.values()]


def _dali_memory_env() -> dict:
    """A worker's DALI device memory settings (DALI's defaults where None: its own pool)."""
    from wdsembed.worker import DALI_MEMORY_SETTINGS

    return {name: os.environ.get(name) for name in DALI_MEMORY_SETTINGS}


def _worker_gpu_env() -> dict:
    """A worker's GPU settings, as its process started (CUDA reads its own only as the context is created): what
    shows that the cluster's nannies gave them (wdsembed.localworkers.GPUNanny)."""
    from wdsembed.worker import TORCH_ALLOC_ENV

    return {name: os.environ.get(name) for name in ("CUDA_DEVICE_MAX_CONNECTIONS", TORCH_ALLOC_ENV)}


def _set_env(env: dict) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _fidelity_record(record) -> dict | None:
    """The run's own fidelity check (issue #12) as the manifest records it, without the per-shard detail."""
    if not record:
        return None
    return {k: record[k] for k in ("images", "min_cosine", "mean_cosine", "threshold", "passed", "worst")
            if k in record}


def s3_flow(name: str, work: str, data: str, warm: str, out: str, device: str, batch_size: int, threads: int) -> dict:
    """The full flow reading the same shards from an S3-compatible server on loopback (tests/s3fast.py, in a child
    process) against reading them from local disk, back to back on one warm cluster each: issue #16's GPU-host
    ratio. Outputs go to local disk in both."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import s3fast

    os.environ.update(AWS_ACCESS_KEY_ID="AKIABENCHBENCHBENCH0", AWS_SECRET_ACCESS_KEY="bench-not-a-secret",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    local = bench_flow(name, data, warm, out + "-local", device, batch_size, threads, 1)
    with s3fast.spawn_server(work) as server:  # s3://<folder name>/ is the folder under `work`
        remote = bench_flow(name, f"s3://{os.path.basename(data)}", f"s3://{os.path.basename(warm)}", out + "-s3",
                            device, batch_size, threads, 1, storage_options={"endpoint_url": server.endpoint})
    same = compare_outputs(out + "-local", out + "-s3")
    return {"model": name, "local": local, "s3": remote, "outputs_identical": same["identical"],
            "s3_to_local_ratio": round(remote["images_per_second"] / local["images_per_second"], 3)}


def embedding_spans(manifest: dict, wall: float, started: Optional[float] = None) -> dict:
    """Where a run's wall time went: the rate while shards stream through the pipelines (images over the time
    covered by the shards' embedding spans, per worker: a worker's stream takes its shards one behind the other, the
    next one's span starting while the previous one's last batches finish), and the seconds of the run
    outside every worker's embedding span (flow start, indexing, the last shards' bookkeeping, the report)."""
    shards = [s for s in manifest["shards"].values() if "embed_start" in (s.get("timeline") or {})]
    if not shards:
        return {}
    per_worker = embedding_by_worker(shards)  # worker -> (images, seconds its embedding spans cover)
    first = min(s["timeline"]["embed_start"] for s in shards)
    last = max(s["timeline"]["embed_end"] for s in shards)
    bodies = [(s["timeline"]["start"], s["timeline"]["end"]) for s in shards
              if {"start", "end"} <= s["timeline"].keys()]
    # The median seconds of each step of a shard after its embedding (wdsembed.shard.process_shard's timeline).
    # (the validation runs beside the writes: its span is part of theirs)
    step_bounds = {"table": ("embed_end", "table"), "fidelity": ("table", "checked"),
                   "validate": ("checked", "validated"), "write": ("checked", "end")}
    steps = {}
    for name, (a, b) in step_bounds.items():
        spans = [s["timeline"][b] - s["timeline"][a] for s in shards if a in s["timeline"] and b in s["timeline"]]
        if spans:
            steps[name] = round(statistics.median(spans), 3)
    # The shard whose embedding ended last: its steps are the run's tail, which no other shard's stream overlaps.
    tail = max(shards, key=lambda s: s["timeline"]["embed_end"])["timeline"]
    last_steps = {name: round(tail[b] - tail[a], 3) for name, (a, b) in step_bounds.items() if {a, b} <= tail.keys()}
    return {"in_shard_images_per_second": round(sum(n / t for n, t in per_worker.values() if t > 0), 1),
            "seconds_outside_embedding": round(wall - (last - first), 2),
            # of which: from the run's start to the first shard's embedding, and after the last one's; and within
            # those, the orchestration's part: until the first task's body starts (flow run, plan, submit, the task
            # run's start on the worker), and after the last task's body ends (its end, the report, the run's end)
            **({"seconds_before_embedding": round(first - started, 2),
                "seconds_after_embedding": round(started + wall - last, 2)} if started else {}),
            **({"seconds_before_first_task": round(min(a for a, _ in bodies) - started, 2),
                "seconds_after_last_task": round(started + wall - max(b for _, b in bodies), 2)}
               if started and bodies else {}),
            **({"model_stream": model_stream(shards)} if any("model_busy_s" in s["timeline"] for s in shards) else {}),
            **({"orchestration_seconds": orchestration(manifest["timeline"], started, wall, bodies)}
               if started and bodies and {"start", "collected", "report"} <= (manifest.get("timeline") or {}).keys()
               else {}),
            "seconds_per_shard_after_embedding": steps,
            "last_shard_after_embedding": last_steps}


def model_stream(shards: list[dict]) -> dict:
    """The GPU's model stream over the run, from each shard's StreamMeter figures (wdsembed.worker): its busy
    seconds, the seconds it stood still between batches of a shard and before a shard's first batch (the stream's
    stalls at shard boundaries; each worker's first shard is left out, its wait being the time since the last run),
    and the idle share of the two."""
    timed = [s["timeline"] for s in shards if "model_busy_s" in s["timeline"]]
    first = {}
    for t in timed:
        if t["worker"] not in first or t["embed_start"] < first[t["worker"]]["embed_start"]:
            first[t["worker"]] = t
    busy = sum(t["model_busy_s"] for t in timed)
    within = sum(t["model_idle_s"] for t in timed)
    at_start = [t["model_wait_before_s"] or 0.0 for t in timed if t is not first[t["worker"]]]
    idle = within + sum(at_start)
    return {"busy_s": round(busy, 3), "idle_within_shards_s": round(within, 3),
            "idle_at_shard_starts_s": round(sum(at_start), 3),
            "longest_idle_at_a_shard_start_s": round(max(at_start, default=0.0), 3),
            "longest_idle_within_a_shard_s": round(max(t["model_longest_idle_s"] for t in timed), 3),
            "idle_fraction": round(idle / (busy + idle), 4) if busy + idle > 0 else 0.0}


def orchestration(run: dict, started: float, wall: float, bodies: list[tuple[float, float]]) -> dict:
    """The run's own steps (the manifest's timeline) around its task bodies: until the flow's body starts, the
    planning (indexing, finding finished outputs), the submitting, from the last submit until the first task's body
    starts on a worker (negative where the first task began before the last was submitted), from the last task's
    body end until its result is back in the flow, and from the report's start until the run has returned; and
    where the flow let its first tasks start alone (flows.embed, FIRST_TASK_HEAD_START_S), how long that took from
    the planning."""
    first, last = min(a for a, _ in bodies), max(b for _, b in bodies)
    planned = run.get("planned", run["start"])
    submitted = run.get("submitted", planned)
    return {name: round(value, 3) for name, value in {
        "to_flow_start": run["start"] - started, "plan": planned - run["start"], "submit": submitted - planned,
        "to_first_task": first - submitted, "last_task_to_flow": run["collected"] - last,
        "to_report": run["report"] - run["collected"], "report_and_end": started + wall - run["report"],
        **({"head_start": run["first_started"] - planned} if "first_started" in run else {})}.items()}


def idle_fraction(manifest: dict, gpu_of: Optional[dict] = None) -> float:
    """The share of each GPU's span (its first shard's embedding start to its last one's end) spent between
    shards, with no shard streaming through its pipeline and model: per-task overhead (Prefect states, cache
    records, the parquet write, validation) that did not overlap the next shard. `gpu_of` maps a timeline's worker
    (host:pid) to its GPU, where several worker processes share one (EmbedConfig.workers_per_gpu): a GPU is idle
    only while none of its workers streams a shard. Without it, each worker counts as a GPU of its own."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for shard in manifest["shards"].values():
        t = shard.get("timeline") or {}
        if "embed_start" in t:
            gpu = (gpu_of or {}).get(t["worker"], t["worker"])
            spans.setdefault(gpu, []).append((t["embed_start"], t["embed_end"]))
    total = idle = 0.0
    for intervals in spans.values():
        covered = merged(intervals)
        total += covered[-1][1] - covered[0][0]
        idle += sum(b[0] - a[1] for a, b in zip(covered, covered[1:]))
    return round(idle / total, 4) if total > 0 else 0.0


def compare_outputs(reference: str, other: str, embedding_column: str = "image_embedding") -> dict:
    """Whether two runs' outputs hold the same rows with the same embeddings: every shard's parquet, row by row.
    Reports the shards compared, the rows that differ in anything but the embedding, and the largest absolute
    difference between embeddings (0.0 when bit-identical)."""
    import numpy as np
    import pyarrow.parquet as pq

    stems = sorted(f for f in os.listdir(reference) if f.endswith(".parquet"))
    missing = sorted(set(stems) ^ {f for f in os.listdir(other) if f.endswith(".parquet")})
    rows = differing_rows = 0
    max_diff = 0.0
    for name in stems:
        if name in missing:
            continue
        a, b = pq.read_table(os.path.join(reference, name)), pq.read_table(os.path.join(other, name))
        rows += a.num_rows
        rest = [c for c in a.column_names if c != embedding_column]
        if set(a.column_names) != set(b.column_names) or not a.select(rest).equals(b.select(rest)):
            differing_rows += max(a.num_rows, b.num_rows)
            continue
        # Whole columns at once (a shard holds 10,000 x 768 floats): rows with and without an embedding must
        # match; the values of the rows that have one then line up in the flattened columns.
        ea, eb = (t.column(embedding_column).combine_chunks() for t in (a, b))
        missing_a, missing_b = (e.is_null().to_numpy(zero_copy_only=False) for e in (ea, eb))
        if (missing_a != missing_b).any():
            differing_rows += int((missing_a != missing_b).sum())
            continue
        va, vb = (e.flatten().to_numpy(zero_copy_only=False).astype(np.float32) for e in (ea, eb))
        if va.size:
            max_diff = max(max_diff, float(np.abs(va - vb).max()))
    return {"shards": len(stems), "rows": rows, "missing_shards": missing, "rows_differing": differing_rows,
            "max_abs_embedding_difference": max_diff,
            "identical": not missing and differing_rows == 0 and max_diff == 0.0}


# The worker's garbage collections during the timed runs, by generation: a full one walks every object of the
# process (torch, timm, Prefect, Dask: over half a million) with the GIL held, stalling the stream meanwhile.
def _gc_state() -> dict:
    """The GC figures of this process. Kept on the gc module: these functions reach the workers pickled by value
    (the bench runs as __main__), so a global of this module would be a fresh copy in each call."""
    import gc

    if not hasattr(gc, "wdsembed_bench"):
        state = {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "longest": 0.0, "began": 0.0, "full": []}

        def timer(phase: str, info: dict) -> None:
            if phase == "start":
                state["began"] = time.perf_counter()
            else:
                took = time.perf_counter() - state["began"]
                state["count"][info["generation"]] += 1
                state["seconds"][info["generation"]] += took
                state["longest"] = max(state["longest"], took)
                if info["generation"] == 2:  # when each full one began (epoch seconds), and how long it took
                    state["full"].append((time.time() - took, took))

        gc.callbacks.append(timer)
        gc.wdsembed_bench = state
    return gc.wdsembed_bench


def _reset_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _reset_gc()


def _reset_gc() -> None:
    _gc_state().update(count=[0, 0, 0], seconds=[0.0, 0.0, 0.0], longest=0.0, full=[])


def _gc_summary(started: float | None = None) -> dict:
    """This process's garbage collections since _reset_gc(); given the run's start (epoch seconds), also when each
    full one began within the run and how long it took."""
    collector = _gc_state()
    summary = {"collections": list(collector["count"]), "seconds": [round(x, 3) for x in collector["seconds"]],
               "longest_s": round(collector["longest"], 4)}
    if started is not None:
        summary["full_at_s"] = [[round(at - started, 3), round(took, 4)] for at, took in collector["full"]]
    return summary


def _peaks() -> dict:
    import torch

    gpu, source, split = 0.0, None, None
    if torch.cuda.is_available():
        # DALI's pools are outside torch's allocator (and never shrink): what this process holds on the device, as
        # the driver counts it. Where the driver does not say (another PID namespace), the device's whole use,
        # which also counts the bench's own process and its models.
        mine = _process_gpu_bytes()
        if mine is not None:
            gpu, source = max(torch.cuda.max_memory_reserved(), mine) / 2**30, "this worker process (NVML)"
        else:
            free, total = torch.cuda.mem_get_info()
            gpu, source = max(torch.cuda.max_memory_reserved(), total - free) / 2**30, "the whole device"
        # Where the bytes go: torch's allocator (weights, activations, the CUDA graphs' pools), and the rest of what
        # the driver counts for this process now (DALI's pools, nvJPEG, the CUDA context itself).
        reserved = torch.cuda.memory_reserved()
        split = {"torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                 "torch_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                 "torch_reserved_now_gib": round(reserved / 2**30, 2),
                 "outside_torch_now_gib": round((mine - reserved) / 2**30, 2) if mine is not None else None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"gpu": gpu, "gpu_source": source, "gpu_split": split, "rss": rss, "gc": _gc_summary()}


class GpuMemorySampler:
    """The device memory each of `pids` holds, as NVML counts it, sampled every `interval` seconds from a thread of
    this process while inside `with sampler:` (the worker itself is not disturbed). A pool that gives memory back
    between batches (cudaMallocAsync's) peaks during a run, not after it, where the workers' own figure is read."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids, self.interval, self.peaks = set(pids), interval, {}
        self._stop = None
        self._thread = None

    def __enter__(self) -> "GpuMemorySampler":
        import threading

        if _gpu_bytes_by_pid() is None:  # no NVML (a CPU machine): nothing to sample
            return self
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                for pid, used in (_gpu_bytes_by_pid() or {}).items():
                    if pid in self.pids:
                        self.peaks[pid] = max(self.peaks.get(pid, 0), used)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def peak_bytes(self) -> Optional[int]:
        return max(self.peaks.values()) if self.peaks else None


def _gpu_bytes_by_pid() -> Optional[dict[int, int]]:
    """Device memory per process on every GPU, from NVML (None where NVML cannot be used)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        used: dict[int, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
                used[p.pid] = used.get(p.pid, 0) + (p.usedGpuMemory or 0)
    except Exception:  # noqa: BLE001 - no NVML here: the callers fall back
        return None
    return used


def _process_gpu_bytes() -> Optional[int]:
    """Device memory held by this process on every GPU, from NVML (None where it lists no process of this PID)."""
    return (_gpu_bytes_by_pid() or {}).get(os.getpid())


def bench_reading(folder: str) -> dict:
    """Reading the tars alone (the Python side that feeds DALI): the ceiling of (b) from our own reader."""
    from wdsembed import shards

    tars = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
    n, start = 0, time.perf_counter()
    for tar in tars:
        with open(tar, "rb") as f:
            n += sum(1 for _ in shards.iter_samples(f, extensions=("jpg",), shard=tar))
    return {"images_per_second": round(n / (time.perf_counter() - start), 1)}


def dali_variants(model_name: str, folder: str, device: str, batch_size: int) -> list[dict]:
    """(b) under several decoder settings, to pick the defaults."""
    rows = []
    for fancy in (False, True):
        for threads in (8, 12):
            for load in (0.9, 0.65):
                opts = {"jpeg_fancy_upsampling": fancy, "hw_decoder_load": load}
                r = _stage(lambda: bench_dali(model_name, folder, device, batch_size, threads, **opts))
                rows.append({"threads": threads, **opts, **r})
                print("dali variant", rows[-1], flush=True)
    return rows


def fidelity(model_name: str, folder: str, device: str, n_images: int = 64, form: str = "bf16") -> dict:
    """Cosine similarity of the flow's embeddings (DALI path; the model in `form`, see bench_model) with timm's own
    PIL preprocessing + the fp32 model."""
    import io

    import timm
    import torch
    from PIL import Image, ImageOps

    from wdsembed import shards
    from wdsembed.model import embed_batch, load_model
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.preprocess import PreprocessRecipe

    import copy

    from wdsembed.model import to_bfloat16

    loaded = load_model(model_name, pretrained=False, device=device)
    recipe = PreprocessRecipe.from_data_config(loaded.data_config)
    transform = timm.data.create_transform(**loaded.data_config)
    reference = copy.copy(loaded)
    reference.model = copy.deepcopy(loaded.model)  # float32, same weights
    if form == "bf16":
        to_bfloat16(loaded)
    tar = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))[0]
    with open(tar, "rb") as f:
        samples = [(s.key, bytes(s.image)) for _, s in zip(range(n_images), shards.iter_samples(f, extensions=("jpg",), shard=tar))]
    pipe = ImagePipeline(recipe, batch_size=32, num_threads=4, device_id=0 if device.startswith("cuda") else None)
    ours = {}
    for batch in pipe.process(samples):
        emb = embed_batch(loaded, batch.images, autocast=True, normalize=True).float().cpu()
        ours.update(zip(batch.keys, emb))
    pipe.close()
    ref = torch.stack([transform(ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB")) for _, b in samples])
    ref_emb = embed_batch(reference, ref.to(device), autocast=False, normalize=True).float().cpu()
    cos = torch.stack([torch.dot(ours[k], ref_emb[i]) for i, (k, _) in enumerate(samples)])
    return {"model": model_name, "form": form, "images": len(samples), "min_cosine": round(float(cos.min()), 6),
            "mean_cosine": round(float(cos.mean()), 6), "reference": "timm create_transform on PIL + fp32 model"}


def _stage(fn, *args, **kwargs) -> dict:
    """One measurement; a failure is recorded with its traceback and the others still run."""
    import traceback

    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def flow_stage(args, name: str, data: str, warm: str, out: str, device: str, batch_size: int, threads: int,
               workers_per_gpu: int) -> dict:
    """(c) for one model on a cluster with `workers_per_gpu` worker processes per GPU: the row's full_flow, and with
    a paired option (--fidelity-cost, --layers, --switch-interval, --worker-env, --flow-env) the other half of
    each pair and the cost between them."""
    row: dict = {}
    if "flow" not in args.skip and (args.fidelity_cost or args.layers or args.switch_interval or args.worker_env
                                     or args.flow_env):
        shutil.rmtree(out, ignore_errors=True)
        if args.fidelity_cost:  # issue #12: the check's cost
            pair = ({"check_on": {}, "check_off": {"fidelity_sample": 0}}, "full_flow_no_check", "fidelity_cost")
        elif args.worker_env or args.flow_env:  # a setting read from the environment (the workers' or the
            # flow's), at its default and at VALUE
            where = "worker_env" if args.worker_env else "flow_env"
            _, var, value = args.worker_env or args.flow_env
            pair = ({"env_default": {where: {var: None}}, "env_set": {where: {var: value}}},
                    "full_flow_env_set", "env_default_cost")
        elif args.switch_interval:  # the GIL's hand-over latency: Python's 5 ms against a shorter interval
            pair = ({"switch_5ms": {"switch_interval": 0.005},
                     "switch_short": {"switch_interval": args.switch_interval[1]}},
                    "full_flow_short_switch", "default_switch_cost")
        else:  # Prefect's layer: the same shards through the Python API on the same Dask workers
            pair = ({"flow": {}, "api": {"through": "api"}}, "api_no_prefect", "prefect_cost")
        variants, other_key, cost_key = pair
        both = _stage(bench_flow, name, data, warm, out, device, batch_size, threads, 1,
                      args.fidelity_cost or args.layers
                      or int((args.switch_interval or args.worker_env or args.flow_env)[0]), variants=variants,
                      workers_per_gpu=workers_per_gpu)
        if "error" in both:
            row["full_flow"] = both
        else:
            first, second = variants
            row["full_flow"], row[other_key] = both[first], both[second]
            row[cost_key] = round(1 - both[first]["images_per_second"] / both[second]["images_per_second"], 4)
            # Each pair ran back to back: the median of the pairs' own costs is not moved by a slow spell that
            # spans a pair (the machine's swing is as large as a few percent).
            row[cost_key + "_paired"] = round(statistics.median(
                1 - a / b for a, b in zip(both[first]["runs"], both[second]["runs"])), 4)
            print(f"{name}: (c) " + ", ".join(
                f"{v} {both[v]['runs']} img/s (in shards {both[v].get('in_shard_images_per_second', 0):,.0f})"
                for v in variants) + f": {cost_key} {row[cost_key]:.1%} (paired {row[cost_key + '_paired']:.1%})",
                flush=True)
        print(f"{name}: (c) full flow {row['full_flow']}", flush=True)
    elif "flow" not in args.skip:
        shutil.rmtree(out, ignore_errors=True)
        row["full_flow"] = _stage(bench_flow, name, data, warm, out, device, batch_size, threads, 1,
                                  args.repeats, workers_per_gpu=workers_per_gpu)
        print(f"{name}: (c) full flow {row['full_flow']}", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+")
    p.add_argument("--shards", type=int)
    p.add_argument("--per-shard", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--model-seconds", type=float)
    p.add_argument("--gpus", type=int, nargs="+", help="full-flow scaling runs over these GPU counts (ViT-B/16)")
    p.add_argument("--small", action="store_true", help="the CPU path on a tiny model (CI)")
    p.add_argument("--skip", nargs="*", default=[], choices=["model", "dali", "flow", "fidelity"])
    p.add_argument("--variants", action="store_true", help="also time DALI under several decoder settings")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workdir", help="where shards are built (default: a temp folder)")
    p.add_argument("--fidelity-cost", type=int, metavar="REPEATS",
                   help="run the full flow with the fidelity check on and off, in turn, REPEATS times each (issue #12)")
    p.add_argument("--layers", type=int, metavar="REPEATS",
                   help="run the full flow and the Python API (same Dask workers, no Prefect) in turn, REPEATS times "
                        "each: what Prefect's layer costs")
    p.add_argument("--switch-interval", type=float, nargs=2, metavar=("REPEATS", "SECONDS"),
                   help="run the full flow with the workers' GIL switch interval at Python's 5 ms and at SECONDS, in "
                        "turn, REPEATS times each: how long the model's thread waits to get the GIL back")
    p.add_argument("--worker-env", nargs=3, metavar=("REPEATS", "NAME", "VALUE"),
                   help="run the full flow with the workers' environment variable NAME unset and set to VALUE, in "
                        "turn, REPEATS times each (a Worker setting: read per run, such as WDSEMBED_READ_AHEAD, or as "
                        "the Worker is built, such as WDSEMBED_COPY_INPUTS, which then builds it again, untimed)")
    p.add_argument("--flow-env", nargs=3, metavar=("REPEATS", "NAME", "VALUE"),
                   help="as --worker-env, for a variable the flow reads in this process")
    p.add_argument("--shards-per-gpu", type=int, metavar="N",
                   help="shards each GPU worker holds at once (default: wdsembed.cluster.SHARDS_PER_GPU): one in its "
                        "pipeline, the others' bookkeeping and writes overlapping it")
    p.add_argument("--workers-per-gpu", type=int, nargs="+", default=[1], metavar="N",
                   help="(c) on a cluster with N worker processes on each GPU (EmbedConfig.workers_per_gpu); with "
                        "several values, on one cluster of each size in turn (by_workers_per_gpu, each with its "
                        "ratio to the fastest model only); the row's own full_flow is the first's")
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="time the full flow R times on its warm cluster and report the median (runs: each one)")
    p.add_argument("--stream-meter", action="store_true",
                   help="time the model's stream in every shard (WDSEMBED_STREAM_METER=1: model_stream in the results)")
    p.add_argument("--s3", action="store_true",
                   help="the full flow from a loopback S3 server against local disk (issue #16; ViT-B/16 on a GPU)")
    args = p.parse_args()
    if args.stream_meter:  # before any cluster starts: its workers inherit it
        from wdsembed.worker import STREAM_METER_ENV

        os.environ[STREAM_METER_ENV] = "1"
    # Set here, not at import: the tests import this module's helpers into their own process.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from wdsembed.worker import set_gpu_process_environment

    if not args.small:  # (a) and (b) on a GPU as the flow's workers run (c), before the first CUDA call
        set_gpu_process_environment()
    import wdsembed.cluster

    if args.shards_per_gpu:  # the GPU workers' threads and each task's GPU share, read when a cluster or run starts
        wdsembed.cluster.SHARDS_PER_GPU = args.shards_per_gpu
        wdsembed.cluster.GPU_SHARE_PER_SHARD = math.floor(100 / args.shards_per_gpu) / 100

    import torch

    gpu = torch.cuda.is_available() and not args.small
    device = "cuda:0" if gpu else "cpu"
    models = args.models or (GPU_MODELS if gpu else CPU_MODELS)
    n_shards = args.shards or (16 if gpu else 2)
    per_shard = args.per_shard or (10_000 if gpu else 16)  # img2dataset's default shard size
    batch_size = args.batch_size or (256 if gpu else 8)
    threads = args.threads or (8 if gpu else 1)
    model_seconds = args.model_seconds or (8.0 if gpu else 2.0)

    work = args.workdir or tempfile.mkdtemp(prefix="wdsembed-bench-")
    data, warm, out = (os.path.join(work, d) for d in ("shards", "warm", "out"))
    t = time.perf_counter()
    total = build_shards(data, n_shards, per_shard, unique=min(n_shards * per_shard, 1000))
    # one warm-up shard per worker: each builds its pipeline and model there, not in a timed run
    build_shards(warm, (max(args.gpus) if args.gpus else 1) * max(args.workers_per_gpu), min(per_shard, 64),
                 unique=64, seed=1)
    print(f"built {n_shards} shards x {per_shard} photos ({total} images) in {time.perf_counter() - t:.1f} s; "
          f"device {torch.cuda.get_device_name(0) if gpu else 'cpu'}", flush=True)

    results = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "gpus_visible": torch.cuda.device_count(),
               "shards": n_shards, "per_shard": per_shard, "batch_size": batch_size, "threads": threads,
               "shards_per_gpu": wdsembed.cluster.SHARDS_PER_GPU, "workers_per_gpu": args.workers_per_gpu,
               "models": {}, "scaling": {}, "fidelity": None,
               # bench/device.sh mps: the run's processes were clients of CUDA's Multi-Process Service
               "cuda_mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}
    results["reading_only"] = bench_reading(data)
    print(f"reading the tars alone: {results['reading_only']['images_per_second']:,.0f} img/s", flush=True)
    if args.variants:
        results["dali_variants"] = dali_variants(models[0], data, device, batch_size)
    for name in models:
        row = {}
        if "model" not in args.skip:
            row["model_only"] = _stage(bench_model, name, device, batch_size, model_seconds, "autocast")
            row["bf16_model_only"] = _stage(bench_model, name, device, batch_size, model_seconds, "bf16")
            forms = [row["bf16_model_only"]]
            if gpu:
                row["graph_model_only"] = _stage(bench_model, name, device, batch_size, model_seconds, "graph")
                row["compiled_model_only"] = _stage(bench_model, name, device, batch_size, model_seconds,
                                                    "compiled")
                forms += [row["graph_model_only"], row["compiled_model_only"]]
            # The fastest form measured: the bar the full flow is held to.
            row["fastest_model_only"] = max(forms, key=lambda r: r.get("images_per_second", 0))
            print(f"{name}: (a) model only {row['model_only'].get('images_per_second', 0):,.0f} img/s (autocast), "
                  f"{row['bf16_model_only'].get('images_per_second', 0):,.0f} img/s (bf16 weights)"
                  + (f", {row['graph_model_only'].get('images_per_second', 0):,.0f} img/s (bf16, CUDA graph), "
                     f"{row['compiled_model_only'].get('images_per_second', 0):,.0f} img/s (bf16, torch.compile, "
                     "CUDA graph)" if gpu else ""), flush=True)
        if "dali" not in args.skip:
            row["dali_only"] = _stage(bench_dali, name, data, device, batch_size, threads)
            print(f"{name}: (b) DALI only {row['dali_only'].get('images_per_second', 0):,.0f} img/s", flush=True)
        for n in args.workers_per_gpu:  # (c), on a cluster of each size in turn
            part = flow_stage(args, name, data, warm, out, device, batch_size, threads, n)
            if n == args.workers_per_gpu[0]:  # the row's own (c): the first size given
                row.update(part)
            if len(args.workers_per_gpu) > 1:
                row.setdefault("by_workers_per_gpu", {})[str(n)] = part.get("full_flow")
        if isinstance(row.get("full_flow"), dict) and row["full_flow"].get("fidelity"):
            row["flow_fidelity"] = row["full_flow"]["fidelity"]
            row["min_cosine"] = row["flow_fidelity"].get("min_cosine")  # the run's own check (below: 64 more images)
        failed = {k for k, v in row.items() if isinstance(v, dict) and "error" in v}
        row = {k: v for k, v in row.items() if k not in failed} | {"errors": [row[k]["error"] for k in failed]}
        if {"model_only", "dali_only", "full_flow"} <= row.keys():
            limit = min(row["model_only"]["images_per_second"], row["dali_only"]["images_per_second"])
            row["ratio"] = round(row["full_flow"]["images_per_second"] / limit, 3)
            print(f"{name}: (c) / min(a, b) = {row['ratio']}", flush=True)
        if {"fastest_model_only", "full_flow"} <= row.keys():
            fastest = max(row["fastest_model_only"]["images_per_second"], row["model_only"]["images_per_second"])
            row["ratio_to_fastest"] = round(row["full_flow"]["images_per_second"] / fastest, 3)
            row["gpu_idle_fraction"] = row["full_flow"]["gpu_idle_fraction"]
            print(f"{name}: (c) / fastest (a) = {row['ratio_to_fastest']}; idle between shards "
                  f"{row['gpu_idle_fraction']:.1%}", flush=True)
            for n, flow in row.get("by_workers_per_gpu", {}).items():
                if isinstance(flow, dict) and "images_per_second" in flow:
                    flow["ratio_to_fastest"] = round(flow["images_per_second"] / fastest, 3)
                    print(f"{name}: {n} worker(s) per GPU: {flow['images_per_second']:,.0f} img/s {flow['runs']}, "
                          f"(c) / fastest (a) = {flow['ratio_to_fastest']}; idle between shards "
                          f"{flow['gpu_idle_fraction']:.1%}", flush=True)
        if "fidelity" not in args.skip and gpu:
            for form in ("bf16", "autocast"):
                row[f"fidelity_{form}"] = _stage(fidelity, name, data, device, 64, form)
                print(f"{name}: fidelity ({form}) {row[f'fidelity_{form}']}", flush=True)
            row["min_cosine"] = row["fidelity_bf16"].get("min_cosine")
        results["models"][name] = row

    if args.gpus:
        name = "vit_base_patch16_clip_224.openai" if gpu else models[0]
        unit = "GPU(s)" if gpu else "CPU worker(s)"
        outs = {}
        for n in args.gpus:
            outs[n] = f"{out}-{n}"
            shutil.rmtree(outs[n], ignore_errors=True)
            results["scaling"][n] = _stage(bench_flow, name, data, warm, outs[n], device, batch_size, threads, n)
            if "error" in results["scaling"][n]:
                print(f"scaling on {n} {unit} failed: {results['scaling'].pop(n)['error']}", flush=True)
                continue
            print(f"scaling {name} on {n} {unit}: {results['scaling'][n]['images_per_second']:,.0f} img/s", flush=True)
        base_n = next(iter(results["scaling"]), None)
        for n, r in results["scaling"].items():
            r["speedup_vs_1"] = round(r["images_per_second"] / results["scaling"][base_n]["images_per_second"], 2)
            r["speedup"] = r["speedup_vs_1"]
            if n != base_n:
                # The same shards on more workers must give the same outputs: each shard is one task on one device.
                r["outputs_vs_first"] = compare_outputs(outs[base_n], outs[n])
                print(f"outputs on {n} {unit} vs {base_n}: {r['outputs_vs_first']}", flush=True)
        print("speedups:", {n: r["speedup_vs_1"] for n, r in results["scaling"].items()}, flush=True)

    if args.s3:
        name = "vit_base_patch16_clip_224.openai" if gpu else models[0]
        results["s3"] = _stage(s3_flow, name, work, data, warm, out, device, batch_size, threads)
        print(f"S3 against local disk: {results['s3']}", flush=True)

    if "fidelity" not in args.skip:
        results["fidelity"] = _stage(fidelity, models[min(1, len(models) - 1)], data, device)
        print(f"fidelity: {results['fidelity']}", flush=True)

    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
