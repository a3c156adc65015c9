"""The WebDataset layout of a shard: member names and keys, the samples a tar holds (streamed, checked against its
`.idx` where there is one), and the img2dataset siblings beside it (`00000.parquet`, `00000_stats.json`).

Knows nothing of DALI pipelines, models or Prefect. The tar format is in `tarstream.py`, the `.idx` files in
`shardindex.py`.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Generator, Iterator, Optional, Sequence

import numpy as np

from wdsembed import shardindex, storage, tarstream
from wdsembed.config import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample as found in a tar: its key and its image bytes, or why it has none."""

    key: str
    # the chosen image member's bytes (a read-only memoryview for members bigger than a read chunk, to avoid a
    # second copy); None when `error` is set
    image: Optional[bytes | memoryview]
    image_ext: Optional[str] = None  # lowercased extension of the chosen member ("jpg")
    error: Optional[str] = None  # e.g. "no image member (found: json, txt)", DUPLICATE_KEY
    member: Optional[str] = None  # the chosen image member's name in the tar
    # byte offset of that member's data in the tar (the offset its .idx line has); for a hard link, its target's
    offset: Optional[int] = None
    # The sample's other members named KEY.<image extension> (`x.JPG` beside `x.jpg`, `x.png` beside `x.jpg`), passed
    # over for `member`: at most MAX_OTHERS of them. WebDataset refuses such a sample (a duplicate field) or keeps
    # both fields; here one is the image, and the shard says so (shard.TarRead).
    others: tuple[str, ...] = ()


MAX_OTHERS = 3
# The error of a sample whose key an earlier sample of the tar has (iter_samples); its `member` and `offset` are of
# the image member it was not read for.
DUPLICATE_KEY = "duplicate key"


def has_extension(name: str) -> bool:
    """Is this member a field of a sample, by WebDataset's rule (base_plus_ext): a dot in its name after the last
    slash. One without (`README`, `000001` beside `000001.jpg`) is no field of any sample: WebDataset skips it."""
    return "." in name[name.rfind("/") + 1 :]


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset rule: key = the name up to the first dot after the last slash (the folder part stays in the
    key); ext = the rest after that dot, lowercased. `a/b.c.jpg` -> (`a/b`, `c.jpg`)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


# A byte of a member name that was not UTF-8, as tarstream.decode_name decodes it (surrogateescape).
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def stored_key(key: str) -> str:
    """A sample key as a parquet string can hold it: each byte of its member name that was not UTF-8 (a tar written
    in Latin-1, `caf\\xe9.jpg`) as a backslash and its three octal digits, as `tar tf` lists it (`caf\\351`); other
    keys as they are."""
    return _NOT_UTF8.sub(lambda m: "\\%03o" % (ord(m.group()) - 0xDC00), key)


class MetadataFileError(ValueError):
    """An img2dataset sibling (.parquet, _stats.json) exists but cannot be read as what it should be."""


def _last_ext(ext: str) -> str:
    return ext.rsplit(".", 1)[-1]


def _image_rank(rank: dict[str, int], ext: str) -> Optional[int]:
    """A member's rank as the sample's image, from its extension (split_member_name's): that of its last dot-part
    in `rank`; behind every plain one where the extension has more parts. WebDataset and DALI take all after the
    first dot as the extension, so `0001.mask.png` is component `mask.png` of sample 0001, not its png: it is the
    image only where the sample has no member named 0001.<image extension>."""
    r = rank.get(_last_ext(ext))
    if r is None or "." not in ext:
        return r
    return r + _rank_span(rank)


def _rank_span(rank: dict[str, int]) -> int:
    """The ranks of plain extensions are below this; those of multi-part ones (`mask.png`) below twice it."""
    return max(rank.values(), default=0) + 1


def _choice(mrank: int, size: int, span: int) -> int:
    """An image member's place among its sample's candidates (lowest wins): plain ones before multi-part ones, and
    within each kind a member with bytes before an empty one, then by rank. An empty member is the sample's image
    (its reason, 'empty image member') only where no member of its kind has bytes."""
    return mrank + span * ((mrank >= span) + (size == 0))


def _no_plain_image(key: str, parts: list[str], count: int) -> str:
    shown = ", ".join(map(_shown, parts)) + (", ..." if count > len(parts) else "")
    return (f"{count} image members and none named {key + '.<extension>'!r}, so no one of them is the image: "
            f"{shown} (a key ends at its name's first dot, as WebDataset and DALI split names)")


