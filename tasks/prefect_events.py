"""A task run's events and logs go to the Prefect API of its own flow run, in worker processes that outlive runs.

Prefect 3.9 learns of a task run through its events (prefect.task-run.Pending, Running, Completed...), which a
process sends through one EventsWorker per events-client type: made for the PREFECT_API_URL of whichever task run
emitted first, and then used by every later one in the process, whatever its API. A Dask worker of a shared cluster
(--dask-address) serves many runs; where each run has a temporary API server of its own (no PREFECT_API_URL), every
run after the first one sent its task runs' events to the first run's server, long gone: no task run of it was
recorded ("Unable to connect to 'ws://127.0.0.1:<old port>/api/events/in'" in the worker's log). Prefect already
keys its API log worker by PREFECT_API_URL (APILogWorker.instance); here the events worker for a Prefect server is
keyed by it too, so each task run's events go to the API of its run's settings, which the task engine enters on the
worker (the flow's serialized SettingsContext), and two runs at once on the same workers each reach their own.

A run's end does not wait for its workers to send what they have queued: a worker's events and logs go out
asynchronously, and a temporary server stops with its run. `done_with` waits on a worker until those queued for one
API have gone, then stops the workers for that API, which a shared worker would otherwise keep, one per run (flows.embed
asks each worker of a shared cluster before its report). Log batches are counted as they are
queued and handled, as Prefect's batched queue says nothing of the batch it holds.

Installed by importing `tasks.embed`, like `tasks.prefect_tls` and for the same reason: it is the one hook a Dask
worker runs before Prefect's task engine. Each function is idempotent, and returns False where this Prefect has
no hook of the expected form (then nothing is changed).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional

_counts_lock = threading.Lock()


def route_events_by_api_url() -> bool:
    """Make EventsWorker.instance() return one events worker per Prefect server API URL."""
    from prefect.events import worker as events

    cls = events.EventsWorker
    original = cls.__dict__.get("instance")
    if getattr(getattr(original, "__func__", None), "_by_api_url", False):
        return True
    if not isinstance(original, classmethod) or not hasattr(cls, "_client_override") \
            or not hasattr(events, "PrefectEventsClient"):
        return False

    def instance(cls_: type, client_type: Optional[type] = None) -> Any:
        if client_type is None and cls_._client_override is None and not events.emit_events_to_cloud():
            from prefect.settings import PREFECT_API_URL

            url = PREFECT_API_URL.value()
            if isinstance(url, str) and url:
                # As the original does for this case (a Prefect server), with the URL given to the events client
                # instead of read by it when the worker starts, and so a part of the worker's key.
                return super(cls, cls_).instance(events.PrefectEventsClient, (("api_url", url),))
        return original.__func__(cls_, client_type)

    instance._by_api_url = True  # type: ignore[attr-defined]
    cls.instance = classmethod(instance)
    return True


def count_api_logs() -> bool:
    """Count the logs each APILogWorker was given and has handled (sent, or failed to send), for `done_with`."""
    from prefect.logging.handlers import APILogWorker

    if getattr(APILogWorker.send, "_counted", False):
        return True
    send, handle_batch = APILogWorker.send, APILogWorker.__dict__.get("_handle_batch")
    if handle_batch is None or not asyncio.iscoroutinefunction(handle_batch):
        return False

    def counted_send(self, item: Any) -> None:
        with _counts_lock:  # before it is queued: a batch may be handled before send() returns
            self._logs_queued = getattr(self, "_logs_queued", 0) + 1
        try:
            send(self, item)
        except BaseException:  # the worker has stopped: nothing was queued
            with _counts_lock:
                self._logs_queued -= 1
            raise

    async def counted_handle_batch(self, items: list) -> None:
        try:
            await handle_batch(self, items)
        finally:
            with _counts_lock:
                self._logs_handled = getattr(self, "_logs_handled", 0) + len(items)

    counted_send._counted = True  # type: ignore[attr-defined]
    APILogWorker.send = counted_send
    APILogWorker._handle_batch = counted_handle_batch
    return True


def _api_url(service: Any) -> Optional[str]:
    """The API URL an events or log worker sends to (None for other services)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    if isinstance(service, EventsWorker):
        url = dict(service.client_options).get("api_url")
    elif isinstance(service, APILogWorker):
        url = getattr(getattr(service, "_client", None), "api_url", None)
    else:
        return None
    return str(url).rstrip("/") if url else None


def _running_services() -> list:
    from prefect._internal.concurrency.services import _QueueServiceBase

    with _QueueServiceBase._instance_cache_lock:
        services = list(_QueueServiceBase._instances.values())
    return [service for service in services if not service._stopped]  # a stopped one has drained on its own


def _services_for(api_url: str) -> list:
    """This process's running events and log workers that send to the API at `api_url`."""
    return [service for service in _running_services() if _api_url(service) == api_url.rstrip("/")]


def _pending(service: Any) -> int:
    """Events or logs that `service` was given and has not yet handled."""
    from prefect.events.worker import EventsWorker

    if isinstance(service, EventsWorker):
        return service._queue.unfinished_tasks
    with _counts_lock:
        return max(getattr(service, "_logs_queued", 0) - getattr(service, "_logs_handled", 0), 0)


def api_urls_served() -> list[str]:
    """The API URLs this process has running events or log workers for."""
    return sorted({url for url in map(_api_url, _running_services()) if url})


async def done_with(api_url: str, timeout: float = 30.0) -> int:
    """On a Dask worker's event loop (`client.run(done_with, url)`), for a run whose API at `api_url` stops with
    it: wait until this process has handled every event and log it queued for that API, or `timeout` seconds have
    passed, then stop its events and log workers for that API, which a worker serving many runs would otherwise
    keep, one per run, for good (a later run at the same URL gets new ones). Returns the number left unsent."""
    deadline = time.monotonic() + timeout
    while True:
        services = _services_for(api_url)
        pending = sum(_pending(service) for service in services)
        if not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    for service in services:
        service._stop()  # no wait: its queue is empty, or its server is going with the run
    return pending
