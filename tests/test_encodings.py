"""The command where the terminal or the locale cannot write every character: shard names, keys and paths in any
script are said, never a crash."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]

# cli.main with a run that returns the manifest of a run over shards and keys of non-ASCII names, one shard failed
# with a reason that quotes its key.
SUMMARY_OF_NON_ASCII_NAMES = """
import sys
from wdsembed import cli

def run(config, on_shard_done=None, all_finished=None):
    shard = {"rows": 2, "embedded": 2, "failed": 0, "status": "computed", "images_per_second": 5.0}
    on_shard_done({"stem": "donn\\u00e9es-\\U0001f600", "embedded": 2, "cached": False}, 1, 2)
    return {"output": config.output, "path": config.output + "/_manifest.json", "model": {"name": "m"},
            "totals": {"shards": 1, "computed": 1, "cached": 0, "rows": 2, "embedded": 2, "embedded_rows": 2,
                       "embedded_this_run": 2, "images_per_second": 5.0},
            "shards": {"donn\\u00e9es-\\U0001f600": shard},
            "failed_shards": {"\\u4e2d\\u6587": "ValueError: key '\\u4e2d\\u6587-\\U0001f431' is no integer"}}

sys.exit(cli.main(run, sys.argv[1:]))
"""


def test_a_terminal_that_cannot_write_a_name_gets_the_summary_with_the_name_escaped(tmp_path):
    """With PYTHONIOENCODING=ascii (or a Latin-1 locale's terminal), a run whose shard names or keys were not in the
    terminal's encoding did its work, wrote its manifest, and then ended on a UnicodeEncodeError traceback from the
    summary, exit 1. The summary now says such characters as backslash escapes."""
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    write_shard(tmp_path / "in", "00000", [ShardSample(encode_image(make_image(32, 24, seed=0), "bmp"), ext="bmp")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WDSEMBED_", "DASK_"))}
    for encoding in ("ascii", "latin-1"):
        done = subprocess.run(
            [sys.executable, "-c", SUMMARY_OF_NON_ASCII_NAMES, str(tmp_path / "in"), "-o", str(tmp_path / "out"),
             "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"],
            cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT), "PYTHONIOENCODING": encoding, "COLUMNS": "200"},
            capture_output=True, timeout=300)
        out, err = done.stdout.decode(encoding), done.stderr.decode(encoding)
        assert "Traceback" not in err and done.returncode == 0, err[-3000:]
        assert "donn\\xe9es-\\U0001f600" in out if encoding == "ascii" else "données-\\U0001f600" in out, out
        assert "key '\\u4e2d\\u6587-\\U0001f431' is no integer" in out, out


# cli.main with a run that says it was started: the checks' answer alone, in this subprocess's locale.
CHECKS_ONLY = """
import sys
from wdsembed import cli

sys.exit(cli.main(lambda config, **kw: print("run started") or {}, sys.argv[1:]))
"""


def _shard(folder: Path, stem: str = "00000") -> None:
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    write_shard(folder, stem, [ShardSample(encode_image(make_image(32, 24, seed=0), "bmp"), ext="bmp")])


def test_a_non_ascii_path_where_python_decodes_file_names_as_ascii_is_refused_saying_how_to_run(tmp_path):
    """In the POSIX locale with PYTHONUTF8=0, Python decodes file names as ASCII: INPUT 'in é' (or a shard
    'données.tar') was refused with "error: 'utf-8' codec can't encode characters in position 4-5: surrogates not
    allowed", which says neither what nor why; past that check, the run failed at Prefect's API on the same words.
    (In a Latin-1 locale, pyarrow, which opens paths by their UTF-8 bytes, missed OUTPUT 'out é' and every shard
    failed.) Refused before any work, naming the path and saying to run in Python's UTF-8 mode."""
    _shard(tmp_path / "in é 中文")
    _shard(tmp_path / "in", "données")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WDSEMBED_", "DASK_", "LC_"))}
    env |= {"PYTHONPATH": str(ROOT), "LC_ALL": "C", "LANG": "", "PYTHONUTF8": "0"}
    for folder, said in ((tmp_path / "in é 中文", "INPUT '"), (tmp_path / "in", f"shard '{tmp_path}/in/donn")):
        done = subprocess.run([sys.executable, "-c", CHECKS_ONLY, str(folder), "-o", str(tmp_path / "out"),
                               "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "run started" not in done.stdout, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {said}"), lines
        assert "reads file names as ascii" in lines[0] and "PYTHONUTF8=1" in lines[0], lines


def test_a_shard_or_output_whose_name_is_not_utf8_is_refused_naming_it(tmp_path, capsys):
    """A shard file named in Latin-1 bytes (`donn\\xe9es.tar`) was refused with "'utf-8' codec can't encode
    character '\\udce9' in position 4: surrogates not allowed", naming neither the shard nor
    what to do. It is refused naming it, and so is an OUTPUT of such a name, which Prefect's API cannot take."""
    from wdsembed import cli

    _shard(tmp_path / "in")
    os.link(tmp_path / "in" / "00000.tar", os.fsdecode(os.fsencode(tmp_path / "in") + b"/donn\xe9es.tar"))
    started = []
    for argv, said in (([str(tmp_path / "in"), "-o", str(tmp_path / "out")], f"shard '{tmp_path}/in/donn\\xe9es.tar'"),
                       ([str(tmp_path / "in"), "-o", os.fsdecode(os.fsencode(tmp_path) + b"/out\xe9")],
                        f"--output '{tmp_path}/out\\xe9'")):
        code = cli.main(lambda config, **kw: started.append(config) or {},
                        argv + ["--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and not started, err
        assert err.startswith(f"error: {said} holds bytes that are not UTF-8"), err
