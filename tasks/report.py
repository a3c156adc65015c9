from typing import Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from wdsembed import report as core
from wdsembed.config import EmbedConfig


def write_report(config: EmbedConfig, results: list[dict], failures: dict[str, str], wall_seconds: float,
                 timeline: Optional[dict] = None, previous: Optional[dict] = None,
                 claim_run: Optional[str] = None) -> dict:
    """Write OUTPUT/_manifest.json last, while the run still holds OUTPUT's claim `claim_run`, and put the per-shard
    table and the summary on the flow run. `previous`: the earlier manifest's shards
    (wdsembed.report.retire_manifest)."""
    manifest = core.build_manifest(config, results, failures, wall_seconds, timeline, previous)
    manifest["path"] = core.write_manifest(config, manifest, claim_run)
    rows = core.shard_rows(results, failures, manifest)
    create_table_artifact(rows, key="shards", description="One row per shard")
    create_markdown_artifact(core.markdown_summary(manifest, rows), key="summary", description="Run summary")
    return manifest


report = task(name="report", task_run_name="report")(write_report)  # no random suffix in the UI
