"""WebDataset shard layout: member names and keys, streaming sample reads, DALI `.idx` files, img2dataset siblings.

Knows nothing of DALI pipelines, models or Prefect. Reads through file objects, so local files and fsspec
stores (s3://) go through the same code.

Tar headers are parsed here rather than with `tarfile`: `tarfile` seeks per member and is slow, and we need the
exact byte offsets (for DALI's `.idx`) and exact failure positions (for truncated uploads).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, Optional, Sequence

log = logging.getLogger(__name__)

CHUNK_SIZE = 8 << 20  # bytes per read from the underlying file (one S3 range request's worth)
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
IDX_VERSION = "v1.2"

# typeflags: regular file ('0' and old-style NUL); members with no data whatever their size field says
# (links, devices, directories, FIFOs, as tarfile and GNU tar treat them); GNU/pax extended headers.
_REGULAR = (b"0", b"\x00")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_HARD_LINK, _SYMLINK = b"1", b"2"
# members never followed or read: where one is named like an image, its sample gets this reason instead
_NOT_READ = {
    _SYMLINK: "symbolic link member, not followed",
    b"3": "character device member, not read",
    b"4": "block device member, not read",
    b"6": "FIFO member, not read",
}
_GNU_LONGNAME, _GNU_LONGLINK, _PAX, _PAX_GLOBAL = b"L", b"K", b"x", b"g"
_MAX_EXT_HEADER = 1 << 20  # a longname/pax header bigger than this is corruption, not a name


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample as found in a tar: its key and its image bytes, or why it has none."""

    key: str
    # the chosen image member's bytes (a read-only memoryview for members bigger than a read chunk, to avoid a
    # second copy); None when `error` is set
    image: Optional[bytes | memoryview]
    image_ext: Optional[str] = None  # lowercased extension of the chosen member ("jpg")
    error: Optional[str] = None  # e.g. "no image member (found: json, txt)", "duplicate key"
    member: Optional[str] = None  # the chosen image member's name in the tar
    # byte offset of that member's data in the tar (the offset its .idx line has); for a hard link, its target's
    offset: Optional[int] = None


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset rule: key = the name up to the first dot after the last slash (the folder part stays in the
    key); ext = the rest after that dot, lowercased. `a/b.c.jpg` -> (`a/b`, `c.jpg`)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


class ShardReadError(IOError):
    """The tar itself cannot be read past some point; says which shard, where and why."""

    def __init__(self, shard: str, offset: int, reason: str, member: Optional[str] = None,
                 key: Optional[str] = None):
        self.shard, self.offset, self.reason, self.member = shard, offset, reason, member
        self.key = key  # the sample being read when the damage came (iter_samples), if any: it is not yielded
        where = f" (member {member!r})" if member is not None else ""
        super().__init__(f"{shard}: {reason} at byte {offset}{where}")

    def __reduce__(self):  # pickled with its own arguments: it crosses process boundaries (Dask, Prefect results)
        return type(self), (self.shard, self.offset, self.reason, self.member, self.key)


class MalformedShardError(ShardReadError):
    """Not a tar from its first byte (0 bytes, an HTML error page, another format): nothing of the shard can be read.
    Unlike a tar damaged further in, whose intact samples are embedded, such a shard is failed."""


class StaleIndexError(ValueError):
    """An .idx file no longer matches its tar."""


class IndexFormatError(ValueError):
    """An index that the v1.2 text format cannot hold (or text that is not a v1.2 index)."""


class MetadataFileError(ValueError):
    """An img2dataset sibling (.parquet, _stats.json) exists but cannot be read as what it should be."""


# ---------------------------------------------------------------------------------------------------------------
# Low-level tar reading


