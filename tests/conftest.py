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
