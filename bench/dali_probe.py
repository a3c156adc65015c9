"""Where the GPU time goes: our ImagePipeline against DALI's own webdataset reader on the same photos, then
DALI and a model together, as the flow's Worker runs them (the model on a CUDA stream of its own).

    python bench/dali_probe.py [--images 16000] [--batch-size 256] [--threads 12] [--repeats 9] [--model vit_base_patch16_clip_224.openai]
    python bench/dali_probe.py --geometry-only [--images 2560] [--repeats 9] [--threads 1] [--only E B Bs]   # CPU, no decoding
    python bench/dali_probe.py --memory [--images 16000] [--model resnet50.a1_in1k]          # GPU memory per setting

Each line is images/s for one variant, so that one run says which change matters. The lines take turns, pass after
pass (--repeats rounds), and each gives the median of its passes: a single short pass (16,000 images take 0.6 s at
25,000 images/s) swung by a third between runs on the same machine.
- how the bytes reach DALI: copied into DALI's (pinned) buffers, or read in place from ours;
- our preprocessing recipe (header-sized resize, per-sample crop) against a plain resize + crop;
- the decompression-bomb guard (header sizes checked on the host) on or off;
- DALI and the model overlapped (Worker.embed) or not, against the sequential bound 1 / (1/a + 1/b).

--geometry-only times what sizes the resize and crop, with decoding left out, on the CPU (see geometry_only()).
--memory: a GPU worker's peak device memory under DALI's memory settings, each in a fresh process (see memory()).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--model", default="vit_base_patch16_clip_224.openai")
    p.add_argument("--geometry-only", action="store_true",
                   help="CPU, no decoding: peek_image_shape vs the host geometry vs the old in-graph geometry")
    p.add_argument("--repeats", type=int, default=9, help="interleaved passes per variant (line, rung)")
    p.add_argument("--rungs", nargs="+", help="--ladder: only these rungs (L0 ... L10), and the model alone")
    p.add_argument("--worker-only", action="store_true", help="--ladder: only the rungs from L8 on, and the model")
    p.add_argument("--kernels", action="store_true",
                   help="Worker.embed fed by the tar reader under torch.profiler: GPU time per kernel, DALI's and the "
                        "model's, and the GPU's busy share of the wall time (a chrome trace goes to $OUT)")
    p.add_argument("--ladder", action="store_true",
                   help="from a bare external source to ImagePipeline fed by the tar reader, one step at a time")
    p.add_argument("--memory", action="store_true",
                   help="a GPU worker's peak device memory (DALI alone, then Worker.embed) under DALI's memory "
                        "settings, each variant in a fresh process")
    p.add_argument("--only", nargs="+", default=[],
                   help="--memory: only the variants whose name holds one of these; --geometry-only: only these "
                        "variants (A, the ratios' base, always runs)")
    p.add_argument("--memory-run", help=argparse.SUPPRESS)  # one variant of --memory, in its own process (JSON)
    args = p.parse_args()
    if args.geometry_only:
        return geometry_only(args)
    if args.memory_run:
        return memory_run(args)
    if args.memory:
        return memory(args)
    from wdsembed.worker import set_gpu_process_environment

    set_gpu_process_environment()  # as the flow's GPU workers run, before this process's first CUDA call
    if args.ladder:
        return ladder(args)
    if args.kernels:
        return kernels(args)

    import statistics

    import numpy as np
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from wdsembed.config import EmbedConfig
    from wdsembed.imagesize import image_size
    from wdsembed.model import embed_batch
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.preprocess import dali_preprocess, feed_geometry, split_geometry
    from wdsembed.worker import Worker

    tars, samples = photographs(args.images)
    B, T = args.batch_size, args.threads
    gpu = torch.cuda.is_available()  # without one, the same variants on the CPU path: a smoke test of this script
    device_id, decode = (0, "mixed") if gpu else (None, "cpu")
    recipe = clip_recipe()
    runs: dict[str, Callable[[], int]] = {}
    closing: list = []

    # 1. ImagePipeline as the flow builds it, and with each suspect changed.
    bomb_guard = EmbedConfig(input="x", output="y").max_image_pixels
    # (a GPU worker has DALI read the encoded images in place since the thirty-ninth session, a CPU one copies them)
    for label, opts in (("copy_inputs=True (copied)", {}),
                        ("copy_inputs=False (read in place)", {"copy_inputs": False}),
                        (FLOW_LINE, {"max_pixels": bomb_guard, "copy_inputs": not gpu}),
                        ("copy_inputs=True prefetch=4", {"prefetch": 4})):
        pipe = ImagePipeline(recipe, batch_size=B, num_threads=T, device_id=device_id, **opts)
        closing.append(pipe)
        runs[f"ImagePipeline {label}"] = lambda pipe=pipe: sum(len(b.keys) for b in pipe.process(samples))

    # 2. Bare DALI graphs: reader or external source, our recipe or a plain one; no Python logic of ours. Our
    # recipe's geometry (header sizes + NumPy) is computed ahead, outside the timing (ImagePipeline's numbers above
    # include it), and fed per batch; the reader gets it in its own (file) order from a source callback.
    steps = len(samples) // B
    sizes = np.array([image_size(d) for _, d in samples])
    n_samples = len(samples)

    def geometry_of(i):  # batch i of a stream that wraps around the samples, as the reader does
        return recipe.source_geometry(sizes[np.arange(i * B, (i + 1) * B) % n_samples])

    geometries = [geometry_of(i) for i in range(steps)]
    batches = [[np.frombuffer(d, np.uint8) for _, d in samples[i * B:(i + 1) * B]] for i in range(steps)]

    def plain(jpg, source):
        images = fn.decoders.image(jpg, device=decode, output_type=types.RGB,
                                   **({"hw_decoder_load": 0.9} if gpu else {}))
        return fn.crop_mirror_normalize(fn.resize(images, resize_shorter=256), crop=(224, 224), dtype=types.FLOAT,
                                        output_layout="CHW")

    def ours(jpg, source):
        geometry = None  # external sources, fed with the bytes
        if source == "reader":
            batch_numbers = iter(range(1 << 62))

            def next_geometry():
                return geometry_of(next(batch_numbers))

            geometry = split_geometry(fn.external_source(source=next_geometry, dtype=types.FLOAT, ndim=2), recipe)
        return dali_preprocess(jpg, recipe, decode, geometry=geometry)

    def bare(source, graph_fn):
        @pipeline_def(batch_size=B, num_threads=T, device_id=device_id, prefetch_queue_depth=2, exec_dynamic=True)
        def graph():
            if source == "reader":
                jpg = fn.readers.webdataset(paths=tars, ext=["jpg"], missing_component_behavior="skip")
            else:
                jpg = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=source.endswith("place"))
            return graph_fn(jpg, source)

        pipe = graph()
        pipe.build()
        if source == "reader":
            return lambda: sum(B for _ in range(steps) if pipe.run())

        def feed(pipe, i):
            pipe.feed_input("enc", batches[i])
            if graph_fn is ours:
                feed_geometry(pipe, geometries[i])
        return fed_loop(pipe, feed, lambda pipe, i: pipe.outputs(), steps, B)

    for source in BARE_SOURCES:
        for name, graph_fn in ((PLAIN, plain), (OURS, ours)):
            runs[f"bare {source}: {name}"] = bare(source, graph_fn)

    # 3. DALI and the model together, as Worker.embed runs them (the model on a stream of its own on a GPU).
    config = EmbedConfig(input="x", output="y", model_name=args.model, pretrained=False, batch_size=B,
                         num_threads_per_worker=T)
    worker = Worker(config)
    x = torch.randn(B, *worker.recipe.input_size, device=worker.device)

    def model_only():
        for _ in range(steps):
            embed_batch(worker.loaded, x, autocast=True, normalize=True)
        return steps * B

    model_line = f"{args.model} model only"
    runs[model_line] = model_only
    runs["Worker.embed, own stream (the flow)"] = \
        lambda: len(worker.embed(iter(samples), autocast=True, normalize=True, on_batch=lambda n: None)[0])

    counts, times = interleaved(runs, args.repeats, torch.cuda.synchronize if gpu else (lambda: None))
    print(f"probe: {len(samples)} photographs, batch {B}, {T} threads, {args.repeats} interleaved passes per line; "
          f"{'GPU (mixed decoding)' if gpu else 'CPU'}. img/s: median of the passes (slowest-fastest)")
    rates = {}
    for name, ts in times.items():
        per_pass = sorted(counts[name] / t for t in ts)
        rates[name] = statistics.median(per_pass)
        print(f"{name:60s} {rates[name]:9,.0f} img/s ({per_pass[0]:,.0f}-{per_pass[-1]:,.0f})", flush=True)
    # Each round runs every line once, back to back: a ratio within a round compares passes that met the same load
    # from other processes, which the medians of separate passes do not.
    for source in BARE_SOURCES:
        ours_line, plain_line = f"bare {source}: {OURS}", f"bare {source}: {PLAIN}"
        paired = sorted(p / o for o, p in zip(times[ours_line], times[plain_line]))  # time ratio = rate ratio
        print(f"{OURS} / {PLAIN}, bare {source}: {rates[ours_line] / rates[plain_line]:.2f} on medians; paired "
              f"rounds {statistics.median(paired):.2f} ({paired[0]:.2f}-{paired[-1]:.2f})", flush=True)
    dali_rate = rates[f"ImagePipeline {FLOW_LINE}"]
    bound = 1 / (1 / rates[model_line] + 1 / dali_rate)
    print(f"{'sequential bound 1/(1/a+1/b)':60s} {bound:9,.0f} img/s; min(a, b) "
          f"{min(rates[model_line], dali_rate):,.0f}", flush=True)
    for pipe in closing:
        pipe.close()
    worker.close()
    return 0


# The main probe's lines, by name: the flow's own, and the bare graphs' sources and recipes.
FLOW_LINE = "max_pixels guard, in place on a GPU (the flow)"
BARE_SOURCES = ("reader", "external copy", "external in place")
PLAIN, OURS = "plain resize", "our recipe"


def interleaved(runs: dict[str, Callable[[], int]], repeats: int, sync: Callable[[], None]
                ) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Each run once to warm up (its count of images), then `repeats` rounds of every run once, back to back, so that
    the machine's swings hit them alike: the images each counts, and its wall time per round."""
    counts = {name: run() for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync()
            t = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t)
    return counts, times


