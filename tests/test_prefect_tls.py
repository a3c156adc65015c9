"""Prefect's API clients share one TLS context per CA file (tasks.prefect_tls)."""
from __future__ import annotations

import ssl

import certifi
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    temporary_settings,
)

from tasks import prefect_tls


def _context(client) -> ssl.SSLContext:
    """The context a Prefect client's connections are made with."""
    return client._client._transport._pool._ssl_context


@pytest.fixture
def api():
    assert prefect_tls.share_api_tls_contexts()  # installed by importing tasks.embed; idempotent
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never connected to
        yield


def test_clients_share_one_verified_context(api):
    made = [get_client(sync_client=True) for _ in range(3)] + [get_client()]
    contexts = {id(_context(c)) for c in made}
    assert len(contexts) == 1
    context = _context(made[0])
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 10  # certifi's bundle, loaded once


def test_another_ca_file_and_an_edited_one_get_their_own_context(api, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text(open(certifi.where()).read())
    with temporary_settings({PREFECT_API_SSL_CERT_FILE: str(bundle)}):
        first = _context(get_client(sync_client=True))
        assert _context(get_client(sync_client=True)) is first
        assert first is not _context_of_default()
        one_cert = open(certifi.where()).read().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        bundle.write_text(one_cert)  # rotated: read again, not the old context
        edited = _context(get_client(sync_client=True))
        assert edited is not first and edited.cert_store_stats()["x509_ca"] == 1


def _context_of_default() -> ssl.SSLContext:
    with temporary_settings(restore_defaults={PREFECT_API_SSL_CERT_FILE}):
        return _context(get_client(sync_client=True))


def test_the_insecure_setting_still_gets_a_context_of_its_own(api):
    """Prefect changes the context it makes for PREFECT_API_TLS_INSECURE_SKIP_VERIFY after making it: never shared."""
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        a, b = (_context(get_client(sync_client=True)) for _ in range(2))
    assert a is not b and a.verify_mode == ssl.CERT_NONE and not a.check_hostname
    assert _context(get_client(sync_client=True)).verify_mode == ssl.CERT_REQUIRED  # the shared one is untouched