class _Reader:
    """Sequential reads from a binary file through one bounded buffer, tracking the absolute byte offset.

    Members bigger than the buffer are read straight into their own bytearray, so peak memory is one chunk plus
    the member being returned.
    """

    def __init__(self, f: BinaryIO, chunk_size: int, allow_seek: bool = False):
        self.f = f
        self.chunk_size = max(int(chunk_size), BLOCK)
        self.allow_seek = allow_seek
        self.buf = b""
        self.pos = 0  # next unread byte in buf
        self.offset = 0  # absolute offset of the next unread byte

    def _fill(self) -> None:
        self.buf, self.pos = b"", 0  # drop the old chunk before reading the next: one chunk alive, not two
        self.buf = self.f.read(self.chunk_size) or b""

    def read(self, n: int) -> bytes | bytearray:
        """Up to n bytes; fewer only at end of file."""
        avail = len(self.buf) - self.pos
        if n <= avail:
            out = self.buf[self.pos : self.pos + n]
            self.pos += n
            self.offset += n
            return out
        head = self.buf[self.pos :]
        self.buf, self.pos = b"", 0
        need = n - len(head)
        if need < self.chunk_size:
            parts = [head]
            while need > 0:
                self._fill()
                if not self.buf:
                    break
                take = self.buf[:need]
                self.pos = len(take)
                parts.append(take)
                need -= len(take)
            out = b"".join(parts)
        else:
            # big member: one exact-size buffer, filled in chunk-sized reads (bounded per-request size)
            out = bytearray(n)
            out[: len(head)] = head
            got = len(head)
            del head
            while got < n:
                data = self.f.read(min(self.chunk_size, n - got))
                if not data:
                    break
                out[got : got + len(data)] = data
                got += len(data)
            if got < n:
                del out[got:]
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        """Discard n bytes; returns how many were there (fewer only at end of file)."""
        avail = len(self.buf) - self.pos
        if n <= avail:
            self.pos += n
            self.offset += n
            return n
        self.buf, self.pos = b"", 0
        self.offset += avail
        left = n - avail
        if self.allow_seek and left > self.chunk_size:
            # local files only (build_index): reading gigabytes of image data just to find headers is waste
            cur = self.f.tell()
            end = self.f.seek(0, os.SEEK_END)
            target = min(cur + left, end)
            self.f.seek(target)
            self.offset += target - cur
            return avail + target - cur
        while left > 0:
            self._fill()
            if not self.buf:
                break
            take = min(len(self.buf), left)
            self.pos = take
            self.offset += take
            left -= take
        return n - left


class _Member(NamedTuple):
    name: str
    size: int
    header_offset: int  # offset of the first header block (extended headers included)
    data_offset: int
    typeflag: bytes
    linkname: str = ""  # the target of a hard or symbolic link, as stored (a member name for hard links)


class _TarCorrupt(Exception):
    def __init__(self, offset: int, reason: str, member: Optional[str] = None):
        super().__init__(reason)
        self.offset, self.reason, self.member = offset, reason, member


def _decode_name(raw: bytes) -> str:
    # surrogateescape keeps odd bytes round-trippable (and quotable the way GNU tar prints them)
    return raw.decode("utf-8", "surrogateescape")


