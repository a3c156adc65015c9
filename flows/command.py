"""The installed `wdsembed` command: the command line of wdsembed.cli, running the Prefect flow.

It lives here, in the Prefect layer, because the core package never imports the flow. The flow (and Prefect) is
imported only once a run starts (flows.launch), so `--help` and a refused mistake answer without Prefect's import;
meanwhile the temporary API server's own process loads (flows.apiserver), and serves only once every check has
passed.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from flows.launch import launch


def run_flow(config, **options) -> dict:
    """flows.embed.run, imported when the first run starts."""
    from flows.embed import run

    return run(config, **options)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return launch(run_flow, argv)


if __name__ == "__main__":
    sys.exit(main())
