"""Serve the deployments of prefect.yaml from this Python process: no work pool, no worker.

    cd <project folder> && PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

Registers the same deployments as `prefect deploy --all` (names, schedules, parameters, concurrency) and runs
their flow runs as subprocesses of this process, one at a time, until stopped; stopping pauses the schedules.
They are read from prefect.yaml, so the two ways to deploy cannot drift apart. Serving takes the deployment
names over from a work pool (and `prefect deploy` takes them back): use one way per Prefect server. It refuses
to start while a deployment of the same name is still registered to a work pool: serving would leave it on the
pool without the pool's pull steps, so the pool's worker would take its runs and each would crash.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python deployments/serve.py` puts deployments/ on the path, not the project

from prefect import get_client, serve  # noqa: E402
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


async def _on_work_pools(names: list[str]) -> dict[str, str]:
    """Of these deployment names, those registered to a work pool (by `prefect deploy`), with the pool's name."""
    from prefect.exceptions import ObjectNotFound

    found = {}
    async with get_client() as client:
        for name in names:
            try:
                deployment = await client.read_deployment_by_name(f"{embed.name}/{name}")
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                found[name] = deployment.work_pool_name
    return found


def refuse_pool_deployments(deployments: list[RunnerDeployment]) -> None:
    """Exit 2, saying what to delete, where a deployment of these names is still a work pool's."""
    on_pools = asyncio.run(_on_work_pools([d.name for d in deployments]))
    if on_pools:
        listed = ", ".join(f"{embed.name}/{name} (work pool {pool!r})" for name, pool in on_pools.items())
        deletes = "; ".join(f"prefect deployment delete {embed.name}/{name}" for name in on_pools)
        print(f"error: already deployed to a work pool by `prefect deploy`: {listed}. Served from here too, their "
              f"runs would go to the pool's worker and crash there. Delete them first ({deletes}), then start "
              "serve.py again", file=sys.stderr)
        sys.exit(2)


def stop_on_ctrl_c_as_on_sigterm() -> None:
    """Ctrl-C stops serving as SIGTERM does: Prefect's runner then cancels the flow run in flight (state Cancelled,
    its Dask workers stopped, its claim on OUTPUT released) before it exits. Left to themselves, the terminal's
    SIGINT would reach the flow-run process and its Dask workers too (one process group), and serve's own
    KeyboardInterrupt would end it before they did: the run left Running for good, holding the deployment's
    concurrency slot and OUTPUT's claim. So SIGINT is blocked, in this process and in every process it starts (they
    inherit the mask), and one thread here waits for it and sends this process SIGTERM (again at a second Ctrl-C,
    which makes the runner exit at once)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # threads and processes started after this inherit it

    def forward() -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=forward, name="ctrl-c-as-sigterm", daemon=True).start()


if __name__ == "__main__":
    stop_on_ctrl_c_as_on_sigterm()  # first: before any thread starts
    os.chdir(ROOT)  # flow runs load the entrypoint relative to the project folder
    prefect_env.set_defaults()  # the flow runs are subprocesses of this one: they inherit its environment
    deployments = to_deployments(deployment_specs())
    refuse_pool_deployments(deployments)
    # One run at a time in this process: each run takes every GPU of the host (the work pool's limit, here).
    serve(*deployments, limit=1)
