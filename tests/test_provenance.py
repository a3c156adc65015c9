"""What an output file alone says of how it was made: its footer, read without the run's manifest (a shard kept
from an earlier run, a file copied elsewhere)."""
from __future__ import annotations

import hashlib
import json
import os

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


def _hub_cache_file(cache, repo: str, commit: str, filename: str, data: bytes) -> str:
    """The Hugging Face cache's own layout: the file's bytes in blobs/<sha256> (an LFS file's name there), linked
    from snapshots/<commit>/<filename>, which refs/main names."""
    folder = os.path.join(cache, f"models--{repo.replace('/', '--')}")
    blob = os.path.join(folder, "blobs", hashlib.sha256(data).hexdigest())
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    with open(blob, "wb") as f:
        f.write(data)
    link = os.path.join(folder, "snapshots", commit, filename)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    return link


def test_pretrained_weights_are_recorded_by_their_revision_and_content(tmp_path, monkeypatch):
    """A model name without a tag records the tag it resolved to; its weights, fetched from the Hub's cache, by the
    snapshot they came from and their bytes' SHA-256, as a checkpoint's are: weights updated on the Hub under the
    same name are told apart in the outputs they made."""
    pytest.importorskip("nvidia.dali")
    import timm
    import torch
    from safetensors.torch import save

    from wdsembed.api import TimmImageEmbedder

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    architecture = TINY_MODEL.partition(".")[0]  # no tag: timm takes its default one
    cfg = timm.models.get_pretrained_cfg(architecture)
    torch.manual_seed(7)
    data = save({k: v.contiguous() for k, v in timm.create_model(architecture).state_dict().items()})
    commit = "1234567" * 5 + "89abc"
    _hub_cache_file(str(cache), cfg.hf_hub_id, commit, "model.safetensors", data)

    _shard(tmp_path / "in")
    TimmImageEmbedder(architecture, pretrained=True, **SETTINGS)(str(tmp_path / "in"), str(tmp_path / "out"))
    model = _footer(tmp_path / "out" / "00000.parquet")["result"]["model"]
    assert model["weights"] == f"pretrained:{cfg.hf_hub_id}" and cfg.hf_hub_id.endswith(TINY_MODEL)
    assert model.get("pretrained_weights") == {
        "file": "model.safetensors", "revision": commit, "fingerprint": "sha256:" + hashlib.sha256(data).hexdigest()}
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["model"]["pretrained_weights"] == model["pretrained_weights"]
