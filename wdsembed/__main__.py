"""`python -m wdsembed ARGS`: the installed `wdsembed` command, the same function with the same exit status.

The command lives in the Prefect layer (flows.command), which this package never imports: the function is taken
from the package's own declaration of the command (pyproject.toml [project.scripts], as installed), as the
`wdsembed` script itself takes it. Only run as `python -m`; importing the package never loads this module.
"""
from __future__ import annotations

import os
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


def _forget_working_folder() -> None:
    """Take off sys.path the working folder that `python -m` put first, as the installed script never has it: the
    command's top-level packages `flows` and `tasks` are common names of a user's own (an invoke tasks.py, a Prefect
    project's flows/), which would be imported instead. Kept where this package itself came from there (a checkout)."""
    try:
        cwd = os.getcwd()
    except OSError:  # the folder was removed since: nothing of it to import, the package included
        cwd = None
    if sys.path and sys.path[0] in ("", cwd):
        here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        if cwd is None or os.path.realpath(sys.path[0]) != here:
            del sys.path[0]


# Also imported (not run) as __mp_main__ by each spawned worker process of a local Dask cluster, whose sys.path is
# this process's, as it was when the cluster started.
if __name__ == "__main__":
    _forget_working_folder()
    sys.exit(main())
