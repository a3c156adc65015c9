"""Test and demo data: images (synthetic and real photographs) and img2dataset-style shards.

Plain functions used by the demo, the tests and the benchmark. Everything is deterministic for a given seed.
Real photographs come from scikit-image's bundled samples (the `test` extra); nothing is downloaded.
"""
from __future__ import annotations

import filecmp
import io
import json
import os
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

ImageFormat = Literal["jpeg", "png", "webp", "bmp"]
EXT_FOR_FORMAT = {"jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp"}

# scikit-image samples that ship inside the wheel (no download); camera, coins and moon are grayscale
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry",
               "hubble_deep_field", "coins", "moon", "colorwheel")

# width x height mixes for synthetic images: square, landscape, portrait, tiny, panorama, odd sizes
DEFAULT_SIZES = ((224, 224), (320, 240), (240, 320), (640, 427), (427, 640), (97, 61), (800, 200), (33, 500),
                 (512, 512), (1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Images


def make_image(width: int, height: int, *, mode: Literal["RGB", "L"] = "RGB", seed: int = 0) -> Image.Image:
    """A structured image (not uniform): a two-axis colour gradient, a few filled shapes and mild noise, so
    resizing/cropping errors and codec artefacts show up in comparisons."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx = xx / max(width - 1, 1)
    fy = yy / max(height - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    base = np.stack(
        [
            255 * fx,
            255 * fy,
            127.5 + 127.5 * np.sin(6.0 * fx + 4.0 * fy + phase[2]),
        ],
        axis=-1,
    )
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, x1 = sorted(rng.integers(0, max(width, 2), size=2).tolist())
        y0, y1 = sorted(rng.integers(0, max(height, 2), size=2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    return img.convert("L") if mode == "L" else img


def encode_image(
    img: Image.Image, fmt: ImageFormat = "jpeg", *, quality: int = 90, exif_orientation: Optional[int] = None
) -> bytes:
    """Encode with PIL. `exif_orientation` (1..8, JPEG/WebP only) tags the file without rotating its pixels, as
    cameras do: decoders that honour EXIF (DALI by default) and ones that do not (PIL) then disagree."""
    buf = io.BytesIO()
    kwargs: dict = {}
    if fmt in ("jpeg", "webp"):
        kwargs["quality"] = quality
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = int(exif_orientation)
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=fmt.upper(), **kwargs)
    return buf.getvalue()


def load_photo(name: str, size: Optional[tuple[int, int]] = None) -> Image.Image:
    """A real photograph from scikit-image's bundled samples, optionally resized to (width, height)."""
    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTO_NAMES)}")
    try:
        import skimage.data
    except ImportError as e:  # only the `test` extra installs it
        raise ImportError("real photographs need scikit-image (pip install 'wdsembed[test]')") from e
    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr)
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.LANCZOS)
    return img


def photo_bytes(
    name: str, size: Optional[tuple[int, int]] = None, fmt: ImageFormat = "jpeg", quality: int = 92
) -> bytes:
    """`load_photo` re-encoded."""
    return encode_image(load_photo(name, size), fmt, quality=quality)


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str  # member extension ("jpg")
    width: int
    height: int
    mode: str  # "RGB" or "L"


def synthetic_images(
    n: int,
    *,
    seed: int = 0,
    formats: Sequence[ImageFormat] = ("jpeg", "jpeg", "png", "webp"),
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    grayscale_every: int = 5,
) -> list[EncodedImage]:
    """n encoded synthetic images cycling through sizes and formats; every `grayscale_every`-th is grayscale."""
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        fmt = formats[i % len(formats)]
        mode = "L" if grayscale_every and i % grayscale_every == grayscale_every - 1 else "RGB"
        img = make_image(w, h, mode=mode, seed=seed * 100_003 + i)
        out.append(EncodedImage(encode_image(img, fmt), EXT_FOR_FORMAT[fmt], w, h, mode))
    return out


