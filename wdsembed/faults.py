"""Failure classes of a shard, and opt-in fault injection for tests and chaos drills.

Injection is off unless WDSEMBED_FAULTS names a JSON file: {"<shard stem>": {"fail_attempts": N,
"error": "io" | "oom" | "fatal" | "kill", "where": "start" | "batch" | "table" | "commit"}}: "start" (the default)
fails as the shard's task starts, "batch" after a batch went through the model (mid-shard), "table" once every image
went through it and before its output table is built (its fidelity reference running), "commit" once the shard's kNN
view is written and before its table is (a run dying between the two files). Attempts are counted in a file beside it
(<spec>.<stem>.attempts), so they survive retries and worker restarts; a spec with "fail_attempts": 0 only counts.
"hold_s": S makes each counted attempt wait S seconds first (a shard held mid-embedding, for a test to interrupt);
"hold_until": PATH makes it wait until that file exists (at most hold_s, 600 s unless given: a test's gate);
at "batch", a hold stands for the many batches of a long shard: it ends early once the shard's task is abandoned
(batch_hook's `until`), as the check after each of those batches would end it.
{"worker_close": {"timeout_s": S}} gives a local cluster's nanny S seconds, not distributed's 5, to see its worker
process end as the cluster closes (worker_close_timeout): with 0, the process is killed and not yet reaped when that
time is up, as on a loaded machine.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from wdsembed import shardindex, storage, tarstream
from wdsembed.outputclaim import OutputClaimLostError
from wdsembed.s3fetch import FetchRefusedError


class TransientError(IOError):
    """Worth retrying: the same call may pass later (I/O hiccups, a store throttling, a GPU out of memory)."""


def is_transient(exc: BaseException) -> bool:
    """Retry only what can pass: I/O and network errors and CUDA out-of-memory, never a malformed shard, a
    missing file, a missing model, or an output whose claim this run has lost (it never comes back to it)."""
    if isinstance(exc, (tarstream.ShardReadError, shardindex.StaleIndexError, FileNotFoundError, PermissionError,
                        FetchRefusedError, OutputClaimLostError)):
        return False
    if is_disk_full(exc):
        return False  # a full or read-only disk does not clear itself between retries; the re-run finishes the job
    if is_out_of_memory(exc):
        return True
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError, OSError)) or is_transport_error(exc)


class PartlyTransient(Exception):
    """A failure of several parts (shard.ShardsFailed: a group's shards), `transient` naming those whose failure
    may pass on a retry (is_transient)."""

    transient: list


def worth_retrying(exc: object) -> bool:
    """Whether a failed task is tried again (the Prefect tasks' retry condition; `exc` is what its failed state
    holds): a failure of several parts where any may pass (the parts that finished are then found done, not
    redone), or one error that may pass. A missing bucket, denied access, a bad parameter or a malformed shard
    fails at once."""
    if isinstance(exc, PartlyTransient):
        return bool(exc.transient)
    return isinstance(exc, BaseException) and is_transient(exc)


def reason(exc: BaseException) -> str:
    """A shard's failure reason: `Type: message`, with what the message leaves unsaid where it names a cause the
    user cannot see from it."""
    return f"{type(exc).__name__}: {address_space_too_small(exc) or exc}"


def address_space_too_small(exc: BaseException, memory_error_too: bool = False) -> Optional[str]:
    """What `exc` leaves unsaid where it is a shared library that could not be mapped (and, with
    `memory_error_too`, any MemoryError: loading the libraries near the limit) under an address-space limit; None
    otherwise. The loader's mmap is refused (ENOMEM): the libraries PyTorch's and DALI's wheels carry map several GB.
    Said without the library's name, which varies with what was loaded before."""
    if "failed to map segment from shared object" in str(exc):
        what = "cannot map a shared library into memory (failed to map segment from shared object)"
    elif memory_error_too and isinstance(exc, MemoryError):
        what = "ran out of memory (MemoryError)"
    else:
        return None
    limit = _address_space_limit()
    if limit is None:
        return None
    return (f"{what}: this process's address-space limit (ulimit -v, RLIMIT_AS) of {limit >> 20} MiB is too small "
            "for the libraries PyTorch and DALI load; raise it or remove it (ulimit -v unlimited)")


def _address_space_limit() -> "int | None":
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


is_transport_error = storage.is_transport_error  # defined below faults: storage names such errors (naming_url)


def is_disk_full(exc: BaseException) -> bool:
    """No space left, quota exceeded, file too large, read-only file system."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def _spec(stem: str) -> Optional[dict]:
    spec_path = os.environ.get("WDSEMBED_FAULTS")
    if not spec_path or not os.path.exists(spec_path):
        return None
    with open(spec_path) as f:
        return json.load(f).get(stem)


def maybe_inject(stem: str, where: str = "start", until: Callable[[], bool] = lambda: False) -> None:
    """Raise (or die) as WDSEMBED_FAULTS says for this shard's attempt; a no-op without it. A hold ends early once
    `until()`."""
    spec = _spec(stem)
    if not spec or spec.get("where", "start") != where:
        return
    spec_path = os.environ["WDSEMBED_FAULTS"]
    counter = f"{spec_path}.{stem}.attempts"
    attempts = int(open(counter).read()) if os.path.exists(counter) else 0
    with open(counter, "w") as f:
        f.write(str(attempts + 1))
    gate = spec.get("hold_until")
    deadline = time.monotonic() + float(spec.get("hold_s", 600 if gate else 0))
    while time.monotonic() < deadline and not until() and not (gate and os.path.exists(gate)):
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    if attempts >= int(spec.get("fail_attempts", 1)):
        return
    error = spec.get("error", "io")
    if error == "kill":
        os._exit(137)  # a worker process dying mid-shard, as the OOM killer would do it
    if error == "oom":
        raise MemoryError(f"injected out of memory on shard {stem} (attempt {attempts + 1})")
    if error == "fatal":
        raise ValueError(f"injected deterministic failure on shard {stem}")
    raise TransientError(f"injected I/O error on shard {stem} (attempt {attempts + 1})")


def worker_close_timeout(timeout: float) -> float:
    """The seconds a closing nanny gives its worker process to end: `timeout`, unless WDSEMBED_FAULTS says."""
    spec = _spec("worker_close")
    return float(spec.get("timeout_s", timeout)) if spec else timeout


def batch_hook(stem: str, on_batch: Callable[[int], None],
               until: Callable[[], bool] = lambda: False) -> Callable[[int], None]:
    """`on_batch` itself, unless WDSEMBED_FAULTS asks for a failure mid-shard in this shard: decided once per
    shard, so the per-batch path carries nothing of fault injection in a real run. A hold there ends early once
    `until()` (the shard's task abandoned)."""
    spec = _spec(stem)
    if not spec or spec.get("where") != "batch":
        return on_batch

    def inject_then(n: int) -> None:
        maybe_inject(stem, where="batch", until=until)
        on_batch(n)

    return inject_then
