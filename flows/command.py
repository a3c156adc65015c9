"""The installed `wdsembed` command: the command line of wdsembed.cli, running the Prefect flow.

It lives here, in the Prefect layer, because the core package never imports the flow. The flow (and Prefect) is
imported only once a run starts, so `--help` and a refused mistake answer without Prefect's import; meanwhile the
temporary API server's own process loads (flows.apiserver), and serves only once every check has passed.
"""
from __future__ import annotations

import atexit
import gc
import sys
from typing import Optional, Sequence

from flows import prefect_env


def run_flow(config, on_shard_done=None) -> dict:
    """flows.embed.run, imported when the first run starts."""
    from flows.embed import run

    return run(config, on_shard_done=on_shard_done)


def main(argv: Optional[Sequence[str]] = None) -> int:
    prefect_env.set_defaults()  # before Prefect's first import (at the first run): it reads its settings then
    from flows import apiserver  # imports nothing of Prefect

    if argv is None:  # the command's own process
        # Registered first, so it runs last: Python's garbage collection of every module's objects as the process
        # ends takes about 0.7 s with Prefect and Dask loaded; everything is written and closed by then.
        atexit.register(gc.freeze)
    # The temporary API server (none where PREFECT_API_URL names one) loads while the checks run, and serves once
    # they pass; a refused run ends it unstarted.
    apiserver.prepare()
    from wdsembed import cli  # after prepare(): the server's process starts loading half a second sooner

    return cli.main(run_flow, argv, on_checked=apiserver.start)


if __name__ == "__main__":
    sys.exit(main())
