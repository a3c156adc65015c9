"""Whole shards from S3 (and S3-compatible stores) into memory at the rate a GPU worker eats them.

One `ShardFetcher` per process fetches shard tars by concurrent ranged GETs of `part_size` bytes, the shard being
read first, then the next ones the caller named with `prefetch()`. `open(url)` gives a forward-only file object
over the shard in archive order (what `shards.iter_samples` wants); each part is handed over when the reader
reaches it and then leaves the fetcher's accounting.

Sizing, by measurement rather than a constant:
- requests in flight start at what `target_rate` needs under a typical S3 latency and per-connection rate, then
  follow Little's law on the latencies and rates measured (in flight = target rate x part time / part size),
  growing only while the aggregate throughput keeps rising; 503 SlowDown halves it;
- every byte in flight or fetched but not yet read is reserved against `memory_budget` before its request goes
  out, so `peak_bytes` (the high-water mark) never exceeds the budget; shards further ahead get what the budget
  leaves, and give it back (their fetched parts are dropped and fetched again later) when the shard being read
  needs it.

Correctness: every part is checked for its length, its Content-Range and the object's ETag (sent as If-Match
once known, and compared on every answer), so a shard rewritten mid-read raises ShardChangedError naming the URL
instead of mixing two versions. 5xx, SlowDown, resets, short bodies and timeouts are retried with jittered
backoff; a request much slower than its peers (a stall, a straggler) gets a duplicate, and the first complete
answer wins; the loser's socket is shut at once, so that nobody waits for a stalled body. Logs carry bucket, key,
range and request id only; botocore's own debug logging is kept off.

Client: boto3 in a thread pool (measured against s3fs's `_cat_file` on its event loop and obstore, see
docs/s3.md): the reads are blocking socket reads that release the GIL, and the code stays plain.
"""
from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Optional

from wdsembed.prefetch import BlockStream
from wdsembed.storeoptions import s3_attempts

log = logging.getLogger("wdsembed")

PART_SIZE = 8 << 20  # one ranged GET; equal to tarstream.CHUNK_SIZE, so the tar reader takes whole parts, no copy
MEMORY_BUDGET = 1_200_000_000  # bytes per worker process: in flight plus fetched and not yet read
TARGET_RATE = 1e9  # bytes/s: what one GPU worker can embed
MAX_IN_FLIGHT = 64
SHARDS_AHEAD = 2
# Before anything is measured: S3's typical first byte (tens of ms), and a per-connection rate at the low end of
# what stores give (S3 50-90 MB/s, AWS's CRT plans for 50; distant or busy S3-compatible stores less). Starting
# deeper than needed costs nothing (the parts are the shard's own, within the memory budget); starting too shallow
# costs the first shard its rate, since a shard of 30-50 parts is fetched before the depth has adapted. Through a
# 100 ms / 20 MB/s proxy here, a prior of 60 MB/s gave a fresh fetcher 0.77 of a plain 32-in-flight fetch, 30 MB/s
# gave 1.01 (bench/s3.py, docs/benchmarks/s3.json).
PRIOR_FIRST_BYTE = 0.05
PRIOR_STREAM_RATE = 30e6

_S3_SCHEMES = ("s3://", "s3a://")


class ShardChangedError(IOError):
    """The object changed while it was being read (another ETag, size or a failed If-Match)."""


class FetchError(IOError):
    """A part could not be fetched after all retries."""


class FetchRefusedError(FetchError):
    """The store answered in a way that asking again cannot change (a store that ignores Range, a 400, an archived
    object): not retried here, nor by the flow's task retries (faults.is_transient)."""


def _split(url: str) -> tuple[str, str]:
    for scheme in _S3_SCHEMES:
        if url.startswith(scheme):
            url = url[len(scheme):]
            break
    bucket, _, key = url.partition("/")
    if not bucket or not key:
        raise ValueError(f"not an S3 object URL: {url!r}")
    return bucket, key


# ---------------------------------------------------------------------------------------------------------------
# the client: boto3, built from the same storage_options as s3fs


def _client_from_options(storage_options: Optional[Mapping[str, Any]], pool: int):
    """A boto3 S3 client for `storage_options` as s3fs takes them (endpoint_url, region_name or
    client_kwargs.region_name, profile, anon, config_kwargs with timeouts). Credentials come from the
    environment or the profile only, as for s3fs; options that would carry them are refused."""
    import boto3
    import botocore
    import botocore.config

    from wdsembed.storeoptions import fsspec_options, secret_options

    opts = dict(storage_options or {})
    if secret_options(opts):
        raise ValueError(f"credential options are not accepted here ({', '.join(secret_options(opts))}); "
                         "they come from the environment or a profile")
    opts = fsspec_options("s3://x", opts)  # CLI strings to types, timeout defaults, as storage.filesystem does
    client_kwargs = dict(opts.get("client_kwargs") or {})
    config = dict(opts.get("config_kwargs") or {})
    config.pop("retries", None)
    config.update(max_pool_connections=pool, retries={"total_max_attempts": 1})  # retried (and logged) here
    if opts.get("anon"):
        config["signature_version"] = botocore.UNSIGNED
    session = boto3.session.Session(profile_name=opts.get("profile"))
    kwargs = {"config": botocore.config.Config(**config)}
    endpoint = opts.get("endpoint_url") or client_kwargs.get("endpoint_url")
    region = opts.get("region_name") or client_kwargs.get("region_name")
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if region:
        kwargs["region_name"] = region
    if "use_ssl" in opts:
        kwargs["use_ssl"] = bool(opts["use_ssl"])
    if "verify" in client_kwargs:
        kwargs["verify"] = client_kwargs["verify"]
    return session.client("s3", **kwargs)


