"""Serve the deployments of prefect.yaml from this Python process: no work pool, no worker.

    cd <project folder> && PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

Registers the same deployments as `prefect deploy --all` (names, schedules, parameters, concurrency) and runs
their flow runs as subprocesses of this process, one at a time, until stopped; stopping pauses the schedules.
They are read from prefect.yaml, so the two ways to deploy cannot drift apart. Serving takes the deployment
names over from a work pool (and `prefect deploy` takes them back): use one way per Prefect server.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python deployments/serve.py` puts deployments/ on the path, not the project

from prefect import serve  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.schedules import Schedule  # noqa: E402
from prefect.utilities.templating import apply_values, resolve_variables  # noqa: E402

from flows import prefect_env  # noqa: E402
from flows.deployed import embed  # noqa: E402

ENTRYPOINT = "flows/deployed.py:embed"


def deployment_specs(prefect_file: Path = ROOT / "prefect.yaml") -> list[dict]:
    """The `deployments:` of prefect.yaml, templated as `prefect deploy` does: Prefect variables, then environment."""
    specs = yaml.safe_load(prefect_file.read_text())["deployments"]
    specs = asyncio.run(resolve_variables(specs))
    return apply_values(specs, os.environ, remove_notset=False)


def to_deployments(specs: list[dict]) -> list[RunnerDeployment]:
    deployments = []
    for spec in specs:
        if spec["entrypoint"] != ENTRYPOINT:
            raise ValueError(f"deployment {spec['name']!r}: serve.py serves {ENTRYPOINT}, not {spec['entrypoint']}")
        limit = spec.get("concurrency_limit")
        deployments.append(
            embed.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters"),
                schedules=[Schedule(**s) for s in spec.get("schedules") or []],
                concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
            )
        )
    return deployments


if __name__ == "__main__":
    os.chdir(ROOT)  # flow runs load the entrypoint relative to the project folder
    prefect_env.set_defaults()  # the flow runs are subprocesses of this one: they inherit its environment
    # One run at a time in this process: each run takes every GPU of the host (the work pool's limit, here).
    serve(*to_deployments(deployment_specs()), limit=1)