def iter_samples(
    f: BinaryIO,
    *,
    extensions: Sequence[str],
    shard: str,
    index: Optional["shardindex.ShardIndex"] = None,
    chunk_size: int = tarstream.CHUNK_SIZE,
    index_builder: Optional["shardindex.IndexBuilder"] = None,
    on_stale_index: Optional[Callable[["shardindex.StaleIndexError"], None]] = None,
    on_damage: Optional[Callable[[tarstream.ShardReadError], None]] = None,
    fast: bool = True,
    refuse_large: Optional[Callable[[bytes], Optional[str]]] = None,
    on_no_extension: Optional[Callable[[str], None]] = None,
) -> Iterator[Sample]:
    """Stream the samples of a tar in file order with memory bounded by one read chunk plus one member.

    Consecutive members with one key form a sample; the image is the first member whose lowercased extension
    (the last dot-part) is in `extensions`, tried in that order of preference, those named KEY.<extension> before
    those named after more dots (`KEY.mask.png`, WebDataset's component `mask.png`); a sample with two or more of
    the latter and none of the former gets an error naming them (_image_rank). A key seen again later in the tar
    yields a Sample with error DUPLICATE_KEY where it has a member named like an image (`member` and `offset` name
    the one that would be its image, not read), unless no earlier sample of it had one (`tar cf` of a folder can put a caption before its image, with other samples between): then it
    is read as any sample. A later run of a key with no image member is a sample with no image, as any such (its
    caption after its image). With `index`, members are located through it and each member's
    tar header is checked against it; a mismatch raises shardindex.StaleIndexError. A truncated or corrupt tar raises
    tarstream.ShardReadError naming `shard` after yielding every sample read intact before the damage; with
    `on_damage`, a damaged header is read past instead (below).

    `f` must be positioned at the start of the tar; it is read forward, in requests of at most `chunk_size`
    bytes (no seeks, also with an index), except for hard links (below). Hidden files (`.x`, `dir/.x`, which
    wds2idx leaves out of the index), directories, and links, devices, FIFOs and sparse files not named like an
    image are skipped without ending the current sample. So is a member whose name has no extension (`README`,
    `000001` beside `000001.jpg`: no dot after its last slash), as WebDataset skips it: no field of any sample, it
    makes no sample of its own; `on_no_extension` is called with its name (it stays in the index: wds2idx lists it).
    A sample with more than one member named KEY.<image extension> (`x.jpg` and `x.JPG`, `x.jpg` and `x.png`)
    takes the first of `extensions`' order (of one extension, the first in the tar) and names the others in its
    `others`.
    A hard link member (legal tar: the same file archived twice) counts as the file it links to, an earlier
    regular member of this tar: its image bytes are that member's, read back from the data offset remembered for
    every regular member (a seek and read where `f` is seekable, a ranged read where `f` has `read_range`, as
    prefetch.ReadAhead and s3fetch.ShardReader do; elsewhere the sample gets an error saying so). Only a hard
    link costs a read back; the map of offsets costs about 200 bytes per member, never image bytes. A hard link to
    a name that is no earlier regular member gets an error.
    A symbolic link, device or FIFO member is never followed or read, nor is a GNU sparse file (`tar --sparse`:
    its stored bytes are the file without its holes, so never handed on as the image): where it is named like an
    image and its sample has no real image member, the sample gets an error saying so ("symbolic link member, not
    followed", "sparse file member (GNU tar --sparse), not read"); the tar's other samples are read as usual.
    An image member of 0 bytes is the image only where no other of its kind (plain, or multi-part) has bytes
    (_choice: an empty `.jpg` beside a `.png` does not hide it); then it yields error "empty image member" (DALI's
    decoder would only say "nvImageCodec failure"). The index check is strict: every indexed member must appear
    in index order with the index's name, size and data offset, and the tar may hold no indexable member the index
    lacks (links are not indexed, as wds2idx leaves them out too; nor are sparse files, see shardindex.build_index).
    Memory: one chunk, the member being read and, while a sample has several image members, the best so far.
    `refuse_large`: for an image member of more than LARGE_MEMBER bytes, given its first LARGE_MEMBER_HEAD bytes,
    the reason it is no image to read (not an image at all, too many pixels) or None; a member it refuses is passed
    unread and its sample gets that reason where it has no other image: a video or archive named .jpg costs a
    read, not its size in memory.
    `index_builder` receives every member the .idx lists, so that a full pass also yields the shard's index
    (used for shards on object stores, where a separate indexing pass would download the tar twice).
    `on_stale_index`: instead of raising shardindex.StaleIndexError, call it once and read on without the index (samples
    come from the tar's own headers either way, so a stale index never changes what is read), e.g. to rebuild it.
    `on_damage`: where a header cannot be read (its checksum fails, as after a flipped bit; an impossible size; bad
    extended-header records; zero blocks with other bytes and then more of the tar after them, as a zeroed page
    leaves) and bytes follow it, read on from the next intact header, and call `on_damage` once per damaged part
    with a ShardReadError naming `shard`, the damaged header's offset and the next header's (`resumed`).
    tarstream.next_header finds it, forward, through the read buffer: after the member the damaged header's own size
    says it heads, where a header or the archive's end is there; else the first header of the tar in the blocks
    after the damaged one, as GNU tar does ("Skipping to next header"), within tarstream.RESYNC_LIMIT bytes. The
    members whose headers were in the damaged part are lost, and a sample left without its image by the damage gets
    an error saying so. A header whose size is wrong but whose checksum holds shows itself at the next header, which
    is then not one: read on from there too. The end of the file, no intact header after the damage, or a first
    block that is no header at all (nothing of a tar read: a file that is no tar is not scanned) still end the read
    with ShardReadError.

    Fast path (with `index`, unless `fast=False`): where the tar is laid out exactly as the index says (each
    member right after the previous one, behind one header and at most one harmless pax header), the headers of
    a whole chunk are checked at once against the index (NumPy), and images come out as read-only memoryviews
    of the chunk, with no per-member parsing. The first sample that is not shown to be such (a header that
    differs or is in another form, a link, a sparse file, a long name, damage, the last sample) is read from its
    first header on by the general parser, which then reads the rest of the tar: the samples, errors and index
    checks are the same either way. A chunk stays alive while a sample taken from it does. A sample of more than
    one chunk ends the fast path.
    """
    rank = {e.lower().lstrip("."): i for i, e in reversed(list(enumerate(extensions)))}
    seen: set[str] = set()
    plan = _plan_index(index, rank, max(int(chunk_size), tarstream.BLOCK)) if index is not None and fast else None
    if plan is None:
        expected = iter(index.members()) if index is not None else None
        yield from _parse_tar(tarstream.Reader(f, chunk_size), f, rank=rank, shard=shard, seen=seen, passed=None,
                              expected=expected, index_builder=index_builder, on_stale_index=on_stale_index,
                              on_damage=on_damage, refuse_large=refuse_large, on_no_extension=on_no_extension)
        return
    unread, offset, first, magic = yield from _fast_samples(f, plan, seen)
    passed = plan.names[:first], plan.offsets[:first].tolist(), plan.sizes[:first].tolist()
    if index_builder is not None:
        index_builder.extend(zip(*passed))
    yield from _parse_tar(tarstream.Reader(f, chunk_size, buffered=unread, offset=offset, magic=magic), f,
                          rank=rank, shard=shard, seen=seen, passed=passed, expected=plan.index.members_from(first),
                          index_builder=index_builder, on_stale_index=on_stale_index, on_damage=on_damage,
                          refuse_large=refuse_large, on_no_extension=on_no_extension)


