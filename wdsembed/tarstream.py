"""The tar format, read as a stream: member headers (ustar, GNU long names, pax), their data, and exact byte offsets.

Parsed here rather than with `tarfile`: `tarfile` seeks per member and is slow, and the callers need the exact byte
offsets (for DALI's `.idx`) and exact failure positions (for truncated uploads). Reads through any file object, so
local files and fsspec stores (s3://) go through the same code. Also: many headers checked at once against the
names and sizes an index gives (NumPy), for reads that know where each member is.
"""
from __future__ import annotations

import os
import zlib
from typing import BinaryIO, Iterator, NamedTuple, Optional

import numpy as np

CHUNK_SIZE = 8 << 20  # bytes per read from the underlying file (one S3 range request's worth)


BLOCK = 512


ZERO_BLOCK = bytes(BLOCK)


# typeflags: regular file ('0', old-style NUL, and '7', a contiguous file, which tarfile and GNU tar read as a
# regular one); members with no data whatever their size field says (links, devices, directories, FIFOs, as tarfile
# and GNU tar treat them); GNU/pax extended headers.
REGULAR = (b"0", b"\x00", b"7")


NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


HARD_LINK, SYMLINK = b"1", b"2"
DIRECTORY = b"5"


# A GNU sparse file (tar --sparse): the old GNU format's typeflag, and the typeflag iter_members gives a pax member
# whose GNU.sparse.* records mark it as one (its header says '0'). Its data is the file with the holes left out
# (pax 1.0: after a map of them), never the file itself.
SPARSE = b"S"


# members never followed or read: where one is named like an image, its sample gets this reason instead
NOT_READ = {
    SYMLINK: "symbolic link member, not followed",
    b"3": "character device member, not read",
    b"4": "block device member, not read",
    b"6": "FIFO member, not read",
    SPARSE: "sparse file member (GNU tar --sparse), not read",
}


GNU_LONGNAME, GNU_LONGLINK, PAX, PAX_GLOBAL = b"L", b"K", b"x", b"g"


MAX_EXT_HEADER = 1 << 20  # a longname/pax header bigger than this is corruption, not a name


# The most a damaged part is read past by (next_header), and looked past after the end-of-archive blocks
# (iter_members): the member a damaged header's own size says it heads, held in memory (as a member being read is)
# until its end checks out (a bigger one is passed unread, never scanned); or the blocks scanned for the next
# header (about 1 ms a MiB, the magic compared first). More than an image member of a WebDataset shard is, since a
# scan passes the rest of the member whose header was lost; a bound on memory and on what a damaged region or a
# file that is no tar costs. Past it, the read ends at the damage (the rest is reported lost), and what follows a
# tar's end is not looked at.
RESYNC_LIMIT = 64 << 20


class ShardReadError(IOError):
    """The tar itself cannot be read past some point; says which shard, where and why. `resumed`: where a damaged
    header was read past (iter_samples' on_damage), the offset of the next intact header, at which reading went on;
    None where the damage ended the read."""

    def __init__(self, shard: str, offset: int, reason: str, member: Optional[str] = None,
                 key: Optional[str] = None, resumed: Optional[int] = None):
        self.shard, self.offset, self.reason, self.member = shard, offset, reason, member
        self.key = key  # the sample being read when the damage came (iter_samples), if any: it is not yielded
        self.resumed = resumed
        where = f" (member {member!r})" if member is not None else ""
        super().__init__(f"{shard}: {describe_damage(offset, reason, resumed)}{where}")

    def __reduce__(self):  # pickled with its own arguments: it crosses process boundaries (Dask, Prefect results)
        return type(self), (self.shard, self.offset, self.reason, self.member, self.key, self.resumed)


def describe_damage(offset: int, reason: str, resumed: Optional[int] = None) -> str:
    """'<reason> at byte <offset>', and where reading went on past it, if it did."""
    return f"{reason} at byte {offset}" + (f", read on from the next header at byte {resumed}" if resumed is not None
                                           else "")


