"""One run writes to an OUTPUT at a time: the run's claim on it, `OUTPUT/_claim.json`.

    claim = outputclaim.take(config)     # refused at once (OutputClaimedError) where another live run holds OUTPUT
    try:
        ...                              # plan, embed, write, report
    finally:
        claim.release()

or `with outputclaim.held(config): ...`. The process that orchestrates a run takes it (flows.embed.run for the
command, `python flows/embed.py` and the deployed flow; the embed-shards flow itself where it is started otherwise;
api.run_shards for the Python API and the NeMo drop-in),
after the checks that need no work and before any shard's, and releases it as the run ends however it ends
(success, failure, Ctrl-C). Workers only read it (check_still_held, below), and (in Dask tasks) put a marker
beside it while they put a shard in place (ShardCommit). Two runs on one OUTPUT with different models would
otherwise both succeed and leave two embedding spaces side by side, a manifest naming one of them, and (between a
shard's two files) one run's table beside the other's kNN view.

The claim is a small JSON object: the run's id, host, pid, start time, model and settings, what started it where its
taker says (`by`: the Prefect flow run, for a run started from the UI or a schedule), and a heartbeat time that
a daemon thread refreshes every HEARTBEAT_S seconds. Its name starts with `_`, so dataset readers of OUTPUT (pyarrow,
pandas, Spark) skip it, as do the checks that list OUTPUT (plan.check_outputs_beside looks at `*.parquet` only).

Taking it is one atomic step on the store, never a look followed by a write:

* local disk (and NFS): the JSON written to a temp file, then hard-linked to `_claim.json` (os.link fails where the
  name exists: atomic, also on NFS, where the server does it, and a reader never sees a half-written claim); where
  a filesystem has no hard links, os.open(O_CREAT | O_EXCL) instead. (Closed shards, below, ask more of NFS.)
* S3: a PUT with `If-None-Match: *` (conditional writes, on AWS since August 2024): S3 answers 412 to every PUT
  but one. A stale claim is replaced with `If-Match: <its ETag>`, the heartbeat likewise with the claim's own ETag,
  so that of two runs taking over one stale claim one wins, and a run whose claim was taken over learns it. A PUT
  the store served whose answer was lost (a dropped connection) is retried by the client and refused (412) by
  itself: a claim found then that holds what this run wrote is its own (_ObjectStore._landed), under the ETag read.
  An S3-compatible store that ignores these headers makes the claim a best effort only (a look, then a write).
* other fsspec stores: `pipe_file(mode="create")`, which is atomic where the store's fsspec implementation makes it
  so (gcsfs, adlfs) and a look-then-write otherwise; a stale claim is removed, then created again.

A claim found in place is the other run's, and the new run is refused, naming OUTPUT, that run (id, host, pid, its
flow run, since when, model) and what to do. Unless it is stale: its heartbeat is older than STALE_S (its process
was killed, or its host lost), or it was taken on this host (same host name and pid namespace: containers with host networking
share a name, not their pids) by a process that is gone (pid not running, a zombie, or another process since). A stale claim is taken over with a warning line: a killed run never blocks the next one for long.
Heartbeats are compared across hosts by their clocks: hosts sharing an OUTPUT must agree on the time within a
minute or so (NTP).

With the claim held, `remove_stale_temp_files` removes what dead runs left in OUTPUT: the temp files of atomic
writes (`.<name>.tmp-<32 hex>`, storage.write_atomic) of a process killed between a file's write and its rename.
On an object store take() removes the markers of workers killed while putting a shard in place (closed shards,
below); and on S3 `abort_stale_uploads` aborts the incomplete multipart uploads of a process killed while uploading
an output (over 100 MB), of output names only (output.is_output_name) and begun before the claim: stored and billed,
though no listing shows them. A store that refuses to list or abort them leaves them, with a warning line.

The workers of a cluster the run did not start (`--dask-address`) outlive the process that claimed OUTPUT: should it
die, or lose its claim (its heartbeats stopped), its tasks still running there would write their shards after the
claim was released or taken over by the next run, possibly one with another model. So each task gets its run's id
(shard.process_shard's `claim_run`), and just before each change it makes to OUTPUT `check_still_held` reads the claim
(a file read; one GET on S3): before a shard's first file (shard.write_output: its kNN view's rename or PUT; without
views, the removal of an earlier one), before a finished shard's missing or stale view is rebuilt from its table
(shard.finished_output), and before a view that another writer replaced is written again after the table
(shard.write_output). Where the claim is gone or another run's, nothing of it is put in place, the temp files are
removed, and the shard fails with OutputClaimLostError naming the shard, OUTPUT, the run that holds it now and what
was not done, never retried (faults.is_transient). Shards written without a claim (unit-level calls of the shard
functions) pass no run id and check nothing; nor does the orchestrating process's own planning, which repairs views
after taking the claim (plan.plan_run). What remains is the time between that read and the shard's last commit: the view's
rename (on S3 its upload), the rest of the table's write, then its rename or upload. A takeover within those seconds
(the claim is taken over only once its run is gone or 3 minutes silent) still lands that one shard's files; every
shard the old run's tasks commit after it is refused. A shard the run has given up on (its Dask scheduler lost) is
closed in the claim before the run counts its outputs, and refused from then on (close_shards, ShardCommit: closed
shards, below). That relies on the run and its workers each seeing the other's writes at once: S3 does, and so does
one host's local disk; on NFS shared by several hosts, each client caches what it has looked up and listed (the
attribute cache: seconds to a minute by default), so a worker on another host may read the claim from before the
close, or the run list OUTPUT without a worker's fresh marker, for that long, and a shard landing within it is
counted failed beside its whole output (the next run finds it finished). Mounts with `actimeo=0` (or `noac`) and
`lookupcache=none` take that time away, at the cost of a request to the server for every look. The orchestrating
process reads the claim in the same way
before it writes the run's manifest (report.write_manifest): a run whose claim was taken over while it ran (its
heartbeats stopped: a suspended host, a cut network) leaves the manifest to the run that took it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from wdsembed import storage
from wdsembed.config import EmbedConfig, credentials_hint
from wdsembed.output import is_output_name
from wdsembed.threads import enclosing_dask_worker, start_in_context

log = logging.getLogger("wdsembed")

CLAIM_NAME = "_claim.json"
HEARTBEAT_S = 30.0  # how often the holder refreshes its heartbeat
STALE_S = 180.0  # a claim whose heartbeat is older than this is taken over (its run is gone)
# What storage.write_atomic names its temp files: `.<name>.tmp-<uuid4 hex>`, beside the target.
TEMP_FILE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
# Folders of OUTPUT that hold none of our atomic writes and may hold many files: not walked for temp files.
_NOT_WALKED = ("_prefect_results",)
# How long a run that closes shards waits for a worker of its own to finish putting one of them in place (an upload
# under way), at most: longer only where that worker hangs or died mid-write on another host (close_shards).
COMMIT_WAIT_S = 120.0


class OutputClaimedError(ValueError):
    """Another run is writing to this OUTPUT; the message names it and says what to do."""


class OutputClaimLostError(RuntimeError):
    """A shard's outputs were not put in place: its run no longer holds OUTPUT's claim (released, or taken over by
    another run). Never retried (faults.is_transient): only a run holding the claim may write there."""


class ShardClosedError(OutputClaimLostError):
    """A shard's outputs were not put in place: its run, still holding OUTPUT, had given up on it and counted its
    outputs for its manifest (close_shards). Never retried, as its parent."""


# --------------------------------------------------------------------------------------------------- the record


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(text: Any) -> Optional[float]:
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat after the command name (state first, start time at [19]); None where there
    is none (not Linux, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def _process_start(pid: int) -> Optional[str]:
    """When process `pid` started, in clock ticks since boot, to tell it from a later process that got its pid."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _pid_namespace() -> Optional[str]:
    """This process's pid namespace (`pid:[4026531836]`): containers that share a host name (host networking) each
    have their own, and a pid means something only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_host(record: dict) -> bool:
    """Whether the claim's pid can be looked up here: same host name, same pid namespace."""
    return record.get("host") == socket.gethostname() and record.get("pid_namespace") == _pid_namespace()


