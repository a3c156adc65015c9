"""The installed `wdsembed` command: the command line of wdsembed.cli, running the Prefect flow.

It lives here, in the Prefect layer, because the core package never imports the flow. The flow (and Prefect) is
imported only once a run starts, so `--help` and a refused mistake answer without Prefect's import.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from flows import prefect_env
from wdsembed import cli


def run_flow(config, on_shard_done=None) -> dict:
    """flows.embed.run, imported when the first run starts."""
    from flows.embed import run

    return run(config, on_shard_done=on_shard_done)


def main(argv: Optional[Sequence[str]] = None) -> int:
    prefect_env.set_defaults()  # before Prefect's first import (at the first run): it reads its settings then
    return cli.main(run_flow, argv)


if __name__ == "__main__":
    sys.exit(main())
