"""The temporary Prefect API server of a run when PREFECT_API_URL names none, booted in the background.

Prefect would start one itself (SubprocessASGIServer, what its client does without PREFECT_API_URL), but only after
importing the whole server into the calling process too (about 4 s on 2 cores), and then it waits for the server's
process to boot (about 8 s): one after the other. Here this process imports nothing of the server, and the server's
process does its slow part, loading Prefect's server code and building the app, while the command does its own
checks. It waits there, having touched no database and answered nothing, until the checks pass:

    prepare()   the command begins: the process starts and loads the server code
    start()     every check passed: it starts serving (database, services); returns at once. Where
                PREFECT_API_URL names a server, it is asked once instead, and refused where nothing answers
    api_url()   its URL, for the run's settings, before it answers
    wait(url)   before the first request: until it answers

A refused run never tells it to go on: the process exits as the command does, and the refusal is still one line
with nothing written and no server started. It is the same server: Prefect's app (`create_app`, ephemeral: no UI,
the services an ephemeral server runs) on the profile's database, listening on 127.0.0.1, stopped when this process
exits. The socket is bound here and handed over, so no other process can take its port in between.

This module imports nothing of Prefect at import time.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional

from flows import prefect_env

_GO = b"serve\n"


class TemporaryServer:
    """One Prefect API server process on a socket bound here; it serves once told to (`go`)."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        # The server's process says on this pipe, once it has read Prefect's settings, whether its database's
        # folder can be written ("ok", or the line saying what to change), before it opens anything.
        # It is kept open afterwards: a database that cannot be written later on (its disk full) is said there too.
        self._checked, checked_w = os.pipe()
        self._refusal: Optional[str] = None
        self.said_nothing = False  # its process ended without a word: Prefect's settings name an API (_serve)
        self._trouble: Optional[str] = None
        self.process: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(sock.fileno()), str(os.getpid()), str(checked_w)],
            pass_fds=[sock.fileno(), checked_w], stdin=subprocess.PIPE,
            # Out of the terminal's process group: a Ctrl-C stops the command, which then still reports its flow
            # run's end to this server, and stops it (stop(), or it sees itself orphaned).
            start_new_session=True,
        )
        sock.close()  # the server's process holds it now
        os.close(checked_w)
        self.told = self.ready = False
        atexit.register(self.stop)  # after Prefect's own exit hooks, which send the run's last events and logs

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def go(self) -> None:
        if self.told or self.process is None:
            return
        self.told = True
        try:
            self.process.stdin.write(_GO)
            self.process.stdin.close()
        except BrokenPipeError:  # it has exited: wait() says so
            pass

    def refusal(self, timeout: float) -> Optional[str]:
        """What the server's process found that keeps it from serving (its database's folder cannot be written),
        as one line saying what to change; None where it found nothing, or has not said within `timeout`."""
        if self._checked is not None:
            import select

            if select.select([self._checked], [], [], timeout)[0]:
                said = b""
                while not said.endswith(b"\n"):
                    chunk = os.read(self._checked, 4096)
                    if not chunk:  # it ended without a word (a profile names the API: it does not serve)
                        self.said_nothing = not said
                        break
                    said += chunk
                lines = said.decode(errors="replace").splitlines()
                line = lines[0].strip() if lines else ""
                self._refusal = line if line and line != "ok" else None
                if self._refusal or not said:
                    os.close(self._checked)
                    self._checked = None
        return self._refusal

    def trouble(self, timeout: float) -> Optional[str]:
        """What the server's process said, once serving, keeps it from recording the run (its database cannot be
        written: a full disk), as one line saying what to change; None where it said nothing within `timeout`."""
        import select

        if self._trouble is None and self._checked is not None and self._refusal is None:
            said = b""
            while select.select([self._checked], [], [], timeout)[0]:
                chunk = os.read(self._checked, 4096)
                if not chunk:
                    break
                said += chunk
                if said.endswith(b"\n"):
                    break
            lines = [line.strip() for line in said.decode(errors="replace").splitlines()]
            self._trouble = next((line for line in lines if line and line != "ok"), None)
        return self._trouble

    def wait(self, timeout: float) -> str:
        """The API URL once the server answers; RuntimeError if its process ends or `timeout` passes first."""
        self.go()
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.process is None or self.process.poll() is not None:
                if self.refusal(0):
                    raise RuntimeError(self._refusal)
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"the temporary Prefect API server exited (code {code}) before answering: "
                                   "its messages are above; or set PREFECT_API_URL to a running server")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); or set PREFECT_API_URL "
                                   "to a running server")
            self.ready = _healthy(self.port)
            if not self.ready:
                time.sleep(0.1)
        return self.api_url

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()  # never told to serve: it exits at once
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self._checked is not None:
            os.close(self._checked)
            self._checked = None


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/api/health")
        return connection.getresponse().status == 200
    except OSError:  # refused, reset, or no answer yet (the socket queues connections while the server boots)
        return False
    finally:
        connection.close()


