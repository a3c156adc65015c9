"""A real S3-compatible server on loopback for the tests (moto in server mode), with IAM auth enforced, and a
fault-injecting HTTP proxy to put in front of it.

    server = MotoS3(); server.start()          # http://127.0.0.1:<port>, users "admin" and "reader"
    proxy = FaultProxy(server.endpoint, every=2); proxy.start()
    ... storage_options={"endpoint_url": proxy.endpoint} ...
    proxy.injected   # Counter of the faults actually served, by kind
"""
from __future__ import annotations

import collections
import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

REGION = "us-east-1"


class MotoS3:
    """moto's S3 (and IAM) server in a thread of this process. After start(), requests must be signed with the
    keys of a user made here: `admin` may do anything, `reader` may read everything and write only to the
    buckets named in `writable`. Any other key gets 403 InvalidAccessKeyId, as AWS answers."""

    def __init__(self, writable: Sequence[str] = (), *, serial: bool = False) -> None:
        self.writable = tuple(writable)
        # One request at a time. moto checks a conditional PUT's If-None-Match / If-Match and then writes, with
        # nothing held between the two, on one thread per request: two such PUTs at once can both pass, where AWS
        # lets one through. Served one at a time, its answers are as atomic as AWS's (for tests of what relies on
        # them), and slower.
        self.serial = serial
        self.endpoint = ""
        self.admin: tuple[str, str] = ("", "")
        self.reader: tuple[str, str] = ("", "")
        self._server = None

    def start(self) -> "MotoS3":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = (_SerialMotoServer if self.serial else ThreadedMotoServer)(ip_address="127.0.0.1", port=0,
                                                                                  verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        # moto keeps its accounts and its auth switch per process, not per server: start from a clean slate
        # with auth off, whatever an earlier server in this process left behind.
        self._moto_api("reset", b"")
        self._moto_api("reset-auth", b"inf")
        iam = self.boto("iam", ("bootstrap", "bootstrap"))
        self.admin = self._user(iam, "admin", [{"Effect": "Allow", "Action": "*", "Resource": "*"}])
        reader = [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation",
                                                  "s3:ListAllMyBuckets"], "Resource": "*"}]
        if self.writable:
            reader.append({"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
                           "Resource": [f"arn:aws:s3:::{b}/*" for b in self.writable]})
        self.reader = self._user(iam, "reader", reader)
        # From now on every request is authenticated and authorized against IAM.
        self._moto_api("reset-auth", b"0")
        return self

    def _moto_api(self, action: str, data: bytes) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/{action}", data=data, method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        if self._server is not None:
            self._moto_api("reset-auth", b"inf")
            self._moto_api("reset", b"")
            self._server.stop()
            self._server = None

    @staticmethod
    def _user(iam, name: str, statements: list) -> tuple[str, str]:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def boto(self, service: str = "s3", creds: Optional[tuple[str, str]] = None, endpoint: Optional[str] = None):
        import boto3

        key, secret = creds or self.admin
        return boto3.client(service, endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def keys(self, bucket: str) -> list[str]:
        """Every object key in `bucket`, read with the admin's keys straight from the server."""
        s3 = self.boto()
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)


def aws_from_environment_only(monkeypatch, nowhere: str, keys: Optional[tuple[str, str]] = None) -> None:
    """AWS credentials and settings from this test's environment only: nothing from this machine's ~/.aws, no
    profile, endpoint or session token from outside, no instance metadata; `keys` (id, secret) where given.
    `nowhere` is a path that does not exist."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if keys is not None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[1])


def _SerialMotoServer(**kwargs):
    """moto's server on werkzeug's single-threaded server: one request at a time."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class SerialMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(self._ip_address, self._port, app, False, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return SerialMotoServer(**kwargs)


