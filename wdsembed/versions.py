"""Versions that decide an output's bytes: this package's code and the libraries doing the maths."""
from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

_PACKAGES = ("wdsembed", "timm", "torch", "nvidia-dali-cuda120", "pyarrow", "prefect", "prefect-dask", "dask-cuda")


# Modules that never touch an output's bytes (reporting, the CLI, cluster choice, test data): editing them does
# not invalidate finished shards. Every other module of the package, present or future, is part of the key.
_NOT_IN_OUTPUT = frozenset({"__init__.py", "api.py", "caching.py", "cli.py", "cluster.py", "config.py", "faults.py",
                            "report.py", "synthetic.py", "validate.py", "versions.py"})


@functools.cache
def code_version() -> str:
    """A hash of this package's source that decides outputs: an edit to the embedding code invalidates cached
    shards."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in _NOT_IN_OUTPUT:
            continue
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
