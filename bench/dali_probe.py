"""Where DALI's time goes on a GPU: our ImagePipeline against DALI's own webdataset reader, on the same photos.

    python bench/dali_probe.py [--images 8000] [--batch-size 256] [--threads 12]

Prints images/s for each variant; a variant far above ImagePipeline points at what to change.
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
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=12)
    args = p.parse_args()

    import torch
    from nvidia.dali import fn, pipeline_def, types

    from bench.throughput import build_shards
    from wdsembed import shards
    from wdsembed.pipeline import ImagePipeline
    from wdsembed.preprocess import PreprocessRecipe

    work = tempfile.mkdtemp()
    per = 2000
    n_shards = max(1, args.images // per)
    build_shards(work, n_shards, per, unique=1000)
    tars = sorted(os.path.join(work, f) for f in os.listdir(work) if f.endswith(".tar"))
    samples = []
    for tar in tars:
        with open(tar, "rb") as f:
            samples += [(s.key, bytes(s.image)) for s in shards.iter_samples(f, extensions=("jpg",), shard=tar)]
    B, T = args.batch_size, args.threads
    recipe = PreprocessRecipe(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

    def timed(name, fn_run):
        fn_run()  # warm-up pass
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = fn_run()
        torch.cuda.synchronize()
        print(f"{name:55s} {n / (time.perf_counter() - t):9,.0f} img/s", flush=True)

    for prefetch, batch in ((2, B), (4, B), (3, 2 * B)):
        pipe = ImagePipeline(recipe, batch_size=batch, num_threads=T, device_id=0, prefetch=prefetch)
        timed(f"ImagePipeline prefetch={prefetch} batch={batch}",
              lambda: sum(len(b.keys) for b in pipe.process(samples)))
        pipe.close()
        del pipe

    decode = lambda e: fn.decoders.image(e, device="mixed", output_type=types.RGB, hw_decoder_load=0.9)  # noqa: E731

    @pipeline_def(batch_size=B, num_threads=T, device_id=0, prefetch_queue_depth=2, exec_dynamic=True)
    def reader():
        jpg = fn.readers.webdataset(paths=tars, ext=["jpg"], name="r", missing_component_behavior="skip")
        return fn.crop_mirror_normalize(fn.resize(decode(jpg), resize_shorter=256), crop=(224, 224),
                                        dtype=types.FLOAT, output_layout="CHW")

    rp = reader()
    rp.build()
    steps = len(samples) // B
    timed("readers.webdataset: decode + resize_shorter + CMN", lambda: sum(B for _ in range(steps) if rp.run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
