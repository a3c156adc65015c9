"""A small, fast S3-compatible server and a shaping/fault proxy, both asyncio, on 127.0.0.1 only.

    server = S3Folder(root).start()           # serves ROOT/<bucket>/<key> at server.endpoint (path-style)
    proxy = ShapingProxy(server.endpoint, first_byte=0.05, rate=40e6).start()
    ... endpoint_url=proxy.endpoint ...
    proxy.injected                            # Counter of the faults actually served, by kind
    proxy.stalling                            # stalled bodies it holds silent right now

Only what a shard reader needs: HEAD object, GET object (Range, If-Match), HEAD bucket, ListObjectsV2. ETags
come from the file's (inode, size, mtime), so replacing a file (os.replace) gives new requests a new ETag while
requests already running keep reading the old inode. Bodies go out with sendfile, so the server costs little CPU.

The proxy adds what a real store has and loopback lacks: a first-byte latency per request and a bandwidth cap per
TCP connection, and serves faults on the first try of every `every`-th distinct GET range: S3 error answers
(500, 503 SlowDown), resets, short bodies (full Content-Length, half the bytes, then close) and stalls (half the
body, then nothing for `stall_seconds`). Retries of a faulted request pass through.

`start()` runs either in a thread of this process (tests: counters readable); `spawn()` runs it in a child process
(benchmarks: the harness does not share the client's interpreter lock). `python tests/s3fast.py server|proxy ...`
is that child.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

HOST = "127.0.0.1"
_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
          "<Resource>{resource}</Resource><RequestId>{rid}</RequestId></Error>")
_REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 412: "Precondition Failed", 416: "Requested Range Not Satisfiable",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


async def _read_head(reader: asyncio.StreamReader) -> Optional[tuple[str, str, dict[str, str], bytes]]:
    """(method, target, headers with lowercased names, raw head) of the next request or response; None at EOF."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    first = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return first[0], first[1] if len(first) > 1 else "", headers, raw