# ---------------------------------------------------------------------------------------------------------------


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "expect", "content-length", "host"}
_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              "<RequestId>fault-proxy</RequestId></Error>")
FAULTS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
    # a conditional write (If-Match, If-None-Match) racing another on the same key: S3 says to try again
    "conflict": (409, "ConditionalRequestConflict", "A conflicting conditional operation is currently in progress "
                 "against this resource. Please try again."),
}


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that fails the first try of every `every`-th distinct
    request (method, path, query, Range), cycling through `kinds`:

    slowdown / internal / unavailable / conflict: an S3 error response (503 SlowDown, 500 InternalError, 503,
    409 ConditionalRequestConflict);
    reset: the connection closed without an answer;
    truncate: a GET answered with its full Content-Length but only half the body, then the connection closed;
    stall: no answer for `stall_seconds` (longer than the client's read timeout), then the real one;
    lost_reply: the request served by the store, then the connection closed without its answer (a write that
    landed, its writer told nothing; aimed by KeyedFaultProxy only).

    Retries of the same request pass (its signature has been seen), so a client that retries loses nothing; with
    `outlast_retries`, they fail too (a fault that lasts longer than the client's retries).
    `injected` counts the faults served, by kind; `requests` counts everything that came through.
    """

    def __init__(self, target: str, *, every: int = 2, kinds: Sequence[str] = ("slowdown", "internal", "reset",
                 "truncate"), stall_seconds: float = 0.0, methods: Sequence[str] = ("GET", "PUT", "HEAD", "POST",
                 "DELETE"), outlast_retries: bool = False) -> None:
        self.target = urlsplit(target)
        self.outlast_retries = outlast_retries
        self.every = max(int(every), 1)
        self.kinds = tuple(kinds)
        self.stall_seconds = stall_seconds
        self.methods = tuple(methods)
        self.injected: collections.Counter = collections.Counter()
        self.requests = 0
        self.enabled = True
        self._seen: set = set()
        self._distinct = 0
        self._owed_truncate = False
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self.endpoint = ""

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="fault-proxy").start()
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def choose(self, method: str, path: str, range_: Optional[str], headers=None) -> Optional[str]:
        """The fault for this request (`headers`: its headers), or None to forward it."""
        parsed = urlsplit(path)
        query = sorted((k, v) for k, v in parse_qsl(parsed.query, keep_blank_values=True)
                       if not k.lower().startswith("x-amz-"))
        signature = (method, parsed.path, urlencode(query), range_)
        with self._lock:
            self.requests += 1
            if not self.enabled or method not in self.methods or (signature in self._seen
                                                                   and not self.outlast_retries):
                return None
            self._seen.add(signature)
            self._distinct += 1
            if self._owed_truncate and method == "GET":
                # a truncate that fell on a request without a body, served now: every kind asked for is served
                # however the client's requests happen to be ordered
                self._owed_truncate = False
                self.injected["truncate"] += 1
                return "truncate"
            if self._distinct % self.every:
                return None
            kind = self.kinds[(self._distinct // self.every - 1) % len(self.kinds)]
            if kind == "truncate" and method != "GET":
                kind = "slowdown"  # only a body can be cut short: this one gets another fault, the next GET it
                self._owed_truncate = True
            if kind == "stall" and not self.stall_seconds:
                kind = "internal"
            self.injected[kind] += 1
            return kind


class KeyedFaultProxy(FaultProxy):
    """A FaultProxy whose faults are aimed: `rules` are (method, path pattern, kind, n[, header]), the first `n`
    requests of that method whose path matches the pattern (re.search), and that carry `header` where given (a
    conditional PUT's `If-Match`, not `If-None-Match`), get `kind` (every one where n is None), retries included;
    everything else is forwarded unchanged. A listing's path is `/bucket/<its prefix>`, as CountingProxy records
    it: a listing of one prefix can be aimed at."""

    def __init__(self, target: str, rules: Sequence[tuple]) -> None:
        super().__init__(target, every=1)
        self.rules = [list(rule) for rule in rules]

    def choose(self, method: str, path: str, range_: Optional[str], headers=None) -> Optional[str]:
        key = _where(method, path)
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                want, pattern, kind, left, header = (rule + [None])[:5]
                if header is not None and (headers is None or headers.get(header) is None):
                    continue
                if method == want and re.search(pattern, key) and (left is None or left > 0):
                    if left is not None:
                        rule[3] = left - 1
                    self.injected[kind] += 1
                    return kind
        return None


class CountingProxy(FaultProxy):
    """A proxy in front of an S3 endpoint that serves every request unchanged and records each one the store
    receives, from any process that uses its endpoint: `requests_by` counts them by S3 operation (ListObjectsV2,
    GetObject, HeadObject, PutObject, ...), `seen` lists (operation, key) in arrival order."""

    def __init__(self, target: str) -> None:
        super().__init__(target, every=1)
        self.enabled = False
        self.seen: list[tuple[str, str]] = []

    def choose(self, method: str, path: str, range_: Optional[str], headers=None) -> Optional[str]:
        parsed = urlsplit(path)
        query = dict(parse_qsl(parsed.query, keep_blank_values=True))
        with self._lock:
            self.requests += 1
            op = s3_operation(method, parsed.path, query)
            where = _where(method, path)
            if op == "ListObjectsV2" and query.get("max-keys") == "1":
                op = "ListObjectsV2(1)"  # a probe of one key (s3fs's info of a folder), not a listing of the prefix
            self.seen.append((op, where))
        return None

    def requests_by(self, prefix: str = "") -> collections.Counter:
        """Requests by operation, of keys (or listings of prefixes) under `/bucket/prefix` where given."""
        return collections.Counter(op for op, where in self.seen if where.startswith(prefix))

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()


def _where(method: str, path: str) -> str:
    """What a request is of: its object's path (`/bucket/key`), or where it is a listing, `/bucket/<its prefix>`."""
    parsed = urlsplit(path)
    query = dict(parse_qsl(parsed.query, keep_blank_values=True))
    if s3_operation(method, parsed.path, query).startswith("List"):
        return f"{parsed.path.rstrip('/')}/{query.get('prefix', '')}"
    return parsed.path


def s3_operation(method: str, path: str, query: dict) -> str:
    """The S3 operation of a path-style request (`/bucket` or `/bucket/key`); a listing's `where` is its prefix."""
    on_bucket = path.strip("/").count("/") == 0
    if method == "GET" and on_bucket and "uploads" in query:
        return "ListMultipartUploads"
    if method == "GET" and on_bucket and "location" in query:
        return "GetBucketLocation"
    if method == "GET" and on_bucket:
        return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
    if method == "GET" and path == "/":
        return "ListBuckets"
    if method == "GET" and "uploadId" in query:
        return "ListParts"
    if method == "HEAD" and on_bucket:
        return "HeadBucket"
    names = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject",
             "POST": "PostObject"}
    if method == "PUT" and "partNumber" in query:
        return "UploadPart"
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    if method == "POST" and "uploadId" in query:
        return "CompleteMultipartUpload"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    if method == "DELETE" and "uploadId" in query:
        return "AbortMultipartUpload"
    return names.get(method, method)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs use it
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (after a stall): nothing to answer
            self.close_connection = True

    def _serve(self) -> None:
        body = self._body()  # read it all first: an error answer must not break the client's upload
        fault = self.owner.choose(self.command, self.path, self.headers.get("Range"), headers=self.headers)
        if fault in FAULTS:
            status, code, message = FAULTS[fault]
            data = _ERROR_XML.format(code=code, message=message).encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        if fault == "reset":
            self._drop()
            return
        if fault == "stall":
            time.sleep(self.owner.stall_seconds)
        status, reason, headers, data = self._forward(body)
        if fault == "lost_reply":
            self._drop()
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        length = len(data)
        if self.command == "HEAD":  # the object's size, with no body
            length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD" or not data:
            return
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self._drop()
            return
        self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _forward(self, body: bytes):
        t = self.owner.target
        conn = http.client.HTTPConnection(t.hostname, t.port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            # The Host header is signed (SigV4): pass the client's own unchanged.
            conn.putheader("Host", self.headers.get("Host", f"{t.hostname}:{t.port}"))
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