def _process_gone(pid: Any, started: Any) -> bool:
    """Whether process `pid` of this host has ended (or its pid now names another process, or a zombie)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return False
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":
        return True  # killed, not yet reaped by its parent
    now_started = fields[19] if fields and len(fields) > 19 else None
    return bool(started and now_started and str(started) != now_started)


def describe_model(config: EmbedConfig) -> str:
    """The run's model in a few words: name, weights, and the settings that change its embeddings."""
    weights = (f"checkpoint {config.checkpoint}" if config.checkpoint
               else "pretrained" if config.pretrained else "random weights")
    parts = [weights]
    if config.embedding != "auto":
        parts.append(f"embedding {config.embedding}")
    parts.append("normalized" if config.normalize_embeddings else "not normalized")
    if config.embedding_dtype != "float32":
        parts.append(config.embedding_dtype)
    return f"{config.model_name} ({', '.join(parts)})"


def new_record(config: EmbedConfig, by: Optional[str] = None) -> dict:
    now = _now()
    record = {
        "run": uuid.uuid4().hex[:16],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_start(os.getpid()),
        "pid_namespace": _pid_namespace(),
        "started": _iso(now),
        "heartbeat": _iso(now),
        "model": describe_model(config),
        "settings": {**config.model_key(), "embedding_dtype": config.embedding_dtype},
        "output": config.output,
    }
    if by:  # what started the run, in its caller's words (a Prefect flow run: its name and page in the UI)
        record["by"] = by
    return record


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _decode(raw: bytes) -> Optional[dict]:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stale_reason(record: Optional[dict], written: Optional[float], now: Optional[float] = None) -> Optional[str]:
    """Why the claim `record` (None: unreadable; `written`: when its file was last written) no longer holds
    anything, or None while its run may be alive."""
    now = _now() if now is None else now
    if record is None:
        if written is not None and now - written > STALE_S:
            return f"an unreadable claim, last written {now - written:.0f} s ago"
        return None
    if _same_host(record) and _process_gone(record.get("pid"), record.get("pid_started")):
        return f"its process (pid {record.get('pid')} on this host) is gone"
    beat = _epoch(record.get("heartbeat"))
    if beat is None:
        beat = written
    if beat is not None and now - beat > STALE_S:
        return f"its last heartbeat is {now - beat:.0f} s old (more than {STALE_S:.0f} s)"
    return None


def describe_holder(record: Optional[dict], now: Optional[float] = None) -> str:
    if record is None:
        return "an unknown run (its claim file cannot be read: empty or not JSON)"
    now = _now() if now is None else now
    beat = _epoch(record.get("heartbeat"))
    ago = f", last heartbeat {max(0.0, now - beat):.0f} s ago" if beat is not None else ""
    by = f", started by {record['by']}" if record.get("by") else ""
    return (f"run {record.get('run')} (pid {record.get('pid')} on host {record.get('host')}{by}, since "
            f"{record.get('started')}, model {record.get('model')}{ago})")


def busy_message(output: str, record: Optional[dict]) -> str:
    if record is None:  # names no run nor process: only its file's age can tell that its writer is gone
        return (f"output {output!r} is claimed, but its claim file ({CLAIM_NAME} in the output) cannot be read "
                "(empty or not JSON: a run may have died while writing it, or be writing it now). It is taken over "
                f"once the file is {STALE_S / 60:.0f} minutes old (by its modification time); if no run is writing "
                "to this output, remove it by hand, or choose another output folder")
    return (f"output {output!r} is being written by another {describe_holder(record)}: wait for that run to "
            "finish, or choose another output folder. Two runs writing one output would mix their outputs. If that "
            f"run is gone, its claim ({CLAIM_NAME} in the output) is taken over once its heartbeat is "
            f"{STALE_S / 60:.0f} minutes old, or at once on its own host once its process has ended")


# --------------------------------------------------------------------------------------------------- the stores


