"""One TLS context per CA file for all of Prefect's API clients in a process.

Prefect 3.9 builds a new `ssl.SSLContext` for every API client it makes, loading the whole CA bundle each time
(certifi's, or PREFECT_API_SSL_CERT_FILE), whether the API is reached over https or plain http. A flow run makes
two before its body starts (the flow engine's, and flows.embed's access check), and a Dask worker two for every
task run it starts (the task engine's context and client), each about 19 ms of the GIL on the 2-core machine. With
them shared there (one-shard runs of flows.embed.run on a one-worker local cluster, two rounds of 12 runs each way),
the flow's body began 0.04-0.055 s sooner after the call, and the task's body 0.035-0.04 s sooner after the
planning. A verified context holds no per-connection state and serves any number of connections and threads, so
sharing one changes nothing else.
(Prefect has an open pull request to let callers pass their own context: PrefectHQ/prefect#19106.)

Installed by importing `tasks.embed`, which is what a Dask worker does before it runs an embedding task, and which
the flow module imports: no other hook runs in a worker process before Prefect's task engine.
"""
from __future__ import annotations

import os
import ssl
import threading
import types
from typing import Any, Optional

_contexts: dict[tuple, ssl.SSLContext] = {}
_lock = threading.Lock()
served = 0  # contexts handed out (made or shared), for the tests


def _verified_context(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: Optional[str] = None,
                      capath: Optional[str] = None, cadata: Any = None) -> ssl.SSLContext:
    """ssl.create_default_context, shared per CA file (and its size and time, so an edited file is read again).
    Anything else, above all the context Prefect makes for PREFECT_API_TLS_INSECURE_SKIP_VERIFY and then changes,
    is made anew as before."""
    global served
    if cafile is None or capath is not None or cadata is not None:
        return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
    stat = os.stat(cafile)
    key = (purpose, os.path.abspath(cafile), stat.st_size, stat.st_mtime_ns)
    with _lock:
        context = _contexts.get(key)
        if context is None:
            context = _contexts[key] = ssl.create_default_context(purpose, cafile=cafile)
        served += 1
    return context


class _SharedTLS(types.ModuleType):
    """The `ssl` module as Prefect's client module sees it: all of it, with create_default_context shared."""

    create_default_context = staticmethod(_verified_context)

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)


def share_api_tls_contexts() -> bool:
    """Make Prefect's API clients in this process share their TLS contexts. Idempotent; False where this Prefect
    makes its contexts some other way (then nothing is changed)."""
    import prefect.client.orchestration as orchestration

    current = getattr(orchestration, "ssl", None)
    if isinstance(current, _SharedTLS):
        return True
    if current is not ssl:
        return False
    orchestration.ssl = _SharedTLS("ssl")
    return True
