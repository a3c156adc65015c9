"""The table of docs/reliability.md, filled by tests/test_reliability.py as its tests run.

Every case the issue lists is declared here, in the order of the table; each test records its row (what was done,
what the tool did, what was lost) from what it measured. The last test of the module renders the rows and compares
them with docs/reliability.md, so the document says what the tests do and nothing else:

    pytest tests/test_reliability.py                          # checks the table (fails with a diff if it drifted)
    WDSEMBED_WRITE_DOCS=1 pytest tests/test_reliability.py    # rewrites docs/reliability.md from this run

Recorded text must be deterministic: counts, reasons and sizes, never timings or temporary paths.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
WRITE_ENV = "WDSEMBED_WRITE_DOCS"
REGENERATE = f"{WRITE_ENV}=1 pytest tests/test_reliability.py"

# (id, group, case): the rows of the table, in order.
CASES: list[tuple[str, str, str]] = [
    ("img-truncated-jpeg", "Images", "Truncated JPEG"),
    ("img-empty", "Images", "Empty image member (0 bytes)"),
    ("img-random", "Images", "Random bytes named .jpg"),
    ("img-html", "Images", "HTML page saved as .jpg"),
    ("img-png-cut", "Images", "PNG cut short (inside a chunk)"),
    ("img-png-no-iend", "Images", "PNG without its IEND chunk, or with it cut short"),
    ("img-damaged-png", "Images", "PNG whose image data fails its CRC"),
    ("img-png-as-jpg", "Images", "PNG named .jpg"),
    ("img-png16", "Images", "16-bit PNG (gray and RGB)"),
    ("img-gray", "Images", "Grayscale JPEG"),
    ("img-cmyk", "Images", "CMYK JPEG"),
    ("img-rgba", "Images", "RGBA PNG (translucent)"),
    ("img-palette", "Images", "Palette PNG with transparency (GIF converted to PNG)"),
    ("img-progressive", "Images", "Progressive JPEG"),
    ("img-exif", "Images", "EXIF-rotated JPEG (orientation 6)"),
    ("img-exif-disagree", "Images", "JPEG whose two EXIF blocks disagree on a quarter turn (orientation 6, then 3)"),
    ("img-1x1", "Images", "1x1 pixel"),
    ("img-bomb", "Images", "20000x20000 PNG (decompression bomb)"),
    ("img-huge-non-image", "Images", "A 300 MB video named .jpg"),
    ("img-animated-webp", "Images", "Animated WebP (3 frames)"),
    ("shard-truncated", "Shards", "Truncated tar"),
    ("shard-corrupt-header", "Shards", "Tar with one corrupt header in the middle"),
    ("shard-zeroed-page", "Shards", "Tar with a zeroed 4 KiB page in the middle"),
    ("shard-no-image", "Shards", "Tar with members of non-image extensions only"),
    ("shard-duplicate-keys", "Shards", "Duplicate keys in one tar"),
    ("shard-odd-keys", "Shards", "Keys with spaces or several dots"),
    ("shard-non-utf8-names", "Shards", "Member names not in UTF-8 (a tar written in Latin-1)"),
    ("shard-sample-without-image", "Shards", "A sample without an image"),
    ("shard-member-without-extension", "Shards", "Members without an extension (`README`, `000001` beside "
                                                 "`000001.bmp`)"),
    ("shard-several-image-members", "Shards",
     "Two image members of one sample (`x.bmp` and `x.BMP`, `x.bmp` and `x.png`)"),
    ("shard-members-apart", "Shards", "A key's members apart (a folder tarred with `tar cf`)"),
    ("shard-empty-tar", "Shards", "Empty tar"),
    ("shard-not-a-tar", "Shards", "A .tar that is not a tar (0 bytes, an HTML page)"),
    ("shard-skipped-output-name", "Shards",
     "Shard path with a part that dataset readers skip (`_extra/`, `_x.tar`)"),
    ("shard-parquet-missing-rows", "Shards", "Parquet lacks rows the tar has"),
    ("shard-parquet-extra-rows", "Shards", "Parquet has rows the tar lacks"),
    ("shard-parquet-key-type", "Shards", "Parquet key column of another type (int64)"),
    ("shard-parquet-key-float", "Shards", "Parquet key column of a type the join refuses (float64)"),
    ("shard-parquet-int-key-odd-tar-keys", "Shards",
     "Integer parquet key column, tar keys that are no integer or repeat one ('0' after '000000000')"),
    ("shard-parquet-duplicate-keys", "Shards", "Parquet repeats a key"),
    ("shard-not-parquet", "Shards", "A .parquet that is not parquet"),
    ("shard-parquet-damaged-page", "Shards", "A .parquet with a damaged page (its footer sound)"),
    ("shard-parquet-folder", "Shards", "A .parquet written as a folder of part files (Spark, Dask)"),
    ("shard-parquet-folder-unreadable", "Shards",
     "A .parquet folder without part files, or whose parts' schemas conflict"),
    ("shard-stats-unreadable", "Shards", "A _stats.json that cannot be read (empty, a count that is NaN)"),
    ("shard-stale-idx", "Shards", "Stale .idx (the tar was rewritten)"),
    ("shard-hard-links", "Shards", "Hard link members (one file archived under two names)"),
    ("shard-special-members", "Shards", "Symbolic link, device and FIFO members named like images"),
    ("shard-sparse-members", "Shards", "Sparse file members (GNU tar --sparse)"),
    ("fault-worker-killed", "Faults", "Worker process killed mid-shard"),
    ("fault-oom", "Faults", "GPU out of memory at the configured batch size"),
    ("fault-flow-killed", "Faults", "Whole flow killed mid-run, then started again"),
    ("fault-concurrent-runs", "Faults", "Two runs at once on the same output"),
    ("fault-concurrent-other-model", "Faults", "Two runs with different models at once on the same output"),
    ("fault-disk-full", "Faults", "Disk fills up while writing outputs"),
    ("fault-disk-full-command", "Faults", "Disk fills up under the command, its manifest too"),
    ("fault-output-read-only-mid-run", "Faults", "OUTPUT turns read-only during a run"),
    ("fault-parquet-gone-mid-run", "Faults", "A shard's parquet vanishes mid-run, then comes back"),
    ("fault-between-view-and-table", "Faults",
     "A re-run with other settings dies between a shard's kNN view and its table"),
    ("fault-killed-before-rename", "Faults", "Process killed between writing a shard's table and renaming it"),
    ("fault-output-damaged-below-footer", "Faults", "An output damaged below its intact footer (bit rot, a bad copy)"),
    ("fault-rerun-killed-midway", "Faults", "A re-run with other settings killed midway"),
    ("param-unknown-model", "Bad parameters", "Unknown model"),
    ("param-checkpoint", "Bad parameters", "Wrong checkpoint file"),
    ("param-batch-size-0", "Bad parameters", "Batch size 0"),
    ("param-output-in-input", "Bad parameters", "Output inside input"),
    ("param-output-of-another-model", "Bad parameters", "Output already holding another model's embeddings"),
    ("param-output-foreign-file", "Bad parameters", "Output already holding a parquet that wdsembed did not write"),
    ("param-unreadable-input", "Bad parameters", "Unreadable input"),
    ("param-device-cuda-no-gpu", "Bad parameters", "--device cuda where no GPU is visible"),
    ("param-id-column-missing", "Bad parameters", "--id-column that the shards' parquets lack"),
    ("param-id-column-matches-no-key", "Bad parameters", "--id-column of a column that holds no sample's key"),
    ("param-column-clash", "Bad parameters", "Parquet column named like the embedding or error column"),
    ("sec-no-code-from-inputs", "Security", "Shards and parquet are data, never code"),
    ("sec-member-names", "Security", "Member names that try to escape (../, absolute, links)"),
    ("sec-credentials", "Security", "Credentials never in logs, artifacts or outputs"),
]
_IDS = [c[0] for c in CASES]
assert len(set(_IDS)) == len(_IDS)

INTRO = """# Reliability: bad input and faults

