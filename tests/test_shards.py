"""wdsembed.shards, .shardindex and .tarstream: keys, streaming reads, truncation, DALI .idx files, img2dataset siblings.

Tars are written here with Python's tarfile (and GNU tar where noted) so the reader is checked against
independent writers; `.idx` files are checked against DALI's own wds2idx.
"""
from __future__ import annotations

import io
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path
from typing import Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from conftest import damage_first_parquet_page
from wdsembed import faults, shardindex, shards, tarstream
from wdsembed.shards import Sample, iter_samples, split_member_name
from wdsembed.tarstream import ShardReadError
from wdsembed.shardindex import ShardIndex, StaleIndexError, build_index, ensure_index
from wdsembed.synthetic import ShardSample, write_shard

EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
WDS2IDX = str(Path(sys.executable).with_name("wds2idx"))


# ---------------------------------------------------------------------------------------------------------------
# helpers


_LINK_TYPES = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
_SPECIAL_TYPES = {"fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}


def make_tar(path: Path, members: list, fmt: int = tarfile.PAX_FORMAT) -> Path:
    """members: (name, bytes) for regular files, or (name, "dir") / (name, ("symlink" or "hardlink", target)) /
    (name, "fifo" | "chr" | "blk")."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type = _SPECIAL_TYPES[data]
                tar.addfile(info)
            elif isinstance(data, tuple):
                info.type = _LINK_TYPES[data[0]]
                info.linkname = data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def samples_of(path: Path, extensions=EXTS, **kw) -> list[Sample]:
    with open(path, "rb") as f:
        return list(iter_samples(f, extensions=extensions, shard=str(path), **kw))


def data_offsets(path: Path) -> dict[str, int]:
    """member name -> data offset, as Python's tarfile sees it (first occurrence of a repeated name)."""
    with tarfile.open(path) as t:
        return {m.name: m.offset_data for m in reversed(t.getmembers())}


def header_offsets(path: Path) -> dict[str, int]:
    with tarfile.open(path) as t:
        return {m.name: m.offset for m in reversed(t.getmembers())}


def wds2idx_text(tar: Path, tmp_path: Path, *, console: bool = False) -> str:
    out = tmp_path / f"ref-{tar.stem}-{int(console)}.idx"
    if console:
        subprocess.run([WDS2IDX, str(tar), str(out)], check=True, capture_output=True)
    else:
        from wds2idx import IndexCreator

        with IndexCreator(str(tar), str(out), verbose=False) as ic:
            ic.create_index()
    return out.read_text()


def multi_ext_shard(folder: Path, stem: str = "00000", n: int = 6, **kw) -> Path:
    """A realistic shard: per-member pax headers (float mtime, as webdataset's TarWriter makes them), several
    extensions per sample (jpg/png + cls + seg.png + json + txt), shuffled order."""
    samples = [
        ShardSample(image=bytes([i]) * (300 + 700 * i), ext="png" if i % 3 == 0 else "jpg", caption=f"c{i}",
                    extra={"cls": str(i).encode(), "seg.png": b"S" * (10 + i)})
        for i in range(n)
    ]
    return Path(write_shard(folder, stem, samples, shuffle_tar=7, failed_rows=1, **kw).tar)


# ---------------------------------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000123.jpg", ("000123", "jpg")),
        ("a/b.c.jpg", ("a/b", "c.jpg")),
        ("dir.v1/sub/x.seg.PNG", ("dir.v1/sub/x", "seg.png")),
        ("IMG_01.JPG", ("IMG_01", "jpg")),
        ("./rel/k.txt", ("./rel/k", "txt")),
        ("noext", ("noext", "")),
        (".hidden", ("", "hidden")),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_keys_folders_multi_dots_and_upper_case(tmp_path):
    tar = make_tar(tmp_path / "k.tar", [
        ("f1/000.JPG", b"A"), ("f1/000.txt", b"t"),
        ("f2/000.seg.png", b"S"), ("f2/000.json", b"{}"),   # same stem, other folder: another key
        ("x.y.z.Jpeg", b"XY"),
    ])
    got = samples_of(tar)
    assert [(s.key, s.image_ext, bytes(s.image), s.member) for s in got] == [
        ("f1/000", "jpg", b"A", "f1/000.JPG"),
        ("f2/000", "png", b"S", "f2/000.seg.png"),  # last dot-part decides the image type
        ("x", "jpeg", b"XY", "x.y.z.Jpeg"),
    ]
    offs = data_offsets(tar)
    assert [s.offset for s in got] == [offs["f1/000.JPG"], offs["f2/000.seg.png"], offs["x.y.z.Jpeg"]]


# ---------------------------------------------------------------------------------------------------------------
# grouping and per-sample errors


def test_grouping_preference_missing_duplicate_empty(tmp_path):
    tar = make_tar(tmp_path / "g.tar", [
        ("a.png", b"PNG"), ("a.jpg", b"JPG"), ("a.txt", b"cap"),          # jpg preferred over png
        ("b.json", b"{}"), ("b.txt", b"no image"),                        # no image member
        ("c.webp", b"W"), ("dir", "dir"), ("c.cls", b"1"),                 # a directory does not split c
        ("d.jpg", b""), ("d.txt", b"empty"),                              # empty image
        ("a.jpg", b"AGAIN"),                                              # duplicate key
        ("e.json", b"{}"), ("e.jpg", ("symlink", "a.jpg")),                # a symlink is never followed
        (".DS_Store", b"junk"), ("sub/.hidden", b"junk"),                  # hidden files are skipped
        ("f.bmp", b"BMP"),
    ])
    got = samples_of(tar)
    offs = data_offsets(tar)
    with tarfile.open(tar) as t:
        again = [m.offset_data for m in t.getmembers() if m.name == "a.jpg"][1]
    assert got == [
        Sample("a", b"JPG", "jpg", member="a.jpg", offset=offs["a.jpg"], others=("a.png",)),
        Sample("b", None, error="no image member (found: json, txt)"),
        Sample("c", b"W", "webp", member="c.webp", offset=offs["c.webp"]),
        Sample("d", None, "jpg", error="empty image member", member="d.jpg", offset=offs["d.jpg"]),
        Sample("a", None, error="duplicate key", member="a.jpg", offset=again),  # its image member, not read
        Sample("e", None, error="symbolic link member, not followed"),
        Sample("f", b"BMP", "bmp", member="f.bmp", offset=offs["f.bmp"]),
    ]
    # preference follows the order given
    assert bytes(samples_of(tar, extensions=("png", "jpg"))[0].image) == b"PNG"


def test_a_sample_whose_image_has_an_extension_not_read_says_so(tmp_path):
    """WebDataset decodes `.tif`, `.gif`, `.jfif` as images (its IMAGE_EXTENSIONS): a sample whose only image has an
    extension not read here is not 'without an image' but without one of those read, and says which to add. The
    same on every path (with its index, fast or not), and for a sample of the extensions read, nothing changes."""
    tar = make_tar(tmp_path / "t.tar", [
        ("a.TIF", b"II*\x00"), ("a.txt", b"t"), ("b.jpg", b"J"), ("c.gif", b"GIF89a"), ("c.seg.tiff", b"MM"),
        ("d.json", b"{}"),
    ])
    index = build_index(open(tar, "rb"))
    for kw in ({}, {"index": index}, {"index": index, "fast": False}):
        got = {s.key: s.error for s in samples_of(tar, **kw)}
        assert got == {
            "a": "no image member (found: tif, txt; tif is an image extension that this run does not read: add "
                 "it to the image extensions to read it)",
            "b": None,
            "c": "no image member (found: gif, seg.tiff; gif, tiff are image extensions that this run does not "
                 "read: add them to the image extensions to read them)",
            "d": "no image member (found: json)",
        }, kw
    assert samples_of(tar, extensions=("jpg", "tif"))[0].image == b"II*\x00"


def test_a_key_whose_first_members_hold_no_image_gets_its_image_from_a_later_run_of_them(tmp_path):
    """`tar cf` of a folder writes its files in directory order, so a key's caption can come long before its image:
    the image is still that key's. The first sample of a key that has an image owns it; later ones with an image are
    repeats, and one without (a caption after its image) is a sample with no image, as any such."""
    tar = make_tar(tmp_path / "apart.tar", [
        ("imgs/1.txt", b"caption"), ("imgs/2.jpg", b"TWO"), ("imgs/1.jpg", b"ONE"), ("imgs/1.json", b"{}"),
        ("imgs/2.png", b"AGAIN"), ("imgs/3.txt", b"none"), ("imgs/2.txt", b"t"), ("imgs/3.json", b"{}"),
    ])
    offs = data_offsets(tar)
    for index in (None, _index_of(tar)):
        assert samples_of(tar, index=index) == [
            Sample("imgs/1", None, error="no image member (found: txt)"),
            Sample("imgs/2", b"TWO", "jpg", member="imgs/2.jpg", offset=offs["imgs/2.jpg"]),
            Sample("imgs/1", b"ONE", "jpg", member="imgs/1.jpg", offset=offs["imgs/1.jpg"]),
            Sample("imgs/2", None, error="duplicate key", member="imgs/2.png", offset=offs["imgs/2.png"]),
            Sample("imgs/3", None, error="no image member (found: txt)"),
            Sample("imgs/2", None, error="no image member (found: txt)"),  # its caption after its image
            Sample("imgs/3", None, error="no image member (found: json)"),
        ]


def test_an_image_named_key_dot_ext_is_the_samples_image_not_a_component_named_like_one(tmp_path):
    """WebDataset's and DALI's extension is all after the name's first dot: `0001.mask.png` is component
    `mask.png` of sample `0001`, not its `png`. A member named KEY.<image extension> is the image wherever it lies
    in the tar (webdataset's TarWriter writes `output.png` before `png`); a sample with no such member takes its
    one member whose last dot-part is an image extension, and one with several of them gets an error naming them
    (keys with dots: `photo.2020.jpg` and `photo.2021.jpg` are both sample `photo`), never one of them silently."""
    tar = make_tar(tmp_path / "parts.tar", [
        ("0001.mask.png", b"MASK"), ("0001.png", b"IMAGE"), ("0001.txt", b"t"),
        ("0002.output.png", b"OUT"), ("0002.jpg", b"JPG"),        # the plain one wins across preferences too
        ("0003.seg.jpg", b"SEG"), ("0003.json", b"{}"),           # one candidate only: taken
        ("photo.2020.jpg", b"A"), ("photo.2021.jpg", b"B"),       # two images, one key
        ("0005.jpg", b"J"), ("0005.png", b"P"),                   # plain ones: --image-extensions' order
    ])
    offs = data_offsets(tar)
    for index in (None, _index_of(tar)):
        for fast in (True, False):
            got = samples_of(tar, index=index, fast=fast)
            assert got == [
                Sample("0001", b"IMAGE", "png", member="0001.png", offset=offs["0001.png"]),
                Sample("0002", b"JPG", "jpg", member="0002.jpg", offset=offs["0002.jpg"]),
                Sample("0003", b"SEG", "jpg", member="0003.seg.jpg", offset=offs["0003.seg.jpg"]),
                Sample("photo", None, error="2 image members and none named 'photo.<extension>', so no one of "
                       "them is the image: 'photo.2020.jpg', 'photo.2021.jpg' (a key ends at its name's first dot, "
                       "as WebDataset and DALI split names)"),
                Sample("0005", b"J", "jpg", member="0005.jpg", offset=offs["0005.jpg"], others=("0005.png",)),
            ], (index is not None, fast)


def test_an_empty_image_member_never_takes_the_place_of_a_sample_image_with_bytes(tmp_path):
    """A sample with a 0-byte member beside a real image of another extension (a repacked shard where a failed
    conversion left an empty `.jpg` by the `.png`): the image with bytes is embedded, whichever comes first and
    whatever --image-extensions prefers, as a link beside one is. An empty member is the sample's reason only where
    nothing else is; and a plain empty member still keeps a component (`0004.mask.png`) from being the image."""
    tar = make_tar(tmp_path / "empty.tar", [
        ("0001.png", b"PNG1"), ("0001.jpg", b""), ("0001.txt", b"t"),   # empty after the image
        ("0002.jpg", b""), ("0002.png", b"PNG2"),                       # empty before it
        ("0003.jpg", b""), ("0003.png", b""),                           # nothing but empty members
        ("0004.jpg", b""), ("0004.mask.png", b"MASK"),                  # a component is still no image
        ("0005.jpg", b"J"), ("0005.png", b"P"),                         # unchanged: the order preferred
    ])
    offs = data_offsets(tar)
    for index in (None, _index_of(tar)):
        for fast in (True, False):
            got = samples_of(tar, index=index, fast=fast)
            assert got == [
                Sample("0001", b"PNG1", "png", member="0001.png", offset=offs["0001.png"], others=("0001.jpg",)),
                Sample("0002", b"PNG2", "png", member="0002.png", offset=offs["0002.png"], others=("0002.jpg",)),
                Sample("0003", None, "jpg", error="empty image member", member="0003.jpg", offset=offs["0003.jpg"],
                       others=("0003.png",)),
                Sample("0004", None, "jpg", error="empty image member", member="0004.jpg", offset=offs["0004.jpg"]),
                Sample("0005", b"J", "jpg", member="0005.jpg", offset=offs["0005.jpg"], others=("0005.png",)),
            ], (index is not None, fast)


def test_a_sample_with_more_than_one_image_member_names_the_others_on_every_path(tmp_path):
    """`a.jpg` and `a.JPG` (one field to WebDataset, which raises on the repeat), `b.png` and `b.jpg` (two fields),
    a name archived twice: the choice stays (--image-extensions' order, of one extension the first in the tar), and
    the sample names the members passed over (Sample.others), which shard.TarRead says in the shard's warnings. A
    component named like an image (`c.mask.png`) is no other image. The same on every path."""
    tar = make_tar(tmp_path / "several.tar", [
        ("a.jpg", b"A1"), ("a.JPG", b"A2"), ("a.txt", b"t"),
        ("b.png", b"BP"), ("b.jpg", b"BJ"),
        ("c.JPG", b"C1"), ("c.mask.png", b"M"), ("c.JPG", b"C2"),
        ("d.jpg", b"D"),
    ])
    first_c = data_offsets(tar)["c.JPG"]  # the first of the name
    expected = [("a", b"A1", ("a.JPG",)), ("b", b"BJ", ("b.png",)), ("c", b"C1", ("c.JPG",)), ("d", b"D", ())]
    for index in (None, _index_of(tar)):
        for fast in (True, False):
            for chunk_size in (tarstream.CHUNK_SIZE, 2048):
                got = samples_of(tar, index=index, fast=fast, chunk_size=chunk_size)
                assert [(s.key, bytes(s.image), s.others) for s in got] == expected, (index is not None, fast)
                assert got[2].offset == first_c


def test_a_member_without_an_extension_is_no_sample_and_no_field_of_one(tmp_path):
    """WebDataset's base_plus_ext gives no key to a member with no dot after its last slash, and group_by_keys skips
    it without ending the sample. Such a member (`README`, `000001` beside `000001.jpg`) was a sample of its own, and
    its row failed 'no image member (found: (no extension))'; one between two members of a key split the key. It is
    skipped now, on every path (general parser, .idx with and without the fast path, and the keys an .idx lists),
    and named to on_no_extension; it stays in the index, as wds2idx lists it."""
    tar = make_tar(tmp_path / "noext.tar", [
        ("README", b"about this shard"),
        ("000001", b"raw"), ("000001.jpg", b"J1"), ("000001.txt", b"t1"),
        ("000002.jpg", b"J2"), ("000002", b"x"), ("000002.txt", b"t2"),    # inside the sample: it goes on
        ("dir/000003", b"lone"),                                           # a key's only member
        ("000004.json", b"{}"),
        ("000005.jpg", b"J5"),
    ])
    offs = data_offsets(tar)
    expected = [
        Sample("000001", b"J1", "jpg", member="000001.jpg", offset=offs["000001.jpg"]),
        Sample("000002", b"J2", "jpg", member="000002.jpg", offset=offs["000002.jpg"]),
        Sample("000004", None, error="no image member (found: json)"),
        Sample("000005", b"J5", "jpg", member="000005.jpg", offset=offs["000005.jpg"]),
    ]
    index = _index_of(tar)
    assert "README" in [m.name for m in index.members()]  # as wds2idx lists it
    for idx in (None, index):
        for fast in (True, False):
            named: list[str] = []
            stale: list = []
            got = samples_of(tar, index=idx, fast=fast, on_no_extension=named.append, on_stale_index=stale.append)
            assert (got, named, stale) == (expected, ["README", "000001", "000002", "dir/000003"], []), \
                (idx is not None, fast)
    assert shards.index_keys(index) == ["000001", "000002", "000004", "000005"]
    assert shards.first_keys(str(tar), LocalFileSystem(), 10) == ["000001", "000002", "000004", "000005"]


def test_a_member_without_an_extension_after_a_damaged_header_leaves_the_next_sample_said_after_it(tmp_path):
    """A member without an extension, skipped, right after a damaged part read past: the sample after it is still
    the first after the damage, and says so where it lacks its image."""
    tar = make_tar(tmp_path / "damaged.tar", [
        ("000000.jpg", b"J0"), ("000001.jpg", b"J1"), ("README", b"r"), ("000001.json", b"{}"),
        ("000002.jpg", b"J2"),
    ])
    hit = header_offsets(tar)["000001.jpg"]
    data = bytearray(tar.read_bytes())
    data[hit + 3] ^= 1  # a bit of its name: the checksum fails, the size still holds
    tar.write_bytes(bytes(data))
    got, damage, _, _ = _read_past_damage(tar)
    assert [s.key for s in got] == ["000000", "000001", "000002"] and len(damage) == 1
    assert got[1].error.startswith("no image member (found: json) after the tar's damaged part"), got[1].error


def test_a_contiguous_file_member_is_read_as_the_regular_file_it_is(tmp_path):
    """Typeflag '7' (a contiguous file, of old Unix tars; GNU tar and Python's tarfile read it as a regular file):
    its sample was dropped, its parquet row saying 'not in tar'. It is an image member like any other, on every
    path (general parser, .idx, fast path)."""
    path = tmp_path / "contiguous.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, kind in [("0001.jpg", b"IMG1", tarfile.CONTTYPE), ("0001.txt", b"t", tarfile.CONTTYPE),
                                 ("0002.jpg", b"IMG2", tarfile.REGTYPE)]:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))
    offs = data_offsets(path)
    for index in (None, _index_of(path)):
        for fast in (True, False):
            assert samples_of(path, index=index, fast=fast) == [
                Sample("0001", b"IMG1", "jpg", member="0001.jpg", offset=offs["0001.jpg"]),
                Sample("0002", b"IMG2", "jpg", member="0002.jpg", offset=offs["0002.jpg"]),
            ], (index is not None, fast)


