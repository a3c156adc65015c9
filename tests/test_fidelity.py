"""The built-in fidelity check: a run compares a sample of its own embeddings with timm's own preprocessing."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from conftest import TINY_MODEL
from wdsembed import TimmImageEmbedder, preprocess
from wdsembed.fidelity import FidelityError, SampleCollector, special_kind
from wdsembed.synthetic import from_encoded, photo_images, synthetic_images, write_shard
from wdsembed.worker import Worker

SETTINGS = dict(pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1)


@pytest.fixture(autouse=True)
def fresh_workers():
    """A worker is kept per process and config: each test builds its own (one patches the recipe)."""
    def drop():
        for worker in Worker._current.values():
            worker.close()
        Worker._current.clear()

    drop()
    yield
    drop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    # Photographs, with a PNG and a grayscale image per shard among them (checked first).
    for s in range(2):
        images = photo_images(6, seed=s) + photo_images(1, seed=s, fmt="png")
        images += synthetic_images(3, seed=s, grayscale_every=1)
        write_shard(folder, f"{s:05d}", from_encoded(images), seed=s)
    return str(folder)


def manifest_of(output: str) -> dict:
    with open(os.path.join(output, "_manifest.json")) as f:
        return json.load(f)


def test_cpu_path_matches_timm_on_photographs(shards, tmp_path, capsys):
    from wdsembed import cli, report

    results = TimmImageEmbedder(TINY_MODEL, **SETTINGS)(shards, str(tmp_path / "out"))
    manifest = manifest_of(str(tmp_path / "out"))
    check = manifest["fidelity"]
    # in the summary artifact and the CLI summary too, with the worst key
    rows = report.shard_rows([r.to_dict() for r in results], {}, manifest)
    assert "fidelity vs timm: 20 images" in report.markdown_summary(manifest, rows)
    cli.print_summary(manifest)
    assert "fidelity vs timm" in capsys.readouterr().out.replace("\n", " ")
    assert check["worst"][0]["key"] in report.markdown_summary(manifest, rows)
    assert check["passed"] and check["threshold"] == 0.9999
    assert check["images"] == 20 and check["min_cosine"] >= 0.9999  # fewer images than the sample: all of them
    assert not check["mismatches"] and len(check["worst"]) == 3
    assert all(r.fidelity["special"] for r in results)  # the PNG and grayscale images were among them


def test_sample_is_deterministic_spread_and_special_first(shards, tmp_path):
    embedder = TimmImageEmbedder(TINY_MODEL, fidelity_sample=4, **SETTINGS)
    first = embedder(shards, str(tmp_path / "a"))
    second = embedder(shards, str(tmp_path / "b"))
    picked = [sorted(r.fidelity["cosines"]) for r in first]
    assert picked == [sorted(r.fidelity["cosines"]) for r in second]
    assert [len(keys) for keys in picked] == [2, 2]  # 4 over 2 shards
    for r in first:  # each shard has a PNG and grayscale images: those come before plain JPEGs
        assert set(r.fidelity["special"]) == set(r.fidelity["cosines"])


def test_shard_shares_add_up_to_the_sample_asked():
    """Each shard's task works out its own share from its place in the run; the shares differ by one at most and
    add up to the sample (rounding each share up checked 33 images of --fidelity-sample 32 over 3 shards)."""
    from wdsembed.fidelity import shard_quota

    assert [shard_quota(32, 3, i) for i in range(3)] == [10, 11, 11]
    for sample in (1, 2, 31, 32, 33, 100):
        for shards_in_run in (1, 2, 3, 7, 64):
            shares = [shard_quota(sample, shards_in_run, i) for i in range(shards_in_run)]
            assert sum(shares) == sample and max(shares) - min(shares) <= 1, (sample, shares)
    assert shard_quota(32, None) == 32 and shard_quota(0, 3, 1) == 0


def test_the_run_checks_as_many_images_as_asked(tmp_path):
    """3 shards of 12 images: --fidelity-sample 32 checks 32 (not 33); 2 checks 2, and the shard with no share is
    not listed among outputs without a stored check. A re-run asking for more keeps the finished shards' checks, and
    says so."""
    from wdsembed import fidelity

    for s in range(3):
        write_shard(tmp_path / "in", f"{s:05d}", from_encoded(synthetic_images(12, seed=s, formats=("jpeg",))),
                    seed=s)
    for sample in (32, 2):
        out = str(tmp_path / f"out-{sample}")
        TimmImageEmbedder(TINY_MODEL, fidelity_sample=sample, **SETTINGS)(str(tmp_path / "in"), out)
        check = manifest_of(out)["fidelity"]
        assert check["images"] == sample and check["shards_unchecked"] == [], check
        assert "without a stored check" not in fidelity.describe(check)
        assert check["shards_reused"] == [] and "finished shard(s)" not in fidelity.describe(check)
    out = str(tmp_path / "out-2")
    TimmImageEmbedder(TINY_MODEL, fidelity_sample=32, **SETTINGS)(str(tmp_path / "in"), out)  # nothing to compute
    check = manifest_of(out)["fidelity"]
    assert check["images"] == 2 and check["shards_reused"] == ["00000", "00001", "00002"], check
    assert fidelity.describe(check).endswith(
        "; the checks of 3 finished shard(s) are those of the runs that computed them (a run's --fidelity-sample "
        "samples the shards it computes)"), fidelity.describe(check)


def test_a_rerun_spreads_its_sample_over_the_shards_it_computes(tmp_path):
    """A re-run that computes one new shard beside finished ones (the nightly deployment's every run) checks the
    images it asks for in that shard: its sample was spread over every shard of the input, the finished ones
    included, so the new shard got only its share (2 of 4 here; of 32 over 1,000 shards, at most one image)."""
    for s in range(2):
        write_shard(tmp_path / "in", f"{s:05d}", from_encoded(synthetic_images(4, seed=s, formats=("jpeg",))),
                    seed=s)
    out = str(tmp_path / "out")
    embedder = TimmImageEmbedder(TINY_MODEL, fidelity_sample=4, **SETTINGS)
    embedder(str(tmp_path / "in"), out)
    write_shard(tmp_path / "in", "00002", from_encoded(synthetic_images(4, seed=2, formats=("jpeg",))), seed=2)
    results = {r.stem: r for r in embedder(str(tmp_path / "in"), out)}
    assert [results[s].cached for s in ("00000", "00001", "00002")] == [True, True, False]
    assert results["00002"].fidelity["sampled"] == 4, results["00002"].fidelity


def test_sample_collector_keeps_quota_and_prefers_special():
    jpegs = [(f"j{i}", im.data) for i, im in enumerate(photo_images(5))]
    png = [("p0", photo_images(1, fmt="png")[0].data)]
    collector = SampleCollector(3)
    assert [k for k, _ in collector.wrap(iter(jpegs + png))] == [k for k, _ in jpegs + png]  # passes all through
    chosen = collector.chosen()
    assert len(chosen) == 3 and chosen[0][0] == "p0" and chosen[0][2] == "png"
    assert special_kind(jpegs[0][1]) is None and special_kind(b"not an image") == "unreadable-by-pil"


def test_sample_collector_keeps_the_lowest_ranks_whatever_the_batching():
    """The collector ranks a batch of keys at once and offers only those that can still be kept: it must keep what
    offering every image one by one keeps, and a key's rank must not depend on the keys batched with it."""
    from wdsembed import fidelity

    data = photo_images(1)[0].data
    keys = [f"{i:09d}" for i in range(1000)] + ["a", "", "é-unicode", "x" * 40]
    assert [int(fidelity._ranks([k])[0]) for k in keys] == fidelity._ranks(keys).tolist()
    assert len(set(fidelity._ranks(keys).tolist())) == len(keys)
    for quota in (1, 5, 300):
        batched, one_by_one = SampleCollector(quota), SampleCollector(quota)
        list(batched.wrap(iter((k, data) for k in keys)))
        for k in keys:
            one_by_one.offer(k, data, None)
        assert [c[0] for c in batched.chosen()] == [c[0] for c in one_by_one.chosen()]
        assert len(batched.chosen()) == quota


def test_special_kinds_from_the_header():
    import io

    from PIL import Image

    from wdsembed.synthetic import make_image

    def jpeg(im, **kw):
        buf = io.BytesIO()
        im.save(buf, "JPEG", **kw)
        return buf.getvalue()

    im = make_image(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert special_kind(jpeg(im.convert("L"))) == "grayscale"
    assert special_kind(jpeg(im.convert("CMYK"))) == "cmyk"
    assert special_kind(jpeg(im, exif=exif.tobytes())) == "exif-rotated"
    assert special_kind(jpeg(im)) is None


def test_special_kinds_of_a_batch_are_those_of_each_image():
    """The collector reads a batch's headers at once (JPEGs of one layout in one step): the same kinds as one image
    at a time, for gray and CMYK layouts among colour ones, EXIF turns, PNGs, damage and non-images."""
    import io
    import random

    from PIL import Image

    from wdsembed.fidelity import special_kinds
    from wdsembed.synthetic import make_image

    def jpeg(im, **kw):
        buf = io.BytesIO()
        im.save(buf, "JPEG", **kw)
        return buf.getvalue()

    rng = random.Random(4)
    exif = Image.Exif()
    exif[0x0112] = 8
    sized = [make_image(rng.randint(8, 200), rng.randint(8, 200)) for _ in range(30)]
    batch = [jpeg(im) for im in sized]
    batch += [jpeg(im.convert("L")) for im in sized[:5]] + [jpeg(im.convert("CMYK")) for im in sized[:5]]
    batch += [jpeg(sized[0], exif=exif.tobytes()), photo_images(1, fmt="png")[0].data, batch[0][:40], b"", b"junk"]
    rng.shuffle(batch)
    kinds = special_kinds(batch)
    assert kinds == [special_kind(d) for d in batch]
    assert {"grayscale", "cmyk", "exif-rotated", "png", None} <= set(kinds)


def _png16(samples, color_type: int) -> bytes:
    """A 16-bit PNG of `samples` (H, W, channels) of this color type (Pillow writes no 48-bit RGB or gray+alpha PNG),
    row y filtered with PNG filter y % 5, so that the reader's unfiltering by the pixel's byte count is tested too."""
    import struct
    import zlib

    import numpy as np

    h, w, c = samples.shape
    rows = np.frombuffer(samples.astype(">u2").tobytes(), np.uint8).reshape(h, w * c * 2).astype(np.int64)
    bpp = 2 * c
    up = np.vstack([np.zeros_like(rows[:1]), rows[:-1]])
    left, up_left = (np.pad(a, ((0, 0), (bpp, 0)))[:, :-bpp] for a in (rows, up))
    p = left + up - up_left
    paeth = np.where((abs(p - left) <= abs(p - up)) & (abs(p - left) <= abs(p - up_left)), left,
                     np.where(abs(p - up) <= abs(p - up_left), up, up_left))
    predictions = [0 * rows, left, up, (left + up) // 2, paeth]
    raw = b"".join(bytes([y % 5]) + ((rows[y] - predictions[y % 5][y]) % 256).astype(np.uint8).tobytes()
                   for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("color_type,channels", [(0, 1), (2, 3), (4, 2), (6, 4)],
                         ids=["gray", "rgb", "gray-alpha", "rgba"])
def test_the_reference_reduces_16_bit_pngs_as_the_pipeline_decoder_does(color_type, channels):
    """DALI's decoder rounds v * 255 / 65535 to nearest; Pillow clips 16-bit gray to 255 and keeps the top byte of
    the others' samples (one level off for a quarter of the values). The reference reduces as DALI does."""
    import io

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    from wdsembed.fidelity import _pil_rgb

    if color_type == 0:  # every 16-bit value
        samples = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    else:
        samples = np.random.default_rng(color_type).integers(0, 65536, (48, 80, channels)).astype(np.uint16)
    data = _png16(samples, color_type)
    color = samples[..., :3] if channels >= 3 else samples[..., :1]
    expected = np.broadcast_to((color.astype(np.uint32) * 255 + 32767) // 65535, (*samples.shape[:2], 3))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode():
        return fn.decoders.image(fn.external_source(name="enc", dtype=types.UINT8, ndim=1), device="cpu",
                                 output_type=types.RGB)

    pipe = decode()
    pipe.build()
    pipe.feed_input("enc", [np.frombuffer(data, np.uint8)])
    assert np.array_equal(np.array(pipe.run()[0].as_tensor())[0], expected)  # what the reference must match
    assert np.array_equal(np.asarray(_pil_rgb(Image.open(io.BytesIO(data)))), expected)


def test_the_reference_turns_images_by_their_exif_only_as_the_decoder_does(tmp_path):
    """Pillow's exif_transpose also turns an image by an XMP packet's tiff:Orientation and by a PNG's "Raw profile
    type exif" text chunk (ImageMagick's); DALI's decoder and browsers turn by EXIF blocks only. A reference that
    turned them failed the run, for images embedded as they are stored (cosine 0.9998 with this model)."""
    import io

    from PIL import Image, PngImagePlugin

    from wdsembed.synthetic import ShardSample, load_photo

    photo = load_photo("chelsea", (320, 240))  # not square: a turn shows
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    raw_profile = PngImagePlugin.PngInfo()
    block = exif.tobytes()
    raw_profile.add_text("Raw profile type exif", f"\nexif\n{len(block):8}\n{block.hex()}\n", zip=True)

    def encode(fmt, **kw):
        buf = io.BytesIO()
        photo.save(buf, fmt, **kw)
        return buf.getvalue()

    images = {"xmp.jpg": encode("JPEG", quality=90, xmp=xmp), "xmp.webp": encode("WEBP", quality=90, xmp=xmp),
              "raw_profile.png": encode("PNG", pnginfo=raw_profile)}
    assert all(Image.open(io.BytesIO(b)).getexif().get(0x0112) == 6 for b in images.values())  # as Pillow sees it
    write_shard(tmp_path / "in", "00000", [ShardSample(b, ext=name.split(".")[1], key=name.replace(".", "_"))
                                           for name, b in images.items()])
    TimmImageEmbedder(TINY_MODEL, **SETTINGS)(str(tmp_path / "in"), str(tmp_path / "out"))
    check = manifest_of(str(tmp_path / "out"))["fidelity"]
    assert check["images"] == 3 and check["passed"] and check["min_cosine"] >= 0.9999, check


def test_wrong_preprocessing_fails_the_run_naming_keys_and_a_lower_threshold_rechecks_cached(
        shards, tmp_path, monkeypatch):
    real = preprocess.PreprocessRecipe.from_data_config.__func__

    def wrong_numbers(cls, data_config):  # the pipeline normalizes with the wrong mean/std; timm's reference not
        return dataclasses.replace(real(cls, data_config), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    monkeypatch.setattr(preprocess.PreprocessRecipe, "from_data_config", classmethod(wrong_numbers))
    out = str(tmp_path / "out")
    with pytest.raises(FidelityError) as failed:
        TimmImageEmbedder(TINY_MODEL, **SETTINGS)(shards, out)
    check = failed.value.manifest["fidelity"]
    assert not check["passed"] and check["min_cosine"] < 0.9999
    for worst in check["worst"]:
        assert worst["key"] in str(failed.value)
    assert os.path.exists(os.path.join(out, "00000.parquet")) and os.path.exists(os.path.join(out, "_manifest.json"))

    monkeypatch.undo()  # the right recipe again: a re-run that embedded anew would now pass at the default
    for worker in Worker._current.values():
        worker.close()
    Worker._current.clear()
    lower = check["min_cosine"] - 0.01
    results = TimmImageEmbedder(TINY_MODEL, min_fidelity=lower, **SETTINGS)(shards, out)
    assert all(r.cached for r in results)  # nothing re-embedded
    again = manifest_of(out)["fidelity"]
    assert again["passed"] and again["threshold"] == lower
    assert again["min_cosine"] == check["min_cosine"] and again["worst"] == check["worst"]  # the stored cosines
    with pytest.raises(FidelityError):  # and at the default threshold, still failed, still from the cache
        TimmImageEmbedder(TINY_MODEL, **SETTINGS)(shards, out)
    assert manifest_of(out)["totals"]["computed"] == 0


def test_a_failed_check_names_the_threshold_as_each_user_sets_it():
    """A failed check's advice named the field alone ('re-run with a lower min_fidelity'), which the command's user
    never typed: it names --min-fidelity too, as the other advice of a run's records does."""
    from wdsembed import fidelity

    summary = {"enabled": True, "passed": False, "below_threshold": 1, "images": 4, "threshold": 0.9999,
               "worst": [{"key": "000000001", "shard": "00000", "cosine": 0.5}]}
    assert fidelity.failure_message(summary).endswith(
        "The outputs are written; re-run with a lower --min-fidelity (min_fidelity=) to accept them (nothing is "
        "re-embedded)")


def test_zero_turns_the_check_off(shards, tmp_path):
    results = TimmImageEmbedder(TINY_MODEL, fidelity_sample=0, **SETTINGS)(shards, str(tmp_path / "out"))
    assert all(not r.fidelity for r in results)
    assert manifest_of(str(tmp_path / "out"))["fidelity"] == {"enabled": False}


def test_an_image_only_one_side_embeds_is_reported(tmp_path, monkeypatch):
    from PIL import ImageFile

    from wdsembed.synthetic import corrupt_image_bytes

    samples = from_encoded(photo_images(3))
    samples[1].image = corrupt_image_bytes("truncated")  # the pipeline refuses a JPEG cut short
    written = write_shard(tmp_path / "in", "00000", samples)
    # PIL told to decode it anyway (gray-filled): the reference embeds what the pipeline failed.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    TimmImageEmbedder(TINY_MODEL, **SETTINGS)(str(tmp_path / "in"), str(tmp_path / "out"))
    check = manifest_of(str(tmp_path / "out"))["fidelity"]
    assert check["passed"] and check["images"] == 2 and len(check["mismatches"]) == 1
    mismatch = check["mismatches"][0]
    assert mismatch["key"] == written.parquet_keys[1] and "pipeline failed it" in mismatch["reason"]
    assert "truncated JPEG" in mismatch["reason"]  # the pipeline's own reason, with it


def test_the_reference_runs_a_large_sample_in_chunks(tmp_path):
    """A shard's fidelity sample can hold thousands of images: the reference transforms and embeds them
    REFERENCE_CHUNK at a time, never as one batch, and gives the same embeddings as one image at a time."""
    import numpy as np

    from wdsembed.config import EmbedConfig
    from wdsembed.fidelity import REFERENCE_CHUNK, reference_embeddings

    worker = Worker.for_config(EmbedConfig(input=str(tmp_path), output=str(tmp_path), model_name=TINY_MODEL,
                                           pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1))
    images = [im.data for im in photo_images(10, short_sides=(64,))]
    chosen = [(f"k{i}", images[i % 10], None) for i in range(2 * REFERENCE_CHUNK + 5)]
    first_layer = next(m for m in worker.loaded.model.modules() if not list(m.children()))
    batches = []
    hook = first_layer.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))  # observes
    try:
        embedded, refused = reference_embeddings(worker, chosen, None)
    finally:
        hook.remove()
    assert batches == [REFERENCE_CHUNK, REFERENCE_CHUNK, 5] and not refused
    alone, _ = reference_embeddings(worker, chosen[:10], None)
    assert sorted(embedded) == sorted(k for k, _, _ in chosen)
    for i in range(len(chosen)):
        assert np.allclose(embedded[f"k{i}"], alone[f"k{i % 10}"], atol=1e-5)


def test_float32_copy_is_a_separate_equal_model():
    import torch

    from wdsembed.model import embed_batch, load_model
    from wdsembed.worker import _float32_copy

    loaded = load_model(TINY_MODEL, pretrained=False, device="cpu")
    copy = _float32_copy(loaded)
    assert copy.model is not loaded.model
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.model.parameters(), loaded.model.parameters()))
    x = torch.rand(2, 3, 160, 160)
    assert torch.equal(embed_batch(copy, x, autocast=False, normalize=True),
                       embed_batch(loaded, x, autocast=False, normalize=True))


def test_a_shard_that_fails_after_embedding_leaves_no_reference_thread_running(tmp_path, monkeypatch):
    """The reference runs in a thread beside the shard's table building. A shard that fails there (WDSEMBED_FAULTS
    at "table": once its images went through the model) must stop and wait for it before the call returns: a
    thread still in torch as a script's interpreter exits aborts the process ('terminate called without an active
    exception', status 134) instead of letting it report the ShardsFailed it caught."""
    import threading

    from wdsembed.shard import ShardsFailed

    write_shard(tmp_path / "in", "00000", from_encoded(photo_images(64, short_sides=(480,))))
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps({"00000": {"error": "fatal", "where": "table"}}))
    monkeypatch.setenv("WDSEMBED_FAULTS", str(spec))
    with pytest.raises(ShardsFailed, match="injected deterministic failure"):
        TimmImageEmbedder(TINY_MODEL, fidelity_sample=64, **SETTINGS)(str(tmp_path / "in"), str(tmp_path / "out"))
    running = [t.name for t in threading.enumerate() if t.name.startswith("wdsembed-fidelity")]
    assert not running, f"the failed shard's fidelity reference still runs: {running}"


def test_the_summary_line_names_each_worst_key_with_its_shard():
    """Keys of shards not made by img2dataset repeat from shard to shard (`0001.jpg` in every tar): the summary's
    line said 'worst: a 0.5000000, a 0.9000000', two images no one could find. Each is named with its shard, as the
    failure message and the manifest name them."""
    from wdsembed import fidelity

    summary = {"enabled": True, "passed": False, "below_threshold": 2, "images": 4, "threshold": 0.9999,
               "min_cosine": 0.5, "mean_cosine": 0.85, "mismatches": [], "both_refused": 0, "shards_unchecked": [],
               "worst": [{"key": "a", "shard": "train-000", "cosine": 0.5},
                         {"key": "a", "shard": "val/train-000", "cosine": 0.9}]}
    assert fidelity.describe(summary).endswith("worst: a (train-000): 0.5000000, a (val/train-000): 0.9000000")