@dataclass
class _Found:
    record: Optional[dict]  # None: unreadable
    token: Any  # what a conditional replace compares with (the bytes locally, the ETag on S3)
    written: Optional[float]  # when the claim was last written (epoch), where known


class _LocalStore:
    """The claim on a local (or network-mounted) folder."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fs, self.folder = storage.filesystem(path)[0], os.path.dirname(path) or "."

    def create(self, data: bytes) -> Optional[Any]:
        folder = self.folder
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, os.path.basename(storage.temp_name(self.path)))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # fails where the claim exists: atomic, and never seen half-written
                return data
            except (FileExistsError, FileNotFoundError):  # the latter: the temp file gone (removed by hand)
                return None  # the caller looks again
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK):
                    raise
            try:  # a filesystem without hard links
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return data
        finally:
            _unlink_quietly(tmp)

    def read(self) -> Optional[_Found]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                written = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _Found(_decode(raw), raw, written)

    def take_over(self, found: _Found, data: bytes) -> Optional[Any]:
        """Move the stale claim `found` aside (a rename: of two takers only one gets it), then create ours. Where
        what was moved aside is not `found` (another run took over first), it is put back and None returned."""
        grabbed = os.path.join(os.path.dirname(self.path) or ".", os.path.basename(storage.temp_name(self.path)))
        try:
            os.rename(self.path, grabbed)
        except FileNotFoundError:
            return None
        try:
            with open(grabbed, "rb") as f:
                moved = f.read()
            if moved != found.token:
                try:
                    os.link(grabbed, self.path)  # a claim that is not the stale one: put it back
                except OSError:
                    pass  # another claim is in place by now: it stands
                return None
        finally:
            _unlink_quietly(grabbed)
        return self.create(data)

    def refresh(self, token: Any, data: bytes, run: str) -> Optional[Any]:
        """Our claim with a new heartbeat, where it is still ours; None where another run's is in its place."""
        found = self.read()
        if found is None:
            return self.create(data)  # removed by hand meanwhile: this run still holds the output
        if (found.record or {}).get("run") != run:
            return None
        storage.write_atomic(self.fs, self.path, data)  # whole, never half-written
        return data

    def release(self, token: Any, run: str) -> None:
        found = self.read()
        if found is not None and (found.record or {}).get("run") == run:
            _unlink_quietly(self.path)


class _ObjectStore:
    """The claim on an object store (or another fsspec filesystem): S3's conditional PUTs where it is S3."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.folder = path.rsplit("/", 1)[0]
        self.s3 = storage.is_s3(fs)

    def _put(self, data: bytes, **condition: str) -> Any:
        """PUT `data`; returns the new token (the ETag on S3)."""
        out = self.fs.pipe_file(self.path, data, **condition)
        if self.s3:
            etag = (out or {}).get("ETag") if isinstance(out, dict) else None
            return etag or self._etag()
        return data

    def _etag(self) -> Optional[str]:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.info(self.path).get("ETag")
        except FileNotFoundError:
            return None

    def _landed(self, data: bytes) -> Optional[Any]:
        """The claim's token where what is stored is `data` itself, else None. A conditional PUT the store served but
        whose answer was lost (the connection dropped) is tried again by the client, and that retry is refused (412)
        by the write it retries: the claim is then this run's own, not another's."""
        found = self.read()
        if found is None or found.record is None or found.record != _decode(data):
            return None
        return found.token

    def _put_retrying_conflicts(self, data: bytes, **condition: str) -> Any:
        """_put, tried again after a short sleep where S3 answers 409 ConditionalRequestConflict (a conditional
        write racing another on the same key: S3 says to try again); the last try's error raised."""
        for attempt in range(5):
            try:
                return self._put(data, **condition)
            except OSError as exc:
                if attempt == 4 or not _conflict(exc):
                    raise
                time.sleep(0.2)

    def create(self, data: bytes) -> Optional[Any]:
        try:
            return self._put_retrying_conflicts(data, mode="create")  # S3: If-None-Match: *
        except FileExistsError:
            return self._landed(data)
        except OSError as exc:
            if _precondition_failed(exc):
                return self._landed(data)
            if _conflict(exc):
                return None  # the caller looks again
            raise

    def read(self) -> Optional[_Found]:
        self.fs.invalidate_cache(self.path)
        try:
            info = self.fs.info(self.path)
            raw = storage.cat_whole(self.fs, self.path)
        except FileNotFoundError:
            return None
        modified = info.get("LastModified") or info.get("mtime") or info.get("created")
        written = modified.timestamp() if isinstance(modified, dt.datetime) else (
            float(modified) if isinstance(modified, (int, float)) else None)
        # On S3 the ETag of what was read: a change between the two requests fails the conditional write later.
        return _Found(_decode(raw), info.get("ETag") if self.s3 else raw, written)

    def take_over(self, found: _Found, data: bytes) -> Optional[Any]:
        if self.s3 and found.token:
            try:
                return self._put(data, IfMatch=found.token)  # replaced only while it is the stale claim
            except OSError as exc:
                if _precondition_failed(exc) or _conflict(exc) or isinstance(exc, FileNotFoundError):
                    # another run took it over first, or it is gone: try again from the start; unless it is ours
                    return self._landed(data)
                raise
        # No compare-and-swap here: removed, then created again (another taker's create fails).
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        return self.create(data)

    def refresh(self, token: Any, data: bytes, run: str) -> Optional[Any]:
        if self.s3 and token:
            try:
                return self._put_retrying_conflicts(data, IfMatch=token)
            except OSError as exc:
                if not (_precondition_failed(exc) or isinstance(exc, FileNotFoundError)):
                    raise
            found = self.read()  # changed or gone: whose is it now?
            if found is None:
                return self.create(data)
            if (found.record or {}).get("run") != run:
                return None
            # Still ours, under another ETag: an earlier write of ours landed, its answer lost. `data` is not stored
            # yet: written against the ETag found (a second 412 is the store's error, for the caller).
            return self._put_retrying_conflicts(data, IfMatch=found.token)
        found = self.read()
        if found is None:
            return self.create(data)
        if (found.record or {}).get("run") != run:
            return None
        return self._put(data)

    def release(self, token: Any, run: str) -> None:
        found = self.read()
        if found is not None and (found.record or {}).get("run") == run:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass


def _precondition_failed(exc: BaseException) -> bool:
    """S3's 412 (If-None-Match or If-Match not met), as s3fs raises it (FileExistsError, or OSError EINVAL)."""
    if isinstance(exc, FileExistsError):
        return True
    code = _s3_code(exc)
    return code in ("PreconditionFailed", "412") or "PreconditionFailed" in str(exc)


def _conflict(exc: BaseException) -> bool:
    code = _s3_code(exc)
    return code in ("ConditionalRequestConflict", "409") or "ConditionalRequestConflict" in str(exc)


def _s3_code(exc: BaseException) -> Optional[str]:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code"))
    return None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def claim_url(config: EmbedConfig) -> tuple[Any, str]:
    """(filesystem, path) of OUTPUT's claim."""
    fs, folder = _claim_folder(config)
    return fs, storage.join(folder, CLAIM_NAME)


def _claim_folder(config: EmbedConfig) -> tuple[Any, str]:
    """(filesystem, path) of OUTPUT, where its claim is, and the markers of its shards being put in place."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    return fs, root.rstrip("/") or "/"


def _store(config: EmbedConfig):
    fs, path = claim_url(config)
    return _LocalStore(os.path.abspath(path)) if storage.is_local(fs) else _ObjectStore(fs, path)


# --------------------------------------------------------------------------------------------------- the claim


@dataclass
class Claim:
    """This run's claim on `output`, held until release()."""

    output: str
    record: dict
    store: Any = field(repr=False)
    token: Any = field(repr=False)
    took_over: Optional[str] = None  # the holder whose stale claim was taken over, described
    removed: list[str] = field(default_factory=list)  # stale temp files removed from OUTPUT
    aborted_uploads: list[str] = field(default_factory=list)  # dead runs' incomplete multipart uploads, aborted
    lost: bool = False  # another run took the claim over meanwhile (this run's heartbeats had stopped)
    released: bool = False
    gave_up: bool = False  # the run gave up on shards (close_shards): a worker of theirs may have died mid-write
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: Optional[threading.Thread] = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def run(self) -> str:
        return self.record["run"]

    def start_heartbeat(self) -> None:
        # In the taker's context: taken in a flow run (the deployed flow's), its warnings reach that run's log in
        # the UI; from a bare thread they reached the terminal alone (threads.start_in_context).
        self._thread = start_in_context(self._beat, "wdsembed-claim-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.heartbeat()
            if self.lost or self.released:
                return

    def heartbeat(self) -> None:
        """Refresh the heartbeat now (the daemon thread does it every HEARTBEAT_S seconds)."""
        with self._lock:
            if self.lost or self.released:
                return
            try:
                self._rewrite({})
            except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat tries again
                log.warning("output %s: could not refresh this run's claim (%s: %s); trying again in %.0f s",
                            self.output, type(exc).__name__, exc, HEARTBEAT_S)

    def close(self, stems, then: Optional[str] = "a worker may yet write one of them after this run has counted it "
              "failed") -> bool:
        """Mark the shards `stems` closed in the claim (its "closed" list, kept by every later heartbeat): from the
        moment this returns True, no worker of this run puts a file of theirs in place (ShardCommit.check refuses).
        False where that could not be said (the claim released or lost, or the store's error: said, with `then`,
        what follows; not where `then` is None)."""
        with self._lock:
            if self.lost or self.released:
                return False
            try:
                return self._rewrite({"closed": sorted(set(self.record.get("closed", ())) | set(stems))})
            except Exception as exc:  # noqa: BLE001 - the count goes on without it, as it did before closing
                if then is not None:
                    log.warning("output %s: could not mark shard(s) %s closed in this run's claim (%s: %s); %s",
                                self.output, ", ".join(sorted(stems)), type(exc).__name__, exc, then)
                return False

    def reopen(self) -> None:
        """Clear the "closed" list: a new attempt of the run's flow (a Prefect flow retry, under the claim of the
        process that started it) computes the shards an earlier attempt gave up on, as a new run would. Where the
        store refuses, said: those shards then fail as closed in this attempt too."""
        with self._lock:
            if self.lost or self.released or not self.record.get("closed"):
                return
            try:
                self._rewrite({"closed": []})
            except Exception as exc:  # noqa: BLE001 - the attempt goes on; its closed shards fail, saying so
                log.warning("output %s: could not reopen shard(s) %s, closed by an earlier attempt of this run, in "
                            "its claim (%s: %s): they fail again in this attempt; the next run computes them",
                            self.output, ", ".join(self.record["closed"]), type(exc).__name__, exc)

    def _rewrite(self, changes: dict) -> bool:
        """The claim written again with `changes` and a new heartbeat, where it is still this run's (with self._lock
        held): False where another run took it over (said, and `lost` set). A store's error is raised."""
        record = {**self.record, **changes, "heartbeat": _iso(_now())}
        token = self.store.refresh(self.token, _encode(record), self.run)
        if token is None:
            self.lost = True
            found = self.store.read()
            log.error("output %s: this run's claim was taken over by %s (this run's heartbeats had stopped for "
                      "over %.0f s, or the claim was replaced by hand); two runs may now be writing to it: check "
                      "its outputs once both end", self.output, describe_holder(found.record if found else None),
                      STALE_S)
            return False
        self.record, self.token = record, token
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the claim, where it is still this run's. Never raises: a run's own
        outcome is what its caller needs to hear."""
        self._stop.set()
        _HELD.pop(self.run, None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            if self.lost or self.released:
                return
            self.released = True
            fs = self.store.fs
            # A store that lists only whole folders (not local disk) is listed (a page per 1,000 outputs) only where
            # a worker may have died mid-write, as far as the run knows (it gave up on shards); the markers of a
            # worker that died unseen (its shard run again whole) go as the next run takes the claim.
            if storage.is_local(fs) or storage.lists_by_prefix(fs) or self.gave_up:
                _remove_markers(fs, self.store.folder, self.run, self.output)
            try:
                self.store.release(self.token, self.run)
            except Exception as exc:  # noqa: BLE001
                # The rule of stale_reason: a claim of this host is stale once its process is gone; one of another
                # host, or of a process still running (a notebook's run_shards), once its heartbeat is old.
                log.warning("output %s: could not remove this run's claim %s (%s: %s); the next run takes it over "
                            "once it can write to the output: on this host at once after this process (pid %s) "
                            "has ended, from another host or from this process once the claim's heartbeat is %.0f "
                            "s old", self.output, CLAIM_NAME, type(exc).__name__, exc, self.record.get("pid"),
                            STALE_S)


# The claims this process holds, by run id: close_shards finds the run's own there (the flow and the API know the
# run's id alone), and only its holder may write the claim, or a heartbeat would drop what another write added.
_HELD: dict[str, Claim] = {}


def holder(config: EmbedConfig) -> Optional[dict]:
    """The live claim on OUTPUT (its record; {} where unreadable), or None where OUTPUT is free or its claim is
    stale. Reads only."""
    found = _store(config).read()
    if found is None or stale_reason(found.record, found.written):
        return None
    return found.record if found.record is not None else {}


def check_free(config: EmbedConfig) -> None:
    """Refuse (OutputClaimedError) where another live run holds OUTPUT: the checks' early answer, which writes
    nothing. The run's own take() decides, atomically."""
    try:
        record = holder(config)
    except (OSError, ValueError):
        return  # unreadable here: take() says what is wrong, where it matters
    if record is not None:
        raise OutputClaimedError(busy_message(config.output, record or None))


def check_still_held(config: EmbedConfig, run: Optional[str], subject: str,
                     not_done: str = "Neither of the shard's files was put in place", *,
                     stem: Optional[str] = None) -> None:
    """Raise OutputClaimLostError, naming `subject` (`shard 00012`, the manifest's name), OUTPUT, the run that holds
    it now and what was `not_done`, unless OUTPUT's claim is still run `run`'s; ShardClosedError where it is, but
    the run has closed shard `stem` (Claim.close). A worker asks just before each change it makes to OUTPUT
    (shard.write_output, through ShardCommit; shard.finished_output's view repair), the orchestrating process
    before its manifest (report.write_manifest). One small read, never a write. `run` None (a shard written without
    a claim) checks nothing."""
    if run is None:
        return
    fs, path = claim_url(config)
    try:
        record = _decode(storage.cat_whole(fs, path))  # the content only: one GET on S3, no HEAD
    except FileNotFoundError:
        now = "the claim is gone (this run ended, or its claim was removed)"
    else:
        if record is not None and record.get("run") == run:
            if stem is None or stem not in record.get("closed", ()):
                return
            raise ShardClosedError(
                f"{subject}: not written to output {config.output!r}: this run ({run}) gave up on it (its Dask "
                "scheduler was lost while the shard ran) and has counted its outputs for its manifest, which lists "
                f"it as failed. {not_done}, so that the manifest and the outputs agree: the next run computes it")
        now = f"it is now held by {describe_holder(record)}"
    raise OutputClaimLostError(
        f"{subject}: not written to output {config.output!r}: this run ({run}) no longer holds the output's "
        f"claim ({CLAIM_NAME}): {now}. {not_done}: a run writes to its output only while it holds the claim, so "
        "that two runs' outputs never mix")


def take(config: EmbedConfig, by: Optional[str] = None) -> Claim:
    """Claim OUTPUT for this run, atomically, or raise OutputClaimedError naming the run that holds it (and `by`,
    what started it, where its taker said: a run refused names it, so that an operator finds that run). A stale
    claim is taken over, with a warning. Then the temp files that dead runs left in OUTPUT are removed, the
    heartbeat starts, and the incomplete multipart uploads of dead runs' outputs are aborted."""
    store = _store(config)
    record = new_record(config, by)
    data = _encode(record)
    took_over = None
    try:
        for _ in range(10):
            token = store.create(data)
            if token is not None:
                break
            found = store.read()
            if found is None:
                continue  # released meanwhile
            why = stale_reason(found.record, found.written)
            if why is None:
                raise OutputClaimedError(busy_message(config.output, found.record))
            token = store.take_over(found, data)
            if token is not None:
                took_over = f"{describe_holder(found.record)}: {why}"
                break
        else:
            raise OutputClaimedError(f"output {config.output!r}: could not claim it, other runs keep taking it; "
                                     "wait for them to finish, or choose another output folder")
    except PermissionError as exc:  # a read-only folder, a bucket these keys may not write
        hint = "" if isinstance(store, _LocalStore) else (
            "; let these credentials write there (on S3 s3:PutObject and s3:DeleteObject on its keys), or check "
            f"which credentials are used: {credentials_hint()}")
        raise PermissionError(f"cannot write output {config.output} (its claim {CLAIM_NAME}): access denied "
                              f"({exc}){hint}") from exc
    except OSError as exc:  # the errno stays (faults.is_disk_full); the message names the output
        if not_s3 := storage._not_an_s3_answer(store.fs, exc):  # a web server's 501 to the PUT, say
            raise OSError(f"cannot write output {config.output}: {not_s3}") from exc
        said = f"cannot claim output {config.output} ({CLAIM_NAME}): {exc}"
        raise (OSError(exc.errno, said) if exc.errno else OSError(said)) from exc
    claim = Claim(config.output, record, store, token, took_over)
    if took_over:
        log.warning("output %s: took over the claim of %s", config.output, took_over)
    try:
        claim.removed = remove_stale_temp_files(config)
        if storage.writes_whole_objects(store.fs):
            claim.removed = sorted(claim.removed + _remove_dead_runs_markers(store.fs, store.folder, claim.run,
                                                                             config.output))
    except BaseException:  # Ctrl-C too: the caller never gets the claim to release
        claim.release()
        raise
    if claim.removed:
        log.warning("output %s: removed %d temp file(s) that runs killed mid-write had left: %s", config.output,
                    len(claim.removed), ", ".join(claim.removed[:5]) + (" ..." if len(claim.removed) > 5 else ""))
    _HELD[claim.run] = claim
    claim.start_heartbeat()
    try:  # beating already: a bucket with many uploads to abort must not let the claim look stale meanwhile
        claim.aborted_uploads = abort_stale_uploads(config, claim)
    except BaseException:  # Ctrl-C: the caller never gets the claim to release
        claim.release()
        raise
    return claim


# A claim taken before its run started (handed_on), for the first held() of its OUTPUT in this context to take.
_handed: ContextVar[Optional[list[Claim]]] = ContextVar("wdsembed_handed_claim", default=None)


@contextmanager
def held(config: EmbedConfig, by: Optional[str] = None) -> Iterator[Claim]:
    """take(config, by) for the block, released as it ends, however it ends; or the claim on the same OUTPUT that
    its caller took beforehand and handed on (handed_on), still held."""
    handed = _handed.get()
    claim = None
    if handed and handed[0].output == config.output and not (handed[0].released or handed[0].lost):
        claim = handed.pop()
    claim = claim or take(config, by)
    try:
        yield claim
    finally:
        claim.release()


@contextmanager
def handed_on(claim: Claim) -> Iterator[Claim]:
    """Hand `claim`, taken before its run starts, to the run started in this block: its held() on that OUTPUT
    takes it rather than claiming OUTPUT again (the command takes the claim as its checks end, so that an OUTPUT it
    cannot write is refused before Prefect and Dask start). Released as the block ends, however it ends, where the
    run did not release it (it never started)."""
    token = _handed.set([claim])
    try:
        yield claim
    finally:
        _handed.reset(token)
        claim.release()


# --------------------------------------------------------------------------------------------------- closed shards
#
# A run that lost its Dask scheduler gives up on the shards its tasks were running, while a worker that outlives the
# scheduler may still write one whole, under the claim the run holds until its end. The run counts such outputs once
# (caching.written_after_all), as it writes its manifest: a write landing after that count left the manifest
# listing the shard failed beside its whole output. So the run closes those shards first (close_shards), and a
# worker puts a shard's files in place only while its shard is not closed (ShardCommit). A look at the claim and a
# rename (on S3 an upload) are two steps, though: a worker that looked just before the close could commit just
# after the count. So each side writes before it reads, as in Dekker's lock: the worker puts a marker beside the
# claim, then looks at the claim; the run closes the shards in the claim, then looks for markers, and counts only
# once those of its closed shards are gone. Of the two writes one comes first, and its writer's read follows both:
# either the worker sees the close (and puts nothing in place), or the run sees the marker and waits for the
# worker's last file to be in place or given up (removing the marker), then counts what is there. This needs each
# side to see the other's write at once: S3 does (strongly consistent, listings included), and one host's local
# disk; NFS across hosts only where its clients cache nothing (module doc).
# Where the close cannot be written (the store's error, said), the run still waits for the markers it finds; where
# it cannot list them, it tries again until COMMIT_WAIT_S is up, then counts, saying so. It lists its own run's
# markers alone (their prefix: on S3, GCS and Azure one small listing, not OUTPUT's every output). Every shard a
# worker puts in place makes a marker (a PUT and a DELETE on S3, beside its look at the claim), but one the run
# can never give up on while it is written, there being no Dask task to lose (ShardCommit, _given_up_never: the
# Python API without Dask, the flow's tasks in threads of its own process): it looks at the claim alone. A worker
# killed mid-write leaves its marker: its run removes those as it releases the claim (where the store lists only
# whole folders, only where it gave up on shards: a listing of OUTPUT is a page per 1,000 outputs), and a run that takes
# the claim removes those of other runs, killed with their workers' markers in place (_remove_dead_runs_markers; on
# local disk they are temp files, and go with them). A close the store refuses (503, 409) is tried again while the
# run waits. A flow retry under the same claim (run() holds it across the embed-shards flow's attempts) starts with
# no shard closed (reopen_shards), as a new run would.


MARKERS_START = f".{CLAIM_NAME}.commit-"  # how every marker's name starts


def _run_markers_start(run: str) -> str:
    """How the names of run `run`'s markers start."""
    return f"{MARKERS_START}{run}-"


def _marker_prefix(run: str, stem: str) -> str:
    """The start of a marker's name: its run and shard (hashed: a stem may be too long for a name). Ended by
    `.tmp-<32 hex>`, the name of an atomic write's temp file: one a killed worker left is removed as they are
    (remove_stale_temp_files) by the next run's claim where OUTPUT has temp files (local disk); on an object store,
    by its run as it releases the claim (_remove_markers), else by the next run's claim (_remove_dead_runs_markers)."""
    return f"{_run_markers_start(run)}{hashlib.sha256(stem.encode()).hexdigest()[:16]}"


def _run_markers(fs: Any, folder: str, run: str) -> list[str]:
    """The names of run `run`'s markers in OUTPUT (`folder`). On S3 (and GCS, Azure) one listing of their prefix
    alone: a listing of OUTPUT itself is of its every output (1,000 a page), and close_shards asks 5 times a
    second."""
    return storage.names_starting(fs, folder, _run_markers_start(run))


def _remove_markers(fs: Any, folder: str, run: str, output: str) -> None:
    """Remove what markers of run `run` are left in OUTPUT (a worker killed while putting a shard in place), as the
    run releases its claim. Never raises: said."""
    try:
        for name in _run_markers(fs, folder, run):
            try:
                fs.rm_file(storage.join(folder, name))
            except FileNotFoundError:
                pass
    except Exception as exc:  # noqa: BLE001 - small files, harmless to later runs
        log.warning("output %s: could not remove the markers this run's workers left there (%s*: %s: %s)", output,
                    _run_markers_start(run), type(exc).__name__, exc)


def _remove_dead_runs_markers(fs: Any, folder: str, run: str, output: str) -> list[str]:
    """Remove the markers of runs other than `run`, whose claim on OUTPUT this process has just taken, from an
    object store (no temp files there for remove_stale_temp_files to find them by): what the workers of a run killed
    mid-write left (its orchestrating process killed with them, before its release removed them). Their run no
    longer holds the claim: no one waits for them, and a worker of theirs still running finds the claim another
    run's and puts nothing in place. On S3 one listing of their prefix. Their names; never raises: said."""
    removed = []
    try:
        for name in storage.names_starting(fs, folder, MARKERS_START):
            if name.startswith(_run_markers_start(run)):
                continue
            try:
                fs.rm_file(storage.join(folder, name))
            except FileNotFoundError:
                continue
            removed.append(name)
    except Exception as exc:  # noqa: BLE001 - small files, harmless to this run
        log.warning("output %s: could not remove the markers (%s*) that runs killed mid-write may have left there "
                    "(%s: %s); the next run tries again", output, MARKERS_START, type(exc).__name__, exc)
    return sorted(removed)


class ShardCommit:
    """A worker's writes of shard `stem` into OUTPUT under run `run`'s claim, as a block: check() before the first
    file is put in place puts the marker (the run then waits for the block to end before it counts the shard), then
    looks at the claim (check_still_held: the claim still the run's and the shard not closed, else raised); the
    marker goes as the block ends. `run` None (a shard written without a claim): neither. No marker where the run
    can never give up on the shard while it is written (_given_up_never): the look at the claim alone. Made in the
    shard's own thread (shard.write_output), which says whether it is a Dask task's: check() runs in a writer
    thread of its own, outside the task's context."""

    def __init__(self, config: EmbedConfig, run: Optional[str], stem: str, subject: str) -> None:
        self.config, self.run, self.stem, self.subject = config, run, stem, subject
        self.marker: Optional[tuple[Any, str]] = None
        self.marks = run is not None and not _given_up_never(run)

    def check(self, not_done: str = "Neither of the shard's files was put in place") -> None:
        if self.run is None:
            return
        if self.marks and self.marker is None:
            fs, folder = _claim_folder(self.config)
            path = storage.join(folder, f"{_marker_prefix(self.run, self.stem)}.tmp-{uuid.uuid4().hex}")
            try:
                fs.pipe_file(path, _encode({"stem": self.stem, "host": socket.gethostname(), "pid": os.getpid(),
                                            "pid_started": _process_start(os.getpid()),
                                            "pid_namespace": _pid_namespace(), "since": _iso(_now())}))
            except OSError as exc:  # a folder this user may not write: named as OUTPUT, not the marker
                # A full disk fails the write after the file is made: the empty marker would stay beside the claim.
                with contextlib.suppress(Exception):
                    fs.rm_file(path)
                if exc.filename != path:
                    raise
                raise type(exc)(exc.errno, exc.strerror, self.config.output) from exc
            self.marker = (fs, path)
        try:
            check_still_held(self.config, self.run, self.subject, not_done, stem=self.stem)
        except ShardClosedError as exc:
            log.warning("%s", exc)  # on the worker, whose task's end no one may be waiting for any more
            raise

    def __enter__(self) -> "ShardCommit":
        return self

    def __exit__(self, *ended) -> None:
        if self.marker is None:
            return
        fs, path = self.marker
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - the shard's own outcome stands
            log.warning("shard %s: could not remove its marker %s (%s: %s): where its run has given up on the "
                        "shard, its end waits for it up to %.0f s", self.stem, path, type(exc).__name__, exc,
                        COMMIT_WAIT_S)


def _given_up_never(run: str) -> bool:
    """Whether a shard written here, now, under run `run` is one its run can never give up on while it is being
    written, so that no marker need tell the run to wait for it (on S3 a PUT and a DELETE per shard spared): written
    by the very process that holds the run's claim, outside any Dask task (the Python API without Dask, in the
    caller's thread; the flow's tasks in threads of its own process). A run closes only the shards of the Dask tasks
    it lost (caching.written_after_all: their futures errored or cancelled, flows.embed._given_up, api._failed);
    its own threads it waits for, or stops (Ctrl-C and a Prefect task's timeout are raised in them), and never
    counts a shard of theirs as given up. A Dask task of a worker in this very process (LocalCluster(processes=
    False), an inproc:// scheduler) is marked: Dask can give up on it (cancelled) while its thread writes on."""
    return run in _HELD and enclosing_dask_worker() is None


def close_shards(config: EmbedConfig, run: str, stems) -> None:
    """Close the shards `stems`, which run `run` (its claim held by this process) gave up on, then wait for any
    worker of the run still putting one of their files in place: once this returns, what OUTPUT holds of them is
    final for the run (see above). A close the store refused (a 503, a 409 past its retries) is tried again
    meanwhile, and a worker that dies with its marker in place is waited for, COMMIT_WAIT_S at most (at once where
    it ran on this host); said where that time runs out."""
    stems = sorted(set(stems))
    if not stems:
        return
    claim = _HELD.get(run)
    if claim is None:  # not this process's: never so for the flow and the API, which hold the claim they count under
        log.warning("output %s: shard(s) %s not closed: this process does not hold run %s's claim; a worker may yet "
                    "write one of them after this run has counted it failed", config.output, ", ".join(stems), run)
        return
    claim.gave_up = True  # their workers may have died mid-write: the run's release looks for their markers
    closed = claim.close(stems, f"tried again for up to {COMMIT_WAIT_S:.0f} s")
    if not closed and (claim.lost or claim.released):
        return  # the workers' look at the claim refuses them anyway
    fs, folder = _claim_folder(config)
    prefixes = {_marker_prefix(run, stem): stem for stem in stems}
    deadline = _now() + COMMIT_WAIT_S
    next_close = _now() + 1.0
    said = False

    def unclosed() -> None:
        if not closed:
            log.warning("shard(s) %s: could not be marked closed in this run's claim on output %s for %.0f s (the "
                        "store's error, said above): counted by what is in place now; a worker may yet write one "
                        "of them after this run has counted it failed", ", ".join(stems), config.output,
                        COMMIT_WAIT_S)

    while True:
        if not closed and _now() >= next_close:  # refused by the store (a 503, a 409): such errors pass
            closed = claim.close(stems, None)
            next_close = _now() + 1.0
            if not closed and (claim.lost or claim.released):
                return
        try:
            names = _run_markers(fs, folder, run)
        except Exception as exc:  # noqa: BLE001 - throttled, 5xx, denied: tried again; the count goes on at the end
            if _now() > deadline:
                log.warning("shard(s) %s: could not look for workers still putting their files in place in output "
                            "%s for %.0f s (%s: %s): counted by what is in place now; a file that lands later is "
                            "found by the next run", ", ".join(stems), config.output, COMMIT_WAIT_S,
                            type(exc).__name__, exc)
                unclosed()
                return
            time.sleep(1.0)
            continue
        writing = sorted({prefixes[name.split(".tmp-")[0]] for name in names
                          if name.split(".tmp-")[0] in prefixes and not _marker_of_gone_process(fs, folder, name)})
        if closed and not writing:
            return
        if _now() > deadline:
            if writing:
                log.warning("shard(s) %s: a worker has been putting their files in place for over %.0f s (or died "
                            "doing so on another host): counted by what is in place now; a file that lands later "
                            "is found by the next run", ", ".join(writing), COMMIT_WAIT_S)
            unclosed()
            return
        if writing and not said:
            log.info("shard(s) %s: waiting for their worker to finish putting their files in place before they are "
                     "counted", ", ".join(writing))
            said = True
        time.sleep(0.2 if writing else 1.0)  # none writing: the close is being tried again


def reopen_shards(run: str) -> None:
    """Reopen the shards run `run` closed (close_shards), where this process holds its claim: a new attempt of the
    run's flow computes them (Claim.reopen)."""
    claim = _HELD.get(run)
    if claim is not None:
        claim.reopen()


def _marker_of_gone_process(fs: Any, folder: str, name: str) -> bool:
    """Whether marker `name` was put by a process of this host that has ended (killed mid-write)."""
    try:
        record = _decode(storage.cat_whole(fs, storage.join(folder, name)))
    except FileNotFoundError:
        return True  # removed since the listing
    except Exception:  # noqa: BLE001 - unread: taken as a live writer's
        return False
    return bool(record) and _same_host(record) and _process_gone(record.get("pid"), record.get("pid_started"))


# --------------------------------------------------------------------------------------------------- leftovers


def abort_stale_uploads(config: EmbedConfig, claim: Claim) -> list[str]:
    """Abort the incomplete multipart uploads of wdsembed's own outputs under OUTPUT (output.is_output_name) that
    were initiated before `claim` was taken: what runs killed mid-upload left, stored and billed though no listing
    shows them. An upload begun since is a live writer's, and kept. Their paths relative to OUTPUT, logged. Never
    raises: where the store refuses (a policy without s3:ListBucketMultipartUploads or s3:AbortMultipartUpload),
    one line says what stays, and the run goes on."""
    taken = _epoch(claim.record["started"])  # whole seconds, rounded down: never after the claim
    try:
        fs, root = storage.filesystem(config.output, config.storage_options)
        aborted = storage.abort_incomplete_uploads(fs, root, is_output_name, taken)
    except Exception as exc:  # noqa: BLE001 - a cleanup: the run's own work does not depend on it
        log.warning("output %s: could not abort the incomplete multipart uploads that runs killed mid-upload may "
                    "have left there (%s: %s); their parts stay stored, and billed, until a bucket lifecycle rule "
                    "AbortIncompleteMultipartUpload clears them", config.output, type(exc).__name__, exc)
        return []
    if aborted:
        log.warning("output %s: aborted %d incomplete multipart upload(s) that runs killed mid-upload had left: %s",
                    config.output, len(aborted), ", ".join(aborted[:5]) + (" ..." if len(aborted) > 5 else ""))
    return aborted


def remove_stale_temp_files(config: EmbedConfig) -> list[str]:
    """Remove the temp files of atomic writes (storage.write_atomic: `.<name>.tmp-<32 hex>`) under OUTPUT, left by
    processes killed between a file's write and its rename; their paths relative to OUTPUT. Call it only with the
    claim held: no live run of ours is writing there then, but other runs may be trying to claim it (and are about
    to be refused): the claim's own temp files are left to them unless older than STALE_S. A folder of OUTPUT with a
    claim of its own is another run's OUTPUT, and is left to it. Object stores hold none (one PUT per object)."""
    fs, root = storage.filesystem(config.output, config.storage_options)
    if storage.is_local(fs):
        return _remove_local(os.path.abspath(root))
    if storage.writes_whole_objects(fs):
        return []
    try:
        files = fs.find(root, withdirs=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = root.rstrip("/") + "/"
    # folders of OUTPUT that are other runs' OUTPUTs (their claim there): their temp files are theirs
    others = tuple(path[len(prefix):-len(CLAIM_NAME)] for path in files if path.startswith(prefix)
                   and path.endswith("/" + CLAIM_NAME) and len(path) > len(prefix + CLAIM_NAME))
    removed = []
    for path in files:
        rel = path[len(prefix):] if path.startswith(prefix) else path
        if rel.split("/", 1)[0] in _NOT_WALKED or not TEMP_FILE.match(rel.rsplit("/", 1)[-1]) \
                or rel.startswith(others):
            continue
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            continue
        removed.append(rel)
    return sorted(removed)


def _remove_local(root: str) -> list[str]:
    removed = []
    for folder, dirs, files in os.walk(root):
        if folder == root:
            dirs[:] = [d for d in dirs if d not in _NOT_WALKED]
        elif CLAIM_NAME in files:  # another run's OUTPUT inside this one, claimed: its temp files are its own
            dirs[:] = []
            continue
        for name in files:
            if not TEMP_FILE.match(name):
                continue
            path = os.path.join(folder, name)
            try:
                if folder == root and name.startswith(f".{CLAIM_NAME}.tmp-") and \
                        time.time() - os.stat(path).st_mtime <= STALE_S:
                    continue  # the claim's own, of a run claiming OUTPUT right now (to be refused): it removes it
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(os.path.relpath(path, root))
    return sorted(removed)