def fed_loop(pipe, feed, collect, steps: int, batch_size: int) -> Callable[[], int]:
    """A pass over `steps` batches through an external-source pipeline, two iterations in flight as ImagePipeline
    keeps them: `feed(pipe, i)` feeds batch i, `collect(pipe, i)` takes its outputs. The pipeline is primed here
    (its first schedule_run prefetches two iterations); the pass returns the images it ran."""
    def run():
        for i in range(steps):
            feed(pipe, i)
            pipe.schedule_run()
            if i >= 1:
                collect(pipe, i - 1)
        collect(pipe, steps - 1)
        return steps * batch_size
    feed(pipe, 0)
    feed(pipe, 1)
    pipe.schedule_run()
    collect(pipe, 0), collect(pipe, 1)
    return run


def ladder(args: argparse.Namespace) -> int:
    """From the bare external-source graph (the probe's fastest line) to ImagePipeline fed by the tar reader in a
    background thread (as Worker.embed runs it, without the model), adding one thing per rung. The rungs take turns,
    pass after pass, so the machine's swings hit them alike; the first rung that drops names the cost.

    L0  bare graph (bytes + geometry sources, our recipe), numpy bytes fed, outputs() synchronised with the host
    L1  the same, bytes fed as TensorCPU views (as ImagePipeline feeds them)
    L2  ImagePipeline's own graph (define_pipeline: + the ids, in the geometry rows, and those rows as an output)
    L3  + outputs bound to a CUDA stream of our own (no host synchronisation)
    L4  + the DLPack hand-over to torch and the ids check (ImagePipeline._collect's work)
    L5  + the per-sample host work in the loop (sniff, header size, cut-short check, TensorCPU, NumPy geometry)
    L6  ImagePipeline.process(samples) as it is, current stream; and warmed up with batches of one image (as before)
    L7  ImagePipeline.process(samples, cuda_stream=own stream); and with three batches in flight instead of two
    L8  L7 fed by the tar reader (shards.iter_samples over the shards, in memory)
    L9  L8 in a background thread (wdsembed.threads.in_background), the consumer dropping each batch
    L10 Worker.embed (the model) fed by the tar reader; on the GPU also with DALI two iterations deep instead of
        four, with two thirds of the DALI threads, with the other copy_inputs (the encoded bytes copied into DALI's
        buffers as they are fed, or read in place), and with the model held to two batches ahead of the GPU. Run it
        under CUDA_DEVICE_MAX_CONNECTIONS=8 (a variable read when the process creates its CUDA context; the probe
        otherwise takes the 32 hardware queues the flow's GPU workers run with) to see streams sharing the GPU's 8
        default hardware queues hold DALI behind the model. Measured once and dropped, with no effect (ViT-B/16,
        nvidia-h200, about 7,350 images/s each): the model on a high-priority stream, every JPEG to the hardware
        decoder, the model as one CUDA graph, and the batches copied out of DALI on a stream of their own instead of
        the model's. The high-priority stream again in the thirty-third session, with ResNet-50 the bottleneck:
        12,681 against 12,803 images/s. And L10 as one Worker.embed call per shard, back to back: what a shard
        boundary costs (the pipeline drained and filled again); and from three threads at once, where the worker's
        stream feeds each shard right behind the previous one.
    L11 process_shard, one shard at a time, and three at a time in threads as a GPU worker runs them (no Dask, no
        Prefect); each with its last pass's timeline: pipeline time in shards, idle between them, step medians.
    Also: the tar reader and the host checks alone, no DALI, microseconds per image on this CPU.
    """
    import io
    import statistics

    import numpy as np
    import torch
    from nvidia.dali import pipeline_def
    from nvidia.dali.tensors import TensorCPU

    from wdsembed import shards
    from wdsembed.imagesize import image_size
    from wdsembed.pipeline import ImagePipeline, cut_short, define_pipeline, sniff_image
    from wdsembed.preprocess import dali_preprocess, feed_geometry, geometry_inputs, put_ids, read_ids
    from wdsembed.threads import in_background

    tars, samples = photographs(args.images)
    B, T = args.batch_size, args.threads
    gpu = torch.cuda.is_available()
    device_id, decode = (0, "mixed") if gpu else (None, "cpu")
    recipe = clip_recipe()
    steps = len(samples) // B
    samples = samples[: steps * B]
    datas = [[d for _, d in samples[i * B:(i + 1) * B]] for i in range(steps)]
    arrays = [[np.frombuffer(d, np.uint8) for d in batch] for batch in datas]
    views = [[TensorCPU(a) for a in batch] for batch in arrays]
    sizes = [np.array([image_size(d) for d in batch], dtype=np.int64) for batch in datas]
    geometries = [recipe.source_geometry(s) for s in sizes]
    tar_bytes = []
    for tar in tars:
        with open(tar, "rb") as f:
            tar_bytes.append((tar, f.read()))
    stream = torch.cuda.Stream() if gpu else None

    @pipeline_def(batch_size=B, num_threads=T, device_id=device_id, prefetch_queue_depth=2, exec_dynamic=True)
    def bare():
        from nvidia.dali import fn, types

        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return dali_preprocess(enc, recipe, decode, geometry=geometry_inputs(recipe))

    def feed_np(pipe, i):
        pipe.feed_input("encoded", arrays[i])
        feed_geometry(pipe, geometries[i])

    def feed_views(pipe, i):
        pipe.feed_input("encoded", views[i])
        feed_geometry(pipe, geometries[i])

    next_id = [0]

    def next_ids():
        next_id[0] += B
        return np.arange(next_id[0] - B, next_id[0], dtype=np.int64)

    with_ids = [recipe.source_geometry(s, np.zeros(len(s), np.int64)) for s in sizes]  # a row for the ids

    def feed_ids(pipe, i):
        pipe.feed_input("encoded", views[i])
        put_ids(with_ids[i], next_ids())  # in place: the last feed copied it
        feed_geometry(pipe, with_ids[i])

    def feed_host(pipe, i):  # what ImagePipeline._batches and _feed do per batch
        tensors, hw = [], []
        for d in datas[i]:
            if sniff_image(d) is None and cut_short(d) is None:
                hw.append(image_size(d))
                tensors.append(TensorCPU(d))
        g = recipe.source_geometry(np.array(hw, dtype=np.int64), next_ids())
        pipe.feed_input("encoded", tensors)
        feed_geometry(pipe, g)

    def collect_sync(pipe, i):
        pipe.outputs()

    def collect_stream(pipe, i):
        pipe.outputs(cuda_stream=stream)

    def collect_torch(pipe, i):
        images, geometry = pipe.outputs(cuda_stream=stream)
        read_ids(np.asarray(geometry.as_tensor()))
        with torch.cuda.stream(stream) if gpu else contextlib.nullcontext():
            torch.from_dlpack(images.as_tensor())

    def full():
        pipe = define_pipeline(recipe, batch_size=B, num_threads=T, device_id=device_id)
        pipe.build()
        return pipe

    runs = {}
    pipes = []
    for name, make, feed, collect in (("L0", bare, feed_np, collect_sync), ("L1", bare, feed_views, collect_sync),
                                      ("L2", full, feed_ids, collect_sync), ("L3", full, feed_ids, collect_stream),
                                      ("L4", full, feed_ids, collect_torch), ("L5", full, feed_host, collect_torch)):
        pipe = make()
        if make is bare:
            pipe.build()
        pipes.append(pipe)
        runs[name] = fed_loop(pipe, feed, collect, steps, B)

    image_pipe = ImagePipeline(recipe, batch_size=B, num_threads=T, device_id=device_id)

    def from_tars():
        for tar, data in tar_bytes:
            for s in shards.iter_samples(io.BytesIO(data), extensions=("jpg",), shard=tar):
                yield s.key, s.image

    class OneImageWarmup(ImagePipeline):
        """ImagePipeline as it was warmed up before: batches of one image."""

        def _warmup(self):
            n, self.batch_size = self.batch_size, 1
            try:
                super()._warmup()
            finally:
                self.batch_size = n

    one_image = OneImageWarmup(recipe, batch_size=B, num_threads=T, device_id=device_id)
    runs["L6"] = lambda: sum(len(b.keys) for b in image_pipe.process(samples))
    runs["L6 warmed up with batches of one image"] = lambda: sum(len(b.keys) for b in one_image.process(samples))
    runs["L7"] = lambda: sum(len(b.keys) for b in image_pipe.process(samples, cuda_stream=stream))
    deeper = ImagePipeline(recipe, batch_size=B, num_threads=T, device_id=device_id, prefetch=3)
    runs["L7 prefetch 3"] = lambda: sum(len(b.keys) for b in deeper.process(samples, cuda_stream=stream))
    runs["L8"] = lambda: sum(len(b.keys) for b in image_pipe.process(from_tars(), cuda_stream=stream))
    runs["L9"] = lambda: sum(len(b.keys) for b in in_background(image_pipe.process(from_tars(), cuda_stream=stream)))

    def host_only():
        n = 0
        for key, d in from_tars():
            if sniff_image(d) is None and cut_short(d) is None:
                image_size(d)
                TensorCPU(d)
            n += 1
        return n

    def tar_only():
        return sum(1 for _ in from_tars())

    runs["tar reader alone"] = tar_only
    runs["tar reader + host checks, no DALI"] = host_only

    # The model joins: Worker.embed as the flow runs it, fed by the tar reader, at Python's default GIL switch
    # interval (5 ms) and at a short one; and the model alone on resident tensors, as Worker.embed runs it.
    from wdsembed.config import EmbedConfig
    from wdsembed.model import embed_batch
    from wdsembed.worker import Worker

    config = EmbedConfig(input="x", output="y", model_name=args.model, pretrained=False, batch_size=B,
                         num_threads_per_worker=T)
    # its own pipeline, with the model's own recipe; the same Worker process_shard finds (L11)
    worker = Worker.for_config(config)
    x = torch.randn(B, *worker.recipe.input_size, device=worker.device)

    def model_only():
        with torch.cuda.stream(worker.stream) if gpu else contextlib.nullcontext():
            for _ in range(steps):
                embed_batch(worker.loaded, x, autocast=True, normalize=True)
        return steps * B

    def embed(interval):
        def run():
            default = sys.getswitchinterval()
            sys.setswitchinterval(interval or default)
            try:
                return len(worker.embed(from_tars(), autocast=True, normalize=True)[0])
            finally:
                sys.setswitchinterval(default)
        return run

    def swapped(run, **attrs):
        """`run` with some of the worker's attributes replaced for its duration (a variant of L10)."""
        def variant():
            saved = {name: getattr(worker, name) for name in attrs}
            for name, value in attrs.items():
                setattr(worker, name, value)
            try:
                return run()
            finally:
                for name, value in saved.items():
                    setattr(worker, name, value)
        return variant

    runs[f"model only ({args.model})"] = model_only
    runs["L10 Worker.embed from the tar reader"] = embed(None)
    runs["L10 + GIL switch interval 0.2 ms"] = embed(0.0002)
    # The encoded bytes read in place instead of copied into DALI's buffers as they are fed (the copy holds the
    # GIL; in place, a GPU decoder stages them into pinned memory in its own threads).
    in_place = ImagePipeline(worker.recipe, batch_size=B, num_threads=T, device_id=device_id,
                             prefetch=worker.pipeline.prefetch, copy_inputs=not worker.pipeline.copy_inputs,
                             output_dtype=worker.loaded.dtype, channels_last=worker.loaded.channels_last)
    runs[f"L10 copy_inputs={in_place.copy_inputs}"] = swapped(embed(None), pipeline=in_place)
    if gpu:
        # As from the seventh to the twenty-sixth session: four iterations in DALI at once (a GPU worker now keeps
        # two).
        deep = ImagePipeline(worker.recipe, batch_size=B, num_threads=T, device_id=device_id, prefetch=4,
                             output_dtype=worker.loaded.dtype, channels_last=worker.loaded.channels_last)
        runs["L10 prefetch 4"] = swapped(embed(None), pipeline=deep)
        # Fewer DALI threads: on a 16-core host, DALI's, the feeder's and the model's threads may oversubscribe it.
        fewer = ImagePipeline(worker.recipe, batch_size=B, num_threads=max(1, T * 2 // 3), device_id=device_id,
                              prefetch=worker.pipeline.prefetch, output_dtype=worker.loaded.dtype,
                              channels_last=worker.loaded.channels_last)
        runs[f"L10 {max(1, T * 2 // 3)} DALI threads"] = swapped(embed(None), pipeline=fewer)
        # A bfloat16 model fed from DALI's float32 output, as before the twenty-sixth session, not its float16 one.
        float32_out = ImagePipeline(worker.recipe, batch_size=B, num_threads=T, device_id=device_id,
                                    prefetch=worker.pipeline.prefetch, output_dtype=worker.loaded.dtype,
                                    channels_last=worker.loaded.channels_last, half_from_dali=False)
        runs["L10 float32 from DALI"] = swapped(embed(None), pipeline=float32_out)

        # The model at most two batches ahead of the GPU: with more streams than the GPU has hardware queues
        # (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default), a DALI stream that shares the model's queue waits behind
        # every batch the model has queued.
        def model_two_ahead():
            done: list = []
            model = worker._model

            def bounded(images, **kw):
                if len(done) >= 2:
                    done.pop(0).synchronize()
                out = model(images, **kw)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream())
                done.append(event)
                return out
            return swapped(embed(None), _model=bounded)()
        runs["L10 model at most two batches ahead"] = model_two_ahead
    def one_call_per_shard():
        # L10 as separate Worker.embed calls, one per tar, back to back: what a shard boundary costs the pipeline
        # (DALI and the model drained at each end, filled again at each start), with nothing else running.
        n = 0
        for tar, data in tar_bytes:
            samples_ = ((s.key, s.image) for s in shards.iter_samples(io.BytesIO(data), extensions=("jpg",), shard=tar))
            n += len(worker.embed(samples_, autocast=True, normalize=True)[0])
        return n
    runs["L10 one call per shard"] = one_call_per_shard

    def calls_at_once(at_once: int):
        # L10 as one Worker.embed call per shard from `at_once` threads, as a GPU worker's Dask threads make them:
        # the worker's stream feeds each shard right behind the previous one (no drain at the boundaries).
        from concurrent.futures import ThreadPoolExecutor

        def one(item):
            tar, data = item
            samples_ = ((s.key, s.image) for s in shards.iter_samples(io.BytesIO(data), extensions=("jpg",), shard=tar))
            return len(worker.embed(samples_, autocast=True, normalize=True)[0])

        def run():
            with ThreadPoolExecutor(at_once) as pool:
                return sum(pool.map(one, tar_bytes))
        return run
    runs["L10 one call per shard, 3 threads"] = calls_at_once(3)
    timelines: dict[str, list] = {}
    for at_once in (1, 3):
        name = f"L11 process_shard, {at_once} shard{'s' if at_once > 1 else ''} at a time"
        runs[name] = shards_at_a_time(config, tars, at_once, timelines.setdefault(name, []))
    closing = []
    if gpu:
        closing = contention_rungs(runs, worker, image_pipe, from_tars, stream, embed, swapped, B, T, device_id)
    if args.rungs:
        runs = {k: v for k, v in runs.items() if k.split()[0] in args.rungs or k.startswith("model only")}
    if args.worker_only:
        runs = {k: v for k, v in runs.items() if k.split()[0] not in {"L0", "L1", "L2", "L3", "L4", "L5", "L6", "L7"}}
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    counts, times = interleaved(runs, args.repeats, sync)
    print(f"ladder: {steps * B} photographs, batch {B}, {T} threads, {args.repeats} interleaved passes; "
          f"{'GPU (mixed decoding)' if gpu else 'CPU'}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:40s} {counts[name] / med:9,.0f} img/s (best {counts[name] / min(ts):,.0f}); "
              f"{1e6 * med / counts[name]:.1f} us/img", flush=True)
    for name, results in timelines.items():
        if name in runs and results:
            print(shard_times(name, results[-1]), flush=True)
    image_pipe.close()
    deeper.close()
    one_image.close()
    for pipe in closing:
        pipe.close()
    worker.close()
    return 0