def test_member_names_that_are_not_utf8_give_keys_as_tar_lists_them(tmp_path):
    """A tar written in Latin-1 (GNU or ustar headers hold bytes, not text) names `caf\\xe9.jpg`: its key is
    `caf\\351`, the name as `tar tf` lists it, which a parquet string column can hold (the raw name cannot: the
    whole shard failed at its join); the sample keeps its image. Keys of UTF-8 names are as they were."""
    path = tmp_path / "latin1.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in [("caf\u00e9.jpg", b"IMG1"), ("caf\u00e9.txt", b"t"), ("na\u00efve.json", b"{}"),
                           ("caf\u00e9.png", b"again"), ("plain.jpg", b"IMG2"), ("back\\slash.jpg", b"IMG3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    offs = data_offsets(path)
    got = samples_of(path)
    assert [(s.key, s.error, s.image and bytes(s.image)) for s in got] == [
        ("caf\\351", None, b"IMG1"), ("na\\357ve", "no image member (found: json)", None),
        ("caf\\351", "duplicate key", None), ("plain", None, b"IMG2"), ("back\\slash", None, b"IMG3")]
    assert got[0].offset == offs["caf\udce9.jpg"]  # tarfile decodes it as this process does
    pa.array([s.key for s in got], type=pa.string())  # what the join makes of them


def write_tar_with_a_huge_member(path: Path, name: str, head: bytes, size: int, before=(), after=()) -> None:
    """A tar holding `before`, then a member of `size` bytes that starts with `head` (zeros after it, written in
    pieces), then `after`."""
    with open(path, "wb") as f:
        for n, data in before:
            f.write(_member_bytes(n, data))
        info = tarfile.TarInfo(name)
        info.size = size
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        f.write(head)
        zeros, left = bytes(8 << 20), size - len(head)
        while left:
            f.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
        f.write(bytes(-size % 512))
        for n, data in after:
            f.write(_member_bytes(n, data))
        f.write(bytes(1024))


def _member_bytes(name: str, data) -> bytes:
    info = tarfile.TarInfo(name)
    if isinstance(data, tuple):  # ("hardlink", target): a hard link member, no data of its own
        info.type, info.linkname = tarfile.LNKTYPE, data[1]
        return info.tobuf(tarfile.PAX_FORMAT)
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512)


def _refuse_videos(head: bytes):
    return f"not an image: a video ({len(head)} bytes judged)" if head[4:8] == b"ftyp" else None


def _traced_huge_read(tar: str) -> dict:
    """iter_samples over `tar` with _refuse_videos, tracemalloc on; run in a process of its own (_in_own_process)."""
    tracemalloc.start()
    with open(tar, "rb") as f:
        got = [(s.key, s.error, None if s.image is None else bytes(s.image))
               for s in iter_samples(f, extensions=EXTS, shard=tar, refuse_large=_refuse_videos)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"samples": got, "peak": peak}


def test_a_huge_member_that_is_no_image_is_passed_unread(tmp_path):
    """A 200 MB video named .jpg: judged by its first bytes, passed without holding it; the samples after it are
    read, and a huge member the check lets through (an image) is read whole as before."""
    tar = tmp_path / "video.tar"
    write_tar_with_a_huge_member(tar, "vid.jpg", b"\x00\x00\x00\x20ftypisom", 200 << 20,
                                 before=[("a.jpg", b"A" * 600), ("vid.txt", b"a video")], after=[("b.jpg", b"B")])
    read = _in_own_process(_traced_huge_read, str(tar))
    assert read["samples"] == [("a", None, b"A" * 600),
                               ("vid", f"not an image: a video ({shards.LARGE_MEMBER_HEAD} bytes judged)", None),
                               ("b", None, b"B")]
    assert read["peak"] < 40 << 20, read["peak"]  # a read chunk and the head, not the member
    # let through: the member is the sample's image, whole
    got = [(s.key, s.error, s.image) for s in
           iter_samples(open(tar, "rb"), extensions=EXTS, shard=str(tar), refuse_large=lambda head: None)]
    assert got[1][:2] == ("vid", None) and len(got[1][2]) == 200 << 20


def test_a_hard_link_to_a_huge_member_that_is_no_image_is_passed_unread(tmp_path):
    """The same video archived again as a hard link (legal tar): the link's read back is judged by its head too."""
    tar = tmp_path / "video-linked.tar"
    write_tar_with_a_huge_member(tar, "vid.jpg", b"\x00\x00\x00\x20ftypisom", 200 << 20,
                                 after=[("copy.jpg", ("hardlink", "vid.jpg")), ("b.jpg", b"B")])
    read = _in_own_process(_traced_huge_read, str(tar))
    judged = f"not an image: a video ({shards.LARGE_MEMBER_HEAD} bytes judged)"
    assert read["samples"] == [("vid", judged, None), ("copy", judged, None), ("b", None, b"B")]
    assert read["peak"] < 40 << 20, read["peak"]  # the head, not the member read back
    got = [(s.key, s.error, s.image) for s in
           iter_samples(open(tar, "rb"), extensions=EXTS, shard=str(tar), refuse_large=lambda head: None)]
    assert got[1][:2] == ("copy", None) and len(got[1][2]) == 200 << 20  # let through: read back whole


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_written_archive(tmp_path):
    """An archive made by GNU tar itself: directory entries, a 150-byte name (GNU longname header), a symlink."""
    src = tmp_path / "src"
    long_dir = src / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / "k1.jpg").write_bytes(b"L" * 1000)
    (long_dir / "k1.txt").write_bytes(b"t")
    (src / "k2.png").write_bytes(b"P" * 513)
    os.symlink("k2.png", src / "k3.jpg")
    tar = tmp_path / "gnu.tar"
    subprocess.run(["tar", "--format=gnu", "--sort=name", "-C", str(src), "-cf", str(tar), "."], check=True)
    got = samples_of(tar)
    key1 = f"./{'d' * 60}/{'e' * 60}/k1"
    offs = data_offsets(tar)
    # the symlink k3.jpg is never followed: its sample says so
    assert got == [
        Sample(key1, b"L" * 1000, "jpg", member=f"{key1}.jpg", offset=offs[f"{key1}.jpg"]),
        Sample("./k2", b"P" * 513, "png", member="./k2.png", offset=offs["./k2.png"]),
        Sample("./k3", None, error="symbolic link member, not followed"),
    ]
    with open(tar, "rb") as f:
        idx = build_index(f)
    assert samples_of(tar, index=idx) == got


def _links_tar(tmp_path: Path) -> Path:
    return make_tar(tmp_path / "links.tar", [
        ("good1.jpg", b"G" * 700), ("good1.json", b"{}"),
        ("hard1.jpg", ("hardlink", "good1.jpg")), ("hard1.txt", b"caption"),   # the same file archived twice
        ("hard2.png", ("hardlink", "hard1.jpg")),                              # a link to a link
        ("dangling.jpg", ("hardlink", "nowhere.jpg")),                         # no such member
        ("early.jpg", ("hardlink", "late.jpg")), ("late.jpg", b"L"),           # links point backwards only
        ("empty.jpg", b""), ("hardempty.jpg", ("hardlink", "empty.jpg")),
        ("sym.jpg", ("symlink", "good1.jpg")), ("fifo.png", "fifo"), ("chr.jpg", "chr"), ("blk.webp", "blk"),
        ("both.jpg", ("symlink", "/etc/passwd")), ("both.png", b"P"),          # a real image beside a symlink
        ("note.txt", ("symlink", "good1.json")),                               # not named like an image: no row
        ("hidden/.x.jpg", ("hardlink", "good1.jpg")),                          # hidden: skipped as always
    ])


LINK_ROWS = {
    "hard1": b"G" * 700,
    "hard2": b"G" * 700,
    "dangling": "hard link to 'nowhere.jpg', which is no earlier file of this tar",
    "early": "hard link to 'late.jpg', which is no earlier file of this tar",
    "late": b"L",
    "empty": "empty image member",
    "hardempty": "empty image member",
    "sym": "symbolic link member, not followed",
    "fifo": "FIFO member, not read",
    "chr": "character device member, not read",
    "blk": "block device member, not read",
    "both": b"P",
}


def _rows(samples: list[Sample]) -> dict:
    return {s.key: s.error if s.error else bytes(s.image) for s in samples}


def test_hard_links_read_their_targets_and_other_links_are_named(tmp_path):
    tar = _links_tar(tmp_path)
    got = samples_of(tar)
    assert _rows(got) == {"good1": b"G" * 700, **LINK_ROWS}
    offs = data_offsets(tar)
    hard1 = next(s for s in got if s.key == "hard1")
    assert (hard1.member, hard1.offset, hard1.image_ext) == ("hard1.jpg", offs["good1.jpg"], "jpg")
    # links are not in the index (wds2idx leaves them out too), and reading through it checks every header
    with open(tar, "rb") as f:
        idx = build_index(f)
    assert idx.render() == wds2idx_text(tar, tmp_path)
    assert "hard1.jpg" not in idx.render() and "sym.jpg" not in idx.render()
    assert samples_of(tar, index=idx) == got


def test_hard_links_through_a_forward_only_store_stream(tmp_path):
    """Shards on object stores stream through prefetch.ReadAhead, which cannot seek: a hard link's target comes
    back with one ranged read; a stream with no way back says so on the link's row and loses nothing else."""
    from wdsembed.prefetch import ReadAhead

    tar = _links_tar(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/links.tar", tar.read_bytes())
    with ReadAhead(fs, "/bucket/links.tar", block_size=1024) as f:
        assert _rows(list(iter_samples(f, extensions=EXTS, shard="links"))) == {"good1": b"G" * 700, **LINK_ROWS}
    with open(tar, "rb") as raw:
        got = _rows(list(iter_samples(ForwardOnlyFile(raw), extensions=EXTS, shard="links")))
    no_way_back = {k: "hard link to 'good1.jpg': this stream of the tar cannot read back to that member's data"
                   for k in ("hard1", "hard2")}
    no_way_back["hardempty"] = "empty image member"  # nothing to read back
    assert got == {"good1": b"G" * 700, **LINK_ROWS, **no_way_back} | {
        "hard2": "hard link to 'hard1.jpg': this stream of the tar cannot read back to that member's data"}


def test_hard_links_in_an_s3_shard_read_back_the_version_being_read(tmp_path, monkeypatch):
    """S3 shards stream through s3fetch.ShardReader, forward only: a hard link's target comes back with one ranged
    read of the object version being read (If-Match on its ETag), the rows as from the local file. A shard that was
    replaced meanwhile (here by the very same bytes: a new object all the same) fails naming it, instead of
    mixing two versions. The reader had no way back before: the links' rows said so, unlike a local read."""
    import s3fs

    from s3fast import S3Folder
    from wdsembed import s3fetch, storage

    key_id = "AKIASHARDSTESTKEY001"
    nowhere = str(tmp_path / "no-aws-config")
    for name, value in {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "shards-test-secret-value",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    tar = _links_tar(tmp_path)
    (tmp_path / "s3" / "b").mkdir(parents=True)
    shutil.copy(tar, tmp_path / "s3" / "b" / "links.tar")
    srv = S3Folder(tmp_path / "s3", access_key=key_id).start()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs, path = storage.filesystem("s3://b/links.tar", {"endpoint_url": srv.endpoint})
        with storage.open_sequential(fs, path) as f:  # as shard.TarRead reads a shard
            assert isinstance(f, s3fetch.ShardReader)
            assert _rows(list(iter_samples(f, extensions=EXTS, shard="s3://b/links.tar"))) == {
                "good1": b"G" * 700, **LINK_ROWS}
        assert s3fetch.fetcher_for(fs).stats["read_backs"] == 2  # hard1 and hard2, one ranged read each

        with storage.open_sequential(fs, path) as f:
            samples = iter_samples(f, extensions=EXTS, shard="s3://b/links.tar")
            assert next(samples).key == "good1"  # the whole tar (one part) is in hand
            shutil.copy(tar, tmp_path / "replaced.tar")
            os.replace(tmp_path / "replaced.tar", tmp_path / "s3" / "b" / "links.tar")
            with pytest.raises(s3fetch.ShardChangedError, match="s3://b/links.tar changed"):
                list(samples)
    finally:
        srv.stop()
        s3fetch.configure()  # the fetcher of this test's s3fs instance goes

@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_hard_links(tmp_path):
    """GNU tar archives a file with two names once, then as a hard link ('1') to the first name."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"A" * 3000)
    os.link(src / "a.jpg", src / "b.jpg")
    os.link(src / "a.jpg", src / ("c" * 120 + ".jpg"))  # a long link name and target: GNU 'K'/'L' headers
    tar = tmp_path / "gnu-links.tar"
    for fmt in ("gnu", "posix"):
        subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-C", str(src), "-cf", str(tar), "."], check=True)
        got = samples_of(tar)
        assert [(s.key, bytes(s.image)) for s in got] == [("./a", b"A" * 3000), ("./b", b"A" * 3000),
                                                         ("./" + "c" * 120, b"A" * 3000)]
        with open(tar, "rb") as f:
            idx = build_index(f)
        assert idx.render() == wds2idx_text(tar, tmp_path) and idx.num_samples == 1


SPARSE = "sparse file member (GNU tar --sparse), not read"
SPARSE_FORMATS = [("gnu", None), ("pax", "0.0"), ("pax", "0.1"), ("pax", "1.0")]


def _write_sparse(path: Path, regions: int) -> bytes:
    """A file of `regions` 4 KiB data regions with a 60 KiB hole after each one; returns its bytes."""
    with open(path, "wb") as f:
        for i in range(regions):
            f.seek(i * 65536)
            f.write(b"BM%d" % i * 1000 + b"." * 1096)
        f.truncate(regions * 65536)
    return path.read_bytes()


def _sparse_tar(tmp_path: Path, fmt: str, version, names: list[str]) -> tuple[Path, dict[str, bytes]]:
    """A tar written by GNU tar --sparse of 000.bmp (6 data regions: the gnu format needs an extension block for
    the map), 002.png (2 regions: its map fits the header), and regular members; skipped where the file system
    keeps no holes (GNU tar then stores the files whole)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    files = {"000.bmp": _write_sparse(src / "000.bmp", 6), "002.png": _write_sparse(src / "002.png", 2)}
    for name in names:
        if name not in files:
            files[name] = name.encode() * 50
            (src / name).write_bytes(files[name])
    tar = tmp_path / f"{fmt}-{version}.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", *([f"--sparse-version={version}"] if version else []),
                    "-C", str(src), "-cf", str(tar), *names], check=True)
    with tarfile.open(tar) as t:
        if not t.getmember("000.bmp").issparse():
            pytest.skip("this file system keeps no holes: GNU tar stored the file whole")
        assert t.extractfile("000.bmp").read() == files["000.bmp"]  # a valid archive: tarfile rebuilds the file
    return tar, files