def _quiet_botocore() -> None:
    # botocore at DEBUG logs signed request headers; never let a root DEBUG level switch that on here.
    for name in ("botocore", "boto3", "urllib3"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO if name == "urllib3" else logging.WARNING)


class _Failure(Exception):
    """One try's failure, classified."""

    def __init__(self, kind: str, retry: bool, request_id: str = "", detail: str = "", status: int = 0) -> None:
        super().__init__(kind)
        self.kind, self.retry, self.request_id, self.detail, self.status = kind, retry, request_id, detail, status


def _classify(exc: BaseException) -> _Failure:
    import botocore.exceptions as bex

    if isinstance(exc, _Failure):
        return exc
    if isinstance(exc, ShardChangedError):
        return _Failure("Changed", False, detail=str(exc))
    if isinstance(exc, bex.ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or meta.get("HTTPStatusCode") or "error")
        status = int(meta.get("HTTPStatusCode") or 0)
        rid = meta.get("RequestId", "") or exc.response.get("Error", {}).get("RequestId", "")
        retry = status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling",
                                                            "RequestTimeTooSkewed", "InternalError")
        return _Failure(code, retry, rid, str(err.get("Message", ""))[:200], status)
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return _Failure("NoCredentials", False)
    if isinstance(exc, (bex.ReadTimeoutError, bex.ConnectTimeoutError)):
        return _Failure("Timeout", True)
    if isinstance(exc, (bex.IncompleteReadError, bex.ResponseStreamingError)):
        return _Failure("ShortRead", True)
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, ConnectionError, TimeoutError, OSError)):
        return _Failure(type(exc).__name__, True)
    return _Failure(type(exc).__name__, False, detail=str(exc)[:200])


# ---------------------------------------------------------------------------------------------------------------
# state


class _Part:
    __slots__ = ("shard", "index", "start", "end", "state", "data", "chains", "bodies", "issued", "progress", "error")

    def __init__(self, shard: "_Shard", index: int, start: int, end: int) -> None:
        self.shard, self.index, self.start, self.end = shard, index, start, end
        self.state = "todo"  # todo | flight | done | read
        self.data: Optional[bytes] = None
        self.chains = 0  # requests (a first one and maybe a duplicate) working on it
        self.bodies: set = set()  # open response bodies, closed when another request wins
        self.issued = 0.0
        self.progress = 0.0  # when its latest try began (stragglers are judged from it)
        self.error: Optional[BaseException] = None

    @property
    def size(self) -> int:
        return self.end - self.start


class _Shard:
    def __init__(self, url: str, bucket: str, key: str, size: Optional[int], etag: Optional[str]) -> None:
        self.url, self.bucket, self.key = url, bucket, key
        self.size, self.etag = size, etag
        self.parts: list[_Part] = []
        self.opened = False
        self.named = 1  # calls of prefetch() that named it and did not forget it yet
        self.head_sent = False
        self.error: Optional[BaseException] = None
        self.dropped = False
        self.next_todo = 0  # no part before this index is todo

    def layout(self, part_size: int) -> None:
        assert self.size is not None
        self.parts = [_Part(self, i, s, min(s + part_size, self.size)) for i, s in enumerate(range(0, self.size, part_size))]