def photo_images(
    n: int, *, seed: int = 0, short_sides: Sequence[int] = (256, 320, 480), fmt: ImageFormat = "jpeg"
) -> list[EncodedImage]:
    """n real photographs cycling through PHOTO_NAMES at varied sizes (aspect ratio kept)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = PHOTO_NAMES[i % len(PHOTO_NAMES)]
        img = load_photo(name)
        short = rng.choice(list(short_sides))
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        out.append(EncodedImage(encode_image(img, fmt, quality=92), EXT_FOR_FORMAT[fmt], img.width, img.height,
                                img.mode))
    return out


CorruptKind = Literal["truncated", "truncated_png", "damaged_png", "empty", "random", "text", "header_only"]


def corrupt_image_bytes(kind: CorruptKind, *, seed: int = 0) -> bytes:
    """Bytes that are named like an image but do not decode: a JPEG or a PNG cut in half, a PNG with a byte of its
    image data changed (its chunk's CRC fails), an empty file, random bytes, a text file, or a bare JPEG
    start-of-image marker."""
    if kind == "truncated":
        full = encode_image(make_image(128, 96, seed=seed), "jpeg")
        return full[: len(full) // 2]
    if kind == "truncated_png":  # refused before the decoder, as a JPEG cut short is
        full = encode_image(make_image(128, 96, seed=seed), "png")
        return full[: len(full) // 2]
    if kind == "damaged_png":  # whole, so it reaches the decoder, which fails on it (and prints libpng's lines)
        full = bytearray(encode_image(make_image(128, 96, seed=seed), "png"))
        full[full.index(b"IDAT") + 20] ^= 0x55
        return bytes(full)
    if kind == "empty":
        return b""
    if kind == "random":
        return np.random.default_rng(seed).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    if kind == "text":
        return b"<html><body>404 Not Found</body></html>\n"
    if kind == "header_only":
        return b"\xff\xd8\xff\xe0"
    raise ValueError(f"unknown corruption {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardSample:
    """One row/sample of a synthetic img2dataset shard.

    `image` is written as `<key>.<ext>` byte for byte (any bytes: corrupt, empty, text); None writes no image
    member. `extra` adds more members (`{"cls": b"3"}` -> `<key>.cls`). `in_tar`/`in_parquet` make the tar and
    the parquet disagree, as real shards sometimes do.
    """

    image: Optional[bytes]
    ext: str = "jpg"
    caption: str = ""
    url: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    key: Optional[str] = None  # default: img2dataset-style zero-padded shard+row number
    extra: dict[str, bytes] = field(default_factory=dict)
    txt: bool = True  # write <key>.txt (the caption)
    json: bool = True  # write <key>.json (img2dataset's per-sample metadata)
    in_tar: bool = True
    in_parquet: bool = True


@dataclass(frozen=True)
class WrittenShard:
    tar: str
    parquet: Optional[str]
    stats: Optional[str]
    keys: tuple[str, ...]  # keys of the samples in the tar, in tar order
    parquet_keys: tuple[str, ...]  # every parquet row's key, in row order (failed rows included)
    failed_keys: tuple[str, ...]


def from_encoded(images: Iterable[EncodedImage], caption_prefix: str = "a synthetic image") -> list[ShardSample]:
    """ShardSamples for encoded images, with captions and sizes filled in."""
    return [
        ShardSample(image=im.data, ext=im.ext, caption=f"{caption_prefix} #{i} ({im.width}x{im.height} {im.mode})",
                    width=im.width, height=im.height)
        for i, im in enumerate(images)
    ]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime  # a float, as webdataset's TarWriter sets it: Python then writes a pax header per member
    info.mode = 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


_WRITTEN_AT = 1_700_000_000.25  # the tar members' mtime and the stats' end time: the same call writes the same bytes


def write_shard(
    folder: str | os.PathLike,
    stem: str,
    samples: Sequence[ShardSample],
    *,
    parquet: bool = True,
    stats: bool = True,
    shuffle_tar: bool | int = False,
    failed_rows: int = 0,
    shard_id: Optional[int] = None,
    key_digits: tuple[int, int] = (5, 4),
    tar_format: Literal["pax", "gnu", "ustar"] = "pax",
    seed: int = 0,
) -> WrittenShard:
    """Write `<stem>.tar`, `<stem>.parquet` and `<stem>_stats.json` the way img2dataset does.

    Rows are numbered in input order; `failed_rows` extra rows with status 'failed_to_download' are interleaved
    (in the parquet, absent from the tar). Keys are `shard_id` and row number zero-padded to `key_digits`
    (default 5+4 digits: 000030007). `shuffle_tar` writes the tar in a shuffled order (img2dataset writes in
    download-completion order); an int is the shuffle seed. Members per sample are written in sorted extension
    order, as webdataset's TarWriter does (jpg, json, txt).
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    if shard_id is None:
        shard_id = int(stem) if stem.isdigit() else 0
    rng = random.Random(seed)

    n_rows = len(samples) + failed_rows
    failed_pos = set(rng.sample(range(n_rows), failed_rows)) if failed_rows else set()
    rows: list[dict] = []
    tar_entries: list[tuple[str, ShardSample]] = []
    it = iter(samples)
    failed_keys = []
    for row in range(n_rows):
        auto_key = f"{shard_id:0{key_digits[0]}d}{row:0{key_digits[1]}d}"
        if row in failed_pos:
            failed_keys.append(auto_key)
            rows.append(dict(key=auto_key, caption=f"caption of failed row {row}",
                             url=f"https://example.invalid/{auto_key}.jpg", status="failed_to_download",
                             error_message="HTTP Error 404: Not Found", width=None, height=None))
            continue
        s = next(it)
        key = s.key if s.key is not None else auto_key
        url = s.url if s.url is not None else f"https://example.invalid/{key}.{s.ext}"
        if s.in_parquet:
            rows.append(dict(key=key, caption=s.caption, url=url, status="success", error_message=None,
                             width=s.width, height=s.height))
        if s.in_tar:
            tar_entries.append((key, s))

    if shuffle_tar is not False:
        random.Random(seed if shuffle_tar is True else int(shuffle_tar)).shuffle(tar_entries)

    fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[tar_format]
    tar_path = os.path.join(folder, f"{stem}.tar")
    with tarfile.open(tar_path, "w", format=fmt) as tar:
        for key, s in tar_entries:
            members: dict[str, bytes] = dict(s.extra)
            if s.image is not None:
                members[s.ext] = s.image
            if s.txt:
                members["txt"] = s.caption.encode()
            if s.json:
                meta = dict(url=s.url or f"https://example.invalid/{key}.{s.ext}", caption=s.caption, key=key,
                            status="success", error_message=None, width=s.width, height=s.height)
                members["json"] = json.dumps(meta).encode()
            for ext in sorted(members):
                _tar_add(tar, f"{key}.{ext}", members[ext], _WRITTEN_AT)

    parquet_path = stats_path = None
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()),
                            ("status", pa.string()), ("error_message", pa.string()),
                            ("width", pa.int64()), ("height", pa.int64())])
        table = pa.Table.from_pylist(rows, schema=schema)
        parquet_path = os.path.join(folder, f"{stem}.parquet")
        pq.write_table(table, parquet_path)
    if stats:
        successes = sum(1 for r in rows if r["status"] == "success")
        stats_doc = {
            "count": len(rows),  # the parquet's rows, as in img2dataset (a tar-only sample is not counted)
            "successes": successes,
            "failed_to_download": failed_rows,
            "failed_to_resize": 0,
            "duration": 1.0,
            "start_time": _WRITTEN_AT - 1.0,
            "end_time": _WRITTEN_AT,
            "status_dict": {"success": successes,
                            **({"HTTP Error 404: Not Found": failed_rows} if failed_rows else {})},
        }
        stats_path = os.path.join(folder, f"{stem}_stats.json")
        with open(stats_path, "w") as fh:
            json.dump(stats_doc, fh, indent=4)
    return WrittenShard(
        tar=tar_path, parquet=parquet_path, stats=stats_path,
        keys=tuple(k for k, _ in tar_entries), parquet_keys=tuple(r["key"] for r in rows),
        failed_keys=tuple(failed_keys),
    )