def _index_with_stored_sparse_bytes(tar: Path) -> ShardIndex:
    """The index built before sparse files were known, for a pax tar: each sparse member listed as a regular file,
    under its header's name (`./GNUSparseFile.NNN/000.bmp`; `000.bmp` in format 0.0) with its stored bytes."""
    data = tar.read_bytes()
    members = [(m.name, m.offset, m.size) for m in _index_of(tar).members()]
    at = 0
    while data[at : at + 512] != bytes(512):
        size = int(data[at + 124 : at + 136].rstrip(b"\0 "), 8)
        if data[at + 156 : at + 157] == b"x" and b"GNU.sparse." in data[at + 512 : at + 512 + size]:
            header = at + 512 + -(-size // 512) * 512
            members.append((data[header : header + 100].rstrip(b"\0").decode(), header + 512,
                            int(data[header + 124 : header + 136].rstrip(b"\0 "), 8)))
        at += 512 + -(-size // 512) * 512
    builder = shardindex.IndexBuilder()
    builder.extend(sorted(members, key=lambda m: m[1]))
    return builder.index()


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt, version", SPARSE_FORMATS)
def test_sparse_members_are_named_and_every_other_sample_read(tmp_path, fmt, version):
    """GNU tar --sparse stores a file with holes as its data regions only (and, in pax 1.0, a map of them first):
    those bytes are not the image. Such a member is never read; its sample says so, and the samples after it are
    read as usual (the old GNU format's map continues in extension blocks after the header, which are passed)."""
    names = ["000.bmp", "000.txt", "001.jpg", "001.txt", "002.png", "003.jpg"]
    tar, files = _sparse_tar(tmp_path, fmt, version, names)
    got = samples_of(tar)
    offs = data_offsets(tar)
    assert got == [
        Sample("000", None, error=SPARSE),
        Sample("001", files["001.jpg"], "jpg", member="001.jpg", offset=offs["001.jpg"]),
        Sample("002", None, error=SPARSE),
        Sample("003", files["003.jpg"], "jpg", member="003.jpg", offset=offs["003.jpg"]),
    ]
    # the index leaves sparse members out; wds2idx lists them with the whole file's size from where their stored
    # bytes start (DALI would read those and the headers after them): every other entry is the same as its
    with open(tar, "rb") as f:
        idx = build_index(f)
    assert [m.name for m in idx.members()] == ["000.txt", "001.jpg", "001.txt", "003.jpg"]
    ref = [[" ".join(line.split()[i : i + 4]) for i in range(0, len(line.split()), 4)]
           for line in wds2idx_text(tar, tmp_path).splitlines()[1:]]
    ref = [line for line in ([e for e in entries if e.split()[3] not in ("000.bmp", "002.png")] for entries in ref)
           if line]
    assert idx.render() == f"v1.2 {len(ref)}\n" + "".join(" ".join(line) + "\n" for line in ref)
    assert samples_of(tar, index=idx) == samples_of(tar, index=idx, fast=False) == got
    if fmt == "pax":
        # an index from before, listing the stored bytes as a file: never read through, on either path
        old = _index_with_stored_sparse_bytes(tar)
        assert len(list(old.members())) == 6
        for fast in (True, False):
            stale = []
            assert samples_of(tar, index=old, fast=fast, on_stale_index=stale.append) == got
            assert len(stale) == 1
    else:
        cut = tmp_path / "cut.tar"
        cut.write_bytes(tar.read_bytes()[:1000])  # inside the extension block
        with pytest.raises(ShardReadError, match="inside a sparse file's map at byte 0 .member '000.bmp'"):
            samples_of(cut)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt, version", SPARSE_FORMATS)
def test_an_index_before_a_last_sparse_member_is_kept(tmp_path, monkeypatch, fmt, version):
    """A sparse member after the last indexed one is no member that index lacks: it is not rebuilt every run."""
    tar, _ = _sparse_tar(tmp_path, fmt, version, ["001.jpg", "001.txt", "000.bmp"])
    fs = fsspec.filesystem("file")
    idx = ensure_index(str(tar), fs)
    assert [m.name for m in idx.members()] == ["001.jpg", "001.txt"]
    monkeypatch.setattr(shardindex, "build_index", lambda *a, **k: pytest.fail("rebuilt a valid index"))
    assert ensure_index(str(tar), fs) == idx


def _pax_tar(path, pax_of_003: dict):
    """A pax tar of members 000.jpg..005.jpg (10+i bytes each), 003.jpg with the pax records `pax_of_003`."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(6):
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size, info.pax_headers = 10 + i, pax_of_003 if i == 3 else {}
            tar.addfile(info, io.BytesIO(bytes([48 + i]) * (10 + i)))
    return path


def test_a_pax_sparse_record_on_its_own_is_not_read_through_the_fast_path(tmp_path):
    """A pax header of one GNU.sparse record marks a sparse file for iter_members; the fast path's check of
    one-record pax headers refuses it too, so an index that lists the member changes nothing."""
    path = _pax_tar(tmp_path / "onerecord.tar", {"GNU.sparse.name": "003.jpg"})
    builder = shardindex.IndexBuilder()
    builder.extend((name, offset, 13 if name == "003.jpg" else 10 + int(name[:3]))
                   for name, offset in sorted(data_offsets(path).items()))
    listing_it = builder.index()
    for fast in (True, False):
        stale = []
        got = samples_of(path, index=listing_it, fast=fast, on_stale_index=stale.append)
        assert [(s.key, s.error or bytes(s.image)) for s in got] == [
            (f"{i:03d}", SPARSE if i == 3 else bytes([48 + i]) * (10 + i)) for i in range(6)]
        assert len(stale) == 1


# ---------------------------------------------------------------------------------------------------------------
# streaming


class ForwardOnlyFile:
    """A file object that records every read and refuses seeks, like a network stream."""

    def __init__(self, f):
        self.f = f
        self.reads: list[int] = []
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        assert n is not None and n >= 0, "unbounded read"
        data = self.f.read(n)
        self.reads.append(n)
        self.total += len(data)
        return data

    def seek(self, *a):
        raise AssertionError("iter_samples seeked")

    def tell(self):
        raise AssertionError("iter_samples asked for the position")


def _traced_read(tar: str, chunk: int, indexed: bool, keep: int, sizes: list[int] | None = None) -> dict:
    """Reads `tar` through iter_samples on a ForwardOnlyFile, the caller holding the last `keep` samples and no other,
    with tracemalloc on; returns the peak of Python allocations, the reads, and what was kept. Run in a process of its
    own (_in_own_process): tracemalloc counts every thread's allocations, and in the test session other threads
    (Prefect's clients, earlier tests' leftovers) allocate meanwhile."""
    index = _index_of(Path(tar)) if indexed else None
    with open(tar, "rb") as raw:
        f = ForwardOnlyFile(raw)
        tracemalloc.start()
        keys, kept = [], []
        for s in iter_samples(f, extensions=EXTS, shard=os.path.basename(tar), index=index, chunk_size=chunk):
            if sizes is not None:
                i = int(s.key)
                assert len(s.image) == sizes[i] and bytes(s.image[:1]) == bytes([i % 251])
            keys.append(s.key)
            kept.append(s)
            del kept[:max(0, len(kept) - keep)], s
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"peak": peak, "reads": f.reads, "total": f.total, "keys": keys,
            "kept_first_bytes": [bytes(s.image[:1]) for s in kept]}


def _in_own_process(function, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def test_streaming_bounded_reads_and_memory(tmp_path):
    chunk = 64 * 1024
    sizes = [5_000, 150_000, 70_000, 1, 65_536, 131_072, 9_999] * 6  # some members bigger than a chunk
    members = []
    for i, size in enumerate(sizes):
        members.append((f"{i:04d}.jpg", bytes([i % 251]) * size))
        members.append((f"{i:04d}.txt", b"caption"))
    tar = make_tar(tmp_path / "big.tar", members)
    tar_size = tar.stat().st_size
    assert tar_size > 30 * chunk

    read = _in_own_process(_traced_read, str(tar), chunk, False, 0, sizes)
    peak = read["peak"]
    assert read["keys"] == [f"{i:04d}" for i in range(len(sizes))]
    assert max(read["reads"]) <= chunk  # every request bounded by the chunk size
    assert read["total"] == tar_size  # everything read exactly once, front to back
    # one chunk buffer + the member being returned + the one the caller still holds, with slack: far below the tar
    assert peak < 2 * chunk + 2 * max(sizes) + 64 * 1024, peak
    assert peak < tar_size / 4


@pytest.mark.parametrize("claimed", [256 << 20, 1 << 70])  # octal field; GNU base-256, far beyond any memory
def test_a_member_claiming_more_bytes_than_the_tar_holds_costs_no_memory_for_them(tmp_path, claimed):
    """A header's size is what the tar says, not what it holds: a crafted (or truncated) shard of 2 KB whose image
    member claims gigabytes must cost the bytes that are there, not a buffer of the claimed size (allocated and
    zeroed, that took the worker's memory, or raised MemoryError, which counts as a GPU's out of memory and is
    retried)."""
    tar = make_tar(tmp_path / "claims.tar", [("a.jpg", b"x" * 100)], fmt=tarfile.GNU_FORMAT)
    head = tar.read_bytes()
    info = tarfile.TarInfo("b.jpg")
    info.size = claimed
    crafted = head[: 2 * 512] + info.tobuf(format=tarfile.GNU_FORMAT) + b"y" * 600  # a.jpg, then b.jpg's 600 bytes
    tracemalloc.start()
    try:
        (tmp_path / "crafted.tar").write_bytes(crafted)
        got, err = _collect_until_error(tmp_path / "crafted.tar")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == ["a"] and err.key == "b"
    assert err.reason == f"unexpected end of file inside member data ({claimed} bytes)"
    assert peak < 32 << 20, peak  # a chunk (8 MiB) and what was read: nothing near the claim


def test_reads_through_an_fsspec_file(tmp_path):
    tar = multi_ext_shard(tmp_path)
    mem = fsspec.filesystem("memory")
    mem.pipe_file("/bucket/00000.tar", tar.read_bytes())
    with mem.open("/bucket/00000.tar", "rb") as f:
        remote = list(iter_samples(f, extensions=EXTS, shard="memory://bucket/00000.tar"))
    assert remote == samples_of(tar)
    assert len(remote) == 6 and all(s.error is None for s in remote)


# ---------------------------------------------------------------------------------------------------------------
# damage


def _five_samples(tmp_path) -> Path:
    members = []
    for i in range(5):
        members += [(f"s{i}.jpg", bytes([65 + i]) * 1500), (f"s{i}.txt", b"cap")]
    return make_tar(tmp_path / "five.tar", members)


def _truncated_copy(src: Path, at: int, tmp_path: Path) -> Path:
    dst = tmp_path / f"cut{at}.tar"
    dst.write_bytes(src.read_bytes()[:at])
    return dst


def _collect_until_error(path: Path):
    got = []
    with pytest.raises(ShardReadError) as ei:
        for s in samples_of_iter(path):
            got.append(s.key)
    return got, ei.value


def samples_of_iter(path: Path):
    with open(path, "rb") as f:
        yield from iter_samples(f, extensions=EXTS, shard=str(path))


def test_truncated_inside_member_data(tmp_path):
    full = _five_samples(tmp_path)
    offs = data_offsets(full)
    cut = _truncated_copy(full, offs["s3.jpg"] + 700, tmp_path)
    got, err = _collect_until_error(cut)
    assert got == ["s0", "s1", "s2"]  # s3 started, so s2 is complete; s3 is damaged
    assert err.shard == str(cut) and err.member == "s3.jpg" and err.offset == offs["s3.jpg"]
    assert str(cut) in str(err) and f"byte {offs['s3.jpg']}" in str(err) and "s3.jpg" in str(err)


def test_truncated_inside_header_keeps_the_open_samples_whole_image(tmp_path):
    full = _five_samples(tmp_path)
    hdr = header_offsets(full)["s3.jpg"]
    cut = _truncated_copy(full, hdr + 100, tmp_path)
    got, err = _collect_until_error(cut)
    # s2's image was read whole before the damage: it is yielded (nothing lost), though more of its members
    # might have followed; the error names no lost sample
    assert got == ["s0", "s1", "s2"]
    assert err.offset == hdr and "header" in err.reason and err.key is None


def test_truncated_inside_an_image_names_the_lost_sample(tmp_path):
    full = _five_samples(tmp_path)
    offs = data_offsets(full)
    cut = _truncated_copy(full, offs["s3.jpg"] + 700, tmp_path)
    got, err = _collect_until_error(cut)
    assert got == ["s0", "s1", "s2"] and err.key == "s3"


def test_missing_end_of_archive_is_truncation(tmp_path):
    full = _five_samples(tmp_path)
    offs = data_offsets(full)
    end_of_last = offs["s4.txt"] + 512
    got, err = _collect_until_error(_truncated_copy(full, end_of_last, tmp_path))
    # s4 was read whole; only the end-of-archive marker is missing: every sample comes out, then the error
    assert got == ["s0", "s1", "s2", "s3", "s4"] and err.offset == end_of_last and err.key is None
    # a clean end still yields everything
    assert [s.key for s in samples_of(full)] == ["s0", "s1", "s2", "s3", "s4"]


def test_garbage_header_is_reported(tmp_path):
    full = _five_samples(tmp_path)
    data = bytearray(full.read_bytes())
    hdr = header_offsets(full)["s2.jpg"]
    data[hdr : hdr + 512] = b"\x17" * 512
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    got, err = _collect_until_error(bad)
    assert got == ["s0", "s1"] and err.offset == hdr and "checksum" in err.reason


def _read_past_damage(tar: Path, chunk_size: int = 1500) -> tuple[list[Sample], list[ShardReadError], list[str],
                                                                     ForwardOnlyFile]:
    """The samples of `tar` read with on_damage, forward only: the samples, the damaged parts read past, the
    regular members read (their names, from the index built on the way) and the stream (its reads)."""
    damage: list[ShardReadError] = []
    builder = shardindex.IndexBuilder()
    with open(tar, "rb") as raw:
        f = ForwardOnlyFile(raw)
        got = list(iter_samples(f, extensions=EXTS, shard=str(tar), chunk_size=chunk_size, on_damage=damage.append,
                                index_builder=builder))
    return got, damage, [m.name for m in builder.index().members()], f


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_a_damaged_header_is_read_past_as_gnu_tar_does(tmp_path):
    """One bit flipped in a member's header (its checksum then fails): GNU tar skips to the next header and lists
    every member after it; so does iter_samples with on_damage, forward only through its bounded reads, naming the
    damaged part once. The sample whose image header was hit says so; without on_damage the read still ends there,
    and build_index still refuses the tar (a damaged tar gets no index, read either way)."""
    tar, _ = _case_header_bit_flipped(tmp_path)
    listed = subprocess.run(["tar", "tf", str(tar)], capture_output=True, text=True)
    assert "Skipping to next header" in listed.stderr, listed.stderr
    got, damage, members, f = _read_past_damage(tar)
    assert members == listed.stdout.split()
    intact = header_offsets(tmp_path / "intact-flipname.tar")  # Python's tarfile stops at the damaged header
    hit = intact["000000005.jpg"]
    [part] = damage
    assert (part.offset, part.resumed, part.shard) == (hit, intact["000000005.json"], str(tar))
    assert f"bad tar header checksum (not a tar, or corrupt) at byte {hit}, read on from the next header at byte " \
        f"{part.resumed}" in str(part)
    assert [s.key for s in got] == [f"{i:09d}" for i in range(14)]
    assert {s.key: s.error for s in got if s.error} == {
        "000000005": "no image member (found: json, txt) after the tar's damaged part (bad tar header checksum "
                     f"(not a tar, or corrupt) at byte {hit})"}
    assert max(f.reads) <= 1500
    with pytest.raises(ShardReadError, match=f"checksum .* at byte {hit}"):
        samples_of(tar)
    with pytest.raises(ShardReadError), open(tar, "rb") as raw:
        build_index(raw)


@pytest.mark.parametrize("case, lost, errors", [
    # the image's header hit: its sample's other members are read after it
    ("size_bit_flipped_gnu", [], {"000000004": "no image member (found: json, txt) after"}),
    # a size whose checksum holds runs over the sample's json and txt: the image comes with bytes after it
    ("size_past_the_next_header", [], {}),
    # headers and data of three samples overwritten: they are lost, the next sample's image too
    ("garbage_over_several_members", ["000000004", "000000005", "000000006"],
     {"000000007": "no image member (found: json, txt) after"}),
    ("first_header_damaged", [], {"000000000": "no image member (found: json, txt) after"}),
    ("last_sample_damaged", [], {}),  # a json header: the sample's image was read before it
    ("header_zeroed", [], {}),  # a txt header zeroed: one zero block alone is not the end of the archive
    ("pax_header_damaged", [], {}),  # the member's own header follows its pax header
    ("sample_header_overwritten", [], {"000000005": "no image member (found: json, txt) after"}),
    # more zero blocks than an end has, headers after them: sample 6 in them, and the header of sample 7's image
    ("page_zeroed", ["000000006"], {"000000007": "no image member (found: json, txt) after"}),
])
def test_every_sample_after_a_damaged_header_is_read(tmp_path, case, lost, errors):
    tar, index = FAST_PATH_CASES[case](tmp_path)
    keys = list(dict.fromkeys(split_member_name(m.name)[0] for m in index.members()))
    got, damage, _, _ = _read_past_damage(tar)
    assert len(damage) == 1 and damage[0].resumed > damage[0].offset
    assert [s.key for s in got] == [k for k in keys if k not in lost]
    assert {s.key: s.error[: len(errors.get(s.key, ""))] for s in got if s.error} == errors


def test_a_shard_damaged_in_many_places_is_read_whole_and_said_in_a_few_lines(tmp_path):
    """A shard's pass (shard.TarRead) over a tar with 7 damaged headers: every sample is read, a warning names
    each of the first 5 damaged parts and counts the others, the reason of a row not found names the first; and
    no .idx is made for it (the planner's build_index refuses a damaged tar)."""
    from wdsembed.config import EmbedConfig
    from wdsembed.plan import plan_shards
    from wdsembed.shard import TarRead

    intact = _tar_of(tmp_path, "intact", _img2dataset())
    at = header_offsets(intact)
    bad = [at[f"{i:09d}.json"] for i in range(7)]
    (tmp_path / "in").mkdir()
    tar = tmp_path / "in" / "00000.tar"
    _rewritten(intact, "damaged", lambda data: [data.__setitem__(h + 1, 0x7F) for h in bad]).rename(tar)
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name="resnet18")
    (plan,) = plan_shards(config)
    read = TarRead(config, plan)
    assert [key for key, _ in read.images()] == [f"{i:09d}" for i in range(14)] and read.errors == {}
    warnings = read.finish()
    assert [w.split(":")[0] for w in warnings[:5]] == [f"tar damaged at byte {h}" for h in bad[:5]]
    assert warnings[0].endswith(f"read on from the next intact header, at byte {at['000000000.txt']}")
    assert warnings[5:] == ["and 2 more damaged part(s) of the tar"]
    assert read.missing_reason == (f"not in the readable part of the tar (damaged at byte {bad[0]}: bad tar header "
                                   "checksum (not a tar, or corrupt); and 6 more damaged part(s))")
    assert plan.index is None and not tar.with_suffix(".idx").exists()


def test_a_damaged_header_before_a_member_that_is_a_tar_never_gives_a_key_that_tars_bytes(tmp_path):
    """A sample holds a member that is itself a tar (000000002.tar, whose member is 000000004.jpg). One bit flipped
    in the name of that member's header fails its checksum, but its size field still reads and the block after its
    data is a header of this tar: the member is passed whole, lost, and reading goes on at that header. (A scan
    for the next header finds the inner tar's: key 000000004 got the inner tar's image, and the inner tar's end
    ended the read, losing the samples after it.) Every key gets its own image or none; no index for the tar."""
    tar, _ = _case_header_before_a_tar_member(tmp_path)
    intact = tmp_path / "intact-beforetar.tar"
    own = {split_member_name(m.name)[0]: t.extractfile(m).read()
           for t in [tarfile.open(intact)] for m in t.getmembers() if m.name.endswith(".jpg")}
    at = data_offsets(intact)
    got, damage, members, _ = _read_past_damage(tar)
    [part] = damage
    assert (part.offset, part.resumed) == (at["000000002.tar"] - 512, at["000000003.jpg"] - 512)
    assert {s.key: bytes(s.image) for s in got} == own
    assert members == [m for m in header_offsets(intact) if not m.endswith(".tar")][::-1]
    with pytest.raises(ShardReadError), open(tar, "rb") as raw:
        build_index(raw)


def test_a_damaged_header_of_the_last_member_that_is_a_tar_never_gives_a_key_that_tars_bytes(tmp_path):
    """As above, where the member that is a tar is the tar's last: the archive's end (its zero blocks) right after
    the member confirms the size its damaged header still says, as a header there would. (Only a header did: the
    scan found the inner tar's header, and key 000000004 got the inner tar's image.)"""
    tar, _ = _case_last_member_a_tar_damaged(tmp_path)
    intact = tmp_path / "intact-lasttar.tar"
    own = {split_member_name(m.name)[0]: t.extractfile(m).read()
           for t in [tarfile.open(intact)] for m in t.getmembers() if m.name.endswith(".jpg")}
    got, damage, _, _ = _read_past_damage(tar)
    [part] = damage
    member = tarfile.open(intact).getmember("000000013.tar")
    assert (part.offset, part.resumed) == (member.offset, member.offset_data + member.size + (-member.size % 512))
    assert {s.key: bytes(s.image) for s in got if s.image is not None} == own
    assert [s.key for s in got] == [f"{i:09d}" for i in range(14)]


def test_a_file_that_is_no_tar_is_refused_after_its_first_read_however_large(tmp_path):
    """A gzip stream saved as .tar: its first block is no tar header, and nothing of a tar was read before it, so
    no block after it is looked at (a scan for a header read the whole file, on a store a download of it): refused
    at byte 0 after one read, as without on_damage."""
    path = tmp_path / "00000.tar"
    path.write_bytes(b"\x1f\x8b\x08\x00" + random.Random(0).randbytes((48 << 20) - 4))
    damage: list[ShardReadError] = []
    with pytest.raises(ShardReadError) as ei, open(path, "rb") as raw:
        f = ForwardOnlyFile(raw)
        list(iter_samples(f, extensions=EXTS, shard=str(path), chunk_size=1 << 20, on_damage=damage.append))
    assert (ei.value.offset, ei.value.reason) == (0, "bad tar header checksum (not a tar, or corrupt)")
    assert f.reads == [1 << 20] and not damage


def test_a_scan_for_the_next_header_gives_up_after_the_resync_limit(tmp_path, monkeypatch):
    """A header overwritten whole (its size too) is read past by a scan for the next header, through the rest of
    its member: for tarstream.RESYNC_LIMIT bytes at most, a bound on what a long damaged region costs. Past it, the
    read ends at the damage, saying so (the rest is lost); within it, reading goes on."""
    members = _img2dataset(6)
    members[9] = ("000000003.jpg", b"3" * (3 << 20))
    tar, _ = _damaged(tmp_path, "bigmember", lambda data, at: data.__setitem__(
        slice(at["000000003.jpg"], at["000000003.jpg"] + 512), b"\x17" * 512), members)
    damaged = header_offsets(tmp_path / "intact-bigmember.tar")["000000003.jpg"]
    monkeypatch.setattr(tarstream, "RESYNC_LIMIT", 2 << 20)
    with pytest.raises(ShardReadError) as ei:
        _read_past_damage(tar)
    assert (ei.value.offset, ei.value.reason) == (damaged, "bad tar header checksum (not a tar, or corrupt); no "
                                                            "tar header in the 2 MiB after it")
    monkeypatch.setattr(tarstream, "RESYNC_LIMIT", 4 << 20)
    got, [part], _, _ = _read_past_damage(tar)
    assert part.offset == damaged and [s.key for s in got] == [f"{i:09d}" for i in range(6)]
    assert got[3].error.startswith("no image member (found: json, txt) after the tar's damaged part")


@pytest.mark.parametrize("size", [None, 5 << 19])
def test_a_damaged_header_of_a_member_over_the_resync_limit_is_passed_unread(tmp_path, monkeypatch, size):
    """A damaged header whose size field still reads, heading a member bigger than tarstream.RESYNC_LIMIT: the
    member is passed unread (never held: memory stays bounded) and reading goes on at the header after it. (Its
    size was dropped as too big to hold, and the scan gave up inside the member: every sample after it was lost.)
    Where that size is wrong too (`size`, short of the member's end), the scan starts after the bytes passed."""
    members = _img2dataset(6)
    members[9] = ("000000003.jpg", b"3" * (3 << 20))

    def change(data, at):
        data[at["000000003.jpg"] + 5] ^= 1
        if size is not None:
            data[at["000000003.jpg"] + 124 : at["000000003.jpg"] + 136] = b"%011o\x00" % size
    tar, _ = _damaged(tmp_path, "bigflip", change, members)
    at = header_offsets(tmp_path / "intact-bigflip.tar")
    monkeypatch.setattr(tarstream, "RESYNC_LIMIT", 1 << 20)
    tracemalloc.start()
    try:
        got, [part], _, _ = _read_past_damage(tar)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (part.offset, part.resumed) == (at["000000003.jpg"], at["000000003.json"])
    assert [s.key for s in got] == [f"{i:09d}" for i in range(6)]
    assert got[3].error.startswith("no image member (found: json, txt) after the tar's damaged part")
    assert peak < 1 << 20


def test_the_end_of_a_tar_is_not_damage_whatever_follows_it_that_holds_no_header_of_it(tmp_path):
    """After a tar's two zero blocks the file is looked at to its end for a header of the tar (zeroed blocks in
    the middle of a tar look like an end): a healthy tar's padding, or garbage with no header of the tar in it, is
    neither damage nor samples; the samples and index are those of the tar alone."""
    tar, index = _case_garbage_after_the_end(tmp_path)
    alone = tmp_path / "garbageafter.tar"
    assert tar.stat().st_size > alone.stat().st_size + 50_000
    for path in (alone, tar):
        got, damage, members, _ = _read_past_damage(path)
        assert not damage and got == samples_of(alone) and members == [m.name for m in index.members()]
        with open(path, "rb") as raw:
            assert build_index(raw) == index


@pytest.mark.parametrize("writer", ["pax", "gnu", "gnu_tar"])
def test_tars_concatenated_are_read_whole_not_as_damage(tmp_path, writer):
    """`cat a.tar b.tar` (Python's tarfile, PAX or GNU; GNU tar's own records, -b 20): b's members come after a's
    end-of-archive blocks and padding, zeros only. They are the tar's own: read on with no damage reported (they
    were read, but as damage, and build_index refused the tar), and indexed, each at its offset in the file (where
    DALI reads it); a read with that index (the fast path) gives what the general parser gives."""
    if writer == "gnu_tar":
        if shutil.which("tar") is None:
            pytest.skip("needs GNU tar")
        src = tmp_path / "src"
        src.mkdir()
        members = _img2dataset(9)
        for name, data in members:
            (src / name).write_bytes(data)
        parts = [tmp_path / "a.tar", tmp_path / "b.tar"]
        for part, names in zip(parts, ([n for n, _ in members[:15]], [n for n, _ in members[15:]])):
            subprocess.run(["tar", "--format=gnu", "-b", "20", "-C", str(src), "-cf", str(part), *names], check=True)
        tar = tmp_path / "cat.tar"
        tar.write_bytes(parts[0].read_bytes() + parts[1].read_bytes())
        index = _index_of(tar)
    else:
        tar, index = FAST_PATH_CASES[f"concatenated_{writer}"](tmp_path)
        members = _img2dataset(9)
    got, damage, names, _ = _read_past_damage(tar)
    assert not damage and [s.key for s in got] == [f"{i:09d}" for i in range(9)]
    assert names == [name for name, _ in members]
    raw = tar.read_bytes()
    assert [(m.name, raw[m.offset : m.offset + m.size]) for m in index.members()] == members
    assert samples_of(tar) == got == samples_of(tar, index=index) == samples_of(tar, index=index, fast=False)


def test_a_page_zeroed_exactly_up_to_a_header_reads_as_tars_concatenated(tmp_path):
    """Zeros from sample 6's first header up to sample 7's: nothing tells them from one tar's end and another's
    start. Sample 6 is lost without a damage report (its row says it is not in the tar); the scan past the zeros
    passes zero blocks only, so it can take nothing else for a header; every other sample is read, and indexed."""
    tar, _ = _case_page_zeroed_up_to_a_header(tmp_path)
    got, damage, names, _ = _read_past_damage(tar)
    kept = [f"{i:09d}" for i in range(14) if i != 6]
    assert not damage and [s.key for s in got] == kept and not any(s.error for s in got)
    assert [split_member_name(m.name)[0] for m in _index_of(tar).members()][::3] == kept


def test_a_file_that_is_no_tar_is_still_refused_when_damage_is_read_past(tmp_path):
    """No intact header anywhere after the first block: the read ends there, as it always did."""
    page = tmp_path / "page.tar"
    page.write_bytes(b"<!DOCTYPE html><html>" + b"not found " * 300 + b"</html>")
    damage: list[ShardReadError] = []
    with pytest.raises(ShardReadError) as ei, open(page, "rb") as f:
        list(iter_samples(f, extensions=EXTS, shard="page.tar", on_damage=damage.append))
    not_a_tar = (0, "bad tar header checksum (not a tar, or corrupt)", None)
    assert (ei.value.offset, ei.value.reason, ei.value.resumed) == not_a_tar
    assert not damage


# ---------------------------------------------------------------------------------------------------------------
# .idx


@pytest.mark.parametrize("tar_format", ["pax", "gnu", "ustar"])
def test_index_byte_identical_to_wds2idx(tmp_path, tar_format):
    tar = multi_ext_shard(tmp_path, tar_format=tar_format)
    with open(tar, "rb") as f:
        ours = build_index(f).render()
    assert ours == wds2idx_text(tar, tmp_path)
    assert ours == wds2idx_text(tar, tmp_path, console=True)
    # several extensions per sample, wds2idx's ext keeps everything after the first dot
    first = ours.splitlines()[1].split()
    assert ours.startswith("v1.2 6\n") and len(first) == 4 * 5 and "seg.png" in first[::4]
    assert ShardIndex.parse(ours).render() == ours


def test_index_identical_with_hidden_dirs_links_and_odd_names(tmp_path):
    tar = make_tar(tmp_path / "odd.tar", [
        ("d", "dir"), ("d/k.jpg", b"1" * 600), ("d/k.txt", b"2"), ("d/.hidden", b"h"), (".top", b"h"),
        ("lnk.jpg", ("symlink", "d/k.jpg")), ("UP.JPG", b"3"), ("back\\slash.jpg", b"4"), ("é.png", b"5"),
        ("noext", b"6"), ("z.tar.gz", b"7" * 513),
    ])
    with open(tar, "rb") as f:
        idx = build_index(f)
    assert idx.render() == wds2idx_text(tar, tmp_path)
    assert [m.ext for m in idx.members()] == ["jpg", "txt", "JPG", "jpg", "png", "noext", "tar.gz"]
    # reading through that index verifies every header, odd names included
    assert samples_of(tar, index=idx) == samples_of(tar)


def test_index_offsets_are_true_offsets_for_gnu_longnames(tmp_path):
    """wds2idx takes `tar --block-number`, which points at a GNU longname header, not at the member: its offset
    for such members is wrong (DALI would read the name block). Ours is the real data offset; every other line
    is the same as wds2idx's."""
    long = "x" * 120
    tar = make_tar(tmp_path / "long.tar", [("a.jpg", b"a" * 700), (f"{long}.jpg", b"L" * 10), ("b.jpg", b"b")],
                   fmt=tarfile.GNU_FORMAT)
    with open(tar, "rb") as f:
        idx = build_index(f)
    offs = data_offsets(tar)
    assert [(m.name, m.offset) for m in idx.members()] == [(n, offs[n]) for n in ("a.jpg", f"{long}.jpg", "b.jpg")]
    ours, ref = idx.render().splitlines(), wds2idx_text(tar, tmp_path).splitlines()
    assert ours[:2] == ref[:2] and ours[3:] == ref[3:]
    assert ours[2] != ref[2]
    assert samples_of(tar, index=idx) == samples_of(tar)


def test_whitespace_names_cannot_be_indexed(tmp_path):
    tar = make_tar(tmp_path / "sp.tar", [("a b.jpg", b"1"), ("c.jpg", b"2")])
    ref = wds2idx_text(tar, tmp_path)
    assert "jpg 512 1 a b.jpg" in ref  # wds2idx writes a line DALI cannot split back
    with pytest.raises(shardindex.IndexFormatError, match="whitespace"):
        ShardIndex.parse(ref)
    with open(tar, "rb") as f:
        idx = build_index(f)
    with pytest.raises(shardindex.IndexFormatError, match="a b.jpg"):
        idx.render()
    # reading without an index is fine
    assert [s.key for s in samples_of(tar)] == ["a b", "c"]


def test_a_name_ending_in_its_first_dot_is_read_without_an_index(tmp_path, caplog):
    """`b.` has an empty extension: wds2idx writes its entry as three fields (` 1536 1 b.`), and a line whose
    fields come in no groups of four, which DALI and ShardIndex.parse refuse, so such an index was rebuilt, broken again, on every run. Rendering refuses it
    instead: planning warns once per run and writes no index, and the shard's pass yields every sample."""
    from wdsembed.config import EmbedConfig
    from wdsembed.plan import plan_shards
    from wdsembed.shard import TarRead

    (tmp_path / "in").mkdir()
    tar = make_tar(tmp_path / "in" / "00000.tar", [("a.jpg", b"A"), ("b.", b"B"), ("b.jpg", b"BB"), ("c.jpg", b"C")],
                   fmt=tarfile.GNU_FORMAT)
    ref = wds2idx_text(tar, tmp_path)
    assert "jpg 512 1 a.jpg\n 1536 1 b. jpg 2560 2 b.jpg\n" in ref
    with pytest.raises(shardindex.IndexFormatError, match="line 3: 7 fields, not groups of 4"):
        ShardIndex.parse(ref)
    with pytest.raises(shardindex.IndexFormatError, match="member 'b.': a name that ends in its first dot"):
        _index_of(tar).render()
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name="resnet18")
    for _ in range(2):  # and the same on the next run
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            (plan,) = plan_shards(config)
            read = TarRead(config, plan)
            assert [key for key, _ in read.images()] == ["a", "b", "c"] and read.errors == {}
            assert read.finish() == []
        assert plan.index is None and not (tmp_path / "in" / "00000.idx").exists()
        [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warning.startswith(f"shard {tar}: no .idx (member 'b.': ") and "reading it without one" in warning


def test_parse_rejects_other_formats():
    with pytest.raises(shardindex.IndexFormatError, match="v1.2"):
        ShardIndex.parse("v1.1 1\njpg 512 3\n")
    with pytest.raises(shardindex.IndexFormatError, match="2 samples"):
        ShardIndex.parse("v1.2 2\njpg 512 3 a.jpg\n")
    with pytest.raises(shardindex.IndexFormatError, match="integers"):
        ShardIndex.parse("v1.2 1\njpg x 3 a.jpg\n")


def test_read_with_index_detects_a_changed_tar(tmp_path):
    tar = _five_samples(tmp_path)
    with open(tar, "rb") as f:
        idx = build_index(f)
    assert samples_of(tar, index=idx) == samples_of(tar)

    # same layout, one member renamed
    renamed = make_tar(tmp_path / "renamed.tar", [
        (n.replace("s2.txt", "s2.cls"), d) for n, d in
        [(f"s{i}.{e}", bytes([65 + i]) * 1500 if e == "jpg" else b"cap") for i in range(5) for e in ("jpg", "txt")]
    ])
    with pytest.raises(StaleIndexError, match="s2.cls"):
        samples_of(renamed, index=idx)
    # one more sample appended: the old index misses it
    longer = make_tar(tmp_path / "longer.tar", [(f"s{i}.{e}", bytes([65 + i]) * 1500 if e == "jpg" else b"cap")
                                                for i in range(6) for e in ("jpg", "txt")])
    with pytest.raises(StaleIndexError, match="s5.jpg"):
        samples_of(longer, index=idx)
    # one sample fewer: the index lists members the tar lacks
    with open(longer, "rb") as f:
        idx6 = build_index(f)
    with pytest.raises(StaleIndexError, match="does not have"):
        samples_of(tar, index=idx6)


def test_ensure_index_writes_beside_then_reuses(tmp_path, monkeypatch):
    tar = multi_ext_shard(tmp_path)
    fs = fsspec.filesystem("file")
    idx = ensure_index(str(tar), fs, cache_dir=tmp_path / "cache")
    beside = tmp_path / "00000.idx"
    assert idx.path == str(beside) == shardindex.index_path_for(str(tar))
    assert beside.read_text() == wds2idx_text(tar, tmp_path)
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    # the existing file is used, not rebuilt: building is made impossible
    monkeypatch.setattr(shardindex, "build_index", lambda *a, **k: pytest.fail("rebuilt a valid index"))
    again = ensure_index(str(tar), fs, cache_dir=tmp_path / "cache")
    assert again == idx and again.path == str(beside)
    assert samples_of(tar, index=again) == samples_of(tar)


def test_what_a_link_beside_a_shard_names_as_its_index_is_neither_echoed_nor_read_unbounded(tmp_path, caplog):
    """A shard folder of untrusted input may hold `00000.idx` as a link to any file. It was read whole and, not
    being an index, its first line went to a warning (a secret of ~/.netrc or an env file, in the run's logs); a
    link to /dev/zero was read until memory ran out, a FIFO until a writer came. Now its text is never echoed, and
    what cannot be an index of the shard (no plain file, or larger than the shard) is not read; the index is built
    and written in the link's place (the link replaced, never what it names)."""
    data = tmp_path / "data"
    tar = multi_ext_shard(data)
    secret = tmp_path / "secret.env"
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    fs = fsspec.filesystem("file")
    beside = data / "00000.idx"
    for target in (secret, Path("/dev/zero"), "fifo"):
        if target == "fifo":
            os.mkfifo(beside)
        else:
            beside.symlink_to(target)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="wdsembed"):
            idx = ensure_index(str(tar), fs)
        assert "hunter2" not in caplog.text and "ignoring" in caplog.text and str(beside) in caplog.text
        assert idx.path == str(beside) and not beside.is_symlink() and beside.read_text() == idx.render()
        assert secret.read_text() == "AWS_SECRET_ACCESS_KEY=hunter2\n"
        beside.unlink()


def test_ensure_index_uses_an_existing_wds2idx_file(tmp_path, monkeypatch):
    tar = multi_ext_shard(tmp_path)
    (tmp_path / "00000.idx").write_text(wds2idx_text(tar, tmp_path))
    monkeypatch.setattr(shardindex, "build_index", lambda *a, **k: pytest.fail("rebuilt a valid index"))
    idx = ensure_index(str(tar), fsspec.filesystem("file"))
    assert samples_of(tar, index=idx) == samples_of(tar)


def test_the_planner_reads_an_index_head_and_tail_and_the_worker_all_of_it(tmp_path, monkeypatch):
    """Planning checks every shard's index before any work starts: it parses the header and the last line only
    (the last member must still fit the tar), so a line damaged in the middle passes there, and the worker, which
    parses the whole index for its pass, rebuilds it from the tar instead of failing the shard."""
    from wdsembed.config import EmbedConfig
    from wdsembed.plan import plan_shards
    from wdsembed.shard import TarRead

    tar = multi_ext_shard(tmp_path / "in", n=8)
    good = wds2idx_text(tar, tmp_path)
    lines = good.split("\n")
    lines[3] = lines[3].replace(" ", "  x ", 1)  # five fields: not a v1.2 line
    (tmp_path / "in" / "00000.idx").write_text("\n".join(lines))
    parsed = []
    monkeypatch.setattr(ShardIndex, "parse", classmethod(lambda cls, text: parsed.append(text) or pytest.fail("parsed")))
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model_name="resnet18")
    (plan,) = plan_shards(config)
    assert plan.index == str(tmp_path / "in" / "00000.idx") and parsed == []
    monkeypatch.undo()

    with pytest.raises(shardindex.IndexFormatError, match="line 4"):
        ShardIndex.parse((tmp_path / "in" / "00000.idx").read_text())
    read = TarRead(config, plan)
    assert samples_of(tar, index=read.index) == samples_of(tar)
    assert (tmp_path / "in" / "00000.idx").read_text() == good  # rebuilt, as wds2idx writes it
    # and a stale last line is still caught at planning: that index is rebuilt there
    (tmp_path / "in" / "00000.idx").write_text(good.replace(lines[-2], lines[-2].replace(" ", " 9", 2)))
    (plan,) = plan_shards(config)
    assert (tmp_path / "in" / "00000.idx").read_text() == good