def _parse_number(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        if field_[0] == 0xFF:
            raise ValueError("negative number")
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = field_.split(b"\x00", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # tar pads the record area with NULs
            break
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError("bad pax record")
        k, v = record[:-1].split(b"=", 1)
        records[k.decode("utf-8", "replace")] = _decode_name(v)
        pos += length
    return records


def _iter_members(r: _Reader) -> Iterator[_Member]:
    """Yield every member in file order; the caller must consume (read or skip) `member.size` data bytes before
    asking for the next one. Ends at the end-of-archive block; raises _TarCorrupt on damage."""
    longname: Optional[str] = None
    longlink: Optional[str] = None
    pax: dict[str, str] = {}
    first_header: Optional[int] = None
    while True:
        hoff = r.offset
        block = r.read(BLOCK)
        if len(block) == 0:
            raise _TarCorrupt(hoff, "unexpected end of file (no end-of-archive marker: truncated tar?)")
        if len(block) < BLOCK:
            raise _TarCorrupt(hoff, f"unexpected end of file inside a tar header ({len(block)} of 512 bytes)")
        if block == _ZERO_BLOCK:
            if first_header is not None:
                raise _TarCorrupt(hoff, "end-of-archive block right after an extended header")
            return
        stored = block[148:156]
        computed = sum(block[:148]) + sum(block[156:]) + 8 * 32
        try:
            checksum = _parse_number(stored)
        except ValueError:
            checksum = -1
        # some old writers summed signed chars
        signed = computed - 2 * sum(b for b in block if b >= 128) if checksum != computed else computed
        if checksum not in (computed, signed):
            raise _TarCorrupt(hoff, "bad tar header checksum (not a tar, or corrupt)")
        try:
            size = _parse_number(block[124:136])
        except ValueError:
            raise _TarCorrupt(hoff, "bad size field in tar header") from None
        typeflag = block[156:157]
        if first_header is None:
            first_header = hoff

        if typeflag in (_GNU_LONGNAME, _GNU_LONGLINK, _PAX, _PAX_GLOBAL):
            if size > _MAX_EXT_HEADER:
                raise _TarCorrupt(hoff, f"extended header of {size} bytes")
            data = r.read(size)
            if len(data) < size:
                raise _TarCorrupt(hoff, "unexpected end of file inside an extended header")
            if r.skip(-size % BLOCK) < -size % BLOCK:
                raise _TarCorrupt(hoff, "unexpected end of file inside an extended header")
            if typeflag == _GNU_LONGNAME:
                longname = _decode_name(bytes(data).split(b"\x00", 1)[0])
            elif typeflag == _GNU_LONGLINK:
                longlink = _decode_name(bytes(data).split(b"\x00", 1)[0])
            elif typeflag == _PAX:
                try:
                    pax = _parse_pax(bytes(data))
                except ValueError:
                    raise _TarCorrupt(hoff, "bad pax extended header") from None
            continue  # 'g' (global defaults) changes nothing we use

        name_raw = block[:100].split(b"\x00", 1)[0]
        if block[257:263] == b"ustar\x00":  # POSIX ustar: long names are split into prefix/name
            prefix = block[345:500].split(b"\x00", 1)[0]
            if prefix:
                name_raw = prefix + b"/" + name_raw
        name = _decode_name(name_raw)
        if longname is not None:
            name = longname
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise _TarCorrupt(hoff, "bad pax size") from None
        if typeflag == b"\x00" and name.endswith("/"):  # old tars mark directories this way
            typeflag = b"5"
        if typeflag in _NO_DATA:
            size = 0
        if size < 0:
            raise _TarCorrupt(hoff, "negative member size")
        linkname = ""
        if typeflag in (_HARD_LINK, _SYMLINK):
            linkname = pax.get("linkpath") or longlink or _decode_name(block[157:257].split(b"\x00", 1)[0])
        yield _Member(name, size, first_header, hoff + BLOCK, typeflag, linkname)
        longname, longlink, pax, first_header = None, None, {}, None


def _skip_data(r: _Reader, m: _Member) -> None:
    want = m.size + (-m.size % BLOCK)
    if r.skip(want) < want:
        raise _TarCorrupt(m.data_offset, f"unexpected end of file inside member data ({m.size} bytes)", m.name)


def _read_data(r: _Reader, m: _Member) -> bytes | bytearray:
    data = r.read(m.size)
    pad = -m.size % BLOCK
    if len(data) < m.size or r.skip(pad) < pad:
        raise _TarCorrupt(m.data_offset, f"unexpected end of file inside member data ({m.size} bytes)", m.name)
    return data


def _wds2idx_split(name: str) -> tuple[str, str]:
    """wds2idx's own split, quirks kept: a name with no dot in its last part gives (name[:-1], name)."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def _indexed(name: str) -> bool:
    """Does wds2idx put this regular member in the index? It drops hidden files (`.x`, `dir/.x`)."""
    base, _ = _wds2idx_split(name)
    return bool(base) and not base.endswith("/")


# ---------------------------------------------------------------------------------------------------------------
# Samples


def _last_ext(ext: str) -> str:
    return ext.rsplit(".", 1)[-1]


def iter_samples(
    f: BinaryIO,
    *,
    extensions: Sequence[str],
    shard: str,
    index: Optional["ShardIndex"] = None,
    chunk_size: int = CHUNK_SIZE,
    index_builder: Optional["IndexBuilder"] = None,
    on_stale_index: Optional[Callable[["StaleIndexError"], None]] = None,
) -> Iterator[Sample]:
    """Stream the samples of a tar in file order with memory bounded by one read chunk plus one member.

    Consecutive members with one key form a sample; the image is the first member whose lowercased extension
    (the last dot-part) is in `extensions`, tried in that order of preference. A key seen again later in the tar
    yields a Sample with error "duplicate key". With `index`, members are located through it and each member's
    tar header is checked against it; a mismatch raises StaleIndexError. A truncated or corrupt tar raises
    ShardReadError naming `shard` after yielding every sample read intact before the damage.

    `f` must be positioned at the start of the tar; it is read forward, in requests of at most `chunk_size`
    bytes (no seeks, also with an index), except for hard links (below). Hidden files (`.x`, `dir/.x`, which
    wds2idx leaves out of the index), directories, and links, devices and FIFOs not named like an image are
    skipped without ending the current sample.
    A hard link member (legal tar: the same file archived twice) counts as the file it links to, an earlier
    regular member of this tar: its image bytes are that member's, read back from the data offset remembered for
    every regular member (a seek and read where `f` is seekable, a ranged read where `f` is a prefetch.ReadAhead;
    elsewhere the sample gets an error saying so). Only a hard link costs a read back; the map of offsets costs
    about 200 bytes per member, never image bytes. A hard link to a name that is no earlier regular member gets
    an error.
    A symbolic link, device or FIFO member is never followed or read: where it is named like an image and its
    sample has no real image member, the sample gets an error saying so ("symbolic link member, not followed").
    An image member of 0 bytes yields error "empty image member" (DALI's decoder would only say
    "nvImageCodec failure"). The index check is strict: every indexed member must appear in index order with
    the index's name, size and data offset, and the tar may hold no indexable member the index lacks (links are
    not indexed, as wds2idx leaves them out too).
    Memory: one chunk, the member being read and, while a sample has several image members, the best so far.
    `index_builder` receives every member the .idx lists, so that a full pass also yields the shard's index
    (used for shards on object stores, where a separate indexing pass would download the tar twice).
    `on_stale_index`: instead of raising StaleIndexError, call it once and read on without the index (samples
    come from the tar's own headers either way, so a stale index never changes what is read), e.g. to rebuild it.
    """
    rank = {e.lower().lstrip("."): i for i, e in reversed(list(enumerate(extensions)))}
    expected = iter(index.members()) if index is not None else None
    r = _Reader(f, chunk_size)
    seen: set[str] = set()

    targets: dict[str, tuple[int, int]] = {}  # regular member (or resolved hard link) -> (data offset, size)
    read_back = _read_back(f)

    key: Optional[str] = None
    found: list[str] = []
    best: Optional[tuple[int, bytes | bytearray, str, str, int]] = None  # (rank, data, ext, member, offset)
    unread: Optional[str] = None  # why an image-named member of the sample gave no bytes (links, devices)
    duplicate = False

    def finish() -> Sample:
        assert key is not None
        if duplicate:
            return Sample(key, None, error="duplicate key")
        if best is None and unread is not None:
            return Sample(key, None, error=unread)
        if best is None:
            shown = ", ".join(dict.fromkeys(e or "(no extension)" for e in found))
            return Sample(key, None, error=f"no image member (found: {shown})")
        _, data, ext, member, offset = best
        if len(data) == 0:
            return Sample(key, None, image_ext=ext, error="empty image member", member=member, offset=offset)
        if isinstance(data, bytearray):  # a member bigger than a chunk: hand out its buffer, no second copy
            data = memoryview(data).toreadonly()
        return Sample(key, data, image_ext=ext, member=member, offset=offset)

    try:
        for m in _iter_members(r):
            regular = m.typeflag in _REGULAR
            target = None
            if regular:
                targets[m.name] = (m.data_offset, m.size)
            elif m.typeflag == _HARD_LINK:
                target = targets.get(m.linkname)
                if target is not None:
                    targets[m.name] = target  # a link to this link is a link to the same file
            k, ext = split_member_name(m.name)
            mrank = rank.get(_last_ext(ext))
            # Links, devices and FIFOs count only where their name makes them (part of) an image sample; hard links
            # always do (each is a file, like a regular member).
            takes_part = regular or m.typeflag == _HARD_LINK or (m.typeflag in _NOT_READ and mrank is not None)
            if not takes_part or not _indexed(m.name):
                _skip_data(r, m)
                continue
            if regular and index_builder is not None:
                index_builder.add(m.name, m.data_offset, m.size)
            if regular and expected is not None:
                try:
                    _check_against_index(shard, m, next(expected, None))
                except StaleIndexError as stale:
                    if on_stale_index is None:
                        raise
                    on_stale_index(stale)
                    expected = None
            if k != key:
                if key is not None:
                    yield finish()
                key, found, best, unread = k, [], None, None
                duplicate = k in seen
                seen.add(k)
            found.append(ext)
            if duplicate or mrank is None or (best is not None and mrank >= best[0]):
                _skip_data(r, m)
                continue
            if regular:
                best = None  # drop the worse candidate before reading the better one
                best = (mrank, _read_data(r, m), _last_ext(ext), m.name, m.data_offset)
                continue
            _skip_data(r, m)  # links, devices, FIFOs: no data in the tar
            if m.typeflag != _HARD_LINK:
                unread = unread or _NOT_READ[m.typeflag]
            elif target is None:
                unread = unread or f"hard link to {_shown(m.linkname)}, which is no earlier file of this tar"
            elif read_back is None and target[1] > 0:
                unread = unread or (f"hard link to {_shown(m.linkname)}: this stream of the tar cannot read back "
                                    "to that member's data")
            else:
                offset, size = target
                data = read_back(offset, size) if size and read_back else b""
                if len(data) == size:
                    best = None
                    best = (mrank, data, _last_ext(ext), m.name, offset)
                else:  # the file changed under us: this sample's loss, not the shard's
                    unread = unread or (f"hard link to {_shown(m.linkname)}: its data read back as {len(data)} "
                                        f"of {size} bytes")
    except _TarCorrupt as e:
        # The pending sample's image, when it was read whole before the damage, is still good: yield it (its other
        # members may continue past the damage). Otherwise the error names it as lost.
        lost = key
        if key is not None and best is not None and not duplicate:
            lost = None
            yield finish()
        raise ShardReadError(shard, e.offset, e.reason, e.member, key=lost) from None
    if expected is not None:
        left = next(expected, None)
        if left is not None:
            stale = StaleIndexError(f"{shard}: the index lists {left.name!r} at byte {left.offset}, "
                                    "which the tar does not have")
            if on_stale_index is None:
                raise stale
            on_stale_index(stale)
    if key is not None:
        yield finish()


def _shown(name: str, limit: int = 200) -> str:
    """A member name from the tar, quoted for an error message and cut short (names can be 1 MiB long)."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def _read_back(f: BinaryIO) -> Optional[Callable[[int, int], bytes]]:
    """How to read bytes [offset, offset+size) of the tar that `f` has already passed, without disturbing the
    forward read: seek and come back on a seekable file; a ranged read of the same object for prefetch.ReadAhead
    (forward-only, but it names its filesystem and path); None for other streams."""
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
    fs, path = getattr(f, "fs", None), getattr(f, "path", None)
    if fs is not None and isinstance(path, str) and hasattr(fs, "cat_file"):
        return lambda offset, size: fs.cat_file(path, start=offset, end=offset + size)
    return None


def _check_against_index(shard: str, m: _Member, entry: Optional["IndexMember"]) -> None:
    if entry is None:
        raise StaleIndexError(f"{shard}: tar member {m.name!r} at byte {m.data_offset} is not in the index")
    if (entry.offset, entry.size, entry.name) != (m.data_offset, m.size, _tar_quote(m.name)):
        raise StaleIndexError(
            f"{shard}: the index says {entry.name!r} ({entry.size} bytes at byte {entry.offset}), "
            f"the tar has {m.name!r} ({m.size} bytes at byte {m.data_offset})"
        )


# ---------------------------------------------------------------------------------------------------------------
# DALI .idx


class IndexMember(NamedTuple):
    ext: str  # as wds2idx writes it: everything after the first dot of the last path part, case kept
    offset: int  # byte offset of the member's data (a multiple of 512)
    size: int
    name: str  # member name as GNU tar prints it (backslashes and control characters escaped)


@dataclass(frozen=True)
class ShardIndex:
    """A parsed DALI `.idx` (format v1.2)."""

    samples: tuple  # per sample: tuple of IndexMember(ext, data_offset, size, member_name)
    path: Optional[str] = field(default=None, compare=False)  # where ensure_index read or wrote it

    @classmethod
    def parse(cls, text: str) -> "ShardIndex":
        lines = text.split("\n")
        if lines[-1] == "":  # the final newline
            lines.pop()
        head = lines[0].split() if lines else []
        if len(head) != 2 or head[0] != IDX_VERSION or not head[1].isdigit():
            first = lines[0][:80] if lines else ""
            raise IndexFormatError(f"not a {IDX_VERSION} index: first line is {first!r}")
        n = int(head[1])
        body = lines[1:]
        if len(body) != n:
            raise IndexFormatError(f"index header says {n} samples, the body has {len(body)} lines")
        samples = []
        for i, line in enumerate(body, start=2):
            tok = line.split()
            if not tok or len(tok) % 4:
                raise IndexFormatError(
                    f"index line {i}: {len(tok)} fields, not groups of 4 (ext offset size name); "
                    "a member name with whitespace breaks the v1.2 format"
                )
            group = []
            for j in range(0, len(tok), 4):
                ext, off, size, name = tok[j : j + 4]
                if not (off.isdigit() and size.isdigit()):
                    raise IndexFormatError(f"index line {i}: offset/size {off!r} {size!r} are not integers")
                group.append(IndexMember(ext, int(off), int(size), name))
            samples.append(tuple(group))
        return cls(tuple(samples))

    def render(self) -> str:
        """The file's text, byte for byte what DALI's wds2idx writes."""
        out = [f"{IDX_VERSION} {len(self.samples)}\n"]
        for group in self.samples:
            for m in group:
                if not m.name or any(c.isspace() for c in m.name + m.ext):
                    raise IndexFormatError(
                        f"member {m.name!r}: a name with whitespace cannot be written to a v1.2 .idx "
                        "(wds2idx writes it anyway and DALI then misreads the line); read this shard without an index"
                    )
            out.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in group) + "\n")
        return "".join(out)

    def members(self) -> Iterator[IndexMember]:
        for group in self.samples:
            yield from group

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def end(self) -> int:
        """Byte offset just past the last member's data (0 for an empty index)."""
        return max((m.offset + m.size for m in self.members()), default=0)


_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", "\\": "\\\\"}


def _tar_quote(name: str) -> str:
    """A member name as GNU tar lists it (its default 'escape' quoting in a UTF-8 locale), which is what wds2idx
    copies into the index. Plain names come back unchanged."""
    if name.isprintable() and "\\" not in name:
        return name
    out = []
    for c in name:
        if c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        elif "\udc80" <= c <= "\udcff":  # a byte that was not UTF-8
            out.append("\\%03o" % (ord(c) - 0xDC00))
        elif not c.isprintable() and c != " ":
            out.extend("\\%03o" % b for b in c.encode("utf-8", "surrogateescape"))
        else:
            out.append(c)
    return "".join(out)


def build_index(f: BinaryIO, *, chunk_size: int = CHUNK_SIZE, allow_seek: bool = False) -> ShardIndex:
    """Scan a tar once and build its index, as wds2idx does.

    Same members (regular files, hidden files left out), same grouping (consecutive members with wds2idx's
    basename), same text. One deliberate difference: offsets are the true data offsets read from the headers;
    wds2idx takes `tar --block-number`, which points at a GNU longname ('L') header rather than the member, so its
    offsets are wrong for names longer than 100 bytes in GNU-format tars. `allow_seek` skips member data by
    seeking (worth it for local files only; on object stores a seek is a new request).
    """
    r = _Reader(f, chunk_size, allow_seek=allow_seek)
    builder = IndexBuilder()
    try:
        for m in _iter_members(r):
            _skip_data(r, m)
            if m.typeflag not in _REGULAR or not _indexed(m.name):
                continue
            builder.add(m.name, m.data_offset, m.size)
    except _TarCorrupt as e:
        raise ShardReadError(getattr(f, "name", "<tar>"), e.offset, e.reason, e.member) from None
    return builder.index()


