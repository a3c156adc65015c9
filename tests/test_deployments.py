"""The deployments of prefect.yaml on a real Prefect server, driven the way deployments/README.md tells users to:
`prefect server start`, deployments/setup.sh (process pool + variables), `prefect deploy --all`,
`prefect deployment run ... --params`, `prefect worker start --run-once`; and deployments/serve.py.

One server for the module (~20 s to start on 2 cores); the end-to-end run embeds 2 small shards on the CPU with a
tiny timm model with random weights (no download).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from wdsembed.config import _EXTENSION, DASK_ADDRESS_PATTERN, EmbedConfig, _unless

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOW = "wdsembed"  # flows/deployed.py's flow name: deployments are "wdsembed/<name>"
POOL = "wdsembed-gpu"  # prefect.yaml's work pool, created by deployments/setup.sh
SPECS = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}

# A run small enough for 2 shared cores: tiny model, random weights, one CPU Dask worker.
RUN_CONFIG = dict(
    model_name="test_resnet.r160_in1k", pretrained=False, device="cpu", n_workers=1, batch_size=4,
    num_threads_per_worker=1,
)


@dataclass
class Server:
    api: str
    env: dict
    home: Path
    data: Path  # the shards the Prefect variable embed_input names
    out: Path  # embed_output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End a process started in its own session, with what it started (flow runs, Dask workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def prefect(server: Server, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """A `prefect` CLI command run from the project folder, as a user would."""
    done = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        pytest.fail(f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def api(server: Server, method: str, path: str, **kwargs) -> httpx.Response:
    """One call to the test's Prefect API. A 503 is asked again, as Prefect's own client does: on a loaded 2-core
    machine the server's SQLite database is at times locked for a moment (seen once, on a DELETE)."""
    for attempt in range(5):
        response = httpx.request(method, server.api + path, timeout=30, **kwargs)
        if response.status_code != 503:
            break
        time.sleep(0.5 * 2 ** attempt)
    return response


def deployment(server: Server, name: str) -> dict | None:
    r = api(server, "GET", f"/deployments/name/{FLOW}/{name}")
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()