class ShardFetcher:
    """Fetches S3 shards whole into memory, the one being read and the next ones, within `memory_budget` bytes.

    `storage_options` are s3fs's (endpoint_url, region_name, profile, config_kwargs...). `target_rate` (bytes/s)
    is what in flight is sized for; `max_in_flight` caps it. `initial_in_flight` (default: from `target_rate`
    and S3's typical latency) is where it starts. `shards_ahead` caps how many named shards are fetched ahead of
    the ones open. `client` (a boto3 S3 client) replaces the one built from `storage_options`.
    """

    def __init__(
        self,
        storage_options: Optional[Mapping[str, Any]] = None,
        *,
        memory_budget: int = MEMORY_BUDGET,
        target_rate: float = TARGET_RATE,
        part_size: int = PART_SIZE,
        initial_in_flight: Optional[int] = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        shards_ahead: int = SHARDS_AHEAD,
        retries: Optional[int] = None,
        adaptive: bool = True,
        client: Any = None,
    ) -> None:
        self.part_size = max(int(part_size), 1)
        self.memory_budget = int(memory_budget)
        if self.memory_budget < self.part_size:
            raise ValueError(f"memory_budget ({memory_budget}) must hold at least one part ({part_size} bytes)")
        self.target_rate = float(target_rate)
        budget_parts = self.memory_budget // self.part_size
        # half the budget at most in flight: the rest holds fetched parts waiting for the reader
        self.cap = max(1, min(int(max_in_flight), max(budget_parts // 2, 1)))
        if initial_in_flight is None:
            part_time = PRIOR_FIRST_BYTE + self.part_size / PRIOR_STREAM_RATE
            initial_in_flight = math.ceil(self.target_rate * part_time / self.part_size)
        self.depth = max(1, min(int(initial_in_flight), self.cap))
        self.shards_ahead = max(int(shards_ahead), 0)
        # tries per part, as for every S3 request (storeoptions.s3_attempts; botocore's own retries are off for these
        # requests: they are retried, and logged, here)
        self.retries = max(int(retries), 1) if retries is not None else s3_attempts(storage_options)
        self.adaptive = adaptive
        _quiet_botocore()
        self._client = client if client is not None else _client_from_options(storage_options, 2 * self.cap + 8)
        self._pool = ThreadPoolExecutor(max_workers=2 * self.cap + 8, thread_name_prefix="wdsembed-s3fetch")
        self._cv = threading.Condition()
        self._open: list[_Shard] = []  # being read, in open order (first = first served)
        self._ahead: list[_Shard] = []  # named by prefetch(), in order
        self._closed = False
        self._stopping = threading.Event()  # set by close(): cuts retry backoffs short
        # accounting
        self.reserved = 0  # bytes reserved for requests in flight and parts fetched but not yet read
        self.peak_bytes = 0
        self.in_flight = 0  # part requests in flight (first tries, not duplicates)
        self._flight: set = set()  # parts in flight
        self.stats: collections.Counter = collections.Counter()
        self.depth_history: list[tuple[float, int]] = [(time.monotonic(), self.depth)]
        # measurements
        self._received = 0  # body bytes received, all requests
        self._first_byte: Optional[float] = None  # EWMA seconds, request sent -> headers
        self._stream_rate: Optional[float] = None  # EWMA bytes/s of one request's body
        self._part_time: Optional[float] = None  # EWMA seconds per full part
        self._ctl = {"window": None, "last_rate": None, "grew_from": None, "ceiling": self.cap, "ceiling_at": 0.0}
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="wdsembed-s3fetch-monitor")
        self._monitor.start()
        _LIVE.add(self)

    # -- public API

    def prefetch(self, urls: Iterable[str]) -> None:
        """Name the shards that will be opened next, in order; they are fetched as the budget allows."""
        with self._cv:
            ahead = {s.url: s for s in self._ahead}
            known = {s.url for s in self._open}
            for url in dict.fromkeys(self._url(url) for url in urls):
                if url in ahead:
                    ahead[url].named += 1  # another caller's look-ahead too: one forget() does not drop it
                elif url not in known:
                    bucket, key = _split(url)
                    ahead[url] = _Shard(url, bucket, key, None, None)
                    self._ahead.append(ahead[url])
            self._pump()

    def forget(self, urls: Iterable[str]) -> None:
        """Drop the shards named by prefetch() that will not be opened (their caller stopped first): their memory
        goes back, their requests stop. Shards already opened are not touched, nor those that another prefetch()
        call named as well and did not forget (two runs' tasks on one worker reading the same shard)."""
        names = {self._url(url) for url in urls}
        stale: list = []  # bodies of the dropped shards' requests, stopped once the lock is let go
        with self._cv:
            for shard in [s for s in self._ahead if s.url in names]:
                shard.named -= 1
                if shard.named > 0:
                    continue
                stale += self._drop(shard)
                self._ahead.remove(shard)
            self._pump()
        _stop_bodies(stale)

    def open(self, url: str, *, size: Optional[int] = None) -> "ShardReader":
        """A file object over the shard at `url` (s3://bucket/key or bucket/key). The other shards named by
        prefetch() stay named, whatever their order: several threads name shards, and one reader opens them in
        its own order (forget() drops those that will not be opened)."""
        url = self._url(url)
        stale: list = []  # bodies of a changed shard's requests, stopped once the lock is let go
        try:
            with self._cv:
                if self._closed:
                    raise ValueError("open on a closed ShardFetcher")
                shard = None
                for i, s in enumerate(self._ahead):
                    if s.url == url:
                        shard = s
                        del self._ahead[i]
                        break
                if shard is None:
                    bucket, key = _split(url)
                    shard = _Shard(url, bucket, key, size, None)
                if size is not None and shard.size is not None and shard.size != size:
                    stale += self._drop(shard)
                    raise ShardChangedError(f"{url}: expected {size} bytes, the object has {shard.size}")
                if shard.size is None and size is not None:
                    shard.size = int(size)
                shard.opened = True
                self._open.append(shard)
                self._pump()
        finally:
            _stop_bodies(stale)
        return ShardReader(self, shard)

    def close(self) -> None:
        """Stop every request at once (stalled ones included) and end the readers' waits."""
        stale: list = []
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._stopping.set()
            for shard in self._open + self._ahead:
                stale += self._drop(shard)
            self._open, self._ahead = [], []
            self._cv.notify_all()
        _stop_bodies(stale)
        self._pool.shutdown(wait=False, cancel_futures=True)
        _LIVE.discard(self)

    def __enter__(self) -> "ShardFetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def snapshot(self) -> dict:
        """Counters and measurements, for logs, tests and benchmarks."""
        with self._cv:
            return {"depth": self.depth, "in_flight": self.in_flight, "reserved": self.reserved,
                    "peak_bytes": self.peak_bytes, "budget": self.memory_budget, "first_byte_s": self._first_byte,
                    "stream_rate": self._stream_rate, "part_time_s": self._part_time, **self.stats}

    @staticmethod
    def _url(url: str) -> str:
        return url if url.startswith(_S3_SCHEMES) else "s3://" + url.lstrip("/")

    # -- scheduling (under self._cv)

    def _active(self) -> list[_Shard]:
        return self._open + self._ahead[: self.shards_ahead]

    def _reserve(self, n: int) -> None:
        self.reserved += n
        self.peak_bytes = max(self.peak_bytes, self.reserved)

    def _release(self, n: int) -> None:
        self.reserved -= n

    def _drop(self, shard: _Shard) -> list:
        """Forget a shard: its fetched parts go, requests in flight finish into nothing. Returns the bodies of those
        requests, for the caller to stop (_stop_bodies) once it has let go of the lock."""
        shard.dropped = True
        bodies = []
        for part in shard.parts:
            if part.state == "done":
                self._release(part.size)
                part.data = None
            bodies += part.bodies
            if part.state != "flight":
                part.state = "read"
        shard.next_todo = len(shard.parts)
        return bodies

    def _pump(self) -> None:
        """Send requests while in flight is under the depth and the budget allows, in priority order."""
        if self._closed:
            return
        active = self._active()
        for shard in active:
            if shard.size is None and not shard.head_sent and shard.error is None:
                shard.head_sent = True
                self._pool.submit(self._head, shard)
            elif shard.size and not shard.parts:
                shard.layout(self.part_size)
        for rank, shard in enumerate(active):
            if shard.error is not None or shard.dropped or not shard.parts:
                continue
            while self.in_flight < self.depth:
                part = self._next_todo(shard)
                if part is None:
                    break
                if self.reserved + part.size > self.memory_budget and not self._evict(active[rank + 1:], part.size):
                    return  # the budget is full of parts that rank before or equal to this one
                self._reserve(part.size)
                self._issue(shard, part, duplicate=False)
            if self.in_flight >= self.depth:
                return

    def _next_todo(self, shard: _Shard) -> Optional[_Part]:
        for i in range(shard.next_todo, len(shard.parts)):
            if shard.parts[i].state == "todo":
                shard.next_todo = i
                return shard.parts[i]
        shard.next_todo = len(shard.parts)
        return None

    def _evict(self, lower: list[_Shard], need: int) -> bool:
        """Free `need` bytes by dropping fetched parts of shards further ahead (latest first)."""
        for shard in reversed(lower):
            if shard.opened:
                continue  # a reader waits on it: never take its parts away
            for part in reversed(shard.parts):
                if self.reserved + need <= self.memory_budget:
                    return True
                if part.state == "done":
                    part.state, part.data = "todo", None
                    self._release(part.size)
                    shard.next_todo = min(shard.next_todo, part.index)
                    self.stats["evicted"] += 1
        return self.reserved + need <= self.memory_budget

    def _issue(self, shard: _Shard, part: _Part, *, duplicate: bool) -> None:
        now = time.monotonic()
        if not duplicate:
            self.in_flight += 1
            part.state, part.issued = "flight", now
            self._flight.add(part)
        part.progress = now
        part.chains += 1
        self._pool.submit(self._fetch_part, shard, part, duplicate)

    # -- requests (pool threads)

    def _head(self, shard: _Shard) -> None:
        attempt = 0
        while not (self._closed or shard.dropped):
            try:
                resp = self._client.head_object(Bucket=shard.bucket, Key=shard.key)
            except BaseException as exc:  # noqa: BLE001 - classified
                fail = _classify(exc)
                if self._may_retry(shard, None, fail, attempt):
                    attempt += 1
                    continue
                with self._cv:
                    shard.error = shard.error or self._error_for(shard, None, fail)
                    self._cv.notify_all()
                return
            with self._cv:
                shard.size = int(resp["ContentLength"])
                shard.etag = shard.etag or resp.get("ETag")
                if shard.etag != resp.get("ETag"):
                    shard.error = ShardChangedError(f"{shard.url} changed before it was read (ETag)")
                self._pump()
                self._cv.notify_all()
            return

    def _fetch_part(self, shard: _Shard, part: _Part, duplicate: bool) -> None:
        winner = False
        try:
            attempt = 0
            while True:
                if self._closed or shard.dropped or shard.error is not None or part.state != "flight":
                    return
                try:
                    data = self._get(shard, part)
                except BaseException as exc:  # noqa: BLE001 - classified
                    fail = _classify(exc)
                    if part.state != "flight" or shard.dropped:
                        return  # another request for it won (and closed this one's body), or nobody wants it
                    if fail.kind == "SlowDown":
                        self._slow_down()
                    if self._may_retry(shard, part, fail, attempt):
                        attempt += 1
                        continue
                    with self._cv:
                        # a permanent error fails the shard now; a transient one only once no twin is left
                        if not fail.retry or part.chains <= 1:
                            shard.error = shard.error or self._error_for(shard, part, fail)
                            self._cv.notify_all()
                    return
                twins: list = []
                with self._cv:
                    if part.state == "flight" and not shard.dropped:
                        part.state, part.data = "done", data
                        self._flight.discard(part)
                        winner = True
                        if duplicate:
                            self.stats["duplicate_wins"] += 1
                        twins = list(part.bodies)
                        self.in_flight -= 1
                        self._cv.notify_all()
                _stop_bodies(twins)  # a straggling twin stops now
                return
        finally:
            with self._cv:
                part.chains -= 1
                if not winner:
                    self._release(part.size)  # this request's reservation; a winner's now holds the data
                if part.chains == 0 and part.state == "flight":
                    # every request for it ended without the data: its shard failed or went away
                    self.in_flight -= 1
                    self._flight.discard(part)
                    part.state = "todo" if not shard.dropped and shard.error is None else "read"
                    if part.state == "todo":
                        shard.next_todo = min(shard.next_todo, part.index)
                self._pump()

    def _read_range(self, shard: _Shard, start: int, end: int) -> bytes:
        """Bytes [start, end) of the shard's object, of the version being read (If-Match on its ETag), fetched now
        for a read back (a hard link's target, which the reader has passed). Outside the depth and the budget (one
        member's bytes, handed straight to the caller) and out of the measurements that size them."""
        part = _Part(shard, -1, start, end)
        part.state = "flight"
        attempt = 0
        while True:
            try:
                return self._get(shard, part, measure=False)
            except BaseException as exc:  # noqa: BLE001 - classified
                fail = _classify(exc)
                if not self._may_retry(shard, part, fail, attempt):
                    raise self._error_for(shard, part, fail) from None
                attempt += 1

    def _get(self, shard: _Shard, part: _Part, *, measure: bool = True) -> bytes:
        """One GET of the part's bytes. `measure`: count it in the latency and rate that size in flight."""
        kwargs = {"Bucket": shard.bucket, "Key": shard.key, "Range": f"bytes={part.start}-{part.end - 1}"}
        etag = shard.etag
        if etag:
            kwargs["IfMatch"] = etag
        sent = part.progress = time.monotonic()
        resp = self._client.get_object(**kwargs)
        headers_at = time.monotonic()
        rid = resp.get("ResponseMetadata", {}).get("RequestId", "")
        body = resp["Body"]
        with self._cv:
            superseded = part.state != "flight" or shard.dropped  # a twin won (or nobody wants it) meanwhile
            if not superseded:
                part.bodies.add(body)  # from now on a winning twin or a drop stops it
            if measure:
                self._first_byte = _ewma(self._first_byte, headers_at - sent)
        if superseded:
            _close_quietly(body)
            raise _Failure("Superseded", False, rid)
        try:
            got_etag = resp.get("ETag")
            total = _content_range_total(resp.get("ContentRange"))
            with self._cv:
                if shard.etag is None:
                    shard.etag = got_etag  # the first answer fixes the version; every later one must match
                if got_etag != shard.etag or (total is not None and total != shard.size):
                    raise ShardChangedError(
                        f"{shard.url} changed while being read (ETag {shard.etag} -> {got_etag}, size "
                        f"{shard.size} -> {total}); read it again from the start")
            # One read of the part's size: http.client fills one bytes object straight from the socket, the GIL
            # let go while it waits. Reading in chunks (to watch progress) cost twice the CPU per byte here; stalls
            # are caught by time instead. Not read() without a size: since the security fix for large bodies
            # (CPython gh-119451, in 3.12 and later), http.client then gathers a body of several MB in a BytesIO
            # in growing steps and copies it out, all holding the GIL: 30% of a GPU worker's GIL samples on an
            # H200 host, taken from the thread that feeds the GPU.
            data = body.read(part.size)
            if len(data) == part.size and body.read(1):
                raise _Failure("LongBody", False, rid,
                               f"more than the {part.size} bytes asked for (does the store ignore Range?)")
            n = len(data)
            if n != part.size:
                raise _Failure("ShortRead", True, rid, f"{n} of {part.size} bytes")
            done = time.monotonic()
            with self._cv:
                if not measure:
                    self.stats["read_backs"] += 1
                    return data
                self._received += n
                self._part_time = _ewma(self._part_time, done - sent)
                if done > headers_at:
                    self._stream_rate = _ewma(self._stream_rate, n / (done - headers_at))
                self.stats["requests"] += 1
                self.stats["bytes"] += n
            return data
        except _Failure as f:
            f.request_id = f.request_id or rid
            raise
        except ShardChangedError:
            raise
        except BaseException as exc:  # noqa: BLE001 - keep the request id with it
            fail = _classify(exc)
            fail.request_id = fail.request_id or rid
            raise fail from None
        finally:
            with self._cv:
                part.bodies.discard(body)
            _close_quietly(body)

    def _may_retry(self, shard: _Shard, part: Optional[_Part], fail: _Failure, attempt: int) -> bool:
        """Log the failure; sleep the backoff and say True when it is worth another try."""
        self.stats[f"fail_{fail.kind}"] += 1
        if not fail.retry or attempt + 1 >= self.retries or self._closed:
            return False
        delay = min(0.1 * 2**attempt, 5.0) * (0.5 + random.random())  # jittered: retries do not march together
        if fail.kind == "SlowDown":
            delay = max(delay, 0.5)
        self.stats["retries"] += 1
        what = f"bytes {part.start}-{part.end - 1}" if part else "HEAD"
        log.warning("s3 %s s3://%s/%s %s failed (%s, request id %s); retry %d in %.2fs", "GET" if part else "HEAD",
                    shard.bucket, shard.key, what, fail.kind, fail.request_id or "-", attempt + 1, delay)
        if part is not None:
            part.progress = time.monotonic() + delay  # a backoff is not a stall
        return not self._stopping.wait(delay)  # close() ends the wait: a process exit joins these threads

    def _error_for(self, shard: _Shard, part: Optional[_Part], fail: _Failure) -> OSError:
        what = f" bytes {part.start}-{part.end - 1}" if part else ""
        rid = f", request id {fail.request_id}" if fail.request_id else ""
        if fail.kind == "Changed":
            return ShardChangedError(fail.detail)
        if fail.kind in ("PreconditionFailed", "InvalidRange") or fail.status in (412, 416):
            return ShardChangedError(f"{shard.url} changed while being read (the store answered {fail.kind} to"
                                     f"{what}{rid}); read it again from the start")
        if fail.kind in ("NoSuchKey", "NotFound", "NoSuchBucket", "404"):
            return FileNotFoundError(f"{shard.url}: not found ({fail.kind}{rid})")
        if fail.kind in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403") \
                or fail.status == 403:
            from wdsembed.config import credentials_hint

            return PermissionError(f"{shard.url}: access denied ({fail.kind}{rid}); {credentials_hint()}")
        if fail.kind == "NoCredentials":
            from wdsembed.config import credentials_hint

            return PermissionError(f"{shard.url}: no usable credentials; {credentials_hint()}")
        detail = f" ({fail.detail})" if fail.detail else ""
        if fail.kind == "LongBody" or (not fail.retry and 400 <= fail.status < 500):
            # Only the store's own final answers: a read cut short by the fetcher's close ("Superseded") or an error
            # nobody classified stays a FetchError, which the task's retries may clear.
            return FetchRefusedError(f"{shard.url}{what}: {fail.kind}{rid}{detail}; not retried: asking again "
                                     "cannot change this answer")
        tries = f" after {self.retries} tries" if fail.retry else ""
        return FetchError(f"{shard.url}{what}: {fail.kind}{rid}{tries}{detail}")

    # -- adaptation and stragglers (monitor thread)

    def _slow_down(self) -> None:
        with self._cv:
            now = time.monotonic()
            if now - self._ctl.get("slowed_at", 0.0) < (self._part_time or 0.5):
                return  # one halving per round of requests, not one per request of a burst
            self._ctl["slowed_at"] = now
            new = max(1, self.depth // 2)
            if new < self.depth:
                self._set_depth(new, "SlowDown")
                self._ctl["ceiling"], self._ctl["ceiling_at"] = new, time.monotonic()

    def _set_depth(self, new: int, why: str) -> None:
        if new != self.depth:
            log.debug("s3 fetch: %d requests in flight (was %d): %s", new, self.depth, why)
            self.depth = new
            self.depth_history.append((time.monotonic(), new))
            self._pump()

    def _watch(self) -> None:
        while True:
            time.sleep(0.025)
            with self._cv:
                if self._closed:
                    return
                now = time.monotonic()
                self._stragglers(now)
                if self.adaptive:
                    self._adapt(now)

    def _stragglers(self, now: float) -> None:
        typical = self._part_time or (PRIOR_FIRST_BYTE + self.part_size / PRIOR_STREAM_RATE)
        slow_after = max(3 * typical, 2.0)
        for part in list(self._flight):
            if part.chains > 1 or part.shard.dropped:
                continue
            # part.progress: when its current try began (a backoff pushes it later)
            if now - part.progress > slow_after:
                if self.reserved + part.size > self.memory_budget:
                    continue
                self._reserve(part.size)
                self.stats["duplicates"] += 1
                shard = part.shard
                log.info("s3 GET s3://%s/%s bytes %d-%d is slow (%.1fs): asking again",
                         shard.bucket, shard.key, part.start, part.end - 1, now - part.issued)
                self._issue(shard, part, duplicate=True)

    def _adapt(self, now: float) -> None:
        ctl = self._ctl
        if ctl["ceiling"] < self.cap and now - ctl["ceiling_at"] > 30:
            ctl["ceiling"] = self.cap  # conditions change: probe again now and then
        saturated = self.in_flight >= self.depth
        win = ctl["window"]
        if win is None:
            if saturated and self._first_byte is not None and now >= ctl.get("wait_until", 0.0):
                # measure once the requests sent at this depth have begun to answer
                ctl["window"] = {"start": now, "bytes": self._received, "ok": True}
            return
        win["ok"] = win["ok"] and saturated
        length = max(0.1, min(0.5, (self._part_time or 0.2) / 2))
        if now - win["start"] < length:
            return
        ctl["window"] = None
        if not win["ok"]:
            return  # the reader or the budget held it back: depth was not the limit
        rate = (self._received - win["bytes"]) / (now - win["start"])
        if ctl["grew_from"] is not None and ctl["last_rate"] is not None and rate < 1.1 * ctl["last_rate"]:
            # the last step up bought nothing: go back, and stay there a while
            old = ctl["grew_from"]
            ctl["ceiling"], ctl["ceiling_at"], ctl["grew_from"] = old, now, None
            self._set_depth(old, f"no gain at {self.depth} ({rate / 1e6:.0f} MB/s)")
            ctl["window"] = None
            return
        ctl["grew_from"] = None
        ctl["last_rate"] = rate
        if rate >= 0.95 * self.target_rate or self.depth >= min(self.cap, ctl["ceiling"]):
            return
        part_time = (self._first_byte or PRIOR_FIRST_BYTE) + self.part_size / (self._stream_rate or PRIOR_STREAM_RATE)
        need = math.ceil(self.target_rate * part_time / self.part_size)
        new = min(self.cap, ctl["ceiling"], max(self.depth + 2, min(need, 2 * self.depth)))
        if new > self.depth:
            ctl["grew_from"] = self.depth
            self._set_depth(new, f"{rate / 1e6:.0f} MB/s < target, model wants {need}")
            # the next window opens once the new requests have had their first byte
            ctl["window"] = None
            ctl["wait_until"] = now + (self._first_byte or PRIOR_FIRST_BYTE)


def _ewma(old: Optional[float], new: float, alpha: float = 0.3) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


_RANGE_TOTAL = re.compile(r"/(\d+)\s*$")


def _content_range_total(value: Optional[str]) -> Optional[int]:
    m = _RANGE_TOTAL.search(value or "")
    return int(m.group(1)) if m else None


def _close_quietly(body: Any) -> None:
    try:
        body.close()
    except Exception:  # noqa: BLE001
        pass


def _stop_bodies(bodies: Iterable[Any]) -> None:
    """Stop response bodies that other threads may be reading, at once. close() alone waits for such a read (it
    needs http.client's buffered-reader lock, held by the blocked read): a stalled body held the closing thread, and
    with it the fetcher, until read_timeout. Shutting the socket's read side first (urllib3 2's
    HTTPResponse.shutdown(), under botocore's StreamingBody) makes the blocked read return now. A body read to its
    end has given its connection back to urllib3's pool: shutdown() refuses it, and close() leaves the connection
    alone. Call it without holding the fetcher's lock."""
    for body in bodies:
        try:
            body._raw_stream.shutdown()
        except Exception:  # noqa: BLE001 - its connection went back to the pool, or not a urllib3 2 response
            pass
        _close_quietly(body)


# ---------------------------------------------------------------------------------------------------------------


class ShardReader(BlockStream):
    """Forward-only binary file over one shard of a ShardFetcher; `read(n)` waits for the parts it needs (its
    blocks are the fetcher's parts). Closing it, or its fetcher, from another thread makes a waiting read() raise
    ValueError: its shard is dropped, and no part of it will come."""

    def __init__(self, fetcher: ShardFetcher, shard: _Shard) -> None:
        self._f, self._shard = fetcher, shard
        self.name = shard.url
        self._buf = b""
        self._pos = 0
        self._offset = 0
        self._next = 0  # next part to take
        self.closed = False

    @property
    def size(self) -> Optional[int]:
        return self._shard.size

    def read_range(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the shard, wherever the forward read is: one ranged GET of the same object
        version (If-Match on its ETag), so a shard rewritten meanwhile raises ShardChangedError. For a hard link's
        target (shards.iter_samples), which the reader has already passed and handed over."""
        return self._f._read_range(self._shard, offset, offset + size)

    def _next_block(self) -> bool:
        """Make the next part current; False at the end of the shard."""
        f, shard = self._f, self._shard
        self._buf, self._pos = b"", 0
        with f._cv:
            while True:
                if self.closed:  # by another thread while this one waited
                    raise ValueError(f"{shard.url}: read of a closed ShardReader")
                if shard.error is not None:
                    raise shard.error
                if f._closed:
                    raise ValueError(f"{shard.url}: the fetcher was closed")
                if shard.dropped:  # no part of it will come
                    raise ValueError(f"{shard.url}: the fetcher dropped this shard")
                if shard.size is not None:
                    if self._next >= len(shard.parts) and (shard.parts or shard.size == 0):
                        return False
                    if shard.parts and shard.parts[self._next].state == "done":
                        part = shard.parts[self._next]
                        data, part.data, part.state = part.data, None, "read"
                        f._release(part.size)  # the caller owns these bytes now
                        self._next += 1
                        f._pump()
                        break
                f._cv.wait(0.5)
        self._buf = data
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._buf = b""
        f = self._f
        with f._cv:
            stale = f._drop(self._shard)
            if self._shard in f._open:
                f._open.remove(self._shard)
            f._pump()
            f._cv.notify_all()  # a read() waiting in another thread raises now
        _stop_bodies(stale)  # its requests still in flight (stalled ones too) end now



# ---------------------------------------------------------------------------------------------------------------
# one fetcher per process and set of storage options


_FETCHERS: dict[int, tuple[Any, ShardFetcher]] = {}  # id(fs) -> (weak reference to fs, its fetcher)
# Reentrant: _forget runs from weakref.finalize, i.e. inside whatever garbage collection frees an old s3fs
# instance, and a collection can start at any allocation, also in a thread that holds this lock (fetcher_for
# building a boto3 client, configure, _close_all). With a plain Lock that thread waited on itself forever: a
# test_s3 run hung so, intermittently, in fetcher_for (the moment depends on when collections happen to run).
_FETCHERS_LOCK = threading.RLock()
_DEFAULTS: dict[str, Any] = {}


def configure(**kwargs: Any) -> None:
    """Constructor arguments (memory_budget=..., target_rate=...) for the fetchers that fetcher_for makes from
    now on; the existing ones are closed."""
    with _FETCHERS_LOCK:
        _DEFAULTS.clear()
        _DEFAULTS.update(kwargs)
        for _, f in list(_FETCHERS.values()):  # a copy: _forget may remove entries meanwhile (see the lock)
            f.close()
        _FETCHERS.clear()


_LIVE: "weakref.WeakSet[ShardFetcher]" = weakref.WeakSet()  # the process's fetchers not closed yet


def _close_all() -> None:
    # requests in flight for shards nobody will read must not hold the interpreter's exit
    with _FETCHERS_LOCK:
        for f in list(_LIVE):  # a copy: _forget may close some meanwhile (see the lock)
            f.close()
        _FETCHERS.clear()


# Run before concurrent.futures joins its pools' threads at exit (threading's exit hooks run before atexit's, the
# latest registered first; concurrent.futures registers its own this way): an atexit hook ran only after that join,
# so an exit waited for every request in flight, stalled ones to their read_timeout, and meanwhile the monitor
# thread, still duplicating stragglers, logged "cannot schedule new futures after shutdown".
getattr(threading, "_register_atexit", atexit.register)(_close_all)


def fetcher_for(fs: Any) -> ShardFetcher:
    """The fetcher of this process for the s3fs filesystem `fs` (its storage options, and credentials as they
    were when `fs` was made: a new s3fs instance, e.g. after s3fs's instance cache is cleared, gets a new one)."""
    import weakref

    with _FETCHERS_LOCK:
        entry = _FETCHERS.get(id(fs))
        if entry is not None and entry[0]() is fs and not entry[1]._closed:
            return entry[1]
        f = ShardFetcher(fs.storage_options, **{"retries": getattr(fs, "retries", None), **_DEFAULTS})
        _FETCHERS[id(fs)] = (weakref.ref(fs), f)
        weakref.finalize(fs, _forget, id(fs), f)
        return f


def _after_fork() -> None:
    # a forked child has none of the parent's threads: its fetchers are dead, start afresh
    global _FETCHERS_LOCK
    _FETCHERS_LOCK = threading.RLock()
    _FETCHERS.clear()
    _LIVE.clear()  # closing them at exit would take locks that the parent's threads may have held


os.register_at_fork(after_in_child=_after_fork)


def _forget(key: int, fetcher: ShardFetcher) -> None:
    fetcher.close()
    with _FETCHERS_LOCK:
        if key in _FETCHERS and _FETCHERS[key][1] is fetcher:
            del _FETCHERS[key]
