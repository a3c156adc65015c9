import os

import pytest

# Keep the test machine's 2 cores for the work under test: one thread per torch/OpenMP pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach the Hugging Face Hub; a missing weight must fail fast, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = "test_resnet.r160_in1k"  # a timm test model: real architecture, ~0.5M parameters


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API server (subprocess) with a throwaway database, shared by the session's flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