def flow_runs(server: Server, deployment_id: str) -> list[dict]:
    r = api(server, "POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no profile, key or URL leaks in
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),  # sqlite database, results and task cache all in the temp folder
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_CLI_PROMPT="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The schedule is checked on the deployment; no nightly runs are created, so a worker here picks up
        # only the run a test asks for.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(env["PREFECT_API_URL"] + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer within 120 s:\n{_tail(log)}")
            time.sleep(0.5)

        from wdsembed.synthetic import write_demo_dataset

        data, out_dir = home / "shards", home / "embeddings"
        write_demo_dataset(data, n_shards=2, per_shard=6)
        srv = Server(env["PREFECT_API_URL"], env, home, data, out_dir)
        # The documented one-time setup: process pool, pool limit, the input/output variables.
        setup = subprocess.run(["bash", str(ROOT / "deployments/setup.sh"), str(data), str(out_dir)], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        yield srv
    finally:
        _stop(proc)


@pytest.fixture
def deployed(server: Server) -> dict[str, dict]:
    """`prefect deploy --all` from prefect.yaml; the deployments as the API returns them."""
    prefect(server, "deploy", "--all")
    found = {name: deployment(server, name) for name in SPECS}
    assert all(found.values()), f"prefect deploy did not create every deployment of prefect.yaml: {found}"
    return found


@pytest.mark.slow
def test_on_demand_deployment_runs_on_a_process_worker(server: Server, deployed: dict[str, dict]):
    on_demand = deployed["on-demand"]
    assert on_demand["work_pool_name"] == POOL
    # The pull step starts flow runs in this project folder (the worker runs on the deploying host).
    assert on_demand["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    # The flow-run process reads PREFECT_LOGGING_EXTRA_LOGGERS when it imports Prefect, before the flow's code:
    # the package's log lines reach the run's logs only through the pool's job variables (flows/prefect_env.py).
    assert on_demand["job_variables"]["env"] == {"PREFECT_LOGGING_EXTRA_LOGGERS": "wdsembed",
                                                 "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}
    out = server.home / "on-demand-output"
    config = dict(input=str(server.data), output=str(out), **RUN_CONFIG)

    # A wrong parameter is refused when the run is created, naming the field, and no run exists.
    for wrong, message in [
        ({"batch_size": 0}, "config.batch_size"),
        ({"device": "tpu"}, "config.device"),
        # Parameters are stored and shown in the UI: credentials belong in the worker's environment.
        ({"storage_options": {"secret": "x"}}, "config.storage_options"),
    ]:
        bad = prefect(server, "deployment", "run", f"{FLOW}/on-demand", "--params",
                      json.dumps({"config": {**config, **wrong}}), check=False)
        said = " ".join((bad.stdout + bad.stderr).split())
        assert bad.returncode != 0 and f"Validation failed for field '{message}'" in said, said
    assert flow_runs(server, on_demand["id"]) == []

    started = prefect(server, "deployment", "run", f"{FLOW}/on-demand", "--params", json.dumps({"config": config}))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)

    # One polling round; --run-once returns once the runs it submitted have ended.
    worker_log = server.home / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"],
            cwd=server.home, env=server.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        worker.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish the run within 240 s:\n{_tail(worker_log)}")
    finally:
        _stop(worker)

    state = api(server, "GET", f"/flow_runs/{run_id}").json()["state"]
    assert state["type"] == "COMPLETED", f"{state['type']}: {state['message']}\n{_tail(worker_log)}"

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"]["shards"] == 2 and manifest["failed_shards"] == {}, manifest
    assert manifest["config"]["model_name"] == RUN_CONFIG["model_name"]  # the run's parameters, not the defaults
    for stem in ("00000", "00001"):
        table = pq.read_table(out / f"{stem}.parquet")
        embedded = table.num_rows - table.column("image_embedding").null_count
        assert embedded == 6, f"{stem}: {embedded} of {table.num_rows} rows embedded"


def _summary(d: dict) -> dict:
    """What a deployment is, independent of how it was registered."""
    return {
        "name": d["name"],
        "description": d["description"],
        "tags": sorted(d["tags"]),
        "parameters": d["parameters"],
        "parameter_openapi_schema": d["parameter_openapi_schema"],
        "enforce_parameter_schema": d["enforce_parameter_schema"],
        "schedules": [(s["schedule"], s["active"]) for s in d["schedules"]],
        "concurrency_limit": (d["global_concurrency_limit"] or {}).get("limit"),
        "concurrency_options": d["concurrency_options"],
    }


@pytest.mark.slow
def test_schedule_and_serve_register_the_same_deployments(server: Server, deployed: dict[str, dict]):
    nightly, on_demand = deployed["nightly"], deployed["on-demand"]

    # The nightly deployment carries prefect.yaml's schedule, active; the on-demand one has none.
    want = SPECS["nightly"]["schedules"]
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in nightly["schedules"]] == [
        (s["cron"], s["timezone"], s["active"]) for s in want
    ] and want
    assert on_demand["schedules"] == []
    # One run at a time per deployment; a nightly run that overlaps the previous one is cancelled, not queued.
    assert nightly["global_concurrency_limit"]["limit"] == on_demand["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    # Defaults come from the Prefect variables set by setup.sh; the UI's form documents every field.
    for d in (nightly, on_demand):
        assert d["parameters"] == {"config": {"input": str(server.data), "output": str(server.out)}}
        assert d["enforce_parameter_schema"] is True
        fields = d["parameter_openapi_schema"]["definitions"]["EmbedConfig"]["properties"]
        assert set(fields) == set(EmbedConfig.model_fields)
        assert all(f.get("description") for f in fields.values()), [n for n, f in fields.items() if not f.get("description")]

    # While `prefect deploy`'s deployments are in place, serve.py refuses to take them over from their pool.
    refused = subprocess.run([sys.executable, str(ROOT / "deployments/serve.py")], cwd=server.home, env=server.env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.startswith("error: already deployed to a work pool by `prefect deploy`: "
                                     f"{FLOW}/nightly (work pool '{POOL}')"), refused.stderr
    assert f"prefect deployment delete {FLOW}/on-demand" in refused.stderr, refused.stderr
    assert all(deployment(server, name)["work_pool_name"] == POOL for name in SPECS)  # left as they were

    # serve.py must register these deployments itself: remove them first.
    before = {name: _summary(d) for name, d in deployed.items()}
    for d in deployed.values():
        api(server, "DELETE", f"/deployments/{d['id']}").raise_for_status()
    serve_log = server.home / "serve.log"
    with open(serve_log, "w") as log:
        serving = subprocess.Popen(
            [sys.executable, str(ROOT / "deployments/serve.py")], cwd=server.home, env=server.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not all((served := {name: deployment(server, name) for name in SPECS}).values()):
            if serving.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve.py did not register {list(SPECS)}:\n{_tail(serve_log)}")
            time.sleep(1)
        assert all(d["work_pool_name"] is None for d in served.values())  # served by the process, not a pool
        assert {name: _summary(d) for name, d in served.items()} == before
    finally:
        _stop(serving)
        # Stopping serve pauses its deployments; leave none behind for the other test's `prefect deploy`.
        for name in SPECS:
            if d := deployment(server, name):
                api(server, "DELETE", f"/deployments/{d['id']}")


def test_deployed_flow_refuses_an_unusable_config_before_starting_a_cluster(tmp_path, monkeypatch):
    """What the JSON schema cannot check (a missing folder, an unknown model) fails the run at once, saying why."""
    import flows.deployed
    from wdsembed.inputs import InputError

    monkeypatch.setattr(flows.deployed, "run", lambda config: pytest.fail("a cluster was started"))
    config = EmbedConfig(input=str(tmp_path / "missing"), output=str(tmp_path / "out"), **RUN_CONFIG)
    with pytest.raises(InputError, match="missing"):
        flows.deployed.embed.fn(config)
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=2)  # shards to embed: the model is what is wrong
    with pytest.raises(InputError, match="unknown timm model"):
        flows.deployed.embed.fn(config.model_copy(update={"input": str(tmp_path / "in"), "model_name": "resnet5O"}))


@pytest.mark.slow
def test_the_deployed_flow_keeps_the_decoders_lines_off_its_processes_stderr(tmp_path, capfd, prefect_api):
    """A run from a deployment printed DALI's decoder lines ('[ERROR] [png_parser] ...', twice per bad image) on
    the stderr of its flow-run process and Dask workers, which a process worker shows as its own output: thousands
    of lines for a large run of bad images, whose reasons are on their rows and in the UI's summary. They now go to
    the log at DEBUG, as the command's do."""
    import flows.deployed
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=6, corrupt_per_shard=2)  # a cut JPEG, a damaged PNG
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), **RUN_CONFIG)
    manifest = flows.deployed.embed.fn(config)
    assert any("damaged PNG" in c["reason"] for c in manifest["rows_without_embedding"]["causes"]), manifest
    err = capfd.readouterr().err
    assert "libpng" not in err and "[ERROR]" not in err, err[-3000:]


