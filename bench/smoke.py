"""Cold smoke run: the CLI as a new user starts it, then every row of every shard checked.

    python bench/smoke.py --device cuda                  # one GPU (set CUDA_VISIBLE_DEVICES to pick it)
    python bench/smoke.py --device cuda --n-workers 2    # two GPUs, one worker each
    python bench/smoke.py --device cuda --workers-per-gpu 2 --models resnet18.a1_in1k   # two workers on one GPU
    python bench/smoke.py --device cpu                   # the same checks on the CPU path

A fresh Prefect home, no server and no Dask cluster running: `python flows/embed.py` starts both, as on a first run.
The data: several small img2dataset shards of real photographs in mixed formats (JPEG, PNG, WebP, grayscale, CMYK,
EXIF-rotated) with a corrupt image and a failed download in some. The weights: random, saved to a checkpoint, so the
reference below uses the very same ones without a download. Checks, per shard: one output row per parquet row;
every good image embedded, the corrupt one and the failed download with a reason; and every embedding against
timm's own eval transform on PIL (EXIF applied) with the fp32 model, at a minimum cosine of --min-cosine; on a GPU,
the model's full batches ran as a CUDA graph.
Exit status 0 only if every check passes; a JSON report goes to --json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = ["resnet18.a1_in1k", "vit_base_patch32_clip_224.openai", "convnext_tiny.fb_in22k_ft_in1k_384"]


def _encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def build_dataset(folder: str, n_shards: int, seed: int = 0) -> dict[str, dict]:
    """img2dataset-style shards; returns per stem the keys expected embedded and those expected to fail."""
    import random

    from PIL import Image

    from wdsembed.synthetic import PHOTO_NAMES, ShardSample, corrupt_image_bytes, load_photo, write_shard

    rng = random.Random(seed)
    expected = {}
    for s in range(n_shards):
        samples, bad = [], []
        for i in range(10):
            photo = load_photo(PHOTO_NAMES[(s * 10 + i) % len(PHOTO_NAMES)])
            short = rng.choice([160, 256, 331, 480])
            scale = short / min(photo.size)
            img = photo.convert("RGB").resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))))
            kind = i % 6
            if kind == 0:
                data, ext = _encode(img, "JPEG", quality=90), "jpg"
            elif kind == 1:
                data, ext = _encode(img, "PNG"), "png"
            elif kind == 2:
                data, ext = _encode(img, "WEBP", quality=90), "webp"
            elif kind == 3:
                data, ext = _encode(img.convert("L"), "JPEG", quality=90), "jpg"
            elif kind == 4:
                data, ext = _encode(img.convert("CMYK"), "JPEG", quality=90), "jpg"
            else:
                exif = Image.Exif()
                exif[0x0112] = rng.choice([3, 6, 8])  # stored rotated: the tools must turn it upright
                data, ext = _encode(img, "JPEG", quality=90, exif=exif.tobytes()), "jpg"
            samples.append(ShardSample(image=data, ext=ext, caption=f"photo {i}"))
        if s % 2 == 0:  # a corrupt image in every other shard
            samples.append(ShardSample(image=corrupt_image_bytes("truncated", seed=s), ext="jpg", caption="cut"))
            bad.append(len(samples) - 1)
        written = write_shard(folder, f"{s:05d}", samples, failed_rows=1, shard_id=s, shuffle_tar=s)
        by_row = [k for k in written.parquet_keys if k not in written.failed_keys]
        expected[f"{s:05d}"] = {
            "rows": len(written.parquet_keys),
            "bad": {by_row[i] for i in bad} | set(written.failed_keys),
            "good": {k for i, k in enumerate(by_row) if i not in bad},
        }
    return expected


def save_checkpoint(model_name: str, path: str) -> None:
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model(model_name, pretrained=False).state_dict(), path)


def reference_embeddings(model_name: str, checkpoint: str, folder: str, device: str) -> dict:
    """Each key's float32 embedding from timm's eval transform on PIL (EXIF orientation applied, converted to RGB) and
    the fp32 model."""
    import numpy as np
    import timm
    from PIL import Image, ImageOps

    from wdsembed import shards
    from wdsembed.model import embed_batch, load_model

    loaded = load_model(model_name, pretrained=False, checkpoint=checkpoint, device=device)
    transform = timm.data.create_transform(**loaded.data_config)
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            for sample in shards.iter_samples(f, extensions=("jpg", "png", "webp"), shard=name):
                if sample.error:
                    continue
                try:
                    img = ImageOps.exif_transpose(Image.open(io.BytesIO(bytes(sample.image)))).convert("RGB")
                    x = transform(img).unsqueeze(0).to(device)
                except Exception:  # noqa: BLE001 - PIL cannot read it either: no reference
                    continue
                emb = embed_batch(loaded, x, autocast=False, normalize=True).float().cpu().numpy()[0]
                out[sample.key] = emb.astype(np.float32)
    return out


def check(model_name: str, data: str, out: str, expected: dict, reference: dict, min_cosine: float) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    problems, cosines, rows = [], [], 0
    for stem, want in sorted(expected.items()):
        path = os.path.join(out, f"{stem}.parquet")
        if not os.path.exists(path):
            problems.append(f"{stem}: no output")
            continue
        table = pq.read_table(path).to_pydict()
        rows += len(table["key"])
        if len(table["key"]) != want["rows"] or len(set(table["key"])) != want["rows"]:
            problems.append(f"{stem}: {len(table['key'])} rows, expected {want['rows']} distinct")
        for key, emb, err in zip(table["key"], table["image_embedding"], table["embedding_error"]):
            if key in want["good"]:
                if emb is None:
                    problems.append(f"{stem}/{key}: not embedded ({err})")
                    continue
                ref = reference.get(key)
                if ref is not None:
                    cosines.append(float(np.dot(np.asarray(emb, dtype=np.float32), ref)))
            elif key in want["bad"]:
                if emb is not None or not err:
                    problems.append(f"{stem}/{key}: a bad sample should have no embedding and a reason")
            else:
                problems.append(f"{stem}/{key}: unexpected row")
    low = min(cosines) if cosines else float("nan")
    if not cosines:
        problems.append("no embedding compared with the reference")
    elif low < min_cosine:
        problems.append(f"minimum cosine {low:.6f} < {min_cosine}")
    return {"model": model_name, "shards": len(expected), "rows": rows, "compared": len(cosines),
            "min_cosine": round(low, 6), "mean_cosine": round(float(np.mean(cosines)), 6) if cosines else None,
            "problems": problems[:20], "ok": not problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--n-workers", type=int, default=None)
    p.add_argument("--workers-per-gpu", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-cosine", type=float, default=0.999)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="wdsembed-smoke-")
    data = os.path.join(work, "data")
    expected = build_dataset(data, args.shards)
    ref_device = "cuda" if args.device == "cuda" else "cpu"
    reports = []
    for model_name in args.models:
        tag = model_name.replace("/", "_")
        checkpoint = os.path.join(work, f"{tag}.pth")
        save_checkpoint(model_name, checkpoint)
        out = os.path.join(work, f"out-{tag}")
        # Cold: a Prefect home of its own, no API URL (the CLI starts a temporary server), no Dask cluster running.
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = os.path.join(work, f"prefect-{tag}")
        cmd = [sys.executable, os.path.join(ROOT, "flows", "embed.py"), data, "--output", out, "--model", model_name,
               "--checkpoint", checkpoint, "--batch-size", str(args.batch_size), "--device", args.device]
        if args.n_workers:
            cmd += ["--n-workers", str(args.n_workers)]
        if args.workers_per_gpu > 1:
            cmd += ["--workers-per-gpu", str(args.workers_per_gpu)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = round(time.perf_counter() - started, 1)
        report = {"model": model_name, "exit_code": proc.returncode, "seconds": seconds}
        if proc.returncode != 0:
            report.update(ok=False, problems=["the CLI failed"], tail=(proc.stdout + proc.stderr)[-3000:])
        else:
            reference = reference_embeddings(model_name, checkpoint, data, ref_device)
            report.update(check(model_name, data, out, expected, reference, args.min_cosine))
            with open(os.path.join(out, "_manifest.json")) as f:
                manifest = json.load(f)
            report["cuda_graph"] = manifest["model"].get("cuda_graph")
            report["compiled"] = manifest["model"].get("compiled")
            from wdsembed.worker import COMPILE_ENV, STREAM_METER_ENV
            metered = [s for s in manifest["shards"].values() if "model_busy_s" in (s.get("timeline") or {})]
            report["model_busy_s"] = round(sum(s["timeline"]["model_busy_s"] for s in metered), 4)
            if args.device == "cuda" and not report["cuda_graph"]:  # the full batches must have run as a graph
                report["ok"] = False
                report["problems"].append("the model did not run as a CUDA graph")
            if args.device == "cuda" and os.environ.get(COMPILE_ENV, "1") != "0" and not report["compiled"]:
                report["ok"] = False  # the default: that graph of torch.compile's kernels
                report["problems"].append("the model's graph was not compiled")
            workers = {(s.get("timeline") or {}).get("worker") for s in manifest["shards"].values()} - {None}
            report["workers"] = len(workers)
            if args.device == "cuda" and len(workers) < args.workers_per_gpu * (args.n_workers or 1):
                report["ok"] = False  # every worker embeds the first shards it is given alone (flows.embed)
                report["problems"].append(f"{len(workers)} worker processes embedded shards, not "
                                          f"{args.workers_per_gpu * (args.n_workers or 1)}")
            # Each worker times its model alone as it starts (a CUDA graph): every shard's timeline carries the
            # figure, and with one worker per GPU the manifest sets it against the rate the shards fed the model.
            alone = [(s.get("timeline") or {}).get("model_alone_images_per_second")
                     for s in manifest["shards"].values()]
            report["model_alone_images_per_second"] = sorted({a for a in alone if a})
            report["gpu_use"] = manifest.get("gpu_use")
            if args.device == "cuda" and report["cuda_graph"] and (not all(alone) or (
                    args.workers_per_gpu == 1 and (manifest.get("gpu_use") or {}).get("ratio") is None)):
                report["ok"] = False
                report["problems"].append(f"the model's own rate is missing: {alone}, gpu_use "
                                          f"{manifest.get('gpu_use')}")
            if (args.device == "cuda" and os.environ.get(STREAM_METER_ENV) == "1"
                    and (len(metered) != len(manifest["shards"]) or report["model_busy_s"] <= 0)):
                report["ok"] = False  # asked for, every shard's batches are timed on the model's stream
                report["problems"].append(f"the model's stream was timed in {len(metered)} of "
                                          f"{len(manifest['shards'])} shards")
        reports.append(report)
        print(json.dumps(report), flush=True)
    summary = {"device": args.device, "n_workers": args.n_workers, "workers_per_gpu": args.workers_per_gpu,
               "runs": reports,
               "ok": all(r["ok"] for r in reports)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print("SMOKE", "PASSED" if summary["ok"] else "FAILED", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