def _parse_tar(
    r: tarstream.Reader,
    f: BinaryIO,
    *,
    rank: dict[str, int],
    shard: str,
    seen: set[str],
    passed: Optional[tuple[list[str], list[int], list[int]]],
    expected: Optional[Iterator["shardindex.IndexMember"]],
    index_builder: Optional["shardindex.IndexBuilder"],
    on_stale_index: Optional[Callable[["shardindex.StaleIndexError"], None]],
    on_damage: Optional[Callable[[tarstream.ShardReadError], None]],
    refuse_large: Optional[Callable[[bytes], Optional[str]]] = None,
    on_no_extension: Optional[Callable[[str], None]] = None,
) -> Iterator[Sample]:
    """iter_samples' general parser: every header through tarstream.iter_members, from `r`'s position (the start
    of the tar, or the first header of a sample the fast path left) to the end. `seen`: keys already yielded;
    `passed`: the regular members before `r`'s position (names, data offsets, sizes), which hard links may
    name; `expected`: the index members from `r`'s position on (None: no index check)."""
    read_back = _read_back(f)
    targets: dict[str, tuple[int, int]] = {}  # regular member (or resolved hard link) -> (data offset, size)

    key: Optional[str] = None
    found: list[str] = []
    best: Optional[tuple[int, bytes | bytearray, str, str, int]] = None  # (rank, data, ext, member, offset)
    span = _rank_span(rank)
    parts: list[str] = []  # the sample's first members named like an image after more than one dot (`a.mask.png`)
    n_parts = 0
    plain: list[str] = []  # the sample's first members named KEY.<image extension>
    best_at: Optional[int] = None  # the image's place in `plain` (names may repeat: a member archived twice)
    unread: Optional[str] = None  # why an image-named member of the sample gave no bytes (links, devices)
    duplicate = False
    repeats_image = False  # a sample of a key seen before has a member named like an image
    # a repeat's image member, as `best` would pick it but never read: (rank, name, data offset), for its row's reason
    repeat_member: Optional[tuple[int, str, Optional[int]]] = None
    damaged: Optional[tarstream.ShardReadError] = None  # a damaged header read past while this sample was open
    follows: Optional[tarstream.ShardReadError] = None  # the damaged part right before this sample's first member
    read_past: Optional[tarstream.ShardReadError] = None  # the last damaged part read past
    resumed_at: Optional[int] = None  # where reading went on after it (past members without an extension there)

    def finish() -> Sample:
        assert key is not None
        sample = _finish()
        if not key.isprintable() and _NOT_UTF8.search(key):
            sample = dataclasses.replace(sample, key=stored_key(key))
        return sample

    def _finish() -> Sample:
        assert key is not None
        if duplicate:  # a run of members apart from its key's first (a caption after its image) repeats nothing
            if not repeats_image:
                return Sample(key, None, error=_no_image(found, rank))
            _, member, offset = repeat_member or (None, None, None)
            return Sample(key, None, error=DUPLICATE_KEY, member=member, offset=offset)
        if best is not None or unread is not None or damaged is not None:
            seen.add(key)  # only a sample with an image member owns its key (see iter_samples)
        if best is None and damaged is not None:
            return Sample(key, None, error=damaged_sample_reason(damaged))
        if best is None and follows is not None:
            return Sample(key, None, error=f"{_no_image(found, rank)} after the tar's damaged part "
                                           f"({tarstream.describe_damage(follows.offset, follows.reason)})")
        if best is None and unread is not None:
            return Sample(key, None, error=unread)
        if best is None:
            return Sample(key, None, error=_no_image(found, rank))
        if best[0] >= 2 * span and n_parts > 1:
            return Sample(key, None, error=_no_plain_image(key, parts, n_parts))
        _, data, ext, member, offset = best
        others = tuple(n for i, n in enumerate(plain) if i != best_at)[:MAX_OTHERS]
        if len(data) == 0:
            return Sample(key, None, image_ext=ext, error="empty image member", member=member, offset=offset,
                          others=others)
        if isinstance(data, bytearray):  # a member bigger than a chunk: hand out its buffer, no second copy
            data = memoryview(data).toreadonly()
        return Sample(key, data, image_ext=ext, member=member, offset=offset, others=others)

    while True:  # once, and again from the next intact header after each damaged one read past (on_damage)
        try:
            for m in tarstream.iter_members(r):
                regular = m.typeflag in tarstream.REGULAR
                target = None
                if regular:
                    targets[m.name] = (m.data_offset, m.size)
                elif m.typeflag == tarstream.HARD_LINK:
                    if passed is not None:  # the members passed before, mapped only now: most tars have none
                        targets = {**dict(zip(passed[0], zip(passed[1], passed[2]))), **targets}
                        passed = None
                    target = targets.get(m.linkname)
                    if target is not None:
                        targets[m.name] = target  # a link to this link is a link to the same file
                k, ext = split_member_name(m.name)
                mrank = _image_rank(rank, ext)
                # Links, devices, FIFOs and sparse files count only where their name makes them (part of) an image
                # sample; hard links always do (each is a file, like a regular member).
                takes_part = (regular or m.typeflag == tarstream.HARD_LINK
                              or (m.typeflag in tarstream.NOT_READ and mrank is not None))
                if not takes_part or not tarstream.indexed(m.name):
                    tarstream.skip_data(r, m)
                    continue
                if regular and index_builder is not None:
                    index_builder.add(m.name, m.data_offset, m.size)
                if regular and expected is not None:
                    try:
                        _check_against_index(shard, m, next(expected, None))
                    except shardindex.StaleIndexError as stale:
                        if on_stale_index is None:
                            raise
                        on_stale_index(stale)
                        expected = None
                if not has_extension(m.name):  # no field of any sample (WebDataset skips it): the sample goes on
                    if on_no_extension is not None:
                        on_no_extension(m.name)
                    if m.header_offset == resumed_at:  # the sample after it is still the first after the damage
                        resumed_at = m.data_offset + m.size + (-m.size % tarstream.BLOCK)
                    tarstream.skip_data(r, m)
                    continue
                if k != key:
                    if key is not None:
                        yield finish()
                    key, found, best, unread, parts, n_parts, plain, best_at = k, [], None, None, [], 0, [], None
                    duplicate, repeats_image, repeat_member = k in seen, False, None
                    damaged = None
                    follows = read_past if read_past is not None and m.header_offset == resumed_at else None
                found.append(ext)
                if mrank is not None and mrank >= span:
                    n_parts += 1
                    if len(parts) < 3:
                        parts.append(m.name)
                at = None  # this member's place in `plain`
                if mrank is not None and mrank < span and len(plain) <= MAX_OTHERS:
                    at = len(plain)
                    plain.append(m.name)
                if mrank is not None:
                    mrank = _choice(mrank, target[1] if target is not None else m.size, span)
                repeats_image = repeats_image or (duplicate and mrank is not None)
                if duplicate and mrank is not None and (repeat_member is None or mrank < repeat_member[0]):
                    at_offset = m.data_offset if regular else target[0] if target is not None else None
                    repeat_member = (mrank, m.name, at_offset)
                if duplicate or mrank is None or (best is not None and mrank >= best[0]):
                    tarstream.skip_data(r, m)
                    continue
                if regular and refuse_large is not None and m.size > LARGE_MEMBER:
                    head = r.read(LARGE_MEMBER_HEAD)
                    r.unread(head)
                    why = refuse_large(bytes(head))
                    del head
                    if why is not None:
                        tarstream.skip_data(r, m)
                        unread = unread or why
                        continue
                if regular:
                    best = None  # drop the worse candidate before reading the better one
                    best, best_at = (mrank, tarstream.read_data(r, m), _last_ext(ext), m.name, m.data_offset), at
                    continue
                tarstream.skip_data(r, m)  # links, devices, FIFOs: no data in the tar; sparse files: not the file
                if m.typeflag != tarstream.HARD_LINK:
                    unread = unread or tarstream.NOT_READ[m.typeflag]
                elif target is None:
                    unread = unread or f"hard link to {_shown(m.linkname)}, which is no earlier file of this tar"
                elif read_back is None and target[1] > 0:
                    unread = unread or (f"hard link to {_shown(m.linkname)}: this stream of the tar cannot read "
                                        "back to that member's data")
                else:
                    offset, size = target
                    if refuse_large is not None and size > LARGE_MEMBER:  # judged by its head, as its file was
                        why = refuse_large(bytes(read_back(offset, LARGE_MEMBER_HEAD)))
                        if why is not None:
                            unread = unread or why
                            continue
                    data = read_back(offset, size) if size and read_back else b""
                    if len(data) == size:
                        best = None
                        best, best_at = (mrank, data, _last_ext(ext), m.name, offset), at
                    else:  # the file changed under us: this sample's loss, not the shard's
                        unread = unread or (f"hard link to {_shown(m.linkname)}: its data read back as "
                                            f"{len(data)} of {size} bytes")
            break
        except tarstream.TarCorrupt as e:
            try:
                if on_damage is None or not isinstance(e, tarstream.BadHeader):
                    raise
                resumed = tarstream.next_header(r, e)
            except tarstream.TarCorrupt as end:
                # The pending sample's image, when it was read whole before the damage, is still good: yield it (its
                # other members may continue past the damage). Otherwise the error names it as lost.
                lost = key
                if key is not None and best is not None and not duplicate:
                    lost = None
                    yield finish()
                raise tarstream.ShardReadError(shard, end.offset, end.reason, end.member, key=lost) from None
            read_past = tarstream.ShardReadError(shard, e.offset, e.reason, e.member, resumed=resumed)
            resumed_at = resumed
            on_damage(read_past)
            if key is not None:
                damaged = damaged or read_past
            if expected is not None:  # the index's members whose headers were in the damaged part are lost too
                expected = itertools.dropwhile(lambda entry, at=resumed: entry.offset < at, expected)
    if expected is not None:
        left = next(expected, None)
        if left is not None:
            stale = shardindex.StaleIndexError(f"{shard}: the index lists {left.name!r} at byte {left.offset}, "
                                    "which the tar does not have")
            if on_stale_index is None:
                raise stale
            on_stale_index(stale)
    if key is not None:
        yield finish()