class MalformedShardError(ShardReadError):
    """Not a tar from its first byte (0 bytes, an HTML error page, another format): nothing of the shard can be read.
    Unlike a tar damaged further in, whose intact samples are embedded, such a shard is failed."""


class Reader:
    """Sequential reads from a binary file through one bounded buffer, tracking the absolute byte offset.

    Members bigger than the buffer are read straight into their own bytearray, so peak memory is one chunk plus
    the member being returned. `buffered`: bytes already read from `f` that come first (they start at absolute
    offset `offset`), for a reader that takes over from another one (`magic`: that of the headers it read).
    """

    def __init__(self, f: BinaryIO, chunk_size: int, allow_seek: bool = False, *, buffered: bytes = b"",
                 offset: int = 0, magic: Optional[bytes] = None):
        self.f = f
        self.chunk_size = max(int(chunk_size), BLOCK)
        self.allow_seek = allow_seek
        self.buf = buffered
        self.pos = 0  # next unread byte in buf
        self.offset = offset  # absolute offset of the next unread byte
        # bytes 257-265 (magic and version) of the tar's first intact header (iter_members): every header of a tar
        # carries the same, and a header found past damage must too (next_header)
        self.magic: Optional[bytes] = magic

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
            # big member: one buffer, filled in chunk-sized reads (bounded per-request size) and grown as the bytes
            # come, never sized from `n` up front: a header (or pax `size`) may claim gigabytes that a crafted or
            # truncated tar of a few KB does not hold, and a buffer of that size would be allocated and zeroed.
            out = bytearray(head)
            del head
            while len(out) < n:
                data = self.f.read(min(self.chunk_size, n - len(out)))
                if not data:
                    break
                out += data
        self.offset += len(out)
        return out

    def unread(self, data: bytes | bytearray) -> None:
        """Put back the bytes just read, to be read again next."""
        if self.pos >= len(data):  # they came whole from the buffer, which still holds them
            self.pos -= len(data)
        else:
            self.buf, self.pos = bytes(data) + self.buf[self.pos :], 0
        self.offset -= len(data)

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


class Member(NamedTuple):
    name: str
    size: int
    header_offset: int  # offset of the first header block (extended headers included)
    data_offset: int
    typeflag: bytes
    linkname: str = ""  # the target of a hard or symbolic link, as stored (a member name for hard links)


class TarCorrupt(Exception):
    def __init__(self, offset: int, reason: str, member: Optional[str] = None):
        super().__init__(reason)
        self.offset, self.reason, self.member = offset, reason, member


class BadHeader(TarCorrupt):
    """A header that cannot be read (its checksum, its size, an extended header's records, zero blocks where it
    should be), with bytes after it: unlike the end of the file, such damage may spare the members after it
    (next_header finds the next one). `header`: the block, where its checksum failed (its size field may still be
    right)."""

    def __init__(self, offset: int, reason: str, member: Optional[str] = None, header: Optional[bytes] = None):
        super().__init__(offset, reason, member)
        self.header = header


def decode_name(raw: bytes) -> str:
    # surrogateescape keeps odd bytes round-trippable (and quotable the way GNU tar prints them)
    return raw.decode("utf-8", "surrogateescape")


def checksum_held(block: bytes | bytearray) -> bool:
    """Does this 512-byte block hold the checksum of its own bytes, as a tar header does? The field counts as eight
    spaces; some old writers summed signed chars."""
    stored = block[148:156]
    computed = byte_sum(block) - sum(stored) + 8 * 32
    try:
        checksum = parse_number(stored)
    except ValueError:
        return False
    return checksum == computed or checksum == computed - 2 * sum(b for b in block if b >= 128)