@pytest.mark.parametrize("change", ["shorter", "same_size_renamed", "appended"])
def test_ensure_index_rebuilds_a_stale_file(tmp_path, change):
    fs = fsspec.filesystem("file")
    members = [(f"s{i}.{e}", bytes([65 + i]) * 1500 if e == "jpg" else b"cap") for i in range(5)
               for e in ("jpg", "txt")]
    tar = make_tar(tmp_path / "00007.tar", members)
    old = ensure_index(str(tar), fs)
    if change == "shorter":
        make_tar(tar, members[:4])  # the last indexed member now lies past the end
    elif change == "same_size_renamed":
        make_tar(tar, [(n.replace("s4", "t4"), d) for n, d in members])
        assert tar.stat().st_size == os.path.getsize(tmp_path / "00007.tar")
    else:
        make_tar(tar, members + [("s5.jpg", b"new"), ("s5.txt", b"cap")])
    new = ensure_index(str(tar), fs)
    assert new != old
    assert (tmp_path / "00007.idx").read_text() == wds2idx_text(tar, tmp_path)
    assert samples_of(tar, index=new) == samples_of(tar)


class ReadOnlyFileSystem(LocalFileSystem):
    """The local disk, refusing every write under `root` with PermissionError, the way s3fs reports a bucket
    without PutObject permission. Needed because the tests run as root, and chmod does not stop root."""

    def __init__(self, root: str, **kw):
        super().__init__(**kw)
        self.ro_root = os.path.abspath(root)

    def _deny(self, path, what):
        p = os.path.abspath(self._strip_protocol(path))
        if p == self.ro_root or p.startswith(self.ro_root + os.sep):
            raise PermissionError(13, f"read-only: {what}", p)

    def _open(self, path, mode="rb", **kw):
        if any(c in mode for c in "wax+"):
            self._deny(path, "open for writing")
        return super()._open(path, mode=mode, **kw)

    def pipe_file(self, path, value, **kw):
        self._deny(path, "pipe")
        return super().pipe_file(path, value, **kw)

    def mv(self, path1, path2, **kw):
        self._deny(path1, "mv")
        self._deny(path2, "mv")
        return super().mv(path1, path2, **kw)

    def cp_file(self, path1, path2, **kw):
        self._deny(path2, "cp")
        return super().cp_file(path1, path2, **kw)

    def rm_file(self, path):
        self._deny(path, "rm")
        return super().rm_file(path)

    def makedirs(self, path, exist_ok=False):
        self._deny(path, "makedirs")
        return super().makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path, create_parents=True, **kw):
        self._deny(path, "mkdir")
        return super().mkdir(path, create_parents=create_parents, **kw)