_server: Optional[TemporaryServer] = None
_lock = threading.Lock()


def _api_url_setting() -> bool:
    """Whether PREFECT_API_URL names an API: from Prefect's settings where they are loaded already, else from the
    environment alone (loading them takes a second; the server's process reads the profile and exits if it names
    one)."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())
    return bool(os.environ.get("PREFECT_API_URL"))


def prepare() -> None:
    """Start the server's process, which loads the server and waits for start(); returns at once. Nothing where
    PREFECT_API_URL names an API or a server is prepared already."""
    global _server
    if _api_url_setting():
        return
    prefect_env.set_defaults()  # the server's process reads its settings from the environment it inherits
    with _lock:
        if _server is None or _server.process is None:
            _server = TemporaryServer()


def start() -> None:
    """Let the prepared server serve (preparing it now if it was not). Returns once its process has read Prefect's
    settings (it mostly has, while the checks ran); ValueError, with the server stopped, where it cannot serve
    (its database's folder cannot be written: PREFECT_HOME). Where PREFECT_API_URL names a server, ValueError where
    nothing answers there (_refuse_unreachable_api)."""
    _refuse_unreachable_api()
    prepare()
    with _lock:
        server = _server
    if server is None or server.process is None:
        return
    problem = server.refusal(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    if problem:
        server.stop()
        raise ValueError(problem)
    if server.said_nothing:  # Prefect's settings (a profile) name the API, which prepare() could not see
        _refuse_unreachable_api(load_settings=True)
    server.go()


def _api_url_and_source(load_settings: bool) -> tuple[Optional[str], str]:
    """PREFECT_API_URL as Prefect takes it (the environment's before the active profile's) and where it was set,
    as the user would change it. Prefect's settings are loaded (a second) only where `load_settings`."""
    url = os.environ.get("PREFECT_API_URL")
    if url or not (load_settings or "prefect.settings" in sys.modules):
        return url, "PREFECT_API_URL"
    from prefect.context import get_settings_context
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    profile = get_settings_context().profile
    if url and profile.settings.get(PREFECT_API_URL) == url:
        return url, f"PREFECT_API_URL in Prefect profile {profile.name!r} ({profile.source})"
    return url, "PREFECT_API_URL in Prefect's settings (a .env, prefect.toml or pyproject.toml here)"


def _refuse_unreachable_api(load_settings: bool = False) -> None:
    """ValueError where PREFECT_API_URL (in the environment: a stale shell setting, say; or in the active Prefect
    profile) names a server that no connection reaches, asked once with a short timeout: Prefect's client retried
    for about 20 s, after the progress bar had started. Any answer, even a refusal of this client or a TLS
    handshake's failure, passes: the flow's own check (flows.embed._check_api_access) says what that needs."""
    import ssl

    url, source = _api_url_and_source(load_settings)
    if not url or serves(url):
        return
    import httpx

    try:
        # Nothing is sent but the request: no credential, so the certificate need not be checked for it
        httpx.get(url.rstrip("/") + "/health", timeout=2.0, verify=False)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:  # no TCP connection (an SSL error means something answered there)
            raise ValueError(f"cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc}): check "
                             f"{source}") from None
    except Exception:  # noqa: BLE001 - an answer, or a URL httpx cannot ask: the flow's check says what
        pass


def api_url() -> str:
    """The temporary server's API URL, known before it answers (prepared and started now where that was not done):
    a client can be set up with it while the server boots; `wait(url)` before the first request."""
    global _server
    prefect_env.set_defaults()  # the server's process reads its settings from the environment it inherits
    with _lock:
        if _server is None or _server.process is None:
            _server = TemporaryServer()
        _server.go()
        return _server.api_url


def serves(url: Optional[str]) -> bool:
    """Whether `url` is this process's temporary server's API URL (which stops with the process)."""
    with _lock:
        server = _server
    return server is not None and server.process is not None and url == server.api_url


def wait(url: Optional[str]) -> None:
    """Return once the temporary server answers, where `url` is its API URL (at once for any other); RuntimeError
    if it cannot."""
    with _lock:
        server = _server
    if server is not None and server.process is not None and url == server.api_url:
        server.wait(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))


