"""The command line: every EmbedConfig field has a flag (and reaches the API and the deployment form), the installed
command starts, mistakes are refused in seconds with exit code 2 before any work, and a failed run says what it did.

None of these tests starts a Prefect server: the run function handed to `main` records its calls instead.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from conftest import CANNOT_DROP_OVERRIDE, TINY_MODEL, without_file_permission_override
from processes import DUMP_STACKS, ended
from wdsembed import cli
from wdsembed.config import EmbedConfig, field_default

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- helpers


def sample_value(name: str):
    """A valid value of the field that differs from its default, derived from the field's type."""
    field = EmbedConfig.model_fields[name]
    annotation = cli._unwrap_optional(field.annotation)
    default = None if field.is_required() else field_default(name)
    if annotation is bool:
        return not default
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != default)
    if typing.get_origin(annotation) is tuple:
        return ("png", "gif")
    if typing.get_origin(annotation) is dict:
        return {"auto_mkdir": "true"}  # an option local folders take
    if annotation is int:
        return 7 if default != 7 else 8
    if annotation is float:
        return 0.5
    if name == "dask_address":  # a string of a form: a scheduler's address with its port
        return "tcp://scheduler:8786"
    if annotation is str:
        return f"/tmp/{name}-value"
    raise AssertionError(f"no sample for {name}: {field.annotation!r}")


def cli_argv(name: str, value) -> list[str]:
    if name == "input":
        return [value]
    flag = cli.flag_names(name)[0]
    if isinstance(value, bool):
        return [flag]
    if isinstance(value, tuple):
        return [flag, ",".join(value)]
    if isinstance(value, dict):
        return [arg for k, v in value.items() for arg in (flag, f"{k}={v}")]
    return [flag, str(value)]


def run_main(argv: list[str], capsys) -> tuple[int, str, list, float]:
    """cli.main in this process with a run function that records whether any work was started."""
    started = []
    begin = time.monotonic()
    code = cli.main(lambda config, on_shard_done=None, all_finished=None: started.append(config) or {}, argv)
    return code, capsys.readouterr().err, started, time.monotonic() - begin


@pytest.fixture
def shards(tmp_path) -> Path:
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    write_shard(tmp_path / "in", "00000", [ShardSample(encode_image(make_image(32, 24, seed=i), "bmp"), ext="bmp")
                                           for i in range(2)])
    return tmp_path / "in"


# --------------------------------------------------------------------------------------------------- task A


def test_every_field_reachable_from_cli_api_and_form():
    """Generated from EmbedConfig.model_fields: a field added later is checked with no change here."""
    from prefect.utilities.callables import parameter_schema

    from flows.deployed import embed
    from wdsembed.api import FLOW_ONLY, TimmImageEmbedder

    schema = parameter_schema(embed.fn).model_dump()
    form_fields = schema["definitions"]["EmbedConfig"]["properties"]
    parser = cli.build_parser()
    base = {"input": "/tmp/in", "output": "/tmp/out"}
    for name in EmbedConfig.model_fields:
        value = sample_value(name)
        # CLI: the flag exists and sets exactly this field
        argv = cli_argv(name, value) + (["/tmp/in"] if name != "input" else []) \
            + (["--output", "/tmp/out"] if name != "output" else [])
        config = EmbedConfig(**cli.values_from_args(parser.parse_args(argv)))
        assert getattr(config, name) == value, (name, argv)
        # API: any field by keyword (input and output go to the call), but those of the flow's own cluster and
        # task runs, which it refuses (test_api_refuses_the_flows_cluster_fields)
        if name in base:
            assert getattr(TimmImageEmbedder().config(**(base | {name: value})), name) == value
        elif name in FLOW_ONLY:
            with pytest.raises(ValueError, match=name):
                TimmImageEmbedder(**{name: value})
        else:
            assert getattr(TimmImageEmbedder(**{name: value}).config(**base), name) == value, name
        # deployment form: the field is in the run form, described
        assert name in form_fields and form_fields[name].get("description"), name


def test_existing_flags_keep_working(shards, tmp_path):
    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--checkpoint", "w.pth",
            "--batch-size", "4", "--num-threads", "2", "--no-normalize", "--no-autocast", "--no-index-files",
            "--max-image-pixels", "0", "--index-cache-dir", "/tmp/idx", "--id-column", "id",
            "--embedding-column", "emb", "--embedding", "pooled", "--device", "cpu", "--force",
            "--dask-address", "tcp://h:8786", "--n-workers", "3", "--storage-option", "anon=true",
            "--storage-option", "endpoint_url=http://127.0.0.1:9000", "--shards-per-task", "5",
            "--result-storage", "/tmp/results", "--error-column", "why", "--image-extensions", "jpg,png",
            "--image-extensions", "webp"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert config.model_dump() == {
        "input": str(shards), "output": str(tmp_path / "out"), "model_name": TINY_MODEL, "pretrained": False,
        "checkpoint": os.path.abspath("w.pth"), "embedding": "pooled", "batch_size": 4, "num_threads_per_worker": 2,
        "normalize_embeddings": False, "autocast": False, "use_index_files": False, "index_cache_dir": "/tmp/idx",
        "id_column": "id", "embedding_column": "emb", "error_column": "why", "image_extensions": ("jpg", "png", "webp"),
        "max_image_pixels": 0, "device": "cpu", "force": True,
        "storage_options": {"anon": "true", "endpoint_url": "http://127.0.0.1:9000"}, "result_storage": "/tmp/results",
        "dask_address": "tcp://h:8786", "n_workers": 3, "shards_per_task": 5,
    } | {k: getattr(config, k) for k in EmbedConfig.model_fields if k not in (
        "input output model_name pretrained checkpoint embedding batch_size num_threads_per_worker "
        "normalize_embeddings autocast use_index_files index_cache_dir id_column embedding_column error_column "
        "image_extensions max_image_pixels device force storage_options result_storage dask_address n_workers "
        "shards_per_task").split()}  # fields added since keep their defaults
    # the long names work too, and no flag means EmbedConfig's default
    long = cli.config_from_args(cli.build_parser().parse_args(
        ["in", "-o", "out", "--model-name", "m", "--num-threads-per-worker", "3", "--no-normalize-embeddings"]))
    assert (long.model_name, long.num_threads_per_worker, long.normalize_embeddings) == ("m", 3, False)
    assert cli.config_from_args(cli.build_parser().parse_args(["in", "-o", "out"])) == EmbedConfig(input="in",
                                                                                                   output="out")


def test_malformed_storage_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["in", "-o", "out", "--storage-option", "endpoint_url"])
    assert exit_.value.code == 2
    assert "takes KEY=VALUE, got 'endpoint_url'" in capsys.readouterr().err


def test_api_defaults_are_the_models():
    import inspect

    from wdsembed.api import TimmImageEmbedder

    params = inspect.signature(TimmImageEmbedder).parameters
    assert list(params)[:7] == ["model_name", "pretrained", "batch_size", "num_threads_per_worker",
                                "normalize_embeddings", "autocast", "use_index_files"]
    for name in list(params)[:7]:
        assert params[name].default == field_default(name), name


def test_api_validates_without_placeholder_paths():
    from pydantic import ValidationError

    from wdsembed.api import TimmImageEmbedder

    with pytest.raises(ValidationError) as err:
        TimmImageEmbedder(batch_size=0, storage_options={"endpoint_url": "http://x"})
    text = str(err.value)
    assert "batch_size" in text and "input" not in text and "output" not in text and "./out" not in text
    with pytest.raises(ValidationError, match="embedding"):
        TimmImageEmbedder(embedding="logits")
    with pytest.raises(TypeError, match="given to the call"):
        TimmImageEmbedder(output="/tmp/out")


@pytest.mark.parametrize("name, value", [("n_workers", 2), ("workers_per_gpu", 2), ("shards_per_task", 4)])
def test_api_refuses_the_flows_cluster_fields(name, value, shards, tmp_path):
    """The API starts no Dask cluster and makes no Prefect task runs: a field that only shapes those is refused,
    when the embedder is built and by run_shards, saying where it applies, never taken and ignored."""
    from wdsembed.api import TimmImageEmbedder, run_shards

    with pytest.raises(ValueError, match=f"{name}={value}.*(get_client|the flow)"):
        TimmImageEmbedder(TINY_MODEL, **{name: value})
    config = EmbedConfig(input=str(shards), output=str(tmp_path / "out"), **{name: value})
    with pytest.raises(ValueError, match=name):
        run_shards(config)
    assert not (tmp_path / "out").exists()  # refused before any work
    TimmImageEmbedder(TINY_MODEL, **{name: field_default(name)})  # its default is no request


# --------------------------------------------------------------------------------------------------- task B


def test_command_starts():
    """The installed command is flows.command:main (the core package never imports the flow); it answers --help
    without a Prefect import."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"wdsembed": "flows.command:main"}
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", "import sys; from flows.command import main; main(['--help'])"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and "--image-extensions" in done.stdout
    done = subprocess.run([sys.executable, "-m", "flows.command", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: wdsembed "), done.stderr
    # `python flows/embed.py` runs the same command, from its first lines: Prefect is not imported for --help
    as_script = ("import atexit, runpy, sys\n"
                 "atexit.register(lambda: print('prefect imported:', 'prefect' in sys.modules))\n"
                 "sys.argv = ['flows/embed.py', '--help']\nrunpy.run_path('flows/embed.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", as_script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and "--image-extensions" in done.stdout
    assert done.stdout.rstrip().endswith("prefect imported: False")
    # an installed script exists (after `pip install -e .` it calls flows.command:main)
    script = Path(sys.executable).parent / "wdsembed"
    assert script.exists() and "import main" in script.read_text()
    import inspect

    from flows import command

    assert all(p.default is not inspect.Parameter.empty for p in inspect.signature(command.main).parameters.values())


def test_python_m_wdsembed_is_the_command(tmp_path):
    """`python -m wdsembed` said "'wdsembed' is a package and cannot be directly executed" (exit 1): it runs the
    installed command now, with its words and exit statuses (--help 0, a refused argument 2)."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    script = str(Path(sys.executable).parent / "wdsembed")
    for args, status in ((["--help"], 0), (["--no-such-flag"], 2),
                         ([str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), "--no-pretrained"], 2)):
        as_module, as_script = (subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True,
                                               text=True, timeout=120)
                                for command in ([sys.executable, "-m", "wdsembed"], [sys.executable, script]))
        assert as_module.returncode == as_script.returncode == status, (args, as_module.stderr)
        assert (as_module.stdout, as_module.stderr) == (as_script.stdout, as_script.stderr), args
        if status == 0:
            assert as_module.stdout.startswith("usage: wdsembed ") and "--image-extensions" in as_module.stdout
        else:
            assert as_module.stderr.strip(), args  # the refusal's own line


def _user_modules_named_flows_and_tasks(folder: Path) -> None:
    """A user's own project: an invoke `tasks.py`, a Prefect `flows/` package; neither is wdsembed's."""
    (folder / "tasks.py").write_text("raise ImportError('the user tasks.py was imported')\n")
    (folder / "flows").mkdir()
    (folder / "flows" / "__init__.py").write_text("raise ImportError('the user flows/ was imported')\n")