def refresh_demo_dataset(folder: str | os.PathLike, **options) -> list[str]:
    """`write_demo_dataset(folder, **options)`, leaving every file that already holds the same bytes as it is, its
    modification time included; returns the paths written. A shard's fingerprint is its files' size and mtime, so
    rewriting identical shards would make a second demo run recompute everything instead of finding its outputs
    finished."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    # Generating the images takes seconds (most of a second demo run, which has nothing else to do): skipped where
    # the files this generator wrote last are there unchanged, by the same size and mtime the shards' fingerprints
    # take.
    stamp_path, generator = os.path.join(folder, DEMO_STAMP), _demo_generator(options)
    try:
        with open(stamp_path) as fh:
            stamp = json.load(fh)
        if stamp["generator"] == generator and stamp["files"] and all(
                _size_and_mtime(os.path.join(folder, name)) == tuple(seen) for name, seen in stamp["files"].items()):
            return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    written, files = [], {}
    with tempfile.TemporaryDirectory(prefix=".demo-", dir=folder) as fresh:  # same filesystem: os.replace moves
        write_demo_dataset(fresh, **options)
        for name in sorted(os.listdir(fresh)):
            new, old = os.path.join(fresh, name), os.path.join(folder, name)
            if not (os.path.isfile(old) and filecmp.cmp(new, old, shallow=False)):
                os.replace(new, old)
                written.append(old)
            files[name] = _size_and_mtime(old)
    with open(stamp_path, "w") as fh:
        json.dump({"generator": generator, "files": files}, fh)
    return written


# refresh_demo_dataset's record, in the demo's folder, of what it wrote last, and from what.
DEMO_STAMP = ".demo-written.json"


def _size_and_mtime(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _demo_generator(options: dict) -> str:
    """What the demo's bytes depend on: this module's code, the options, and the libraries that encode the images
    and write the tables (a photograph only where scikit-image is installed)."""
    import hashlib
    from importlib import metadata

    versions = {}
    for package in ("numpy", "Pillow", "pyarrow", "scikit-image"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    with open(__file__, "rb") as fh:
        code = hashlib.sha256(fh.read()).hexdigest()
    return json.dumps({"code": code, "options": options, "versions": versions}, sort_keys=True, default=str)


def write_demo_dataset(
    folder: str | os.PathLike,
    n_shards: int = 3,
    per_shard: int = 16,
    seed: int = 0,
    *,
    failed_per_shard: int = 2,
    corrupt_per_shard: int = 0,
) -> list[WrittenShard]:
    """A small img2dataset-style dataset: real photographs (when scikit-image is installed) mixed with synthetic
    images of varied sizes and formats, tar order shuffled, a few failed downloads per shard, and optionally
    corrupt image members (truncated JPEG, damaged PNG, truncated PNG, random bytes, text, empty; all named .jpg)."""
    try:
        import skimage.data  # where load_photo finds its photographs
    except ImportError:
        skimage = None
    have_photos = skimage is not None
    kinds: tuple[CorruptKind, ...] = ("truncated", "damaged_png", "truncated_png", "random", "text", "empty")
    shards = []
    for s in range(n_shards):
        n_photos = per_shard // 2 if have_photos else 0
        images = photo_images(n_photos, seed=seed + s) if n_photos else []
        images += synthetic_images(per_shard - n_photos, seed=seed * 1000 + s)
        samples = from_encoded(images, caption_prefix=f"demo shard {s}")
        for c in range(min(corrupt_per_shard, len(samples))):
            target = samples[-1 - c]
            target.image = corrupt_image_bytes(kinds[c % len(kinds)], seed=seed + c)
            target.ext = "jpg"
            target.caption = f"corrupt image ({kinds[c % len(kinds)]})"
        shards.append(
            write_shard(folder, f"{s:05d}", samples, failed_rows=failed_per_shard, shuffle_tar=seed + s + 1,
                        seed=seed + s)
        )
    return shards
