"""The package as a user installs it, with no checkout: `pip install` of its wheel. Every other test imports the
checkout (PYTHONPATH, or `pip install -e .`), where a file left out of the wheel would not show."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wdsembed", "tasks", "flows")  # [tool.setuptools.packages.find] include


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of the source (the build writes build/ beside it)."""
    pytest.importorskip("setuptools.build_meta", reason="the build backend; offline, it must be installed here")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("wdsembed-*.whl")
    return built


def test_the_wheel_holds_every_file_of_the_packages_and_the_command(wheel):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set(zipfile.ZipFile(wheel).namelist())
    listed = subprocess.run(["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():  # tracked files: none of a developer's strays
        wanted = set(listed.stdout.split())
    else:
        wanted = {path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts}
    assert not wanted - names, f"left out of the wheel: {sorted(wanted - names)}"
    dist_info = f"wdsembed-{project['version']}.dist-info"
    assert {name.split("/")[0] for name in names} == {*PACKAGES, dist_info}  # no tests/, bench/ or docs/
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == project["scripts"] == {"wdsembed": "flows.command:main"}
    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode())
    assert metadata["Version"] == project["version"]
    assert metadata["Requires-Python"] == project["requires-python"]


def test_the_installed_command_runs_outside_the_checkout(wheel, tmp_path):
    """Installed into a fresh venv (its dependencies seen through a path file: there is no network), run from an
    empty folder: `wdsembed` and `python -m wdsembed` answer, refuse a missing INPUT with exit 2, and the flow and
    its tasks import from the install."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # the checkout's
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=env).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, env=env, timeout=300)
    # Only then: pip would take this environment's own wdsembed (editable) for this one, and install nothing.
    # A plain path line: the .pth files there (that editable install's finder) are not run.
    (site / "zz_dependencies.pth").write_text(
        "\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    script = str(env_dir / "bin" / "wdsembed")
    assert Path(script).is_file(), "pip installed no wdsembed script"
    helps = [run(script, "--help"), run(str(python), "-m", "wdsembed", "--help")]
    for done in helps:
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith("usage: wdsembed ") and "--image-extensions" in done.stdout
    assert helps[0].stdout == helps[1].stdout
    refused = run(script, str(elsewhere / "nowhere"), "-o", str(elsewhere / "out"), "--no-pretrained")
    assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stderr[-3000:]
    where = run(str(python), "-c", "import wdsembed, flows.embed, flows.deployed, tasks.embed, tasks.index, "
                "tasks.report; print(wdsembed.__file__, flows.embed.__file__, tasks.embed.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout
