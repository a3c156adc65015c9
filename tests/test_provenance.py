"""What an output file alone says of how it was made: its footer, read without the run's manifest (a shard kept
from an earlier run, a file copied elsewhere)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL
from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

SETTINGS = dict(device="cpu", batch_size=4, num_threads_per_worker=1, fidelity_sample=0)


def _shard(folder, n: int = 3) -> None:
    images = [ShardSample(encode_image(make_image(32, 24, seed=i), "bmp"), ext="bmp") for i in range(n)]
    write_shard(folder, "00000", images)


def _footer(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"wdsembed"])


def test_the_footer_names_the_versions_that_wrote_it(tmp_path):
    """The manifest's versions are its run's; a shard kept from an earlier run (same cache key: no declared
    change) may have been written by another wdsembed. The footer says which, and every library's version."""
    pytest.importorskip("nvidia.dali")
    from importlib import metadata

    from wdsembed.api import TimmImageEmbedder
    from wdsembed.versions import code_version

    _shard(tmp_path / "in")
    TimmImageEmbedder(TINY_MODEL, pretrained=False, **SETTINGS)(str(tmp_path / "in"), str(tmp_path / "out"))
    versions = _footer(tmp_path / "out" / "00000.parquet").get("versions")
    assert versions, "the footer does not say which wdsembed and libraries wrote it"
    assert versions["wdsembed"] == metadata.version("wdsembed")
    assert versions["wdsembed-code"] == code_version()
    for package in ("timm", "torch", "nvidia-dali-cuda120", "pyarrow"):
        assert versions[package] == metadata.version(package)
