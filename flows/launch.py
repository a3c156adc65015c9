"""How a run starts from the command line, the same for the `wdsembed` command (flows/command.py) and for
`python flows/embed.py`: the Prefect defaults set before Prefect's first import, the command line's checks while
the temporary API server's process loads (flows.apiserver), and the flow, with Prefect, imported only once a run
starts. So `--help` and a refused mistake answer without Prefect's import (0.7 s instead of 4 s on 2 cores).

This module imports nothing of Prefect, and not the flow: each entry point passes its own way to run it.
"""
from __future__ import annotations

import atexit
import gc
import sys
from typing import Callable, Optional, Sequence

from flows import prefect_env

# The fewest open files a run is let start with. The smallest run (one tiny shard, one local worker) finished with
# a hard limit of 48 and failed at 44 ('Too many open files'; at 40 it hung): the flow's process held about 45 at its
# peak, each further local worker about 15 more. Twice the measured 48, so that a run not refused does not fail on it.
MIN_OPEN_FILES = 96


def launch(run_flow: Callable[..., dict], argv: Optional[Sequence[str]] = None) -> int:
    """wdsembed.cli.main with `run_flow(config, on_shard_done=..., all_finished=...)` running the flow; argv None:
    this process's own command line (and this process ends after it)."""
    prefect_env.set_defaults()  # before Prefect's first import (at the first run): it reads its settings then
    from flows import apiserver  # imports nothing of Prefect

    if argv is None:  # the command's own process
        _open_files_up_to_the_hard_limit()
        # Registered first, so it runs last: Python's garbage collection of every module's objects as the process
        # ends takes about 0.7 s with Prefect and Dask loaded; everything is written and closed by then.
        atexit.register(gc.freeze)
    # The temporary API server (none where PREFECT_API_URL names one) loads while the checks run, and serves once
    # they pass; a refused run ends it unstarted.
    apiserver.prepare()

    def on_checked() -> None:
        _refuse_too_few_open_files()
        apiserver.start()

    try:
        from wdsembed import cli  # after prepare(): the server's process starts loading half a second sooner

        return cli.main(run_flow, argv, on_checked=on_checked)  # a run's own failures are said there
    except (ImportError, MemoryError) as exc:
        # The checks load PyTorch and timm here: under `ulimit -v` too small for them, a traceback ending
        # 'libtorch_cuda.so: failed to map segment from shared object' (or a bare MemoryError) named no limit.
        from wdsembed.faults import address_space_too_small

        said = address_space_too_small(exc, memory_error_too=True)
        if said is None:
            raise
        print(f"error: {said}", file=sys.stderr)
        return 2


def _open_files_up_to_the_hard_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit; the temporary server and the Dask workers
    it starts inherit it. Under a low soft limit (`ulimit -Sn 40`; macOS's default is 256) the flow's process, which
    holds Prefect's client and event loops and the local Dask scheduler and nanny, ran out of descriptors, and the
    run hung with Prefect's threads unable to make event loops. The hard limit is the user's ceiling; `dask scheduler`
    raises its own soft limit the same way."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # macOS refuses an unlimited soft limit; Linux's own ceiling (nr_open) is about this
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        except (OSError, ValueError):  # refused (macOS's kern.maxfilesperproc): the limit stays as it was
            pass


def _refuse_too_few_open_files() -> None:
    """ValueError where this process may open fewer files than a run needs (after the soft limit was raised to the
    hard one): the run failed with 'Nanny failed to start' and a traceback, or hung, naming no limit."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= MIN_OPEN_FILES:
        return
    which = "its hard limit, ulimit -Hn" if soft == hard else "ulimit -n"
    raise ValueError(f"this process may open at most {soft} files ({which}), too few for a run, which needs at "
                     f"least {MIN_OPEN_FILES}: raise it (ulimit -n 4096; where the shell's hard limit refuses that, "
                     "an administrator raises it, in /etc/security/limits.conf say) and run the command again")
