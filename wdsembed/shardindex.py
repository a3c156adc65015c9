"""DALI's `.idx` files for WebDataset shards: the v1.2 format, building one from a tar, and where one is kept (beside
the shard, or in a local cache where the shard's folder is read-only), checked against the tar before it is trusted.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple, Optional, Sequence

import fsspec
import numpy as np

from wdsembed import storage, tarstream

log = logging.getLogger(__name__)

IDX_VERSION = "v1.2"


class StaleIndexError(ValueError):
    """An .idx file no longer matches its tar."""


class IndexFormatError(ValueError):
    """An index that the v1.2 text format cannot hold (or text that is not a v1.2 index)."""


class IndexNotStoredError(OSError):
    """A built index that neither the shard's folder nor the index cache took (both refused the write)."""


class IndexMember(NamedTuple):
    ext: str  # as wds2idx writes it: everything after the first dot of the last path part, case kept
    offset: int  # byte offset of the member's data (a multiple of 512)
    size: int
    name: str  # member name as GNU tar prints it (backslashes and control characters escaped)


class IndexColumns(NamedTuple):
    """An index's members in archive order, as columns: what the tar reader's fast path plans from."""

    exts: list[str]
    offsets: np.ndarray  # int64 data offsets
    sizes: np.ndarray  # int64
    names: list[str]


@dataclass(frozen=True)
class ShardIndex:
    """A parsed DALI `.idx` (format v1.2)."""

    samples: Sequence  # per sample: tuple of IndexMember(ext, offset, size, name)
    path: Optional[str] = field(default=None, compare=False)  # where ensure_index read or wrote it

    @classmethod
    def parse(cls, text: str) -> "ShardIndex":
        """The index in `text`, checked line by line as _parse_line does (IndexFormatError otherwise). Text as
        wds2idx and this module write it is read as columns, its IndexMembers made only when asked for."""
        body = _body_lines(text)
        columns = _columns(body)
        if columns is None:  # not in the canonical form: line by line, as the format's reference
            return cls(tuple(_parse_line(line, i) for i, line in enumerate(body, start=2)))
        return cls(_ColumnSamples(*columns))

    def columns(self) -> Optional[IndexColumns]:
        """The members as columns; None where an offset or size exceeds 64 bits (no tar here holds such)."""
        if isinstance(self.samples, _ColumnSamples):
            return self.samples.columns
        members = list(self.members())
        try:
            offsets = np.array([m.offset for m in members], dtype=np.int64)
            sizes = np.array([m.size for m in members], dtype=np.int64)
        except OverflowError:
            return None
        return IndexColumns([m.ext for m in members], offsets, sizes, [m.name for m in members])

    def members_from(self, i: int) -> Iterator[IndexMember]:
        """The members from the i-th on (in archive order), made one by one."""
        if isinstance(self.samples, _ColumnSamples):
            c = self.samples.columns
            return map(IndexMember, c.exts[i:], c.offsets[i:].tolist(), c.sizes[i:].tolist(), c.names[i:])
        return itertools.islice(self.members(), i, None)

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
                if not m.ext:
                    raise IndexFormatError(
                        f"member {m.name!r}: a name that ends in its first dot has an empty extension, which a v1.2 "
                        ".idx line cannot hold (wds2idx writes three fields, which DALI and this reader refuse); "
                        "read this shard without an index"
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


class _ColumnSamples(Sequence):
    """A parsed index's samples (tuples of IndexMember, one per line), made from its columns when first asked
    for: a worker's fast path plans from the columns alone (ShardIndex.columns), and parsing 30,000 members into
    IndexMembers held the interpreter's lock for about 85 ms per 10,000-line index on the 2-core machine."""

    def __init__(self, columns: IndexColumns, counts: list[int]) -> None:
        self.columns, self._counts, self._samples = columns, counts, None

    def _all(self) -> tuple:
        if self._samples is None:
            c = self.columns
            members = list(map(IndexMember, c.exts, c.offsets.tolist(), c.sizes.tolist(), c.names))
            ends = itertools.accumulate(self._counts)
            self._samples = tuple(tuple(members[e - n:e]) for n, e in zip(self._counts, ends))
        return self._samples

    def __len__(self) -> int:
        return len(self._counts)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self._all()[i]

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, _ColumnSamples)):
            return self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


# Bytes that never appear in an index as wds2idx writes it (one space between fields, one sample per line):
# other whitespace, and the control characters str.split() also splits on.
_NOT_CANONICAL = np.zeros(256, dtype=bool)
_NOT_CANONICAL[[9, 11, 12, 13, 28, 29, 30, 31]] = True


