"""What the README and docs/ show users exists as shown: every `--option` of the command, and every function or
module they name (`storage.prefetch_shards`, `wdsembed.validate.validate_output`). A renamed flag or a moved
function fails here, in a second, instead of in a user's terminal."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

from wdsembed.cli import build_parser
from wdsembed.config import EmbedConfig

ROOT = Path(__file__).resolve().parents[1]
# docs/benchmarks.md records past sessions' commands as they were run; it is a log, not instructions
DOCS = [ROOT / "README.md", ROOT / "deployments" / "README.md",
        *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")]

# Options of other tools that the docs show, by tool. An option of ours that is not in the parser fails the test;
# one of another tool belongs here.
OTHER_TOOLS = {
    "autofaiss build_index": {"--embeddings", "--index_path", "--index_infos_path", "--file_format",
                              "--embedding_column_name", "--id_columns", "--ids_path", "--metric_type"},
    "dask scheduler / dask cuda worker": {"--host", "--port", "--protocol", "--tls-ca-file", "--tls-cert",
                                          "--tls-key", "--resources", "--nthreads"},
    "prefect": {"--all", "--pool", "--watch", "--overwrite", "--params", "--run-once"},
    "tar, docker": {"--sparse", "--cpus"},
}
# Options of the scripts in bench/, checked against their own argument parsers below.
BENCH = {"--small", "--dtype", "--rounds", "--obstore", "--s3", "--threads", "--model-seconds", "--models",
         "--repeats", "--skip"}

# Dotted names in the docs that are not code: the manifest's keys (`model.dim`), a logger's name.
NOT_CODE = {"model.dim", "model.name", "model.spellings", "model.timm_name", "wdsembed.decoder"}

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def _mentions(pattern: re.Pattern) -> dict[str, list[str]]:
    """Each match of `pattern` in the docs -> where: 'README.md:12'."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                found.setdefault(match.group(), []).append(f"{doc.relative_to(ROOT)}:{number}")
    return found


def test_every_option_the_docs_show_exists():
    ours = {option for action in build_parser()._actions for option in action.option_strings}
    others = set().union(*OTHER_TOOLS.values())
    unknown = {option: where for option, where in _mentions(OPTION).items()
               if option not in ours and option not in others and option not in BENCH}
    assert not unknown, f"options the docs show that no parser has (renamed? another tool's: OTHER_TOOLS): {unknown}"
    bench_source = "\n".join(p.read_text() for p in (ROOT / "bench").glob("*.py"))
    missing = {option for option in BENCH if f'"{option}"' not in bench_source}
    assert not missing, f"bench/ options the docs show that no bench script defines: {missing}"


def test_every_function_and_module_the_docs_name_exists():
    modules = "|".join(sorted(p.stem for p in (ROOT / "wdsembed").glob("*.py") if p.stem != "__init__"))
    # `wdsembed.validate.validate_output`, `flows.embed.run`, `storage.prefetch_shards`; not a file name
    # (`s3fetch.py`, `config.json`) nor part of another package's name (`distributed.worker.memory.pause`)
    name = re.compile(rf"(?<![\w./-])(?:(?:wdsembed|flows|tasks)|{modules})(?:\.[A-Za-z_]\w*)+(?![\w/])"
                      r"(?<!\.py)(?<!\.md)(?<!\.json)")
    fields = set(EmbedConfig.model_fields)
    wrong = {}
    for dotted, where in _mentions(name).items():
        if dotted in NOT_CODE:
            continue
        parts = dotted.split(".")
        if parts[0] == "config" and parts[1] in fields:  # `config.input`: a field of the EmbedConfig parameter
            continue
        if parts[0] not in ("wdsembed", "flows", "tasks"):
            parts = ["wdsembed", *parts]
        for end in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:end]))
            except ImportError:
                continue
            try:
                for attribute in parts[end:]:
                    obj = getattr(obj, attribute)
            except AttributeError:
                wrong[dotted] = where
            break
        else:
            wrong[dotted] = where
    assert not wrong, (f"names the docs give that the code does not have (moved? renamed? not code: NOT_CODE): "
                       f"{wrong}")