class IndexBuilder:
    """Groups indexed members into samples the way wds2idx does; fed by build_index or by iter_samples."""

    def __init__(self) -> None:
        self._samples: list[list[IndexMember]] = []
        self._last_base: Optional[str] = None

    def add(self, name: str, data_offset: int, size: int) -> None:
        quoted = _tar_quote(name)
        base, ext = _wds2idx_split(quoted)
        entry = IndexMember(ext, data_offset, size, quoted)
        if base != self._last_base:
            self._samples.append([entry])
            self._last_base = base
        else:
            self._samples[-1].append(entry)

    def index(self) -> ShardIndex:
        return ShardIndex(tuple(tuple(g) for g in self._samples))


# ---------------------------------------------------------------------------------------------------------------
# Shard files on a filesystem (local or fsspec)


@dataclass(frozen=True)
class ShardFingerprint:
    """What identifies one version of a shard for cache keys: its size and its mtime or ETag."""

    size: int
    mtime: Optional[float] = None  # seconds since the epoch, where the store has it
    etag: Optional[str] = None  # object stores' content tag (S3 ETag, GCS md5), quotes stripped

    @property
    def token(self) -> str:
        """A short stable string for cache keys."""
        return f"{self.size}-{self.etag or ''}-{'' if self.mtime is None else repr(float(self.mtime))}"


