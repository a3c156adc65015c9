"""What a run tells its user: the manifest, the per-shard table and the one-screen summary."""
from __future__ import annotations

import datetime as dt
import json
import os
from typing import Iterable, Optional

from wdsembed import output, storage
from wdsembed.config import EmbedConfig
from wdsembed.versions import code_version, package_versions

TABLE_COLUMNS = ("shard", "rows", "embedded", "failed", "status", "seconds", "images_per_second")


def shard_rows(results: Iterable[dict], failures: dict[str, str]) -> list[dict]:
    """One row per shard, finished or failed, for the table artifact and the CLI summary."""
    rows = []
    for r in results:
        rows.append({
            "shard": r["stem"], "rows": r["rows"], "embedded": r["embedded"], "failed": r["failed"],
            "status": "cached" if r.get("cached") else "computed", "seconds": round(r.get("seconds", 0.0), 2),
            "images_per_second": r.get("images_per_second", 0.0),
        })
    for stem, reason in sorted(failures.items()):
        rows.append({"shard": stem, "rows": 0, "embedded": 0, "failed": 0, "status": f"FAILED: {reason}",
                     "seconds": 0.0, "images_per_second": 0.0})
    return sorted(rows, key=lambda row: row["shard"])


def totals(results: list[dict], wall_seconds: float) -> dict:
    computed = [r for r in results if not r.get("cached")]
    embedded_now = sum(r["embedded"] for r in computed)
    return {
        "shards": len(results),
        "computed": len(computed),
        "cached": len(results) - len(computed),
        "rows": sum(r["rows"] for r in results),
        "embedded": sum(r["embedded"] for r in results),
        "failed_rows": sum(r["failed"] for r in results),
        "shards_with_warnings": sum(1 for r in results if r.get("warnings")),
        "embedded_this_run": embedded_now,
        "wall_seconds": round(wall_seconds, 2),
        "images_per_second": round(embedded_now / wall_seconds, 1) if wall_seconds > 0 else 0.0,
    }


def build_manifest(config: EmbedConfig, results: list[dict], failures: dict[str, str], wall_seconds: float) -> dict:
    model = next((r.get("model") for r in results if r.get("model")), None)
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input": config.input,
        "output": config.output,
        # Storage options stay out: they may hold credentials.
        "config": config.model_dump(exclude={"storage_options"}),
        "model": model,
        "versions": package_versions() | {"wdsembed-code": code_version()},
        "totals": totals(results, wall_seconds),
        "shards": {
            r["stem"]: {k: r.get(k) for k in ("output", "rows", "samples", "embedded", "failed", "cache_key",
                                              "seconds", "images_per_second", "batch_size", "timeline")}
            | {"warnings": r.get("warnings") or []}
            | {"status": "cached" if r.get("cached") else "computed"}
            for r in results
        },
        "failed_shards": failures,
    }


def write_manifest(config: EmbedConfig, manifest: dict) -> str:
    fs, root = storage.filesystem(config.output, config.storage_options)
    return storage.to_url(fs, output.write_manifest(root, fs, manifest))


def markdown_summary(manifest: dict, rows: list[dict]) -> str:
    t = manifest["totals"]
    model = manifest.get("model") or {}
    lines = [
        f"## Embedded {t['shards']} shard(s): {t['computed']} computed, {t['cached']} cached",
        "",
        f"- model: `{model.get('name', '?')}` ({model.get('weights', '?')}), {model.get('embedding', '?')} "
        f"embedding, {model.get('dim', '?')} dimensions",
        f"- rows: {t['rows']}, embedded: {t['embedded']}, without embedding: {t['failed_rows']}",
        f"- this run: {t['embedded_this_run']} images in {t['wall_seconds']} s ({t['images_per_second']} images/s)",
        f"- output: `{manifest['output']}`",
    ]
    if manifest["failed_shards"]:
        lines += ["", "### Failed shards", ""]
        lines += [f"- `{stem}`: {reason}" for stem, reason in sorted(manifest["failed_shards"].items())]
    warned = {stem: s["warnings"] for stem, s in manifest["shards"].items() if s.get("warnings")}
    if warned:
        lines += ["", "### Shards with warnings (output written)", ""]
        lines += [f"- `{stem}`: {'; '.join(w)}" for stem, w in sorted(warned.items())]
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
