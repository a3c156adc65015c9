"""Command line: arguments -> EmbedConfig -> a run function (the Prefect flow), with a progress bar and summary."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

from pydantic import ValidationError

from wdsembed.config import DEFAULT_MODEL, EmbedConfig

DEMO_MODEL = "vit_base_patch16_clip_224.openai"
DEMO_INPUT = "demo-data"
DEMO_OUTPUT = "demo-output"


def build_parser() -> argparse.ArgumentParser:
    fields = EmbedConfig.model_fields

    def doc(name: str) -> str:
        return fields[name].description or ""

    p = argparse.ArgumentParser(
        prog="python flows/embed.py",
        description="Embed WebDataset image shards with a timm model; one parquet per shard with an embedding "
        "column. Without INPUT, runs a built-in demo on generated shards.",
    )
    p.add_argument("input", nargs="?", help=doc("input") + " Omit to run the demo.")
    p.add_argument("--output", "-o", help=doc("output"))
    p.add_argument("--model", default=None, help=f"{doc('model_name')} Default: {DEFAULT_MODEL}.")
    p.add_argument("--no-pretrained", action="store_true", help="Random weights (no download).")
    p.add_argument("--checkpoint", help=doc("checkpoint"))
    p.add_argument("--batch-size", type=int, default=fields["batch_size"].default, help=doc("batch_size"))
    p.add_argument("--num-threads", type=int, default=fields["num_threads_per_worker"].default,
                   help=doc("num_threads_per_worker"))
    p.add_argument("--no-normalize", action="store_true", help="Keep the embeddings' norms as the model gives them.")
    p.add_argument("--no-autocast", action="store_true", help="Run the model in float32 on the GPU too.")
    p.add_argument("--no-index-files", action="store_true", help="Read shards without DALI .idx files.")
    p.add_argument("--index-cache-dir", help=doc("index_cache_dir"))
    p.add_argument("--id-column", default=fields["id_column"].default, help=doc("id_column"))
    p.add_argument("--embedding-column", default=fields["embedding_column"].default, help=doc("embedding_column"))
    p.add_argument("--embedding", choices=["auto", "head", "pooled"], default="auto", help=doc("embedding"))
    p.add_argument("--max-image-pixels", type=int, default=fields["max_image_pixels"].default,
                   help=doc("max_image_pixels"))
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help=doc("device"))
    p.add_argument("--force", action="store_true", help=doc("force"))
    p.add_argument("--dask-address", help=doc("dask_address"))
    p.add_argument("--n-workers", type=int, help=doc("n_workers"))
    p.add_argument("--shards-per-task", type=int, default=fields["shards_per_task"].default,
                   help=doc("shards_per_task"))
    p.add_argument("--result-storage", help=doc("result_storage"))
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for INPUT/OUTPUT, repeatable (endpoint_url=http://127.0.0.1:9000).")
    return p


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    storage_options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--storage-option takes KEY=VALUE, got {item!r}")
        storage_options[key] = value
    values = dict(
        input=args.input,
        output=args.output,
        pretrained=not args.no_pretrained,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        num_threads_per_worker=args.num_threads,
        normalize_embeddings=not args.no_normalize,
        autocast=not args.no_autocast,
        use_index_files=not args.no_index_files,
        index_cache_dir=args.index_cache_dir,
        id_column=args.id_column,
        embedding_column=args.embedding_column,
        embedding=args.embedding,
        device=args.device,
        max_image_pixels=args.max_image_pixels,
        force=args.force,
        dask_address=args.dask_address,
        n_workers=args.n_workers,
        shards_per_task=args.shards_per_task,
        result_storage=args.result_storage,
        storage_options=storage_options,
    )
    if args.model:
        values["model_name"] = args.model
    return EmbedConfig(**values)


def prepare_demo(args: argparse.Namespace) -> None:
    """Write a few small shards of generated images and point the run at them, offline."""
    from wdsembed.synthetic import write_demo_dataset

    args.input = os.path.abspath(DEMO_INPUT)
    args.output = args.output or os.path.abspath(DEMO_OUTPUT)
    if not args.model:
        args.model = DEMO_MODEL
    # No network here is assumed: the demo's model runs on random weights unless a checkpoint is given.
    if not args.checkpoint:
        args.no_pretrained = True
    # A few dozen images: one worker loads one model, instead of two competing for a small machine's cores.
    if args.n_workers is None:
        args.n_workers = 1
    write_demo_dataset(args.input)
    print(f"demo: wrote generated shards to {args.input}; model {args.model} "
          f"({'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights, offline'})")


def main(run: Callable[..., dict], argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.input is None:
        prepare_demo(args)
    elif not args.output:
        print("error: --output is required with INPUT", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        print("error: invalid parameters:", file=sys.stderr)
        for err in exc.errors():
            print(f"  {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2

    from wdsembed.plan import check_config

    try:
        check_config(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    progress = _Progress()
    try:
        with progress:
            manifest = run(config, on_shard_done=progress.update)
    except Exception as exc:  # noqa: BLE001 - a failed run prints its reason, not a traceback wall
        if isinstance(getattr(exc, "manifest", None), dict):  # some shards failed: the rest are done
            print_summary(exc.manifest)
        print(f"\nrun failed: {exc or repr(exc)}", file=sys.stderr)
        _print_manifest_hint(config)
        return 1
    print_summary(manifest)
    return 0


class _Progress:
    """A terminal progress bar: shards, images, images/s."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.started = time.perf_counter()
        self.images = 0
        self.bar = Progress(
            TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[images]} images"),
            TextColumn("{task.fields[rate]} images/s"), TimeElapsedColumn(),
            # Rich's stdout proxy holds a lock that Dask would then try to pickle with every task.
            redirect_stdout=False, redirect_stderr=False,
        )
        self.bar.__enter__()
        self.task = self.bar.add_task("shards", total=None, images=0, rate="-")
        return self

    def update(self, result: Optional[dict], done: int, total: int) -> None:
        if result and not result.get("cached"):
            self.images += result["embedded"]
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, completed=done, total=total, images=self.images, rate=f"{rate:,.0f}")

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