def _fingerprint_from_info(info: dict[str, Any]) -> ShardFingerprint:
    mtime: Any = None
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(k) is not None:
            mtime = info[k]
            break
    if isinstance(mtime, _dt.datetime):
        mtime = mtime.timestamp()
    elif isinstance(mtime, str):
        try:
            mtime = _dt.datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
        except ValueError:
            mtime = None
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return ShardFingerprint(
        size=int(info["size"]),
        mtime=None if mtime is None else float(mtime),
        etag=None if etag is None else str(etag).strip('"'),
    )


def fingerprint(path: str, fs: Any) -> ShardFingerprint:
    """(size, mtime or ETag) of a shard, from one `fs.info` call."""
    return _fingerprint_from_info(fs.info(path))


def list_shards(url: str, fs: Any) -> list[str]:
    """The `*.tar` files directly under a folder (not recursive), sorted. URLs with a protocol come back with it
    (s3://bucket/x/00000.tar); local paths come back as the filesystem gives them (absolute)."""
    entries = fs.ls(url, detail=True)
    paths = sorted(
        e["name"] for e in entries if e.get("type") == "file" and e["name"].lower().endswith(".tar")
    )
    if "://" in url:
        paths = [fs.unstrip_protocol(p) for p in paths]
    return paths


def _stem_path(shard_path: str) -> str:
    return shard_path[:-4] if shard_path.lower().endswith(".tar") else shard_path


def parquet_path_for(shard_path: str) -> str:
    """img2dataset's row table beside the shard: 00000.tar -> 00000.parquet."""
    return _stem_path(shard_path) + ".parquet"


def stats_path_for(shard_path: str) -> str:
    """img2dataset's finished-shard marker beside the shard: 00000.tar -> 00000_stats.json."""
    return _stem_path(shard_path) + "_stats.json"


