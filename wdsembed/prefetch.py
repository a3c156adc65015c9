"""Read-ahead for one front-to-back pass over an object in a store (a shard tar on S3).

`ReadAhead` is a file object whose `read(n)` is served from blocks that background threads have already fetched
with ranged GETs, several in flight at once: downloading overlaps with embedding, and one shard's throughput is
not capped by one connection's. Memory is bounded by `depth` blocks in flight or waiting plus the block being
read; nothing touches local disk. Forward reads only (the tar reader never seeks).

S3 objects no longer come through here: storage.open_sequential hands them to the process's
s3fetch.ShardFetcher (whole shards, in flight sized by a target rate within a memory budget, ETag-checked).
ReadAhead serves the other fsspec object stores.
"""
from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

log = logging.getLogger("wdsembed")

BLOCK_SIZE = 8 << 20  # one ranged GET; equal to tarstream.CHUNK_SIZE so the tar reader's reads take whole blocks
DEPTH = 4  # blocks fetched ahead (and parallel GETs): 32 MiB in flight per shard being read
RETRIES = 4  # per block, on top of botocore's and s3fs's own retries (covers short or dropped bodies)


class ShortReadError(IOError):
    """A ranged GET returned fewer bytes than asked for inside the object."""


def _retryable(exc: BaseException) -> bool:
    # Missing objects and denied access do not get better; anything else I/O-like (timeouts, 5xx after the
    # library's own retries, a dropped body) may.
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or "Timeout" in type(exc).__name__


class BlockStream:
    """A read-only, forward-only binary file served from whole blocks that arrive in order: the part shared by
    ReadAhead and s3fetch.ShardReader. A mixin, with no __init__ and no lock of its own: the class sets `closed`,
    `size` (bytes, or None while unknown), `_buf` (the current block), `_pos` (next unread byte of it) and
    `_offset` (absolute offset of the next unread byte), and defines `_next_block()` (drop the current block, make
    the next one current, False at the end; it does its own waiting and locking) and `close()`. A block read whole
    from its start is handed out as it is, without a copy (the tar reader reads in block-sized chunks)."""

    closed: bool
    size: Optional[int]
    _buf: bytes
    _pos: int
    _offset: int

    def _next_block(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def read(self, n: int = -1) -> bytes:
        """Exactly n bytes (all the rest for n < 0), fewer only at the end of the object."""
        if self.closed:
            raise ValueError(f"read of a closed {type(self).__name__}")
        if n is None or n < 0:
            n = self.size - self._offset if self.size is not None else 1 << 62
        if n == 0:
            return b""
        if self._pos == len(self._buf) and not self._next_block():
            return b""
        avail = len(self._buf) - self._pos
        if n <= avail:
            if self._pos == 0 and n == avail:  # exactly the fresh block: hand it out, no copy
                out, self._buf = self._buf, b""
            else:
                out = self._buf[self._pos : self._pos + n]
                self._pos += n
            self._offset += n
            return out
        parts = [self._buf[self._pos :]]
        got = avail
        self._buf, self._pos = b"", 0
        while got < n and self._next_block():
            take = self._buf[: n - got]
            self._pos = len(take)
            parts.append(take)
            got += len(take)
        self._offset += got
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._offset

    def __enter__(self) -> "BlockStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ReadAhead(BlockStream):
    """A read-only, forward-only binary file over `path` on fsspec filesystem `fs`."""

    def __init__(
        self,
        fs: Any,
        path: str,
        *,
        size: Optional[int] = None,
        block_size: int = BLOCK_SIZE,
        depth: int = DEPTH,
        retries: int = RETRIES,
    ) -> None:
        self.fs, self.path = fs, path
        unstrip = getattr(fs, "unstrip_protocol", None)
        self.name = unstrip(path) if unstrip else path  # the URL, for messages
        try:
            self.size = int(fs.size(path) if size is None else size)
        except (FileNotFoundError, PermissionError) as exc:
            raise self._named(exc) from exc
        self.block_size = max(int(block_size), 1)
        self.retries = max(int(retries), 1)
        self._pool = ThreadPoolExecutor(max_workers=max(int(depth), 1), thread_name_prefix="wdsembed-readahead")
        self._depth = max(int(depth), 1)
        self._pending: collections.deque[Future] = collections.deque()
        self._next = 0  # start of the next block to request
        self._buf = b""
        self._pos = 0  # next unread byte of _buf
        self._offset = 0  # absolute offset of the next unread byte
        self.closed = False
        for _ in range(self._depth):
            self._request_next()

    # -- fetching

    def _request_next(self) -> None:
        if self._next >= self.size:
            return
        start, end = self._next, min(self._next + self.block_size, self.size)
        self._next = end
        self._pending.append(self._pool.submit(self._fetch, start, end))

    def _fetch(self, start: int, end: int) -> bytes:
        for attempt in range(self.retries):
            if self.closed:
                return b""
            try:
                data = self.fs.cat_file(self.path, start=start, end=end)
                if len(data) != end - start:
                    raise ShortReadError(f"{self.name}: bytes {start}-{end} came back as {len(data)} bytes")
                return data
            except BaseException as exc:  # noqa: BLE001 - sorted below
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise self._named(exc) from exc
                if attempt + 1 >= self.retries or not _retryable(exc):
                    raise
                log.warning("retrying read of %s bytes %d-%d after %s: %s", self.path, start, end,
                            type(exc).__name__, exc)
                time.sleep(min(0.2 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def read_range(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the object, wherever the forward read is (a hard link's target, which the
        read has passed): one ranged read."""
        return self.fs.cat_file(self.path, start=offset, end=offset + size)

    def _named(self, exc: OSError) -> OSError:
        """The same error, saying which object (s3fs's own says only "Access Denied" or "Not Found")."""
        return type(exc)(f"{self.name}: {exc}")

    # -- file object (read, tell... from BlockStream)

    def _next_block(self) -> bool:
        """Make the next block current; False at the end of the object."""
        self._buf, self._pos = b"", 0  # drop the old block before waiting on the next
        if not self._pending:
            return False
        future = self._pending.popleft()
        self._request_next()
        self._buf = future.result()
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._buf = b""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:  # pragma: no cover - a safety net for callers that forget close()
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
