"""wdsembed.synthetic: the images and img2dataset-style shards that the tests, the demo and the benchmark use."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wdsembed import synthetic as syn
from wdsembed.shards import iter_samples

EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_make_image_is_structured_and_deterministic():
    a = syn.make_image(160, 90, seed=3)
    assert a.size == (160, 90) and a.mode == "RGB"
    arr = np.asarray(a, dtype=np.float32)
    assert arr.std() > 30  # not uniform
    assert np.abs(np.diff(arr, axis=1)).mean() > 2  # has edges/noise, not one flat colour per row
    assert np.array_equal(arr, np.asarray(syn.make_image(160, 90, seed=3)))
    assert not np.array_equal(arr, np.asarray(syn.make_image(160, 90, seed=4)))
    gray = syn.make_image(31, 77, mode="L", seed=1)
    assert gray.size == (31, 77) and gray.mode == "L"
    assert syn.make_image(1, 1).size == (1, 1)


@pytest.mark.parametrize("fmt, mode", [("jpeg", "RGB"), ("png", "RGB"), ("webp", "RGB"), ("bmp", "RGB"),
                                       ("jpeg", "L"), ("png", "L")])
def test_encode_image_round_trips(fmt, mode):
    img = syn.make_image(64, 48, mode=mode, seed=0)
    data = syn.encode_image(img, fmt)
    back = decode(data)
    assert back.format == fmt.upper() and back.size == (64, 48) and back.mode == mode
    err = np.abs(np.asarray(back, dtype=np.int16) - np.asarray(img, dtype=np.int16)).mean()
    assert err < 12  # lossy formats stay close; png/bmp are exact
    if fmt in ("png", "bmp"):
        assert err == 0


def test_exif_orientation_tag():
    data = syn.encode_image(syn.make_image(40, 20), "jpeg", exif_orientation=6)
    img = decode(data)
    assert img.getexif()[0x0112] == 6 and img.size == (40, 20)  # pixels not rotated, only tagged


def test_photographs():
    astro = syn.load_photo("astronaut")
    assert astro.size == (512, 512) and astro.mode == "RGB"
    assert syn.load_photo("camera").mode == "L"
    small = syn.load_photo("coffee", size=(150, 100))
    assert small.size == (150, 100)
    data = syn.photo_bytes("chelsea", size=(90, 60), fmt="png")
    assert decode(data).size == (90, 60)
    photos = syn.photo_images(3, short_sides=(64,))
    assert [min(p.width, p.height) for p in photos] == [64, 64, 64]
    assert photos[0].width == photos[0].height == 64  # astronaut is square
    assert photos[1].width == 96 and photos[1].height == 64  # coffee 600x400 keeps its aspect ratio
    with pytest.raises(ValueError, match="unknown photo"):
        syn.load_photo("nope")


def test_synthetic_images_vary():
    ims = syn.synthetic_images(10, seed=1)
    assert {im.ext for im in ims} == {"jpg", "png", "webp"}
    assert {im.mode for im in ims} == {"RGB", "L"}
    assert len({(im.width, im.height) for im in ims}) == 10
    for im in ims:
        assert decode(im.data).size == (im.width, im.height)


@pytest.mark.parametrize("kind", ["truncated", "truncated_png", "damaged_png", "random", "text", "header_only"])
def test_corrupt_bytes_do_not_decode(kind):
    data = syn.corrupt_image_bytes(kind)
    assert len(data) > 0
    with pytest.raises(Exception):
        decode(data)
    if kind == "truncated":
        assert data[:3] == b"\xff\xd8\xff"  # still looks like a JPEG
    assert syn.corrupt_image_bytes("empty") == b""


def test_write_shard_layout(tmp_path):
    raw = b"\x00not-an-image\xff"
    samples = [
        syn.ShardSample(image=b"IMG0", caption="zero", width=10, height=20),
        syn.ShardSample(image=raw, ext="jpg", caption="corrupt"),
        syn.ShardSample(image=b"IMG2", ext="png", caption="two", extra={"cls": b"7"}),
        syn.ShardSample(image=b"IMG3", caption="only in tar", in_parquet=False),
        syn.ShardSample(image=b"IMG4", caption="only in parquet", in_tar=False),
    ]
    w = syn.write_shard(tmp_path, "00003", samples, failed_rows=2, seed=5)
    assert w.tar == str(tmp_path / "00003.tar")
    assert len(w.parquet_keys) == 6 and len(w.failed_keys) == 2  # 5 samples + 2 failed rows - 1 tar-only
    assert all(len(k) == 9 and k.startswith("00003") and k.isdigit() for k in w.parquet_keys + w.keys)
    assert set(w.failed_keys) <= set(w.parquet_keys) and not set(w.failed_keys) & set(w.keys)

    table = pq.read_table(w.parquet)
    assert table.column_names == ["key", "caption", "url", "status", "error_message", "width", "height"]
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == list(w.parquet_keys) == sorted(w.parquet_keys)
    by_caption = {r["caption"]: r for r in rows}
    assert "only in tar" not in by_caption and by_caption["only in parquet"]["status"] == "success"
    assert (by_caption["zero"]["width"], by_caption["zero"]["height"]) == (10, 20)
    failed = [r for r in rows if r["status"] == "failed_to_download"]
    assert [r["key"] for r in failed] == list(w.failed_keys)
    assert all(r["error_message"] and r["width"] is None for r in failed)

    with tarfile.open(w.tar) as t:
        names = t.getnames()
        contents = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    k = w.keys
    assert len(k) == 4
    assert names[:3] == [f"{k[0]}.jpg", f"{k[0]}.json", f"{k[0]}.txt"]  # sorted like webdataset's TarWriter
    assert names[6:10] == [f"{k[2]}.cls", f"{k[2]}.json", f"{k[2]}.png", f"{k[2]}.txt"]
    assert contents[f"{k[1]}.jpg"] == raw  # raw bytes kept exactly
    assert contents[f"{k[0]}.txt"] == b"zero"
    assert json.loads(contents[f"{k[0]}.json"])["key"] == k[0]
    only_tar_key = k[3]
    assert only_tar_key not in w.parquet_keys

    stats = json.loads((tmp_path / "00003_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (6, 4, 2)


def test_write_shard_shuffles_tar_order_only(tmp_path):
    samples = [syn.ShardSample(image=bytes([i]), caption=str(i)) for i in range(12)]
    plain = syn.write_shard(tmp_path / "a", "00000", samples)
    shuffled = syn.write_shard(tmp_path / "b", "00000", samples, shuffle_tar=3)
    assert list(plain.keys) == sorted(plain.keys)
    assert list(shuffled.keys) != list(plain.keys) and sorted(shuffled.keys) == list(plain.keys)
    assert shuffled.parquet_keys == plain.parquet_keys
    with open(shuffled.tar, "rb") as f:
        read = [(s.key, s.image) for s in iter_samples(f, extensions=EXTS, shard=shuffled.tar)]
    assert [k for k, _ in read] == list(shuffled.keys)
    assert all(img == bytes([int(k[-4:])]) for k, img in read)  # each key still carries its own image
    # same call, same bytes
    again = syn.write_shard(tmp_path / "c", "00000", samples, shuffle_tar=3)
    assert open(again.tar, "rb").read() == open(shuffled.tar, "rb").read()


def test_write_shard_without_siblings_and_custom_keys(tmp_path):
    w = syn.write_shard(tmp_path, "part", [syn.ShardSample(image=b"x", key="dir/k1", txt=False, json=False)],
                        parquet=False, stats=False, tar_format="gnu")
    assert (w.parquet, w.stats) == (None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.tar"]
    with tarfile.open(w.tar) as t:
        assert t.getnames() == ["dir/k1.jpg"]


def test_demo_dataset(tmp_path):
    shards = syn.write_demo_dataset(tmp_path, n_shards=2, per_shard=6, seed=0, corrupt_per_shard=1)
    assert [s.tar for s in shards] == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    for w in shards:
        assert len(w.keys) == 6 and len(w.parquet_keys) == 8  # 2 failed downloads per shard
        assert list(w.keys) != sorted(w.keys)
        with open(w.tar, "rb") as f:
            got = list(iter_samples(f, extensions=EXTS, shard=w.tar))
        assert [s.key for s in got] == list(w.keys)
        decoded, broken = 0, 0
        for s in got:
            try:
                decode(bytes(s.image))
                decoded += 1
            except Exception:
                broken += 1
        assert (decoded, broken) == (5, 1)
    # half real photographs: astronaut first, at one of the photo sizes
    with open(shards[0].tar, "rb") as f:
        first_photo = next(s for s in iter_samples(f, extensions=EXTS, shard="x") if s.key.endswith("0000"))
    assert min(decode(bytes(first_photo.image)).size) in (256, 320, 480)


def test_a_refreshed_demo_dataset_keeps_the_files_it_would_write_the_same(tmp_path):
    """The demo's shards are written again on every demo run: identical files stay as they are, modification time
    included (a shard's fingerprint), so the second run finds its outputs finished; a damaged or missing file is
    written again, and no temporary folder is left."""
    first = syn.refresh_demo_dataset(tmp_path, n_shards=2, per_shard=4)
    assert sorted(os.path.basename(p) for p in first) == [
        f"{s}{suffix}" for s in ("00000", "00001") for suffix in (".parquet", ".tar", "_stats.json")]
    for p in first:
        os.utime(p, ns=(10**18, 10**18))  # a mark that any rewrite would replace
    assert syn.refresh_demo_dataset(tmp_path, n_shards=2, per_shard=4) == []
    assert all(os.stat(p).st_mtime_ns == 10**18 for p in first)

    tar, parquet = str(tmp_path / "00001.tar"), str(tmp_path / "00000.parquet")
    intact = open(tar, "rb").read()
    with open(tar, "r+b") as f:
        f.truncate(len(intact) // 2)
    os.remove(parquet)
    assert sorted(syn.refresh_demo_dataset(tmp_path, n_shards=2, per_shard=4)) == sorted([parquet, tar])
    assert open(tar, "rb").read() == intact
    assert sorted(os.listdir(tmp_path)) == sorted([syn.DEMO_STAMP, *(os.path.basename(p) for p in first)])
    assert os.stat(str(tmp_path / "00000.tar")).st_mtime_ns == 10**18


def test_a_demo_dataset_whose_files_are_as_last_written_is_not_generated_again(tmp_path, monkeypatch):
    """Generating the demo's images took seconds of every demo run, most of a second run's: where every file it
    wrote last is there with the same size and mtime (what a shard's fingerprint takes), and the options are the
    same, nothing is generated. A file touched or gone, or other options, and it is generated again (and compared)."""
    calls = []
    generate = syn.write_demo_dataset
    monkeypatch.setattr(syn, "write_demo_dataset", lambda *a, **k: calls.append(k) or generate(*a, **k))
    first = syn.refresh_demo_dataset(tmp_path, n_shards=1, per_shard=2)
    assert len(first) == 3 and len(calls) == 1
    assert syn.refresh_demo_dataset(tmp_path, n_shards=1, per_shard=2) == [] and len(calls) == 1
    os.utime(first[0], ns=(10**18, 10**18))
    assert syn.refresh_demo_dataset(tmp_path, n_shards=1, per_shard=2) == [] and len(calls) == 2
    assert syn.refresh_demo_dataset(tmp_path, n_shards=1, per_shard=2) == [] and len(calls) == 2  # stamped anew
    os.remove(first[1])
    assert syn.refresh_demo_dataset(tmp_path, n_shards=1, per_shard=2) == [first[1]] and len(calls) == 3
    assert len(syn.refresh_demo_dataset(tmp_path, n_shards=1, per_shard=3)) == 3 and len(calls) == 4