def _response(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    out += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def _parse_range(value: str, size: int) -> Optional[tuple[int, int]]:
    """[start, end) for a single `bytes=` range, or None when it cannot be satisfied."""
    spec = value.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None
    a, _, b = spec[len("bytes="):].partition("-")
    if a == "":  # suffix: the last b bytes
        n = int(b)
        return (max(size - n, 0), size) if n > 0 and size > 0 else None
    start = int(a)
    end = min(int(b) + 1, size) if b else size
    return (start, end) if start < size and start < end else None


def _etag(st: os.stat_result) -> str:
    return '"' + hashlib.md5(f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest() + '"'


class _LoopThread:
    """Runs one asyncio server in a daemon thread with its own event loop; stop() ends every connection."""

    endpoint = ""

    def start(self):
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._stopping = asyncio.Event()
            server = await asyncio.start_server(self._client, HOST, 0, backlog=512, limit=1 << 16)
            self.endpoint = f"http://{HOST}:{server.sockets[0].getsockname()[1]}"
            ready.set()
            await self._stopping.wait()
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        def main() -> None:
            try:
                self._loop.run_until_complete(serve())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name=type(self).__name__)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def stop(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _client(self, reader, writer) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# the server


class S3Folder(_LoopThread):
    """S3 over a folder: ROOT/<bucket>/<key>. With `access_key`, a request must be signed with that key id (the
    signature itself is not checked: what matters here is that the client sent the key from its environment).
    `requests` counts requests by method, `ranges` lists the (key, Range) of every GET."""

    def __init__(self, root: str | os.PathLike, *, access_key: Optional[str] = None,
                 ignore_if_match: bool = False, ignore_range: bool = False) -> None:
        self.root = Path(root)
        self.access_key = access_key
        self.ignore_if_match = ignore_if_match  # as some S3-compatible stores do: the client must compare ETags
        self.ignore_range = ignore_range  # a store (or proxy) that answers every GET with the whole object
        self.requests: collections.Counter = collections.Counter()  # by method
        self.ranges: list[tuple[str, Optional[str]]] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                method, target, headers, _ = head
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                self.requests[method] += 1
                if not await self._answer(writer, method, target, headers):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _error(self, writer, method: str, status: int, code: str, message: str, resource: str) -> bool:
        rid = uuid.uuid4().hex[:16].upper()
        body = b"" if method == "HEAD" else _ERROR.format(code=code, message=escape(message),
                                                           resource=escape(resource), rid=rid).encode()
        writer.write(_response(status, [("Content-Type", "application/xml"), ("x-amz-request-id", rid),
                                        ("Content-Length", str(len(body)))]) + body)
        await writer.drain()
        return True

    def _authorized(self, headers: dict[str, str], query: dict[str, str]) -> bool:
        if self.access_key is None:
            return True
        auth = headers.get("authorization", "") or query.get("X-Amz-Credential", "")
        return f"Credential={self.access_key}/" in auth or query.get("X-Amz-Credential", "").startswith(
            self.access_key + "/")

    async def _answer(self, writer, method: str, target: str, headers: dict[str, str]) -> bool:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        path = unquote(parts.path).lstrip("/")
        bucket, _, key = path.partition("/")
        if not self._authorized(headers, query):
            return await self._error(writer, method, 403, "InvalidAccessKeyId",
                                     "The AWS Access Key Id you provided does not exist in our records.", path)
        if not bucket or ".." in path.split("/") or not (self.root / bucket).is_dir():
            return await self._error(writer, method, 404, "NoSuchBucket", "The specified bucket does not exist",
                                     bucket)
        if not key:
            if method == "HEAD":
                writer.write(_response(200, [("Content-Length", "0"), ("x-amz-bucket-region", "us-east-1")]))
                await writer.drain()
                return True
            if method == "GET" and query.get("list-type") == "2":
                return await self._list(writer, bucket, query)
            if method == "GET" and "location" in query:
                body = b'<?xml version="1.0" encoding="UTF-8"?><LocationConstraint/>'
                writer.write(_response(200, [("Content-Length", str(len(body)))]) + body)
                await writer.drain()
                return True
            return await self._error(writer, method, 501, "NotImplemented", "not in this test server", bucket)
        if method not in ("GET", "HEAD"):
            return await self._error(writer, method, 501, "NotImplemented", "read-only test server", path)
        try:
            f = open(self.root / bucket / key, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return await self._error(writer, method, 404, "NoSuchKey", "The specified key does not exist.", path)
        if method == "GET":
            self.ranges.append((key, headers.get("range")))
        with f:
            st = os.fstat(f.fileno())  # the ETag of the very inode this request reads
            etag = _etag(st)
            if "if-match" in headers and headers["if-match"] not in ("*", etag) and not self.ignore_if_match:
                return await self._error(writer, method, 412, "PreconditionFailed",
                                         "At least one of the pre-conditions you specified did not hold", path)
            size = st.st_size
            start, end, status = 0, size, 200
            common = [("ETag", etag), ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
                      ("Accept-Ranges", "bytes"), ("Content-Type", "application/octet-stream"),
                      ("x-amz-request-id", uuid.uuid4().hex[:16].upper())]
            if "range" in headers and method == "GET" and not self.ignore_range:
                rng = _parse_range(headers["range"], size)
                if rng is None:
                    return await self._error(writer, method, 416, "InvalidRange",
                                             "The requested range is not satisfiable", path)
                (start, end), status = rng, 206
                common.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
            writer.write(_response(status, common + [("Content-Length", str(end - start))]))
            if method == "HEAD" or end == start:
                await writer.drain()
                return True
            await writer.drain()
            loop = asyncio.get_running_loop()
            await loop.sendfile(writer.transport, f, start, end - start)
        return True

    async def _list(self, writer, bucket: str, query: dict[str, str]) -> bool:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        base = self.root / bucket
        keys, prefixes = [], set()
        for path in sorted(base.rglob("*")):
            if not path.is_file():
                continue
            key = path.relative_to(base).as_posix()
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                continue
            st = path.stat()
            keys.append((key, st))
        items = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>"
            f"{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(st.st_mtime))}</LastModified>"
            f"<ETag>{escape(_etag(st))}</ETag><Size>{st.st_size}</Size><StorageClass>STANDARD</StorageClass>"
            f"</Contents>" for k, st in keys)
        items += "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes))
        body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
                f"<MaxKeys>1000</MaxKeys><Delimiter>{escape(delimiter)}</Delimiter><IsTruncated>false"
                f"</IsTruncated>{items}</ListBucketResult>").encode()
        writer.write(_response(200, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]) + body)
        await writer.drain()
        return True


# ---------------------------------------------------------------------------------------------------------------
# the proxy

FAULTS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
ALL_FAULTS = ("slowdown", "internal", "reset", "short", "stall")