def _check_cached(tar: Path, fs, cache: Path, tmp_path: Path, monkeypatch):
    idx = ensure_index(str(tar), fs, cache_dir=cache)
    assert idx.path is not None and Path(idx.path).parent == cache
    assert Path(idx.path).read_text() == wds2idx_text(tar, tmp_path)
    assert sorted(p.name for p in tar.parent.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    # the cached copy is found again without rebuilding
    with monkeypatch.context() as m:
        m.setattr(shardindex, "build_index", lambda *a, **k: pytest.fail("rebuilt a cached index"))
        assert ensure_index(str(tar), fs, cache_dir=cache).path == idx.path
    return idx


def test_read_only_folder_index_goes_to_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    tar = multi_ext_shard(data)
    fs = ReadOnlyFileSystem(str(data))
    with pytest.raises(PermissionError):
        fs.pipe_file(str(data / "probe"), b"x")
    cache = tmp_path / "cache"
    idx = _check_cached(tar, fs, cache, tmp_path, monkeypatch)
    assert len(list(cache.iterdir())) == 1

    # a new version of the shard (other size and mtime) gets its own cache entry
    multi_ext_shard(data, n=7)
    idx7 = ensure_index(str(tar), fs, cache_dir=cache)
    assert idx7.path != idx.path and idx7.num_samples == 7
    assert len([p for p in cache.iterdir() if p.suffix == ".idx"]) == 2
    # without a cache dir the index is still returned, just not stored
    assert ensure_index(str(tar), fs).path is None


def test_read_only_folder_by_chmod(tmp_path):
    """The same with real permission bits, in a child process (root's permission override dropped there)."""
    from conftest import CANNOT_DROP_OVERRIDE, without_file_permission_override

    data, cache = tmp_path / "data", tmp_path / "cache"
    tar = multi_ext_shard(data)
    child = ("import sys, fsspec\nfrom wdsembed.shardindex import ensure_index\n"
             "print(ensure_index(sys.argv[1], fsspec.filesystem('file'), cache_dir=sys.argv[2]).path)")
    data.chmod(0o555)
    try:
        done = subprocess.run([sys.executable, "-c", child, str(tar), str(cache)], capture_output=True, text=True,
                              timeout=120, preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    finally:
        data.chmod(0o755)
    if done.returncode == CANNOT_DROP_OVERRIDE:
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: chmod cannot stop root")
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path(done.stdout.strip())
    assert path.parent == cache and path.read_text() == wds2idx_text(tar, tmp_path)
    assert sorted(p.name for p in data.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_a_run_over_a_read_only_input_with_an_unwritable_index_cache_reads_without_indexes(tmp_path):
    """Input on a read-only mount (a team's shared dataset) and an index cache this user cannot write (a shared
    --index-cache-dir another member made, or a home that is read-only in a container): the planning's first .idx
    write to the cache raised PermissionError, and the whole run failed before any shard. Now each shard is read
    without one (as with --no-index-files), all are embedded, and one warning says so for the run, not per shard.
    Real permission bits, in a child process (root's permission override dropped there)."""
    from conftest import CANNOT_DROP_OVERRIDE, TINY_MODEL, without_file_permission_override
    from wdsembed.synthetic import ShardSample, encode_image, make_image, write_shard

    data, cache, out = tmp_path / "data", tmp_path / "cache", tmp_path / "out"
    for s in range(3):
        write_shard(data, f"{s:05d}", [ShardSample(encode_image(make_image(32, 24, seed=10 * s + i), "bmp"),
                                                   ext="bmp") for i in range(2)])
    cache.mkdir()
    child = ("import logging, sys\nfrom wdsembed.api import run_shards\nfrom wdsembed.config import EmbedConfig\n"
             "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')\n"
             "results = run_shards(EmbedConfig(input=sys.argv[1], output=sys.argv[2], index_cache_dir=sys.argv[3], "
             f"model_name={TINY_MODEL!r}, pretrained=False, device='cpu', batch_size=4, num_threads_per_worker=1, "
             "fidelity_sample=0))\n"
             "print('embedded', sum(r.embedded for r in results))")
    for path in [data, cache, *data.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        done = subprocess.run([sys.executable, "-c", child, str(data), str(out), str(cache)], capture_output=True,
                              text=True, timeout=300,
                              preexec_fn=without_file_permission_override if os.geteuid() == 0 else None)
    finally:
        for path in [data, cache]:
            path.chmod(0o755)
    if done.returncode == CANNOT_DROP_OVERRIDE:
        pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: chmod cannot stop root")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "embedded 6"
    said = [line for line in done.stderr.splitlines() if ".idx" in line or "index" in line]
    assert len(said) == 1 and said[0].startswith("WARNING wdsembed: 3 shard(s) are read without a .idx: ") and str(cache) in said[0] \
        and "Permission denied" in said[0], done.stderr[-3000:]
    assert list(cache.iterdir()) == [] and not list(data.glob("*.idx"))


def test_a_shard_named_as_long_as_a_file_name_may_be_gets_its_index_beside_it_or_in_the_cache(tmp_path):
    """A tar's name may take 255 bytes; its .idx beside it is no longer, but the temp file it was written through
    (`.<name>.tmp-<32 hex>`) was 38 bytes longer, and the cache's copy (`<stem>-<24 hex>.idx`) 25: from 218 bytes
    on (here 254, in two-byte letters) both failed with ENAMETOOLONG, which stopped the planning of the whole run.
    The temp name and the cache name now cut the name they carry."""
    stem = "é" * 125  # 250 bytes
    (tmp_path / "data").mkdir()
    tar = make_tar(tmp_path / "data" / f"{stem}.tar", [("a.jpg", b"x" * 100), ("a.txt", b"cap")])
    idx = ensure_index(str(tar), fsspec.filesystem("file"))
    assert idx.path == str(tmp_path / "data" / f"{stem}.idx") and idx.num_samples == 1
    assert sorted(p.name for p in tar.parent.iterdir()) == sorted([tar.name, f"{stem}.idx"])  # no temp file left
    Path(idx.path).unlink()
    cache = tmp_path / "cache"
    cached = ensure_index(str(tar), ReadOnlyFileSystem(str(tar.parent)), cache_dir=cache)
    assert Path(cached.path).parent == cache and Path(cached.path).read_text() == idx.render()
    assert [p.name for p in cache.iterdir()] == [os.path.basename(cached.path)]


def test_index_path_for(tmp_path):
    assert shardindex.index_path_for("/d/00001.tar") == "/d/00001.idx"
    assert shardindex.index_path_for("s3://b/p/00001.tar") == "s3://b/p/00001.idx"
    fp1, fp2 = shardindex.ShardFingerprint(10, 1.5), shardindex.ShardFingerprint(11, 1.5)
    a = shardindex.index_path_for("s3://b/p/00001.tar", tmp_path, fp1)
    assert a.startswith(str(tmp_path) + os.sep + "00001-") and a.endswith(".idx")
    assert a != shardindex.index_path_for("s3://b/p/00001.tar", tmp_path, fp2)
    assert a != shardindex.index_path_for("s3://b/q/00001.tar", tmp_path, fp1)
    with pytest.raises(TypeError):
        shardindex.index_path_for("/d/00001.tar", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# the fast path for indexed tars: the same samples, errors, index checks and built index as the general parser


def _tar_of(tmp_path: Path, name: str, members: list, fmt: int = tarfile.PAX_FORMAT) -> Path:
    return make_tar(tmp_path / f"{name}.tar", members, fmt)


def _index_of(tar: Path) -> ShardIndex:
    with open(tar, "rb") as f:
        return build_index(f)


def _rewritten(tar: Path, name: str, change) -> Path:
    """A copy of `tar` with its bytes passed through change(bytearray)."""
    data = bytearray(tar.read_bytes())
    change(data)
    out = tar.with_name(f"{name}.tar")
    out.write_bytes(bytes(data))
    return out


def _patch_header(data: bytearray, at: int, *, signed: bool = False, **fields: bytes) -> None:
    """Set fields of the header at byte `at` and write a checksum for it (of signed chars with `signed`)."""
    where = {"name": (0, 100), "size": (124, 12), "typeflag": (156, 1), "prefix": (345, 155)}
    for field_, value in fields.items():
        start, width = where[field_]
        data[at + start : at + start + width] = value.ljust(width, b"\x00")
    block = bytearray(data[at : at + 512])
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b >= 128 else b for b in block)
    data[at + 148 : at + 156] = b"%06o\x00 " % total


def _plain(n: int = 12, start: int = 0) -> list:
    return [(f"{i:03d}.jpg", bytes([65 + i % 26]) * (100 + 300 * i)) for i in range(start, start + n)]


def _img2dataset(n: int = 14) -> list:
    out = []
    for i in range(n):
        out += [(f"{i:09d}.jpg", bytes([i]) * (50 + 97 * i)), (f"{i:09d}.json", b'{"k": %d}' % i),
                (f"{i:09d}.txt", b"caption %d" % i)]
    return out


def _with_index_of(tar: Path) -> tuple[Path, ShardIndex]:
    return tar, _index_of(tar)


def _case_plain(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "plain", _plain()))


def _case_img2dataset_pax(tmp_path):
    """As webdataset's TarWriter writes them: a pax header (float mtime) before every member."""
    samples = [ShardSample(image=bytes([i]) * (40 + 131 * i), caption=f"c{i}") for i in range(14)]
    return _with_index_of(Path(write_shard(tmp_path / "pax", "00000", samples, parquet=False, stats=False).tar))


def _case_img2dataset_gnu(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "gnu", _img2dataset(), tarfile.GNU_FORMAT))


def _case_img2dataset_ustar(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "ustar", _img2dataset(), tarfile.USTAR_FORMAT))


def _case_multi_ext(tmp_path):
    return _with_index_of(multi_ext_shard(tmp_path / "multi", n=9))


def _case_several_images(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "several", [
        ("a.png", b"PNG-a"), ("a.jpg", b"JPG-a"), ("a.txt", b"t"),
        ("b.jpg", b"JPG-b"), ("b.png", b"PNG-b"),
        ("c.webp", b"W"), ("c.jpeg", b"JPEG-c"), ("c.png", b"PNG-c"),
        ("d.png", b"P1"), ("d.seg.png", b"P2"), ("e.jpg", b"E"),
    ]))


