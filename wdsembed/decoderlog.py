"""DALI's image decoder lines, routed to the log instead of the terminal.

DALI decodes through nvImageCodec, whose default message sink writes every decoder error straight to the process's
stderr (file descriptor 2), in colour: a truncated JPEG shows as

    [ERROR] [libjpeg_turbo_decoder] Could not decode jpeg code stream - Premature end of JPEG data ...

once for the batch that failed and once more when the bad sample is isolated. No setting turns it off:
DALI_NVIMGCODEC_LOG_LEVEL (1..5, default 2) is clamped to at least 1, which still prints errors. The sample's reason
is already on its row (the error column) and in the summary, so these lines are diagnostics: while
`decoder_messages_to_log()` is active, fd 2 goes through a pipe that sends lines in nvImageCodec's format (and
libpng's own "libpng error: ..." lines, for a damaged PNG) to the `wdsembed.decoder` logger at DEBUG and passes every other byte through unchanged, in order. Processes started
meanwhile (Dask workers) inherit the pipe, so their decoder lines are routed too.

Lines still in the pipe when a process dies abruptly (SIGKILL, a segfault) can be lost; the context is meant to
span the run only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sys
import threading
from typing import Iterator, Optional

log = logging.getLogger("wdsembed.decoder")

# nvImageCodec's default messenger: "<colour>[SEVERITY] <reset>[codec or plugin name] message", the colour and the
# reset always written (to a file or a pipe too). A plain "[%(levelname)s] [%(name)s] %(message)s" log format
# never matches; a coloured one shaped the same way is told apart by its name (_route).
DECODER_LINE = re.compile(
    rb"^\x1b\[[0-9;]*m\[(FATAL ERROR|ERROR|WARNING|INFO|DEBUG|TRACE)\] \x1b\[0m\[([\w.-]+)\] (.*)$"
)
# libpng's own default handlers, which nvImageCodec's PNG decoder leaves in place: "libpng error: IDAT: invalid
# distance too far back" for a damaged PNG, printed to fd 2 beside the codec's line.
LIBPNG_LINE = re.compile(rb"^(libpng) (error|warning): (.*)$")


_FLUSH_MARKER = b"\x00wdsembed-stderr-flush\x00\n"
_FLUSHED = ("", "", "")  # the logger thread's cue that the lines before the flush marker are logged


class _Fd2Router:
    """fd 2 -> a pipe -> a thread that logs decoder lines and forwards the rest to the original stderr."""

    def __init__(self) -> None:
        self.original = os.dup(2)
        self.read_end, self.write_end = os.pipe()
        # everything up to the flush marker is handled: forwarded, or logged (the logger thread is a daemon, and a
        # process that ends right after close() would otherwise lose the last lines)
        self.flushed = threading.Event()
        self.original_lock = threading.Lock()
        self.closed = False
        self.records: "queue.SimpleQueue[Optional[tuple[str, str, str]]]" = queue.SimpleQueue()  # None: the end
        _flush_python_streams()
        os.dup2(self.write_end, 2)
        # Logging happens in a thread of its own: a handler that writes to stderr (fd 2, the pipe) must never
        # wait on the thread that empties the pipe.
        self.logger_thread = threading.Thread(target=self._log_records, name="wdsembed-decoder-log", daemon=True)
        self.pump_thread = threading.Thread(target=self._pump, name="wdsembed-stderr-router", daemon=True)
        self.logger_thread.start()
        self.pump_thread.start()

    def close(self, wait_s: float = 5.0) -> None:
        """Give fd 2 back, then wait until what was written before is handled. Processes started meanwhile may
        still hold the pipe: the thread keeps forwarding their output until they end."""
        _flush_python_streams()
        os.dup2(self.original, 2)
        # Bytes come out of a pipe in order: once the marker is read, everything written before it has been routed.
        self._forward_to_pipe(_FLUSH_MARKER)
        os.close(self.write_end)
        self.flushed.wait(wait_s)
        with self.original_lock:
            self.closed = True
            if not self.pump_thread.is_alive():
                self._close_original()

    def _forward_to_pipe(self, data: bytes) -> None:
        try:
            os.write(self.write_end, data)
        except OSError:
            self.flushed.set()

    def _close_original(self) -> None:
        if self.original >= 0:
            os.close(self.original)
            self.original = -1

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_end, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._route(line + b"\n")
            # A partial line that cannot be a decoder line goes on at once (a prompt, a crash message). libpng
            # writes its message and its newline in two writes.
            if pending and not (pending.startswith((b"\x1b", _FLUSH_MARKER[:1], b"libpng "))
                                or b"libpng ".startswith(pending)):
                self._forward(pending)
                pending = b""
        if pending:
            self._route(pending)
        os.close(self.read_end)
        self.records.put(None)
        with self.original_lock:
            if self.closed:
                self._close_original()

    def _route(self, line: bytes) -> None:
        if line.endswith(_FLUSH_MARKER):  # after a partial line, if the last write had no newline
            if len(line) > len(_FLUSH_MARKER):
                self._forward(line[: -len(_FLUSH_MARKER)])
            self.records.put(_FLUSHED)  # set once the lines before it are logged
            return
        match = DECODER_LINE.match(line.rstrip(b"\r\n"))
        if match is None:
            png = LIBPNG_LINE.match(line.rstrip(b"\r\n"))
            if png is None:
                self._forward(line)
            else:
                source, severity, text = (part.decode("utf-8", "replace") for part in png.groups())
                self.records.put((severity.upper(), source, text))
            return
        severity, source, text = (part.decode("utf-8", "replace") for part in match.groups())
        if source in logging.Logger.manager.loggerDict:
            # A Python logger's line in a coloured format, not a codec's: re-logged, it would be hidden at DEBUG,
            # and the line of our own logger (wdsembed.decoder) would match again, forever.
            self._forward(line)
            return
        self.records.put((severity, source, text))

    def _forward(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.original >= 0:
            try:
                written = os.write(self.original, view)
            except OSError:
                return  # the terminal is gone; nothing else to do with the bytes
            view = view[written:]

    def _log_records(self) -> None:
        while True:
            record = self.records.get()
            if record is None or record is _FLUSHED:
                self.flushed.set()
                if record is None:
                    return
                continue
            severity, source, text = record
            log.debug("%s %s: %s", severity, source, text)


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


_lock = threading.Lock()
_active: Optional[_Fd2Router] = None
_users = 0


@contextlib.contextmanager
def decoder_messages_to_log() -> Iterator[None]:
    """Route nvImageCodec's decoder lines on fd 2 to the `wdsembed.decoder` logger (DEBUG) while inside.
    Nestable and thread-safe: fd 2 is given back when the last user leaves."""
    global _active, _users
    with _lock:
        if _users == 0:
            try:
                _active = _Fd2Router()
            except OSError as exc:  # no usable fd 2 (a daemon with stderr closed): nothing to keep off a screen
                log.debug("decoder lines not routed: %s", exc)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _active is not None:
                _active.close()
                _active = None
