import os

import pytest

# Keep the test machine's 2 cores for the work under test: one thread per torch/OpenMP pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach the Hugging Face Hub; a missing weight must fail fast, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = "test_resnet.r160_in1k"  # a timm test model: real architecture, ~0.5M parameters
CANNOT_DROP_OVERRIDE = 99  # exit status of a child that could not drop root's permission override


def without_file_permission_override() -> None:
    """subprocess preexec_fn: drop root's power to read and write anything (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) in the child, so permission bits apply to it as to any user. A child that cannot drop
    them exits with CANNOT_DROP_OVERRIDE."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(CANNOT_DROP_OVERRIDE)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API server (subprocess) with a throwaway database, shared by the session's flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def damage_first_parquet_page(path) -> None:
    """Overwrite the header of the first page of a parquet file's first column chunk, as bit rot or a bad copy
    would: its footer stays sound (footer readers see a good file), its data cannot be read (pyarrow raises a plain
    OSError, "Couldn't deserialize thrift ... Deserializing page header failed")."""
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    with open(path, "r+b") as f:
        f.seek(column.dictionary_page_offset or column.data_page_offset)
        f.write(b"\xff" * 20)


SPARK_WRITE = "c4f1b8e2-5d3a-4e6f-9a7b-0e1d2c3b4a59"  # the id Spark puts in the name of each part of one write


def write_parquet_folder(table, folder, parts: int = 3, layout: str = "spark") -> list:
    """`table` written as a folder of part files, as Spark writes a DataFrame (`part-00000-<uuid>-c000.snappy.parquet`,
    a hidden `.crc` checksum beside each, `_SUCCESS` last; Databricks' `_started_<id>`, `_committed_<id>`) or as Dask
    does (`layout="dask"`: `part.0.parquet` ... `part.11.parquet`, `_metadata`, `_common_metadata`): the rows cut
    into `parts` runs in order, one a part. Where `folder` is an img2dataset parquet file, it is replaced. Returns the
    part files' paths, in their rows' order."""
    import shutil
    from pathlib import Path

    import pyarrow.parquet as pq

    folder = Path(folder)
    if folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    bounds = [i * table.num_rows // parts for i in range(parts + 1)]
    written = []
    for i in range(parts):
        name = f"part-{i:05d}-{SPARK_WRITE}-c000.snappy.parquet" if layout == "spark" else f"part.{i}.parquet"
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), folder / name, compression="snappy")
        if layout == "spark":
            (folder / f".{name}.crc").write_bytes(b"crc\x00\x00\x00\x00\x01\x02\x03\x04")  # no parquet
        written.append(folder / name)
    if layout == "spark":
        (folder / "_started_8412").write_text("")
        (folder / "_committed_8412").write_text('{"added":["%s"],"removed":[]}' % written[0].name)
        (folder / "_SUCCESS").write_bytes(b"")
    else:
        pq.write_metadata(table.schema, folder / "_common_metadata")
        pq.write_metadata(table.schema, folder / "_metadata")
    return written