def _case_multi_part_names(tmp_path):
    """Image members named after more than one dot: behind a plain one, taken alone, refused two at a time."""
    return _with_index_of(_tar_of(tmp_path, "parts", [
        *_plain(2), ("k.mask.png", b"M"), ("k.png", b"K"), ("m.output.PNG", b"O"), ("m.jpg", b"J"),
        ("s.seg.jpg", b"S"), ("s.txt", b"t"), *_plain(2, start=2), ("p.2020.jpg", b"A"), ("p.2021.jpeg", b"B"),
        *_plain(3, start=4), ("q.x.jpg", b"X"), ("q.y.jpg", b"Y")]))


def _case_upper_case(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "upper", [
        ("X.JPG", b"1"), ("X.TXT", b"t"), ("y.Png", b"2"), ("z.JpEg", b"3"), ("w.x.BMP", b"4"), ("v.jpg", b"5")]))


def _case_duplicate_key(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "dup", [
        *_plain(4), ("001.png", b"again"), ("001.txt", b"t"), *_plain(3, start=4), ("000.jpg", b"again")]))


def _case_image_after_its_caption(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "apart", [
        *_plain(3), ("001.txt", b"t"), ("k.txt", b"t"), *_plain(3, start=3), ("k.jpg", b"K"), ("001.png", b"P"),
        ("k.png", b"again")]))


def _case_no_image(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "noimage", [
        *_plain(3), ("n.json", b"{}"), ("n.txt", b"no image"), ("n.cls", b"1"), *_plain(3, start=3)]))


def _case_empty_members(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "empty", [
        *_plain(3), ("e.jpg", b""), ("e.txt", b""), ("f.txt", b""), ("f.png", b"F"), *_plain(2, start=3),
        ("g.jpg", b"")]))


def _case_dir_and_hidden(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "dirhidden", [
        *_plain(3), ("d", "dir"), ("d/k.jpg", b"K" * 600), (".x", b"hidden"), ("d/.y.jpg", b"h"),
        *_plain(3, start=3)]))


def _long_names(tmp_path, fmt: int, name: str):
    long = "d" * 70 + "/" + "e" * 50
    return _with_index_of(_tar_of(tmp_path, name, [
        *_plain(3), (f"{long}.jpg", b"L" * 700), (f"{long}.txt", b"t"), ("x" * 96 + ".jpg", b"100 bytes"),
        *_plain(3, start=3)], fmt))


def _case_long_names_gnu(tmp_path):
    return _long_names(tmp_path, tarfile.GNU_FORMAT, "longgnu")


def _case_long_names_pax(tmp_path):
    return _long_names(tmp_path, tarfile.PAX_FORMAT, "longpax")


def _case_long_names_ustar(tmp_path):
    return _long_names(tmp_path, tarfile.USTAR_FORMAT, "longustar")


def _case_hard_links(tmp_path):
    """One link to a member the fast path passed, one to a member after the hand-over, one dangling."""
    return _with_index_of(_tar_of(tmp_path, "hard", [
        *_plain(6), ("link1.jpg", ("hardlink", "002.jpg")), ("late.jpg", b"LATE"),
        ("link2.jpg", ("hardlink", "late.jpg")), ("link3.jpg", ("hardlink", "nowhere.jpg")), *_plain(2, start=6)]))


def _case_symlink(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "sym", [
        *_plain(3), ("s.jpg", ("symlink", "000.jpg")), ("s.txt", b"t"), *_plain(3, start=3),
        ("002.png", ("symlink", "x"))]))


def _case_trailing_members(tmp_path):
    """Members after the last indexed one: a symlink of the last sample's key, a hidden file, a directory."""
    return _with_index_of(_tar_of(tmp_path, "trailing", [
        *_plain(4), ("003.png", ("symlink", "000.jpg")), (".z", b"h"), ("dir", "dir")]))


def _truncated(tmp_path, name: str, where) -> tuple[Path, ShardIndex]:
    full = _tar_of(tmp_path, "full-" + name, _img2dataset())
    cut = where(full)
    return _rewritten(full, name, lambda data: data.__delitem__(slice(cut, None))), _index_of(full)


def _case_truncated_in_data(tmp_path):
    return _truncated(tmp_path, "cutdata", lambda tar: data_offsets(tar)["000000007.jpg"] + 300)


def _case_truncated_in_header(tmp_path):
    return _truncated(tmp_path, "cuthdr", lambda tar: header_offsets(tar)["000000009.json"] + 200)


def _case_truncated_before_end(tmp_path):
    return _truncated(tmp_path, "cutend", lambda tar: data_offsets(tar)["000000013.txt"] + 512)


def _case_bad_checksum(tmp_path):
    tar = _tar_of(tmp_path, "good", _img2dataset())
    at = header_offsets(tar)["000000005.txt"]
    return _rewritten(tar, "badsum", lambda data: data.__setitem__(slice(at + 148, at + 154), b"777777")), _index_of(tar)


def _damaged(tmp_path, name: str, change, members: Optional[list] = None, fmt: int = tarfile.PAX_FORMAT
             ) -> tuple[Path, ShardIndex]:
    """A copy of an img2dataset-like tar passed through change(data, header offsets), with the intact tar's index
    (made before the damage, as a shard's .idx would be)."""
    tar = _tar_of(tmp_path, "intact-" + name, members or _img2dataset(), fmt)
    at = header_offsets(tar)
    return _rewritten(tar, name, lambda data: change(data, at)), _index_of(tar)


def _case_header_bit_flipped(tmp_path):
    return _damaged(tmp_path, "flipname", lambda data, at: data.__setitem__(at["000000005.jpg"] + 5,
                                                                              data[at["000000005.jpg"] + 5] ^ 1))


def _case_size_bit_flipped_gnu(tmp_path):
    return _damaged(tmp_path, "flipsize", lambda data, at: data.__setitem__(at["000000004.jpg"] + 133,
                                                                              data[at["000000004.jpg"] + 133] ^ 4),
                    fmt=tarfile.GNU_FORMAT)


def _case_size_past_the_next_header(tmp_path):
    """A size that holds its checksum but runs over the next members: the block after its data is no header."""
    return _damaged(tmp_path, "sizeover", lambda data, at: _patch_header(data, at["000000006.jpg"],
                                                                         size=b"%011o" % 1500))


def _case_garbage_over_several_members(tmp_path):
    return _damaged(tmp_path, "garbage", lambda data, at: data.__setitem__(
        slice(at["000000003.json"] + 7, at["000000007.jpg"] + 300), b"\x17" * (at["000000007.jpg"] + 293
                                                                                  - at["000000003.json"])))


def _case_first_header_damaged(tmp_path):
    return _damaged(tmp_path, "firstbad", lambda data, at: data.__setitem__(slice(0, 100), b"\xff" * 100))


def _case_last_sample_damaged(tmp_path):
    return _damaged(tmp_path, "lastbad", lambda data, at: data.__setitem__(at["000000013.json"] + 1, 0x7F))


def _case_header_zeroed(tmp_path):
    """A header all zeros (a zeroed sector) is one zero block alone, not the end of the archive (two)."""
    return _damaged(tmp_path, "zeroed", lambda data, at: data.__setitem__(slice(at["000000008.txt"],
                                                                                at["000000008.txt"] + 512),
                                                                          bytes(512)))


def _case_pax_header_damaged(tmp_path):
    tar = Path(write_shard(tmp_path / "paxbad", "00000", [ShardSample(image=b"i" * (99 + 400 * i), caption=str(i))
                                                          for i in range(8)], parquet=False, stats=False).tar)
    at = header_offsets(tar)["000000004.jpg"]  # its pax header ('x', a float mtime) comes first
    return _rewritten(tar, "paxbad2", lambda data: data.__setitem__(at + 3, 0x41)), _index_of(tar)


def _case_sample_header_overwritten(tmp_path):
    """The header of a sample's first member overwritten whole (its size too), in a tar of one header a member:
    the fast path hands over at that header, and the general parser scans on from it as if it had read the tar
    from its start (it knows the tar's magic)."""
    return _damaged(tmp_path, "overwritten", lambda data, at: data.__setitem__(
        slice(at["000000005.jpg"], at["000000005.jpg"] + 512), b"\x17" * 512), fmt=tarfile.GNU_FORMAT)


def _case_header_overwritten_magic_mixed(tmp_path):
    """As sample_header_overwritten, in a tar whose first header carries another magic than the others (GNU's, the
    others POSIX): a scan past the damage looks for headers of the first one's, for the fast path as for the general
    parser (which read it), and finds none."""
    def change(data, at):
        data[257:265] = b"ustar  \x00"
        _patch_header(data, 0)
        data[at["000000005.jpg"] : at["000000005.jpg"] + 512] = b"\x17" * 512
    return _damaged(tmp_path, "mixedmagic", change, fmt=tarfile.USTAR_FORMAT)


def _with_a_tar_member(tmp_path) -> list:
    """_img2dataset's members, with one more in sample 2 that is itself a tar (of the same format) of a sample whose
    key is one of the shard's own."""
    inner = _tar_of(tmp_path, "inner", [("000000004.jpg", b"INNER IMAGE " * 40), ("000000004.json", b"{}")])
    members = _img2dataset()
    return [*members[:9], ("000000002.tar", inner.read_bytes()), *members[9:]]


def _case_header_before_a_tar_member(tmp_path):
    """One bit flipped in the name field of the header of a member that is a tar: its checksum fails, its size
    field still reads."""
    return _damaged(tmp_path, "beforetar", lambda data, at: data.__setitem__(at["000000002.tar"] + 5,
                                                                               data[at["000000002.tar"] + 5] ^ 1),
                    _with_a_tar_member(tmp_path))


def _case_last_member_a_tar_damaged(tmp_path):
    """As header_before_a_tar_member, where that member is the tar's last: the archive's end follows it."""
    inner = _tar_of(tmp_path, "innerlast", [("000000004.jpg", b"INNER IMAGE " * 40), ("000000004.json", b"{}")])
    return _damaged(tmp_path, "lasttar", lambda data, at: data.__setitem__(at["000000013.tar"] + 5,
                                                                             data[at["000000013.tar"] + 5] ^ 1),
                    [*_img2dataset(), ("000000013.tar", inner.read_bytes())])


def _case_page_zeroed(tmp_path):
    """A zeroed 4 KiB page (a lost write) from a header on: more zero blocks than the archive's end has, with the
    tar's headers after them (here sample 6, and the header of sample 7's image)."""
    return _damaged(tmp_path, "pagezeroed", lambda data, at: data.__setitem__(
        slice(at["000000006.jpg"], at["000000006.jpg"] + 4096), bytes(4096)))


def _case_page_zeroed_up_to_a_header(tmp_path):
    """Zeros from one header exactly up to the next sample's (sample 6's three members)."""
    return _damaged(tmp_path, "zeroedtoheader", lambda data, at: data.__setitem__(
        slice(at["000000006.jpg"], at["000000007.jpg"]), bytes(at["000000007.jpg"] - at["000000006.jpg"])))


def _case_garbage_after_the_end(tmp_path):
    """Bytes after the archive's end (its two zero blocks and padding) that hold no header of it."""
    tar = _tar_of(tmp_path, "garbageafter", _img2dataset())
    garbage = random.Random(0).randbytes(50_000) + bytes(3000) + random.Random(1).randbytes(700)
    return _rewritten(tar, "garbageafter2", lambda data: data.extend(garbage)), _index_of(tar)


def _concatenated(tmp_path, name: str, fmt: int) -> tuple[Path, ShardIndex]:
    """Two healthy tars, one after the other (`cat a.tar b.tar`): samples 0-4, then 5-8."""
    members = _img2dataset(9)
    a, b = _tar_of(tmp_path, f"{name}-a", members[:15], fmt), _tar_of(tmp_path, f"{name}-b", members[15:], fmt)
    tar = tmp_path / f"{name}.tar"
    tar.write_bytes(a.read_bytes() + b.read_bytes())
    return _with_index_of(tar)


def _case_concatenated_pax(tmp_path):
    return _concatenated(tmp_path, "catpax", tarfile.PAX_FORMAT)


def _case_concatenated_gnu(tmp_path):
    return _concatenated(tmp_path, "catgnu", tarfile.GNU_FORMAT)


def _stale(tmp_path, name: str, members: list) -> tuple[Path, ShardIndex]:
    old = _tar_of(tmp_path, "old-" + name, _img2dataset())
    return _tar_of(tmp_path, name, members), _index_of(old)


def _case_stale_size(tmp_path):
    members = _img2dataset()
    members[16] = (members[16][0], members[16][1] + b"longer")
    return _stale(tmp_path, "size", members)


def _case_stale_renamed(tmp_path):
    members = _img2dataset()
    members[20] = ("000000006.cls", members[20][1])
    return _stale(tmp_path, "renamed", members)


def _case_stale_added(tmp_path):
    return _stale(tmp_path, "added", [*_img2dataset(), ("extra.jpg", b"new")])


def _case_stale_removed(tmp_path):
    return _stale(tmp_path, "removed", _img2dataset()[:-1])


def _case_stale_removed_middle(tmp_path):
    members = _img2dataset()
    return _stale(tmp_path, "removedmiddle", members[:10] + members[11:])


def _case_non_ascii_gnu(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "utf8gnu", [
        *_plain(2), ("é.jpg", b"e"), ("ü/ß.png", b"s"), ("日本.jpg", b"j" * 600), ("日本.txt", b"t"), ("x.ÄRM", b"arm"),
        *_plain(2, start=2)], tarfile.GNU_FORMAT))


def _case_non_ascii_pax(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "utf8pax", [*_plain(2), ("é.jpg", b"e"), *_plain(2, start=2)]))


def _case_backslash(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "backslash", [
        *_plain(2), ("back\\slash.jpg", b"b"), *_plain(2, start=2)], tarfile.GNU_FORMAT))


def _case_pax_records(tmp_path):
    """pax headers of other kinds: several records (parse_pax decides), a comment, and a path that repeats the
    name (the fast path leaves that one to the general parser)."""
    path = tmp_path / "paxrecords.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, pax in enumerate([{}, {"comment": "x"}, {"comment": "y" * 300, "uname": "u"}, {"comment": "w" * 600},
                                 {}, {"path": "005.jpg"}, {"comment": "z"}]):
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size, info.mtime, info.pax_headers = 10 + i, 1_700_000_000.5, pax
            tar.addfile(info, io.BytesIO(bytes([48 + i]) * (10 + i)))
    return _with_index_of(path)


