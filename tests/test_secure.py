"""The multi-node recipe with its protections on, on loopback: a Prefect server that asks for basic auth
(PREFECT_SERVER_API_AUTH_STRING) and a Dask scheduler and worker that speak mutual TLS.

Runs go through the command line (`python flows/embed.py ...` as a subprocess), so the environment is handled as
users' is. Small on purpose: 2 shards of 4 images, the tiny timm test model with random weights, one worker.
"""
from __future__ import annotations

import base64
import datetime
import gc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from processes import scheduler_address, start as start_process, stop as stop_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AUTH = "embedder:s3cret-pass"
STEMS = ["00000", "00001"]


# --------------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_", "WDSEMBED_FAULTS"))}
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(home),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def make_dataset(folder: Path) -> Path:
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(folder, n_shards=len(STEMS), per_shard=4, failed_per_shard=0)
    return folder


def cli(data: Path, out: Path, env: dict, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    args = [sys.executable, "flows/embed.py", str(data), "--output", str(out), "--model", TINY_MODEL,
            "--no-pretrained", "--device", "cpu", "--batch-size", "4", "--num-threads", "1", *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def api_post(url: str, path: str, body: dict) -> list:
    import httpx

    token = base64.b64encode(AUTH.encode()).decode()
    response = httpx.post(url + path, json=body, headers={"Authorization": f"Basic {token}"}, timeout=30)
    response.raise_for_status()
    return response.json()


def embed_states(url: str) -> dict[str, str]:
    """Every embedding task run's latest state, by shard, read back from the authenticated API."""
    deadline = time.monotonic() + 60
    while True:  # task-run states reach the server as events, recorded a moment later
        runs = api_post(url, "/task_runs/filter", {"limit": 200})
        states = {r["name"].removeprefix("embed-"): r["state_type"] for r in runs if r["name"].startswith("embed-")}
        if all(states.get(s) == "COMPLETED" for s in STEMS) or time.monotonic() > deadline:
            return states
        time.sleep(1)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`prefect server start` on loopback that refuses any client without the basic-auth string."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = _base_env(home) | {"PREFECT_SERVER_API_AUTH_STRING": AUTH, "PREFECT_UI_ENABLED": "false"}
    proc = start_process([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                         home / "server.log", env)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:  # health needs no auth
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield url
    finally:
        stop_process(proc)


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_tls_files(folder: Path, name: str) -> dict[str, Path]:
    """A CA of its own and one certificate it signed (used here by scheduler, worker and client alike)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name}-ca", ca_key, None, None, ca=True)
    cert = _cert(f"{name}-node", key, ca.subject, ca_key, ca=False)
    files = {"ca": folder / f"{name}-ca.pem", "cert": folder / f"{name}-cert.pem", "key": folder / f"{name}-key.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def make_config(folder: Path, **overrides):
    from wdsembed.config import EmbedConfig

    return EmbedConfig(input=str(folder / "in"), output=str(folder / "out"), model_name=TINY_MODEL,
                       pretrained=False, device="cpu", **overrides)


def check_outputs(out: Path) -> None:
    import pyarrow.parquet as pq

    for stem in STEMS:
        assert pq.read_metadata(out / f"{stem}.parquet").num_rows == 4


# --------------------------------------------------------------------------------------------------- tests


def test_prefect_api_with_basic_auth(tmp_path, auth_server):
    data = make_dataset(tmp_path / "in")
    env = _base_env(tmp_path / "home") | {"PREFECT_API_URL": auth_server}

    # Without the credential: refused before any work, in one line that names the setting.
    refused = cli(data, tmp_path / "refused", env)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "PREFECT_API_AUTH_STRING" in refused.stderr and "401" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").glob("*.parquet"))

    # With it: the run's local Dask worker processes (spawned) report their task runs to the same server.
    done = cli(data, tmp_path / "out", env | {"PREFECT_API_AUTH_STRING": AUTH}, "--n-workers", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    check_outputs(tmp_path / "out")
    assert embed_states(auth_server) == dict.fromkeys(STEMS, "COMPLETED")


def test_prefect_auth_from_profile(tmp_path, auth_server):
    """The credential set in the active Prefect profile, not the environment, reaches the API too."""
    data = make_dataset(tmp_path / "in")
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        f'active = "cluster"\n\n[profiles.cluster]\nPREFECT_API_URL = "{auth_server}"\n'
        f'PREFECT_API_AUTH_STRING = "{AUTH}"\n')
    done = cli(data, tmp_path / "out", _base_env(home), "--n-workers", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    check_outputs(tmp_path / "out")


def test_tls_address_needs_dask_tls_configuration(tmp_path):
    import dask

    from wdsembed.preflight import PreflightError, check_dask_security

    config = make_config(tmp_path, dask_address="tls://10.0.0.1:8786")
    with dask.config.set({"distributed.comm.tls.ca-file": None, "distributed.comm.tls.client.cert": None}):
        with pytest.raises(PreflightError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
            check_dask_security(config)
    tls = make_tls_files(tmp_path / "tls", "cluster")
    given = {"distributed.comm.tls.ca-file": str(tls["ca"]), "distributed.comm.tls.client.cert": str(tls["cert"]),
             "distributed.comm.tls.client.key": str(tls["key"])}
    with dask.config.set(given):
        check_dask_security(config)
    with dask.config.set(given | {"distributed.comm.tls.client.key": str(tmp_path / "gone.pem")}):
        with pytest.raises(PreflightError, match="not a file"):
            check_dask_security(config)
    with dask.config.set({"distributed.comm.require-encryption": True}):
        with pytest.raises(PreflightError, match="require-encryption"):
            check_dask_security(config.model_copy(update={"dask_address": "tcp://10.0.0.1:8786"}))


def test_dask_scheduler_over_tls(tmp_path, auth_server):
    from distributed import Client
    from distributed.security import Security

    data = make_dataset(tmp_path / "in")
    tls = make_tls_files(tmp_path / "tls", "cluster")
    flags = ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]]
    env = _base_env(tmp_path / "home") | {"PREFECT_API_URL": auth_server, "PREFECT_API_AUTH_STRING": AUTH,
                                          "PREFECT_LOGGING_LEVEL": "INFO"}
    scheduler_file = tmp_path / "scheduler.json"
    procs = [start_process([BIN / "dask", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                            "--no-dashboard", "--scheduler-file", scheduler_file, *flags],
                           tmp_path / "scheduler.log", env)]
    try:
        address = scheduler_address(procs[0], scheduler_file, tmp_path / "scheduler.log")
        assert address.startswith("tls://127.0.0.1:")
        procs.append(start_process([BIN / "dask", "worker", address, "--nthreads", "1", "--nworkers", "1",
                                    "--no-dashboard", *flags], tmp_path / "worker.log", env))
        security = Security(tls_ca_file=str(tls["ca"]), tls_client_cert=str(tls["cert"]),
                            tls_client_key=str(tls["key"]), require_encryption=True)
        with Client(address, security=security, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)

        # Refused: a plain-TCP client, a client with no TLS configuration, and one whose certificate another CA
        # signed (Dask's TLS is mutual). Each refused Client is finalised at once (gc.collect): left to the
        # collector, its __del__ could run inside the next Client's start, and distributed deadlocks there (its
        # loop runner's lock, taken twice by one thread; seen once in the full suite).
        with pytest.raises(Exception):
            Client(address.replace("tls://", "tcp://"), timeout=5)
        gc.collect()
        with pytest.raises(Exception):
            Client(address, security=Security(), timeout=5)
        gc.collect()
        stranger = make_tls_files(tmp_path / "tls", "stranger")
        with pytest.raises(Exception):
            Client(address, timeout=5, security=Security(
                tls_ca_file=str(tls["ca"]), tls_client_cert=str(stranger["cert"]),
                tls_client_key=str(stranger["key"]), require_encryption=True))
        gc.collect()

        # The command line without Dask's TLS configuration: refused in one line naming the settings.
        plain = cli(data, tmp_path / "plain", env, "--dask-address", address)
        assert plain.returncode == 2, plain.stdout + plain.stderr
        assert "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in plain.stderr, plain.stderr

        # With it, from the environment, as DaskTaskRunner's distributed.Client reads it (Security() defaults).
        tls_env = env | {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tls["ca"]),
                         "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tls["cert"]),
                         "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tls["key"]),
                         "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
        done = cli(data, tmp_path / "out", tls_env, "--dask-address", address)
        assert done.returncode == 0, done.stdout + done.stderr
        check_outputs(tmp_path / "out")
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    assert "embed-" in (tmp_path / "worker.log").read_text(), "the TLS worker should have embedded the shards"
