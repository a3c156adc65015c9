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
