"""The embedding flow: index the shards, embed each on a Dask worker, validate, report.

    python flows/embed.py INPUT --output OUTPUT [--model NAME] ...   # embed a folder of shards
    python flows/embed.py                                           # the built-in demo
    python flows/embed.py --help
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Callable, Optional

if __name__ == "__main__":
    # `python flows/embed.py` from a checkout that is not installed puts flows/ on the path, not the project root
    # that holds `tasks` (imported as a module, flows.embed changes no path).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # The `wdsembed` command's start (flows.launch), before the imports below: Prefect is imported only once the
    # checks have passed, and the flow runs from the importable module flows.embed, not from __main__ (Dask pickles
    # tasks by reference to their module).
    from flows.launch import launch

    def run_flow(config, **options) -> dict:
        import flows.embed

        return flows.embed.run(config, **options)

    sys.exit(launch(run_flow))

from flows import prefect_env  # noqa: E402

with prefect_env.callers_logging_kept():  # Prefect sets its logging up as it is first imported
    importlib.import_module("prefect.main")

import dask  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from flows import apiserver  # noqa: E402
from tasks import prefect_events  # noqa: E402
from tasks.embed import embed_shards, result_storage_for, run_name  # noqa: E402
from tasks.expected_ends import log_expected_ends_without_traceback, quiet_failed_log_sends, refused  # noqa: E402
from tasks.index import index_shards  # noqa: E402
from tasks.report import report  # noqa: E402
from wdsembed import caching, cluster, faults, fidelity, outputclaim  # noqa: E402
from wdsembed.cli import run_result_known as result_known  # noqa: E402
from wdsembed.config import EmbedConfig  # noqa: E402
from wdsembed.decoderlog import decoder_messages_to_log  # noqa: E402
from wdsembed.progress import ProgressLog, RunProgress  # noqa: E402
from wdsembed.plan import (  # noqa: E402
    check_storage, forget_checked_input, nothing_to_compute, remove_failed_outputs_made_otherwise,
    remove_views_without_tables, shard_groups,
)
from wdsembed.report import (  # noqa: E402
    Manifest, ManifestNotWritten, name_shards, retire_manifest, with_manifest_failure,
)
from wdsembed.shard import ShardsFailed  # noqa: E402
from wdsembed.threads import ctrl_c_held  # noqa: E402


@dataclass
class _RunInProcess:
    """What one run() shares with its flow, which runs in this process: the caller's callback as each shard ends
    (the CLI's progress bar; not a flow parameter, since parameters travel to the Prefect API), the id of the run's
    claim on OUTPUT (not a flow parameter either: no user sets it), and the manifest, kept in case only the task
    runner's shutdown fails after it."""

    # (result or None where the shard failed, shards ended, total); (None, 0, total, finished) once the shards are
    # planned, `finished` of them found finished before any result comes back
    on_shard_done: Optional[Callable[[Optional[dict], int, int], None]] = None
    claim_run: Optional[str] = None  # outputclaim.Claim.run: the tasks write their shards only while it holds OUTPUT
    manifest: Optional[dict] = None
    # The shards run on the Dask client current in the caller's process (cluster.current_client_for), not on a
    # cluster of the run's own
    on_current_client: bool = False


# Scoped to the run() that set it (and the flow run it starts), not to the module: two runs never share one.
_this_run: ContextVar[Optional[_RunInProcess]] = ContextVar("wdsembed_run", default=None)


def embed_dataset(config: EmbedConfig) -> Manifest:
    """Embed every WebDataset shard under `config.input` into `config.output`/<shard>.parquet.

    index the shards -> one embedding task per group of shards (plan.shard_groups; each shard embedded, validated
    and written whole by `wdsembed.shard.process_shard` on a Dask worker) -> report (manifest and artifacts).
    Started by run(), it writes under run()'s claim on OUTPUT; started otherwise (`embed_flow(config)`, a subflow
    of a flow of the caller's, a deployment of this flow), it takes the claim itself, first, and releases it as it
    ends: refused (OutputClaimedError) where another run holds OUTPUT, as run() is."""
    hooks = _this_run.get() or _RunInProcess()
    if hooks.claim_run is not None:
        manifest = _embed_claimed(config, hooks)
        # Started by run(), which unquotes it: as the flow run ends, Prefect walks its return value for futures
        # (none here), every shard's entry of the manifest, about 1 s of this process for 4,000 shards. Not where
        # Prefect persists the flow run's result (PREFECT_RESULTS_PERSIST_BY_DEFAULT), which is then the manifest.
        from prefect.results import should_persist_result

        return manifest if should_persist_result() else quote(manifest)
    # Taken here rather than the call refused: held by the process the flow runs in, as run()'s is, before the
    # planning reads OUTPUT (index_shards) or anything is written to it. The same setup as run()'s around it, and
    # the same refusal of an input or output store that cannot be used, in one line, before the claim.
    with run_setup():
        try:
            check_storage(config)
        except ValueError as exc:
            raise refused(exc)
        with claim_output(config) as claim:
            _say_unused_dask_settings(config)
            return _embed_claimed(config, replace(hooks, claim_run=claim.run))


def _say_unused_dask_settings(config: EmbedConfig) -> None:
    """The flow object's own task runner is Prefect's thread pool: called directly without a Dask runner, its
    shards run in threads of this process, and the config's Dask settings go unused. Said rather than silent: a
    run given a scheduler's address ran on this host."""
    from prefect.context import FlowRunContext

    if isinstance(FlowRunContext.get().task_runner, DaskTaskRunner):
        return
    unused = [f"{name}={getattr(config, name)!r}" for name in ("dask_address", "n_workers")
              if getattr(config, name) is not None]
    unused += [f"workers_per_gpu={config.workers_per_gpu}"] if config.workers_per_gpu > 1 else []
    if unused:
        get_run_logger().warning(
            "%s not used: this flow's task runner is %s, which runs the shards in threads of this process. "
            "flows.embed.run(config) runs the flow on the Dask cluster the config asks for; or give the flow "
            "embed_flow.with_options(task_runner=DaskTaskRunner(**wdsembed.cluster.task_runner_kwargs(config)))",
            ", ".join(unused), type(FlowRunContext.get().task_runner).__name__)


@contextlib.contextmanager
def run_setup():
    """What a run of embed-shards needs around it in this process, however it was started: by run() (the command,
    the Python API, the deployed flow) or as the flow object itself (`embed_flow(config)`, a subflow of a flow of the
    caller's, with a task runner of the caller's).
    * prefect_env's defaults, for the processes the run starts (Dask workers, a temporary API server);
    * the run's expected ends (a refusal, failed shards) logged in one line, without Prefect's traceback;
    * DALI's decoder lines (twice per bad image, on the stderr of this process and of the local workers it starts,
      which inherit the routing) sent to the log at DEBUG: a deployment's process worker would show thousands as
      its output, and a script's terminal as many. Each bad image's reason is on its row;
    * Dask's INFO lines off, as for the command, also where Dask was imported before the defaults were set;
    * a local scheduler handing a worker thread one shard at a time: a shard queued behind a long one would wait
      there while another worker idles, and would die with it if that worker's process did."""
    prefect_env.set_defaults()
    log_expected_ends_without_traceback(server_trouble=apiserver.trouble)
    with decoder_messages_to_log(), prefect_env.dask_logging_defaults(), \
            dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        yield


def claim_output(config: EmbedConfig) -> contextlib.AbstractContextManager[outputclaim.Claim]:
    """outputclaim.held(config), naming the flow run it is taken in (the deployed flow's, a run started from the
    UI or a schedule): a run refused because of it names that flow run, which an operator can open or cancel in the
    UI, not only a claim id, a pid and a host."""
    from prefect.context import FlowRunContext
    from prefect.utilities.urls import url_for

    context = FlowRunContext.get()
    by = None
    if context is not None and context.flow_run is not None:
        flow_run = context.flow_run
        by = f"Prefect flow run {flow_run.name!r} of flow {context.flow.name!r} ({url_for(flow_run) or flow_run.id})"
    return outputclaim.held(config, by)


def _embed_claimed(config: EmbedConfig, hooks: _RunInProcess) -> Manifest:
    outputclaim.reopen_shards(hooks.claim_run)  # a flow retry under run()'s claim: what the last attempt closed
    logger = get_run_logger()
    started = time.perf_counter()
    timeline = {"start": time.time()}  # the run's own steps, in the manifest beside each shard's
    # Resume: Prefect's task cache (results under config.result_storage) skips finished shards, but a cached
    # result says nothing of the output itself. Every output's footer is read as the run is planned; a shard whose
    # output is missing, unreadable (shard.finished_output) or made from other inputs recomputes (refresh_cache), and
    # --force recomputes all.
    plans, finished, output_files = index_shards(config)
    previous = retire_manifest(config, plans, finished, output_files)  # before the first shard is written
    # Where the outputs go, said at the start: a long run's log is read long before its summary.
    logger.info("%d shard(s) under %s, their outputs to %s", len(plans), config.input, config.output)
    run_progress = RunProgress(len(plans), len(finished))
    progress = create_progress_artifact(0.0, key="embedding-progress", description="Shards finished")
    if hooks.on_shard_done:  # the run's size, known now: none ended yet (the CLI's bar read 0/? until one did)
        hooks.on_shard_done(None, 0, len(plans), len(finished))
    logger.info("%d shard(s) with a finished output, %d to compute", len(finished), len(plans) - len(finished))
    cached_task = embed_shards.with_options(result_storage=result_storage_for(config))
    fresh_task = cached_task.with_options(refresh_cache=True)

    # Where the workers declare GPUs, each embedding task takes a share of one: a few shards per GPU worker at a
    # time, one in its pipeline, the others' bookkeeping and writing overlapping it (cluster.SHARDS_PER_GPU). Asked of
    # this run's own Dask client (its cluster starts here if it has not yet), before anything is submitted.
    gpu_share = {"GPU": cluster.GPU_SHARE_PER_SHARD}
    # Where every shard is finished, not asked at all: a Dask task runner of the caller's (`embed_flow` with
    # `task_runner=DaskTaskRunner(...)`) would start its local cluster only for the cached task runs, which run in
    # this process's threads below, as run() runs them with nothing to compute.
    all_done_here = all(p.stem in finished for p in plans)
    client = None if all_done_here else _dask_client()
    annotations = {"resources": gpu_share} if cluster.gpu_slots_declared(client) else {}
    heads = cluster.worker_count(client) if client is not None else 0
    if hooks.on_current_client and client is not None:
        logger.info("a Dask client is current in this process: the shards run on its scheduler at %s and its %d "
                    "worker(s), not on a local cluster of the run's own (close that client for the run to start one)",
                    client.scheduler.address, heads)
    shared = bool(config.dask_address) or hooks.on_current_client  # workers of a cluster this run did not start
    if shared and client is not None and len(finished) < len(plans):
        # Workers of a cluster this run did not start: what they lack is said once, before any shard goes to them.
        cluster.check_workers(client, config, next(p.shard for p in plans if p.stem not in finished),
                              modules=("wdsembed.shard",), specs=("tasks.embed", "timm", "nvidia.dali"))
    groups = shard_groups(plans, config.shards_per_task)
    if len(groups) < len(plans):
        logger.info("%d task runs of up to %d shards each", len(groups), len(groups[0]))
    # One task per worker first (Dask hands them to idle workers, one each), then the others once those began
    # (`heads`, counted above).
    # A group whose every shard the planning found finished needs no worker: its task run comes back Cached, or,
    # where the cache has no result for that very group (a run of more shards groups them otherwise), finds each
    # output done from its footers. On Dask workers, 674 such task runs took 75 s of a run of 20 new shards beside
    # 2,000 finished ones (2 cores), ahead of the new shards; in this process's threads, as where every shard is
    # finished (_run_claimed), they take no worker's time.
    to_workers, finished_groups = groups, []
    if client is not None or all_done_here:
        done_here = [all(p.stem in finished for p in g) for g in groups]
        to_workers = [g for g, here in zip(groups, done_here) if not here]
        finished_groups = [g for g, here in zip(groups, done_here) if here]
    timeline["planned"] = time.time()

    results, failures, transient = [], {}, set()
    given_up = []  # the plans of tasks Dask gave up on: a worker may yet write them whole (written_after_all)
    done = 0
    # The artifact's description says what its bar cannot: failed shards, images/s, the time left.
    progress_updates = ProgressUpdates(len(plans), lambda percent: update_progress_artifact(
        progress, percent, description=run_progress.words()))
    # The same in the flow run's log, a line a minute at most (the terminal's bar shows only its last state where
    # stdout is no terminal), and where no shard has ended for long (a stalled run, told from a slow one).
    progress_log = ProgressLog(run_progress, logger.info)
    futures = {}  # every task run's future -> its group
    uncollected = {}  # those whose end is not yet counted

    def collect(future) -> None:
        """A task run's end: its shards counted and shown (the bar, the artifact, the log), its failures said and
        recorded, its Dask future released. As each ends, while the others are still being submitted too."""
        nonlocal done
        group = uncollected.pop(future)
        finished_now, failed_now, transient_now = _outcome(future, group, finished, config)
        transient.update(transient_now)
        timeline["collected"] = time.time()
        failures.update(failed_now)
        lost = bool(failed_now) and _task_lost(future)
        if lost or (failed_now and shared):
            # Said here as it comes back only where the task run's own end (its ShardsFailed: the reasons, by
            # cause) is not on this terminal: its worker died before it could end, or it ran on the workers of a
            # cluster this run did not start. The workers of the run's own cluster print it here; the summary
            # says it again.
            for stem, reason in failed_now.items():
                logger.error("shard %s failed: %s", stem, reason)
        if failed_now and _given_up(future):
            # Its worker died, or went with the scheduler: nothing reports the task run's end (it may not even
            # have begun). A worker that outlived its scheduler and ends the shard after all sends its own end.
            _record_lost_run(future, group, failed_now, fresh_task)
            given_up.extend(p for p in group if p.stem in failed_now)
        # Taken: Dask need keep it no longer. Kept, it stays on the worker that made it, and were that worker to
        # die, Dask would run the task again to make it again (in the UI, a finished task run back to Running).
        _release(future)
        results.extend(finished_now)
        for result in finished_now + [None] * len(failed_now):
            done += 1
            progress_log.shard_ended(result)
            if hooks.on_shard_done:
                hooks.on_shard_done(result, done, len(plans))
        progress_updates.done(done)

    ended = cluster.Ended()  # the task runs that end while the others are being submitted
    next_take = 0.0
    with progress_log:
        with dask.annotate(**annotations), _task_starts(client) as starts:
            for group in to_workers:
                if client is not None and client.status != "running":
                    break  # its scheduler lost: a task submitted now would wait for it to come back (Dask's 30 s)
                task = cached_task if all(p.stem in finished for p in group) else fresh_task
                future = task.submit(config, group, claim_run=hooks.claim_run)
                futures[future] = uncollected[future] = group
                ended.add(future)
                if starts and len(futures) == heads < len(to_workers):
                    deadline = time.monotonic() + FIRST_TASK_HEAD_START_S
                    for first, first_group in futures.items():
                        starts.wait(first_group[0].stem, deadline - time.monotonic(), done=first.wrapped_future.done)
                    timeline["first_started"] = time.time()
                if time.monotonic() >= next_take:
                    next_take = time.monotonic() + COLLECT_WHILE_SUBMITTING_EVERY_S
                    for each in ended.take():
                        collect(each)
        on_workers = dict(futures)  # Dask's futures; those of this process's threads follow
        unsubmitted = to_workers[len(on_workers):]  # their scheduler lost before they went to it
        in_process = contextlib.ExitStack()  # closed once every shard has come back
        if finished_groups:
            here = in_process.enter_context(ThreadPoolTaskRunner(max_workers=IN_PROCESS_TASK_THREADS))
            for group in finished_groups:
                future = here.submit(cached_task, {"config": config, "plans": group, "claim_run": hooks.claim_run})
                futures[future] = uncollected[future] = group
        timeline["submitted"] = time.time()

        # Workers all paused for their memory start no shard: said, then the shards not started fail (cluster).
        watch = cluster.StallWatch(client, [f.wrapped_future for f in on_workers], logger.warning) \
            if client is not None else contextlib.nullcontext()
        with in_process, watch:
            for future in as_completed(list(uncollected)):
                collect(future)
    for group in unsubmitted:
        failed_now = {p.stem: cluster.scheduler_lost(client) for p in group}
        for stem, reason in failed_now.items():
            logger.error("shard %s failed: %s", stem, reason)
        failures.update(failed_now)
        transient |= set(failed_now)
        for _ in group:
            done += 1
            progress_log.shard_ended(None)
            if hooks.on_shard_done:
                hooks.on_shard_done(None, done, len(plans))
        progress_updates.done(done)
    # Not where the client lost its scheduler ("connecting"): each call would wait for it up to Dask's connect
    # timeout (30 s by default), holding OUTPUT's claim; its workers, closing with it, report nothing more.
    connected = client is not None and client.status == "running"
    if connected:  # a shard whose worker died under it, run again whole, says so
        reruns = cluster.rerun_warnings(client, {f.wrapped_future.key: [p.stem for p in g]
                                                 for f, g in on_workers.items()})
        for result in results:
            if result["stem"] in reruns and not result.get("cached"):
                result["warnings"] = list(result.get("warnings") or []) + [reruns[result["stem"]]]
    if shared and connected:
        _worker_reports_sent(client)
    # Last, as the manifest is written (OUTPUT still claimed): a worker that outlived its lost scheduler may have
    # ended its shard since.
    results.extend(caching.written_after_all(config, hooks.claim_run, given_up, failures, transient))
    remove_failed_outputs_made_otherwise(config, failures)
    remove_views_without_tables(config, hooks.claim_run, planned=output_files, failed=failures)

    try:
        # Quoted: Prefect would otherwise walk every element of a task's parameters, twice, looking for futures
        # (none here): about 30 s of this process at the end of a run of 10,000 shards.
        manifest = report(config, quote(results), quote(failures), time.perf_counter() - started, timeline,
                          quote(previous), claim_run=hooks.claim_run)
    except ManifestNotWritten as exc:
        result_known()
        if not failures:
            raise  # the run's end, in one line (tasks.expected_ends), after its summary (exc.manifest)
        raise ShardsFailed(with_manifest_failure(failures, exc), results, transient, manifest=exc.manifest,
                           total=len(plans)) from exc
    # From here the run's result stands: a stop signal while its flow run ends and its cluster closes (seconds on a
    # loaded machine) interrupted a run whose every output was written (exit 143), and cut the close short.
    result_known()
    if failures:
        raise ShardsFailed(failures, results, transient, manifest=manifest, total=len(plans))
    fidelity.check(manifest)  # below the threshold the run ends Failed, its outputs and manifest kept
    hooks.manifest = manifest  # only a run without failed shards
    return manifest


# Built as flow(...)(function), like the tasks: Dask pickles the run context, which holds the flow, and a
# function shadowed by its Flow object could only be pickled by value, with every global it reads.
embed_flow = flow(name="embed-shards", log_prints=True)(embed_dataset)


# The longest the first embedding tasks, one per worker, are let to start alone before the others are submitted
# (seconds). Submitted together, the others' submits hold this process's GIL (Prefect serializes its whole context
# for each one) while Dask's scheduler, on a thread of this same process, hands the first task out, and the worker
# starts their task engines beside the first one's: the GPU waits for all of it. Let to start alone (until its body
# announces its start, wdsembed.cluster.TaskStarts), 16-shard runs on an H200 were 2-4% faster in paired runs
# (docs/benchmarks.md, twenty-third session); the others still start long before the first shard ends. The bound
# is for cold workers, whose first task waits seconds for its imports (as would the others, on the same imports).
FIRST_TASK_HEAD_START_S = 10.0


# The least time between two collections of the task runs that ended while the others are still being submitted
# (seconds). Collected after every submit, a first run of 1,000 tiny shards on 2 cores took about 20% longer than
# with no collecting until the last submit (its submits slowed by the collecting between them); once a second, about
# as long, its first shard shown within 20-30 s rather than after the 80-140 s of submits.
COLLECT_WHILE_SUBMITTING_EVERY_S = 1.0


# Threads of this process that run the task runs of groups whose every shard is finished (each reads its result
# from the task cache, or its outputs' footers): bounded, as Prefect's default pool starts a thread per task run.
IN_PROCESS_TASK_THREADS = 16


# The least time between two updates of the run's progress artifact (seconds), but for its last: each is an API call
# that the loop collecting the shards waits for, 0.1-0.2 s where the API server is busy recording the run's task runs.
# One per percent took 17 s of a 53 s re-run of 2,000 finished shards (1,000 cached task runs) on 2 cores, where the
# shards themselves came back in 10 s.
PROGRESS_UPDATE_EVERY_S = 5.0


class ProgressUpdates:
    """When the progress artifact moves: at most one update per percent and per PROGRESS_UPDATE_EVERY_S seconds,
    and always at the last shard, so that it ends at 100%."""

    def __init__(self, total: int, send: Callable[[float], None], clock: Callable[[], float] = time.monotonic,
                 every_s: float = PROGRESS_UPDATE_EVERY_S) -> None:
        self.total, self.send, self.clock, self.every_s = total, send, clock, every_s
        self.shown = 0.0
        self.last = clock()  # the artifact's creation, at 0%

    def done(self, done: int) -> None:
        percent = done * 100 / self.total
        if done == self.total or (percent - self.shown >= 1 and self.clock() - self.last >= self.every_s):
            self.send(percent)
            self.shown, self.last = percent, self.clock()


# The longest the run waits at its end for the workers of a shared cluster to send its task runs' events and logs.
WORKER_REPORTS_TIMEOUT_S = 30.0


def _worker_reports_sent(client) -> None:
    """Workers of a shared cluster (--dask-address, or the caller's current Dask client's) outlive the run, and send
    its task runs' events and logs (their ends) to its API in the background, after the tasks returned: where that
    API is this process's temporary server (no PREFECT_API_URL), which stops with the run, wait until they have
    (tasks.prefect_events). A server that outlives the run gets them anyway; there the wait would also count the
    events of other runs on the same workers and the same URL, and could hold this run's end for nothing."""
    url = PREFECT_API_URL.value()
    if client is None or not url or not apiserver.serves(url):
        return
    logger = get_run_logger()
    try:
        pending = client.run(prefect_events.done_with, url, WORKER_REPORTS_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the outputs are written; the record of them is what may be short
        logger.warning("could not ask the Dask workers whether they sent this run's task-run events and logs "
                       "(%s: %s)", type(exc).__name__, exc)
        return
    left = sum(pending.values())
    if left:
        logger.warning("%d task-run event(s) and log line(s) of this run were still unsent on the Dask workers "
                       "after %.0f s", left, WORKER_REPORTS_TIMEOUT_S)


def _task_starts(client) -> contextlib.AbstractContextManager:
    """The task starts that this run's Dask workers announce (nothing to hear without Dask)."""
    from prefect.runtime import flow_run

    return cluster.TaskStarts(client, str(flow_run.id)) if client is not None else contextlib.nullcontext()


def _dask_client():
    """The Dask client of the task runner this flow run submits through (None when it is not Dask's). Its first
    call starts the run's local cluster, with Ctrl-C held until the cluster and its client are the runner's: a
    KeyboardInterrupt (a notebook's Interrupt) in the middle of LocalCluster's start left its scheduler, ports and
    worker processes running in the caller's process until it exited, one more cluster per such interrupt. A second
    Ctrl-C stops at once (a cluster that does not start)."""
    from prefect.context import FlowRunContext

    runner = FlowRunContext.get().task_runner
    if not isinstance(runner, DaskTaskRunner):
        return None
    with ctrl_c_held(repeat_stops=True):  # then the flow engine closes the runner, and the cluster with it
        return runner.client


def _outcome(future, group, finished: set[str],
             config: EmbedConfig) -> tuple[list[dict], dict[str, str], set[str]]:
    """The finished shards' results (cached as this run saw it), the failed shards' reasons, and those of the failed
    shards whose failure may pass on a retry (faults.is_transient), of one task."""
    try:
        outcome = future.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - a worker lost for good (KilledWorker) raises here
        outcome = exc
    if isinstance(outcome, list):
        return [_mark_cached(r, future, finished) for r in outcome], {}, set()
    if isinstance(outcome, ShardsFailed):
        return ([_mark_cached(r, future, finished) for r in outcome.results], dict(outcome.failures),
                set(outcome.transient))
    dask_loss = cluster.describe_lost_task(outcome, _dask_client()) if isinstance(outcome, BaseException) else None
    reason = f"{type(outcome).__name__}: {outcome}" if isinstance(outcome, BaseException) else str(outcome)
    reason = dask_loss[0] if dask_loss else reason  # Dask's own loss (KilledWorker, a lost scheduler), in plain words
    # The task was lost (its worker died for good): the shards of its group that it had written whole before that
    # are finished all the same, as their outputs' footers say.
    written = caching.written_results(config, group)
    done = {r["stem"] for r in written}
    lost = {p.stem: reason for p in group if p.stem not in done}
    may_pass = dask_loss[1] if dask_loss else isinstance(outcome, BaseException) and faults.is_transient(outcome)
    kept = [{**r, "cached": True} if r["stem"] in finished else _made_by_an_earlier_attempt(r) for r in written]
    return kept, lost, set(lost) if may_pass else set()


def _mark_cached(result: dict, future, finished: set[str]) -> dict:
    """Cached: the task run was a cache hit (its stored result is the one from when the shard was computed), or
    the task found the output done, and it was done before this run. An output found done that this run made (an
    attempt lost with its worker, or a group's retry) counts as computed."""
    cached = future.state.name == "Cached" or (result.get("cached") and result["stem"] in finished)
    if result.get("cached") and not cached:
        return _made_by_an_earlier_attempt(result)
    return {**result, "cached": bool(cached)}  # the report carries a cached shard's figures from when it was made


_made_by_an_earlier_attempt = caching.made_by_an_unseen_attempt


def _task_lost(future) -> bool:
    """Whether the task run never ended by itself: Dask gave up on it (its worker process died: KilledWorker), where
    the task engine would have returned a state."""
    wrapped = getattr(future, "wrapped_future", None)
    return getattr(wrapped, "status", None) == "error"  # a Dask future's; a thread's (in this process) has none


def _given_up(future) -> bool:
    """Whether Dask gave up on the task, as opposed to its run ending: its workers died (KilledWorker), or it was
    cancelled (its scheduler lost, the workers all paused)."""
    return getattr(getattr(future, "wrapped_future", None), "status", None) in ("error", "cancelled")


def _release(future) -> None:
    """Let Dask forget a task's result (a thread's future, of a run with nothing to compute, holds nothing there)."""
    release = getattr(getattr(future, "wrapped_future", None), "release", None)
    if release is not None:
        release()


def _record_lost_run(future, group, failed: dict[str, str], task) -> None:
    """A task run whose worker process died (Dask gave up on it: KilledWorker), or that Dask cancelled as the run
    lost its scheduler, stays Running in the API, as nothing was left to report its end, or is missing from it
    (never begun): mark it Crashed, naming the shards it lost and why, so the UI tells the truth. Its
    name, which the task engine gives it on the worker, may have died there too (left as Prefect's embed-shards-xyz):
    give it its shards' name. A worker killed as the task began may have sent nothing at all (the task engine's
    states reach the API as events, sent from a thread of the worker process, which died before it sent them): the
    task run is then made here, under the id its future has, so the UI shows the lost shards all the same (events
    sent after all, older than this state, do not overwrite it)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    reason = "; ".join(sorted(set(failed.values())))  # Dask's words (KilledWorker) name no shard
    crashed = Crashed(message=f"shard(s) {name_shards(sorted(failed))} lost: {reason}"[:2000])
    try:
        with get_client(sync_client=True) as client:
            try:
                task_run = client.read_task_run(future.task_run_id)
            except ObjectNotFound:
                client.create_task_run(task, FlowRunContext.get().flow_run.id, dynamic_key=str(future.task_run_id),
                                       id=future.task_run_id, name=run_name(group), state=crashed)
                return
            if task_run.name != run_name(group):
                client.set_task_run_name(future.task_run_id, run_name(group))
            if task_run.state is None or not task_run.state.is_final():
                client.set_task_run_state(future.task_run_id, crashed, force=True)
    except Exception as exc:  # noqa: BLE001 - the report matters more than this mark
        get_run_logger().warning("could not mark task run %s crashed: %s", future.task_run_id, exc)


def run(config: EmbedConfig, on_shard_done=None, *, all_finished: Optional[bool] = None) -> Manifest:
    """Run the flow with the Dask task runner this config asks for (local GPUs, CPU workers, or a scheduler); the
    run's manifest, a dict (report.Manifest: its repr is one line, not every shard's entry).
    `all_finished`: plan.check_config's answer, whether every output is already finished; asked here when None."""
    cluster.refuse_in_a_worker_bootstrap("flows.embed.run()")  # a script without the __main__ guard: else it hangs
    # A Dask client current in this process (a notebook's) runs the shards, where no dask_address is given; refused
    # here, before any work, where the config sizes a local cluster of its own.
    current = cluster.current_client_for(config)
    with run_setup():  # for every caller (the command routes the decoder's lines itself too)
        if all_finished is None:  # called without the checks (plan.check_config): the stores' own, before the claim
            forget_checked_input()  # an earlier check_config's listing of INPUT is not this run's to plan from
            check_storage(config)  # a missing bucket or denied access, said naming the URL
            all_finished = nothing_to_compute(config)
        # One run writes to an output at a time (wdsembed.outputclaim): refused here, before a cluster starts, where
        # another run holds it; held until this run ends, however it ends. A run with nothing to compute claims it
        # too: it writes the manifest, and a missing kNN view.
        with claim_output(config) as claim:
            return _run_claimed(config, on_shard_done, all_finished, claim.run, current)


def _run_claimed(config: EmbedConfig, on_shard_done, all_finished: bool, claim_run: str, current) -> Manifest:
    if all_finished:
        # Every shard's output is finished: the flow run still records each shard (its task run Cached, from the
        # task cache, in threads of this process), but no Dask cluster starts and no model loads.
        runner = ThreadPoolTaskRunner()
        # Such a flow run lasts about a second and needs no heartbeats (crash detection), whose thread the flow
        # waits for as it ends: up to a second, as it sleeps in one-second steps.
        around = temporary_settings(updates={"flows.heartbeat_frequency": None})
    else:
        runner = DaskTaskRunner(**cluster.task_runner_kwargs(config, current))
        around = _asked_scheduler_over_current_client(config)
    hooks = _RunInProcess(on_shard_done, claim_run, on_current_client=current is not None)
    token = _this_run.set(hooks)
    try:
        with _api_for_workers(), around:
            flow_with_runner = embed_flow.with_options(task_runner=runner)  # while a temporary server boots
            _check_api_access()
            manifest = flow_with_runner(config)
            return manifest.unquote() if isinstance(manifest, quote) else manifest  # quoted by embed_dataset
    except (TimeoutError, asyncio.CancelledError) as exc:
        # Every shard finished and the manifest is written; only the local Dask cluster's shutdown ran out of time
        # (seen on a loaded 2-core machine). The run's work is whole: report it, not a failed run.
        if hooks.manifest is None:
            raise
        logging.getLogger("wdsembed").warning("the run completed, but its Dask cluster did not shut down in time "
                                              "(%r); outputs and manifest are complete", exc)
        return hooks.manifest
    except ShardsFailed:
        raise
    except Exception as exc:
        # The temporary server's database cannot be written (its disk full): what failed here is a request to it,
        # an HTTP 500 that names neither. The server said why; the outputs written so far are whole.
        trouble = apiserver.trouble()
        if trouble is None:
            raise
        quiet_failed_log_sends()
        error = PrefectServerUnusable(trouble)
        error.manifest = hooks.manifest
        raise error from exc
    finally:
        _this_run.reset(token)


class PrefectServerUnusable(RuntimeError):
    """The run's Prefect server can no longer record it (its database cannot be written); the message says what to
    change. `manifest`: the run's, where it was written before."""

    manifest: Optional[dict] = None


class APIAccessError(RuntimeError):
    """The Prefect API cannot be used by this client; the message says what to set."""


def _check_api_access() -> None:
    """Ask the Prefect API once before the flow starts, so that a server that refuses this client (basic auth,
    PREFECT_SERVER_API_AUTH_STRING) or cannot be reached is one line naming the setting, not a traceback wall from
    deep in the flow engine. The credential itself reaches local Dask workers with the run's settings (inherited
    environment and the settings context Prefect sends with each task)."""
    import httpx
    from prefect.client.orchestration import get_client

    url = PREFECT_API_URL.value()
    apiserver.wait(url)  # where it is this run's temporary server, until it answers
    try:
        with get_client(sync_client=True) as client:
            client.hello()  # behind the server's auth check, unlike /health
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if code in (401, 403):
            raise APIAccessError(
                f"the Prefect API at {url} refused this client ({code} {exc.response.reason_phrase}): set "
                "PREFECT_API_AUTH_STRING to the user:password of the server's PREFECT_SERVER_API_AUTH_STRING"
            ) from None
        raise APIAccessError(f"the Prefect API at {url} answered {code} {exc.response.reason_phrase}") from None
    except httpx.TransportError as exc:
        raise APIAccessError(f"cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc}): check "
                             "PREFECT_API_URL") from None


@contextlib.contextmanager
def _asked_scheduler_over_current_client(config: EmbedConfig):
    """prefect-dask's task runner runs on the Dask client current in this process wherever there is one, whatever
    scheduler it is given (DaskTaskRunner.client): a run given dask_address ran on a notebook's Client(...) instead.
    With dask_address, a client of that scheduler is made current for the run, which the runner then finds; the
    caller's own is current again after it."""
    current = cluster.current_client()
    if not config.dask_address or current is None or cluster.same_scheduler(current.scheduler.address,
                                                                            config.dask_address):
        yield
        return
    from distributed import Client

    with Client(config.dask_address, set_as_default=False) as asked, asked.as_current():
        yield


def _api_for_workers():
    """Without PREFECT_API_URL, this process needs a temporary API server (the one the command started in the
    background, or one started now: flows.apiserver), and each Dask worker process, not knowing it, would start
    one of its own on the same SQLite file (slow, "database is locked"). Give its URL to this run's client and to
    the workers with the run's settings (it may still be booting: apiserver.wait): each task run enters them on its
    worker and sends its events and logs to that URL, also on the workers of a shared cluster, which outlive the
    run and serve others, each with a server of its own (tasks.prefect_events). Workers on other nodes cannot reach
    it: with --dask-address, set PREFECT_API_URL to a server every node reaches.

    Flow-run heartbeats stay off there: they let a server that outlives this process mark the run Crashed should
    the process die, and this one stops with it, so none could be missed; the flow run's end would wait for their
    thread, which sleeps in one-second steps (up to a second per run)."""
    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_API_URL: apiserver.api_url(), "flows.heartbeat_frequency": None})
