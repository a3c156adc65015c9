"""The WebDataset layout of a shard: member names and keys, the samples a tar holds (streamed, checked against its
`.idx` where there is one), and the img2dataset siblings beside it (`00000.parquet`, `00000_stats.json`).

Knows nothing of DALI pipelines, models or Prefect. The tar format is in `tarstream.py`, the `.idx` files in
`shardindex.py`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

from wdsembed import shardindex, tarstream


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


class MetadataFileError(ValueError):
    """An img2dataset sibling (.parquet, _stats.json) exists but cannot be read as what it should be."""


def _last_ext(ext: str) -> str:
    return ext.rsplit(".", 1)[-1]


def iter_samples(
    f: BinaryIO,
    *,
    extensions: Sequence[str],
    shard: str,
    index: Optional["shardindex.ShardIndex"] = None,
    chunk_size: int = tarstream.CHUNK_SIZE,
    index_builder: Optional["shardindex.IndexBuilder"] = None,
    on_stale_index: Optional[Callable[["shardindex.StaleIndexError"], None]] = None,
) -> Iterator[Sample]:
    """Stream the samples of a tar in file order with memory bounded by one read chunk plus one member.

    Consecutive members with one key form a sample; the image is the first member whose lowercased extension
    (the last dot-part) is in `extensions`, tried in that order of preference. A key seen again later in the tar
    yields a Sample with error "duplicate key". With `index`, members are located through it and each member's
    tar header is checked against it; a mismatch raises shardindex.StaleIndexError. A truncated or corrupt tar raises
    tarstream.ShardReadError naming `shard` after yielding every sample read intact before the damage.

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
    `on_stale_index`: instead of raising shardindex.StaleIndexError, call it once and read on without the index (samples
    come from the tar's own headers either way, so a stale index never changes what is read), e.g. to rebuild it.
    """
    rank = {e.lower().lstrip("."): i for i, e in reversed(list(enumerate(extensions)))}
    expected = iter(index.members()) if index is not None else None
    r = tarstream.Reader(f, chunk_size)
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
        for m in tarstream.iter_members(r):
            regular = m.typeflag in tarstream.REGULAR
            target = None
            if regular:
                targets[m.name] = (m.data_offset, m.size)
            elif m.typeflag == tarstream.HARD_LINK:
                target = targets.get(m.linkname)
                if target is not None:
                    targets[m.name] = target  # a link to this link is a link to the same file
            k, ext = split_member_name(m.name)
            mrank = rank.get(_last_ext(ext))
            # Links, devices and FIFOs count only where their name makes them (part of) an image sample; hard links
            # always do (each is a file, like a regular member).
            takes_part = regular or m.typeflag == tarstream.HARD_LINK or (m.typeflag in tarstream.NOT_READ and mrank is not None)
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
            if k != key:
                if key is not None:
                    yield finish()
                key, found, best, unread = k, [], None, None
                duplicate = k in seen
                seen.add(k)
            found.append(ext)
            if duplicate or mrank is None or (best is not None and mrank >= best[0]):
                tarstream.skip_data(r, m)
                continue
            if regular:
                best = None  # drop the worse candidate before reading the better one
                best = (mrank, tarstream.read_data(r, m), _last_ext(ext), m.name, m.data_offset)
                continue
            tarstream.skip_data(r, m)  # links, devices, FIFOs: no data in the tar
            if m.typeflag != tarstream.HARD_LINK:
                unread = unread or tarstream.NOT_READ[m.typeflag]
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
    except tarstream.TarCorrupt as e:
        # The pending sample's image, when it was read whole before the damage, is still good: yield it (its other
        # members may continue past the damage). Otherwise the error names it as lost.
        lost = key
        if key is not None and best is not None and not duplicate:
            lost = None
            yield finish()
        raise tarstream.ShardReadError(shard, e.offset, e.reason, e.member, key=lost) from None
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


def _check_against_index(shard: str, m: tarstream.Member, entry: Optional["shardindex.IndexMember"]) -> None:
    if entry is None:
        raise shardindex.StaleIndexError(f"{shard}: tar member {m.name!r} at byte {m.data_offset} is not in the index")
    if (entry.offset, entry.size, entry.name) != (m.data_offset, m.size, tarstream.tar_quote(m.name)):
        raise shardindex.StaleIndexError(
            f"{shard}: the index says {entry.name!r} ({entry.size} bytes at byte {entry.offset}), "
            f"the tar has {m.name!r} ({m.size} bytes at byte {m.data_offset})"
        )


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


def parquet_path_for(shard_path: str) -> str:
    """img2dataset's row table beside the shard: 00000.tar -> 00000.parquet."""
    return shardindex.stem_path(shard_path) + ".parquet"


def stats_path_for(shard_path: str) -> str:
    """img2dataset's finished-shard marker beside the shard: 00000.tar -> 00000_stats.json."""
    return shardindex.stem_path(shard_path) + "_stats.json"


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
