"""The tar format, read as a stream: member headers (ustar, GNU long names, pax), their data, and exact byte offsets.

Parsed here rather than with `tarfile`: `tarfile` seeks per member and is slow, and the callers need the exact byte
offsets (for DALI's `.idx`) and exact failure positions (for truncated uploads). Reads through any file object, so
local files and fsspec stores (s3://) go through the same code.
"""
from __future__ import annotations

import os
import zlib
from typing import BinaryIO, Iterator, NamedTuple, Optional

CHUNK_SIZE = 8 << 20  # bytes per read from the underlying file (one S3 range request's worth)


BLOCK = 512


ZERO_BLOCK = bytes(BLOCK)


# typeflags: regular file ('0' and old-style NUL); members with no data whatever their size field says
# (links, devices, directories, FIFOs, as tarfile and GNU tar treat them); GNU/pax extended headers.
REGULAR = (b"0", b"\x00")


NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


HARD_LINK, SYMLINK = b"1", b"2"


# members never followed or read: where one is named like an image, its sample gets this reason instead
NOT_READ = {
    SYMLINK: "symbolic link member, not followed",
    b"3": "character device member, not read",
    b"4": "block device member, not read",
    b"6": "FIFO member, not read",
}


GNU_LONGNAME, GNU_LONGLINK, PAX, PAX_GLOBAL = b"L", b"K", b"x", b"g"


MAX_EXT_HEADER = 1 << 20  # a longname/pax header bigger than this is corruption, not a name


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


class Reader:
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


def decode_name(raw: bytes) -> str:
    # surrogateescape keeps odd bytes round-trippable (and quotable the way GNU tar prints them)
    return raw.decode("utf-8", "surrogateescape")


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


def iter_members(r: Reader) -> Iterator[Member]:
    """Yield every member in file order; the caller must consume (read or skip) `member.size` data bytes before
    asking for the next one. Ends at the end-of-archive block; raises TarCorrupt on damage."""
    longname: Optional[str] = None
    longlink: Optional[str] = None
    pax: dict[str, str] = {}
    first_header: Optional[int] = None
    while True:
        hoff = r.offset
        block = r.read(BLOCK)
        if len(block) == 0:
            raise TarCorrupt(hoff, "unexpected end of file (no end-of-archive marker: truncated tar?)")
        if len(block) < BLOCK:
            raise TarCorrupt(hoff, f"unexpected end of file inside a tar header ({len(block)} of 512 bytes)")
        if block == ZERO_BLOCK:
            if first_header is not None:
                raise TarCorrupt(hoff, "end-of-archive block right after an extended header")
            return
        stored = block[148:156]
        computed = byte_sum(block) - sum(stored) + 8 * 32  # the checksum field counts as eight spaces
        try:
            checksum = parse_number(stored)
        except ValueError:
            checksum = -1
        # some old writers summed signed chars
        signed = computed - 2 * sum(b for b in block if b >= 128) if checksum != computed else computed
        if checksum not in (computed, signed):
            raise TarCorrupt(hoff, "bad tar header checksum (not a tar, or corrupt)")
        try:
            size = parse_number(block[124:136])
        except ValueError:
            raise TarCorrupt(hoff, "bad size field in tar header") from None
        typeflag = block[156:157]
        if first_header is None:
            first_header = hoff

        if typeflag in (GNU_LONGNAME, GNU_LONGLINK, PAX, PAX_GLOBAL):
            if size > MAX_EXT_HEADER:
                raise TarCorrupt(hoff, f"extended header of {size} bytes")
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
                    raise TarCorrupt(hoff, "bad pax extended header") from None
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
                raise TarCorrupt(hoff, "bad pax size") from None
        if typeflag == b"\x00" and name.endswith("/"):  # old tars mark directories this way
            typeflag = b"5"
        if typeflag in NO_DATA:
            size = 0
        if size < 0:
            raise TarCorrupt(hoff, "negative member size")
        linkname = ""
        if typeflag in (HARD_LINK, SYMLINK):
            linkname = pax.get("linkpath") or longlink or decode_name(block[157:257].split(b"\x00", 1)[0])
        yield Member(name, size, first_header, hoff + BLOCK, typeflag, linkname)
        longname, longlink, pax, first_header = None, None, {}, None


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