class ShapingProxy(_LoopThread):
    """An HTTP/1.1 proxy in front of `target` that waits `first_byte` seconds before each answer, sends at most
    `rate` bytes/s per client connection (0: no cap), and fails the first try of every `every`-th distinct
    (method, path, Range) among `methods`, cycling through `kinds` (see the module's doc). `stall_seconds` is how
    long a stalled body stays silent before the connection is closed; `stalling` counts those silent now (a client
    that gives up on one closes its end, which the proxy notices only when the stall ends)."""

    CHUNK = 256 << 10  # bytes per write: few enough wake-ups at hundreds of MB/s

    def __init__(self, target: str, *, first_byte: float = 0.0, rate: float = 0.0, every: int = 0,
                 kinds: Sequence[str] = ALL_FAULTS, stall_seconds: float = 5.0, methods: Sequence[str] = ("GET",),
                 fault_seed: int = 0) -> None:
        t = urlsplit(target)
        self.target = (t.hostname, t.port)
        self.first_byte = float(first_byte)
        self.rate = float(rate)
        self.every = int(every)
        self.kinds = tuple(kinds)
        self.stall_seconds = float(stall_seconds)
        self.methods = tuple(methods)
        self.injected: collections.Counter = collections.Counter()
        self.stalling = 0
        self.requests = 0
        self.connections = 0
        self.max_connections_open = 0
        self._open = 0
        self._seen: set = set()
        self._distinct = fault_seed

    def choose(self, method: str, target: str, rng: Optional[str]) -> Optional[str]:
        """The fault for this request, or None to pass it on."""
        self.requests += 1
        if not self.every or method not in self.methods:
            return None
        parts = urlsplit(target)
        query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if not k.lower().startswith("x-amz-"))
        signature = (method, parts.path, tuple(query), rng)
        if signature in self._seen:
            return None  # a retry: let it through
        self._seen.add(signature)
        self._distinct += 1
        if self._distinct % self.every:
            return None
        kind = self.kinds[(self._distinct // self.every - 1) % len(self.kinds)]
        self.injected[kind] += 1
        return kind

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open += 1
        self.max_connections_open = max(self.max_connections_open, self._open)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up: Optional[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = None
        # the connection's send budget: bytes it may have sent by now, at `rate`
        bucket = {"t": time.monotonic(), "sent": 0}
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                method, target, headers, raw = head
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                arrived = time.monotonic()
                fault = self.choose(method, target, headers.get("range"))
                if fault == "reset":
                    _reset(writer)
                    return
                if self.first_byte:
                    await asyncio.sleep(max(0.0, arrived + self.first_byte - time.monotonic()))
                if fault in FAULTS:
                    status, code, message = FAULTS[fault]
                    data = _ERROR.format(code=code, message=message, resource=escape(target),
                                         rid="PROXY" + uuid.uuid4().hex[:11].upper()).encode()
                    writer.write(_response(status, [("Content-Type", "application/xml"),
                                                    ("Content-Length", str(len(data)))]) + data)
                    await writer.drain()
                    continue
                if up is None:
                    up = await asyncio.open_connection(*self.target, limit=1 << 20)
                up[1].write(raw + body)
                resp = await _read_head(up[0])
                if resp is None:
                    break
                _, status, rheaders, rraw = resp
                length = 0 if method == "HEAD" else int(rheaders.get("content-length") or 0)
                writer.write(rraw)
                bucket = {"t": time.monotonic(), "sent": 0}  # the cap starts with the body
                cut = length // 2 if fault in ("short", "stall") else length
                sent = await self._pump(up[0], writer, cut, bucket)
                if sent < cut:
                    break
                if fault == "short":
                    _reset(writer)
                    return
                if fault == "stall":
                    await writer.drain()
                    self.stalling += 1
                    try:
                        await asyncio.sleep(self.stall_seconds)
                    finally:
                        self.stalling -= 1
                    _reset(writer)
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._open -= 1
            if up is not None:
                up[1].close()
            writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int, bucket: dict) -> int:
        sent = 0
        while sent < n:
            chunk = await src.read(min(self.CHUNK, n - sent))
            if not chunk:
                break
            dst.write(chunk)
            sent += len(chunk)
            if self.rate:
                bucket["sent"] += len(chunk)
                due = bucket["t"] + bucket["sent"] / self.rate
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await dst.drain()
        return sent


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a dropped connection looks to the client."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


# ---------------------------------------------------------------------------------------------------------------
# in a child process (benchmarks)


class Spawned:
    """A server or proxy of this module running in a child process; `endpoint` once started."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", __file__, *args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"s3fast child did not start: {line!r}")
        self.endpoint = line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> "Spawned":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_server(root: str | os.PathLike, access_key: Optional[str] = None) -> Spawned:
    return Spawned(["server", str(root)] + (["--access-key", access_key] if access_key else []))


def spawn_proxy(target: str, *, first_byte: float = 0.0, rate: float = 0.0) -> Spawned:
    return Spawned(["proxy", target, "--first-byte", str(first_byte), "--rate", str(rate)])


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("root")
    s.add_argument("--access-key")
    x = sub.add_parser("proxy")
    x.add_argument("target")
    x.add_argument("--first-byte", type=float, default=0.0)
    x.add_argument("--rate", type=float, default=0.0)
    a = p.parse_args(argv)
    thing = S3Folder(a.root, access_key=a.access_key) if a.cmd == "server" else \
        ShapingProxy(a.target, first_byte=a.first_byte, rate=a.rate)
    thing.start()
    print(thing.endpoint, flush=True)
    try:
        while True:  # until terminated by the parent (or the parent goes away)
            time.sleep(1)
            if os.getppid() == 1:
                break
    except KeyboardInterrupt:
        pass
    thing.stop()


if __name__ == "__main__":
    main()