def _columns(body: list[str]) -> Optional[tuple[IndexColumns, list[int]]]:
    """The members of an index's sample lines as columns, and members per line, where the text is canonical (ASCII,
    fields separated by single spaces, no empty line): then its tokens are exactly those _parse_line splits out,
    and the same lines are refused (IndexFormatError, the line named). None otherwise, for _parse_line to read."""
    if not body:
        return None
    joined = "\n".join(body)
    if not joined.isascii():
        return None
    raw = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    space, newline = raw == 0x20, raw == 0x0A
    if _NOT_CANONICAL[raw].any() or (space[1:] & (space[:-1] | newline[:-1])).any() or (
            space[:-1] & newline[1:]).any() or space[0] or space[-1] or (newline[1:] & newline[:-1]).any() \
            or newline[0] or newline[-1]:
        return None
    line_end = np.append(np.flatnonzero(newline), len(raw))
    counts = np.diff(np.concatenate(([0], np.searchsorted(np.flatnonzero(space), line_end)))) + 1  # tokens per line
    bad = np.flatnonzero(counts % 4)
    if len(bad):
        i = int(bad[0])
        _parse_line(body[i], i + 2)  # raises, naming the line
    tokens = joined.split()
    offs, sizes = tokens[1::4], tokens[2::4]
    if not ("".join(offs).isdigit() and "".join(sizes).isdigit()):
        for i, line in enumerate(body, start=2):
            _parse_line(line, i)  # raises at the first bad line
    try:
        columns = IndexColumns(tokens[0::4], np.array(offs, dtype=np.int64), np.array(sizes, dtype=np.int64),
                               tokens[3::4])
    except (OverflowError, ValueError):  # numbers past 64 bits: the line-by-line reading keeps them whole
        return None
    return columns, (counts // 4).tolist()


def _body_lines(text: str) -> list[str]:
    """An index's sample lines, after checking its header and that it has as many lines as the header says."""
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline
        lines.pop()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != IDX_VERSION or not head[1].isdigit():
        # what the file holds is not echoed: beside a shard of untrusted input, it may be a link to any file
        raise IndexFormatError(f"not a {IDX_VERSION} index: its first line is not '{IDX_VERSION} <samples>'")
    n = int(head[1])
    body = lines[1:]
    if len(body) != n:
        raise IndexFormatError(f"index header says {n} samples, the body has {len(body)} lines")
    return body


def _parse_line(line: str, i: int) -> tuple[IndexMember, ...]:
    """One sample's members from line `i` of an index (named in errors)."""
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
    return tuple(group)


def build_index(f: BinaryIO, *, chunk_size: int = tarstream.CHUNK_SIZE, allow_seek: bool = False) -> ShardIndex:
    """Scan a tar once and build its index, as wds2idx does.

    Same members (regular files, hidden files left out), same grouping (consecutive members with wds2idx's
    basename), same text. Two deliberate differences: offsets are the true data offsets read from the headers;
    wds2idx takes `tar --block-number`, which points at a GNU longname ('L') header rather than the member, so its
    offsets are wrong for names longer than 100 bytes in GNU-format tars. And GNU sparse files (`tar --sparse`)
    are left out, as links are: wds2idx lists one with the size of the whole file at the start of its stored
    bytes (the file without its holes, after a sparse map in some formats), which DALI would read as the image
    together with the headers after it. `allow_seek` skips member data by seeking (worth it for local files only;
    on object stores a seek is a new request). A damaged tar raises tarstream.ShardReadError at its first damage,
    also where the reads go on past a damaged header (iter_samples' on_damage): no index is made for one, here or
    from a read (shard.TarRead), so a damaged shard is read the same way wherever it lies.
    """
    r = tarstream.Reader(f, chunk_size, allow_seek=allow_seek)
    builder = IndexBuilder()
    try:
        for m in tarstream.iter_members(r):
            tarstream.skip_data(r, m)
            if m.typeflag not in tarstream.REGULAR or not tarstream.indexed(m.name):
                continue
            builder.add(m.name, m.data_offset, m.size)
    except tarstream.TarCorrupt as e:
        raise tarstream.ShardReadError(getattr(f, "name", "<tar>"), e.offset, e.reason, e.member) from None
    return builder.index()


class IndexBuilder:
    """Groups indexed members into samples the way wds2idx does; fed by build_index or by iter_samples.

    `add` only records the member: it runs for every member in the thread that feeds the decoder, and the index
    is most often not needed (a pass over a shard whose index proved current). Names are quoted and grouped when
    `index()` is asked for."""

    def __init__(self) -> None:
        self._members: list[tuple[str, int, int]] = []

    def add(self, name: str, data_offset: int, size: int) -> None:
        self._members.append((name, data_offset, size))

    def extend(self, members: Iterable[tuple[str, int, int]]) -> None:
        """`add` for each (name, data_offset, size), in order."""
        self._members.extend(members)

    def index(self) -> ShardIndex:
        samples: list[list[IndexMember]] = []
        last_base: Optional[str] = None
        for name, data_offset, size in self._members:
            quoted = tarstream.tar_quote(name)
            base, ext = tarstream.wds2idx_split(quoted)
            entry = IndexMember(ext, data_offset, size, quoted)
            if base != last_base:
                samples.append([entry])
                last_base = base
            else:
                samples[-1].append(entry)
        return ShardIndex(tuple(tuple(g) for g in samples))


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


def stem_path(shard_path: str) -> str:
    return shard_path[:-4] if shard_path.lower().endswith(".tar") else shard_path


def index_path_for(
    shard_path: str, cache_dir: Optional[str | os.PathLike] = None, fp: Optional[ShardFingerprint] = None
) -> str:
    """Where a shard's `.idx` lives: beside it (`00000.tar` -> `00000.idx`) when `cache_dir` is None; else a file
    under `cache_dir` named from the shard's URL + size + mtime/ETag (`fp`), so a changed shard gets a new one."""
    if cache_dir is None:
        return stem_path(shard_path) + ".idx"
    if fp is None:
        raise TypeError("index_path_for: a cache path needs the shard's fingerprint")
    digest = hashlib.sha256(f"{shard_path}\x00{fp.token}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    # the stem only names the file for people; the digest identifies it, so a long one is cut (an object store's key
    # may be 1,024 bytes, a file name 255)
    stem = storage.shortened(os.path.basename(stem_path(shard_path.rstrip("/"))), 100) or "shard"
    return os.path.join(os.fspath(cache_dir), f"{stem}-{digest}.idx")


def _header_matches(block: bytes, entry: IndexMember) -> bool:
    """Cheap check of the 512-byte header in front of an indexed member (checksum, type, size, name)."""
    if len(block) != tarstream.BLOCK or block == tarstream.ZERO_BLOCK:
        return False
    try:
        if tarstream.parse_number(block[148:156]) != sum(block[:148]) + sum(block[156:]) + 8 * 32:
            return False
        size = tarstream.parse_number(block[124:136])
    except ValueError:
        return False
    if block[156:157] not in tarstream.REGULAR or size != entry.size:
        return False
    name_raw = block[:100].split(b"\x00", 1)[0]
    if block[257:263] == b"ustar\x00":
        prefix = block[345:500].split(b"\x00", 1)[0]
        if prefix:
            name_raw = prefix + b"/" + name_raw
    name = tarstream.tar_quote(tarstream.decode_name(name_raw))
    if name == entry.name:
        return True
    # long or non-ASCII names live in an extended header before this one; the ustar field holds a truncation
    return len(entry.name.encode("utf-8", "surrogateescape")) > 100 or not entry.name.isascii()


def _load_valid_index(
    idx_fs: Any, idx_path: str, shard_fs: Any, shard_path: str, shard_size: int, *, whole: bool = True,
    quiet: bool = False,
) -> Optional[ShardIndex]:
    """The index at `idx_path` if it exists and still fits the shard, else None (missing, unreadable or stale).

    Cheap (two reads, of 512 and 1,024 bytes): the last member must end inside the tar, its header must be where
    the index says, and no indexable member may follow it (a tar rewritten with more samples appended; a sparse
    file, which no index lists, may). With `whole=False` only the header and the last line are parsed, and the
    index comes back with no samples, its `path` set: what the planner needs for every shard of a run before any
    work starts (a 10,000-line index takes tens of milliseconds to parse, in the interpreter's one lock). Indexes
    list their members in archive order (wds2idx's and ours do); a worker reads the whole index and checks it
    sample by sample as it reads the tar. `quiet`: an index that is no index of this shard, or cannot be read, is
    logged at DEBUG only (the run's planning says it, in the run's log)."""
    said = logging.DEBUG if quiet else logging.WARNING
    try:
        try:
            info = idx_fs.info(idx_path)
        except FileNotFoundError:
            return None
        # An index lists each member in fewer bytes than its tar header takes: a bigger file, or no plain file (what a
        # link beside the shard may name: /dev/zero, a FIFO, a folder), is no index of this shard, and is not read.
        if info.get("type") != "file" or (info.get("size") or 0) > shard_size:
            log.log(said, "ignoring %s: %s, not an index of this %d-byte shard", idx_path,
                        "a larger file" if info.get("type") == "file" else "no plain file", shard_size)
            return None
        # through read_whole: a store's failure names the index (a body cut short becomes a ConnectionError, an
        # OSError, so it is ignored below as any unreadable index is, not raised out of the planning)
        text = storage.read_whole(idx_fs, idx_path).decode("utf-8", "surrogateescape")
        if whole:
            idx = ShardIndex.parse(text)
            members = list(idx.members())
        else:
            body = _body_lines(text)
            idx, members = ShardIndex(()), list(_parse_line(body[-1], len(body) + 1)) if body else []
    except (OSError, ValueError) as e:
        url = storage.to_url(idx_fs, idx_path)
        why = (f"[Errno {e.errno}] {e.strerror}" if isinstance(e, OSError) and e.filename == url and e.strerror
               else str(e).removeprefix(f"{url}: "))  # the index named once
        log.log(said, "ignoring unreadable index %s: %s", url, why)
        return None
    if not members:
        return dataclasses.replace(idx, path=idx_path)
    last = max(members, key=lambda m: m.offset)
    if last.offset < tarstream.BLOCK or last.offset % tarstream.BLOCK or last.offset + last.size > shard_size:
        log.info("stale index %s: last member ends at byte %d, shard has %d bytes", idx_path,
                 last.offset + last.size, shard_size)
        return None
    after = last.offset + last.size + (-last.size % tarstream.BLOCK)
    # two small ranged reads (an fsspec file on an object store would fetch a whole block per seek): the header,
    # and the next header with the block after it (a pax header's records)
    try:
        block = shard_fs.cat_file(shard_path, start=last.offset - tarstream.BLOCK, end=last.offset)
        next_blocks = (shard_fs.cat_file(shard_path, start=after, end=min(after + 2 * tarstream.BLOCK, shard_size))
                       if after < shard_size else b"")
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store's failure is named and the index ignored; others raise
        named = storage.naming_url(storage.to_url(shard_fs, shard_path), exc)
        if not isinstance(named, OSError):
            raise
        # the index is optional: the worker reads the tar front to back without it (and names the tar if the store
        # fails it there too), where this failure, raised, failed the whole run's planning naming no object
        log.log(said, "ignoring index %s: the shard's bytes to check it against could not be read: %s",
                storage.to_url(idx_fs, idx_path), named)
        return None
    if not _header_matches(block, last):
        log.info("stale index %s: no header for %r at byte %d", idx_path, last.name, last.offset - tarstream.BLOCK)
        return None
    if _starts_indexed_member(next_blocks):
        log.info("stale index %s: the tar has members after the last indexed one (byte %d)", idx_path, after)
        return None
    return dataclasses.replace(idx, path=idx_path)


def _starts_indexed_member(blocks: bytes) -> bool:
    """Does a member that an index lists start here, in these (up to) two blocks (i.e. one an index ending before
    it lacks)? Zero blocks (end of archive), end of file, directories, hidden files and sparse files are not."""
    block = blocks[: tarstream.BLOCK]
    if len(block) != tarstream.BLOCK or block == tarstream.ZERO_BLOCK:
        return False
    try:
        if tarstream.parse_number(block[148:156]) != sum(block[:148]) + sum(block[156:]) + 8 * 32:
            return False
    except ValueError:
        return False
    typeflag = block[156:157]
    if typeflag == tarstream.PAX and _pax_marks_sparse(block, blocks[tarstream.BLOCK :]):
        return False  # a sparse file is never indexed: else an index ending before one would be rebuilt every run
    if typeflag in (tarstream.GNU_LONGNAME, tarstream.PAX):
        return True  # extended headers precede a real member; assume it is one (worst case: a needless rebuild)
    name = tarstream.decode_name(block[:100].split(b"\x00", 1)[0])
    return typeflag in tarstream.REGULAR and not name.endswith("/") and tarstream.indexed(name)


def _pax_marks_sparse(header: bytes, data: bytes) -> bool:
    """Do the records of this pax header mark a GNU sparse file, as far as `data` (the block after the header)
    holds them? GNU tar writes the GNU.sparse.* records first; format 0.0's run past one block."""
    try:
        size = tarstream.parse_number(header[124:136])
        records = data[:size] if size <= len(data) else data[: data.rfind(b"\n") + 1]  # the whole records there
        return tarstream.marks_sparse(tarstream.parse_pax(records))
    except ValueError:
        return False


def ensure_index(
    shard_path_or_url: str, fs: Any, cache_dir: Optional[str | os.PathLike] = None, *, build: bool = True,
    quiet: bool = False,
) -> Optional[ShardIndex]:
    """The shard's DALI index, read or built, with `.path` saying where its file is.

    Order: `<stem>.idx` beside the shard if it still fits the tar (the last member must end inside the tar and
    its header must be there); else a copy under `cache_dir` for this exact shard version; else build it by
    reading the tar once and write it beside the shard (temp file + rename; one PUT on object stores), or under
    `cache_dir` when the shard's folder refuses writes. With no `cache_dir` and an unwritable folder the index is
    returned with `path=None`. With `build=False` a missing index gives None instead of a read of the tar (the
    caller builds it during its own pass: iter_samples(index_builder=...) and save_index). Raises
    IndexFormatError for shards whose member names the v1.2 format cannot hold (whitespace, a name ending in its
    first dot: `b.`), tarstream.ShardReadError for a damaged tar, IndexNotStoredError where the folder and
    `cache_dir` both refuse a built index. An empty tar gives an index of 0 samples (wds2idx refuses those).
    For an s3:// shard the returned path may be an s3:// URL: DALI reads index files from local paths only.
    `quiet`: an index found unreadable is not warned of (the command's checks, before the run's log exists: the
    run's planning says it once, there).
    """
    return _ensure(shard_path_or_url, fs, cache_dir, build=build, whole=True, quiet=quiet)


def index_file(
    shard_path_or_url: str, fs: Any, cache_dir: Optional[str | os.PathLike] = None, *, build: bool = True
) -> Optional[str]:
    """Where the shard's .idx is, as ensure_index finds or builds it, parsing no more of an existing one than its
    header and last line (the planner asks this for every shard of a run). None: no index (none found and
    `build=False`, or nowhere to write one)."""
    found = _ensure(shard_path_or_url, fs, cache_dir, build=build, whole=False)
    return found.path if found is not None else None


def _ensure(shard: str, fs: Any, cache_dir: Optional[str | os.PathLike], *, build: bool, whole: bool,
            quiet: bool = False) -> Optional[ShardIndex]:
    fp = fingerprint(shard, fs)
    beside = index_path_for(shard)
    idx = _load_valid_index(fs, beside, fs, shard, fp.size, whole=whole, quiet=quiet)
    if idx is not None:
        return idx
    cached = _cache_path(shard, fs, cache_dir, fp)
    if cached is not None:
        idx = _load_valid_index(fsspec.filesystem("file"), cached, fs, shard, fp.size, whole=whole, quiet=quiet)
        if idx is not None:
            return idx
    if not build:
        return None

    with storage.open_sequential(fs, shard, size=fp.size) as f:  # object stores: large ranges read ahead
        try:
            idx = build_index(f, allow_seek=storage.is_local(fs))
        except tarstream.ShardReadError as e:
            raise tarstream.ShardReadError(shard, e.offset, e.reason, e.member) from None
    return save_index(shard, fs, idx, cache_dir, fp)


def _cache_path(shard: str, fs: Any, cache_dir: Optional[str | os.PathLike], fp: ShardFingerprint) -> Optional[str]:
    if cache_dir is None:
        return None
    # named from the shard's full URL (s3://bucket/...), so shards of two stores never share an entry
    url = os.path.abspath(shard) if storage.is_local(fs) else (shard if "://" in shard else fs.unstrip_protocol(shard))
    return index_path_for(url, cache_dir, fp)


def save_index(
    shard: str,
    fs: Any,
    idx: ShardIndex,
    cache_dir: Optional[str | os.PathLike] = None,
    fp: Optional[ShardFingerprint] = None,
) -> ShardIndex:
    """Store a freshly built index beside the shard (written back to the bucket where it allows writes), else
    under `cache_dir`; returns it with `.path` set (None where the folder refused it and there is no cache).
    IndexNotStoredError where the cache refused it too."""
    data = idx.render().encode("utf-8", "surrogateescape")
    beside = index_path_for(shard)
    try:
        # through `fs`: a folder or bucket that refuses writes refuses them here (PermissionError, also from s3fs
        # for AccessDenied), and the index goes to the cache instead
        storage.write_atomic(fs, beside, data)
        return dataclasses.replace(idx, path=beside)
    except OSError as e:  # PermissionError locally and from s3fs (AccessDenied); read-only file systems
        log.info("cannot write %s (%s); using the index cache", beside, e)
    cached = _cache_path(shard, fs, cache_dir, fp or fingerprint(shard, fs))
    if cached is None:
        return idx
    try:
        storage.write_atomic(fsspec.filesystem("file"), cached, data)  # a local folder, whatever the shard's store
    except OSError as e:
        raise IndexNotStoredError(e.errno, e.strerror or str(e), cached) from e
    return dataclasses.replace(idx, path=cached)
