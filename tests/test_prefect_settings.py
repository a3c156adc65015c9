"""A task run's hydrated SettingsContext reuses the settings validated for the same serialized dict
(tasks.prefect_settings)."""
from __future__ import annotations

import threading

import prefect.context

from tasks import prefect_settings


def _serialized() -> dict:
    return prefect.context.get_settings_context().serialize()


def _base() -> type:
    assert prefect_settings.share_hydrated_settings()  # installed by importing tasks.embed; idempotent
    return prefect.context.SettingsContext.__mro__[1]


def test_a_serialized_context_is_validated_once_per_environment(monkeypatch):
    base, data = _base(), _serialized()
    shared_context = prefect.context.SettingsContext
    first, second = shared_context(**data), shared_context(**data)
    assert isinstance(first, base) and first is not second  # a context of its own each time...
    assert second.settings is first.settings and second.profile is first.profile  # ...with the settings shared
    fresh = base(**data)
    assert first.settings.model_dump() == fresh.settings.model_dump() and first.profile == fresh.profile
    # A setting the dict leaves out comes from the environment, as Prefect's own validation takes it
    assert "max_retries" not in data["settings"].get("client", {})
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "7")
    before = prefect_settings.validated
    changed = shared_context(**data)
    assert prefect_settings.validated == before + 1 and changed.settings is not first.settings
    assert changed.settings.client.max_retries == 7 == base(**data).settings.client.max_retries
    assert shared_context(**data).settings is changed.settings


def test_contexts_made_from_settings_objects_are_built_as_before():
    base, data = _base(), _serialized()
    fresh = base(**data)
    other = fresh.settings.copy_with_update(updates={prefect.settings.PREFECT_CLIENT_MAX_RETRIES: 3})
    before = (prefect_settings.validated, prefect_settings.shared)
    made = prefect.context.SettingsContext(profile=fresh.profile, settings=other)
    assert made.settings is other and made.settings.client.max_retries == 3
    assert (prefect_settings.validated, prefect_settings.shared) == before


def test_task_runs_enter_their_contexts_at_once():
    """Several task runs of a worker hydrate and enter their settings at the same time, each its own context."""
    data = _serialized()
    prefect.context.SettingsContext(**data)  # validated once before (threads starting together may each validate)
    inside = threading.Barrier(3)
    seen: list = []

    def task_run() -> None:
        # no API client is needed here (a context of settings only): a stand-in keeps Prefect from starting a server
        with prefect.context.hydrated_context({"settings_context": data}, client=object()):
            current = prefect.context.SettingsContext.get()
            inside.wait(timeout=30)
            seen.append((current is prefect.context.SettingsContext.get(), current))

    threads = [threading.Thread(target=task_run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(seen) == 3 and all(same for same, _ in seen)
    contexts = [c for _, c in seen]
    assert len({id(c) for c in contexts}) == 3 and len({id(c.settings) for c in contexts}) == 1