def trouble(timeout: float = 2.0) -> Optional[str]:
    """What this process's temporary server said keeps it from recording the run (its database cannot be
    written), as one line saying what to change; None where it said nothing, or there is none."""
    with _lock:
        server = _server
    if server is None or server.process is None:
        return None
    return server.trouble(timeout)


def _quiet_from_now() -> None:
    """The server is stopping: its Prefect services say nothing from now on. Their shutdown cancels a flush of the
    task-run events still queued (a re-run of a few hundred finished shards sends one per shard as it ends), and
    Prefect logged each cancelled flush with its traceback: about 150 lines on the command's terminal, after the
    summary of a run that ended well. The run is over by then; nothing there is the user's to act on. SQLAlchemy's
    pool logs the same cancellation, of a connection being reset, as 'Exception during reset or similar' with its
    traceback (seen once in a full test run, at the end of a re-run of 400 shards)."""
    import logging

    for name in ("prefect.server", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _setup_lock_path() -> str:
    """The file whose lock _database_setup_turn holds: beside a SQLite database, else in PREFECT_HOME."""
    from prefect.settings import get_current_settings
    from sqlalchemy.engine import make_url

    settings = get_current_settings()
    url = make_url(settings.server.database.connection_url.get_secret_value())
    on_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
        and not url.database.startswith("file:")
    path = url.database + ".wdsembed-setup.lock" if on_file else os.path.join(settings.home, "wdsembed-db-setup.lock")
    return os.path.abspath(path)


def _unwritable_database_folder() -> Optional[str]:
    """The line saying what to change where the folder of this server's database (or its lock) cannot be created
    or written, as under a read-only or missing HOME; None where it can. Writes no file there."""
    import tempfile

    from prefect.settings import get_current_settings

    folder = os.path.dirname(_setup_lock_path())
    try:
        os.makedirs(folder, exist_ok=True)  # Prefect itself makes its home folder as it is imported
        with tempfile.TemporaryFile(dir=folder):  # unnamed (O_TMPFILE) where the filesystem allows
            pass
    except OSError as exc:
        home = os.path.abspath(os.path.expanduser(str(get_current_settings().home)))
        where = "PREFECT_HOME" if os.path.commonpath([home, folder]) == home else \
            "PREFECT_SERVER_DATABASE_CONNECTION_URL"
        return (f"Prefect's folder {folder} cannot be written ({exc.strerror or exc}): set {where} to a "
                "folder you can write, or PREFECT_API_URL to a running Prefect server")
    return None


@contextlib.contextmanager
def _database_setup_turn() -> Iterator[None]:
    """Hold, across processes, the lock on setting up the Prefect database this server uses: a file beside a SQLite
    database, else in PREFECT_HOME. The lock goes with the process if it dies."""
    import fcntl

    path = _setup_lock_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another server sets the database up
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# What SQLite says where its database cannot be written any more, and what to do about each.
_DATABASE_WRITE_ERRORS = {"database or disk is full": "free space there, or set {where} to a folder with room",
                          "attempt to write a readonly database": "set {where} to a folder you can write",
                          "disk I/O error": "set {where} to a folder on a sound disk"}


def _database_write_error(record) -> Optional[str]:  # noqa: ANN001 - a logging.LogRecord
    """SQLite's words (a key of _DATABASE_WRITE_ERRORS) where `record` logs a failed write of the database."""
    texts = [record.getMessage()]
    exc = record.exc_info[1] if record.exc_info else None
    seen = 0
    while exc is not None and seen < 10:  # sqlalchemy's OperationalError wraps sqlite3's
        texts.append(str(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return next((words for words in _DATABASE_WRITE_ERRORS for text in texts if words in text), None)


def _say_database_trouble_once(said) -> None:  # noqa: ANN001 - the pipe to the command, a text file
    """A server whose database cannot be written (its disk full, turned read-only) fails every request that writes:
    each failure was logged with its traceback (sqlite3's, SQLAlchemy's, uvicorn's), about 1,900 lines on the
    command's terminal, and the command named only an HTTP 500. Said once instead, here and to the command, which
    names it in its last line; later such records are dropped."""
    import logging

    from prefect.settings import get_current_settings

    home = os.path.abspath(os.path.expanduser(str(get_current_settings().home)))
    lock = _setup_lock_path()
    database = lock[:-len(".wdsembed-setup.lock")] if lock.endswith(".wdsembed-setup.lock") else home
    where = "PREFECT_HOME" if os.path.commonpath([home, os.path.dirname(database)]) == home else \
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    told = []

    class DatabaseTrouble(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if getattr(record, "wdsembed_said", False):  # the one line, at this process's next handler
                return True
            words = _database_write_error(record)
            if words is None:
                return True
            if told:
                return False
            told.append(words)
            line = (f"Prefect's database {database} cannot be written ({words}): "
                    f"{_DATABASE_WRITE_ERRORS[words].format(where=where)}; or set PREFECT_API_URL to a running "
                    "Prefect server")
            with contextlib.suppress(OSError, ValueError):
                said.write(line + "\n")
                said.flush()
            record.msg, record.args, record.exc_info, record.exc_text = line, (), None, None
            record.wdsembed_said = True
            return True

    trouble = DatabaseTrouble()
    loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(trouble)


def _serve(fd: int, parent: int, checked: int) -> None:
    """The server's process: load the server and build the app, then, once told to, serve on the socket it was
    handed until terminated or orphaned. It first says on `checked` whether it can (TemporaryServer.refusal)."""
    # Booting is mostly imports that make objects which live as long as the server: collecting garbage among them
    # is wasted time (about a tenth of the boot), and so is scanning them again later.
    gc.disable()
    server = None

    def stop_when_orphaned() -> None:  # a parent killed outright (SIGKILL) leaves no server behind
        while os.getppid() == parent:
            time.sleep(1)
        if server is None:  # still loading (the command was killed in its checks): nothing opened, no word to say
            os._exit(0)
        _quiet_from_now()
        server.should_exit = True

    # From the start: loading takes seconds, and the command's stderr, which this process holds, stays open meanwhile
    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    import warnings

    # Said once, by the command, as what to change (_unwritable_database_folder)
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # a Prefect profile names the API (prepare() saw only the environment)
        return
    problem = _unwritable_database_folder()
    said = open(checked, "w")  # kept open: _say_database_trouble_once writes there later
    try:
        said.write((problem or "ok") + "\n")
        said.flush()
    except BrokenPipeError:  # the command is gone (killed before the watch above saw it): no one to serve
        os._exit(0)  # not a return: the file's flush at exit would fail again, with a line on stderr
    if problem:
        said.close()
        return
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True, final=True)  # builds the routes; opens no database
    if sys.stdin.buffer.readline() != _GO:  # the command ended before its checks passed, or was killed
        return
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    startup = server.startup

    async def startup_in_turn(sockets=None) -> None:  # noqa: ANN001 - uvicorn's own signature
        # The app's startup creates or migrates the database: servers of commands started together on one new
        # database did it at once, and all but one failed ('duplicate column name'). They take turns here.
        with _database_setup_turn():
            await startup(sockets=sockets)
        _say_database_trouble_once(said)  # on the handlers as the app's startup left them: it sets logging up anew

    server.startup = startup_in_turn
    handle_exit = server.handle_exit  # what uvicorn makes the handler of SIGTERM (stop()) as it starts serving
    server.handle_exit = lambda sig, frame: (_quiet_from_now(), handle_exit(sig, frame))
    gc.freeze()
    gc.enable()
    server.run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
