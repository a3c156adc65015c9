"""The flow that deployments run (prefect.yaml, deployments/serve.py).

A deployment's entrypoint must be a flow object, but the Dask task runner depends on the run's parameters
(local GPUs, CPU workers, or a scheduler address). So this thin flow receives the config, refuses an unusable
one, then runs `embed-shards` as a subflow with the runner that config asks for (`flows.embed.run`).
"""
from __future__ import annotations

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from flows.embed import run
from tasks.expected_ends import log_expected_ends_without_traceback, refused
from wdsembed.config import EmbedConfig
from wdsembed.plan import check_config

_NOT_ENDED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def crash_what_it_left_running(flow, flow_run, state) -> None:
    """on_crashed: mark the crashed run's `embed-shards` subflow and task runs Crashed too. A flow-run process killed
    outright (the OOM killer, `kill -9`) reports nothing; the worker or serve.py marks the run itself Crashed and runs
    this hook, in its own process, but what ran inside it would otherwise stay Running in the UI for good."""
    message = f"its flow run {flow_run.name} crashed: {state.message}"[:2000]
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
        for subflow in subflows:
            if subflow.state is not None and not subflow.state.is_final():
                client.set_flow_run_state(subflow.id, Crashed(message=message), force=True)
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id, *(s.id for s in subflows)]))
        not_ended = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_NOT_ENDED)))
        marked: set = set()
        # One page at a time (the API answers at most its default limit, 200): each page marked leaves the filter,
        # so the next read brings the next ones, until none is left (or a page brings only runs already marked).
        while pending := [t for t in client.read_task_runs(flow_run_filter=runs, task_run_filter=not_ended)
                          if t.id not in marked]:
            for task_run in pending:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                marked.add(task_run.id)


@flow(name="wdsembed", log_prints=True, on_crashed=[crash_what_it_left_running])
def embed(config: EmbedConfig) -> dict:
    """Embed the WebDataset shards under `config.input` into one parquet per shard under `config.output`.
    Shards whose finished output exists are not recomputed (they come back cached)."""
    # Fail in seconds, naming what to change (unknown model, missing folder, output inside input), before a
    # Dask cluster starts. Field bounds (batch_size >= 1, ...) were checked by the API when the run was created.
    # Its answer (is every output finished?) goes on to the run, which would otherwise ask again.
    log_expected_ends_without_traceback()  # before the checks: a refusal ends the run in one line, as the command's
    try:
        all_finished = check_config(config)
    except ValueError as exc:  # what the command prints as its one 'error: ...' line (exit 2)
        raise refused(exc)
    return run(config, all_finished=all_finished)