def _case_pax_path(tmp_path):
    """A pax path record renames a member whose header field has the name the index has: the index is stale."""
    path = _pax_tar(tmp_path / "paxpath.tar", {"path": "other/003.jpg"})
    samples = [tuple(m._replace(name="003.jpg") if m.name == "other/003.jpg" else m for m in group)
               for group in _index_of(path).samples]
    return path, ShardIndex(tuple(samples))


def _case_bad_pax_record(tmp_path):
    tar = Path(write_shard(tmp_path / "badpax", "00000", [ShardSample(image=b"i" * 99)] * 6, parquet=False,
                           stats=False).tar)
    at = header_offsets(tar)["000000003.jpg"] + 512  # the data of its pax header: "NN mtime=..."
    return _rewritten(tar, "badpax2", lambda data: data.__setitem__(slice(at, at + 2), b"3x")), _index_of(tar)


def _case_odd_first_members(tmp_path):
    """The fast path has nothing to take: the first name is one it cannot check from a header."""
    return _with_index_of(_tar_of(tmp_path, "oddfirst", [("back\\slash.jpg", b"b"), *_plain(3)], tarfile.GNU_FORMAT))


def _case_no_extension_first(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "noextfirst", [("README", b"r"), *_plain(3)]))


def _case_dir_first(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "dirfirst", [("d", "dir"), *_plain(3)]))


def _case_index_first_offset(tmp_path):
    tar = _tar_of(tmp_path, "firstoffset", _plain(3))
    idx = _index_of(tar)
    first = idx.samples[0][0]
    return tar, ShardIndex(((first._replace(offset=first.offset + 100),), *idx.samples[1:]))


def _case_old_regular_typeflag(tmp_path):
    members = _plain(6)
    tar = _tar_of(tmp_path, "typeflag", members, tarfile.GNU_FORMAT)
    at = header_offsets(tar)["002.jpg"]
    return _with_index_of(_rewritten(tar, "typeflag0", lambda data: _patch_header(data, at, typeflag=b"\x00")))


def _case_other_number_forms(tmp_path):
    """A size in spaces and octal (read by both), one in base-256 (the general parser's), a signed checksum."""
    members = [*_plain(3), ("é1.jpg", b"s" * 77), *_plain(3, start=3), ("é2.jpg", b"b" * 40), *_plain(2, start=6)]
    tar = _tar_of(tmp_path, "numbers", members, tarfile.GNU_FORMAT)
    offs = header_offsets(tar)

    def change(data):
        _patch_header(data, offs["001.jpg"], size=b"      %o " % 400)
        _patch_header(data, offs["é1.jpg"], signed=True)
        _patch_header(data, offs["004.jpg"], size=b"\x80" + (1300).to_bytes(11, "big"))
        _patch_header(data, offs["é2.jpg"], signed=True)
    return _rewritten(tar, "numbers2", change), _index_of(tar)


def _case_ustar_prefix(tmp_path):
    """A POSIX header whose prefix field holds a folder: the member is `dir/003.jpg`, not the index's `003.jpg`."""
    tar = _tar_of(tmp_path, "prefix", _plain(6), tarfile.USTAR_FORMAT)
    at = header_offsets(tar)["003.jpg"]
    return _rewritten(tar, "prefix2", lambda data: _patch_header(data, at, prefix=b"dir")), _index_of(tar)


def _case_big_member(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "big", [*_plain(3), ("big.jpg", b"B" * 200_000), *_plain(3, start=3)]))


def _case_index_lines_differ(tmp_path):
    """Index lines that split one key's members or join two keys: samples follow the names either way."""
    tar = _tar_of(tmp_path, "lines", _img2dataset(6))
    members = list(_index_of(tar).members())
    samples = [tuple(members[:2]), (members[2],), tuple(members[3:9]), *[(m,) for m in members[9:]]]
    return tar, ShardIndex(tuple(samples))


def _case_index_absurd_numbers(tmp_path):
    tar = _tar_of(tmp_path, "absurd", _plain(3))
    idx = _index_of(tar)
    first = idx.samples[0][0]
    return tar, ShardIndex(((first._replace(size=1 << 70),), *idx.samples[1:]))


def _case_index_other_offsets(tmp_path):
    tar = _tar_of(tmp_path, "offsets", _plain(5))
    idx = _index_of(tar)
    third = idx.samples[2][0]
    return tar, ShardIndex((*idx.samples[:2], (third._replace(offset=third.offset + 512),), *idx.samples[3:]))


def _case_empty_tar(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "nothing", []))


def _case_one_sample(tmp_path):
    return _with_index_of(_tar_of(tmp_path, "single", [("only.jpg", b"1" * 900), ("only.txt", b"t")]))


FAST_PATH_CASES = {name[len("_case_"):]: case for name, case in list(globals().items()) if name.startswith("_case_")}


def _outcome(tar: Path, index: ShardIndex, *, fast: bool, extensions, chunk_size: int, forward_only: bool,
             tolerant: bool):
    """Every field of every sample (image bytes compared as bytes), the error that ended the read, the
    on_stale_index and on_damage calls (`tolerant`: both given) and the index built on the way."""
    stale: list[str] = []
    damaged: list[tuple] = []
    builder = shardindex.IndexBuilder()
    got, error = [], None
    with open(tar, "rb") as raw:
        f = ForwardOnlyFile(raw) if forward_only else raw
        try:
            for s in iter_samples(f, extensions=extensions, shard="shard.tar", index=index, chunk_size=chunk_size,
                                  index_builder=builder, fast=fast,
                                  on_stale_index=(lambda e: stale.append(str(e))) if tolerant else None,
                                  on_damage=(lambda e: damaged.append((str(e), e.offset, e.resumed, e.key)))
                                  if tolerant else None):
                assert type(s) is Sample and type(s.offset) in (int, type(None))
                got.append((s.key, None if s.image is None else bytes(s.image), s.image_ext, s.error, s.member,
                            s.offset))
        except (ShardReadError, StaleIndexError) as e:
            error = (type(e), str(e), getattr(e, "offset", None), getattr(e, "reason", None),
                     getattr(e, "member", None), getattr(e, "key", None))
    return got, error, stale, damaged, builder.index()


@pytest.mark.parametrize("case", sorted(FAST_PATH_CASES))
def test_fast_path_reads_what_the_general_parser_reads(tmp_path, case):
    tar, index = FAST_PATH_CASES[case](tmp_path)
    for extensions in (EXTS, ("png", "jpg", "ärm")):
        for chunk_size in (1024, 1500, 4096, 64 * 1024):
            for forward_only in (False, True):
                for tolerant in (False, True):
                    kw = dict(extensions=extensions, chunk_size=chunk_size, forward_only=forward_only,
                              tolerant=tolerant)
                    assert _outcome(tar, index, fast=True, **kw) == _outcome(tar, index, fast=False, **kw), kw


def _general_parser_members(monkeypatch) -> list[str]:
    """The names of the members tarstream.iter_members yields from now on (the general parser's)."""
    names: list[str] = []
    original = tarstream.iter_members

    def counting(r):
        for m in original(r):
            names.append(m.name)
            yield m
    monkeypatch.setattr(tarstream, "iter_members", counting)
    return names


@pytest.mark.parametrize("case", ["plain", "img2dataset_pax", "img2dataset_gnu", "img2dataset_ustar", "multi_ext",
                                  "several_images", "non_ascii_gnu", "index_lines_differ"])
def test_fast_path_runs(tmp_path, monkeypatch, case):
    """The fast path takes every sample of a clean indexed tar but the last (whose end only the general parser
    can tell): images come out as views of one read, and no other member passes through iter_members."""
    tar, index = FAST_PATH_CASES[case](tmp_path)
    parsed = _general_parser_members(monkeypatch)
    with open(tar, "rb") as f:
        got = list(iter_samples(f, extensions=EXTS, shard="s", index=index))
    names = [m.name for m in index.members()]
    last_key = split_member_name(names[-1])[0]
    assert parsed == [n for n in names if split_member_name(n)[0] == last_key]
    views = [s.image for s in got[:-1] if s.image is not None]
    assert views and all(isinstance(v, memoryview) and v.readonly for v in views)
    assert len({id(v.obj) for v in views}) == 1
    # and without an index, or with fast=False, every member goes through the general parser
    parsed.clear()
    with open(tar, "rb") as f:
        assert list(iter_samples(f, extensions=EXTS, shard="s", index=index, fast=False)) == got
    assert len(parsed) == len(list(index.members()))


def test_fast_path_hands_over_at_the_sample_before_a_mismatch(tmp_path, monkeypatch):
    """The sample whose next member does not check out is the general parser's: the tar could hold more of it
    (here a member the index lacks, named like that sample)."""
    members = _plain(6)
    tar = _tar_of(tmp_path, "more", [*members[:3], ("002.png", b"more of 002"), *members[3:]])
    index = _index_of(_tar_of(tmp_path, "less", members))
    parsed = _general_parser_members(monkeypatch)
    stale = []
    with open(tar, "rb") as f:
        got = list(iter_samples(f, extensions=("png", "jpg"), shard="s", index=index, on_stale_index=stale.append))
    assert parsed[:2] == ["002.jpg", "002.png"]
    assert [(s.key, s.image_ext) for s in got[:4]] == [("000", "jpg"), ("001", "jpg"), ("002", "png"), ("003", "jpg")]
    assert len(stale) == 1 and "002.png" in str(stale[0])


def test_fast_path_through_a_read_ahead_stream(tmp_path):
    """Object stores stream through prefetch.ReadAhead: reads of its block size at block boundaries take whole
    blocks without a copy, and the images are views of those very blocks (but for the sample pending at the end
    of a read, which is copied with what follows it, and a member across two reads)."""
    from wdsembed.prefetch import ReadAhead

    samples = [ShardSample(image=bytes([i]) * (300 + 7 * i), txt=False) for i in range(80)]
    tar = Path(write_shard(tmp_path, "00000", samples, parquet=False, stats=False).tar)
    index = _index_of(tar)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/bucket/00000.tar", tar.read_bytes())
    block = 16 * 1024
    with ReadAhead(fs, "/bucket/00000.tar", block_size=block) as f:
        got = list(iter_samples(f, extensions=EXTS, shard="s", index=index, chunk_size=block))
    with open(tar, "rb") as f:
        assert got == list(iter_samples(f, extensions=EXTS, shard="s", index=index, fast=False))
    blocks = [s.image.obj for s in got[:-1] if len(s.image.obj) == block]
    assert len(blocks) > len(got) / 2 and len({id(b) for b in blocks}) > 1


def test_fast_path_reads_forward_in_whole_chunks(tmp_path):
    """Requests of exactly the chunk size (the last one shorter), every byte once, no seek; a sample's image stays
    valid after later reads; the memory held grows with the index, not with the images (a chunk per sample kept
    at most)."""
    chunk = 64 * 1024
    peaks = []
    for image_size in (1000, 20_000):
        tar = _tar_of(tmp_path, f"chunks{image_size}", [
            m for i in range(300)
            for m in ((f"{i:05d}.jpg", bytes([i % 251]) * (image_size + 37 * i)), (f"{i:05d}.txt", b"t"))])
        read = _in_own_process(_traced_read, str(tar), chunk, True, 2)
        peaks.append(read["peak"])
        assert set(read["reads"][:-1]) == {chunk} and read["reads"][-1] <= chunk
        assert read["total"] == tar.stat().st_size
        assert read["kept_first_bytes"] == [bytes([298 % 251]), bytes([299 % 251])]
    assert peaks[1] < peaks[0] + 2 * chunk + 2 * 20_000, peaks
    assert peaks[1] < tar.stat().st_size / 8, peaks


# ---------------------------------------------------------------------------------------------------------------
# listing, fingerprints, img2dataset siblings


def test_list_shards_and_fingerprint(tmp_path):
    for name in ("00001.tar", "00000.tar", "00000.parquet", "00000.idx", "notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "00002.tar").write_bytes(b"x")
    (tmp_path / "dir.tar").mkdir()  # a folder named like a shard is not one
    fs = fsspec.filesystem("file")
    assert shards.list_shards(str(tmp_path), fs) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert shards.list_shards(f"file://{tmp_path}", fs) == [f"file://{tmp_path}/00000.tar",
                                                            f"file://{tmp_path}/00001.tar"]
    fp = shardindex.fingerprint(str(tmp_path / "00000.tar"), fs)
    st = os.stat(tmp_path / "00000.tar")
    assert (fp.size, fp.mtime, fp.etag) == (3, st.st_mtime, None)
    os.utime(tmp_path / "00000.tar", (st.st_atime, st.st_mtime + 5))
    assert shardindex.fingerprint(str(tmp_path / "00000.tar"), fs).token != fp.token


def test_fingerprint_from_object_store_info():
    import datetime as dt

    info = {"size": 42, "ETag": '"abc123"', "LastModified": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)}
    fp = shardindex._fingerprint_from_info(info)
    assert fp == shardindex.ShardFingerprint(42, dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc).timestamp(), "abc123")


def test_read_rows_and_stats(tmp_path):
    fs = fsspec.filesystem("file")
    written = write_shard(tmp_path, "00003", [ShardSample(image=b"x", caption="hi")] * 3, failed_rows=2)
    table = shards.read_rows(written.parquet, fs)
    assert table.column("key").to_pylist() == list(written.parquet_keys)
    assert table.column("status").to_pylist().count("failed_to_download") == 2
    with pytest.raises(FileNotFoundError, match="gone since the run listed it") as gone:  # never taken for no rows
        shards.read_rows(str(tmp_path / "nope.parquet"), fs)
    assert gone.value.filename == str(tmp_path / "nope.parquet") and not faults.is_transient(gone.value)
    stats = shards.read_stats(written.stats, fs)
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (5, 3, 2)
    assert shards.read_stats(str(tmp_path / "nope_stats.json"), fs) is None


def test_not_parquet_or_not_json_is_a_clear_error(tmp_path):
    fs = fsspec.filesystem("file")
    bad = tmp_path / "00000.parquet"
    bad.write_text("key,caption\n1,hello\n")
    with pytest.raises(shards.MetadataFileError, match=r"00000\.parquet.*parquet"):
        shards.read_rows(str(bad), fs)
    # a sound footer over a damaged page: pyarrow says it with a plain OSError, which is the file's, not the store's
    damaged = tmp_path / "00001.parquet"
    pq.write_table(pa.table({"key": ["000000000", "000000001"]}), damaged)
    damage_first_parquet_page(damaged)
    pq.read_metadata(damaged)  # its footer still reads
    with pytest.raises(shards.MetadataFileError) as caught:
        shards.read_rows(str(damaged), fs)
    assert str(caught.value) == (f"{damaged}: cannot read as parquet: Couldn't deserialize thrift: don't know what "
                                 "type: Deserializing page header failed.")
    assert not faults.is_transient(caught.value)  # never retried: the same bytes fail the same way
    bad_stats = tmp_path / "00000_stats.json"
    bad_stats.write_bytes(b"")
    with pytest.raises(shards.MetadataFileError, match=r"00000_stats\.json: an empty file, not JSON"):
        shards.read_stats(str(bad_stats), fs)
    bad_stats.write_text("{not json")
    with pytest.raises(shards.MetadataFileError, match=r"00000_stats\.json"):
        shards.read_stats(str(bad_stats), fs)
    bad_stats.write_text("[1, 2]")
    with pytest.raises(shards.MetadataFileError, match="JSON object"):
        shards.read_stats(str(bad_stats), fs)


