"""The code's shape: no import loops, a core that never imports Prefect, cache keys from declared versions."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL
from wdsembed import output, preprocess, shard
from wdsembed.config import EmbedConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wdsembed", "tasks", "flows")


def _module_imports() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (at any depth of its code: lazy imports count too)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from wdsembed import shard` imports the module shard, not (for this graph) the package's face
                submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                found |= submodules or {node.module}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycles():
    graph = _module_imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_core_never_imports_prefect():
    for path in (ROOT / "wdsembed").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("prefect", "prefect_dask", "flows", "tasks")], path


@pytest.fixture
def plan(tmp_path):
    tar = tmp_path / "00000.tar"
    tar.write_bytes(b"x")
    return shard.ShardPlan(shard=str(tar), stem="00000", fingerprint="1:2", rows=None, index=None,
                           output=str(tmp_path / "out" / "00000.parquet"))


def _config(tmp_path) -> EmbedConfig:
    return EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model_name=TINY_MODEL, pretrained=False)


def test_reformatting_a_core_module_changes_no_cache_key(tmp_path, plan):
    """A copy of the package with a core module reformatted (comments, blank lines) gives the same key."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "wdsembed", copy / "wdsembed", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("shard.py", "pipeline.py", "output.py"):
        path = copy / "wdsembed" / name
        path.write_text("# reformatted\n\n" + path.read_text().replace("\n\n\n", "\n\n\n# --\n\n"))
    code = ("import sys; from wdsembed import shard; from wdsembed.config import EmbedConfig; "
            f"c = EmbedConfig(input={str(tmp_path)!r}, output={str(tmp_path / 'out')!r}, model_name={TINY_MODEL!r}, "
            "pretrained=False); "
            f"p = shard.ShardPlan(shard={plan.shard!r}, stem='00000', fingerprint='1:2', rows=None, index=None, "
            f"output={plan.output!r}); print(shard.cache_key(c, p))")
    keys = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=os.environ | {"PYTHONPATH": str(where)}).stdout.strip() for where in (copy, ROOT)]
    assert keys[0] == keys[1] == shard.cache_key(_config(tmp_path), plan)


def test_declared_versions_change_every_key(tmp_path, plan, monkeypatch):
    config = _config(tmp_path)
    before = shard.cache_key(config, plan)
    monkeypatch.setattr(preprocess, "RECIPE_IMPL_VERSION", preprocess.RECIPE_IMPL_VERSION + 1)
    after_recipe = shard.cache_key(config, plan)
    monkeypatch.setattr(output, "OUTPUT_FORMAT_VERSION", output.OUTPUT_FORMAT_VERSION + 1)
    after_format = shard.cache_key(config, plan)
    assert len({before, after_recipe, after_format}) == 3


def test_the_new_rule_for_a_checkpoints_own_head_recomputes_only_the_runs_it_changes(tmp_path, plan):
    """A checkpoint whose class head replaces a CLIP projection now gives pooled features with embedding=auto
    (it gave the class logits): those runs' keys change, so their old outputs recompute; no other run's key does."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    base = _config(tmp_path).model_dump()
    parts = lambda **kw: shard.cache_key_parts(EmbedConfig(**(base | kw)), plan)  # noqa: E731
    assert parts(checkpoint=str(weights))["checkpoint_head_rule"] == 2
    for other in (parts(), parts(checkpoint=str(weights), embedding="pooled"),
                  parts(checkpoint=str(weights), embedding="head")):
        assert "checkpoint_head_rule" not in other


def test_every_part_of_the_key_that_differs_is_named_with_its_old_and_new_value(tmp_path, plan):
    """A footer records the parts of its cache key; a later run with another key names each part that differs (any
    part, present or added later, none left to a generic line), and the shard's files that changed since."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    now = shard.cache_key_parts(_config(tmp_path).model_copy(update={"checkpoint": str(weights),
                                                                     "embedding_dtype": "float16"}), plan)
    said = lambda **before: shard.why_recomputed({"cache_key": "k", "cache_key_parts": now | before}, now)  # noqa

    assert said(packages=now["packages"] | {"timm": "0.0.1"}) == \
        f"their outputs were made with timm=0.0.1 (now {now['packages']['timm']})"
    assert said(columns=["id", "image_embedding", "embedding_error"]) == \
        f"their outputs were made with id_column=id (now {now['columns'][0]})"
    assert said(checkpoint="sha256:" + "0" * 64) == \
        f"their outputs were made with checkpoint content=sha256:000000000000... (now {now['checkpoint'][:19]}...)"
    for part, value in now.items():  # every part: named, never the line for a key computed otherwise
        if part != "shard":
            changed = value + 1 if isinstance(value, int) else {"x": 1} if isinstance(value, dict) else ["x"]
            assert said(**{part: changed}).startswith("their outputs were made with "), part
    del now["dtype"]  # absent: float32, as in the footers of float32 outputs
    assert said(dtype="float16") == "their outputs were made with embedding_dtype=float16 (now float32)"
    now["shard"] = "2048--1700000000.0|300--1700000000.0"  # ShardFingerprint tokens: the tar's, then its parquet's
    assert said(shard="1024--1700000000.0|300--1700000000.0") == "their tars changed since (size)"
    assert said(shard="2048--1700000000.0|300--1600000000.0") == \
        "their img2dataset parquets changed since (mtime)"
    assert said(shard="2048--1700000000.0") == "their img2dataset parquets appeared since"
    assert said(shard="2048-abc-|300--1700000000.0") == "their tars changed since (ETag/mtime)"