def next_header(r: Reader, damage: BadHeader) -> int:
    """After `damage`, with `r` right after the damaged block(s): leave `r` at the next header of this tar (or the
    archive's end) and return its offset, or raise `damage` where reading cannot go on past it.

    A header whose checksum failed but that still reads as one of this tar's (its magic the tar's, its size field
    octal digits) is trusted for its size first: the member it heads is passed (lost: its name may be the damaged
    part), and reading goes on right after it where the member ends there (_ends_member: a header of this tar, or
    the archive's end). Unlike a scan, that does not stop inside the member's data, which may hold anything, a tar
    of the same format too. A member of up to RESYNC_LIMIT bytes is held until that checks out, so that a scan can
    go over it where it does not; a bigger one is passed unread (memory stays bounded), and where it does not end
    there, the scan starts after it: its bytes are lost with it. Otherwise (no such end there, the size unreadable,
    a zeroed header, garbage over several members) the blocks after the damaged header are passed one by one to the
    first header of this tar (find_header), as GNU tar does. Left: where the size field is damaged too (unreadable,
    or read wrong) and the member is a tar of the same format, its headers may be taken for the shard's. No scan
    where nothing of a tar has been read yet and the damaged block is no header at all (a .tar that is a gzip
    stream, an HTML page): that file is refused at once. A scan gives up after RESYNC_LIMIT bytes."""
    header = damage.header
    if header is not None:
        size = _size_still_said(header, r.magic)
        if size is not None:
            magic = r.magic or header[257:265]
            span = size + (-size % BLOCK)
            if span <= RESYNC_LIMIT:
                data = r.read(span + 2 * BLOCK)
                if len(data) >= span and _ends_member(data[span:], magic):
                    r.unread(data[span:])
                    return r.offset
                r.unread(data)  # it does not end there (its size is wrong too, or that header is damaged): scan
            else:  # too big to hold: passed unread, and where it does not end there, scanned on from after it
                passed = r.skip(span)
                after = r.read(2 * BLOCK)
                r.unread(after)
                if passed == span and _ends_member(after, magic):
                    return r.offset
        if r.magic is None:  # the file's first block is no header: it may be no tar at all, which a scan reads whole
            raise damage
    start = r.offset
    at = find_header(r)
    if at is not None:
        return at
    if r.offset - start < RESYNC_LIMIT:  # the end of the file
        raise damage
    raise TarCorrupt(damage.offset, f"{damage.reason}; no tar header in the {RESYNC_LIMIT >> 20} MiB after it",
                     damage.member)


def _ends_member(after: bytes | bytearray, magic: bytes) -> bool:
    """Do these bytes (the two blocks after a member's data, fewer at the end of the file) show that the member ends
    there: a header of this tar, or the archive's end (zero blocks, padding, the end of the file)? One zero block
    with other bytes after it is no end (a zeroed header, or zeros inside a member's data, where a wrong size may
    land)."""
    if len(after) >= BLOCK and _of_this_tar(after[:BLOCK], magic):
        return True
    return after == bytes(len(after))


def find_header(r: Reader) -> Optional[int]:
    """Pass the blocks from `r`'s position (a block boundary) to the first header of this tar (_of_this_tar), leave
    `r` at it and return its offset; None at the end of the file or after RESYNC_LIMIT bytes without one. Forward
    only, through the reader's own bounded buffer."""
    magic = r.magic
    stop = r.offset + RESYNC_LIMIT
    while r.offset < stop:
        block = r.read(BLOCK)
        if len(block) < BLOCK:
            return None
        if _of_this_tar(block, magic):
            r.unread(block)
            return r.offset
    return None


def _past_zeros(r: Reader) -> Optional[bytes | bytearray]:
    """Pass the zero blocks from `r`'s position and return the first other block (read: the caller puts it back);
    None at the end of the file or after RESYNC_LIMIT bytes of zeros."""
    stop = r.offset + RESYNC_LIMIT
    while r.offset < stop:
        block = r.read(BLOCK)
        if len(block) < BLOCK:
            return None
        if block != ZERO_BLOCK:
            return block
    return None