def index_path_for(
    shard_path: str, cache_dir: Optional[str | os.PathLike] = None, fp: Optional[ShardFingerprint] = None
) -> str:
    """Where a shard's `.idx` lives: beside it (`00000.tar` -> `00000.idx`) when `cache_dir` is None; else a file
    under `cache_dir` named from the shard's URL + size + mtime/ETag (`fp`), so a changed shard gets a new one."""
    if cache_dir is None:
        return _stem_path(shard_path) + ".idx"
    if fp is None:
        raise TypeError("index_path_for: a cache path needs the shard's fingerprint")
    digest = hashlib.sha256(f"{shard_path}\x00{fp.token}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    stem = os.path.basename(_stem_path(shard_path.rstrip("/"))) or "shard"
    return os.path.join(os.fspath(cache_dir), f"{stem}-{digest}.idx")


def _is_local(fs: Any) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in proto or "local" in proto


def _header_matches(block: bytes, entry: IndexMember) -> bool:
    """Cheap check of the 512-byte header in front of an indexed member (checksum, type, size, name)."""
    if len(block) != BLOCK or block == _ZERO_BLOCK:
        return False
    try:
        if _parse_number(block[148:156]) != sum(block[:148]) + sum(block[156:]) + 8 * 32:
            return False
        size = _parse_number(block[124:136])
    except ValueError:
        return False
    if block[156:157] not in _REGULAR or size != entry.size:
        return False
    name_raw = block[:100].split(b"\x00", 1)[0]
    if block[257:263] == b"ustar\x00":
        prefix = block[345:500].split(b"\x00", 1)[0]
        if prefix:
            name_raw = prefix + b"/" + name_raw
    name = _tar_quote(_decode_name(name_raw))
    if name == entry.name:
        return True
    # long or non-ASCII names live in an extended header before this one; the ustar field holds a truncation
    return len(entry.name.encode("utf-8", "surrogateescape")) > 100 or not entry.name.isascii()


def _load_valid_index(
    idx_fs: Any, idx_path: str, shard_fs: Any, shard_path: str, shard_size: int
) -> Optional[ShardIndex]:
    """The index at `idx_path` if it exists and still fits the shard, else None (missing, unreadable or stale).

    Cheap (two 512-byte reads): the last member must end inside the tar, its header must be where the index
    says, and no indexable member may follow it (a tar rewritten with more samples appended)."""
    try:
        if not idx_fs.exists(idx_path):
            return None
        idx = ShardIndex.parse(idx_fs.cat_file(idx_path).decode("utf-8", "surrogateescape"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable index %s: %s", idx_path, e)
        return None
    if idx.num_samples == 0:
        return dataclasses.replace(idx, path=idx_path)
    last = max(idx.members(), key=lambda m: m.offset)
    if last.offset < BLOCK or last.offset % BLOCK or last.offset + last.size > shard_size:
        log.info("stale index %s: last member ends at byte %d, shard has %d bytes", idx_path, idx.end, shard_size)
        return None
    after = last.offset + last.size + (-last.size % BLOCK)
    # two ranged reads of 512 bytes (an fsspec file on an object store would fetch a whole block per seek)
    block = shard_fs.cat_file(shard_path, start=last.offset - BLOCK, end=last.offset)
    next_block = shard_fs.cat_file(shard_path, start=after, end=min(after + BLOCK, shard_size)) if after < shard_size else b""
    if not _header_matches(block, last):
        log.info("stale index %s: no header for %r at byte %d", idx_path, last.name, last.offset - BLOCK)
        return None
    if _starts_indexed_member(next_block):
        log.info("stale index %s: the tar has members after the last indexed one (byte %d)", idx_path, after)
        return None
    return dataclasses.replace(idx, path=idx_path)


def _starts_indexed_member(block: bytes) -> bool:
    """Is this block the header of a member wds2idx would index (i.e. one an index ending before it lacks)?
    Zero blocks (end of archive), end of file, directories and hidden files are not."""
    if len(block) != BLOCK or block == _ZERO_BLOCK:
        return False
    try:
        if _parse_number(block[148:156]) != sum(block[:148]) + sum(block[156:]) + 8 * 32:
            return False
    except ValueError:
        return False
    typeflag = block[156:157]
    if typeflag in (_GNU_LONGNAME, _PAX):
        return True  # extended headers precede a real member; assume it is one (worst case: a needless rebuild)
    name = _decode_name(block[:100].split(b"\x00", 1)[0])
    return typeflag in _REGULAR and not name.endswith("/") and _indexed(name)


def _write_beside(fs: Any, path: str, data: bytes) -> None:
    """Atomic write through fsspec. Object stores: one PUT, which is atomic per object (a temp object + mv would
    be a copy and a delete). Elsewhere: a temp name beside the target, then a rename. The failing write is how an
    unwritable folder or bucket shows itself (PermissionError, also from s3fs for AccessDenied)."""
    if not _is_local(fs):
        fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
        return
    folder, base = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f"{folder}/.{base}.{uuid.uuid4().hex[:12]}.tmp" if folder else f".{base}.{uuid.uuid4().hex[:12]}.tmp"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except OSError:
            pass
        raise


def _write_local_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".idx-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def ensure_index(
    shard_path_or_url: str, fs: Any, cache_dir: Optional[str | os.PathLike] = None, *, build: bool = True
) -> Optional[ShardIndex]:
    """The shard's DALI index, read or built, with `.path` saying where its file is.

    Order: `<stem>.idx` beside the shard if it still fits the tar (the last member must end inside the tar and
    its header must be there); else a copy under `cache_dir` for this exact shard version; else build it by
    reading the tar once and write it beside the shard (temp file + rename; one PUT on object stores), or under
    `cache_dir` when the shard's folder refuses writes. With no `cache_dir` and an unwritable folder the index is
    returned with `path=None`. With `build=False` a missing index gives None instead of a read of the tar (the
    caller builds it during its own pass: iter_samples(index_builder=...) and save_index). Raises
    IndexFormatError for shards whose member names the v1.2 format cannot hold (whitespace), ShardReadError for
    a damaged tar. An empty tar gives an index of 0 samples (wds2idx refuses those).
    For an s3:// shard the returned path may be an s3:// URL: DALI reads index files from local paths only.
    """
    shard = shard_path_or_url
    fp = fingerprint(shard, fs)
    beside = index_path_for(shard)
    idx = _load_valid_index(fs, beside, fs, shard, fp.size)
    if idx is not None:
        return idx
    cached = _cache_path(shard, fs, cache_dir, fp)
    if cached is not None:
        import fsspec

        idx = _load_valid_index(fsspec.filesystem("file"), cached, fs, shard, fp.size)
        if idx is not None:
            return idx
    if not build:
        return None

    if _is_local(fs):
        opened = fs.open(shard, "rb")
    else:
        from wdsembed.storage import open_sequential  # read-ahead of large ranges, several in flight

        opened = open_sequential(fs, shard, size=fp.size)
    with opened as f:
        try:
            idx = build_index(f, allow_seek=_is_local(fs))
        except ShardReadError as e:
            raise ShardReadError(shard, e.offset, e.reason, e.member) from None
    return save_index(shard, fs, idx, cache_dir, fp)


def _cache_path(shard: str, fs: Any, cache_dir: Optional[str | os.PathLike], fp: ShardFingerprint) -> Optional[str]:
    if cache_dir is None:
        return None
    # named from the shard's full URL (s3://bucket/...), so shards of two stores never share an entry
    url = os.path.abspath(shard) if _is_local(fs) else (shard if "://" in shard else fs.unstrip_protocol(shard))
    return index_path_for(url, cache_dir, fp)


def save_index(
    shard: str,
    fs: Any,
    idx: ShardIndex,
    cache_dir: Optional[str | os.PathLike] = None,
    fp: Optional[ShardFingerprint] = None,
) -> ShardIndex:
    """Store a freshly built index beside the shard (written back to the bucket where it allows writes), else
    under `cache_dir`; returns it with `.path` set (None where neither could take it)."""
    data = idx.render().encode("utf-8", "surrogateescape")
    beside = index_path_for(shard)
    try:
        _write_beside(fs, beside, data)
        return dataclasses.replace(idx, path=beside)
    except OSError as e:  # PermissionError locally and from s3fs (AccessDenied); read-only file systems
        log.info("cannot write %s (%s); using the index cache", beside, e)
    cached = _cache_path(shard, fs, cache_dir, fp or fingerprint(shard, fs))
    if cached is None:
        return idx
    _write_local_atomic(cached, data)
    return dataclasses.replace(idx, path=cached)


# ---------------------------------------------------------------------------------------------------------------
# img2dataset siblings


def read_rows(parquet_url: str, fs: Any, columns: Optional[Sequence[str]] = None):
    """The shard's img2dataset row table (every input row, failed downloads included), or None when there is no
    parquet. A file that is not parquet raises MetadataFileError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not fs.exists(parquet_url):
        return None
    try:
        with fs.open(parquet_url, "rb") as f:
            return pq.read_table(f, columns=list(columns) if columns is not None else None)
    except pa.ArrowException as e:  # ArrowInvalid: "Parquet magic bytes not found", truncated footers
        raise MetadataFileError(f"{parquet_url}: cannot read as parquet: {e}") from e


def read_stats(stats_url: str, fs: Any) -> Optional[dict]:
    """The shard's img2dataset `_stats.json` (written last: a finished-shard marker), or None when absent."""
    if not fs.exists(stats_url):
        return None
    try:
        raw = fs.cat_file(stats_url)
        stats = json.loads(raw)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise MetadataFileError(f"{stats_url}: not JSON: {e}") from e
    if not isinstance(stats, dict):
        raise MetadataFileError(f"{stats_url}: expected a JSON object, found {type(stats).__name__}")
    return stats