BAD_STORE_URLS = ["s3://", "s3:///", "S3A://", "gs://", "s3:", "s3:/bucket/x", "GS:/bucket", "memory:x"]
GOOD_STORE_URLS = ["/data/shards", "data/shards", "./s3:x", "/data/s3:/x", "s3://bucket/prefix", "s3://bucket",
                   "S3://bucket/p", "gs://bucket/p", "gcs://b", "file:///data/x", "simplecache::s3://b/x",
                   "C:/data", "memory://x", "https://host:9000/x"]


@pytest.mark.parametrize("field", ["input", "output", "result_storage"])
def test_the_run_form_refuses_a_store_url_without_a_bucket_or_its_slashes(field):
    """EmbedConfig refuses an s3:// URL that names no bucket, or a store's scheme with one slash (s3:/bucket/x, a
    local folder 's3:' otherwise); the deployed flow's run form took them, so a run started from the UI or API
    was accepted and stored, and failed only in its flow run. The form's schema (the same validate() as Prefect's
    server) now refuses what EmbedConfig refuses, and takes what it takes."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as FormError
    from prefect.utilities.schema_tools import validate

    from flows.deployed import embed

    schema = parameter_schema(embed).model_dump()
    base = {"input": "s3://b/in", "output": "s3://b/out"}
    for url in BAD_STORE_URLS:
        config = base | {field: url}
        with pytest.raises(ValueError):
            EmbedConfig(**config)
        with pytest.raises(FormError):
            validate({"config": config}, schema, raise_on_error=True)
    for url in GOOD_STORE_URLS:
        config = base | {field: url}
        EmbedConfig(**config)
        validate({"config": config}, schema, raise_on_error=True)
    validate({"config": base | {"result_storage": None}}, schema, raise_on_error=True)


@pytest.mark.slow
def test_a_run_refused_for_its_parameters_says_why_in_words(server: Server, deployed: dict[str, dict]):
    """The server refused a store URL with credentials or in an incomplete form, or a credential among the storage
    options, with jsonschema's message: "'s3:/bkt/shards' should not be valid under {'pattern': ...}", the pattern
    thousands of characters long and the value quoted, a credential too. It now says what is expected, in words,
    naming the field, in a few hundred characters: as `prefect deployment run` prints it, and as the UI's run form
    shows it under the field (its /ui/schemas/validate)."""
    on_demand = deployed["on-demand"]
    config = {"input": str(server.data), "output": str(server.home / "refused"), "model_name": "resnet18"}
    credentials = "credentials come from the environment"
    for wrong, field, words, secret in [
        ({"input": "s3:/bkt/shards"}, "input", "nor a scheme with one slash (s3:/BUCKET/x)", None),
        ({"output": "s3://"}, "output", "not one that names no bucket (s3://)", None),
        ({"input": "s3://user:pw@bkt/x"}, "input", credentials, "user:pw"),
        ({"result_storage": "s3://AKIAEXAMPLEKEY@bkt/r"}, "result_storage", credentials, "AKIAEXAMPLEKEY"),
        ({"model_name": "https://user:pw@host/m"}, "model_name", credentials, "user:pw"),
        ({"storage_options": {"key": "x"}}, "storage_options", credentials, None),
        ({"storage_options": {"endpoint_url": "http://user:pw@host"}}, "storage_options.endpoint_url", credentials,
         "user:pw"),
        ({"input": ""}, "input", "a folder or URL holding the shards (/data/shards, s3://BUCKET/PREFIX), not empty",
         None),
        ({"dask_address": "scheduler"}, "dask_address", "a Dask scheduler's address with its port", None),
        ({"dask_address": "tcp://user:pw@scheduler:8786"}, "dask_address", credentials, "user:pw"),
    ]:
        bad = prefect(server, "deployment", "run", f"{FLOW}/on-demand", "--params",
                      json.dumps({"config": {**config, **wrong}}), check=False)
        said = " ".join((bad.stdout + bad.stderr).split())
        said = said[said.find("Error creating flow run"):]
        assert bad.returncode != 0 and said.startswith(
            f"Error creating flow run: Validation failed for field 'config.{field}'."), said
        assert words in said and len(said) < 450, said
        assert secret is None or secret not in said, said

        form = api(server, "POST", "/ui/schemas/validate",
                   json={"schema": on_demand["parameter_openapi_schema"], "values": {"config": {**config, **wrong}}})
        form.raise_for_status()
        shown = form.json()
        assert shown["valid"] is False, shown
        errors = shown["errors"][0]["errors"]  # config's
        for part in field.split("."):
            (errors,) = [e["errors"] for e in errors if e.get("property") == part]
        assert len(errors) == 1 and words in errors[0] and len(errors[0]) < 350 and "pattern" not in errors[0], errors
        assert secret is None or secret not in errors[0], errors
    assert flow_runs(server, on_demand["id"]) == []


def test_the_run_forms_refusals_in_words_refuse_every_value_they_find():
    """Each rule that says in words what it expects (`then`'s const) refuses every string its `if` finds: what it
    expects is no such string, which would be taken."""
    from prefect.utilities.schema_tools import validate

    def rules(node):
        if isinstance(node, dict):
            if "if" in node:
                yield node
            for value in node.values():
                yield from rules(value)

    found = list(rules(EmbedConfig.model_json_schema()))
    # credentials, an incomplete store URL, a credential's option name, blanks, a Dask address, an extension
    assert len(found) >= 6, found
    for rule in found:
        # `then` takes no value: `const` takes one, which `not` refuses. Where the `if` finds the expected text
        # (what a value must match is said in words), that text is refused too.
        assert validate(rule["then"]["const"], rule["then"]), rule["then"]
        assert [e.validator for e in validate("any other value", rule["then"])] == ["const"], rule["then"]  # one reason


@pytest.mark.parametrize("pattern", [r"\S", DASK_ADDRESS_PATTERN, _EXTENSION])
def test_a_pattern_the_run_form_says_in_words_finds_exactly_what_its_own_does_not(pattern):
    """The rules that say in words what a value must match (_refused) find what its pattern does not find, as
    jsonschema looks (re.search): a value at its end ('h:8786\\n'), blanks, new lines and all."""
    import random
    import re

    pieces = ["", " ", "\n", "\t", "\u00a0", "tcp://", "inproc://", "h", "[fd00::1]", ":", "8786", "123456", "/", "@",
              ".", ",", "png", "seg", "x y"]
    rng = random.Random(0)
    values = {"".join(rng.choice(pieces) for _ in range(rng.randrange(6))) for _ in range(20_000)}
    for value in values:
        assert (re.search(_unless(pattern), value) is None) == (re.search(pattern, value) is not None), repr(value)


# The run form's typical mistakes and what its refusal says. jsonschema's own words were "'' does not match '\\S'"
# for an empty input, output or model, the pattern itself for a Dask address or an image extension (the value
# quoted, a credential with it: an address with one got both refusals), and under the UI form's field, for an
# optional number out of range, "0 is not valid under any of the given schemas".
FORM_MISTAKES = [
    ("input", "", "'a folder or URL holding the shards (/data/shards, s3://BUCKET/PREFIX), not empty' was expected"),
    ("input", " \t", "a folder or URL holding the shards"),
    ("output", "", "'a folder or URL for the outputs (/data/embeddings, s3://BUCKET/PREFIX), not empty' was expected"),
    ("model_name", " ", "'a timm model name (resnet50.a1_in1k), not empty' was expected"),
    ("dask_address", "scheduler", "a Dask scheduler's address with its port (tcp://HOST:8786, tls://HOST:8786, "
                                  "HOST:8786), or empty for a local cluster\" was expected"),
    ("dask_address", "tcp://scheduler", "a Dask scheduler's address with its port"),
    ("dask_address", "scheduler:123456", "a Dask scheduler's address with its port"),
    ("dask_address", " ", "a Dask scheduler's address with its port"),
    ("dask_address", "tcp://user:hunter2@scheduler:8786", "credentials come from the environment"),
    ("image_extensions", ["jpg", "seg.png"], "one image extension per item: the part of a member's name after its "
                                             "last dot (png for 00001.seg.png)"),
    ("image_extensions", ["jpg,png"], "one image extension per item"),
    ("image_extensions", ["s3://AKIAEXAMPLE:hunter2@b/x"], "one image extension per item"),
    ("n_workers", 0, "0 is less than the minimum of 1"),
    ("shards_per_task", 10001, "10001 is greater than the maximum of 10000"),
    ("min_fidelity", 2, "2 is greater than the maximum of 1.0"),
    ("max_image_pixels", -1, "-1 is less than the minimum of 0"),
]


@pytest.mark.parametrize("field,value,words", FORM_MISTAKES, ids=lambda v: repr(v)[:20])
def test_the_run_form_says_what_each_field_expects(field, value, words):
    """Each mistake is refused as EmbedConfig refuses it, with one reason in words: the API's (Prefect's validate(),
    as the server checks a deployment run's parameters) and the UI form's under the field (its /ui/schemas/validate:
    every error, on the schema it preprocesses), without the pattern or a credential."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as FormError
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.schema_tools.validation import build_error_obj, preprocess_schema

    from flows.deployed import embed

    schema = parameter_schema(embed).model_dump()
    config = {"input": "s3://b/in", "output": "s3://b/out", field: value}
    with pytest.raises(ValueError):
        EmbedConfig(**config)
    with pytest.raises(FormError) as refused:
        validate({"config": config}, schema, raise_on_error=True)
    said = str(refused.value)
    item = f"[{len(value) - 1}]" if isinstance(value, list) else ""  # the last item is the wrong one
    assert said.startswith(f"Validation failed for field 'config.{field}{item}'. Failure reason: "), said
    assert words in said and "hunter2" not in said and len(said) < 450, said

    errors = build_error_obj(validate({"config": config}, preprocess_schema(schema), preprocess=False))["errors"]
    (errors,) = [e["errors"] for e in errors if e.get("property") == "config"]
    (errors,) = [e["errors"] for e in errors if e.get("property") == field]
    if item:
        (errors,) = [e["errors"] for e in errors if e.get("index") == len(value) - 1]
    assert len(errors) == 1 and words in errors[0], errors
    assert not any(jargon in errors[0] for jargon in ("match", "pattern", "any of the given", "hunter2")), errors


def test_the_run_form_takes_what_embedconfig_takes_in_the_fields_it_says_in_words():
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from flows.deployed import embed

    schema = parameter_schema(embed).model_dump()
    for field, value in [("input", "./s3:x"), ("input", " /data/shards"), ("model_name", "resnet18"),
                         ("dask_address", None), ("dask_address", ""), ("dask_address", "tcp://h:8786"),
                         ("dask_address", "h:8786"), ("dask_address", "tls://[fd00::1]:8786"),
                         ("dask_address", "inproc://192.168.1.2/123/1"), ("image_extensions", [" JPG", ".png "]),
                         ("n_workers", None), ("n_workers", 1), ("shards_per_task", 10000), ("min_fidelity", -1),
                         ("min_fidelity", None), ("max_image_pixels", 0), ("max_image_pixels", None)]:
        config = {"input": "s3://b/in", "output": "s3://b/out", field: value}
        EmbedConfig(**config)
        assert validate({"config": config}, schema) == [], (field, value)


def _serve(server: Server, log: Path, **env: str) -> subprocess.Popen:
    """deployments/serve.py in a session of its own (its flow runs and their Dask workers join it), once it has
    registered the deployments."""
    for name in SPECS:  # `prefect deploy`'s, to a work pool, would make serve.py refuse
        if d := deployment(server, name):
            api(server, "DELETE", f"/deployments/{d['id']}").raise_for_status()
    with open(log, "w") as out:
        serving = subprocess.Popen([sys.executable, str(ROOT / "deployments/serve.py")], cwd=server.home,
                                   env={**server.env, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((d := deployment(server, "on-demand")) and d["work_pool_name"] is None and not d["paused"]):
        if serving.poll() is not None or time.monotonic() > deadline:
            _stop(serving)
            pytest.fail(f"serve.py did not register its deployments:\n{_tail(log)}")
        time.sleep(1)
    return serving


def _group_left(pgid: int, expected: int, settle_s: float = 15) -> list[str]:
    """The command lines of the processes still running in process group `pgid`, once no more than `expected` are,
    or those that are ending have had `settle_s` seconds to (zombies, ended and waiting for their parent, are not
    counted)."""
    deadline = time.monotonic() + settle_s
    while True:
        left = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.getpgid(int(proc.name)) == pgid and \
                        (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (ProcessLookupError, OSError, IndexError):
                continue
        if len(left) <= expected or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _final_state(server: Server, run_id: str, log: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (state := api(server, "GET", f"/flow_runs/{run_id}").json()["state"])["type"] in (
            "SCHEDULED", "PENDING", "RUNNING", "CANCELLING"):
        if time.monotonic() > deadline:
            pytest.fail(f"flow run still {state['type']} after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(1)
    return state


@pytest.mark.slow
def test_a_served_run_cancelled_or_stopped_with_serve_releases_everything_and_resumes(server: Server):
    """A served run cancelled from the UI (`prefect flow-run cancel`), or stopped by Ctrl-C on serve.py, ends
    Cancelled with its Dask workers gone, OUTPUT's claim released and only whole outputs; the next run resumes."""
    out = server.home / "cancelled-output"
    config = dict(input=str(server.data), output=str(out), **RUN_CONFIG)
    hold = server.home / "hold.json"  # shard 00001 held on its worker, so each run is stopped mid-run
    hold.write_text(json.dumps({"00001": {"fail_attempts": 0, "hold_s": 120}}))
    held = Path(f"{hold}.00001.attempts")
    log = server.home / "serve-cancel.log"
    serving = _serve(server, log, WDSEMBED_FAULTS=str(hold))

    def held_run() -> str:
        held.unlink(missing_ok=True)
        d = deployment(server, "on-demand")
        run = api(server, "POST", f"/deployments/{d['id']}/create_flow_run", json={"parameters": {"config": config}})
        run.raise_for_status()
        deadline = time.monotonic() + 180
        while not held.exists():
            if serving.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run did not reach shard 00001:\n{_tail(log)}")
            time.sleep(0.2)
        assert (out / "_claim.json").exists()
        return run.json()["id"]

    def left_whole_and_free(state: dict) -> None:
        assert state["type"] == "CANCELLED", f"{state['type']}: {state['message']}\n{_tail(log)}"
        assert not (out / "_claim.json").exists(), (out / "_claim.json").read_text()  # the next run starts at once
        assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]  # 00001 was held: not written
        assert not [p for p in out.rglob(".*") if "tmp" in p.name]
        assert pq.read_table(out / "00000.parquet").num_rows == 8

    try:
        # From the UI (its Cancel button sets the same state): the runner stops the flow-run process.
        cancelled = held_run()
        prefect(server, "flow-run", "cancel", cancelled)
        left_whole_and_free(_final_state(server, cancelled, log))
        assert len(left := _group_left(serving.pid, 1)) == 1, left  # serve.py alone: no flow-run process, Dask worker
        assert serving.poll() is None

        # Ctrl-C in serve.py's terminal reaches its whole process group: it stops as on SIGTERM, cancelling the run.
        stopped = held_run()
        os.killpg(serving.pid, signal.SIGINT)
        serving.wait(timeout=90)
        left_whole_and_free(_final_state(server, stopped, log))
        assert _group_left(serving.pid, 0) == []  # no flow-run process, Dask worker or resource tracker left
    finally:
        _stop(serving)

    # Served again, the same run resumes: 00000 comes back cached, the held shard is computed.
    hold.write_text("{}")
    serving = _serve(server, log)
    try:
        d = deployment(server, "on-demand")
        run = api(server, "POST", f"/deployments/{d['id']}/create_flow_run", json={"parameters": {"config": config}})
        state = _final_state(server, run.json()["id"], log, timeout=240)
        assert state["type"] == "COMPLETED", f"{state['type']}: {state['message']}\n{_tail(log)}"
    finally:
        _stop(serving)
        for name in SPECS:
            if d := deployment(server, name):
                api(server, "DELETE", f"/deployments/{d['id']}")
    shards = json.loads((out / "_manifest.json").read_text())["shards"]
    assert {stem: s["status"] for stem, s in shards.items()} == {"00000": "cached", "00001": "computed"}, shards


@pytest.mark.slow
def test_a_served_run_killed_outright_ends_crashed_whole_and_the_next_run_takes_its_claim_over(server: Server):
    """A flow-run process killed outright (SIGKILL: the OOM killer, `kill -9`) reports nothing: the run, its subflow
    and its task runs end Crashed all the same, and the next run takes its claim on OUTPUT over, saying so."""
    out = server.home / "killed-output"
    config = dict(input=str(server.data), output=str(out), **RUN_CONFIG)
    hold = server.home / "hold-kill.json"
    hold.write_text(json.dumps({"00001": {"fail_attempts": 0, "hold_s": 120}}))
    held = Path(f"{hold}.00001.attempts")
    log = server.home / "serve-kill.log"
    serving = _serve(server, log, WDSEMBED_FAULTS=str(hold))
    try:
        d = deployment(server, "on-demand")
        killed = api(server, "POST", f"/deployments/{d['id']}/create_flow_run",
                     json={"parameters": {"config": config}}).json()["id"]
        deadline = time.monotonic() + 180
        while not held.exists():
            assert serving.poll() is None and time.monotonic() < deadline, _tail(log)
            time.sleep(0.2)
        claim = json.loads((out / "_claim.json").read_text())
        os.kill(claim["pid"], signal.SIGKILL)  # the flow-run process, which holds the claim
        state = _final_state(server, killed, log)
        assert state["type"] == "CRASHED", f"{state['type']}: {state['message']}\n{_tail(log)}"
        subflows = api(server, "POST", "/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": [killed]}}}).json()
        assert subflows  # embed-shards ran
        task_runs = api(server, "POST", "/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [killed, *(s["id"] for s in subflows)]}}}).json()
        deadline = time.monotonic() + 30  # the hook runs as the run is marked Crashed: give it its moment
        while (running := [(r["name"], r["state"]["type"]) for r in subflows + task_runs
                           if r["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]):
            if time.monotonic() > deadline:
                pytest.fail(f"still {running} after the run crashed:\n{_tail(log)}")
            time.sleep(1)
            subflows = api(server, "POST", "/flow_runs/filter", json={
                "flow_runs": {"parent_flow_run_id": {"any_": [killed]}}}).json()
            task_runs = api(server, "POST", "/task_runs/filter", json={
                "flow_runs": {"id": {"any_": [killed, *(s["id"] for s in subflows)]}}}).json()
        assert (out / "_claim.json").exists()  # nothing could remove it
        assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]

        # The next run starts at once on the same host, taking over the dead run's claim, with a line that says so.
        hold.write_text("{}")
        again = api(server, "POST", f"/deployments/{d['id']}/create_flow_run",
                    json={"parameters": {"config": config}}).json()["id"]
        state = _final_state(server, again, log, timeout=240)
        assert state["type"] == "COMPLETED", f"{state['type']}: {state['message']}\n{_tail(log)}"
        said = " ".join(_tail(log, 100_000).split())
        assert (f"took over the claim of run {claim['run']} (pid {claim['pid']} on host {claim['host']}" in said
                and f"its process (pid {claim['pid']} on this host) is gone" in said), said[-3000:]
        assert not (out / "_claim.json").exists()
    finally:
        _stop(serving)
        for name in SPECS:
            if d := deployment(server, name):
                api(server, "DELETE", f"/deployments/{d['id']}")


def test_the_crash_hook_marks_every_task_run_left_running_not_only_the_first_page(prefect_api):
    """The API answers a filter with at most 200 runs; a crashed run of many shards leaves more task runs than that
    Running, and each of them ends Crashed."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from flows.deployed import crash_what_it_left_running

    @flow(name="crashed-with-many-tasks")
    def crashed() -> None: ...

    @task(name="embed-shard")
    def shard() -> None: ...

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(crashed, state=Running())
        ids = [client.create_task_run(shard, flow_run.id, dynamic_key=str(i), state=Running()).id for i in range(230)]
        crash_what_it_left_running(crashed, flow_run, Crashed(message="killed outright"))
        states = {client.read_task_run(i).state.type.value for i in ids}
    assert states == {"CRASHED"}


def test_a_run_refused_for_an_output_in_use_ends_failed_naming_the_flow_run_that_holds_it(tmp_path, caplog,
                                                                                           prefect_api):
    """Two runs on one OUTPUT (a schedule faster than a run, a colleague's run from the UI): the second ends Failed
    at once, and its message names the first by its Prefect flow run (name and page), which an operator can open
    or cancel in the UI; it named only a claim id, a pid and a host. Its log says so in one line, without the
    traceback through Prefect's engine that it had."""
    import flows.deployed
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=2)
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), **RUN_CONFIG)
    # The first run: a flow run in its own process, holding OUTPUT's claim as the deployed flow takes it.
    holding = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from prefect import flow\n"
        "from flows.embed import claim_output\n"
        "from wdsembed.config import EmbedConfig\n"
        "@flow(name='holds-the-output')\n"
        "def first(config: EmbedConfig):\n"
        "    with claim_output(config):\n"
        "        print('held', flush=True)\n"
        "        sys.stdin.read()\n"  # held until the test closes its stdin
        "first(EmbedConfig.model_validate_json(sys.argv[1]))\n"), config.model_dump_json()],
        cwd=ROOT, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert "held" in holding.stdout.readline()
        with get_client(sync_client=True) as client:
            (first,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["holds-the-output"])))
        state = flows.deployed.embed(config, return_state=True)
        assert state.is_failed(), state
        assert "OutputClaimedError" in state.message and f"Prefect flow run {first.name!r}" in state.message, \
            state.message
        assert str(first.id) in state.message, state.message  # its page in the UI
        _ended_in_one_line(caplog, "OutputClaimedError")
    finally:
        holding.stdin.close()
        holding.wait(timeout=60)
    assert not (tmp_path / "out" / "_claim.json").exists()