What `wdsembed` does with what real datasets contain and what real clusters do. Every row is one test of
`tests/test_reliability.py`, and the text of the row is what that test measured: the test records it, and the
suite fails when this file says anything else (regenerate with `{regenerate}`).

How to read it: *lost* counts what was in the input and readable but is missing from the outputs; the goal is
nothing. A row without an embedding always carries a reason in the `embedding_error` column. Shards that were
written with something wrong in their input list it under `warnings` in `_manifest.json` and in the run summary.

Setup of the tests: tiny timm test model (`test_resnet.r160_in1k`, random weights) on the CPU-only DALI pipeline,
batch size 4, img2dataset-style shards made by `wdsembed.synthetic`; faults through the Prefect flow on a real
Prefect server and Dask workers where a cluster matters, otherwise through the Python API (the same core code).
Injected faults are said to be injected.
""".format(regenerate=REGENERATE)


@dataclass(frozen=True)
class Row:
    case: str
    done: str
    did: str
    lost: str


_ROWS: dict[str, Row] = {}


def record(case_id: str, *, done: str, did: str, lost: str) -> None:
    """Register the measured row of one case (once per case)."""
    if case_id not in _IDS:
        raise KeyError(f"unknown case {case_id!r}; declare it in tests/reliability_table.py CASES")
    if case_id in _ROWS:
        raise ValueError(f"case {case_id!r} recorded twice")
    for name, text in (("done", done), ("did", did), ("lost", lost)):
        if not text or "\n" in text:
            raise ValueError(f"{case_id}: {name} must be one non-empty line")
        if re.search(r"/tmp/|pytest-of-", text):
            raise ValueError(f"{case_id}: {name} holds a temporary path: {text!r}")
    title = dict((c[0], c[2]) for c in CASES)[case_id]
    _ROWS[case_id] = Row(title, done, did, lost)


def recorded() -> dict[str, Row]:
    return dict(_ROWS)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_row(case_id: str, row: Row) -> str:
    return f"| {_cell(row.case)} | {_cell(row.done)} | {_cell(row.did)} | {_cell(row.lost)} | <!-- {case_id} -->"


def render(rows: dict[str, Row]) -> str:
    lines = [INTRO]
    group = None
    for case_id, g, _ in CASES:
        if g != group:
            group = g
            lines += ["", f"## {g}", "", "| Case | What was done | What the tool did | What was lost |",
                      "|---|---|---|---|"]
        lines.append(render_row(case_id, rows[case_id]))
    return "\n".join(lines) + "\n"


def doc_rows(text: str) -> dict[str, str]:
    """The table lines of a rendered document, by case id (from the trailing comment)."""
    out = {}
    for line in text.splitlines():
        m = re.search(r"<!-- ([a-z0-9-]+) -->\s*$", line)
        if m and line.startswith("|"):
            out[m.group(1)] = line
    return out


def check_or_write() -> tuple[list[str], list[str]]:
    """Write the document (WDSEMBED_WRITE_DOCS=1, every case recorded) or compare it with the recorded rows.

    Returns (problems, not_checked): problems make the check fail; not_checked lists cases no test recorded in this
    session (deselected or skipped), whose rows were only checked to exist."""
    rows = recorded()
    missing = [c for c in _IDS if c not in rows]
    if os.environ.get(WRITE_ENV) == "1":
        if missing:
            return [f"cannot write {DOC}: no row recorded for {missing} (run the whole file, none skipped)"], []
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(render(rows))
        return [], []
    if not DOC.exists():
        return [f"{DOC} does not exist; write it with: {REGENERATE}"], missing
    text = DOC.read_text()
    have = doc_rows(text)
    problems = []
    extra = [c for c in have if c not in _IDS]
    absent = [c for c in _IDS if c not in have]
    if extra or absent:
        problems.append(f"docs/reliability.md has rows for unknown cases {extra} and lacks rows for {absent}")
    diff = []
    for case_id in _IDS:
        if case_id in rows and case_id in have:
            want = render_row(case_id, rows[case_id])
            if have[case_id] != want:
                diff += list(difflib.unified_diff([have[case_id]], [want], "docs/reliability.md", "this run",
                                                  lineterm="", n=0))[2:]
    if diff:
        problems.append("the table differs from what the tests measured:\n" + "\n".join(diff))
    if not missing and text != render(rows):
        full = difflib.unified_diff(text.splitlines(), render(rows).splitlines(), "docs/reliability.md",
                                    "this run", lineterm="")
        problems.append("docs/reliability.md differs from the rendered table:\n" + "\n".join(full))
    if problems:
        problems.append(f"regenerate it with: {REGENERATE}")
    return problems, missing