def _of_this_tar(block: bytes | bytearray, magic: Optional[bytes]) -> bool:
    """Is this block a header of the tar whose headers carry `magic`: its checksum held (_carries_magic)?"""
    return _carries_magic(block, magic) and block != ZERO_BLOCK and checksum_held(block)


def _carries_magic(block: bytes | bytearray, magic: Optional[bytes]) -> bool:
    """Does this block carry `magic` (bytes 257-265, a tar's magic and version), or, where no header of the tar was
    read (None), a ustar magic (as GNU tar, bsdtar and Python's tarfile write)?"""
    own = block[257:265]
    return own == magic if magic is not None else own[:5] == b"ustar"


def _size_still_said(header: bytes, magic: Optional[bytes]) -> Optional[int]:
    """The size a header whose checksum failed says, where it still reads as a header of this tar: its magic the
    tar's (a ustar magic, where no header of the tar was read), its size field octal digits (leading spaces, then
    NULs or spaces after, as writers pad it). None otherwise: a size worth nothing."""
    if not _carries_magic(header, magic):
        return None
    digits = header[124:136].lstrip(b" ").rstrip(b"\x00 ")
    if not digits or digits.translate(None, b"01234567"):
        return None
    return int(digits, 8)


def byte_sum(block: bytes) -> int:
    """The sum of a 512-byte header's bytes, in C: adler32 keeps the sum of its bytes modulo 65,521 in its low 16
    bits, which is exact for 256 bytes (at most 65,280). A third of sum()'s time, for every member of a shard."""
    return (zlib.adler32(block[:256], 0) & 0xFFFF) + (zlib.adler32(block[256:], 0) & 0xFFFF)


