"""What PIL's two resize passes cost in the DALI graph: `preprocess.resize_passes` (one axis to 8 bits, then the
other, in PIL's order per image: RECIPE_IMPL_VERSION 3) against the one fused resize it replaced (version 1, `one_pass` below), side by side on the
same batch of real photographs, on the CPU or on one GPU.

Variants, each a pipeline of its own, taking turns round after round. Printed per variant: the median wall time per
batch, and the median CPU time of the whole process per batch (all of DALI's threads: on a CPU-only run, what the
batch costs, and less disturbed than the wall time by other work on the machine):

    crop_only   decode, crop_mirror_normalize (crop and pad, no resize): what the two others add a resize to
    one_pass    decode, one fused fn.resize (version 1's graph and geometry rows), crop_mirror_normalize
    two_passes  decode, preprocess.resize_passes, crop_mirror_normalize: the graph as it is

With --decoded (CPU only), the images arrive decoded (uint8 HWC, fed), so the times are the resize and the
normalization alone. `PreprocessRecipe.source_geometry`'s time per batch (NumPy, on the feeding thread) is printed
too.

    python bench/resize_passes.py                  # CPU, 2 DALI threads
    python bench/resize_passes.py --decoded        # CPU, resize alone
    python bench/resize_passes.py --gpu 0          # decode "mixed" (nvJPEG), resize on GPU 0
    python bench/resize_passes.py --model dla34.in1k --force-two-passes   # what two passes would cost bilinear
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import timeit
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wdsembed.imagesize import image_size  # noqa: E402
from wdsembed.preprocess import (  # noqa: E402
    INTERPOLATIONS,
    PreprocessRecipe,
    crop_normalize,
    feed_geometry,
    geometry_inputs,
    resize_passes,
)
from wdsembed.synthetic import photo_images  # noqa: E402

ONE_PASS_SOURCE = "one_pass_geometry"


def one_pass_rows(recipe: PreprocessRecipe, sizes: np.ndarray) -> np.ndarray:
    """Version 1's geometry rows: `PreprocessRecipe.geometry`'s region of interest, and its output size where that
    varies, as one (N, rows, 2) float32 array."""
    g = recipe.geometry(sizes[:, 0], sizes[:, 1])
    names = ("roi_start", "roi_end") if recipe.fixed_output_size else ("resize_size", "roi_start", "roi_end")
    return np.stack([g[name] for name in names], axis=1)


def one_pass(images: Any, recipe: PreprocessRecipe) -> Any:
    """Version 1's resize: one fn.resize for the resize and the crop, in float, uint8 out."""
    from nvidia.dali import fn, types

    rows = fn.external_source(name=ONE_PASS_SOURCE, dtype=types.FLOAT, ndim=2)
    fixed = recipe.fixed_output_size
    size = [float(fixed[0]), float(fixed[1])] if fixed else rows[0]
    return fn.resize(images, size=size, roi_start=rows[-2], roi_end=rows[-1],
                     interp_type=getattr(types, INTERPOLATIONS[recipe.interpolation]), antialias=True,
                     subpixel_scale=False)


def build(variant: str, recipe: PreprocessRecipe, batch: int, threads: int, device_id: Any, decoded: bool) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
    def graph():  # type: ignore[no-untyped-def]
        if decoded:
            images = fn.external_source(name="images", dtype=types.UINT8, ndim=3, layout="HWC")
        else:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                       output_type=types.RGB)
        if variant == "one_pass":
            images = one_pass(images, recipe)
        elif variant == "two_passes":
            images = resize_passes(images, recipe, geometry_inputs(recipe))
        return crop_normalize(images, recipe)

    pipe = graph()
    pipe.build()
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=None, help="GPU id (default: CPU only)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=3, help="batches per variant per round")
    parser.add_argument("--model", default="resnet18.a1_in1k", help="timm pretrained tag whose data config to use")
    parser.add_argument("--decoded", action="store_true", help="feed decoded images (CPU only): the resize alone")
    parser.add_argument("--force-two-passes", action="store_true",
                        help="two passes whatever the interpolation (a bilinear recipe's graph has one)")
    args = parser.parse_args()
    if args.decoded and args.gpu is not None:
        parser.error("--decoded is CPU only")
    if args.force_two_passes:
        PreprocessRecipe.two_passes = property(lambda self: True)  # type: ignore[assignment,method-assign]

    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    recipe = PreprocessRecipe.from_data_config(
        resolve_data_config(pretrained_cfg=get_pretrained_cfg(args.model).to_dict()))
    if not recipe.two_passes:
        parser.error(f"{args.model}'s recipe ({recipe.interpolation}) resizes in one pass: see --force-two-passes")
    photos = photo_images(args.batch)
    encoded = [np.frombuffer(p.data, np.uint8) for p in photos]
    sizes = np.array([image_size(p.data) for p in photos], dtype=np.int64)
    if args.decoded:
        from PIL import Image

        inputs = ("images", [np.asarray(Image.open(io.BytesIO(p.data)).convert("RGB")) for p in photos])
    else:
        inputs = ("encoded", encoded)
    rows_one = one_pass_rows(recipe, sizes)
    variants = ("crop_only", "one_pass", "two_passes")
    pipes = {v: build(v, recipe, args.batch, args.threads, args.gpu, args.decoded) for v in variants}

    def run(variant: str) -> tuple[float, float]:
        pipe = pipes[variant]
        t, cpu = time.perf_counter(), time.process_time()
        pipe.feed_input(*inputs)
        if variant == "one_pass":
            from nvidia.dali.tensors import TensorListCPU

            pipe.feed_input(ONE_PASS_SOURCE, TensorListCPU(rows_one))
        elif variant == "two_passes":
            feed_geometry(pipe, recipe.source_geometry(sizes))
        (out,) = pipe.run()
        if args.gpu is not None:
            out.as_cpu()  # waits for the GPU work
        return time.perf_counter() - t, time.process_time() - cpu

    for v in variants:  # warm-up: buffers grown, first-batch setup out of the way
        run(v), run(v)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v] += [run(v) for _ in range(args.per_round)]
    where = f"GPU {args.gpu} (nvJPEG)" if args.gpu is not None else f"CPU, {args.threads} DALI threads"
    print(f"{args.model} {recipe.crop_size} {recipe.interpolation} {recipe.crop_mode}; batch {args.batch} photos "
          f"({'decoded, fed' if args.decoded else 'JPEG, decoded in the graph'}); {where}; "
          f"{args.rounds} rounds x {args.per_round} batches per variant")
    for i, what in enumerate(("wall", "CPU")):
        med = {v: statistics.median(t[i] for t in times[v]) * 1e3 for v in variants}
        print(f"  {what} time per batch, median (min-max):")
        for v in variants:
            t = sorted(x[i] for x in times[v])
            extra = "" if v == "crop_only" else f"   resize = {med[v] - med['crop_only']:7.2f} ms"
            print(f"    {v:10s} {med[v]:8.2f} ms ({t[0] * 1e3:.2f}-{t[-1] * 1e3:.2f}){extra}")
        print(f"    two_passes - one_pass: {med['two_passes'] - med['one_pass']:+.2f} ms/batch "
              f"({med['two_passes'] / med['one_pass'] - 1:+.1%})")
    n = 2000
    took = min(timeit.repeat(lambda: recipe.source_geometry(sizes), number=n, repeat=5)) / n
    print(f"  source_geometry: {took * 1e6:.1f} us per batch ({recipe.source_geometry(sizes).shape[1]} rows)")


if __name__ == "__main__":
    main()
