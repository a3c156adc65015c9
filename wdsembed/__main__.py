"""`python -m wdsembed ARGS`: the installed `wdsembed` command, the same function with the same exit status.

The command lives in the Prefect layer (flows.command), which this package never imports: the function is taken
from the package's own declaration of the command (pyproject.toml [project.scripts], as installed), as the
`wdsembed` script itself takes it. Only run as `python -m`; importing the package never loads this module.
"""
from __future__ import annotations

import sys
from importlib import metadata

COMMAND = "wdsembed"


def main() -> int:
    try:
        scripts = metadata.distribution("wdsembed").entry_points.select(group="console_scripts", name=COMMAND)
    except metadata.PackageNotFoundError:
        scripts = ()
    script = next(iter(scripts), None)
    if script is not None:
        return script.load()()
    print(f"error: `python -m wdsembed` runs the installed `{COMMAND}` command, which is not installed: install the "
          "package (pip install -e .)", file=sys.stderr)
    return 2


# Also imported (not run) as __mp_main__ by each spawned worker process of a local Dask cluster.
if __name__ == "__main__":
    sys.exit(main())