def test_python_m_wdsembed_ignores_the_users_own_flows_and_tasks(tmp_path):
    """`python -m` puts the working folder first on sys.path, so a user's own `flows/` package there (a Prefect
    project) replaced the command's: `python -m wdsembed --help` failed with the user's ImportError, where the
    installed `wdsembed` script, which does not look there, ran."""
    _user_modules_named_flows_and_tasks(tmp_path)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    script = str(Path(sys.executable).parent / "wdsembed")
    for args, status in ((["--help"], 0), ([str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")], 2)):
        as_module, as_script = (subprocess.run([*command, *args], cwd=tmp_path, env=env, capture_output=True,
                                               text=True, timeout=120)
                                for command in ([sys.executable, "-m", "wdsembed"], [sys.executable, script]))
        assert "was imported" not in as_module.stderr, as_module.stderr[-3000:]
        assert as_module.returncode == as_script.returncode == status, (args, as_module.stderr[-3000:])
        assert (as_module.stdout, as_module.stderr) == (as_script.stdout, as_script.stderr), args


def test_python_m_wdsembed_runs_from_a_working_folder_since_deleted(tmp_path):
    """A working folder removed under the command (a build folder cleaned by another job): the installed script
    runs, and `python -m wdsembed --help` ended on a FileNotFoundError traceback from asking for that folder."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    script = str(Path(sys.executable).parent / "wdsembed")
    code = "import os, subprocess, sys; os.rmdir(os.getcwd()); sys.exit(subprocess.run(sys.argv[1:]).returncode)"

    def from_a_deleted_folder(*command):
        gone = tmp_path / "gone"
        gone.mkdir()
        return subprocess.run([sys.executable, "-c", code, *command, "--help"], cwd=gone, env=env,
                              capture_output=True, text=True, timeout=120)

    as_module = from_a_deleted_folder(sys.executable, "-m", "wdsembed")
    as_script = from_a_deleted_folder(sys.executable, script)
    assert as_module.returncode == as_script.returncode == 0, as_module.stderr[-3000:]
    assert as_module.stdout == as_script.stdout and "Traceback" not in as_module.stderr


@pytest.mark.slow
def test_python_m_wdsembed_runs_a_run(tmp_path):
    """One real run through `python -m wdsembed` (temporary Prefect server, one Dask worker process, which imports
    the main module again as it is spawned): exit 0, its shard embedded. From a folder holding the user's own
    `tasks.py` and `flows/`, which the flow and its workers do not import instead of the command's."""
    import json

    from wdsembed.synthetic import write_demo_dataset

    _user_modules_named_flows_and_tasks(tmp_path)
    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=4)
    done = subprocess.run([sys.executable, "-m", "wdsembed", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                           "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu", "--batch-size", "4",
                           "--num-threads", "1", "--n-workers", "1"], cwd=tmp_path, env=_command_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["shards"]["00000"]["status"] == "computed", manifest["shards"]
    assert manifest["totals"]["embedded"] == 4, manifest["totals"]
    assert "1 shard(s): 1 computed, 0 cached" in said, said[-4000:]


def test_command_runs_the_flow(shards, tmp_path, monkeypatch, capsys, request):
    import flows.embed
    from flows import command

    # the run is faked: no temporary server, and only the checks' one request (/api/health) reaches this one
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    request.addfinalizer(api.shutdown)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{api.server_address[1]}/api")

    calls = []

    def fake_run(config, on_shard_done=None, all_finished=None):
        calls.append((config, all_finished))
        raise RuntimeError("stopped before any shard")

    monkeypatch.setattr(flows.embed, "run", fake_run)
    code = command.main([str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"])
    err = capsys.readouterr().err
    assert code == 1 and len(calls) == 1 and calls[0][0].model_name == TINY_MODEL
    assert calls[0][1] is False  # the checks' answer (nothing is written yet), passed on, not asked again
    # nothing finished: no claim that finished shards are anywhere
    assert "run failed: stopped before any shard" in err and "finished shard(s) are in" not in err
    assert "no shard finished" in err


def test_stale_script_says_reinstall(shards, tmp_path, capsys):
    code = cli.main(argv=[str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"])
    assert code == 2 and "reinstall the package (pip install -e .)" in capsys.readouterr().err


def test_output_without_input_is_refused_not_the_demo(tmp_path, monkeypatch, capsys):
    """`wdsembed $DATA -o /data/emb` with $DATA empty: refused like INPUT without --output, never the demo (generated
    images, random weights) written into the user's output folder."""
    monkeypatch.chdir(tmp_path)
    runs = []
    code = cli.main(lambda config, **kw: runs.append(config), ["-o", str(tmp_path / "my-embeddings"), "--model",
                                                               TINY_MODEL])
    assert code == 2 and not runs
    assert capsys.readouterr().err.strip() == (
        "error: INPUT is required with --output (the demo runs only when neither is given)")
    assert list(tmp_path.iterdir()) == []  # no demo-data/ written


def test_a_wildcard_the_shell_expanded_is_one_line_saying_so(shards, tmp_path, capsys):
    """`wdsembed /data/*.tar -o out`, unquoted: the shell passes one argument per shard, and argparse refused them as
    'unrecognized arguments', naming every one (a screenful at 2,000 shards) and saying nothing of why. Now one line
    says what INPUT takes and what to pass instead; an unknown option is still argparse's error."""
    import shutil

    for stem in ("00001", "00002"):
        shutil.copy(shards / "00000.tar", shards / f"{stem}.tar")
    tars = sorted(str(p) for p in shards.glob("*.tar"))
    runs = []
    code = cli.main(lambda config, **kw: runs.append(config), [*tars, "-o", str(tmp_path / "out"), "--model",
                                                               TINY_MODEL, "--no-pretrained"])
    assert code == 2 and not runs
    assert capsys.readouterr().err.strip() == (
        f"error: INPUT is one folder, brace pattern, .tar or .txt list of shards, but {len(tars)} paths were given "
        f"({tars[0]}, {tars[1]}, ...): a wildcard the shell expanded? Pass the folder that holds them ({shards}), "
        f"or a brace pattern in quotes ('{shards}/{{00000..00099}}.tar')")
    with pytest.raises(SystemExit) as raised:
        cli.main(lambda config, **kw: runs.append(config), [str(shards), "-o", str(tmp_path / "out"), "--bogus"])
    assert raised.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_url_with_a_password_the_command_cannot_place_is_never_echoed(tmp_path, capsys):
    """Arguments the command refuses before EmbedConfig sees them were quoted whole: `wdsembed
    s3://AKIA:hunter2@b/{00000,00001}.tar` (the shell's brace expansion) got the wildcard line naming both URLs and
    the folder, an unrecognized argument argparse's 'unrecognized arguments: s3://AKIA:hunter2@...', and
    `--storage-option http://minio:hunter2@host:9000` (no KEY=) 'takes KEY=VALUE, got ...'. Each is refused in one
    line naming where it was given, the password not shown, before any store is asked."""
    url = "s3://AKIA:hunter2@bucket/shards"
    out = str(tmp_path / "out")
    said = ": the URL holds a password, which would be logged and stored (not shown here); credentials come from"
    for argv, where in (([f"{url}/00000.tar", f"{url}/00001.tar", "-o", out], "INPUT"),
                        (["/data", "-o", out, "--bogus", url], "an unrecognized argument")):
        err, _ = refused(capsys, [*argv, "--model", TINY_MODEL, "--no-pretrained"])
        assert err.startswith(f"error: {where}{said}") and "hunter2" not in err, err
        assert "--storage-option profile=NAME" in err
    with pytest.raises(SystemExit) as raised:
        cli.main(lambda config, **kw: {}, ["/data", "-o", out, "--storage-option", "http://minio:hunter2@host:9000"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "takes KEY=VALUE; the URL holds a password" in err and "hunter2" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_url_with_a_user_name_alone_is_refused_as_one_with_a_password(shards, tmp_path, capsys):
    """`wdsembed s3://AKIAIOSFODNN7EXAMPLE@bucket/shards -o out`: an access key ID in the URL's user part, with no
    password, passed the password check and went whole into botocore's 'Invalid bucket name', the command's echoes,
    the Prefect run's parameters and its logs. A user name in a URL is refused the same way, in one line naming where
    it was given, without it; a local path holding '@' (/data/user@host/shards) is no URL and still runs."""
    key = "AKIAIOSFODNN7EXAMPLE"
    out = str(tmp_path / "out")
    said = ": the URL holds a user name, which would be logged and stored (not shown here); credentials come from"
    for argv, where in (([f"s3://{key}@bucket/shards", "-o", out], "INPUT"),
                        ([f"s3://{key}@b/{{00000,00001}}.tar", f"s3://{key}@b/x.tar", "-o", out], "INPUT"),
                        (["/data", "-o", out, "--bogus", f"gs://{key}@bucket/x"], "an unrecognized argument"),
                        ([str(shards), "-o", f"s3://{key}@bucket/out"], "--output"),
                        ([str(shards), "-o", out, "--index-cache-dir", f"https://{key}@host/idx"], "--index-cache-dir"),
                        ([str(shards), "-o", out, "--storage-option", f"endpoint_url=https://{key}@minio:9000"],
                         "--storage-option")):
        err, _ = refused(capsys, [*argv, "--model", TINY_MODEL, "--no-pretrained"])
        assert err.startswith(f"error: {where}") and key not in err, err
        assert said in err or "must not hold credentials" in err, err
    with pytest.raises(SystemExit) as raised:
        cli.main(lambda config, **kw: {}, ["/data", "-o", out, "--storage-option", f"https://{key}@host:9000"])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "takes KEY=VALUE; the URL holds a user name" in err and key not in err, err
    assert not (tmp_path / "out").exists()
    # '@' in a local folder's name is no user name: the run starts
    local = tmp_path / "user@host" / "shards"
    local.parent.mkdir()
    shards.rename(local)
    started = []

    def run(config, **kw):  # where Prefect would start
        started.append(config.input)
        raise RuntimeError("the checks passed")

    cli.main(run, [str(local), "-o", str(tmp_path / "user@host" / "out"), "--model", TINY_MODEL, "--no-pretrained"])
    assert started == [str(local)], capsys.readouterr().err


def test_a_flag_given_a_url_with_credentials_never_echoes_it(tmp_path, capsys):
    """`wdsembed /data -o out --batch-size s3://AKIA:hunter2@b` (a URL pasted after the wrong flag) printed argparse's
    'invalid int value: 's3://AKIA:hunter2@b'' into the terminal and its scrollback; so did every number and choice
    flag ('invalid choice: ...') and --image-extensions ('holds ...'). Each now says why without the value; an
    ordinary wrong value is still quoted, which helps. Every flag is tried, so one added later is too."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = str(tmp_path / "out")
    for flag_, value in (("--batch-size", "s3://AKIA:hunter2@b"), ("--device", "s3://hunter2@b/x"),
                         ("--min-fidelity", "https://hunter2@host/x")):
        done = subprocess.run([sys.executable, "-m", "flows.command", "/data", "-o", out, flag_, value], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"argument {flag_}: invalid " in done.stderr, done.stderr
        assert "hunter2" not in done.stderr and "credentials come from" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "flows.command", "/data", "-o", out, "--batch-size", "abc"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "argument --batch-size: invalid int value: 'abc'" in done.stderr, done.stderr
    def run(config, **kw):  # where Prefect would start
        raise RuntimeError("the checks passed")

    for name in EmbedConfig.model_fields:
        for value in ("s3://AKIA:hunter2@b", "s3://hunter2@b"):
            argv = [value] if name == "input" else ["/tmp/in", cli.flag_names(name)[0], value]
            with contextlib.suppress(SystemExit):
                cli.main(run, [*argv, "-o", out] if name != "output" else argv)
            assert "hunter2" not in capsys.readouterr().err, (name, value)
    assert not (tmp_path / "out").exists()


TEXT_FIELDS = [name for name, f in EmbedConfig.model_fields.items() if cli._unwrap_optional(f.annotation) is str]


@pytest.mark.parametrize("name", TEXT_FIELDS)
def test_every_text_flag_refuses_a_url_with_credentials(name, shards, tmp_path, capsys):
    """`wdsembed DATA -o OUT --model s3://AKIA:pw@b/x` (or --id-column, --embedding-column, --error-column,
    --dask-address inproc://...) was taken: the value went into the run's parameters, which Prefect stores and
    shows, and into later messages. Every text flag refuses a URL holding a password or a user name at entry, in
    one line naming the flag, without the value, as INPUT, --output and --checkpoint did. Generated from the
    fields: one added later is tried too."""
    out = tmp_path / "out"
    for value, held in (("s3://AKIA:hunter2@b/x", "a password"), ("https://hunter2@host/x", "a user name")):
        argv = [value, "-o", str(out)] if name == "input" else [str(shards), cli.flag_names(name)[0], value]
        err, _ = refused(capsys, argv + (["-o", str(out)] if name not in ("input", "output") else [])
                         + ["--model", TINY_MODEL, "--no-pretrained"] * (name != "model_name"))
        assert err.startswith(f"error: {cli.flag(name) if name != 'input' else 'INPUT'}: the URL holds {held}"), err
        assert "hunter2" not in err and "credentials come from" in err, err
    assert not out.exists()


def test_the_api_refuses_a_model_name_or_column_with_credentials(shards, tmp_path):
    """The Python API took them too, into the run's manifest and messages: refused when the embedder is built,
    naming the keyword as the caller wrote it."""
    from wdsembed.api import TimmImageEmbedder

    for options, said in (({"model_name": "s3://AKIA:hunter2@b/x"}, "model_name"),
                          ({"id_col": "https://hunter2@host/key"}, "id_col"),
                          ({"error_column": "gs://hunter2@b/e"}, "error_column")):
        with pytest.raises(ValueError) as refusal:
            TimmImageEmbedder(**options)
        assert said in str(refusal.value) and "the URL holds a" in str(refusal.value), str(refusal.value)
        assert "hunter2" not in str(refusal.value)
    assert not (tmp_path / "out").exists()


def test_a_quoted_wildcard_without_tar_is_said_to_be_one(shards, tmp_path, capsys):
    """'/data/*' or '/data/*.tgz' was refused as "does not exist" (the local folder check ran first); only a
    wildcard ending in .tar got the wildcard message. Now every wildcard gets it, local or not."""
    for pattern in (f"{shards}/*", f"{shards}/*.tgz", f"{shards}/0*0.tar", "s3://bucket/shards/*"):
        folder = pattern[: pattern.index("*")].rsplit("/", 1)[0]
        err, _ = refused(capsys, [pattern, "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"])
        assert err == (f"error: input {pattern!r} is a wildcard pattern, which is not expanded: name the shards with "
                       f"a brace pattern ('{folder}/{{00000..00099}}.tar'), or pass the folder that holds them "
                       f"({folder!r})"), err


def test_image_extensions_the_first_shard_has_no_member_of_are_refused(tmp_path, capsys):
    """`--image-extensions gif` on shards of jpg and bmp images started the run, and every row then failed 'no
    image member (found: ...)'. The first shard's member names (its .idx where it has one, else its first tar
    headers) now refuse it before any work, naming the shard and the extensions there. Extensions that some of
    its samples have are not refused: a sample without one fails on its own row, as before."""
    import fsspec

    from wdsembed import shardindex
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    folder = tmp_path / "in"
    image = make_image(32, 24, seed=0)
    write_shard(folder, "00000", [ShardSample(encode_image(image, "jpeg"), ext="jpg"),
                                  ShardSample(encode_image(image, "bmp"), ext="bmp"),
                                  ShardSample(None, extra={"json": b"{}"})])
    tar = folder / "00000.tar"
    base = [str(folder), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu",
            "--index-cache-dir", str(tmp_path / "idx")]
    advice = ("and every row would fail with 'no image member': pass the extensions of its images, e.g. "
              "--image-extensions jpg,bmp")
    err, _ = refused(capsys, base + ["--image-extensions", "gif"])
    assert err == (f"error: --image-extensions gif: no member of shard {tar} has that extension "
                   f"(its 8 members have: jpg, json, txt, bmp), {advice}"), err
    err, _ = refused(capsys, base + ["--image-extensions", "gif,TIFF"])
    assert err.startswith(f"error: --image-extensions gif,tiff: no member of shard {tar} has "
                          "those extensions"), err
    assert shardindex.ensure_index(str(tar), fsspec.filesystem("file")).path == str(folder / "00000.idx")
    err, _ = refused(capsys, base + ["--image-extensions", "gif"])
    assert err == (f"error: --image-extensions gif: no member of shard {tar} has that extension "
                   f"(its .idx lists: jpg, json, txt, bmp), {advice}"), err
    started = []

    def run(config, **kw):  # where Prefect would start
        started.append(config.image_extensions)
        raise RuntimeError("the checks passed")

    for given in ("bmp", "png,jpg", "jpg"):  # some samples have it: their rows are embedded, the others fail
        cli.main(run, base + ["--image-extensions", given])
    assert started == [("bmp",), ("png", "jpg"), ("jpg",)], capsys.readouterr().err


def test_a_local_shard_whose_first_images_have_other_extensions_is_read_on_before_it_is_refused(tmp_path, capsys):
    """A shard without .idx whose first 40 samples are PNGs and the rest JPEGs, run with `--image-extensions jpg`:
    the check stopped at its first 32 images (all png) and refused the run, though its JPEGs would be embedded. On a
    local disk it now reads every tar header (data seeked past) before it refuses: this shard runs, its JPEGs
    embedded and its PNG samples failing on their own rows; an all-PNG shard is still refused, its whole tar read."""
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.plan import FIRST_IMAGES
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    png, jpg = (encode_image(make_image(32, 24, seed=0), kind) for kind in ("png", "jpeg"))
    mixed = write_shard(tmp_path / "mixed", "00000", [ShardSample(png, ext="png")] * (FIRST_IMAGES + 8)
                        + [ShardSample(jpg, ext="jpg")] * 3)
    only_png = write_shard(tmp_path / "png", "00000", [ShardSample(png, ext="png")] * (FIRST_IMAGES + 8))
    argv = ["-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu",
            "--no-index-files", "--image-extensions", "jpg"]
    err, _ = refused(capsys, [str(tmp_path / "png")] + argv)
    assert err == (f"error: --image-extensions jpg: no member of shard {only_png.tar} has that extension (its 120 "
                   "members have: json, png, txt), and every row would fail with 'no image member': pass the "
                   "extensions of its images, e.g. --image-extensions png"), err
    started = []

    def run(config, **kw):  # where Prefect would start
        started.append(config.input)
        raise RuntimeError("the checks passed")

    cli.main(run, [str(tmp_path / "mixed")] + argv)
    assert started == [str(tmp_path / "mixed")], capsys.readouterr().err
    [result] = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 use_index_files=False, image_extensions=["jpg"])(str(tmp_path / "mixed"),
                                                                                 str(tmp_path / "out"))
    assert (result.rows, result.embedded, result.failed) == (43, 3, 40), result
    assert [k for k, _ in result.errors][:1] == [mixed.keys[0]] and "no image member" in result.errors[0][1]


def test_image_extensions_are_taken_as_the_command_takes_them_and_none_that_never_matches():
    """The command strips blanks around each extension (`--image-extensions 'jpg, png'`); the Python API and the run
    form kept them, and (' png') matched no member: every PNG sample failed 'no image member (found: png, ...)'
    beside the embedded JPEGs, with no word before. An extension that no member's can be (a member's is the last
    dot-part of its name: 'seg.png', '', 'jpg,png' as one item) is refused, naming the field, on every path."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError as FormError
    from prefect.utilities.schema_tools import validate
    from pydantic import ValidationError

    from flows.deployed import embed
    from wdsembed.api import TimmImageEmbedder

    base = {"input": "/tmp/in", "output": "/tmp/out"}
    by_cli = cli.config_from_args(cli.build_parser().parse_args(["/tmp/in", "-o", "/tmp/out", "--image-extensions",
                                                                 " JPG, .png ,jpg"]))
    by_api = TimmImageEmbedder(image_extensions=[" JPG", ".png ", "jpg"]).config(**base)
    assert by_cli.image_extensions == by_api.image_extensions == ("jpg", "png")
    schema = parameter_schema(embed).model_dump()
    validate({"config": base | {"image_extensions": [" JPG", ".png "]}}, schema, raise_on_error=True)
    for bad in (["jpg", "seg.png"], ["jpg", ""], ["."], ["jpg,png"], ["j pg"]):
        with pytest.raises(ValidationError, match="image_extensions") as refused_:
            EmbedConfig(**base, image_extensions=bad)
        assert "last dot" in str(refused_.value) or "empty" in str(refused_.value), refused_.value
        with pytest.raises(FormError):
            validate({"config": base | {"image_extensions": bad}}, schema, raise_on_error=True)


# --------------------------------------------------------------------------------------------------- task D


def in_command_words(api_message: str) -> str:
    """A refusal the API raised, as the command says it: the flags where the API names its keywords."""
    for keyword, flag in (("id_column= ", "--id-column "), ("checkpoint= ", "--checkpoint "),
                          ("model_name= ", "--model "), ("pretrained=False", "--no-pretrained"),
                          ("embedding= ", "--embedding "), ("embedding='head'", "--embedding head")):
        api_message = api_message.replace(keyword, flag)
    return api_message


def refused(capsys, argv: list[str]) -> tuple[str, float]:
    code, err, started, seconds = run_main(argv, capsys)
    assert code == 2 and not started, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0], seconds


def test_weights_neither_cached_nor_reachable(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err, seconds = refused(capsys, [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu"])
    assert f"cannot load pretrained weights for '{TINY_MODEL}'" in err and "HF_HUB_OFFLINE is set" in err
    assert "--no-pretrained" in err and "--checkpoint" in err
    assert not (tmp_path / "out").exists()
    print(f"missing weights refused in {seconds:.2f} s (in-process)")
    # no network at all: the probe gives up within seconds
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    err, seconds = refused(capsys, [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu"])
    assert "is not in the cache and http://127.0.0.1:9 is unreachable" in err and "--no-pretrained" in err
    assert seconds < 30
    print(f"unreachable weights refused in {seconds:.2f} s (in-process)")


def test_the_api_refuses_what_the_command_refuses_before_claiming_the_output(shards, tmp_path, monkeypatch, capsys):
    """The Python API runs the command's checks (plan.check_config) before it claims OUTPUT: each mistake is one
    exception, the command's own words, and a finished OUTPUT stays as it was. It ran a few of them only, and failed
    every shard for the others (one reason per shard), replacing the finished run's manifest with an all-failed one."""
    import timm
    from safetensors.torch import save_file

    from wdsembed.api import TimmImageEmbedder
    from wdsembed.shard import ShardsFailed

    settings = dict(pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1, fidelity_sample=0)
    out = tmp_path / "out"
    TimmImageEmbedder(TINY_MODEL, **settings)(str(shards), str(out))
    finished = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    headless, vit = tmp_path / "headless.safetensors", tmp_path / "vit.safetensors"
    save_file(timm.create_model(TINY_MODEL, pretrained=False, num_classes=0).state_dict(), headless)
    save_file(timm.create_model("test_vit.r160_in1k", pretrained=False).state_dict(), vit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # the tiny model's weights not cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [str(shards), "-o", str(out), "--model", TINY_MODEL, "--device", "cpu"]
    # the same refusal, in each one's words: the API's keyword, the command's flag
    for options, flags, said, said_by_command in [
        ({"id_column": "Key"}, ["--no-pretrained", "--id-column", "Key"], "pass id_column= one of them",
         "pass --id-column one of them"),
        ({"storage_options": {"auto_mkdirs": "true"}}, ["--no-pretrained", "--storage-option", "auto_mkdirs=true"],
         "storage option auto_mkdirs: not an option of local folders. Did you mean: auto_mkdir", None),
        ({"pretrained": True}, [], "Pass checkpoint= a local weights file, pretrained=False for random weights",
         "Pass --checkpoint a local weights file, --no-pretrained for random weights"),
        ({"checkpoint": str(vit)}, ["--checkpoint", str(vit)], f"does not fit {TINY_MODEL!r}", None),
        ({"checkpoint": str(headless), "embedding": "head"}, ["--checkpoint", str(headless), "--embedding", "head"],
         "Pass embedding= pooled or auto", "Pass --embedding pooled or auto"),
    ]:
        with pytest.raises(ValueError) as refusal:
            TimmImageEmbedder(TINY_MODEL, **(settings | options))(str(shards), str(out))
        assert not isinstance(refusal.value, ShardsFailed) and said in str(refusal.value), str(refusal.value)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == finished, options
        code, err, started, _ = run_main(argv + flags, capsys)
        by_command = in_command_words(str(refusal.value))
        assert code == 2 and not started and err.startswith(f"error: {by_command}"), (err, by_command)
        assert (said_by_command or said) in err, err
    # Right again, the run goes through: every output is finished.
    assert [r.cached for r in TimmImageEmbedder(TINY_MODEL, **settings)(str(shards), str(out))] == [True]


def test_a_model_the_run_cannot_embed_with_is_refused_before_any_work(shards, tmp_path, monkeypatch, capsys):
    """What only building the model tells (no weights needed: it is built on the meta device) is refused before any
    work, in one line saying why and what to pass. Each of these passed the checks, then failed every shard's task
    after Prefect and the workers had started: a grayscale model (the pipeline feeds RGB), a local-dir: folder
    without the config.json timm builds it from, an hf-hub: name whose config is not cached while the Hub is
    offline (random weights too need its config; the shard's reason said to pass --no-pretrained, already passed),
    and an encoder without a pooled output (timm's NotImplementedError from forward_head)."""
    import timm
    from timm.models import save_for_hf

    from wdsembed.api import TimmImageEmbedder
    from wdsembed.shard import ShardsFailed

    gray = tmp_path / "gray"
    save_for_hf(timm.create_model(TINY_MODEL, pretrained=False, in_chans=1), str(gray), model_args={"in_chans": 1})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    for model, said in [
        (f"local-dir:{gray}", "the model takes 1-channel input, and the run feeds it RGB images. Pass "
                              "model_name= a model whose timm data config the pipeline reproduces: 3-channel"),
        (f"local-dir:{tmp_path / 'nowhere'}", f"{str(tmp_path / 'nowhere')!r} has no config.json"),
        (f"hf-hub:timm/{TINY_MODEL}", "its config.json (the architecture and preprocessing, needed whatever the "
                                      "weights) is not in the Hugging Face cache"),
        ("deepseek_vit_412m_enc", "forward_head raises NotImplementedError: DeepseekVitEncoder does not support "
                                  "classification use cases"),
    ]:
        with pytest.raises(ValueError) as refusal:
            TimmImageEmbedder(model, pretrained=False, device="cpu", batch_size=2, num_threads_per_worker=1)(
                str(shards), str(out))
        assert not isinstance(refusal.value, ShardsFailed) and said in str(refusal.value), str(refusal.value)
        assert "\n" not in str(refusal.value) and not out.exists()
        err, _ = refused(capsys, [str(shards), "-o", str(out), "--model", model, "--no-pretrained", "--device", "cpu"])
        assert err == f"error: {in_command_words(str(refusal.value))}", err


def test_a_corrupt_weights_file_is_refused_before_any_work(shards, tmp_path, monkeypatch, capsys):
    """Pretrained weights read from a file on this machine that no reader can take (a local-dir: folder's, or the
    Hugging Face cache's: garbage, a copy cut short, none at all) passed the checks (the planning builds the model
    without its weights) and failed every shard's task after Prefect, the cluster and the output's claim had
    started. They are refused before any work, in one line naming the model, the file and the cause, from the
    file's size and its safetensors header or zip directory: the weights are not loaded for it."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    from wdsembed.api import TimmImageEmbedder
    from wdsembed.shard import ShardsFailed

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = timm.create_model(TINY_MODEL, pretrained=False).state_dict()

    def local_dir(name: str, file: str, write) -> str:
        folder = tmp_path / name
        save_for_hf(timm.create_model(TINY_MODEL, pretrained=False), str(folder))
        for made in ("model.safetensors", "pytorch_model.bin"):
            (folder / made).unlink(missing_ok=True)
        if file:
            write(folder / file)
        return str(folder)

    def cut(path, save) -> None:  # a copy cut short: a whole header, part of the tensors
        save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    cases = []
    garbage = local_dir("garbage", "model.safetensors", lambda p: p.write_bytes(b"not a safetensors file" * 4))
    cases.append((f"local-dir:{garbage}", f"{garbage}/model.safetensors", "its header"))
    cut_safe = local_dir("cut", "model.safetensors", lambda p: cut(p, lambda q: save_file(weights, q)))
    cases.append((f"local-dir:{cut_safe}", f"{cut_safe}/model.safetensors", "truncated"))
    cut_zip = local_dir("cut-zip", "pytorch_model.bin", lambda p: cut(p, lambda q: torch.save(weights, q)))
    cases.append((f"local-dir:{cut_zip}", f"{cut_zip}/pytorch_model.bin", "truncated"))
    empty = local_dir("no-weights", "", None)
    cases.append((f"local-dir:{empty}", repr(empty), "no weights file"))
    hub_id = timm.models.get_pretrained_cfg(TINY_MODEL).hf_hub_id
    snapshot = tmp_path / "hf-cache" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    cut(snapshot / "model.safetensors", lambda q: save_file(weights, q))
    cases.append((TINY_MODEL, str(snapshot / "model.safetensors"), "truncated"))

    out = tmp_path / "out"
    for model, file, cause in cases:
        with pytest.raises(ValueError) as refusal:
            TimmImageEmbedder(model, device="cpu", batch_size=2, num_threads_per_worker=1)(str(shards), str(out))
        said = str(refusal.value)
        assert not isinstance(refusal.value, ShardsFailed), said
        assert repr(model) in said and file in said and cause in said and "\n" not in said, said
        assert not out.exists()
        err, _ = refused(capsys, [str(shards), "-o", str(out), "--model", model, "--device", "cpu"])
        assert err == f"error: {in_command_words(said)}", err


def test_a_process_checks_each_model_once_and_a_rewritten_checkpoint_again(shards, tmp_path, monkeypatch):
    """A process that runs again and again (a served deployment, a notebook) builds a model on the meta device for
    its first run only; a checkpoint rewritten since is other weights, checked again, and refused where it no longer
    fits the model."""
    import timm
    from safetensors.torch import save_file

    import wdsembed.model
    from wdsembed.inputs import InputError
    from wdsembed.plan import check_model

    builds = []
    load_model = wdsembed.model.load_model
    monkeypatch.setattr(wdsembed.model, "load_model", lambda *a, **k: builds.append(a) or load_model(*a, **k))
    weights = tmp_path / "weights.safetensors"
    save_file(timm.create_model(TINY_MODEL, pretrained=False).state_dict(), weights)
    config = EmbedConfig(input=str(shards), output=str(tmp_path / "out"), model_name=TINY_MODEL, pretrained=False,
                         checkpoint=str(weights))
    check_model(config)
    check_model(config)
    assert len(builds) == 1
    save_file(timm.create_model("test_vit.r160_in1k", pretrained=False).state_dict(), weights)
    with pytest.raises(InputError, match="checkpoint"):
        check_model(config)
    assert len(builds) == 2


def test_checkpoint_is_a_local_path_or_file_url(shards, tmp_path, capsys):
    """Each worker loads the checkpoint from its own disk: a file:// URL is taken as its path everywhere (it was
    found by the checks, then missed by every worker), and another store's URL is refused at once (it passed the
    checks, then failed every shard)."""
    import timm
    import torch

    from wdsembed.api import TimmImageEmbedder
    from wdsembed.model import load_model

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model(TINY_MODEL, pretrained=False).state_dict(), weights)
    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv + ["--checkpoint", weights.as_uri()]))
    assert config.checkpoint == str(weights)
    cli.refuse_unusable(config)  # the checks load it into the model on the meta device
    assert load_model(config.model_name, checkpoint=config.checkpoint).weights == f"checkpoint:{weights}"

    why = ("must be a local path or file:// URL, not a URL of another store (s3://): each worker loads it from its "
           "own disk; copy it to a local path on every worker and pass that")
    code, err, started, _ = run_main(argv + ["--checkpoint", "s3://bucket/weights/w.pth"], capsys)
    assert code == 2 and not started and err == f"error: --checkpoint: {why}\n", err
    with pytest.raises(ValueError, match=re.escape(why)):
        TimmImageEmbedder(TINY_MODEL, checkpoint="s3://bucket/weights/w.pth")
    assert not (tmp_path / "out").exists()


def test_an_empty_checkpoint_is_no_checkpoint(shards, tmp_path):
    """`--checkpoint "$CKPT"` with CKPT empty, or the run form's cleared field, loads no checkpoint, as leaving it
    out does: it was kept as '' in the cache key, so a re-run without it recomputed every shard ('their outputs
    were made with checkpoint= (now None)'), and the reverse."""
    from wdsembed import plan, shard
    from wdsembed.api import TimmImageEmbedder

    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu"]
    plain = cli.config_from_args(cli.build_parser().parse_args(argv))
    empty = cli.config_from_args(cli.build_parser().parse_args(argv + ["--checkpoint", ""]))
    assert empty.checkpoint is None and empty == plain
    assert TimmImageEmbedder(TINY_MODEL, checkpoint="").config(str(shards), str(tmp_path / "out")).checkpoint is None
    first = plan.plan_shards(plain)[0]
    assert shard.cache_key(empty, first) == shard.cache_key(plain, first)


def test_a_checkpoint_of_a_whole_model_or_of_other_objects_says_how_to_save_its_weights(shards, tmp_path, capsys):
    """`torch.save(model)` (the whole model, not its state_dict) was refused with torch's wall of 600 characters
    listing torch.nn classes and ending 'If this checkpoint is trusted, retry with weights_only=False', which no
    option here passes; an empty file with 'EOFError:'. Each is now named for what it is, with how to save weights."""
    import numpy as np
    import timm
    import torch

    model = timm.create_model(TINY_MODEL, pretrained=False)
    whole, extra, empty = tmp_path / "whole.pth", tmp_path / "extra.pth", tmp_path / "empty.pth"
    text = tmp_path / "notes.pth"  # no checkpoint at all: it said 'KeyError: 101'
    torch.save(model, whole)
    torch.save({"state_dict": model.state_dict(), "best": np.float64(0.5)}, extra)
    empty.write_bytes(b"")
    text.write_text("epoch 12, loss 0.31\n")
    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu", "--checkpoint"]
    for path, cause in [(whole, "a whole pickled model"), (extra, "numpy.dtype"), (empty, "an empty file"),
                        (text, "no checkpoint format")]:
        line, _ = refused(capsys, argv + [str(path)])
        assert f"checkpoint '{path}'" in line and cause in line, line
        assert "pass --checkpoint " in line and "checkpoint=" not in line, line
        assert "weights_only" not in line and "EOFError" not in line and "KeyError" not in line, line
        assert len(line) < 400, line
        if path in (whole, extra):
            assert "torch.save(model.state_dict()" in line, line


def test_a_checkpoint_whose_weights_make_every_embedding_nan_is_refused_before_any_work(shards, tmp_path, capsys):
    """A checkpoint whose weights hold NaN (a diverged training run's last save): every image of every shard got the
    row 'embedding holds NaN or infinite values', the run ended 'Completed' with exit status 0 and no embedding at
    all. Now refused before any work, naming the weights that are not finite; the same NaN in a head that the
    embedding does not use (pooled features) leaves the embedding finite, and that checkpoint runs."""
    import timm
    import torch

    from wdsembed.model import ModelLoadError, load_model

    model = timm.create_model(TINY_MODEL, pretrained=False)
    weights = model.state_dict()
    diverged, head = tmp_path / "diverged.pth", tmp_path / "nan-head.pth"
    torch.save({k: v.fill_(float("nan")) if v.is_floating_point() and k.startswith("layer4.")
                else v for k, v in weights.items()}, diverged)
    weights = timm.create_model(TINY_MODEL, pretrained=False).state_dict()
    weights["fc.weight"].fill_(float("nan"))
    torch.save(weights, head)
    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu", "--checkpoint"]
    line, _ = refused(capsys, argv + [str(diverged)])
    assert f"checkpoint '{diverged}'" in line and "NaN or infinite embeddings" in line, line
    assert "layer4.0.conv1.weight" in line and "Pass --checkpoint a weights file" in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError, match="NaN or infinite embeddings"):  # a worker's own load says the same
        load_model(TINY_MODEL, checkpoint=str(diverged))
    negative = tmp_path / "negative-variance.pth"  # finite, but the square root of a variance below 0 is NaN
    weights = timm.create_model(TINY_MODEL, pretrained=False).state_dict()
    weights["bn1.running_var"].fill_(-1.0)
    torch.save(weights, negative)
    line, _ = refused(capsys, argv + [str(negative)])
    assert "negative batch-norm variance (1 tensor(s): bn1.running_var)" in line, line
    cli.refuse_unusable(cli.config_from_args(cli.build_parser().parse_args(argv + [str(head)])))  # passes
    assert load_model(TINY_MODEL, checkpoint=str(head)).dim == model.num_features


def test_index_cache_dir_is_a_local_folder_or_file_url(shards, tmp_path, capsys):
    """The index cache is a folder on each worker's own disk (shardindex writes it through the local file system):
    an s3:// URL there made a folder named 's3:' in the worker's working directory, reported as the index's URL. It
    is refused at once; a file:// URL is taken as its path."""
    from wdsembed.api import TimmImageEmbedder

    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--device", "cpu"]
    config = cli.config_from_args(cli.build_parser().parse_args(
        argv + ["--index-cache-dir", (tmp_path / "idx").as_uri()]))
    assert config.index_cache_dir == config.index_cache() == str(tmp_path / "idx")
    why = ("must be a local folder or file:// URL, not a URL of another store (s3://): each worker keeps the .idx "
           "files it cannot write beside their shards in a folder on its own disk")
    code, err, started, _ = run_main(argv + ["--index-cache-dir", "s3://bucket/idx"], capsys)
    assert code == 2 and not started and err == f"error: --index-cache-dir: {why}\n", err
    with pytest.raises(ValueError, match=re.escape(why)):
        TimmImageEmbedder(TINY_MODEL, index_cache_dir="s3://bucket/idx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, url, why", [
    ("-o", "s3://", "s3:// names no bucket: write s3://BUCKET/PREFIX"),
    ("-o", "s3:///", "s3:// names no bucket: write s3://BUCKET/PREFIX"),
    ("-o", "gs://", "gs:// names no bucket: write gs://BUCKET/PREFIX"),
    ("-o", "s3:/bucket/emb", "starts with 's3:' but not 's3://', which makes it a local path: write "
                             "s3://BUCKET/PREFIX, or start a local folder's path with ./"),
    ("-o", "s3:bucket/emb", "starts with 's3:' but not 's3://', which makes it a local path: write "
                            "s3://BUCKET/PREFIX, or start a local folder's path with ./"),
    ("input", "s3://", "s3:// names no bucket: write s3://BUCKET/PREFIX"),
    ("input", "S3:/bucket/shards", "starts with 'S3:' but not 'S3://', which makes it a local path: write "
                                   "S3://BUCKET/PREFIX, or start a local folder's path with ./"),
    ("--result-storage", "s3://", "s3:// names no bucket: write s3://BUCKET/PREFIX"),
])
def test_a_store_url_without_bucket_or_with_one_slash_is_refused(shards, tmp_path, capsys, monkeypatch, flag, url,
                                                                 why):
    """`-o s3://` lost its slashes to the trailing-slash rule and became a local folder `s3:` in the working
    directory, and `s3:/bucket/emb` (a slash short) one of its subfolders: every check passed and the run wrote
    there. Refused by EmbedConfig (the command, the API, a deployed run's parameters), naming the field and what
    to write."""
    from pydantic import ValidationError

    monkeypatch.chdir(tmp_path)
    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"]
    field = {"-o": "output", "input": "input", "--result-storage": "result_storage"}[flag]
    named = {"-o": "--output", "input": "INPUT"}.get(flag, flag)  # as the command's usage names it
    argv = [url, *argv[1:]] if flag == "input" else argv + [flag, url]
    code, err, started, _ = run_main(argv, capsys)
    assert code == 2 and not started and err == f"error: {named}: {why}\n", err
    with pytest.raises(ValidationError, match=re.escape(why)):
        EmbedConfig(**{"input": str(shards), "output": str(tmp_path / "out"), field: url})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_output_columns_of_one_name_are_refused(shards, tmp_path, capsys):
    """The id, embedding and error columns share the output table: two of one name were found only after every
    shard was embedded (each then failed its join). Refused by EmbedConfig: the CLI and the API alike."""
    from pydantic import ValidationError

    from wdsembed.api import TimmImageEmbedder

    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"]
    for flags, why in (
        (["--embedding-column", "key"], "--id-column and --embedding-column are both 'key'"),
        (["--error-column", "image_embedding"], "--embedding-column and --error-column are both 'image_embedding'"),
        (["--id-column", "uid", "--error-column", "uid"], "--id-column and --error-column are both 'uid'"),
    ):
        code, err, started, _ = run_main(argv + flags, capsys)
        assert code == 2 and not started, (code, err)
        assert err == (f"error: {why}: the output's id, embedding and error columns need "
                       "three different names\n"), err
    with pytest.raises(ValidationError, match="id_column and embedding_column are both 'key'"):
        TimmImageEmbedder(TINY_MODEL, embedding_column="key")
    assert not (tmp_path / "out").exists()


def test_a_refused_value_names_the_flag_that_was_typed(shards, tmp_path, capsys):
    """A value EmbedConfig refuses is named as its user set it: by its flag on the command line (--batch-size,
    --num-threads, INPUT), one line each; by its field in the Python API's error (batch_size). The command said
    'batch_size: ...', a name its user never typed (and for --num-threads, one unlike the flag)."""
    from pydantic import ValidationError

    from wdsembed.api import TimmImageEmbedder

    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"]
    for flags, said in (
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
        (["--num-threads", "0"], "--num-threads: Input should be greater than or equal to 1"),
        (["--shards-per-task", "0"], "--shards-per-task: Input should be greater than or equal to 1"),
        (["--min-fidelity", "2"], "--min-fidelity: Input should be less than or equal to 1"),
        (["--image-extensions", ","], "--image-extensions: must name at least one extension"),
        (["--image-extensions", "a.b"], "--image-extensions: holds 'a.b', which no member's extension can be: it is "
                                        "the part of the name after its last dot (00001.seg.png: png), one per item"),
        (["--storage-option", "secret=x"], "--storage-option: must not hold credentials (secret): they would be "
                                           "stored with the run's parameters; credentials come from the environment"),
        (["--id-column", "x", "--embedding-column", "x"], "--id-column and --embedding-column are both 'x': the "
                                                          "output's id, embedding and error columns need three "
                                                          "different names"),
    ):
        err, _ = refused(capsys, argv + flags)
        assert err.startswith("error: " + said), err
    err, _ = refused(capsys, ["s3://", *argv[1:]])
    assert err == "error: INPUT: s3:// names no bucket: write s3://BUCKET/PREFIX", err
    code, err, started, _ = run_main(argv + ["--batch-size", "0", "--workers-per-gpu", "9"], capsys)
    assert code == 2 and not started and err.splitlines() == [
        "error: --batch-size: Input should be greater than or equal to 1",
        "error: --workers-per-gpu: Input should be less than or equal to 8"], err
    # The API names its own fields.
    with pytest.raises(ValidationError, match=r"batch_size\n  Input should be greater than or equal to 1"):
        TimmImageEmbedder(TINY_MODEL, batch_size=0)
    with pytest.raises(ValidationError, match="image_extensions\n  Value error, must name at least one extension"):
        TimmImageEmbedder(TINY_MODEL, image_extensions=())
    with pytest.raises(ValidationError, match="id_column and embedding_column are both 'x'"):
        TimmImageEmbedder(TINY_MODEL, id_column="x", embedding_column="x")
    assert not (tmp_path / "out").exists()


def test_a_refusal_names_each_setting_as_its_reader_sets_it(shards, tmp_path, capsys):
    """A check's advice names the setting as the one refused set it: the command's flag (pass --id-column ...), the
    API's keyword (pass id_column= ...), under the name the caller gave (id_col, NeMo Curator's, to the embedder or
    the dataset). Both said '--id-column (id_column=)': the command's user read an API keyword, and a caller who
    wrote id_col read two names that were neither of theirs."""
    from pydantic import ValidationError

    from wdsembed import ImageTextPairDataset, TimmImageEmbedder

    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"]
    err, _ = refused(capsys, argv + ["--id-column", "uid"])
    assert err.endswith(": pass --id-column one of them (the key of each row), or leave it out for 'key'"), err
    err, _ = refused(capsys, [*argv, "--model", "resnet5000"])
    assert err.endswith(" Pass --model a name from timm.list_models() / timm.list_pretrained()."), err
    assert "model_name" not in err, err

    settings = dict(pretrained=False, device="cpu")
    for given, name in (({"id_column": "uid"}, "id_column"), ({"id_col": "uid"}, "id_col")):
        with pytest.raises(ValueError, match=re.escape(f": pass {name}= one of them (the key of each row), or leave "
                                                       "it out for 'key'")) as refusal:
            TimmImageEmbedder(TINY_MODEL, **settings, **given)(str(shards), str(tmp_path / "out"))
        assert "--" not in str(refusal.value)
    with pytest.raises(ValueError, match=re.escape(": pass id_col= one of them")):
        TimmImageEmbedder(TINY_MODEL, **settings)(ImageTextPairDataset.from_webdataset(str(shards), id_col="uid"),
                                                  str(tmp_path / "out"))
    with pytest.raises(ValueError, match=re.escape(" Pass model_name= a name from timm.list_models()")) as refusal:
        TimmImageEmbedder("resnet5000", **settings)(str(shards), str(tmp_path / "out"))
    assert "--model" not in str(refusal.value)
    # pydantic's own errors too: the field as the caller named it
    with pytest.raises(ValidationError, match="id_col\n  String should have at least 1 character"):
        TimmImageEmbedder(TINY_MODEL, id_col="")
    with pytest.raises(ValidationError, match="id_col and image_embedding_column are both 'uid'"):
        TimmImageEmbedder(TINY_MODEL, id_col="uid", image_embedding_column="uid")
    assert not (tmp_path / "out").exists()


def test_the_credentials_hint_names_a_profile_as_its_reader_sets_it(shards, tmp_path, capsys):
    """Where credentials come from names the profile setting as the one refused sets it: the command's
    '--storage-option profile=NAME', the API's 'storage_options={"profile": NAME}', and both where nobody in
    particular reads it (EmbedConfig itself, a shard's failure in the manifest). The API's refusal named the flag."""
    from pydantic import ValidationError

    from wdsembed import TimmImageEmbedder

    flag_form, api_form = "--storage-option profile=NAME", 'storage_options={"profile": NAME}'
    err, _ = refused(capsys, [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained",
                              "--storage-option", "key=x"])
    assert err.endswith(f"an AWS profile (AWS_PROFILE or {flag_form}) or the store's own credential files"), err
    for api_call in (lambda: TimmImageEmbedder(TINY_MODEL, storage_options={"key": "x"}),
                     lambda: TimmImageEmbedder(TINY_MODEL)(str(shards), "s3://AKIA:hunter2@bucket/out")):
        with pytest.raises(ValidationError) as refusal:
            api_call()
        assert f"an AWS profile (AWS_PROFILE or {api_form}) or" in str(refusal.value), refusal.value
        assert "--storage-option" not in str(refusal.value)
    with pytest.raises(ValidationError) as refusal:
        EmbedConfig(input=str(shards), output=str(tmp_path / "out"), storage_options={"key": "x"})
    assert f"an AWS profile (AWS_PROFILE or {flag_form} ({api_form})) or" in str(refusal.value), refusal.value
    assert not (tmp_path / "out").exists()


def test_output_that_cannot_be_written(shards, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    err, seconds = refused(capsys, [str(shards), "-o", str(a_file / "out"), "--model", TINY_MODEL, "--no-pretrained"])
    assert err == (f"error: output '{a_file / 'out'}' cannot be created: '{a_file}' is a file, not a folder; "
                   "pass --output a folder path")
    err, _ = refused(capsys, [str(shards), "-o", str(a_file), "--model", TINY_MODEL, "--no-pretrained"])
    assert err == f"error: output '{a_file}' is a file, not a folder: pass --output a folder"
    print(f"output under a file refused in {seconds:.2f} s (in-process)")


def test_an_index_cache_dir_that_is_a_file_is_refused(shards, tmp_path, capsys):
    """--index-cache-dir naming a file passed the checks; every shard whose .idx went to the cache then warned
    'ignoring unreadable index <file>/...idx: [Errno 20] Not a directory', and none was kept. Refused as an output
    that is a file is. (A cache folder this user cannot write is not refused: shards are then read without an
    .idx, said once.)"""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    base = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--index-cache-dir"]
    err, _ = refused(capsys, base + [str(a_file)])
    assert err == (f"error: index cache '{a_file}' is a file, not a folder: pass --index-cache-dir "
                   "a folder")
    err, _ = refused(capsys, base + [str(a_file / "idx")])
    assert err == (f"error: index cache '{a_file / 'idx'}' cannot be created: '{a_file}' is a file, not a folder; "
                   "pass --index-cache-dir a folder path")
    assert not (tmp_path / "out").exists()


def test_a_dask_address_mistyped_or_not_answering_is_refused_before_any_work(shards, tmp_path, capsys):
    """A scheduler address without its port, or one where nothing listens (the discard port), is refused by the
    checks, naming the flag: not after the model's checks and Dask's 30 s connect timeout, as a failed run."""
    base = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--dask-address"]
    code, err, started, _ = run_main(base + ["nonsense"], capsys)
    assert code == 2 and not started and err.strip().splitlines() == [
        "error: --dask-address: must be a Dask scheduler's address with its port: tcp://HOST:8786, tls://HOST:8786 or "
        "HOST:8786"], err
    err, _ = refused(capsys, base + ["tcp://127.0.0.1:9"])
    assert err.startswith("error: Dask address tcp://127.0.0.1:9: no Dask scheduler answers there ("), err
    assert err.endswith("): start the scheduler, or pass the address it printed as it started"), err
    assert not (tmp_path / "out").exists()


def test_output_in_a_read_only_folder(shards, tmp_path):
    """Through the command, in its own process without root's permission override: a folder it may not write."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    code = ("import sys; from wdsembed.cli import main; "
            "sys.exit(main(lambda config, on_shard_done=None, all_finished=None: sys.exit(99), sys.argv[1:]))")
    try:
        begin = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code, str(shards), "-o", str(locked / "out"), "--model",
                               TINY_MODEL, "--no-pretrained"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=os.environ | {"PYTHONPATH": str(ROOT)},
                              preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
        seconds = time.monotonic() - begin
    finally:
        os.chmod(locked, 0o755)
    if done.returncode == CANNOT_DROP_OVERRIDE:
        pytest.skip("cannot drop root's permission override here")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: output '{locked / 'out'}' cannot be created by this user ('{locked}' does "
                                   "not let this user create folders): Permission denied; pass --output a folder you "
                                   "can write, or give this user write permission")
    assert list(locked.iterdir()) == []
    print(f"read-only output refused in {seconds:.2f} s (whole process, imports included)")


def test_refused_command_starts_no_server(shards, tmp_path):
    """The installed command's temporary Prefect server loads while the checks run: a refused run still ends with
    one line, and its server neither opened a database nor outlived the command."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)}
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    command = subprocess.Popen([sys.executable, "-m", "flows.command", str(shards), "-o", str(a_file), "--model",
                                TINY_MODEL, "--no-pretrained"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _, err = command.communicate(timeout=120)
    assert command.returncode == 2 and err.strip() == (
        f"error: output '{a_file}' is a file, not a folder: pass --output a folder"), err
    assert not list(home.glob("*.db*"))
    # the server's process is `python .../flows/apiserver.py FD PARENT_PID`
    processes = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout.splitlines()
    assert not [p for p in processes if "flows/apiserver.py" in p and p.endswith(f" {command.pid}")]


def test_an_unwritable_prefect_home_is_one_line_before_any_work(shards, tmp_path):
    """A login node or batch job whose HOME (so ~/.prefect) or PREFECT_HOME cannot be written: the command's
    temporary Prefect server failed to set its database up, after the checks and the progress bar, with a
    traceback from its process and 'exited (code 1)'. It is refused now, as the checks' mistakes are, in one line
    naming the folder and what to set."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    try:
        for case, home in (("HOME", {"HOME": str(locked / "nobody")}),
                           ("PREFECT_HOME", {"PREFECT_HOME": str(locked / "prefect-home")})):
            done = subprocess.run([sys.executable, str(ROOT / "flows/embed.py"), str(shards), "-o",
                                   str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"],
                                  cwd=tmp_path, env=env | home | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                                  text=True, timeout=300,
                                  preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
            if done.returncode == CANNOT_DROP_OVERRIDE:
                pytest.skip("cannot drop root's permission override here")
            said = done.stdout + done.stderr
            folder = locked / "nobody" / ".prefect" if case == "HOME" else locked / "prefect-home"
            assert done.returncode == 2 and done.stderr.strip() == (
                f"error: Prefect's folder {folder} cannot be written (Permission denied): set PREFECT_HOME to a folder "
                "you can write, or PREFECT_API_URL to a running Prefect server"), said
            assert not (tmp_path / "out").exists()
    finally:
        os.chmod(locked, 0o755)


def test_a_prefect_api_url_where_no_server_answers_is_refused_before_any_work(shards, tmp_path):
    """PREFECT_API_URL left set to a server that is not running (a stale shell setting): the run showed its progress
    bar and only after Prefect's client's retries (about 20 s) failed with 'cannot reach the Prefect API'. The
    checks ask the URL once, and refuse it in that one line, as they refuse other settings (exit 2)."""
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url}
    done = subprocess.run([sys.executable, str(ROOT / "flows/embed.py"), str(shards), "-o", str(tmp_path / "out"),
                           "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 2 and done.stdout == "", said  # no progress bar
    assert re.fullmatch(rf"error: cannot reach the Prefect API at {re.escape(url)} \(ConnectError: .+\): check "
                        r"PREFECT_API_URL", done.stderr.strip()), said
    assert not (tmp_path / "out").exists()


def test_a_prefect_api_url_from_the_profile_where_no_server_answers_is_refused_before_any_work(shards, tmp_path):
    """The same stale PREFECT_API_URL, set in the active Prefect profile (profiles.toml under PREFECT_HOME, as
    `prefect config set` writes it) rather than the environment: the check read the environment only, so the run
    started its work and failed only after Prefect's client's retries. It is refused in one line that says where
    the setting came from, so that it can be changed there."""
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    home = tmp_path / "prefect-home"
    home.mkdir()
    profiles = home / "profiles.toml"
    profiles.write_text(f'active = "lab"\n\n[profiles.lab]\nPREFECT_API_URL = "{url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)}
    done = subprocess.run([sys.executable, str(ROOT / "flows/embed.py"), str(shards), "-o", str(tmp_path / "out"),
                           "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 2 and done.stdout == "", said  # no progress bar
    assert re.fullmatch(rf"error: cannot reach the Prefect API at {re.escape(url)} \(ConnectError: .+\): check "
                        rf"PREFECT_API_URL in Prefect profile 'lab' \({re.escape(str(profiles))}\)",
                        done.stderr.strip()), said
    assert not (tmp_path / "out").exists()


# The command whose run ends well at once (its manifest from wdsembed.report), its stdout given by the test.
COMMAND_WITH_A_RUN_THAT_ENDS_WELL = """
import sys
from wdsembed import cli, report

def run(config, on_shard_done=None, all_finished=None):
    shard = {"stem": "00000", "output": "out/00000.parquet", "rows": 2, "samples": 2, "embedded": 2, "failed": 0,
             "cache_key": "k", "cached": False, "seconds": 1.0, "images_per_second": 2.0, "batch_size": 4,
             "warnings": [], "timeline": {}}
    on_shard_done(shard, 1, 1)
    return report.build_manifest(config, [shard], {}, 1.0) | {"path": "m.json"}

sys.exit(cli.main(run, sys.argv[1:]))
"""


def test_a_run_whose_output_pipe_is_closed_still_ends_as_it_went(shards, tmp_path):
    """`wdsembed ... | head -1` (or a log reader gone): the run wrote every shard, and the command ended with exit
    status 1, the status of a failed run, saying nothing: Rich's console of the summary ends the process (SystemExit
    1) where stdout's pipe is closed. A run that ended well now ends with 0 there too."""
    read, write = os.pipe()
    os.close(read)  # every write to the command's stdout fails (EPIPE), as once `head -1` has its line
    try:
        done = subprocess.run([sys.executable, "-c", COMMAND_WITH_A_RUN_THAT_ENDS_WELL, str(shards), "-o",
                               str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"], cwd=ROOT,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


# A command's temporary server, started at a signal: `go` appearing beside this script's first argument. A flow
# then runs through that server, as a command's does.
SERVER_AT_SIGNAL = """
import os, sys, time
from flows import apiserver
apiserver.prepare()  # the server's process loads while the others' do
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings
print('prepared', flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
url = apiserver.api_url()
apiserver.wait(url)
with temporary_settings(updates={PREFECT_API_URL: url}):
    state = flow(name='embed-shards')(lambda: None)(return_state=True)
print('run', state.name, flush=True)
"""


@pytest.mark.slow
def test_commands_started_at_once_on_a_new_prefect_database_all_run(tmp_path):
    """Two or more commands started together where Prefect's database is new (a new machine, a new PREFECT_HOME, or
    a Prefect upgrade with new migrations): each one's temporary server created the database's tables at once
    with the others, and all but one failed to start ('duplicate column name', 'no such index': exit 3), so their
    runs ended before any work. The servers now take turns to set the database up; each serves its own run."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)}
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", SERVER_AT_SIGNAL, str(go)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "prepared"
        time.sleep(10)  # lets each server's process load its code, so that their database setups meet
        go.touch()
        said = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (out, err) in zip(children, said):
        assert child.returncode == 0 and out.strip().endswith("run Completed"), err[-3000:]


def _input_naming_no_shard(mistake: str, data: Path) -> tuple[str, str]:
    """An input that names no shard, beside `data`, a folder of shard 00000, and how its refusal ends."""
    if mistake == "missing folder":
        return str(data.parent / "no-such-folder"), "does not exist: pass the folder that holds the *.tar shards"
    if mistake == "folder without shards":
        (data.parent / "empty").mkdir()
        return str(data.parent / "empty"), "holds no *.tar shards"
    if mistake == "list with a missing shard":
        (data.parent / "list.txt").write_text(f"{data / '00000.tar'}\n{data / '00009.tar'}\n")
        return str(data.parent / "list.txt"), f"names do not exist: {data / '00009.tar'}"
    assert mistake == "pattern matching none"
    return f"{data}/{{00010..00011}}.tar", f"names do not exist: {data / '00010.tar'}, {data / '00011.tar'}"


@pytest.mark.parametrize("mistake", ["missing folder", "folder without shards", "list with a missing shard",
                                     "pattern matching none"])
def test_input_naming_no_shard_is_refused_before_torch_is_imported(tmp_path, mistake):
    """A mistyped input folder is the commonest mistake: refused by the checks before the model's (which import
    torch and timm, seconds of a run that would stop anyway). So is a folder without shards, a list or a pattern
    naming missing ones: the listing that finds them ran before the model's checks, which still came first (about
    5 s instead of 1 on 2 cores)."""
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data = tmp_path / "data"
    write_shard(data, "00000", from_encoded(synthetic_images(1)))
    given, ending = _input_naming_no_shard(mistake, data)
    code = ("import sys\nfrom wdsembed.config import EmbedConfig\nfrom wdsembed.inputs import InputError\n"
            "from wdsembed.plan import check_config\ntry:\n    check_config(EmbedConfig(input=sys.argv[1], output=sys.argv[2], model_name=sys.argv[3], "
            "pretrained=False))\nexcept InputError as exc:\n    print(exc)\nprint(sorted({'torch', 'timm'} & "
            "set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, given, str(tmp_path / "out"),
                           TINY_MODEL], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    refusal, imported = done.stdout.strip().splitlines()
    assert refusal.endswith(ending) and imported == "[]", done.stdout


def test_progress_rate_never_reads_zero():
    """The bar's images/s: one decimal below 10 (a CPU run of a few images would read 0), whole numbers above, and
    none while nothing was embedded (a shard found finished)."""
    with cli._Progress() as progress:
        progress.started -= 100.0  # as if the run had lasted 100 s
        progress.update({"embedded": 18, "cached": True}, done=0, total=3)
        nothing = progress.bar.tasks[0].fields["rate"]
        progress.update({"embedded": 48}, done=1, total=3)
        slow = progress.bar.tasks[0].fields["rate"]
        progress.started = time.perf_counter() - 0.01
        progress.update({"embedded": 20_000}, done=2, total=3)
        fast = progress.bar.tasks[0].fields["rate"]
    assert nothing == "-" and slow == "0.5"
    assert "." not in fast and int(fast.replace(",", "")) > 1000


def test_the_bar_counts_failed_shards_and_says_the_time_left():
    """The bar said how many shards had ended, not that some had failed, nor how long the rest would take."""
    with cli._Progress() as progress:
        progress.update(None, 0, 6, 2)  # planned: 6 shards, 2 of them found finished
        progress.update({"embedded": 18, "cached": True}, done=1, total=6)
        progress.started -= 1000.0  # as if the run had lasted 1,000 s
        progress.update({"embedded": 48}, done=2, total=6)
        progress.update(None, done=3, total=6)
        failed = progress.bar.tasks[0].fields["failed"]
        # 2 shards took the 1,000 s of work; 2 are left to compute (one finished output has yet to come back)
        left = progress.bar.columns[-1].render(progress.bar.tasks[0]).plain
    assert failed == "1 failed" and left == "about 17 min left"


def test_bad_storage_options(shards, tmp_path, capsys):
    base = [str(shards), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"]
    s3 = base + ["-o", "s3://some-bucket/out"]
    err, seconds = refused(capsys, s3 + ["--storage-option", "endpont_url=http://127.0.0.1:9"])
    assert err == "error: storage option endpont_url: not an option of s3://. Did you mean: endpoint_url?"
    print(f"unknown storage option refused in {seconds:.2f} s (in-process)")
    err, _ = refused(capsys, base + ["-o", str(tmp_path / "out"), "--storage-option", "endpoint_url=http://x:9000"])
    assert err == "error: storage option endpoint_url: not an option of local folders."
    # the same options go to every store: a local folder's option breaks S3 (botocore's session refuses it)
    err, _ = refused(capsys, s3 + ["--storage-option", "auto_mkdir=true"])
    assert err == "error: storage option auto_mkdir: not an option of s3://."
    err, _ = refused(capsys, s3 + ["--storage-option", "anon=maybe"])
    assert err == "error: storage option anon=maybe: takes true or false"
    err, _ = refused(capsys, s3 + ["--storage-option", "endpoint_url=127.0.0.1:9000"])
    assert err == "error: storage option endpoint_url=127.0.0.1:9000: not an http(s)://host[:port] URL"
    err, seconds = refused(capsys, s3 + ["--storage-option", "read_timeout=soon"])
    assert err == "error: storage option read_timeout=soon: takes a number (float)"
    print(f"malformed storage option value refused in {seconds:.2f} s (in-process)")
    err, _ = refused(capsys, s3 + ["--storage-option", "default_block_size=big"])
    assert err == "error: storage option default_block_size=big: takes a number (int)"
    err, _ = refused(capsys, s3 + ["--storage-option", "profile=no-such-profile"])
    assert err.startswith("error: storage options for output s3://some-bucket/out: the store refuses them "
                          "(ProfileNotFound: The config profile (no-such-profile) could not be found")


def test_good_storage_options_pass():
    from wdsembed import preflight

    for options in ({"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1", "anon": "false",
                     "read_timeout": "30", "max_attempts": "3", "use_listings_cache": "false"}, {}):
        # builds the S3 client from the options, sends nothing
        preflight.check_storage_options(EmbedConfig(input="/data", output="s3://bucket/out", storage_options=options))
    preflight.check_storage_options(EmbedConfig(input="/data", output="/out", storage_options={"auto_mkdir": "true"}))


def test_storage_option_max_paths_becomes_a_number_for_every_store(tmp_path):
    """fsspec's listings cache takes max_paths from every store's options and computes `max_paths + 1`."""
    from wdsembed import preflight, storage

    options = {"endpoint_url": "http://127.0.0.1:9", "max_paths": "1000"}
    config = EmbedConfig(input="s3://b/in", output="s3://b/out", storage_options=options)
    preflight.check_storage_options(config)  # builds the S3 client, sends nothing
    assert storage.filesystem("s3://b/in", options)[0].dircache.max_paths == 1000
    preflight.check_storage_options(EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                                storage_options={"max_paths": "1000"}))
    with pytest.raises(preflight.PreflightError, match=r"^storage option max_paths=many: takes a number \(int\)$"):
        preflight.check_storage_options(EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                                    storage_options={"max_paths": "many"}))


# --------------------------------------------------------------------------------------------------- failed runs


class _Failed(RuntimeError):
    def __init__(self, manifest):
        super().__init__("3 of 4 shard(s) failed: ...")
        self.manifest = manifest


def _failed_run_manifest(out, failed_shards: dict) -> dict:
    """The manifest of a run in which shard 00003 was embedded and `failed_shards` failed."""
    return {
        "output": str(out), "path": str(out / "_manifest.json"),
        "totals": {"shards": 1, "computed": 1, "cached": 0, "rows": 2, "embedded": 2, "embedded_rows": 2,
                   "embedded_this_run": 2, "images_per_second": 1.0},
        "model": {"name": TINY_MODEL},
        "shards": {"00003": {"rows": 2, "embedded": 2, "failed": 0, "status": "computed", "images_per_second": 5.0}},
        "failed_shards": failed_shards,
    }


def test_failed_run_names_each_reason_once(shards, tmp_path, capsys):
    disk_full = "OSError: [Errno 28] No space left on device"
    manifest = _failed_run_manifest(tmp_path / "out", {"00000": disk_full, "00001": disk_full,
                                                       "00002": "KilledWorker: worker died"})

    def failing_run(config, on_shard_done=None, all_finished=None):
        raise _Failed(manifest)

    code = cli.main(failing_run, [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 1
    assert text.count(disk_full) == 1 and text.count("worker died") == 1
    assert "2 shard(s) failed (00000, 00001): " + disk_full in text
    assert "1 shard(s) failed (00002): KilledWorker: worker died" in text
    assert "run failed: 3 of 4 shard(s) failed (reasons above)" in captured.err
    assert f"1 finished shard(s) are in {tmp_path / 'out'}" in captured.err
    # not known which may pass: never a promise that the same command finishes them
    assert "to retry the 3 failed shard(s): one that failed for its data fails again until its file is replaced" \
        in captured.err and "finish the rest" not in captured.err


def test_failed_run_says_which_failed_shards_a_rerun_cannot_finish(shards, tmp_path, capsys):
    """A re-run retries the failed shards; it finishes those whose failure may pass (faults.is_transient), and not
    one that failed for its data (a .tar that is not a tar): the closing line promised to "finish the rest"."""
    from wdsembed.shard import ShardsFailed

    failures = {"00000": "MalformedShardError: 00000.tar: not a tar file", "00001": "ConnectionError: reset",
                "00002": "MalformedShardError: 00002.tar: not a tar file"}
    manifest = _failed_run_manifest(tmp_path / "out", failures)
    said = {}
    for case, transient in [("some pass", ["00001"]), ("all pass", ["00000", "00001", "00002"])]:
        def failing_run(config, on_shard_done=None, all_finished=None):
            raise ShardsFailed(failures, transient=transient, manifest=manifest, total=4)

        code = cli.main(failing_run, [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL,
                                      "--no-pretrained"])
        assert code == 1
        said[case] = capsys.readouterr().err.strip().splitlines()[-1]
    assert said["some pass"] == (
        f"1 finished shard(s) are in {tmp_path / 'out'} (not recomputed); run the same command again to retry the 3 "
        "failed shard(s): 00000, 00002 will fail again until the reason above is fixed")
    assert said["all pass"].endswith("to retry the 3 failed shard(s): their errors may pass")


def test_a_manifest_that_cannot_be_written_is_said_after_the_failed_shards(shards, tmp_path, capsys):
    """A full disk fails shards, then the manifest (the same disk): the summary names each failed shard with its
    reason, and the closing lines add the manifest's failure; where only the manifest failed, its one line follows
    the summary. The flow ended on the manifest's error alone, and the command said nothing of the failed shards."""
    import errno

    from wdsembed.report import ManifestNotWritten, with_manifest_failure
    from wdsembed.shard import ShardsFailed

    out = tmp_path / "out"
    disk_full = f"OSError: [Errno 28] No space left on device: cannot write {out / '00000.parquet'}"
    not_written = ManifestNotWritten(errno.ENOSPC, f"No space left on device: cannot write {out / '_manifest.json'}")
    argv = [str(shards), "-o", str(out), "--model", TINY_MODEL, "--no-pretrained"]
    said = {}
    for case, failures in [("with shards", {"00000": disk_full}), ("alone", {})]:
        not_written.manifest = {k: v for k, v in _failed_run_manifest(out, failures).items() if k != "path"}

        def failing_run(config, on_shard_done=None, all_finished=None):
            if failures:
                raise ShardsFailed(with_manifest_failure(failures, not_written), manifest=not_written.manifest,
                                   total=2) from not_written
            raise not_written

        assert cli.main(failing_run, argv) == 1
        said[case] = capsys.readouterr()
    summary, closing = said["with shards"].out, said["with shards"].err.strip().splitlines()
    assert f"1 shard(s) failed (00000): {disk_full}" in summary and "(manifest: not written)" in summary
    assert closing[-3:] == [
        "run failed: 1 of 2 shard(s) failed (reasons above)",
        f"and the manifest was not written: [Errno 28] No space left on device: cannot write {out / '_manifest.json'}",
        f"1 finished shard(s) are in {out} (not recomputed); run the same command again to retry the 1 failed "
        "shard(s): 00000 will fail again until the reason above is fixed"]
    assert "(manifest: not written)" in said["alone"].out
    assert said["alone"].err.strip().splitlines()[-2:] == [
        f"run failed: [Errno 28] No space left on device: cannot write {out / '_manifest.json'}",
        f"1 finished shard(s) are in {out}; run the same command again to finish the rest (finished shards are not "
        "recomputed)"]


def test_prefect_logs_a_runs_expected_ends_without_their_traceback():
    """Prefect's engines log the exception that ends a task or flow run with its traceback, and a task's cached
    result that a full disk kept from being written ('An error was encountered while committing transaction') on
    the worker: for the run's expected ends the line stays, naming the error, and the traceback goes."""
    import errno
    import logging

    from tasks.expected_ends import ExpectedEndWithoutTraceback
    from wdsembed.report import ManifestNotWritten

    def logged(message: str, exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, (), sys.exc_info())
        ExpectedEndWithoutTraceback().filter(record)
        return record

    disk_full = OSError(errno.ENOSPC, "No space left on device")
    record = logged("An error was encountered while committing transaction 'embed-1'", disk_full)
    assert record.exc_info is None
    assert record.getMessage() == ("An error was encountered while committing transaction 'embed-1': OSError: "
                                   "[Errno 28] No space left on device")
    manifest = ManifestNotWritten(errno.ENOSPC, "No space left on device: cannot write out/_manifest.json")
    record = logged(f"Task run failed with exception: {manifest!r}", manifest)
    assert record.exc_info is None and record.getMessage() == f"Task run failed with exception: {manifest!r}"
    assert logged("Task run failed with exception", ValueError("a bug")).exc_info is not None  # kept


def test_summary_says_what_its_rates_count_in_one_line(tmp_path, capsys):
    """The note under the table was the table's caption, wrapped to the table's width and centred: 'images/s:
    embedding only (model loading and writing' on one line and 'excluded)' alone on the next, padded with
    spaces. It is one line now."""
    shard = {"rows": 2, "embedded": 2, "failed": 0, "status": "computed", "images_per_second": 5.0}
    cli.print_summary({
        "output": str(tmp_path), "path": str(tmp_path / "_manifest.json"), "model": {"name": TINY_MODEL},
        "totals": {"shards": 1, "computed": 1, "cached": 0, "rows": 2, "embedded": 2, "embedded_rows": 2,
                   "embedded_this_run": 2, "images_per_second": 5.0},
        "shards": {"00000": shard}})
    lines = capsys.readouterr().out.splitlines()
    assert "images/s: embedding only (model loading and writing excluded)" in lines, lines
    assert not [line for line in lines if line.strip() == "excluded)"], lines


def test_ctrl_c_says_where_the_finished_shards_are_in_one_line(shards, tmp_path, capsys):
    """The line says how many shards finished and how many did not, once the run knows its shards (the flow says
    so as it plans them: the bar read '0/?' until a shard ended, and the line counted nothing); before that, where
    the finished ones are and what the same command does."""
    def interrupted_run(config, on_shard_done=None, all_finished=None, after=(), before=None):
        on_shard_done(None, 0, 4, *([before] if before is not None else []))  # planned, `before` found finished
        for args in after:
            on_shard_done(*args)
        raise KeyboardInterrupt

    argv = [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"]
    resume = (f"the shards finished so far are in {tmp_path / 'out'}; run the same command again to finish the rest "
              "(finished shards are not recomputed)")
    cached = {"stem": "00001", "embedded": 2, "cached": True}
    for after, said, before in (
        ([({"stem": "00000", "embedded": 2, "cached": False}, 1, 4)], "1 of 4 shard(s) finished, 3 not", None),
        ([({"stem": "00000", "embedded": 2, "cached": False}, 1, 4), (None, 2, 4)],
         "1 of 4 shard(s) finished, 1 failed, 2 not", None),
        ([], "0 of 4 shard(s) finished, 4 not", None),
        # outputs the planning found finished count from the start, once each as their results come back
        ([], "2 of 4 shard(s) finished, 2 not", 2),
        ([(cached, 1, 4), ({"stem": "00000", "embedded": 2, "cached": False}, 2, 4)],
         "3 of 4 shard(s) finished, 1 not", 2),
    ):
        code = cli.main(lambda config, **kw: interrupted_run(config, **kw, after=after, before=before), argv)
        assert code == 130  # as a shell reports a command ended by SIGINT
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"run interrupted: {said} (a shard ending as the run stopped may be whole too); {resume}")

    def stopped_before_planning(config, on_shard_done=None, all_finished=None):
        raise KeyboardInterrupt

    assert cli.main(stopped_before_planning, argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"run interrupted: {resume}"


def test_a_failure_without_a_message_is_named_by_its_type(shards, tmp_path, capsys):
    """A run that failed on an exception with no message (a bare TimeoutError) said "run failed: " and nothing."""
    def failed_run(config, on_shard_done=None, all_finished=None):
        raise TimeoutError

    code = cli.main(failed_run, [str(shards), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained"])
    assert code == 1
    assert "\nrun failed: TimeoutError\n" in capsys.readouterr().err


def test_summary_of_a_run_with_nothing_to_embed_says_so(tmp_path, capsys):
    """A re-run that finds every output finished says so, instead of a rate of 0.0 images/s; a run that computed
    shards keeps its count and rate, even when none of their images could be embedded."""
    shard = {"rows": 2, "embedded": 2, "failed": 0, "status": "cached", "images_per_second": 5.0}
    manifest = {
        "output": str(tmp_path), "path": str(tmp_path / "_manifest.json"), "model": {"name": TINY_MODEL},
        "totals": {"shards": 1, "computed": 0, "cached": 1, "rows": 2, "embedded": 2, "embedded_rows": 2,
                   "embedded_this_run": 0, "images_per_second": 0.0},
        "shards": {"00000": shard},
    }
    cli.print_summary(manifest)
    out = capsys.readouterr().out
    assert "nothing to embed this run: every output was already finished" in out
    assert "images this run" not in out
    manifest["totals"] |= {"computed": 1, "cached": 0}
    manifest["shards"]["00000"] = shard | {"status": "computed", "embedded": 0, "failed": 2}
    cli.print_summary(manifest)
    out = capsys.readouterr().out
    assert "0 images this run at 0.0 images/s" in out and "nothing to embed" not in out


def test_summary_of_a_run_that_computed_nothing_but_had_a_failed_shard_gives_no_rate(tmp_path, capsys):
    """A re-run whose only work was a shard that failed again (an HTML page saved as .tar), every other output
    finished before: the summary said "0 images this run at 0.0 images/s", a rate of a run that embedded nothing.
    It says what happened instead, as a re-run with nothing to embed does."""
    shard = {"rows": 2, "embedded": 2, "failed": 0, "status": "cached", "images_per_second": 5.0}
    manifest = {
        "output": str(tmp_path), "path": str(tmp_path / "_manifest.json"), "model": {"name": TINY_MODEL},
        "totals": {"shards": 1, "computed": 0, "cached": 1, "rows": 2, "embedded": 2, "embedded_rows": 2,
                   "embedded_this_run": 0, "images_per_second": 0.0},
        "shards": {"00000": shard},
        "failed_shards": {"00001": "MalformedShardError: 00001.tar is not a tar file (it starts with '<!DOCTYPE')"},
    }
    cli.print_summary(manifest)
    out = capsys.readouterr().out
    assert "images/s" not in out.split("images/s: embedding only")[-1], out
    assert "nothing embedded this run: 1 shard(s) failed; every other output was already finished" in out, out
    manifest["totals"] |= {"shards": 0, "cached": 0, "rows": 0, "embedded": 0, "embedded_rows": 0}
    manifest["shards"] = {}
    cli.print_summary(manifest)
    out = capsys.readouterr().out
    assert "nothing embedded this run: 1 shard(s) failed" in out and "already finished" not in out, out


def test_the_summary_names_shards_and_the_model_as_they_are_named_whatever_their_brackets(tmp_path, capsys):
    """The summary's table and model line went through rich's markup: shards `[x].tar`, `[bold]a.tar` and
    `[#f00]c.tar` were listed as '', 'a' and 'c', and a model folder `local-dir:/models/clip [red]` lost its part."""
    shard = {"rows": 2, "embedded": 2, "failed": 0, "status": "computed", "images_per_second": 5.0}
    model = "local-dir:/models/clip [red]"
    manifest = {
        "output": str(tmp_path), "path": str(tmp_path / "_manifest.json"), "model": {"name": model},
        "totals": {"shards": 3, "computed": 3, "cached": 0, "rows": 6, "embedded": 6, "embedded_rows": 6,
                   "embedded_this_run": 6, "images_per_second": 5.0},
        "shards": {stem: shard for stem in ("[x]", "[bold]a", "[#f00]c")},
        "failed_shards": {"[@click]b": "MalformedShardError: not a tar file"},
    }
    cli.print_summary(manifest)
    rows = {line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines() if line.count("│") > 2}
    assert {"[x]", "[bold]a", "[#f00]c", "[@click]b"} <= rows, rows
    cli.print_summary(manifest)
    assert f"model {model} (?)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- task E, whole


# The command, run so that it reports at exit which of the libraries that only a model needs it imported.
COMMAND_REPORTING_IMPORTS = (
    "import atexit, sys; "
    "atexit.register(lambda: print('imported:', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', "
    "'nvidia'}))); "
    "from flows.command import main; sys.exit(main())")

# Reads back, from the database the command's temporary server used (PREFECT_HOME), every flow run of the flow,
# its task runs' states and how many heartbeat events it sent; prints them as JSON, oldest run first.
READ_FLOW_RUNS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_API_URL, temporary_settings
from flows import apiserver

def heartbeats(client, run):
    return client.read_events(EventFilter(event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1).total

with temporary_settings(updates={PREFECT_API_URL: apiserver.api_url()}):
    apiserver.wait(PREFECT_API_URL.value())
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        print(json.dumps([{"flow": client.read_flow(r.flow_id).name, "state": r.state.name, "tasks": {
            t.name: t.state.name for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))},
            "heartbeats": heartbeats(client, r)} for r in runs]))
"""


@pytest.mark.slow
def test_command_end_to_end_terminal_and_rerun(tmp_path):
    """The real command (temporary Prefect server, one Dask worker) on a shard with a damaged PNG: DALI's decoder
    lines stay off the terminal, and so do Dask's INFO lines (a cluster's start and stop) but the nanny's. The
    re-run, with nothing to compute, imports no torch, timm or DALI, starts no Dask cluster, keeps the computing
    run's figures, and is still recorded: a Completed flow run whose embedding task run is Cached."""
    import json

    from wdsembed.synthetic import write_demo_dataset

    write_demo_dataset(tmp_path / "in", n_shards=1, per_shard=6, corrupt_per_shard=2)  # a cut JPEG, a damaged PNG
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WDSEMBED_", "DASK_"))}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device",
            "cpu", "--batch-size", "4", "--num-threads", "1", "--n-workers", "1"]
    manifests, texts = [], []
    for command in (["-m", "flows.command"], ["-c", COMMAND_REPORTING_IMPORTS]):
        done = subprocess.run([sys.executable, *command, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        texts.append(done.stdout + done.stderr)
        assert done.returncode == 0, texts[-1][-4000:]
        manifests.append(json.loads((tmp_path / "out" / "_manifest.json").read_text()))
    assert "libpng" not in texts[0] and "[ERROR]" not in texts[0]
    assert any("damaged PNG" in c["reason"] for c in manifests[0]["rows_without_embedding"]["causes"])
    assert "images/s: embedding only" in texts[0]
    assert "Creating a new Dask cluster" in texts[0]
    assert set(re.findall(r"\| INFO +\| (distributed\.\w+)", texts[0])) <= {"distributed.nanny"}  # a death's reason
    computed, cached = manifests[0]["shards"]["00000"], manifests[1]["shards"]["00000"]
    assert computed["status"] == "computed" and cached["status"] == "cached"
    assert computed["images_per_second"] > 0 and computed["embed_seconds"] > 0
    assert {k: v for k, v in cached.items() if k != "status"} == {k: v for k, v in computed.items() if k != "status"}
    assert "imported: []" in texts[1]
    assert "distributed." not in texts[1]  # no scheduler, nanny or worker logged a line
    assert "1 shard(s): 0 computed, 1 cached" in texts[1]
    assert "nothing to embed this run: every output was already finished" in texts[1]
    assert "1 shard(s) with a finished output, 0 to compute" in texts[1]  # said once, not once per shard:
    assert "Finished in state Cached" not in texts[1] and "Task run 'embed-00000'" not in texts[1], texts[1]
    assert re.search(r"Flow run '[^']+' - Finished in state Completed\(\)", texts[1]), texts[1]

    done = subprocess.run([sys.executable, "-c", READ_FLOW_RUNS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = [r for r in json.loads(done.stdout.strip().splitlines()[-1]) if r["flow"] == "embed-shards"]
    assert [r["state"] for r in runs] == ["Completed", "Completed"]
    # Its temporary server stopped with the command: no heartbeats, whose thread the run's end would wait for.
    assert [r["heartbeats"] for r in runs] == [0, 0]
    tasks = runs[1]["tasks"]
    assert tasks.pop("embed-00000") == "Cached"
    assert set(tasks.values()) == {"Completed"} and len(tasks) == 2  # indexing and the report


@pytest.mark.slow
def test_a_rerun_of_hundreds_of_finished_shards_ends_on_its_summary(tmp_path):
    """A re-run with nothing to compute over 400 finished shards sends one task-run event per shard as it ends; its
    temporary Prefect server, stopped with the command, cancelled their last flush, and Prefect logged each cancelled
    flush with its traceback: four tracebacks, about 150 lines, on the terminal after the summary of a run that had
    ended well (at 2,000 shards too). Now the server says nothing once it is told to stop."""
    from wdsembed.api import run_shards
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "in", tmp_path / "out"
    images = from_encoded(synthetic_images(1, sizes=((32, 32),), formats=("jpeg",)))
    for s in range(400):
        write_shard(data, f"{s:05d}", images, shard_id=s)
    run_shards(EmbedConfig(input=str(data), output=str(out), model_name=TINY_MODEL, pretrained=False, device="cpu",
                           num_threads_per_worker=1, fidelity_sample=0))  # the outputs, without Prefect: faster
    done = subprocess.run([sys.executable, str(ROOT / "flows/embed.py"), str(data), "-o", str(out), "--model",
                           TINY_MODEL, "--no-pretrained", "--device", "cpu", "--fidelity-sample", "0"], cwd=tmp_path,
                          env=_command_env(tmp_path), capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-4000:]
    assert "400 shard(s): 0 computed, 400 cached" in said, said[-4000:]
    assert "Traceback" not in said and "| ERROR" not in said, said[-6000:]
    assert done.stdout.rstrip().endswith(f"output: {out}  (manifest: {out}/_manifest.json)"), said[-4000:]


def _command_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WDSEMBED_", "DASK_"))}
    return env | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
                  "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"} | DUMP_STACKS


@pytest.fixture(scope="module")
def failed_command(tmp_path_factory) -> subprocess.CompletedProcess:
    """`python flows/embed.py` on 5 shards: a good one, a truncated tar (written, with a warning), and three HTML
    pages saved as .tar (failed, for one cause)."""
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    tmp = tmp_path_factory.mktemp("failed-command")
    for s in range(3):
        write_shard(tmp / "in", f"{s:05d}", from_encoded(synthetic_images(8, seed=s, formats=("jpeg",))), seed=s)
    tar = tmp / "in" / "00001.tar"
    with open(tar, "r+b") as fh:
        fh.truncate(tar.stat().st_size // 2)
    for s in range(2, 5):
        (tmp / "in" / f"{s:05d}.tar").write_bytes(b"<!DOCTYPE html><html>404</html>")
    # Port 8787 taken, as by another run's or a notebook's cluster: the dashboard moves without a UserWarning.
    with contextlib.closing(socket.socket()) as holder:
        try:
            holder.bind(("", 8787))
            holder.listen()
            held = True
        except OSError:
            held = False  # taken already, by a process that may hold it on one address only: Dask may get the rest
        done = subprocess.run([sys.executable, str(ROOT / "flows/embed.py"), str(tmp / "in"), "-o", str(tmp / "out"),
                               "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu", "--n-workers", "1",
                               "--num-threads", "1"], cwd=tmp, env=_command_env(tmp), capture_output=True, text=True,
                              timeout=600)
    done.held_8787 = held
    return done


@pytest.mark.slow
def test_command_with_a_failed_shard_prints_no_prefect_internals(failed_command):
    """Indexing the damaged tars logs from the planning's own threads, outside the flow run's context: no Python
    UserWarning about Prefect's settings ('attempted to send logs to the API without a flow run id'), nor Dask's
    about the dashboard's port 8787 being taken (the log names the port it took)."""
    said = failed_command.stdout + failed_command.stderr
    assert failed_command.returncode == 1, said[-3000:]
    assert "not a readable tar" in said  # the line itself still shows
    assert "without a flow run id" not in said and "UserWarning" not in said, said[-3000:]
    port = r"(?!8787\b)\d+" if failed_command.held_8787 else r"\d+"  # held here: the dashboard took another
    assert re.search(rf"The Dask dashboard is available at http://\S+:{port}/status", said), said[-3000:]


@pytest.mark.slow
def test_command_with_a_failed_shard_says_why_without_a_traceback(failed_command):
    """A failed shard is an expected end: its reason once in the summary, Prefect's line that the flow run ended on
    the exception without its traceback, and a closing line that does not promise a re-run would finish it."""
    said = failed_command.stdout + failed_command.stderr
    assert "(1) 3 shard(s) failed (00002, 00003, 00004): e.g. 00002: MalformedShardError" in said, said[-3000:]
    assert "Encountered exception during execution: ShardsFailed(" in said  # the line stays, in the UI too
    assert "Traceback (most recent call last)" not in said, said[-3000:]
    assert failed_command.stderr.rstrip().endswith(
        "(not recomputed); run the same command again to retry the 3 failed shard(s): 00002, 00003, 00004 will fail "
        "again until the reason above is fixed"), failed_command.stderr[-2000:]


@pytest.mark.slow
def test_command_says_each_failed_shard_a_bounded_number_of_times(failed_command):
    """Each failure was said on the terminal once per logger (the worker's, its task run's end, the flow's) and
    again in the flow run's two closing lines, each of which joined every reason into one: 18 times in 14 lines here
    for 3 shards of one cause. Now its task run's end says it, and the summary and the closing lines say each cause
    once, with a few of its shards' names."""
    said = failed_command.stdout + failed_command.stderr
    failed = ["00002", "00003", "00004"]
    reasons = [line for line in said.splitlines() if "not a tar file" in line]
    # one task-run end per shard; Prefect's two lines of the flow run's end; the summary
    assert len(reasons) <= len(failed) + 3, "\n".join(reasons)
    assert all(line.count("not a tar file") == 1 for line in reasons), "\n".join(reasons)
    assert sum(line.startswith("(") and "shard(s) failed" in line for line in failed_command.stdout.splitlines()) == 1


@pytest.mark.slow
def test_command_prints_no_dask_worker_start_or_close_lines(failed_command):
    """Each local worker's nanny said its start ('Start Nanny at: ...') and, at the run's end, three lines of its
    close ('Closing Nanny at ... Reason: nanny-close', 'Nanny asking worker to close', 'Nanny at ... closed.'):
    five lines per worker process, forty on an 8-GPU host, saying only that the cluster ran. The dashboard's line
    stays, and so would a nanny's line saying why a worker died."""
    said = failed_command.stdout + failed_command.stderr
    assert "Creating a new Dask cluster" in said and "The Dask dashboard is available at" in said, said[-3000:]
    assert "Nanny" not in said, said[-3000:]


@pytest.mark.slow
def test_command_says_a_shard_embedded_once_not_again_as_its_task_runs_end(failed_command):
    """Each embedded shard's line ('shard 00000: embedded, 8 rows, ...') was followed by Prefect's line of its task
    run's end, 'Finished in state Completed()', and so were the indexing's and the report's task runs: a second line
    per shard saying nothing more (a re-run printed one 'Cached(type=COMPLETED)' line per shard). A task run that
    failed still ends on its line with the reason."""
    said = failed_command.stdout + failed_command.stderr
    assert "shard 00000: embedded, 8 rows" in said, said[-3000:]
    assert not re.search(r"Task run '[^']+' - Finished in state Completed\(\)", said), said[-3000:]
    assert re.search(r"Task run 'embed-00002' - Finished in state Failed\(", said), said[-3000:]


@pytest.mark.slow
def test_the_plannings_line_of_a_damaged_tar_names_it_once(failed_command):
    """The planning's warning of a tar it could not index named the shard's path twice in one line ('shard
    /data/00001.tar cannot be indexed (/data/00001.tar: unexpected end of file ...)'), on object stores a long URL
    twice; and so did its line of a file that is no tar. Each names it once, with where and why."""
    said = failed_command.stdout + failed_command.stderr
    lines = [line for line in said.splitlines() if "cannot be indexed" in line or "is not a readable tar" in line]
    assert any("00001.tar cannot be indexed (" in line and "at byte" in line for line in lines), said[-3000:]
    assert any("00002.tar is not a readable tar (unexpected end of file" in line for line in lines), lines
    assert all(line.count(".tar") == 1 for line in lines), lines



@pytest.mark.slow
def test_a_script_reads_a_failed_runs_result_without_parsing_its_log(failed_command):
    """The README's contract for scripts, stdout and stderr redirected: exit 1; stdout holds the summary alone (no
    log line), neither stream a colour, cursor movement or carriage return; the summary's last line names the
    manifest, which lists each failed shard with its reason and each finished one with its output."""
    import json

    assert failed_command.returncode == 1, failed_command.stderr[-3000:]
    assert not re.search(r"\| (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\|", failed_command.stdout), failed_command.stdout
    for stream in (failed_command.stdout, failed_command.stderr):
        assert "\x1b" not in stream and "\r" not in stream, repr(stream[-2000:])
    manifest_path = re.fullmatch(r"output: .+  \(manifest: (.+)\)", failed_command.stdout.splitlines()[-1])[1]
    manifest = json.loads(Path(manifest_path).read_text())
    failed = manifest["failed_shards"]
    assert sorted(failed) == ["00002", "00003", "00004"], failed
    assert all(reason.startswith("MalformedShardError: ") for reason in failed.values()), failed
    assert {stem: s["status"] for stem, s in manifest["shards"].items()} == {"00000": "computed",
                                                                              "00001": "computed"}
    assert all(Path(s["output"]).is_file() for s in manifest["shards"].values())

def test_a_command_still_running_after_its_stop_shows_its_stacks(shards, tmp_path):
    """With WDSEMBED_DUMP_STACKS_ON_SIGUSR1 set, SIGUSR1 makes the command write its threads' stacks and go on: what
    the tests below show of a command that has not ended in time after a signal (processes.ended)."""
    running = tmp_path / "running"
    call = ("import time; from wdsembed import cli; cli.main(lambda config, **_: (open("
            f"{str(running)!r}, 'w').close(), time.sleep(600)), [{str(shards)!r}, '-o', {str(tmp_path / 'out')!r}, "
            f"'--model', {TINY_MODEL!r}, '--no-pretrained'])")
    proc = subprocess.Popen([sys.executable, "-c", call], cwd=ROOT, env=_command_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not running.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(AssertionError, match=r"still running 0 s after it was stopped; its stacks:\n(Current )?"
                                                 r"[Tt]hread 0x(?s:.*)line 1 in <lambda>"):
            ended(proc, 0.1)
        assert proc.poll() is None  # it went on
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("to", ["command", "process group"])
def test_ctrl_c_mid_run(to, tmp_path):
    """SIGINT mid-run: to the command alone, no traceback (it printed a KeyboardInterrupt's, ~50 lines, and no
    hint), the line that says where the finished shards are, exit 130. To its process group, as a terminal's Ctrl-C
    is sent: the same end within seconds (the temporary API server got it too and died, and the flow run's end was
    retried against it for over a minute), and no traceback either (the local Dask worker process printed its own:
    see test_ctrl_c_to_the_process_group_while_workers_embed)."""
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(12):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(16, seed=s, formats=("jpeg",))), seed=s)
    proc = subprocess.Popen([sys.executable, str(ROOT / "flows/embed.py"), str(data), "-o", str(out), "--model",
                             TINY_MODEL, "--no-pretrained", "--device", "cpu", "--n-workers", "1", "--num-threads",
                             "1", "--batch-size", "1", "--fidelity-sample", "0"], cwd=tmp_path,
                            env=_command_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # SIGINT's default disposition (a background job's is to ignore it), a group of its own
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=True)
    try:
        _wait_for_a_finished_shard(proc, out)
        interrupted = time.monotonic()
        if to == "command":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = ended(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = _ended_on_ctrl_c(proc, stdout, stderr, out, interrupted)
    assert not (out / "_claim.json").exists()  # the run's claim on its output is released (wdsembed.outputclaim)
    # the flow run's end says how it ended, once; not also as an ERROR that a crash was detected
    assert "Finished in state Crashed('Execution was aborted by an interrupt signal.')" in said, said[-4000:]
    assert "Crash detected" not in said, said[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("to", ["command", "process group"])
def test_sigterm_mid_run_ends_as_ctrl_c_does(to, tmp_path):
    """SIGTERM mid-run (kill PID; systemd, Kubernetes and Slurm's scancel send it, to the process group too) killed
    the command on the spot, once Prefect had marked its flow run Crashed: exit -15, nothing said, and its claim on
    OUTPUT left behind (another host waited 3 minutes to take it over). Now it ends as on Ctrl-C: its claim
    released, no process of the run left, one line saying how to go on, exit 143; the same command then finishes
    the rest without recomputing a finished shard."""
    import psutil

    command, out = _a_run_to_stop(tmp_path)
    proc = subprocess.Popen(command, cwd=tmp_path, env=_command_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_a_finished_shard(proc, out)
        started = psutil.Process(proc.pid).children(recursive=True)
        interrupted = time.monotonic()
        if to == "command":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = ended(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _ended_on_ctrl_c(proc, stdout, stderr, out, interrupted, code=128 + signal.SIGTERM, by=" by SIGTERM")
    _left_nothing_and_goes_on(command, tmp_path, out, started)


@pytest.mark.slow
def test_sigterm_while_the_cluster_is_slow_to_close_still_ends_as_an_interruption(tmp_path):
    """SIGTERM mid-run on a loaded machine, where the nanny's kill of its busy worker process took longer to reap
    than distributed's 5 s (WDSEMBED_FAULTS gives it none): the cluster's close raised TimeoutError over the stop,
    and the run ended as failed (exit 1, "run failed: " with no reason, "no shard finished" though one had), its flow
    run left Running, and the exit waited 10 s more for the cluster. Now it ends as any SIGTERM does, with one line
    saying the worker process had not ended; its flow run Crashed, as Prefect marks it on SIGTERM."""
    import json
    import sqlite3

    import psutil

    command, out = _a_run_to_stop(tmp_path)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"worker_close": {"timeout_s": 0}}))
    proc = subprocess.Popen(command, cwd=tmp_path, env=_command_env(tmp_path) | {"WDSEMBED_FAULTS": str(faults)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_a_finished_shard(proc, out)
        started = psutil.Process(proc.pid).children(recursive=True)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = ended(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = _ended_on_ctrl_c(proc, stdout, stderr, out, interrupted, code=128 + signal.SIGTERM, by=" by SIGTERM")
    assert "run failed" not in said and "TimeoutError" not in said, said[-4000:]
    assert len([line for line in said.splitlines() if "had not ended" in line]) == 1, said[-4000:]
    with contextlib.closing(sqlite3.connect(tmp_path / "prefect-home" / "prefect.db")) as db:
        assert db.execute("SELECT state_type FROM flow_run").fetchall() == [("CRASHED",)]
    _left_nothing_and_goes_on(command, tmp_path, out, started)


@pytest.mark.slow
@pytest.mark.parametrize("output", ["terminal", "pipes"])
def test_hangup_mid_run_ends_as_sigterm_does(output, tmp_path):
    """SIGHUP mid-run, as an ssh session that drops or a terminal window that closes sends it to the command's
    process group (started without nohup or tmux), its output gone: writing to its terminal fails from then on
    (EIO), as it does to a pipe whose reader is gone (EPIPE). It killed the command on the spot, the claim on OUTPUT
    left behind (another host waited 3 minutes to take it over). Now it ends as on SIGTERM: claim released, no
    process of the run left, exit 129, though the progress bar and the closing line have nowhere to go. Where stderr
    still goes somewhere (a file, stdout a closed pipe), the closing line is there, without a traceback (the
    progress bar's console ended the process with exit 1 on its closed pipe, rich's own way), and without the
    warning and tracebacks of a resource tracker that the hangup had killed. The same command then finishes the rest
    without recomputing a finished shard."""
    import fcntl
    import pty
    import select
    import termios

    import psutil

    command, out = _a_run_to_stop(tmp_path)
    log = tmp_path / "stderr.log"
    if output == "terminal":
        reading, tty = pty.openpty()
        proc = subprocess.Popen(command, cwd=tmp_path, env=_command_env(tmp_path), stdin=tty, stdout=tty, stderr=tty,
                                start_new_session=True,
                                # the pseudo-terminal is the session's controlling terminal, as a login's is
                                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(tty)
    else:
        with open(log, "w") as log_file:
            proc = subprocess.Popen(command, cwd=tmp_path, env=_command_env(tmp_path), stdout=subprocess.PIPE,
                                    stderr=log_file, start_new_session=True)
        reading = os.dup(proc.stdout.fileno())
        proc.stdout.close()
    shown = bytearray()  # read as the run goes, as a terminal does: a full one would block the run's writes
    try:
        _wait_for_a_finished_shard(
            proc, out, lambda: select.select([reading], [], [], 0)[0] and shown.extend(os.read(reading, 1 << 16)))
        started = psutil.Process(proc.pid).children(recursive=True)
        interrupted = time.monotonic()
        os.close(reading)  # hung up: writes to it fail
        reading = None
        os.killpg(proc.pid, signal.SIGHUP)
        ended(proc, 120, said=lambda: log.read_text() if output == "pipes" else "(its terminal is gone)")
    finally:
        if reading is not None:
            os.close(reading)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if output == "terminal":
        assert b"shards" in shown, shown[-2000:]  # the progress bar was on the terminal
        assert proc.returncode == 128 + signal.SIGHUP, proc.returncode
        assert time.monotonic() - interrupted < 30
    else:
        said = _ended_on_ctrl_c(proc, shown.decode(), log.read_text(), out, interrupted, code=128 + signal.SIGHUP,
                                by=" by SIGHUP")
        assert "resource_tracker" not in said, said[-4000:]
    _left_nothing_and_goes_on(command, tmp_path, out, started)


def _a_run_to_stop(tmp_path: Path) -> tuple[list[str], Path]:
    """The command and its OUTPUT for 12 shards of 16 images, embedded one image at a time by one worker: a run
    slow enough to be stopped after its first shard, with most still to do."""
    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(12):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(16, seed=s, formats=("jpeg",))), seed=s)
    command = [sys.executable, str(ROOT / "flows/embed.py"), str(data), "-o", str(out), "--model", TINY_MODEL,
               "--no-pretrained", "--device", "cpu", "--n-workers", "1", "--num-threads", "1", "--batch-size", "1",
               "--fidelity-sample", "0"]
    return command, out


def _wait_for_a_finished_shard(proc, out: Path, meanwhile=lambda: None) -> None:
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list(out.glob("0*.parquet")) and time.monotonic() < deadline:
        meanwhile()
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"


def _left_nothing_and_goes_on(command: list[str], tmp_path: Path, out: Path, started: list) -> None:
    """After a run stopped mid-way: its claim released, none of its processes (`started`) left, every output whole;
    the same command then finishes the rest, finding exactly the finished shards cached."""
    import json

    import psutil
    import pyarrow.parquet as pq

    assert not (out / "_claim.json").exists()
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not [p for p in alive if _running(p)], alive
    assert not [p.name for p in out.rglob("*.tmp*")]
    finished = {p.stem for p in out.glob("*.parquet")}
    for stem in finished:
        table = pq.read_table(out / f"{stem}.parquet")
        assert table.num_rows == 16 and table.column("image_embedding").null_count == 0, stem

    again = subprocess.run(command, cwd=tmp_path, env=_command_env(tmp_path), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "took over the claim" not in again.stdout + again.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["shards"]) == 12
    assert {stem for stem, s in manifest["shards"].items() if s["status"] == "cached"} == finished


def _ended_on_ctrl_c(proc, stdout: str, stderr: str, out, interrupted: float, *, code: int = 130,
                     by: str = "") -> str:
    """A command's end on Ctrl-C (or, with `by` " by SIGTERM" or " by SIGHUP", on that signal): exit `code` within 30 s, one closing
    line with the resume hint, no traceback. Returns all it said."""
    said = stdout + stderr
    assert proc.returncode == code, said[-4000:]
    assert time.monotonic() - interrupted < 30, said[-4000:]
    # how many shards finished and how many not, counted by the progress bar, which knew them all from the start
    line = re.search(rf"run interrupted{by}: (\d+) of (\d+) shard\(s\) finished(, \d+ failed)?, (\d+) not \(a shard "
                     r"ending as the run stopped may be whole too\); ", stderr)
    assert line and int(line[1]) + int(line[4]) <= int(line[2]) == len(list(Path(out).parent.glob("in/*.tar"))), \
        said[-4000:]
    bar = [shown for shown in stdout.splitlines() if shown.startswith("shards")]
    assert not bar or "/?" not in bar[-1], stdout[-4000:]  # where it was left: the shards' number known
    assert stderr.rstrip().endswith(
        f"the shards finished so far are in {out}; run the same command again to finish the "
        "rest (finished shards are not recomputed)"), said[-4000:]
    assert "Traceback (most recent call last)" not in said, said[-4000:]
    # no worker process aborted as it exited, a thread of its stream still in torch or DALI (worker._close_at_exit)
    assert "terminate called" not in said and "killed by signal 6" not in said, said[-4000:]
    return said


def _ctrl_c_to_the_group_once_shard_00000_is(what: str, fault: dict, command: list, tmp_path: Path, out: Path, *,
                                             then_wait_s: float = 0) -> tuple[str, list, int]:
    """Run `command` in a process group of its own with shard 00000 given `fault` (WDSEMBED_FAULTS), send the group
    SIGINT (as a terminal's Ctrl-C) once that shard's attempts file exists (and `then_wait_s` after), and return
    what the command said (_ended_on_ctrl_c: exit 130, its checks), the processes it had started and its process
    group."""
    import json

    import psutil

    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"00000": fault}))
    reached = Path(f"{faults}.00000.attempts")
    proc = subprocess.Popen(command, cwd=tmp_path, env=_command_env(tmp_path) | {"WDSEMBED_FAULTS": str(faults)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not reached.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and reached.exists(), f"the run ended, or shard 00000 never {what}"
        time.sleep(then_wait_s)
        started = psutil.Process(proc.pid).children(recursive=True)  # API server, resource tracker, workers
        interrupted = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = ended(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return _ended_on_ctrl_c(proc, stdout, stderr, out, interrupted), started, proc.pid


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_while_workers_embed(tmp_path):
    """Ctrl-C as a terminal sends it, to the whole process group, while a real local cluster of two worker processes
    embeds: one holds a shard mid-embedding (a fault hook waits after each batch), the other has finished its
    shards or is busy with one. The worker processes got the SIGINT too and each closed itself; the idle one ended
    on a KeyboardInterrupt traceback of its own ("Process Dask Worker process (from Nanny):"), printed among the
    command's lines. Now the command alone handles it: its one line, exit 130, no traceback, no process of the run
    left behind, no partial output; the same command then finishes the rest without recomputing a finished shard."""
    import psutil
    import pyarrow.parquet as pq

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(3):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(16, seed=s, formats=("jpeg",))), seed=s)
    # the held shard's attempts file is written as its first batch is through the model
    command = [sys.executable, str(ROOT / "flows/embed.py"), str(data), "-o", str(out), "--model", TINY_MODEL,
               "--no-pretrained", "--device", "cpu", "--n-workers", "2", "--num-threads", "1", "--batch-size", "1",
               "--fidelity-sample", "0"]
    said, started, group = _ctrl_c_to_the_group_once_shard_00000_is(
        "reached", {"fail_attempts": 0, "where": "batch", "hold_s": 2}, command, tmp_path, out)
    assert "KeyboardInterrupt" not in said, said[-4000:]
    # nothing from the worker processes ("Dask Worker process (from Nanny):", a worker that closed itself, the
    # warnings and errors of one closed with a task running); the nanny's lines, in the command's process, stay
    assert "Dask Worker process" not in said and "worker-close" not in said, said[-4000:]
    assert "distributed.worker - " not in said and "distributed.worker.state_machine" not in said, said[-4000:]
    # the held shard, left unwritten, said once, as a warning: not again by its task run's end, an ERROR naming
    # the exception's class
    assert said.count("00000.tar stopped after") == 1, said[-4000:]
    assert "ShardAbandoned" not in said and "Task run 'embed-00000'" not in said, said[-4000:]

    assert len(started) >= 3, started
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not [p for p in alive if _running(p)], alive
    assert not [p for p in psutil.process_iter() if _pgid(p.pid) == group and _running(p)]

    assert not [p.name for p in out.rglob("*.tmp*")]
    assert not (out / "_claim.json").exists()  # released: the same command goes on at once
    finished = sorted(p.stem for p in out.glob("*.parquet"))
    assert "00000" not in finished  # held mid-embedding: never written, not even in part
    for stem in finished:
        table = pq.read_table(out / f"{stem}.parquet")
        assert table.num_rows == 16 and table.column("image_embedding").null_count == 0, stem

    again = subprocess.run(command, cwd=tmp_path, env=_command_env(tmp_path), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert sorted(p.stem for p in out.glob("*.parquet")) == ["00000", "00001", "00002"]
    assert f"3 shard(s): {3 - len(finished)} computed, {len(finished)} cached" in again.stdout, again.stdout[-4000:]


@pytest.mark.slow
def test_ctrl_c_while_a_worker_is_inside_a_slow_batch_ends_in_seconds_saying_so_once(tmp_path):
    """Ctrl-C to the process group while the one local worker has a batch in its model that takes longer than the
    nanny waits for it (distributed's Nanny.kill: 4 s after asking the process to close, then SIGKILL): a ViT-B/16
    batch of 32 on one CPU thread, tens of seconds. The worker's close waits for its task, which waits for that
    batch; torch cannot be interrupted mid-batch, and the process is killed. The command still ends within seconds,
    the shard left unwritten; distributed's two lines about it ("Worker process still alive after 4.0 seconds,
    killing", "Worker process N was killed by signal 9", which reads as a crash or the OOM killer) are one line
    that says why, and that nothing written is lost."""
    import psutil

    from wdsembed.synthetic import from_encoded, synthetic_images, write_shard

    data, out = tmp_path / "in", tmp_path / "out"
    for s in range(2):
        write_shard(data, f"{s:05d}", from_encoded(synthetic_images(64, seed=s, formats=("jpeg",))), seed=s)
    # the shard's attempts file is written as its task starts; 3 s later its first batch is decoded (0.5 s) and in
    # the model, for tens of seconds
    command = [sys.executable, str(ROOT / "flows/embed.py"), str(data), "-o", str(out), "--model",
               "vit_base_patch16_224", "--no-pretrained", "--device", "cpu", "--n-workers", "1", "--num-threads",
               "1", "--batch-size", "32", "--fidelity-sample", "0"]
    said, started, _ = _ctrl_c_to_the_group_once_shard_00000_is(
        "started", {"fail_attempts": 0, "where": "start"}, command, tmp_path, out, then_wait_s=3)
    # ended without waiting for the batch: its worker was killed (said once below), not let finish it
    assert "still alive after" not in said and "killed by signal" not in said, said[-4000:]
    killed = [line for line in said.splitlines() if "was still busy" in line]
    assert len(killed) == 1 and "killed" in killed[0], said[-4000:]
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not [p for p in alive if _running(p)], alive
    assert not list(out.glob("*.parquet")) and not [p.name for p in out.rglob("*.tmp*")]


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running(process) -> bool:
    """Alive and not a zombie (an orphan that the container's init has yet to reap has ended all the same)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