def shards_at_a_time(config, tars: list[str], at_once: int, timelines: list):
    """L11: `wdsembed.shard.process_shard` over the tars, `at_once` shards in threads of one process, as a GPU
    worker's Dask threads run them (cluster.SHARDS_PER_GPU), without Dask or Prefect: reading, embedding, the
    table, validation, the fidelity reference and the parquet write, per shard. Each pass appends its shards'
    timelines to `timelines`."""
    from concurrent.futures import ThreadPoolExecutor

    from wdsembed.config import EmbedConfig

    from wdsembed.plan import plan_shards
    from wdsembed.shard import process_shard

    out = tempfile.mkdtemp()
    shard_config = EmbedConfig(**{**config.model_dump(), "input": os.path.dirname(tars[0]), "output": out, "force": True})
    plans = plan_shards(shard_config)

    def run():
        with ThreadPoolExecutor(at_once) as pool:
            results = list(pool.map(lambda plan: process_shard(shard_config, plan), plans))
        timelines.append([r.timeline for r in results])
        return sum(r.embedded for r in results)
    return run


def contention_rungs(runs, worker, image_pipe, from_tars, stream, embed, swapped, B, T, device_id) -> list:
    """L12 (a GPU only): does the model slow DALI down on the GPU itself, and what undoes it?

    - DALI alone (as L9), and the same while the model, captured as one CUDA graph (no launches to speak of, so
      hardly any GIL), replays back to back in another thread: the drop is the GPU's own contention.
    - Worker.embed with the model eager, not the CUDA graph it runs as: its launches in the GIL's way.
    - Worker.embed with fewer JPEGs to the hardware decoder (its per-image colour conversion kernels queue behind
      the model's kernels) and DALI alone that way (the CPU's Huffman decoding on the DALI threads); and with every
      JPEG to it (no CUDA decoding kernels beside the model's at all).
    Returns what to close at the end."""
    import collections
    import threading

    import torch

    from wdsembed.model import BatchGraph
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.threads import in_background

    loaded = worker.loaded
    graph = worker._graph or BatchGraph(loaded, (B, *worker.recipe.input_size), autocast=True, normalize=True)

    def dali(pipe):
        def run():
            return sum(len(b.keys) for b in in_background(pipe.process(from_tars(), cuda_stream=stream)))
        return run

    def dali_beside_model():
        stop, done = threading.Event(), [0]
        hammer_stream = torch.cuda.Stream()

        def hammer():
            in_flight: collections.deque = collections.deque()
            with torch.cuda.stream(hammer_stream):
                while not stop.is_set():
                    graph.graph.replay()
                    event = torch.cuda.Event()
                    event.record(hammer_stream)
                    in_flight.append(event)
                    done[0] += B
                    if len(in_flight) > 2:
                        in_flight.popleft().synchronize()
            hammer_stream.synchronize()

        thread = threading.Thread(target=hammer, daemon=True)
        start = time.perf_counter()
        thread.start()
        try:
            return dali(image_pipe)()
        finally:
            stop.set()
            thread.join()
            print(f"  (the model beside DALI: {done[0] / (time.perf_counter() - start):,.0f} img/s)", flush=True)

    def with_hw_load(load):
        return ImagePipeline(worker.recipe, batch_size=B, num_threads=T, device_id=device_id,
                             prefetch=worker.pipeline.prefetch, output_dtype=loaded.dtype,
                             channels_last=loaded.channels_last, hw_decoder_load=load)

    no_hw, half_hw, all_hw = with_hw_load(0.0), with_hw_load(0.5), with_hw_load(1.0)
    runs["L12 DALI alone (L9)"] = dali(image_pipe)
    runs["L12 DALI beside the model (a graph, another thread)"] = dali_beside_model
    runs["L12 Worker.embed, the model eager (no CUDA graph)"] = swapped(embed(None), _graph=None)
    runs["L12 Worker.embed, hw_decoder_load 0"] = swapped(embed(None), pipeline=no_hw)
    runs["L12 Worker.embed, hw_decoder_load 0.5"] = swapped(embed(None), pipeline=half_hw)
    runs["L12 Worker.embed, hw_decoder_load 1"] = swapped(embed(None), pipeline=all_hw)
    runs["L12 DALI alone, hw_decoder_load 0"] = dali(no_hw)
    return [no_hw, half_hw, all_hw]


def shard_times(name: str, timelines: list[dict]) -> str:
    """One pass of L11 in seconds: the pass's wall time, the pipeline's time in shards (embed_start to embed_end,
    summed), the pipeline's idle time between them, and each step's median per shard."""
    import statistics

    from bench.throughput import merged

    spans = merged([(t["embed_start"], t["embed_end"]) for t in timelines])  # the next shard's starts in the last's
    wall = max(t["end"] for t in timelines) - min(t["start"] for t in timelines)
    inside = sum(b - a for a, b in spans)
    idle = sum(b[0] - a[1] for a, b in zip(spans, spans[1:]))
    steps = [("start", "embed_start"), ("embed_start", "embed_end"), ("embed_end", "table"), ("table", "checked"),
             ("checked", "validated"), ("checked", "end")]  # the validation runs beside the writes
    medians = ", ".join(f"{b} {statistics.median(t[b] - t[a] for t in timelines):.3f}" for a, b in steps
                        if all(a in t and b in t for t in timelines))
    return (f"{name}: wall {wall:.2f} s, pipeline in shards {inside:.2f} s, idle between shards {idle:.2f} s; "
            f"median per shard, up to: {medians}")


def kernels(args: argparse.Namespace) -> int:
    """Where the time goes while Worker.embed streams the photographs. First each thread's time per batch
    (host_timeline), then every kernel of the process (DALI's decoding and resizing, the model's layers, the copies)
    from CUPTI, summed by name, and the union of their intervals against the wall time: a GPU busy all the time is
    shared, a GPU with gaps is starved."""
    import io

    import torch
    from torch.profiler import ProfilerActivity, profile

    from wdsembed import shards
    from wdsembed.config import EmbedConfig
    from wdsembed.worker import Worker

    tars, _ = photographs(args.images)
    blobs = [(tar, open(tar, "rb").read()) for tar in tars]

    def from_tars():
        for tar, data in blobs:
            for s in shards.iter_samples(io.BytesIO(data), extensions=("jpg",), shard=tar):
                yield s.key, s.image

    config = EmbedConfig(input="x", output="y", model_name=args.model, pretrained=False, batch_size=args.batch_size,
                         num_threads_per_worker=args.threads)
    worker = Worker(config)
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    worker.embed(from_tars(), autocast=True, normalize=True)  # warm
    sync()
    host_timeline(worker, from_tars, sync)
    with profile(activities=[ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        n = len(worker.embed(from_tars(), autocast=True, normalize=True)[0])
        sync()
        wall = time.perf_counter() - t
    intervals, by_name = [], {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            intervals.append((e.time_range.start, e.time_range.end))
            total, count = by_name.get(e.name, (0.0, 0))
            by_name[e.name] = (total + e.time_range.elapsed_us(), count + 1)
    intervals.sort()
    busy, end = 0.0, None
    for a, b in intervals:  # union of the kernels' intervals, all streams
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    if not intervals:
        print(f"kernels: {n} photographs in {wall:.2f} s; no GPU kernels recorded (CPU only?)")
        return 0
    summed = sum(t for t, _ in by_name.values())
    print(f"kernels: {n} photographs in {wall:.2f} s ({n / wall:,.0f} img/s, under the profiler); GPU busy "
          f"{busy / 1e6:.2f} s of the kernels' span {span / 1e6:.2f} s ({busy / span:.1%}); kernel time summed over "
          f"streams {summed / 1e6:.2f} s ({summed / max(busy, 1):.2f}x the busy time: overlap)")
    print(f"{'us per image':>12} {'calls':>7}  kernel")
    for name, (total, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{total / n:12.2f} {count:7d}  {name[:150]}")
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, f"kernels-{args.model}.json"))
    worker.close()
    return 0


def host_timeline(worker, samples, sync) -> None:
    """Where each thread of Worker.embed spends its time, per batch, in one pass without the profiler: the producer
    thread (reading the tar with the host checks, feeding DALI, scheduling, waiting for DALI's outputs, the copy
    out) and the consumer (waiting for a batch, the model's launches). Each step is timed by wrapping it on these
    instances only."""
    import collections

    spent: dict[str, float] = collections.defaultdict(float)
    pipe = worker.pipeline

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    def timed_batches(source):
        batches = pipe_batches(source)
        while True:
            t = time.perf_counter()
            item = next(batches, None)
            spent["producer: tar reader + host checks"] += time.perf_counter() - t
            if item is None:
                return
            yield item

    pipe_batches = pipe._batches
    saved = {name: getattr(pipe, name) for name in ("_batches", "_feed", "_to_torch")}
    dali = pipe._pipe
    dali_saved = {name: getattr(dali, name) for name in ("schedule_run", "outputs")}
    model_saved = worker._model
    pipe._batches = timed_batches
    pipe._feed = timed("producer: feed_input", pipe._feed)
    pipe._to_torch = timed("producer: copy out of DALI", pipe._to_torch)
    dali.schedule_run = timed("producer: schedule_run", dali.schedule_run)
    dali.outputs = timed("producer: outputs() (waiting for DALI)", dali.outputs)
    worker._model = timed("consumer: the model's launches", worker._model)
    try:
        t = time.perf_counter()
        n = len(worker.embed(samples(), autocast=True, normalize=True)[0])
        sync()
        wall = time.perf_counter() - t
    finally:
        for name, fn in saved.items():
            setattr(pipe, name, fn)
        for name, fn in dali_saved.items():
            setattr(dali, name, fn)
        worker._model = model_saved
    batches = max(1, n // pipe.batch_size)
    print(f"host timeline: {n} photographs in {wall:.2f} s ({n / wall:,.0f} img/s), {batches} batches; ms per batch:")
    producer = sum(v for k, v in spent.items() if k.startswith("producer"))
    for name, seconds in sorted(spent.items()):
        print(f"  {1e3 * seconds / batches:8.2f}  {name}")
    print(f"  {1e3 * producer / batches:8.2f}  producer, all of it ({producer / wall:.0%} of the wall time)")
    print(f"  {1e3 * wall / batches:8.2f}  wall")


def clip_recipe():
    """ViT-B/16 CLIP's eval recipe: center crop 224, bicubic, crop_pct 0.875."""
    from wdsembed.preprocess import PreprocessRecipe

    return PreprocessRecipe(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def photographs(n: int) -> tuple[list[str], list[tuple[str, bytes]]]:
    """Shards of n re-encoded photographs (1000 distinct at most, 300-640 px JPEGs), and their (key, bytes)."""
    from bench.throughput import build_shards

    work = tempfile.mkdtemp()
    per = min(2000, n)
    build_shards(work, max(1, n // per), per, unique=min(1000, n))
    tars = sorted(os.path.join(work, f) for f in os.listdir(work) if f.endswith(".tar"))
    return tars, read_samples(tars)  # n rounded down to whole shards of 2000


def read_samples(tars: list[str]) -> list[tuple[str, bytes]]:
    from wdsembed import shards

    samples = []
    for tar in tars:
        with open(tar, "rb") as f:
            samples += [(s.key, bytes(s.image)) for s in shards.iter_samples(f, extensions=("jpg",), shard=tar)]
    return samples


# Each variant of --memory: what runs (DALI's pipeline alone, or Worker.embed: the model and DALI as a GPU worker
# runs them), the environment it starts with, and ImagePipeline's keyword arguments (DALI alone).
MEMORY_VARIANTS = {
    "dali, its pool (DALI_USE_CUDA_MALLOC_ASYNC=0)": ("dali", {"DALI_USE_CUDA_MALLOC_ASYNC": "0"}, {}),
    "dali, cudaMallocAsync (default)": ("dali", {}, {}),
    "dali, cudaMallocAsync, prefetch 4": ("dali", {}, {"prefetch": 4}),
    "dali, cudaMallocAsync, no nvJPEG padding": ("dali", {}, {"device_memory_padding": 0, "host_memory_padding": 0}),
    "dali, cudaMallocAsync, no hardware decoder": ("dali", {}, {"hw_decoder_load": 0.0}),
    "worker, its pool (DALI_USE_CUDA_MALLOC_ASYNC=0)": ("worker", {"DALI_USE_CUDA_MALLOC_ASYNC": "0"}, {}),
    "worker, cudaMallocAsync (default)": ("worker", {}, {}),
    "worker, cudaMallocAsync, prefetch 4": ("worker", {"WDSEMBED_GPU_PREFETCH": "4"}, {}),
    "worker, cudaMallocAsync, model eager": ("worker", {"WDSEMBED_CUDA_GRAPH": "0"}, {}),
    # A bfloat16 model fed from DALI's float32 output (as before the twenty-sixth session), not its float16 one.
    "worker, cudaMallocAsync, float32 from DALI": ("worker", {"WDSEMBED_DALI_FLOAT16": "0"}, {}),
    # The model's stream held to a few queued batches (wdsembed.worker.GPU_QUEUED_BATCHES: 2 by default), or not.
    "worker, cudaMallocAsync, no model queue limit": ("worker", {"WDSEMBED_GPU_QUEUED_BATCHES": "0"}, {}),
    "worker, cudaMallocAsync, model queue 3": ("worker", {"WDSEMBED_GPU_QUEUED_BATCHES": "3"}, {}),
    "worker, cudaMallocAsync, model queue 6": ("worker", {"WDSEMBED_GPU_QUEUED_BATCHES": "6"}, {}),
    "worker, its pool, model queue 3": ("worker", {"DALI_USE_CUDA_MALLOC_ASYNC": "0",
                                                   "WDSEMBED_GPU_QUEUED_BATCHES": "3"}, {}),
    # torch's caching allocator growing segments in place (PYTORCH_CUDA_ALLOC_CONF): does ViT-L/14's worker, whose
    # torch pool held 5.5 GiB reserved for a 2.3 GiB peak of allocations (sixty-fourth session), keep less?
    "worker, cudaMallocAsync, expandable segments": ("worker", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                                                     {}),
    # The worker's model alone on one resident batch, as many batches as the photographs make: is the transient
    # beside the graph the graph's own, or DALI's beside it?
    "model alone (as a graph)": ("model", {}, {}),
    "model alone, eager": ("model", {"WDSEMBED_CUDA_GRAPH": "0"}, {}),
}


def memory(args: argparse.Namespace) -> int:
    """Where a GPU worker's device memory goes: each variant of MEMORY_VARIANTS in a fresh process (DALI reads its
    memory settings once per process, and its pool keeps its high-water mark), the same photographs twice through
    it. The peak is NVML's figure for that process, sampled every 20 ms while the photographs stream; "after" is the
    figure once they have. DALI alone runs ImagePipeline as a GPU worker builds it (GPU_PREFETCH, the bomb guard);
    the worker runs Worker.embed with --model; the model alone runs that worker's model on one resident batch."""
    import json
    import subprocess

    tars, _ = photographs(args.images)
    print(f"{args.images} photographs, batch {args.batch_size}, {args.threads} DALI threads, model {args.model}")
    print(f"{'variant':52s} {'peak GiB':>8s} {'after':>6s} {'torch':>6s} {'img/s':>8s}")
    for name, (what, env, opts) in MEMORY_VARIANTS.items():
        if args.only and not any(part in name for part in args.only):
            continue
        spec = json.dumps({"what": what, "opts": opts, "tars": tars})
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-run", spec, "--batch-size", str(args.batch_size),
             "--threads", str(args.threads), "--model", args.model],
            env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name:52s} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:52s} {r['peak_gib']:8.2f} {r['after_gib']:6.2f} {r['torch_reserved_gib']:6.2f} "
              f"{r['images_per_second']:8,.0f}", flush=True)
        print("    after each step (NVML GiB, torch reserved GiB): "
              + ", ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in r["stages"].items()), flush=True)
    return 0


def memory_run(args: argparse.Namespace) -> int:
    """One variant of --memory, in this process: prints one JSON line."""
    import json

    from bench.throughput import GpuMemorySampler, _process_gpu_bytes
    from wdsembed.worker import set_gpu_process_environment

    set_gpu_process_environment()  # as a GPU worker's process, unless the variant's environment set DALI's
    import torch

    from wdsembed.config import EmbedConfig
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.worker import GPU_PREFETCH, Worker

    spec = json.loads(args.memory_run)
    samples = read_samples(spec["tars"])
    config = EmbedConfig(input="x", output="y", model_name=args.model, pretrained=False, batch_size=args.batch_size,
                         num_threads_per_worker=args.threads)
    stages = {}  # NVML's figure for this process and torch's reserved bytes, after each step (GiB)

    def stage(name: str) -> None:
        torch.cuda.synchronize()
        stages[name] = [round((_process_gpu_bytes() or 0) / 2**30, 2), round(torch.cuda.memory_reserved() / 2**30, 2)]

    torch.zeros(1, device="cuda")
    stage("cuda context")
    if spec["what"] in ("worker", "model"):
        worker = Worker(config)
        stage("worker built")
    if spec["what"] == "worker":
        def one_pass() -> int:
            return len(worker.embed(iter(samples), autocast=True, normalize=True, on_batch=lambda n: None)[0])
    elif spec["what"] == "model":
        layout = torch.channels_last if worker.loaded.channels_last else torch.contiguous_format
        x = torch.randn(args.batch_size, *worker.recipe.input_size, device=worker.device,
                        dtype=worker.loaded.dtype).contiguous(memory_format=layout)  # as the graph's input

        def one_pass() -> int:
            batches = len(samples) // args.batch_size
            with torch.cuda.stream(worker.stream):  # the worker's model stream, as Worker.embed runs it
                for _ in range(batches):
                    worker._model(x, autocast=True, normalize=True)
            return batches * args.batch_size
    else:
        pipe = ImagePipeline(clip_recipe(), batch_size=args.batch_size, num_threads=args.threads, device_id=0,
                             max_pixels=config.max_image_pixels, **{"prefetch": GPU_PREFETCH, **spec["opts"]})
        stage("pipeline built")

        def one_pass() -> int:
            return sum(len(b.keys) for b in pipe.process(samples))
    sampler = GpuMemorySampler([os.getpid()], interval=0.02)
    with sampler:
        one_pass()  # warm-up: DALI's and torch's pools grow to what the stream needs
        stage("first pass")
        start = time.perf_counter()
        n = one_pass()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    stage("second pass")
    print(json.dumps({"peak_gib": (sampler.peak_bytes() or 0) / 2**30, "after_gib": (_process_gpu_bytes() or 0) / 2**30,
                      "torch_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                      "images_per_second": n / seconds, "stages": stages}))
    return 0


def geometry_only(args: argparse.Namespace) -> int:
    """What sizes the resize and crop, on the CPU with decoding left out (issue #11). Every variant is fed the same
    batches of real photographs (an external source of the encoded bytes, copied into DALI's buffers, as
    ImagePipeline feeds them), two iterations in flight as ImagePipeline keeps them, and returns its small outputs
    (never the bytes themselves: returning 10 MB of ragged bytes costs milliseconds, and no real graph does; where
    nothing else reads them, their shapes are taken so that they are fed and copied all the same). Each also feeds
    and returns the images' ids, as ImagePipeline's graph must for its check that outputs and inputs are in step: a
    source of their own where no geometry is fed (as the graph of peek_image_shape had), the geometry rows' last
    row where it is (as the graph has now, preprocess.put_ids). The variants take turns, pass after pass, so that
    load from other processes hits them alike:

    E    the encoded bytes alone (and their shapes): the floor under every other line
    A    + fn.peek_image_shape(adjust_orientation=True): what the old graph needed before any geometry
    B    + the host geometry: header sizes (wdsembed.imagesize.image_sizes) and PreprocessRecipe.source_geometry
         (NumPy) for the batch, computed in the feeding loop, and fed to the geometry source whose rows fn.resize takes in the real graph
         (preprocess.geometry_inputs: the region of interest, and the output size where it varies; here the rows
         are returned as outputs: no pixels are made)
    Bs   B with each batch's header sizes read before the passes: the geometry and its plumbing alone, without the
         header read that stands in for peek_image_shape (B - Bs is that read, on bytes the loop has not touched
         since the last pass: in the flow they come from the reader thread, just read)
    old  + peek_image_shape and the old in-graph geometry subgraph (bench/old_geometry.py), its six arguments
         returned as outputs
    rsz  + the argument inputs consumed by the resize (preprocess.resize_passes: two fn.resize for a bicubic
         recipe) on 1x1 stand-in images, 2x2 out (the per-sample cost of the operators themselves; pixel work
         negligible). A stand-in smaller than the real images' regions of interest is
         not an option: fn.resize with a ROI outside its input crashes DALI 2.4 (segfault)
    ops  rsz + crop_mirror_normalize (2x2 crop, normalize to float CHW), as the real graph follows resize
    pyf  + peek_image_shape and the host geometry in one batch-level operator (fn.python_function,
         batch_processing=True: PreprocessRecipe.source_geometry on the peeked shapes, in DALI's thread)
    Ar, Br  A and B with the flow's reader thread in front (wdsembed.threads.read_ahead, as Worker runs it: the
         batch's (key, bytes) pairs handed over 64 at a time, READ_AHEAD_CHUNK): the feeding loop takes its batch
         from that thread before it feeds. The flow always runs one; on two cores it is a third runnable thread
         beside the feeding loop and DALI's. Br / Ar is the same comparison as the flow makes it.

    Target of the issue: B >= 0.9 A.
    """
    import statistics

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.tensors import TensorCPU

    from bench.old_geometry import old_geometry_from_bytes
    from wdsembed.imagesize import image_size, image_sizes
    from wdsembed.preprocess import (
        PreprocessRecipe,
        feed_geometry,
        geometry_source,
        put_ids,
        resize_passes,
        split_geometry,
    )
    from wdsembed.threads import read_ahead as reader_thread
    from wdsembed.worker import READ_AHEAD_CHUNK, READ_AHEAD_DEPTH

    _, samples = photographs(args.images)
    B, T = args.batch_size, args.threads
    steps = len(samples) // B
    if steps < 3:
        raise SystemExit(f"--images {args.images} gives {steps} batches of {B}: need at least 3")
    # Read-only memoryviews, the form in which the flow's reader (an indexed shard's fast path) hands ImagePipeline
    # its images: slicing their headers costs a third of slicing bytes objects.
    datas = [[memoryview(d).toreadonly() for _, d in samples[i * B:(i + 1) * B]] for i in range(steps)]
    views = [[TensorCPU(np.frombuffer(d, np.uint8)) for d in batch] for batch in datas]  # as ImagePipeline's
    recipe = clip_recipe()
    tiny = PreprocessRecipe(input_size=(3, 2, 2), interpolation="bicubic", crop_pct=1.0, crop_mode="center",
                            mean=recipe.mean, std=recipe.std)
    tiny_geometry = tiny.source_geometry(np.ones((B, 2), np.int64), np.zeros(B, np.int64))

    def encoded():
        return fn.external_source(name="enc", dtype=types.UINT8, ndim=1)

    def ids():
        return fn.external_source(name="ids", dtype=types.INT64, ndim=0)

    def graph_e():
        return encoded().shape(), ids()

    def graph_a():
        return fn.peek_image_shape(encoded(), adjust_orientation=True), ids()

    def graph_b():  # the rows fn.resize takes, and the rows themselves (the ids' output)
        rows = geometry_source()
        geometry = split_geometry(rows, recipe)
        return (encoded().shape(), *(v for v in geometry.values() if not isinstance(v, list)), rows)

    def graph_old():
        return (*old_geometry_from_bytes(encoded(), recipe).values(), ids())

    def stand_in_resize():
        rows = geometry_source()
        geo = split_geometry(rows, tiny)
        stand_in = fn.constant(idata=[0, 0, 0], shape=[1, 1, 3], dtype=types.UINT8, layout="HWC")
        return resize_passes(stand_in, tiny, geo), rows

    def graph_rsz():
        return encoded().shape(), *stand_in_resize()

    def graph_ops():
        enc, (images, rows) = encoded().shape(), stand_in_resize()
        out = fn.crop_mirror_normalize(images, crop=(2, 2), crop_pos_x=tiny.pad_crop_pos, crop_pos_y=tiny.pad_crop_pos,
                                       out_of_bounds_policy="pad", dtype=types.FLOAT, output_layout="CHW")
        return enc, out, rows

    def geometry_of_shapes(shapes):  # one call per batch; the rows B feeds, from the peeked (H, W, C) shapes
        return list(recipe.source_geometry(np.stack(shapes)[:, :2].astype(np.int64)))

    def graph_pyf():
        shapes = fn.peek_image_shape(encoded(), adjust_orientation=True)
        rows = fn.python_function(shapes, function=geometry_of_shapes, batch_processing=True)
        return rows[0], rows[1], ids()

    next_id = [0]

    def next_ids():
        next_id[0] += B
        return np.arange(next_id[0] - B, next_id[0], dtype=np.int64)

    def feed_e(pipe, i):
        pipe.feed_input("enc", views[i])
        pipe.feed_input("ids", next_ids())

    in_loop = []  # B's header read per batch, timed where it runs: on bytes the pass's copies have pushed out of cache

    def feed_b(pipe, i):
        t = time.perf_counter()
        sizes = image_sizes(datas[i])[0]  # a batch at a time, as ImagePipeline's feeding loop reads them
        in_loop.append(time.perf_counter() - t)
        geometry = recipe.source_geometry(sizes, next_ids())
        pipe.feed_input("enc", views[i])
        feed_geometry(pipe, geometry)

    read_ahead = [image_sizes(batch)[0] for batch in datas]

    def feed_bs(pipe, i):
        geometry = recipe.source_geometry(read_ahead[i], next_ids())
        pipe.feed_input("enc", views[i])
        feed_geometry(pipe, geometry)

    def feed_ops(pipe, i):
        pipe.feed_input("enc", views[i])
        put_ids(tiny_geometry, next_ids())  # in place: the last feed copied it
        feed_geometry(pipe, tiny_geometry)

    READER_VARIANTS = ("Ar", "Br")
    readers: dict[str, Any] = {}  # variant: its reader thread for the current pass (a generator of samples)

    def start_reader(name: str) -> None:
        old_reader = readers.pop(name, None)
        if old_reader is not None:
            old_reader.close()  # stops its thread
        readers[name] = reader_thread((pair for batch in samples_by_batch for pair in batch),
                                   chunk=READ_AHEAD_CHUNK, depth=READ_AHEAD_DEPTH)

    def through_reader(name: str, feed):
        def fed(pipe, i):
            batch = list(itertools.islice(readers[name], B))  # the batch as the flow's feeding loop gathers it
            assert len(batch) == B
            feed(pipe, i)
        return fed

    samples_by_batch = [samples[i * B:(i + 1) * B] for i in range(steps)]
    variants = {"E": (graph_e, feed_e), "A": (graph_a, feed_e), "B": (graph_b, feed_b), "Bs": (graph_b, feed_bs),
                "old": (graph_old, feed_e), "rsz": (graph_rsz, feed_ops), "ops": (graph_ops, feed_ops),
                "pyf": (graph_pyf, feed_e), "Ar": (graph_a, through_reader("Ar", feed_e)),
                "Br": (graph_b, through_reader("Br", feed_b))}
    unknown = set(args.only) - set(variants)
    if unknown:
        raise SystemExit(f"--only {' '.join(sorted(unknown))}: the variants are {' '.join(variants)}")
    if args.only:  # the slow variants (old, pyf) change the machine's state for the quick ones: they can be left out
        variants = {name: v for name, v in variants.items() if name == "A" or name in args.only}
    passes = {}  # a pass of each variant, two iterations in flight as ImagePipeline keeps them
    for name, (graph_fn, feed) in variants.items():
        pipe = pipeline_def(graph_fn, batch_size=B, num_threads=T, device_id=None, prefetch_queue_depth=2,
                            exec_dynamic=True)()
        pipe.build()
        if name in READER_VARIANTS:
            start_reader(name)  # the priming in fed_loop takes two batches from it
        passes[name] = fed_loop(pipe, feed, lambda pipe, i: pipe.outputs(), steps, B)

    def one_pass(name) -> tuple[float, float]:
        """Wall time and CPU time of the whole process (all threads, DALI's included) for one pass."""
        if name in READER_VARIANTS:
            start_reader(name)  # a fresh reader, started before the clock: the flow's runs ahead of the loop
        t, c = time.perf_counter(), time.process_time()
        passes[name]()
        return time.perf_counter() - t, time.process_time() - c

    for name in passes:
        one_pass(name)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(one_pass(name))

    # The host part of B alone, no DALI: header sizes for the batch, then the NumPy geometry; and the headers read
    # one image at a time, as before.
    parse, numpy_t, one_by_one = [], [], []
    for _ in range(args.repeats):
        for batch in datas:
            t0 = time.perf_counter()
            sizes = image_sizes(batch)[0]
            t1 = time.perf_counter()
            recipe.source_geometry(sizes, next_ids())
            t2 = time.perf_counter()
            np.array([image_size(d) for d in batch], dtype=np.int64)
            parse.append(t1 - t0)
            numpy_t.append(t2 - t1)
            one_by_one.append(time.perf_counter() - t2)

    images = steps * B
    print(f"{len(samples)} photographs ({steps} batches of {B}) per pass, {args.repeats} passes per variant, "
          f"interleaved; DALI CPU, num_threads={T}, prefetch 2; decoding left out")
    print("      img/s (median of passes, best pass)   wall ms/batch (median, min-max)   CPU ms/batch (median)")
    rate, best = {}, {}
    for name, ts in times.items():
        wall = [t for t, _ in ts]
        rate[name], best[name] = images / statistics.median(wall), images / min(wall)
        per_batch = [1e3 * t / steps for t in wall]
        cpu = statistics.median(1e3 * c / steps for _, c in ts)
        print(f"{name:4s} {rate[name]:9,.0f} {best[name]:9,.0f}                     {statistics.median(per_batch):6.2f} "
              f"({min(per_batch):.2f}-{max(per_batch):.2f})                {cpu:6.2f}", flush=True)
    print(f"host part of B alone: header sizes {1e6 * statistics.median(parse) / B:.2f} us/image (one image at a "
          f"time: {1e6 * statistics.median(one_by_one) / B:.2f}), NumPy geometry "
          f"{1e3 * statistics.median(numpy_t):.3f} ms/batch (medians)")
    if in_loop:  # each pass copies every image into DALI: once the images outgrow the cache, B reads cold headers
        print(f"header sizes in B's (and Br's) feeding loop: {1e6 * statistics.median(in_loop) / B:.2f} us/image "
              f"(median), against {1e6 * statistics.median(parse) / B:.2f} above on headers left in cache")
    for reader in readers.values():
        reader.close()
    pairs = [(x, "A") for x in ("B", "Bs", "old", "pyf", "Ar")] + [("B", "old"), ("Br", "Ar")]
    for label, r in (("medians", rate), ("best passes", best)):
        print(f"{label}: " + "   ".join(f"{x} / {y} = {r[x] / r[y]:.2f}" for x, y in pairs if x in r and y in r))
    # Each round runs every variant once, back to back: the ratio within a round compares passes that met the same
    # load from other processes, which the medians of separate passes do not.
    paired = {(name, base): sorted(a[0] / b[0] for a, b in zip(times[base], times[name]))
              for name, base in (("B", "A"), ("Bs", "A"), ("Br", "Ar")) if name in times and base in times}
    if paired:
        print("paired rounds: " + "   ".join(
            f"{name} / {base} median {statistics.median(ratios):.2f} (quartiles {ratios[len(ratios) // 4]:.2f}-"
            f"{ratios[(3 * len(ratios)) // 4]:.2f})" for (name, base), ratios in paired.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