@pytest.mark.parametrize("wrong", ["input", "model_name"])
def test_a_deployed_run_refused_by_its_checks_says_why_in_one_line(wrong, tmp_path, caplog, prefect_api):
    """A run started from the UI with an input that does not exist, or a model timm does not have, ends Failed
    before any work with the reason in its state, and its log says it in one line, as the command does: it showed
    a traceback through Prefect's engine and the checks, which tells an operator nothing more."""
    import flows.deployed
    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=2)
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), **RUN_CONFIG)
    config = config.model_copy(update={"input": str(tmp_path / "missing")} if wrong == "input" else
                               {"model_name": "resnet5O"})
    state = flows.deployed.embed(config, return_state=True)
    assert state.is_failed(), state
    assert ("does not exist" if wrong == "input" else "unknown timm model 'resnet5O'") in state.message, state.message
    _ended_in_one_line(caplog, "InputError")
    assert not (tmp_path / "out").exists()  # refused before any work


def _ended_in_one_line(caplog, error: str) -> None:
    """The flow run's log (on its terminal and in the UI) says the run ended on `error`, in one line: the record as
    its handlers get it, after the run logger's filters, carries no traceback."""
    (ended,) = [r for r in caplog.records if r.getMessage().startswith("Encountered exception during execution")]
    assert ended.getMessage().startswith(f"Encountered exception during execution: {error}("), ended.getMessage()
    assert ended.exc_info is None and not ended.exc_text, "a traceback is logged"