def test_shard_errors_survive_pickling():
    """They cross process boundaries (a Dask worker's exception, a Prefect result): their fields come through."""
    import pickle

    for exc in (tarstream.ShardReadError("/d/00001.tar", 1536, "bad tar header checksum", member="a.jpg", key="a"),
                tarstream.MalformedShardError("/d/00002.tar", 0, "not a tar file, an empty file (0 bytes)")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert (back.shard, back.offset, back.reason, back.member, back.key) == (
            exc.shard, exc.offset, exc.reason, exc.member, exc.key)


# The columnar reading of an index (ShardIndex.parse, for text in wds2idx's form) against the line-by-line reading
# (_parse_line, the format's reference): the same samples, or the same error naming the same line.
_CANONICAL = "v1.2 3\njpg 512 3 a.jpg json 1536 10 a.json txt 2560 4 a.txt\njpg 3584 7 b.jpg\njpg 4608 1 c.jpg txt 5632 2 c.txt\n"


def _line_by_line(text: str):
    body = shardindex._body_lines(text)
    return tuple(shardindex._parse_line(line, i) for i, line in enumerate(body, start=2))


@pytest.mark.parametrize("text", [
    _CANONICAL,
    _CANONICAL.replace("a.json txt", "a.json  txt"),  # two spaces
    _CANONICAL.replace(" 7 b.jpg", "\t7 b.jpg"),  # a tab
    _CANONICAL.replace("b.jpg", "b\u00e9.jpg"),  # not ASCII
    _CANONICAL.replace("jpg 3584", " jpg 3584"),  # a leading space
    _CANONICAL.replace("c.txt\n", "c.txt \n"),  # a trailing space
    _CANONICAL.replace(" 3584 ", f" {1 << 70} "),  # past 64 bits
    _CANONICAL.replace("\r", "").replace("b.jpg\n", "b.jpg\r\n"),  # a carriage return
    _CANONICAL.replace(" 7 b.jpg", " 7 b.jpg x"),  # five fields
    _CANONICAL.replace(" 3584 ", " 35x4 "),  # not a number
    _CANONICAL.replace(" 2560 4 ", " 2560 -4 "),  # a sign
    _CANONICAL.replace("jpg 4608 1 c.jpg txt 5632 2 c.txt", ""),  # an empty line
    "v1.2 0\n",
])
def test_the_columnar_index_reading_matches_the_line_by_line_one(text):
    try:
        want = _line_by_line(text)
    except shardindex.IndexFormatError as e:
        with pytest.raises(shardindex.IndexFormatError, match=str(e).split(":")[0]):
            ShardIndex.parse(text)
        return
    idx = ShardIndex.parse(text)
    assert idx.samples == want and len(idx.samples) == len(want) and list(idx.members()) == [m for g in want for m in g]
    assert idx.render() == ShardIndex(want).render()
    flat = [m for g in want for m in g]
    for i in range(len(flat) + 1):
        assert list(idx.members_from(i)) == flat[i:]
    columns = idx.columns()
    if any(m.offset >= 1 << 63 for m in flat):
        assert columns is None
    else:
        assert columns.names == [m.name for m in flat] and columns.exts == [m.ext for m in flat]
        assert columns.offsets.tolist() == [m.offset for m in flat] and columns.sizes.tolist() == [m.size for m in flat]


def test_a_wds2idx_style_index_is_read_as_columns_without_making_its_members(tmp_path):
    """A worker's fast path plans from the columns; the IndexMembers (85 ms per 10,000 lines on the 2-core
    machine) are made only when something asks for the samples."""
    text = _CANONICAL
    idx = ShardIndex.parse(text)
    assert isinstance(idx.samples, shardindex._ColumnSamples) and idx.samples._samples is None
    assert idx.columns().offsets.tolist() == [512, 1536, 2560, 3584, 4608, 5632]
    assert idx.num_samples == 3 and idx.samples._samples is None
    assert idx == ShardIndex(_line_by_line(text)) and idx.end == 5634


def test_an_unreadable_index_is_said_once_per_shard_in_the_terminal_and_the_runs_log(tmp_path):
    """A shard's .idx that cannot be read (here not an index at all; a file this user may not read takes the same
    path): 'ignoring unreadable index' was printed more than once for one shard, bare by the command's checks
    (before the run's log exists) and again, timestamped, by the run's planning. The run says it once, in its log
    (the Prefect logger's line, also on the terminal)."""
    from conftest import TINY_MODEL
    from wdsembed.synthetic import write_demo_dataset

    data = tmp_path / "in"
    write_demo_dataset(data, n_shards=2, per_shard=4)
    for stem in ("00000", "00001"):
        (data / f"{stem}.idx").write_text("not an index\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "flows/embed.py"), str(data),
                           "-o", str(tmp_path / "out"), "--model", TINY_MODEL, "--no-pretrained", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    for stem in ("00000", "00001"):
        lines = [line for line in said.splitlines() if f"ignoring unreadable index {data / stem}.idx" in line]
        assert len(lines) == 1 and "| WARNING | wdsembed.shardindex - " in lines[0], said


@pytest.mark.parametrize("form", ["folder", "pattern", "recursive"])
def test_a_parquet_written_as_a_folder_is_the_shards_parquet(tmp_path, caplog, form):
    """Spark and Dask write a parquet as a folder of part files (`00000.parquet/part-00000-....snappy.parquet`). It
    is the shard's parquet, as one file is, for every form of input (it was planned as no parquet, with a warning,
    and the shard embedded without its columns). Its fingerprint is its parts': a part rewritten in place (the
    folder's own mtime unchanged) changes it, and so do parts written into a folder that had none; the same parts
    give the same one."""
    from conftest import write_parquet_folder
    from wdsembed.config import EmbedConfig
    from wdsembed.plan import plan_shards

    data = tmp_path / "data" / "in"
    for stem in ("00000", "00001"):
        write_shard(data, stem, [ShardSample(image=b"x", caption=stem)] * 3)
    table = pq.read_table(data / "00000.parquet")
    parts = write_parquet_folder(table, data / "00000.parquet")
    given = {"folder": str(data), "pattern": f"{data}/{{00000..00001}}.tar", "recursive": str(tmp_path / "data")}
    config = EmbedConfig(input=given[form], output=str(tmp_path / "out"), model_name="resnet18",
                         recursive=form == "recursive")
    with caplog.at_level(logging.WARNING, logger="wdsembed"):
        first, second = plan_shards(config, indexes=False)
    assert not [r for r in caplog.records if "parquet" in r.getMessage()], caplog.text
    assert first.rows == str(data / "00000.parquet") and second.rows == str(data / "00001.parquet")
    assert shards.read_rows(first.rows, fsspec.filesystem("file")).equals(table)
    assert plan_shards(config, indexes=False)[0].fingerprint == first.fingerprint

    folder_mtime = os.stat(data / "00000.parquet").st_mtime_ns
    pq.write_table(table.slice(0, 1).set_column(1, "caption", pa.array(["changed"])), parts[0])
    os.utime(parts[0], ns=(1, 1))  # as a copy keeping the writer's times would leave it: only its size differs
    assert os.stat(data / "00000.parquet").st_mtime_ns == folder_mtime
    (again, _) = plan_shards(config, indexes=False)
    assert again.fingerprint != first.fingerprint

    for part in parts:
        part.unlink()
    (empty, _) = plan_shards(config, indexes=False)  # only _SUCCESS and the .crc files: planned, not refused
    write_parquet_folder(table, data / "00000.parquet")
    (written, _) = plan_shards(config, indexes=False)
    assert len({empty.fingerprint, written.fingerprint, again.fingerprint}) == 3


@pytest.mark.parametrize("recursive", [False, True])
def test_an_empty_parquet_folder_is_said_with_and_without_recursive(tmp_path, recursive):
    """An empty local `00000.parquet/` (a write that did not finish before it wrote a file) is the shard's parquet,
    which it cannot read: its tar is embedded with a warning naming the folder. Under `recursive` the listing (files
    only) missed it, and the shard ran as one without a parquet, without a word."""
    from conftest import TINY_MODEL
    from wdsembed.api import TimmImageEmbedder
    from wdsembed.synthetic import encode_image, make_image

    data = tmp_path / "data" / "in"
    written = write_shard(data, "00000", [ShardSample(encode_image(make_image(32, 24, seed=i), "jpeg"))
                                          for i in range(3)])
    os.remove(written.parquet)
    os.mkdir(written.parquet)
    [result] = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                 recursive=recursive)(str(tmp_path / "data" if recursive else data),
                                                      str(tmp_path / "out"))
    assert result.warnings == [f"{written.parquet}: cannot read as parquet: a folder with no part files (it holds "
                               "nothing): a write that did not finish, or was not of a parquet; the output holds the "
                               "tar's samples only (no img2dataset columns)"], result.warnings
    assert (result.rows, result.embedded) == (3, 3)


def test_the_checks_before_any_work_read_a_parquet_written_as_a_folder(tmp_path):
    """The checks before any work read a folder parquet as they read a file: its id column must be there and hold
    the tar's keys (plan._check_id_column), the shards' id columns must be of one type (plan._check_id_types), and
    the run's id type is the first parquet's (plan.run_id_type). With the folder taken for no parquet, the first
    two let a wrong --id-column and mixed types through, and the third typed the keys as strings."""
    from conftest import write_parquet_folder
    from wdsembed.config import EmbedConfig
    from wdsembed.inputs import InputError, find_shards
    from wdsembed.plan import _check_id_column, _check_id_types, plan_shards

    data = tmp_path / "in"
    for stem in ("00000", "00001"):
        write_shard(data, stem, [ShardSample(image=b"x", caption=stem, width=40)] * 3)
    ints = pq.read_table(data / "00000.parquet")
    ints = ints.set_column(0, "key", ints.column("key").cast(pa.int64()))
    write_parquet_folder(ints, data / "00000.parquet", parts=2)

    def config(**kw) -> EmbedConfig:
        return EmbedConfig(input=str(data), output=str(tmp_path / "out"), model_name="resnet18", **kw)

    found = find_shards(config())
    _check_id_column(config(), found)  # its keys are the tar's
    with pytest.raises(InputError, match=r"id column 'nope'.*00000\.parquet"):
        _check_id_column(config(id_column="nope"), found)
    with pytest.raises(InputError, match=r"not one of the 3 sample key\(s\) of 00000\.tar is in id column "
                                         r"'width' of 00000\.parquet"):
        _check_id_column(config(id_column="width"), found)
    with pytest.raises(InputError, match=r"the shards' parquets disagree on the type of id column 'key': int64 in "
                                         r"00000\.parquet; string in 00001\.parquet"):
        _check_id_types(config(), found)
    (data / "00001.parquet").unlink()
    assert {p.id_type for p in plan_shards(config(), indexes=False)} == {"int64"}


def test_an_emptied_shard_whose_parquet_pandas_wrote_is_embedded_in_the_runs_id_type(tmp_path):
    """A shard emptied by a filter, its parquet written by pandas: an empty frame's columns are of Arrow's `null`
    type. The shard failed ("id column 'key' ... has type null"), on every run, and where its parquet came first
    the run's id type was taken from it: strings, where the other parquets' keys are integers. Now it is
    embedded (no rows) with the run's id type, and every output and kNN view reads as one dataset."""
    import pandas as pd
    import pyarrow.dataset as ds

    from conftest import TINY_MODEL
    from wdsembed import TimmImageEmbedder
    from wdsembed.config import EmbedConfig
    from wdsembed.plan import plan_shards
    from wdsembed.synthetic import from_encoded, synthetic_images

    data, out = tmp_path / "in", tmp_path / "out"
    write_shard(data, "00000", [])
    pd.DataFrame(columns=["key", "caption", "url", "status"]).to_parquet(data / "00000.parquet")
    assert pq.read_schema(data / "00000.parquet").field("key").type == pa.null()
    second = write_shard(data, "00001", from_encoded(synthetic_images(2, seed=1)), failed_rows=1)
    ints = pq.read_table(data / "00001.parquet")
    pq.write_table(ints.set_column(0, "key", ints.column("key").cast(pa.int64())), data / "00001.parquet")
    write_shard(data, "00002", from_encoded(synthetic_images(2, seed=2)), parquet=False, stats=False)

    config = EmbedConfig(input=str(data), output=str(out), model_name=TINY_MODEL)
    assert {p.id_type for p in plan_shards(config, indexes=False)} == {"int64"}
    results = TimmImageEmbedder(TINY_MODEL, pretrained=False, device="cpu", batch_size=4, num_threads_per_worker=1,
                                fidelity_sample=0)(str(data), str(out))
    assert [(r.stem, r.rows, r.embedded) for r in results] == [("00000", 0, 0), ("00001", 3, 2), ("00002", 2, 2)]
    for folder in (out, out / "_embeddings"):
        assert {pq.read_schema(f).field("key").type for f in folder.glob("*.parquet")} == {pa.int64()}
    embedded = [int(k) for k in second.parquet_keys if k not in second.failed_keys] + [20000, 20001]
    assert ds.dataset(out / "_embeddings", format="parquet").to_table().column("key").to_pylist() == embedded


def test_a_spark_folder_reads_as_its_parts_rows_in_order(tmp_path):
    """Spark's layout: `part-00000-<uuid>-c000.snappy.parquet` ..., a `.crc` beside each, `_SUCCESS`,
    `_started_<id>`, `_committed_<id>` (none of them parquet, all skipped as pyarrow.dataset skips names starting
    with `_` or `.`). The rows come back in the parts' order, whole, with columns= as for one file."""
    from conftest import write_parquet_folder

    fs = fsspec.filesystem("file")
    written = write_shard(tmp_path / "in", "00000", [ShardSample(image=b"x", caption=f"c{i}") for i in range(7)])
    table = pq.read_table(written.parquet)
    parts = write_parquet_folder(table, written.parquet, parts=3)
    assert sorted(p.name for p in Path(written.parquet).iterdir())[:4] == [
        f".{parts[0].name}.crc", f".{parts[1].name}.crc", f".{parts[2].name}.crc", "_SUCCESS"]
    assert shards.parquet_parts(written.parquet, fs) == [str(p) for p in parts]
    assert shards.read_rows(written.parquet, fs).equals(table)
    assert shards.read_rows(written.parquet, fs, columns=["key"]).equals(table.select(["key"]))
    assert shards.read_rows_schema(written.parquet, fs) == table.schema
    # Each part is read by pyarrow itself: its own reading of the folder gives the same rows
    assert pq.read_table(written.parquet, filesystem=fs).equals(table)


def test_a_dask_folder_reads_its_parts_in_their_numbers_order(tmp_path):
    """Dask names its parts `part.0.parquet` ... `part.11.parquet`: as text, part.10 sorts before part.2 (pyarrow's
    own reading of the folder puts its rows there); they are read by their numbers. `_metadata` and
    `_common_metadata` are skipped."""
    from conftest import write_parquet_folder

    fs = fsspec.filesystem("file")
    table = pa.table({"key": [f"{i:09d}" for i in range(24)], "n": list(range(24))})
    folder = tmp_path / "00000.parquet"
    parts = write_parquet_folder(table, folder, parts=12, layout="dask")
    assert [Path(p).name for p in shards.parquet_parts(str(folder), fs)] == [p.name for p in parts]
    assert shards.read_rows(str(folder), fs).column("n").to_pylist() == list(range(24))
    assert pq.read_table(folder, filesystem=fs).column("n").to_pylist() != list(range(24))  # text order


def test_a_parquet_folder_that_cannot_be_read_is_a_clear_error(tmp_path):
    """A folder that holds no part (a write that did not finish: `_SUCCESS` or `.crc` files only), parts whose
    schemas conflict, a part that is no parquet, or parts in subfolders (a partitioned write, whose partition
    values are in the folders' names): MetadataFileError naming the folder and the cause (the shard is then
    embedded from its tar, with a warning, as for a .parquet that is not parquet). Parts that only lack a column of
    the others are read, the column null in their rows."""
    fs = fsspec.filesystem("file")
    folder = tmp_path / "00000.parquet"
    folder.mkdir()
    with pytest.raises(shards.MetadataFileError) as caught:
        shards.read_rows(str(folder), fs)
    assert str(caught.value) == (f"{folder}: cannot read as parquet: a folder with no part files (it holds nothing): "
                                 "a write that did not finish, or was not of a parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-00000.parquet.crc").write_bytes(b"crc")
    with pytest.raises(shards.MetadataFileError, match=r"no part files \(it holds \.part-00000\.parquet\.crc, "
                                                       r"_SUCCESS\)"):
        shards.read_rows(str(folder), fs)
    assert not faults.is_transient(caught.value)

    pq.write_table(pa.table({"key": ["0", "1"], "n": [1, 2]}), folder / "part-00000.parquet")
    pq.write_table(pa.table({"key": ["2"], "n": ["three"]}), folder / "part-00001.parquet")
    for read in (shards.read_rows, shards.read_rows_schema):
        with pytest.raises(shards.MetadataFileError) as caught:
            read(str(folder), fs)
        assert str(caught.value) == (
            f"{folder}: cannot read as parquet: the schema of its part part-00001.parquet conflicts with that of the "
            "parts before it: Unable to merge: Field n has incompatible types: int64 vs string"), read

    pq.write_table(pa.table({"key": ["2"], "extra": [3.5]}), folder / "part-00001.parquet")
    rows = shards.read_rows(str(folder), fs)
    assert rows.to_pydict() == {"key": ["0", "1", "2"], "n": [1, 2, None], "extra": [None, None, 3.5]}

    (folder / "part-00002.parquet").write_text("<html>not a parquet</html>")
    with pytest.raises(shards.MetadataFileError, match=r"00000\.parquet: cannot read as parquet: part "
                                                       r"part-00002\.parquet: Parquet magic bytes not found"):
        shards.read_rows(str(folder), fs)
    (folder / "part-00002.parquet").unlink()
    damage_first_parquet_page(folder / "part-00001.parquet")
    with pytest.raises(shards.MetadataFileError, match=r"part part-00001\.parquet: Couldn't deserialize thrift"):
        shards.read_rows(str(folder), fs)

    shutil.rmtree(folder)
    (folder / "year=2024").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["0"]}), folder / "year=2024" / "part-00000.parquet")
    with pytest.raises(shards.MetadataFileError) as caught:
        shards.read_rows(str(folder), fs)
    assert str(caught.value) == (f"{folder}: cannot read as parquet: a folder of part files in subfolders "
                                 "(year=2024/part-00000.parquet: a partitioned write), whose partition columns would "
                                 "be lost; write the shard's rows as one file, or as part files directly in the folder")