PREFECT_DEFAULTS = ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_SERVER_ANALYTICS_ENABLED",
                    "PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW",
                    "DASK_DISTRIBUTED__LOGGING")


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in PREFECT_DEFAULTS} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          cwd=ROOT, timeout=300).stdout.strip()


def test_prefect_defaults_are_set_by_the_entry_points_not_on_import():
    """Importing the flow modules sets no environment variable; flows/prefect_env.set_defaults, called before
    Prefect's first import (as `python flows/embed.py` and the `wdsembed` command do), reaches Prefect's settings
    and its logging; called after, it reaches only processes started later (hence prefect.yaml's job variables)."""
    from flows import prefect_env

    assert set(prefect_env.DEFAULTS) == set(PREFECT_DEFAULTS)
    assert _python("import os, flows.embed, flows.deployed, flows.command\n"
                   f"print([k for k in {PREFECT_DEFAULTS!r} if k in os.environ])") == "[]"
    probe = ("import logging\nfrom prefect.settings import get_current_settings as s\n"
             "print(s().logging.extra_loggers, s().server.ephemeral.startup_timeout_seconds, "
             "s().logging.to_api.when_missing_flow, "
             "[type(h).__name__ for h in logging.getLogger('wdsembed').handlers])")
    before = _python("from flows import prefect_env\nprefect_env.set_defaults()\nimport prefect.main\n" + probe)
    assert before == "['wdsembed'] 120 ignore ['APILogHandler']"
    after = _python("import prefect.main\nfrom flows import prefect_env\nprefect_env.set_defaults()\n" + probe)
    assert after == "[] 20 warn []"
    # a value the user exported wins
    own = _python("import os\nos.environ['PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW'] = 'error'\n"
                  "from flows import prefect_env\nprefect_env.set_defaults()\nimport prefect.main\n" + probe)
    assert own == "['wdsembed'] 120 error ['APILogHandler']"
    job_env = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["work_pool"]["job_variables"]["env"]
    assert job_env["PREFECT_LOGGING_EXTRA_LOGGERS"] == prefect_env.DEFAULTS["PREFECT_LOGGING_EXTRA_LOGGERS"]


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a `try` that catches ImportError: optional by design (scikit-image's photos)."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return optional


def test_every_library_the_code_imports_is_a_declared_dependency():
    """What wdsembed, tasks and flows import (lazy imports too) is installed by `pip install .` (or its `gpu` extra),
    unless the import is guarded as optional: a library that only the test extra brings works in CI and fails for
    a user (boto3, the S3 fetcher's client, was one)."""
    import importlib.metadata as md
    import re
    import tomllib

    def name_of(spec: str) -> str:
        return re.split(r"[\[<>=~ ;(!]", spec, maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {name_of(spec) for spec in project["dependencies"] + project["optional-dependencies"]["gpu"]}
    # what a declared package requires is installed with it (httpx with prefect, botocore with s3fs)
    installed_with, todo = set(), list(declared)
    while todo:
        name = todo.pop()
        if name in installed_with:
            continue
        installed_with.add(name)
        try:
            todo += [name_of(req) for req in md.requires(name) or [] if "extra ==" not in req]
        except md.PackageNotFoundError:  # the gpu extra, on a machine without a GPU
            pass
    distributions = md.packages_distributions()
    missing = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            optional = _optional_imports(tree)
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    tops = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    tops = {node.module.split(".")[0]}
                else:
                    continue
                for top in tops - set(sys.stdlib_module_names) - set(PACKAGES):
                    dists = {name_of(d) for d in distributions.get(top, [top])}
                    if not dists & installed_with:
                        missing.setdefault(top, set()).add(f"{package}/{path.name}")
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"


def test_the_oldest_python_the_package_admits_can_install_its_pinned_dependencies():
    """pyproject.toml admitted Python 3.10 (and the README said "Python 3.10+"), while its pin prefect==3.9.1
    requires 3.11: `pip install` on 3.10 ended in "No matching distribution found for prefect==3.9.1" instead of
    saying which Python to use. The oldest Python admitted must satisfy each exactly pinned dependency's own
    Requires-Python, as installed here (the pinned version)."""
    import importlib.metadata as md
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    admitted = SpecifierSet(project["requires-python"])
    oldest = next(f"3.{minor}" for minor in range(6, 30) if f"3.{minor}" in admitted)
    refused = {}
    for spec in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        requirement = Requirement(spec)
        if not any(s.operator == "==" for s in requirement.specifier):
            continue
        try:
            needs = md.metadata(requirement.name).get("Requires-Python")
        except md.PackageNotFoundError:  # the gpu extra, on a machine without a GPU
            continue
        if needs and oldest not in SpecifierSet(needs):
            refused[str(requirement)] = needs
    assert not refused, f"requires-python {admitted} admits {oldest}, which these pins refuse: {refused}"
    # the README says the same Python
    said = re.search(r"need Python (3\.\d+)\+", (ROOT / "README.md").read_text())
    assert said and said.group(1) == oldest, said
