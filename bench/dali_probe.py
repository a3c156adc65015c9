"""Where the GPU time goes: our ImagePipeline against DALI's own webdataset reader on the same photos, then
DALI and a model together on the legacy default stream and on a stream of their own.

    python bench/dali_probe.py [--images 16000] [--batch-size 256] [--threads 12] [--model vit_base_patch16_clip_224.openai]

Each line is images/s for one variant, so that one run says which change matters:
- how the bytes reach DALI: copied into DALI's (pinned) buffers, or read in place from ours;
- our preprocessing recipe (header-sized resize, per-sample crop) against a plain resize + crop;
- the decompression-bomb guard (header sizes checked on the host) on or off;
- DALI and the model overlapped (Worker.embed) or not, against the sequential bound 1 / (1/a + 1/b).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=12)
    p.add_argument("--model", default="vit_base_patch16_clip_224.openai")
    args = p.parse_args()

    import torch
    from nvidia.dali import fn, pipeline_def, types

    from bench.throughput import build_shards
    from wdsembed import shards
    from wdsembed.config import EmbedConfig
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.imagesize import image_size
    from wdsembed.preprocess import GEOMETRY_INPUTS, PreprocessRecipe, dali_preprocess, feed_geometry

    work = tempfile.mkdtemp()
    per = min(2000, args.images)
    build_shards(work, max(1, args.images // per), per, unique=1000)
    tars = sorted(os.path.join(work, f) for f in os.listdir(work) if f.endswith(".tar"))
    samples = []
    for tar in tars:
        with open(tar, "rb") as f:
            samples += [(s.key, bytes(s.image)) for s in shards.iter_samples(f, extensions=("jpg",), shard=tar)]
    B, T = args.batch_size, args.threads
    gpu = torch.cuda.is_available()  # without one, the same variants on the CPU path: a smoke test of this script
    device_id, decode = (0, "mixed") if gpu else (None, "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    recipe = PreprocessRecipe(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rates: dict[str, float] = {}

    def timed(name, run):
        run()  # warm-up pass
        sync()
        t = time.perf_counter()
        n = run()
        sync()
        rates[name] = n / (time.perf_counter() - t)
        print(f"{name:60s} {rates[name]:9,.0f} img/s", flush=True)

    # 1. ImagePipeline as the flow builds it, and with each suspect changed.
    bomb_guard = EmbedConfig(input="x", output="y").max_image_pixels
    for label, opts in (("copy_inputs=True (default)", {}),
                        ("copy_inputs=False (read in place)", {"copy_inputs": False}),
                        ("copy_inputs=True + max_pixels guard (the flow)", {"max_pixels": bomb_guard}),
                        ("copy_inputs=True prefetch=4", {"prefetch": 4})):
        pipe = ImagePipeline(recipe, batch_size=B, num_threads=T, device_id=device_id, **opts)
        timed(f"ImagePipeline {label}", lambda: sum(len(b.keys) for b in pipe.process(samples)))
        pipe.close()
        del pipe

    # 2. Bare DALI graphs: reader or external source, our recipe or a plain one; no Python logic of ours. Our
    # recipe's geometry (header sizes + NumPy) is computed ahead, outside the timing (ImagePipeline's numbers above
    # include it), and fed per batch; the reader gets it in its own (file) order from a source callback.
    import numpy as np

    steps = len(samples) // B
    sizes = np.array([image_size(d) for _, d in samples])
    n_samples = len(samples)

    def geometry_of(i):  # batch i of a stream that wraps around the samples, as the reader does
        idx = np.arange(i * B, (i + 1) * B) % n_samples
        return recipe.geometry(sizes[idx, 0], sizes[idx, 1])

    geometries = [geometry_of(i) for i in range(steps)]

    def plain(jpg, source):
        images = fn.decoders.image(jpg, device=decode, output_type=types.RGB,
                                   **({"hw_decoder_load": 0.9} if gpu else {}))
        return fn.crop_mirror_normalize(fn.resize(images, resize_shorter=256), crop=(224, 224), dtype=types.FLOAT,
                                        output_layout="CHW")

    def ours(jpg, source):
        geometry = None  # external sources, fed with the bytes
        if source == "reader":
            batches = iter(range(1 << 62))

            def next_geometry():
                g = geometry_of(next(batches))
                return tuple(g[k] for k in GEOMETRY_INPUTS)

            nodes = fn.external_source(source=next_geometry, num_outputs=len(GEOMETRY_INPUTS), dtype=types.FLOAT)
            geometry = dict(zip(GEOMETRY_INPUTS, nodes))
        return dali_preprocess(jpg, recipe, decode, geometry=geometry)

    for source in ("reader", "external copy", "external in place"):
        for name, graph_fn in (("plain resize", plain), ("our recipe", ours)):
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
                timed(f"bare {source}: {name}", lambda: sum(B for _ in range(steps) if pipe.run()))
            else:
                batches = [[np.frombuffer(d, np.uint8) for _, d in samples[i * B:(i + 1) * B]] for i in range(steps)]

                def feed(i):
                    pipe.feed_input("enc", batches[i])
                    if graph_fn is ours:
                        feed_geometry(pipe, geometries[i])

                def run_fed():
                    for i in range(len(batches)):  # two in flight, as ImagePipeline keeps them
                        feed(i)
                        pipe.schedule_run()
                        if i >= 1:
                            pipe.outputs()
                    pipe.outputs()
                    return len(batches) * B

                feed(0)  # the first schedule_run prefetches two iterations
                feed(1)
                pipe.schedule_run()
                pipe.outputs(), pipe.outputs()
                timed(f"bare {source}: {name}", run_fed)
            del pipe

    # 3. DALI and the model together, as Worker.embed runs them, on the default stream and on their own.
    from wdsembed.model import embed_batch
    from wdsembed.runner import Worker

    config = EmbedConfig(input="x", output="y", model_name=args.model, pretrained=False, batch_size=B,
                         num_threads_per_worker=T)
    worker = Worker(config)
    x = torch.randn(B, *worker.recipe.input_size, device=worker.device)

    def model_only():
        for _ in range(len(samples) // B):
            embed_batch(worker.loaded, x, autocast=True, normalize=True)
        return len(samples) // B * B

    timed(f"{args.model} model only", model_only)
    rates["dali"] = rates["ImagePipeline copy_inputs=True + max_pixels guard (the flow)"]
    bound = 1 / (1 / rates[f"{args.model} model only"] + 1 / rates["dali"])
    embed = lambda: len(worker.embed(iter(samples), autocast=True, normalize=True, on_batch=lambda n: None)[0])  # noqa: E731
    timed("Worker.embed, own stream (the flow)", embed)
    own = worker.stream
    worker.stream = None
    timed("Worker.embed, legacy default stream", embed)
    worker.stream = own
    print(f"{'sequential bound 1/(1/a+1/b)':60s} {bound:9,.0f} img/s; min(a, b) "
          f"{min(rates[f'{args.model} model only'], rates['dali']):,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