def parse_number(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        if field_[0] == 0xFF:
            raise ValueError("negative number")
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    try:  # the usual field: octal digits, then NULs or spaces
        return int(field_.rstrip(b"\x00 "), 8)
    except ValueError:  # empty, or more after a NUL (ignored, as tar does)
        pass
    text = field_.split(b"\x00", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def parse_pax(data: bytes) -> dict[str, str]:
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
        records[k.decode("utf-8", "replace")] = decode_name(v)
        pos += length
    return records


SPARSE_RECORD = "GNU.sparse."


def marks_sparse(records: dict[str, str]) -> bool:
    """Do these pax records make their member a GNU sparse file (formats 0.0, 0.1 and 1.0 all write GNU.sparse.*
    records)? Any such record counts: the stored bytes are then not the file."""
    return any(k.startswith(SPARSE_RECORD) for k in records)


def iter_members(r: Reader) -> Iterator[Member]:
    """Yield every member in file order; the caller must consume (read or skip) `member.size` data bytes before
    asking for the next one. Ends at the end-of-archive blocks, unless more of this tar follows them (tars
    concatenated are read as one); raises TarCorrupt on damage (BadHeader, leaving `r` after the damaged block or,
    for zero blocks with other bytes and then headers of the tar after them, at the first such header).

    A GNU sparse file comes out with typeflag SPARSE, under its own name (pax: GNU.sparse.name, not the
    `GNUSparseFile.NNN/` one of the header), its size the bytes stored (which the caller skips like any other
    member's); the old GNU format's extension blocks of the sparse map are passed here."""
    longname: Optional[str] = None
    longlink: Optional[str] = None
    pax: dict[str, str] = {}
    first_header: Optional[int] = None
    magic = r.magic
    while True:
        hoff = r.offset
        block = r.read(BLOCK)
        if len(block) == 0:
            raise TarCorrupt(hoff, "unexpected end of file (no end-of-archive marker: truncated tar?)")
        if len(block) < BLOCK:
            raise TarCorrupt(hoff, f"unexpected end of file inside a tar header ({len(block)} of 512 bytes)")
        if block == ZERO_BLOCK:
            if first_header is not None:
                raise BadHeader(hoff, "end-of-archive block right after an extended header")
            after = r.read(BLOCK)  # the end of the archive is two zero blocks: one alone is a header zeroed
            if len(after) == BLOCK and after != ZERO_BLOCK:
                r.unread(after)
                raise BadHeader(hoff, "a lone zero block where a tar header should be")
            # Two or more zero blocks are the end of the archive, unless a header of this tar comes after them.
            # Right after zeros (padding), it starts another tar appended to this one (`cat a.tar b.tar`): its
            # members are read on as this tar's, no damage. After other bytes (the rest of a member whose header a
            # zeroed page took), the zeros are damage, read past to it. Looked for to the end of the file (a healthy
            # tar's padding: a record, 10 KiB, at most) or for RESYNC_LIMIT bytes; bytes after a tar's end that
            # hold no header of it (garbage) are not part of it.
            if len(after) == BLOCK:
                block = _past_zeros(r)
                if block is not None:
                    r.unread(block)
                    if _of_this_tar(block, r.magic):
                        continue
                    if find_header(r) is not None:
                        raise BadHeader(hoff, "zero blocks where a tar header should be (tar headers follow them)")
            return
        if not checksum_held(block):
            raise BadHeader(hoff, "bad tar header checksum (not a tar, or corrupt)", header=bytes(block))
        if magic is None:  # the first header: the others of this tar carry its magic too (next_header)
            magic = r.magic = bytes(block[257:265])
        try:
            size = parse_number(block[124:136])
        except ValueError:
            raise BadHeader(hoff, "bad size field in tar header") from None
        typeflag = block[156:157]
        if first_header is None:
            first_header = hoff

        if typeflag in (GNU_LONGNAME, GNU_LONGLINK, PAX, PAX_GLOBAL):
            if size > MAX_EXT_HEADER:
                raise BadHeader(hoff, f"extended header of {size} bytes")
            data = r.read(size)
            if len(data) < size:
                raise TarCorrupt(hoff, "unexpected end of file inside an extended header")
            if r.skip(-size % BLOCK) < -size % BLOCK:
                raise TarCorrupt(hoff, "unexpected end of file inside an extended header")
            if typeflag == GNU_LONGNAME:
                longname = decode_name(bytes(data).split(b"\x00", 1)[0])
            elif typeflag == GNU_LONGLINK:
                longlink = decode_name(bytes(data).split(b"\x00", 1)[0])
            elif typeflag == PAX:
                try:
                    pax = parse_pax(bytes(data))
                except ValueError:
                    raise BadHeader(hoff, "bad pax extended header") from None
            continue  # 'g' (global defaults) changes nothing we use

        name_raw = block[:100].split(b"\x00", 1)[0]
        if block[257:263] == b"ustar\x00":  # POSIX ustar: long names are split into prefix/name
            prefix = block[345:500].split(b"\x00", 1)[0]
            if prefix:
                name_raw = prefix + b"/" + name_raw
        name = decode_name(name_raw)
        if longname is not None:
            name = longname
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise BadHeader(hoff, "bad pax size") from None
        if typeflag == b"\x00" and name.endswith("/"):  # old tars mark directories this way
            typeflag = DIRECTORY
        data_offset = hoff + BLOCK
        if pax and typeflag in REGULAR and marks_sparse(pax):
            typeflag = SPARSE
            name = pax.get("GNU.sparse.name") or name  # formats 0.1 and 1.0 keep the real name here
        elif typeflag == SPARSE and block[482]:  # more of the old GNU sparse map follows, in blocks of its own
            data_offset = _skip_sparse_extensions(r, hoff, name)
        if typeflag in NO_DATA:
            size = 0
        if size < 0:
            raise BadHeader(hoff, "negative member size")
        linkname = ""
        if typeflag in (HARD_LINK, SYMLINK):
            linkname = pax.get("linkpath") or longlink or decode_name(block[157:257].split(b"\x00", 1)[0])
        yield Member(name, size, first_header, data_offset, typeflag, linkname)
        longname, longlink, pax, first_header = None, None, {}, None


def _skip_sparse_extensions(r: Reader, hoff: int, name: str) -> int:
    """Pass the extension blocks after an old GNU sparse header (each one's byte 504 says whether another
    follows); returns the offset of the member's data."""
    while True:
        block = r.read(BLOCK)
        if len(block) < BLOCK:
            raise TarCorrupt(hoff, "unexpected end of file inside a sparse file's map", name)
        if not block[504]:
            return r.offset


def skip_data(r: Reader, m: Member) -> None:
    want = m.size + (-m.size % BLOCK)
    if r.skip(want) < want:
        raise TarCorrupt(m.data_offset, f"unexpected end of file inside member data ({m.size} bytes)", m.name)


def read_data(r: Reader, m: Member) -> bytes | bytearray:
    data = r.read(m.size)
    pad = -m.size % BLOCK
    if len(data) < m.size or r.skip(pad) < pad:
        raise TarCorrupt(m.data_offset, f"unexpected end of file inside member data ({m.size} bytes)", m.name)
    return data


# Many headers checked at once (shards.iter_samples' fast path for indexed tars): each function answers, per
# header, whether iter_members would read it exactly as the caller expects. False means "not shown", never
# "corrupt": the caller hands such members to iter_members, which has the last word.

_MAGIC_MASK = np.uint64(int.from_bytes(b"\x00" + b"\xff" * 6 + b"\x00", "little"))
_POSIX_MAGIC = np.uint64(int.from_bytes(b"\x00ustar\x00\x00", "little"))
_PATH, _SIZE = np.frombuffer(b"path", np.uint8), np.frombuffer(b"size", np.uint8)
_SPARSE_KEY = np.frombuffer(SPARSE_RECORD.encode(), np.uint8)


def blocks_at(buf: bytes | bytearray | memoryview, at: np.ndarray) -> np.ndarray:
    """Copies of the 512-byte blocks of `buf` that start at the offsets `at`, as rows of a (len(at), 512) array."""
    windows = np.ndarray((max(len(buf) - BLOCK + 1, 0), BLOCK), np.uint8, buf, 0, (1, 1))  # a view, no copy
    return windows[at]


def _plain_octal(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of number fields (rows of a (k, width) array), and which rows are plain: optional leading spaces,
    octal digits, then NULs and spaces only. parse_number gives every plain field the same value; other forms
    (base-256, signs, bytes after a NUL) are left to it."""
    digit = (fields >= 0x30) & (fields <= 0x37)
    space = fields == 0x20
    lead = np.logical_and.accumulate(space, axis=1)
    body = np.logical_and.accumulate(digit | lead, axis=1) & ~lead
    plain = (body | space | (fields == 0)).all(axis=1)
    later_digits = np.cumsum(body[:, ::-1], axis=1)[:, ::-1] - body
    values = (np.where(body, fields - 0x30, 0).astype(np.int64) << (3 * later_digits)).sum(axis=1)
    return values, plain


def _written(values: np.ndarray, width: int, tail: bytes) -> np.ndarray:
    """Number fields as tarfile and GNU tar write them: zero-padded octal digits, then `tail` (rows of bytes).
    Values too big for the digits come out as 0xFF bytes, which no field holds in that form."""
    digits = width - len(tail)
    out = np.empty((len(values), width), dtype=np.uint8)
    out[:, :digits] = ((values[:, None] >> (3 * np.arange(digits - 1, -1, -1))) & 7) + 0x30
    out[values >= 8 ** digits, :digits] = 0xFF
    out[:, digits:] = np.frombuffer(tail, dtype=np.uint8)
    return out


def _numbers_held(fields: np.ndarray, values: np.ndarray, tail: bytes) -> np.ndarray:
    """Which number fields (rows, a multiple of 4 bytes wide) hold these values: compared whole with the form
    tarfile and GNU tar write, and read as plain octal where they differ."""
    written = _written(values, fields.shape[1], tail)
    held = (fields.view(np.uint32) == written.view(np.uint32)).all(axis=1)
    other = np.flatnonzero(~held)
    if len(other):
        read, plain = _plain_octal(fields[other])
        held[other] = plain & (read == values[other])
    return held


def _checksums_held(blocks: np.ndarray) -> np.ndarray:
    """Which headers (rows; their checksum fields are overwritten here) hold the checksum of their own bytes,
    summed unsigned (the signed-char variant that iter_members also accepts counts as not shown)."""
    field = blocks[:, 148:156].copy()
    blocks[:, 148:156] = 0x20  # the field itself counts as spaces
    # sums of 256 bytes fit in 16 bits
    total = blocks.reshape(-1, 256).sum(axis=1, dtype=np.uint16).reshape(-1, 2).sum(axis=1, dtype=np.int64)
    return _numbers_held(field, total, b"\x00 ")


# The first 160 bytes of a regular member's header, as 32-bit words, where header_templates fills them in: the
# name, the size and the typeflag. The rest (mode, owner, mtime, checksum) is the writer's.
_TEMPLATE_WORDS = 40
_TEMPLATE_MASK = np.zeros(_TEMPLATE_WORDS * 4, dtype=np.uint8)
_TEMPLATE_MASK[:100] = _TEMPLATE_MASK[124:136] = _TEMPLATE_MASK[156] = 0xFF
_TEMPLATE_MASK = _TEMPLATE_MASK.view(np.uint32)


def header_templates(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """What the headers of regular members of these names (rows of at most 100 bytes, UTF-8 padded with NULs)
    and sizes hold where tarfile or GNU tar write them, for regular_headers_match: (len(sizes), 40) 32-bit words."""
    template = np.zeros((len(sizes), _TEMPLATE_WORDS * 4), dtype=np.uint8)
    template[:, : names.shape[1]] = names
    template[:, 124:136] = _written(sizes, 12, b"\x00")
    template[:, 156] = REGULAR[0][0]
    return template.view(np.uint32)


def regular_headers_match(blocks: np.ndarray, templates: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Which headers (rows of 512 bytes; changed here) are regular files of these sizes and names (`templates`:
    header_templates of them), read from the header alone: checksum, size, typeflag, the name field, and an
    empty prefix field where the header is POSIX ustar. Most rows are settled by one masked comparison with
    their template; the others field by field (another regular typeflag, numbers in another plain form)."""
    ok = ((blocks.view(np.uint32)[:, :_TEMPLATE_WORDS] & _TEMPLATE_MASK) == templates).all(axis=1)
    other = np.flatnonzero(~ok)
    if len(other):
        rows, names = blocks[other], templates[other].view(np.uint8)[:, :100]
        ok[other] = ((rows[:, :100] == names).all(axis=1) & np.isin(rows[:, 156], [t[0] for t in REGULAR])
                     & _numbers_held(rows[:, 124:136], sizes[other], b"\x00"))
    posix = (blocks[:, 256:264].view(np.uint64)[:, 0] & _MAGIC_MASK) == _POSIX_MAGIC  # magic at bytes 257-262
    ok &= ~posix | (blocks[:, 345] == 0)
    return ok & _checksums_held(blocks)


_PAX_RECORD_MAX = 64  # a pax record longer than this (an mtime record is about 30 bytes) goes through parse_pax


def pax_headers_harmless(headers: np.ndarray, data: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Which headers (rows of 512 bytes; changed here) are pax extended headers ('x') of at most one block of
    data (`data`: the block after each), padded to `room` bytes, whose records change nothing iter_samples
    reads: no `path`, no `size`, no `GNU.sparse.*` (a sparse file, never read). Python's tarfile writes one
    before every member whose mtime is a float (webdataset's TarWriter, so img2dataset): one record,
    `NN mtime=...`, checked here in one go; other layouts go through parse_pax."""
    pax = (headers[:, 156] == PAX[0]) & _checksums_held(headers)
    length, one_record = _one_harmless_record(data[:, :_PAX_RECORD_MAX])
    harmless = (pax & one_record & (length + (-length % BLOCK) == room)
                & _numbers_held(headers[:, 124:136], length, b"\x00"))
    for i in np.flatnonzero(pax & ~harmless).tolist():
        size, plain = _plain_octal(headers[i : i + 1, 124:136])
        size = int(size[0])
        if not plain[0] or size > BLOCK or size + (-size % BLOCK) != room[i]:
            continue
        try:
            records = parse_pax(data[i, :size].tobytes())
        except ValueError:
            continue
        harmless[i] = "path" not in records and "size" not in records and not marks_sparse(records)
    return harmless


def _one_harmless_record(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The length of the first pax record in each row of data, and whether it is a whole record of that row,
    `N key=value\n`, as parse_pax reads it, its key neither `path` nor `size` nor `GNU.sparse.*`."""
    rows, width = np.arange(len(data)), data.shape[1]
    digit = (data[:, :4] >= 0x30) & (data[:, :4] <= 0x39)
    n = np.logical_and.accumulate(digit, axis=1).sum(axis=1)  # a record of at most 512 bytes: 1 to 3 digits
    d = data[:, :3].astype(np.int64) - 0x30
    length = np.select([n == 1, n == 2], [d[:, 0], 10 * d[:, 0] + d[:, 1]], 100 * d[:, 0] + 10 * d[:, 1] + d[:, 2])
    spaced = (n >= 1) & (n <= 3) & (data[rows, np.minimum(n, 3)] == 0x20)
    fits = spaced & (length >= n + 3) & (length <= width)  # at least "=" and a newline after the space
    newline = data[rows, np.clip(length - 1, 0, width - 1)] == 0x0A
    equals = data == 0x3D
    key_end = equals.argmax(axis=1)  # the first "=": digits and the space come before it
    keyed = equals[rows, key_end] & (key_end < length - 1)
    key = data[rows[:, None], (n + 1)[:, None] + np.arange(4)]
    named = (key_end == n + 5) & ((key == _PATH).all(axis=1) | (key == _SIZE).all(axis=1))
    sparse = (data[rows[:, None], (n + 1)[:, None] + np.arange(len(_SPARSE_KEY))] == _SPARSE_KEY).all(axis=1)
    return np.where(fits, length, -1), fits & newline & keyed & ~named & ~sparse


def wds2idx_split(name: str) -> tuple[str, str]:
    """wds2idx's own split, quirks kept: a name with no dot in its last part gives (name[:-1], name)."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def indexed(name: str) -> bool:
    """Does wds2idx put this regular member in the index? It drops hidden files (`.x`, `dir/.x`)."""
    base, _ = wds2idx_split(name)
    return bool(base) and not base.endswith("/")


C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", "\\": "\\\\"}


def tar_quote(name: str) -> str:
    """A member name as GNU tar lists it (its default 'escape' quoting in a UTF-8 locale), which is what wds2idx
    copies into the index. Plain names come back unchanged."""
    if name.isprintable() and "\\" not in name:
        return name
    out = []
    for c in name:
        if c in C_ESCAPES:
            out.append(C_ESCAPES[c])
        elif "\udc80" <= c <= "\udcff":  # a byte that was not UTF-8
            out.append("\\%03o" % (ord(c) - 0xDC00))
        elif not c.isprintable() and c != " ":
            out.extend("\\%03o" % b for b in c.encode("utf-8", "surrogateescape"))
        else:
            out.append(c)
    return "".join(out)
