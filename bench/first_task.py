"""How long a flow run's first task takes to start on a Dask worker, with one task submitted, with several at once,
and with the first one let to start alone before the rest are submitted (the GPU worker's three task slots all
start a Prefect task engine at once, and the engines share the worker's GIL).

    python bench/first_task.py [--tasks 16] [--seconds 0.3] [--repeats 3]     # CPU, a local Dask worker
    python bench/first_task.py --each-task-validates-settings                 # without tasks.prefect_settings

Each line: when the first task's body started, the third's and the last's, and the whole flow run, in seconds from
the flow body's start (the run's total from the flow call).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--seconds", type=float, default=0.3, help="each task's body (a shard's work)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--each-task-validates-settings", action="store_true",
                   help="leave out tasks.prefect_settings: every task run validates the flow's settings anew")
    args = p.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # PrefectFuture.state, read on purpose
    from flows import apiserver, prefect_env

    prefect_env.set_defaults()
    if not os.environ.get("PREFECT_API_URL"):  # one API server for this process and the worker, as the flow's run()
        os.environ["PREFECT_API_URL"] = apiserver.api_url()  # the worker inherits it
        apiserver.wait(os.environ["PREFECT_API_URL"])
    from distributed import Client, LocalCluster
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def body(seconds: float) -> float:
        started = time.time()
        time.sleep(seconds)
        return started

    def make(n: int, first_alone: bool):
        @flow
        def run() -> tuple[float, list[float]]:
            t0 = time.time()
            futures = [body.submit(args.seconds) for _ in range(1 if first_alone else n)]
            if first_alone:
                while futures[0].state.is_pending():  # one API read per poll, until the engine has started it
                    time.sleep(0.01)
                futures += [body.submit(args.seconds) for _ in range(n - 1)]
            return t0, sorted(f.result() for f in futures)
        return run

    from tasks.prefect_settings import share_hydrated_settings
    from tasks.prefect_tls import share_api_tls_contexts

    def as_the_flows_processes() -> None:
        share_api_tls_contexts()
        if not args.each_task_validates_settings:
            share_hydrated_settings()

    with LocalCluster(n_workers=1, threads_per_worker=3, processes=True) as cluster:
        # As in the flow, whose workers install these by importing tasks.embed (these tasks live in __main__).
        as_the_flows_processes()
        with Client(cluster) as client:
            client.run(as_the_flows_processes)
        make(1, False).with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()  # warm-up
        for _ in range(args.repeats):
            for n, first_alone in ((1, False), (3, False), (args.tasks, False), (args.tasks, True)):
                runner = DaskTaskRunner(address=cluster.scheduler_address)
                called = time.time()
                t0, starts = make(n, first_alone).with_options(task_runner=runner)()
                total = time.time() - called
                label = f"{n} task(s){', the first alone' if first_alone else ''}"
                print(f"{label:28s} first {starts[0] - t0:.3f} s   third {starts[min(2, n - 1)] - t0:.3f} s   "
                      f"last {starts[-1] - t0:.3f} s   run {total:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
