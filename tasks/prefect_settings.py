"""Prefect's settings validated once per worker process, not once per task run.

A Dask worker rebuilds the flow's settings for every task run it starts: Prefect 3.9's task engine enters
`prefect.context.SettingsContext(**serialized)`, which validates the whole `Settings` model from the flow's dict,
54 nested settings models each reading the environment and the dotenv sources again. On the 2-core machine that was
27-43 ms of the GIL per task run, about 80% of hydrating a task run's context (a cProfile of ten hydrations).

Here a SettingsContext made from the same serialized dict, in the same environment and working directory, reuses
the profile and settings validated the first time; each context is still an object of its own (a context holds its
own token while entered, and several task runs enter theirs at once). Sharing a settings object is what Prefect
already does for all the threads of a process (its global settings context): nothing in it changes one in place.
Contexts made from anything but plain dicts (Prefect's own `temporary_settings`, `use_profile`) are built as before.
The files that Prefect's settings read (a `.env` or `prefect.toml` in the working directory, the profiles file) are
read again only when the environment changes, so an edit to one of them reaches a worker's later task runs only
with a new worker.

Installed by importing `tasks.embed`, like `tasks.prefect_tls` and for the same reason: it is the one hook a Dask
worker runs before Prefect's task engine.
"""
from __future__ import annotations

import os
import threading
from typing import Any, ClassVar, Optional

_lock = threading.Lock()
_last: Optional[tuple[tuple, Any, Any]] = None  # (key, profile, settings) of the last dict validated
validated = 0  # settings validated from a dict (misses), for the tests
shared = 0  # contexts that reused validated settings (hits), for the tests


def _reused(base: type, data: dict[str, Any]) -> dict[str, Any]:
    """The arguments for a SettingsContext: `data` itself unless it is a serialized one (plain dicts only), else its
    profile and settings, validated once per (dict, environment, working directory)."""
    global _last, validated, shared
    if set(data) != {"profile", "settings"} or not all(type(v) is dict for v in data.values()):
        return data
    key = (data, dict(os.environ), os.getcwd())
    with _lock:
        last = _last
        if last is not None and last[0] == key:
            shared += 1
            return {"profile": last[1], "settings": last[2]}
    fresh = base(**data)  # outside the lock: a few tens of ms
    with _lock:
        _last = (key, fresh.profile, fresh.settings)
        validated += 1
    return {"profile": fresh.profile, "settings": fresh.settings}


def share_hydrated_settings() -> bool:
    """Make the SettingsContexts that Prefect's engines hydrate in this process share their validated settings.
    Idempotent; False where this Prefect has no SettingsContext of the expected form (then nothing is changed)."""
    import prefect.context as context

    base = getattr(context, "SettingsContext", None)
    if getattr(base, "_shares_validated_settings", False):
        return True
    if base is None or not {"profile", "settings"} <= set(getattr(base, "model_fields", {})):
        return False

    class SharedSettingsContext(base):  # type: ignore[misc, valid-type]
        """prefect.context.SettingsContext whose serialized form is validated once (see the module)."""

        _shares_validated_settings: ClassVar[bool] = True

        def __init__(self, **data: Any) -> None:
            super().__init__(**_reused(base, data))

    SharedSettingsContext.__name__ = SharedSettingsContext.__qualname__ = "SettingsContext"
    # Looked up by name when Prefect hydrates a context (prefect.context.hydrated_context): every other user of
    # the class keeps the original, of which this is a subclass sharing its context variable.
    context.SettingsContext = SharedSettingsContext
    return True