# Image members bigger than this are judged by their first LARGE_MEMBER_HEAD bytes before they are read
# (iter_samples' refuse_large); no photograph is near it, a video or a disk image named .jpg may be gigabytes.
LARGE_MEMBER = 64 << 20
LARGE_MEMBER_HEAD = 1 << 20


def damaged_sample_reason(damage: tarstream.ShardReadError) -> str:
    """Why a sample that was being read when the tar's damage came has no image."""
    return f"tar damaged inside this sample: {tarstream.describe_damage(damage.offset, damage.reason)}"


NO_IMAGE = "no image member"


def has_no_image_member(sample: Sample) -> bool:
    """Whether `sample` had no member named like an image: a later sample of its key is then read as any sample."""
    return sample.image is None and sample.image_ext is None and (sample.error or "").startswith(NO_IMAGE)


def member_without_extension(name: str) -> str:
    """Why a key whose only member of that name has no extension (iter_samples' on_no_extension) has no image."""
    return (f"the tar's member {_shown(name)} has no extension: no field of any sample (WebDataset names a "
            "sample's members KEY.EXTENSION), so not read")


# Extensions of images, those of --image-extensions' defaults and others (WebDataset decodes these too): a sample whose
# only image has one the run does not read says so, and a first shard of such images only is refused before any work.
KNOWN_IMAGE_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | {
    "gif", "tif", "tiff", "jp2", "j2k", "jpx", "jpe", "jfif", "pbm", "pgm", "ppm", "pnm", "avif", "heic", "heif", "jxl",
    "ico"}


def _no_image(found: list[str], rank: dict[str, int]) -> str:
    shown = ", ".join(dict.fromkeys(e or "(no extension)" for e in found))
    # an image of an extension not read (`.tif`) is not the same as no image at all: say which to add
    unread = list(dict.fromkeys(e for e in map(_last_ext, found) if e in KNOWN_IMAGE_EXTENSIONS and e not in rank))
    if not unread:
        return f"{NO_IMAGE} (found: {shown})"
    one = len(unread) == 1
    return (f"{NO_IMAGE} (found: {shown}; {', '.join(unread)} "
            f"{'is an image extension' if one else 'are image extensions'}"
            f" that this run does not read: add {'it' if one else 'them'} to the image extensions to read "
            f"{'it' if one else 'them'})")


@dataclass(frozen=True, eq=False)
class _IndexPlan:
    """What an index says about its tar, worked out once for the fast path. Members [0, limit) are the ones the
    fast path may take: laid out exactly as iter_members would find them if the index is right, with names it
    can check from the header alone, in samples of at most one chunk. Per sample (consecutive members of one
    key): its key, first member, image member (-1: none) and that member's data offset, size, name and image_ext."""

    index: "shardindex.ShardIndex"
    rank: dict[str, int]  # iter_samples' image extensions -> preference
    chunk_size: int
    limit: int
    names: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    header_at: np.ndarray  # offset of each member's header (its data offset - 512)
    starts: np.ndarray  # offset of each member's first header (a pax header's, where it has one)
    ends: np.ndarray  # offset just past each member's data padding
    pax_room: np.ndarray  # bytes of pax header and data before the member's header (0: none)
    templates: np.ndarray  # tarstream.header_templates of each member
    group_start: list[int]
    group_end: np.ndarray  # one past each sample's last member
    group_key: list[str]
    group_image: list[int]
    image_offset: list[int]
    image_size: list[int]
    image_member: list[str]
    image_ext: list[Optional[str]]
    group_others: dict[int, tuple[str, ...]]  # samples with more than one image member: Sample.others (most none)