def print_summary(manifest: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    t = manifest["totals"]
    model = manifest.get("model") or {}
    table = Table(title=f"{t['shards']} shard(s): {t['computed']} computed, {t['cached']} cached")
    for name in ("shard", "rows", "embedded", "failed", "status", "images/s"):
        table.add_column(name, justify="right" if name not in ("shard", "status") else "left")
    for stem, s in sorted(manifest["shards"].items()):
        table.add_row(stem, str(s["rows"]), str(s["embedded"]), str(s["failed"]), s.get("status", ""),
                      str(s.get("images_per_second", "")))
    for stem, reason in sorted((manifest.get("failed_shards") or {}).items()):
        table.add_row(stem, "-", "-", "-", Text(f"FAILED: {reason}"), "-")  # Text: a reason is not markup
    console.print(table)
    console.print(
        f"model {model.get('name')} ({model.get('weights')}), {model.get('embedding')} embedding, "
        f"{model.get('dim')} dims | {t['embedded']} of {t['rows']} rows embedded | "
        f"{t['embedded_this_run']} images this run at {t['images_per_second']} images/s"
    )
    for stem, s in sorted(manifest["shards"].items()):
        for warning in s.get("warnings") or []:
            console.print(f"warning: shard {stem}: {warning}", markup=False)
    console.print(f"output: {manifest['output']}  (manifest: {manifest.get('path')})")


def _print_manifest_hint(config: EmbedConfig) -> None:
    print(f"finished shards are in {config.output}; run the same command again to finish the rest "
          "(finished shards are not recomputed)", file=sys.stderr)