def _plan_index(index: "shardindex.ShardIndex", rank: dict[str, int], chunk_size: int) -> Optional[_IndexPlan]:
    columns = index.columns()
    if columns is None:  # numbers no tar here holds: left to the general parser to report
        return None
    n = len(columns.names)
    if not n:
        return None
    offsets, sizes = columns.offsets, columns.sizes
    ends = offsets + sizes + (-sizes % tarstream.BLOCK)
    starts = np.concatenate(([0], ends[:-1]))
    pax_room = offsets - tarstream.BLOCK - starts
    laid_out = ((pax_room == 0) | ((pax_room >= tarstream.BLOCK) & (pax_room % tarstream.BLOCK == 0))
                & (offsets < 1 << 48) & (sizes < 1 << 48))
    limit = _first_false(laid_out)
    if not limit:
        return None

    # Names iter_members reads back as they are (tar_quote leaves them unchanged: printable, no backslash), of
    # at most 100 UTF-8 bytes (longer ones live in an extended header), split into key and extension as
    # split_member_name does, found in the names' bytes joined by backslashes ('/' and '.' are never part of a
    # longer UTF-8 sequence).
    names = columns.names[:limit]
    joined = "\\".join(names)
    encoded = joined.encode("utf-8", "surrogateescape")
    text = np.frombuffer(encoded, dtype=np.uint8)
    separators = np.flatnonzero(text == 0x5C)
    printable = not ((text < 0x20) | (text == 0x7F)).any() if joined.isascii() else joined.isprintable()
    if not printable or len(separators) != limit - 1:
        limit = next(i for i, name in enumerate(names) if not name.isprintable() or "\\" in name)
        if not limit:
            return None
        joined = "\\".join(names[:limit])
        encoded = joined.encode()
        text = np.frombuffer(encoded, dtype=np.uint8)
        separators = np.flatnonzero(text == 0x5C)
    name_start = np.concatenate(([0], separators + 1))
    name_end = np.append(separators, len(text))
    dots, slashes = np.flatnonzero(text == 0x2E), np.append(np.flatnonzero(text == 0x2F), -1)
    slash_before = slashes[np.searchsorted(slashes[:-1], name_end) - 1]  # -1 (the appended one) where none
    last_slash = np.where(slash_before >= name_start, slash_before, name_start - 1)
    first_dot = np.append(dots, len(text))[np.searchsorted(dots, last_slash + 1)]  # after the last slash
    # an extension, and a key whose last part is not empty (tarstream.indexed: not a hidden file)
    limit = _first_false((name_end - name_start <= 100) & (first_dot < name_end) & (first_dot > last_slash + 1))
    if not limit:
        return None
    name_start, name_end, first_dot = name_start[:limit], name_end[:limit], first_dot[:limit]
    key_len = first_dot - name_start
    width = 4 * -(-int((name_end - name_start).max()) // 4)  # the longest name, in whole 32-bit words
    name_bytes = np.array(encoded.split(b"\\", limit)[:limit], dtype=f"S{width}").view(np.uint8).reshape(limit, width)
    key_width = -int(-key_len.max() // 4)  # in 32-bit words
    key_words = name_bytes.view(np.uint32)[:, :key_width] & _KEY_MASKS[key_len, :key_width]
    same_key = (key_words[1:] == key_words[:-1]).all(axis=1) & (key_len[1:] == key_len[:-1])
    group_start = np.flatnonzero(np.concatenate(([True], ~same_key)))
    group_end = np.append(group_start[1:], limit)
    # a sample is taken only whole from at most two reads: one that spans more ends the fast path
    too_big = ends[group_end - 1] - starts[group_start] > chunk_size
    if too_big.any():
        g = int(too_big.argmax())
        if g == 0:
            return None
        limit = int(group_start[g])
        group_start, group_end = group_start[:g], group_end[:g]

    last_dot = dots[np.searchsorted(dots, name_end[:limit]) - 1]
    ranks = _member_ranks(text, encoded, first_dot[:limit], last_dot, name_end[:limit], names, rank)
    span = _rank_span(rank)
    no_image = 2 * span
    # _choice's order; members that are no image behind every one that is
    kind = (ranks >= span).astype(np.int64) + (sizes[:limit] == 0)  # ints: bool + bool is a logical or
    choice = np.where(ranks < no_image, ranks + span * kind, 4 * span)
    image = np.minimum.reduceat(choice * limit + np.arange(limit), group_start) % limit
    best_rank = ranks[image]
    # a sample whose image members are all multi-part (`a.x.jpg`, `a.y.jpg`) has none: the general parser says so
    parts = np.add.reduceat(((ranks >= span) & (ranks < no_image)).astype(np.int64), group_start)
    unclear = (best_rank >= span) & (best_rank < no_image) & (parts > 1)
    if unclear.any():
        g = int(unclear.argmax())
        if g == 0:
            return None
        limit = int(group_start[g])
        group_start, group_end, best_rank, image = group_start[:g], group_end[:g], best_rank[:g], image[:g]
    sizes = sizes[:limit]
    key_start = name_start[group_start].tolist()
    plain = ranks[:limit] < span  # members named KEY.<image extension>
    group_others = {}
    for g in np.flatnonzero(np.add.reduceat(plain.astype(np.int64), group_start) > 1).tolist():
        members = range(int(group_start[g]), int(group_end[g]))
        group_others[g] = tuple(names[i] for i in members if plain[i] and i != image[g])[:MAX_OTHERS]
    return _IndexPlan(
        index=index, rank=rank, chunk_size=chunk_size, limit=limit, names=names[:limit], offsets=offsets[:limit],
        sizes=sizes, header_at=offsets[:limit] - tarstream.BLOCK, starts=starts[:limit], ends=ends[:limit],
        pax_room=pax_room[:limit], templates=tarstream.header_templates(name_bytes[:limit], sizes),
        group_start=group_start.tolist(), group_end=group_end,
        group_key=_keys(joined, encoded, key_start, first_dot[group_start].tolist()),
        group_image=np.where(best_rank < no_image, image, -1).tolist(),
        image_offset=offsets[image].tolist(), image_size=sizes[image].tolist(),
        image_member=list(map(names.__getitem__, image.tolist())),
        image_ext=list(map({r + s: e for e, r in rank.items() for s in (0, span)}.get, best_rank.tolist())),
        group_others=group_others,
    )


def _keys(joined: str, encoded: bytes, start: list[int], end: list[int]) -> list[str]:
    """The names' substrings at these byte offsets of their UTF-8 form."""
    if joined.isascii():
        return list(map(joined.__getitem__, map(slice, start, end)))
    return list(map(bytes.decode, map(encoded.__getitem__, map(slice, start, end))))


# Per key length (0 to 100 bytes): which bits of a 100-byte name, as 25 32-bit words, belong to the key.
_KEY_MASKS = np.where(np.arange(100) < np.arange(101)[:, None], 0xFF, 0).astype(np.uint8).view(np.uint32)


def _member_ranks(text: np.ndarray, encoded: bytes, first_dot: np.ndarray, last_dot: np.ndarray,
                  name_end: np.ndarray, names: list[str], rank: dict[str, int]) -> np.ndarray:
    """Each member's rank (_image_rank's): its extension (split_member_name's), lowercased, its last dot-part
    looked up in `rank`, behind every plain extension where it has more parts; 2 * _rank_span where it is none.
    Positions are in `text`, the names' bytes. ASCII extensions are lowercased here byte by byte; others the way
    the general parser does it."""
    span = _rank_span(rank)
    no_image = 2 * span
    ranks = np.full(len(first_dot), no_image, dtype=np.int64)
    last_len = name_end - last_dot - 1
    for ext, r in rank.items():
        if not ext.isascii() or "." in ext:
            continue  # never an ASCII last dot-part
        wanted = np.frombuffer(ext.encode(), dtype=np.uint8)
        part = text[np.minimum(last_dot[:, None] + 1 + np.arange(len(wanted)), len(text) - 1)]
        lower = np.where((part >= 0x41) & (part <= 0x5A), part | 0x20, part)
        ranks[(last_len == len(wanted)) & (lower == wanted).all(axis=1)] = r
    ranks[(ranks < no_image) & (last_dot > first_dot)] += span
    if not encoded.isascii():
        high = np.flatnonzero(text >= 0x80)
        member = np.searchsorted(name_end, high)  # the name each byte is in (name_end: its separator)
        in_ext = high > first_dot[np.minimum(member, len(first_dot) - 1)]
        for i in np.unique(member[in_ext & (member < len(first_dot))]).tolist():
            r = _image_rank(rank, split_member_name(names[i])[1])
            ranks[i] = no_image if r is None else r
    return ranks


def _first_false(ok: np.ndarray) -> int:
    return len(ok) if ok.all() else int(ok.argmin())


_Run = tuple[int, memoryview, int]  # (first member, bytes holding it and the next ones checked, their offset)
_new_object = object.__new__


def _fast_samples(f: BinaryIO, plan: _IndexPlan, seen: set[str]
                  ) -> Generator[Sample, None, tuple[bytes, int, int, Optional[bytes]]]:
    """iter_samples' fast path: yields the samples of the members that check out against the index, reading `f`
    in whole chunks (at multiples of the chunk size: prefetch.BlockStream hands each block out without a copy).
    A sample is yielded only once the member after it checks out too (so the tar has no more of it): the last
    sample of the index is always the general parser's. Returns where the general parser takes over: the first
    header of the first sample not yielded, as (the bytes read from there on, its offset, its index member, and
    the tar's magic where headers were passed: that of the first, at byte 0, as iter_members would have read it)."""
    chunk_size, limit = plan.chunk_size, plan.limit
    magic: Optional[bytes] = None
    # Bytes read from the first header of the first sample not yielded to the end of the previous read: a copy,
    # so that the read it comes from goes when its samples do.
    tail, tail_at = b"", 0
    runs: list[_Run] = []  # where the checked members lie: the tail, the reads, a copy of each member across two
    checked = done = 0  # members checked, samples yielded
    while True:
        data = f.read(chunk_size)
        if magic is None:
            magic = bytes(data[257:265])
        base = tail_at + len(tail)
        fit = min(int(np.searchsorted(plan.ends, base + len(data), side="right")), limit)
        pieces = []  # (bytes, their offset, members [lo, hi) inside)
        lo = checked
        if lo < fit and plan.starts[lo] < base:  # begins in the previous read: checked in a copy of its own
            start, end = int(plan.starts[lo]), int(plan.ends[lo])
            pieces.append((b"".join((memoryview(tail)[start - tail_at :], memoryview(data)[: end - base])), start,
                           lo, lo + 1))
            lo += 1
        if lo < fit:
            pieces.append((data, base, lo, fit))
        if pieces:
            checked += _checked(plan, pieces)
            runs.extend((first, memoryview(buf).toreadonly(), at) for buf, at, first, _ in pieces)
        upto = int(np.searchsorted(plan.group_end, checked))  # samples whose next member has checked out
        yield from _group_samples(plan, runs, seen, done, upto)
        done = upto
        keep = plan.group_start[done]
        keep_at = int(plan.starts[keep])
        if keep_at >= base:
            tail = data[keep_at - base :]
        else:
            tail = b"".join((memoryview(tail)[keep_at - tail_at :], data))
        tail_at = keep_at
        if checked < fit or len(data) < chunk_size or checked == limit:
            return tail, keep_at, keep, magic if keep else None
        runs = [(keep, memoryview(tail), keep_at)]


def _checked(plan: _IndexPlan, pieces: list[tuple[bytes, int, int, int]]) -> int:
    """How many members in a row, from the first of `pieces` on, check out against the index: `pieces` are
    (bytes, their offset in the tar, members [lo, hi) that lie whole inside), in member order."""
    lo, hi = pieces[0][2], pieces[-1][3]
    ok = tarstream.regular_headers_match(_blocks(pieces, plan.header_at), plan.templates[lo:hi], plan.sizes[lo:hi])
    room = plan.pax_room[lo:hi]
    pax = room > 0
    if pax.any():
        ok[pax] &= tarstream.pax_headers_harmless(_blocks(pieces, plan.starts, pax),
                                                  _blocks(pieces, plan.starts + tarstream.BLOCK, pax),
                                                  room[pax] - tarstream.BLOCK)
    return _first_false(ok)


def _blocks(pieces: list[tuple[bytes, int, int, int]], at: np.ndarray, only: Optional[np.ndarray] = None
            ) -> np.ndarray:
    """The 512-byte blocks at tar offsets at[lo:hi] of each piece's members (those of them `only` marks, a mask
    over all the pieces' members), as rows."""
    parts, first = [], pieces[0][2]
    for buf, base, lo, hi in pieces:
        offsets = at[lo:hi] if only is None else at[lo:hi][only[lo - first : hi - first]]
        parts.append(tarstream.blocks_at(buf, offsets - base))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _group_samples(plan: _IndexPlan, runs: list[_Run], seen: set[str], first: int, stop: int) -> Iterator[Sample]:
    """The samples of groups [first, stop) of the plan, their members checked and found in `runs`."""
    if first == stop:
        return
    last_first, last_buf, last_base = runs[-1]
    for g, key, image, offset, size, member, image_ext in zip(
            range(first, stop), plan.group_key[first:stop], plan.group_image[first:stop],
            plan.image_offset[first:stop], plan.image_size[first:stop], plan.image_member[first:stop],
            plan.image_ext[first:stop]):
        if image < 0:  # also a key's later members apart from its image (a caption after it): no repeat
            found = [split_member_name(n)[1] for n in plan.names[plan.group_start[g] : int(plan.group_end[g])]]
            yield Sample(key, None, error=_no_image(found, plan.rank))
            continue
        if key in seen:
            yield Sample(key, None, error=DUPLICATE_KEY, member=member, offset=offset)
            continue
        seen.add(key)  # only a sample with an image member owns its key (see iter_samples)
        others = plan.group_others.get(g, ()) if plan.group_others else ()
        if not size:
            yield Sample(key, None, image_ext=image_ext, error="empty image member", member=member, offset=offset,
                         others=others)
        else:
            if image >= last_first:
                buf, base = last_buf, last_base
            else:
                _, buf, base = next(run for run in reversed(runs) if run[0] <= image)
            # Sample(key, buf[...], image_ext, member=member, offset=offset), without the frozen dataclass's
            # __init__: it sets the seven fields one object.__setattr__ call each, the most a sample costs here
            sample = _new_object(Sample)
            sample.__dict__.update(key=key, image=buf[offset - base : offset - base + size], image_ext=image_ext,
                                   error=None, member=member, offset=offset, others=others)
            yield sample


def _shown(name: str, limit: int = 200) -> str:
    """A member name from the tar, quoted for an error message and cut short (names can be 1 MiB long)."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _read_back(f: BinaryIO) -> Optional[Callable[[int, int], bytes]]:
    """How to read bytes [offset, offset+size) of the tar that `f` has already passed, without disturbing the
    forward read: seek and come back on a seekable file; `f.read_range(offset, size)` where the stream has one, a
    ranged read of the same object (prefetch.ReadAhead; s3fetch.ShardReader, of the same version); None for other
    streams."""
    try:
        seekable = bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        seekable = False
    if seekable:
        def read(offset: int, size: int) -> bytes:
            here = f.tell()
            try:
                f.seek(offset)
                return f.read(size)
            finally:
                f.seek(here)
        return read
    read_range = getattr(f, "read_range", None)
    return read_range if callable(read_range) else None


def _check_against_index(shard: str, m: tarstream.Member, entry: Optional["shardindex.IndexMember"]) -> None:
    if entry is None:
        raise shardindex.StaleIndexError(f"{shard}: tar member {m.name!r} at byte {m.data_offset} is not in the index")
    if (entry.offset, entry.size, entry.name) != (m.data_offset, m.size, tarstream.tar_quote(m.name)):
        raise shardindex.StaleIndexError(
            f"{shard}: the index says {entry.name!r} ({entry.size} bytes at byte {entry.offset}), "
            f"the tar has {m.name!r} ({m.size} bytes at byte {m.data_offset})"
        )


def list_shards(url: str, fs: Any) -> list[str]:
    """The `*.tar` files directly under a folder (not recursive), sorted, hidden ones (macOS's `._00000.tar`) left
    out as a run's folder input leaves them (inputs._is_shard). URLs with a protocol come back with it
    (s3://bucket/x/00000.tar); local paths come back as the filesystem gives them (absolute)."""
    paths = sorted(p for p in storage.listed_files(fs, fs.ls(url, detail=True))
                   if p.lower().endswith(".tar") and not posixpath.basename(p).startswith("."))
    if "://" in url:
        paths = [fs.unstrip_protocol(p) for p in paths]
    return paths


def first_keys(tar_url: str, fs: Any, n: int, *, max_members: int = 256) -> list[str]:
    """The keys of a tar's first `n` samples, from its headers only (member data is skipped, seeked past where
    it is large): a look at a shard before any work. Fewer where the tar holds fewer, or is damaged (the keys
    before the damage)."""
    keys: dict[str, None] = {}
    # A small block: the headers of the first samples, not the object store's default 50 MB read-ahead.
    with fs.open(tar_url, "rb", block_size=1 << 20) as f:
        r = tarstream.Reader(f, 64 << 10, allow_seek=True)
        try:
            for i, m in enumerate(tarstream.iter_members(r)):
                if m.typeflag != tarstream.DIRECTORY and has_extension(m.name):  # as iter_samples' samples
                    keys.setdefault(split_member_name(m.name)[0])
                if len(keys) > n or i >= max_members:  # one more key: the n-th sample is whole
                    break
                tarstream.skip_data(r, m)
        except tarstream.TarCorrupt:
            pass
    return list(keys)[:n]


def member_names(tar_url: str, fs: Any) -> Iterator[str]:
    """The names of a tar's members in order, from its headers only (member data is skipped, seeked past where it
    is large), directories and hidden files left out as iter_samples leaves them: a look at a shard before any
    work, read only as far as the caller takes names (close the iterator to stop: the file closes with it). Ends
    at the tar's end or its first damage."""
    with fs.open(tar_url, "rb", block_size=1 << 20) as f:
        r = tarstream.Reader(f, 64 << 10, allow_seek=True)
        try:
            for m in tarstream.iter_members(r):
                if m.typeflag != tarstream.DIRECTORY and not m.name.rsplit("/", 1)[-1].startswith("."):
                    yield m.name
                tarstream.skip_data(r, m)
        except tarstream.TarCorrupt:
            pass


def first_sidecar(tar_url: str, fs: Any, max_members: int = 64, max_size: int = 1 << 20) -> Optional[dict]:
    """The first sample's `.json` member (img2dataset's per-sample metadata: key, url, caption, status; DataComp
    adds uid) among the tar's first `max_members`, as a dict; None where there is none, or it is no JSON object.
    A look before any work: the embedding itself never reads these members."""
    with fs.open(tar_url, "rb", block_size=1 << 20) as f:
        r = tarstream.Reader(f, 64 << 10, allow_seek=True)
        try:
            for i, m in enumerate(tarstream.iter_members(r)):
                if i >= max_members:
                    break
                if (m.typeflag in tarstream.REGULAR and m.size <= max_size
                        and split_member_name(m.name)[1] == "json"):
                    try:
                        doc = json.loads(bytes(tarstream.read_data(r, m)))
                    except ValueError:
                        return None
                    return doc if isinstance(doc, dict) else None
                tarstream.skip_data(r, m)
        except tarstream.TarCorrupt:
            pass
    return None


def index_keys(index: "shardindex.ShardIndex") -> list[str]:
    """The sample keys of the tar that `index` lists, in archive order, from its member names alone (no read of the
    tar). A name the index holds quoted (tar_quote: a backslash or a control character) is left out: its key as the
    tar reader sees it is not spelled in the index; so is one without an extension (no sample's: iter_samples)."""
    columns = index.columns()
    names = columns.names if columns is not None else [m.name for m in index.members()]
    return list(dict.fromkeys(split_member_name(n)[0] for n in names
                              if n.isprintable() and "\\" not in n and has_extension(n)))


def read_rows(parquet_url: str, fs: Any, columns: Optional[Sequence[str]] = None):
    """The shard's img2dataset row table (every input row, failed downloads included); one gone since it was listed
    raises FileNotFoundError naming it. A file that cannot be decoded as parquet (not parquet at all, a truncated
    footer, a damaged page) raises MetadataFileError naming it. Columns of Arrow's view types come back in their
    plain types (output.plain_type: string_view as string). A parquet written as a folder of part files (Spark,
    Dask) reads as its parts' rows in their order (_read_folder_rows).

    The file's bytes are read whole first and decoded from memory: pyarrow says a damaged page with a plain OSError
    ("Couldn't deserialize thrift"), as an I/O error of its source would be said. Read apart, an error fetching the
    bytes (a connection reset: may pass on a retry) stays a store's error, naming the file (storage.read_whole), and
    every error of the decoding is the file's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = storage.read_whole(fs, parquet_url)
    except (FileNotFoundError, IsADirectoryError):
        # a folder reads as one (S3 answers "no such key" for a prefix); else the parquet is gone since it was listed
        listing = _folder_listing(parquet_url, fs)
        if listing is None:
            # Never taken for no parquet: the shard would be written without its rows' columns and failed downloads,
            # keyed as made from them, and found finished once the file is back (a mount that dropped it a while).
            raise FileNotFoundError(errno.ENOENT, "the shard's img2dataset parquet is gone since the run listed it "
                                    "(deleted, moved, or its mount dropped it): the shard is not embedded without "
                                    "its rows; put it back, or remove the shard's tar too, and run again",
                                    parquet_url) from None
        rows = _read_folder_rows(parquet_url, fs, columns, listing)
    else:
        try:
            rows = pq.read_table(pa.BufferReader(raw), columns=list(columns) if columns is not None else None)
        except (pa.ArrowException, OSError) as e:  # "Parquet magic bytes not found", truncated footers, damaged pages
            raise MetadataFileError(f"{parquet_url}: cannot read as parquet: {_said(e)}") from e
    from wdsembed.output import without_view_types

    return without_view_types(rows)  # string_view columns as string: the key join cannot take views


def read_rows_schema(parquet_url: str, fs: Any):
    """The schema of the shard's img2dataset parquet, from its footer (one small read); for a folder of part files,
    their footers' schemas as one (_parts_schema). Store errors and undecodable footers raise as they come (the
    shard's own read says them, read_rows)."""
    import pyarrow.parquet as pq

    try:
        with fs.open(parquet_url, "rb") as f:
            return pq.read_schema(f)
    except Exception:
        # locally IsADirectoryError; s3fs opens a prefix as an empty file, whose footer is missing
        listing = _folder_listing(parquet_url, fs)
        if listing is None:
            raise

    def footer(part: str):
        with fs.open(part, "rb") as f:
            return pq.read_schema(f)

    parts = parquet_parts(parquet_url, fs, listing)
    return _parts_schema(parquet_url, parts, _map_parts(footer, parts))


def parquet_parts(folder: str, fs: Any, listing: Optional[tuple[list[str], dict[str, dict]]] = None) -> list[str]:
    """The part files of a parquet written as a folder (Spark's `part-00000-<uuid>-c000.snappy.parquet`, Dask's
    `part.0.parquet`), in the order their rows go: by name, with numbers by value (Dask's part.10 after part.9;
    pyarrow's own discovery sorts them as text, part.10 before part.2). Names starting with `_` or `.` are what
    the writer leaves beside its parts (`_SUCCESS`, `_committed_*`, `_metadata`, `.crc` checksums) and are left
    out, as pyarrow.dataset's default ignore_prefixes leaves them. MetadataFileError naming the folder where it
    holds no part, or holds parts in subfolders (a partitioned write: its partition values are in the folder
    names, not in the parts, and would be lost). `listing`: the folder's _listed_parts where it was just made."""
    listed, parts = listing if listing is not None else _listed_parts(folder, fs)
    nested = [n for n in parts if "/" in n]
    if nested:
        raise MetadataFileError(f"{folder}: cannot read as parquet: a folder of part files in "
                                f"subfolders ({nested[0]}: a partitioned write), whose partition columns would be "
                                "lost; write the shard's rows as one file, or as part files directly in the folder")
    if not parts:
        held = ", ".join(sorted(listed)[:5]) or "nothing"
        raise MetadataFileError(f"{folder}: cannot read as parquet: a folder with no part files "
                                f"(it holds {held}): a write that did not finish, or was not of a parquet")
    return [f"{folder.rstrip('/')}/{n}" for n in parts]


def parquet_fingerprint(path: str, fs: Any, folder: bool = False) -> str:
    """What identifies one version of a shard's parquet for its cache key: the file's size and mtime or ETag; for a
    folder, those of each of its part files, from one listing (a part rewritten in place leaves the folder's own
    mtime as it was; on S3 a prefix has none), so that a part rewritten, added or removed changes it."""
    if not folder:
        return shardindex.fingerprint(path, fs).token
    _, parts = _listed_parts(path, fs)
    tokens = "\n".join(f"{n} {shardindex._fingerprint_from_info(info).token}" for n, info in parts.items())
    return f"parts-{len(parts)}-" + hashlib.sha256(tokens.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _listed_parts(folder: str, fs: Any, found: Optional[dict[str, dict]] = None
                  ) -> tuple[list[str], dict[str, dict]]:
    """One listing of a parquet folder: the names of every file in it (below it), and those that are parts (no name
    of theirs starting with `_` or `.`) with their listing entries, in their rows' order (parquet_parts). Folder
    markers are no files (storage.is_folder_marker). `found`: the folder's `fs.find` where it was just made."""
    folder = folder.rstrip("/")
    # listed afresh each time, as a long-lived process must (s3fs lists a find past its cache; invalidate_cache would
    # drop the listings of the folders above it too)
    if found is None:
        found = fs.find(folder, withdirs=False, detail=True)
    listed = {p[len(folder) + 1 :]: found[p] for p in storage.listed_files(fs, found.values())
              if p.startswith(folder + "/") and len(p) > len(folder) + 1}
    parts = sorted((n for n in listed if not any(c.startswith(("_", ".")) for c in n.split("/"))), key=_natural_key)
    return list(listed), {n: listed[n] for n in parts}


def _folder_listing(path: str, fs: Any) -> Optional[tuple[list[str], dict[str, dict]]]:
    """`path`'s _listed_parts where it is a folder (objects below it), from a listing made now, else None: fs.isdir
    answers on S3 from s3fs's cached listing of the folder above, which, made before a parquet file was rewritten as
    a folder of part files (in a long-lived process), calls the folder a missing file or the file it was, and its
    rows would be lost. The listing is the one its parts are then taken from (one LIST, not two). A local folder,
    empty or not, is one (no cache there: an empty one is a parquet write that did not finish); on an object store
    so is a folder marker alone (`00000.parquet/`, as the S3 console or a writer makes one before its first part),
    which was taken for no parquet: the shard lost its rows' columns without a word."""
    if storage.is_local(fs):
        return _listed_parts(path, fs) if fs.isdir(path) else None
    folder = path.rstrip("/")
    found = fs.find(folder, withdirs=False, detail=True)
    return _listed_parts(folder, fs, found) if any(p.startswith(folder + "/") for p in found) else None


def _read_folder_rows(folder: str, fs: Any, columns: Optional[Sequence[str]],
                      listing: tuple[list[str], dict[str, dict]]):
    """The rows of a parquet written as a folder: every part's bytes read whole (store errors stay the store's, as
    for a file), then decoded from memory by pyarrow.dataset, part by part in their order, each in the parts'
    common schema (a column a part lacks is null in its rows). A part that is no parquet, or whose schema conflicts
    with the others', raises MetadataFileError naming it."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    parts = parquet_parts(folder, fs, listing)
    raws = _map_parts(lambda part: storage.read_whole(fs, part), parts)
    fmt = ds.ParquetFileFormat()
    fragments = []
    for part, raw in zip(parts, raws):
        try:
            fragment = fmt.make_fragment(pa.BufferReader(raw))
            fragment.physical_schema  # the footer, decoded now to name the part whose footer is damaged
        except (pa.ArrowException, OSError) as e:
            raise _part_error(folder, part, e) from e
        fragments.append(fragment)
    schema = _parts_schema(folder, parts, [f.physical_schema for f in fragments])
    tables = []
    for part, fragment in zip(parts, fragments):
        try:
            tables.append(fragment.to_table(schema=schema, columns=list(columns) if columns is not None else None))
        except (pa.ArrowException, OSError) as e:  # damaged pages, a column asked for that none has
            raise _part_error(folder, part, e) from e
    return pa.concat_tables(tables)


def _parts_schema(folder: str, parts: list[str], schemas: list):
    """The schema the parts of a folder share: each column once, in the first part's order, then those later parts
    add; one part's column of another type than an earlier part's raises MetadataFileError naming both."""
    import pyarrow as pa

    schema = schemas[0]
    for i in range(1, len(parts)):
        try:
            schema = pa.unify_schemas([schema, schemas[i]])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # "Unable to merge: Field key has incompatible types"
            raise MetadataFileError(
                f"{folder}: cannot read as parquet: the schema of its "
                f"part {_part_name(folder, parts[i])} conflicts with that of the parts before it: {_said(e)}") from e
    return schema


def _map_parts(fn: Callable[[str], Any], parts: list[str]) -> list:
    """`fn` of every part, in the parts' order; a few at a time (on an object store each is a request)."""
    from wdsembed.threads import ContextThreadPool

    if len(parts) == 1:
        return [fn(parts[0])]
    with ContextThreadPool(min(8, len(parts))) as pool:
        return list(pool.map(fn, parts))


def _natural_key(name: str) -> list:
    """`part.10` after `part.9`: the runs of digits compared by value (re.split puts them at the odd places)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))]


def _part_name(folder: str, part: str) -> str:
    return part[len(folder.rstrip("/")) + 1 :]


def _part_error(folder: str, part: str, e: BaseException) -> "MetadataFileError":
    return MetadataFileError(f"{folder}: cannot read as parquet: part {_part_name(folder, part)}: {_said(e)}")


def _said(e: BaseException) -> str:
    """pyarrow's message in one line, as shown, without its in-memory source's name (the file is named already)."""
    said = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split())
    return said.replace("Could not open Parquet input source '<Buffer>': ", "")


def read_stats(stats_url: str, fs: Any) -> Optional[dict]:
    """The shard's img2dataset `_stats.json` (written last: a finished-shard marker), or None when absent."""
    if not fs.exists(stats_url):
        return None
    try:
        raw = storage.read_whole(fs, stats_url)
        stats = json.loads(raw)
    except FileNotFoundError:
        return None
    except ValueError as e:  # UnicodeDecodeError too
        if not raw.strip():  # its writer stopped before writing it (img2dataset killed, a full disk)
            raise MetadataFileError(f"{stats_url}: an empty file, not JSON") from e
        raise MetadataFileError(f"{stats_url}: not JSON: {e}") from e
    if not isinstance(stats, dict):
        raise MetadataFileError(f"{stats_url}: expected a JSON object, found {type(stats).__name__}")
    return stats
