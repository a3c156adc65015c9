"""Where shards and outputs live: local folders or any fsspec URL (s3://...), through one small API.

Credentials never travel in `storage_options`: the options are part of the run's parameters, which Prefect stores
in its database. They come from where the store's own library looks (for S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE or `profile=`, ~/.aws, instance roles);
`storage_options` carries only the rest (endpoint_url, region_name, profile, timeouts).
"""
from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import tempfile
import threading
import uuid
from contextlib import ExitStack, contextmanager
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Union

import fsspec
import pyarrow as pa
from fsspec.core import url_to_fs

from wdsembed.config import credentials_hint
from wdsembed.storeoptions import _S3_PROTOCOLS, BUCKET_PROTOCOLS, fsspec_options, protocol, s3_attempts


class StoreError(ValueError):
    """A store location cannot be used (missing bucket, access denied, no credentials); names the URL."""


def filesystem(url: str, storage_options: Mapping[str, str] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind `url` and the path within it (no scheme for local paths). An S3 one tries each request
    s3_attempts(storage_options) times, an instance of its own for each count (s3filesystem.S3FileSystem)."""
    options = fsspec_options(url, storage_options)
    if "::" not in url and protocol(url) in _S3_PROTOCOLS:
        from wdsembed.s3filesystem import S3FileSystem

        # what the URL implies (?versionId=: version_aware), then the options, which win, as in fsspec's url_to_fs
        implied = S3FileSystem._get_kwargs_from_urls(url)
        fs = S3FileSystem(attempts=s3_attempts(storage_options), **(implied | options))
        return fs, fs._strip_protocol(url)
    # A chained URL (simplecache::s3://...) is fsspec's own: it hands the options to the outer layer, and an inner
    # s3fs keeps s3fs's own tries and defaults (docs/inputs.md).
    return url_to_fs(url, **options)


def file_fingerprint(url: str, storage_options: Mapping[str, str] | None = None) -> str:
    """A file's size and modification time (ETag where a store gives no time), "size:mtime". A checkpoint's identity
    was this until its content became it (checkpoint_identity): footers written before record it, and are judged by
    it still (plan.check_outputs_beside)."""
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"


CONTENT_IDENTITY_PREFIX = "sha256:"
_HASH_BLOCK = 8 << 20
# path -> (the stat it was hashed at, its identity): one entry per path, replaced when the file changes.
_checkpoint_digests: dict[str, tuple[tuple, str]] = {}
# Held while hashing: threads asking at once (planning's pool, a worker's shards) wait for one read, not do their own.
_checkpoint_digests_lock = threading.Lock()


def checkpoint_identity(url: str, storage_options: Mapping[str, str] | None = None) -> str:
    """A weights file's identity: "sha256:<hex>" of its bytes. Copies of one file (on several hosts, re-downloaded,
    copied without keeping mtime) are the same weights; a rewrite of the same size, however close in time, is not.

    Hashing reads the whole file (about 1 s per GB on one core), so it is done once per process and remembered by the
    file's stat: the inode, size, mtime and ctime (which, unlike mtime, no one can set back: a rewrite in place with
    the old mtime restored is still seen; only one within the clock tick of the hashing itself could be missed by
    this process). Local files only: EmbedConfig admits no other store for a checkpoint,
    which every worker loads from its own disk. A missing or unreadable file raises OSError."""
    fs, path = filesystem(url, storage_options)
    if not is_local(fs):
        raise StoreError(f"checkpoint {url!r}: only a local file's content is hashed (each worker loads it from its "
                         "own disk)")
    path = os.path.realpath(path)
    with _checkpoint_digests_lock:
        stat = _stat_version(os.stat(path))
        known = _checkpoint_digests.get(path)
        if known is not None and known[0] == stat:
            return known[1]
        with open(path, "rb", buffering=0) as f:
            opened = _stat_version(os.fstat(f.fileno()))
            digest = hashlib.sha256()
            block = bytearray(_HASH_BLOCK)
            view = memoryview(block)
            while n := f.readinto(block):
                digest.update(view[:n])
        identity = CONTENT_IDENTITY_PREFIX + digest.hexdigest()
        # Remembered only if the file was the same one, unchanged, from the stat to the end of the read: a file
        # being rewritten meanwhile is hashed again on the next call.
        if opened == stat == _stat_version(os.stat(path)):
            _checkpoint_digests[path] = (stat, identity)
        return identity


# The files of a `local-dir:` model's folder that timm builds it from: its config.json, and its weights (timm loads
# the first of its preferred names there, else the first file of one of these suffixes: timm.models._hub)
MODEL_FOLDER_WEIGHTS = (".safetensors", ".pth", ".pth.tar", ".bin")


def model_folder_identity(model_name: str) -> str | None:
    """A `local-dir:FOLDER` model's identity: "sha256:<hex>" over the names and content hashes
    (`checkpoint_identity`) of the folder's config.json and weights files. The folder is the model, as a checkpoint
    file is: exported again at the same path (retrained weights, another config), it is another model, whose
    outputs a re-run must not take for finished ones. None for any other name, or where the folder or a file of it
    cannot be read (loading the model then says why)."""
    source, _, folder = model_name.partition(":")
    if source.lower() != "local-dir":
        return None
    digest = hashlib.sha256()
    try:
        for name in sorted(n for n in os.listdir(folder) if n == "config.json" or n.endswith(MODEL_FOLDER_WEIGHTS)):
            digest.update(f"{name}\0{checkpoint_identity(os.path.join(folder, name))}\0".encode())
    except OSError:
        return None
    return CONTENT_IDENTITY_PREFIX + digest.hexdigest()


def _stat_version(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def join(base: str, name: str) -> str:
    return posixpath.join(base, name)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URL that `filesystem` opens again (keeps local paths plain)."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path


def read_whole(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The bytes of the file at `path`, read in one go; a store's failure to deliver them (after its client's
    retries) raised as an error naming the file (naming_url). FileNotFoundError stays as it is."""
    try:
        return cat_whole(fs, path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the store is raised again, naming the file
        _raise_naming(to_url(fs, path), exc)


def cat_whole(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """`fs.cat_file(path)`, on S3 in one GET: s3fs reads an object larger than its block size (default_block_size)
    by concurrent ranged GETs (max_concurrency), and retries none of their bodies cut short; the one GET is retried
    as a whole (s3_attempts), and a body shorter than its Content-Length raises."""
    return fs.cat_file(path, max_concurrency=1) if is_s3(fs) else fs.cat_file(path)


def naming_url(url: str, exc: BaseException) -> BaseException:
    """`exc`, a store's failure to read or write `url`, as an error that names it: s3fs says "[Errno 16] Please
    reduce your request rate." and aiohttp "Response payload is not completed", neither saying which object. An
    OSError keeps its type and errno (a PermissionError stays one: not retried); a dropped connection or a body cut
    short, which aiohttp and botocore raise as their own types, becomes a ConnectionError (retried by the tasks,
    faults.is_transient). Anything else, and an error that names `url` already, is returned as it is."""
    text = str(exc) or type(exc).__name__
    if url in text:
        return exc
    if isinstance(exc, OSError) and type(exc).__module__ == "builtins":
        if exc.errno is not None and exc.strerror:  # Python's own form, "[Errno 16] Please reduce ...: 'url'": the
            # name in its filename, so that a caller saying "cannot write {filename}: {strerror}" says it once
            return type(exc)(exc.errno, exc.strerror, url)
        named = type(exc)(f"{url}: {text}")
        named.errno = exc.errno
        return named
    if is_transport_error(exc):
        return ConnectionError(f"{url}: {type(exc).__name__}: {text}")
    return exc


def is_transport_error(exc: BaseException) -> bool:
    """A store's connection refused, dropped or timed out, or a body cut short, after the client's own retries:
    botocore and aiohttp (under s3fs) raise these as their own types, not as OSError."""
    import aiohttp
    import botocore.exceptions as bex

    return isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
                            aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))


def _raise_naming(url: str, exc: BaseException) -> None:
    named = naming_url(url, exc)
    if named is exc:
        raise exc
    raise named from exc


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk: paths are OS paths, reads may seek, a rename within a folder is atomic.

    fsspec's LocalFileSystem (and its subclasses, such as the tests' read-only one) names itself ("file", "local").
    This was three functions: this one looked for "file" only (storage, shard, plan, nemo, preflight), output.py's
    and shardindex.py's for "file" or "local", and in a list as well as a tuple. No caller needs the narrower rule:
    every filesystem that declares either name is the local disk, and each caller's local branch (plain paths,
    seeking reads, os-level atomic writes) is right for it; so the wider rule serves all of them.
    """
    return any(p in ("file", "local") for p in _protocols(fs))


def listed_files(fs: fsspec.AbstractFileSystem, entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The names of the files among a detailed listing's entries (`fs.ls(path, detail=True)`, the values of
    `fs.find(path, detail=True)`). Locally, a symbolic link to a file is that file: fsspec lists every link as
    'other', and a folder of links to shards kept elsewhere is a folder of shards. A dangling link, or one to a
    folder, is no file."""
    local = is_local(fs)
    return [e["name"] for e in entries if (e.get("type") == "file" and not is_folder_marker(e))
            or (local and e.get("islink") and os.path.isfile(e["name"]))]


def listed_folders(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The names of the folders among a detailed listing's entries (`fs.ls(path, detail=True)`); on an object
    store, the prefixes one level down, and the folders that a marker object names (is_folder_marker: in a flat
    listing, `fs.find`, the only sign of a folder that holds nothing else)."""
    return [e["name"].rstrip("/") for e in entries if e.get("type") == "directory" or is_folder_marker(e)]


def is_folder_marker(entry: Mapping[str, Any]) -> bool:
    """Whether a listing's entry is an object store's folder marker: an object whose key ends in `/` (zero bytes,
    as the S3 console's "Create folder", Hadoop's S3A and other tools make one), which s3fs lists as a file named
    with that `/`. It marks a folder (`00000.parquet/`, a prefix), and is no file of it: neither a shard nor a
    parquet, nor a part of one."""
    return entry.get("type") == "file" and str(entry.get("name", "")).endswith("/")


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return any(p in _S3_PROTOCOLS for p in _protocols(fs))


# Stores whose fsspec find() takes `prefix` and asks the store for the keys that start so (s3fs, gcsfs, adlfs's blob
# store): elsewhere find() ignores it, and walks the whole folder.
_PREFIX_LISTING_PROTOCOLS = frozenset({*_S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss"})


def lists_by_prefix(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` lists the names that start with a prefix without listing their whole folder (names_starting)."""
    return any(p in _PREFIX_LISTING_PROTOCOLS for p in _protocols(fs))


def names_starting(fs: fsspec.AbstractFileSystem, folder: str, start: str) -> list[str]:
    """The names of the files in `folder` whose names start with `start`, freshly listed: where the store lists by
    prefix (lists_by_prefix), one listing of that prefix alone (a few keys, where a listing of the folder is a page
    per 1,000 of its files); elsewhere a listing of the folder. [] where the folder does not exist."""
    if lists_by_prefix(fs):
        paths = fs.find(folder, prefix=start)  # that prefix listed, never from the cache; [] where none
    else:
        fs.invalidate_cache(folder)
        try:
            paths = fs.ls(folder, detail=False)
        except FileNotFoundError:
            paths = []
    return [name for name in (path.rsplit("/", 1)[-1] for path in paths) if name.startswith(start)]


def place(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str]:
    """`path` of `fs` spelled one way per place, for comparing where things are: (store, path without a trailing
    slash); a local path absolute, with its links resolved (`data`, `./data/`, `/home/me/data` and a link to it are
    one place)."""
    if is_local(fs):
        return "file", os.path.realpath(path)
    return _protocols(fs)[0], path.rstrip("/")


def location(url: str, storage_options: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The place (see `place`) that `url` names."""
    return place(*filesystem(url, storage_options))


def within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    """Whether place `inner` is place `outer` or below it."""
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


@contextmanager
def open_sequential(fs: fsspec.AbstractFileSystem, path: str, *, size: int | None = None) -> Iterator[BinaryIO]:
    """A file object for one front-to-back pass over `path` (a tar). Local files are plain files (the OS reads
    ahead). S3 objects come whole through this process's shard fetcher (s3fetch: many ranged GETs in flight,
    sized by a target rate within a memory budget, ETag-checked; shards named by `prefetch_shards` are already
    on their way). Other object stores get a background reader with a few large ranges in flight
    (prefetch.ReadAhead)."""
    if is_local(fs):
        with fs.open(path, "rb") as f:
            yield f
        return
    if is_s3(fs):
        from wdsembed import s3fetch

        with s3fetch.fetcher_for(fs).open(path, size=size) as f:
            yield f
        return
    from wdsembed.prefetch import ReadAhead

    with ReadAhead(fs, path, size=size) as f:
        yield f


def prefetch_shards(urls: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """Start fetching the S3 shards that this process will open next (in order), so that a shard's first bytes
    are in memory when its turn comes. No-op for local and non-S3 URLs. The same process's open_sequential then
    finds them. A shard named here and then not opened holds memory until `forget_shards` names it."""
    urls = [u for u in urls if protocol(u) in _S3_PROTOCOLS]
    if not urls:
        return
    from wdsembed import s3fetch

    fs, _ = filesystem(urls[0], storage_options)
    s3fetch.fetcher_for(fs).prefetch(urls)


def forget_shards(urls: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """The shards named by `prefetch_shards` that will not be opened after all: their memory goes back. Those
    opened already are not touched. No-op for local and non-S3 URLs."""
    urls = [u for u in urls if protocol(u) in _S3_PROTOCOLS]
    if not urls:
        return
    from wdsembed import s3fetch

    fs, _ = filesystem(urls[0], storage_options)
    s3fetch.fetcher_for(fs).forget(urls)


# ---------------------------------------------------------------------------------------------------------------
# Whole or not at all

# Stores where one PUT makes an object appear whole or not at all, so a temp object renamed after would only add a
# copy and a delete (and a moment where a temp object is listed). fsspec's "memory" store also keeps a file only
# when it is closed; the tests use it as an object store.
_WHOLE_OBJECT_PROTOCOLS = frozenset({*_S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: Union[bytes, Callable[[BinaryIO], None]],
                 before_commit: Callable[[], None] = lambda: None) -> None:
    """Make `path` on `fs` appear whole or not at all: after a failure it holds what it held before (or nothing),
    never a part, and no temp file is left. `data` is the content, or a function that writes it to a binary file.
    `before_commit` runs once the content is written, just before it appears at `path` (the rename or the PUT): what
    must exist before `path` does can finish meanwhile; if it raises, `path` is left as it was.

    * Local disk: a hidden temp file beside the target (``.<name>.tmp-<random>``), created through `fs.open` so that
      a filesystem's own refusals apply (a read-only one raises PermissionError here), written as Arrow's own file
      (no GIL per write), fsynced, then renamed over the target with os.replace (atomic within a folder). Missing
      folders are created. A full disk raises OSError with the same errno, and any error of the temp file (a folder
      this user may not write) its own, naming `path` rather than the temp file.
    * Object stores (S3, GCS, Azure, memory): one PUT, atomic per object; a writer function writes to a local temp
      file first (one without a name, where the system allows: _upload_temp_file), which is then uploaded
      (put_file), so a large output is never held in memory.
    * Other fsspec filesystems (SFTP, HDFS, ...), where a file being written is visible: a temp name beside the
      target through `fs.open`, then `fs.mv` over it.
    The failing write is how an unwritable folder or bucket shows itself (PermissionError, also from s3fs for
    AccessDenied).
    """
    write = data if callable(data) else (lambda f: f.write(data))
    if is_local(fs):
        _write_local(fs, fs._strip_protocol(path), write, before_commit)
    elif writes_whole_objects(fs):
        if not callable(data):
            before_commit()
            _put(fs, path, lambda: fs.pipe_file(path, data))
            return
        with ExitStack() as held:
            try:
                tmp = held.enter_context(_upload_temp_file())
                with _arrow_file(tmp) as f:
                    write(f)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    # pyarrow says 'Error writing bytes to file': a user writing to a bucket looked for a full bucket
                    folder = tempfile.gettempdir()
                    raise OSError(exc.errno, f"{os.strerror(exc.errno)}: cannot write {fs.unstrip_protocol(path)}: its local temp file in "
                                             f"{folder} (TMPDIR) ran out of space before the upload; free space there or "
                                             "set TMPDIR to a folder with room, and run again: finished outputs are "
                                             "kept") from exc
                raise
            before_commit()
            _put(fs, path, lambda: fs.put_file(tmp, path))
    else:
        tmp = temp_name(path)
        try:
            with fs.open(tmp, "wb") as f:
                write(f)
            before_commit()
            fs.mv(tmp, path)
        except BaseException:
            _remove_quietly(fs, tmp)
            raise


@contextmanager
def _upload_temp_file() -> Iterator[str]:
    """The path of an empty local temp file (in TMPDIR) for the block, to write an upload into. Where Linux's
    /proc/self/fd is there, the file has no name in TMPDIR (tempfile.TemporaryFile: O_TMPFILE, or removed at once)
    and the path reaches it through its descriptor, so that it goes with its process however that ends: a worker
    killed mid-upload (by the OOM killer; by its nanny as the run stops) left its named file behind, as large as
    the output, in a folder no run clears. Elsewhere a named file, removed as the block ends."""
    with tempfile.TemporaryFile(prefix="wdsembed-", suffix=".tmp") as unnamed:
        by_descriptor = f"/proc/self/fd/{unnamed.fileno()}"
        if os.path.exists(by_descriptor):
            yield by_descriptor
            return
    fd, named = tempfile.mkstemp(prefix="wdsembed-", suffix=".tmp")
    os.close(fd)
    try:
        yield named
    finally:
        os.unlink(named)


def _put(fs: fsspec.AbstractFileSystem, path: str, put: Callable[[], None]) -> None:
    """An object store's upload of `path`; its failure past the client's retries names the object (naming_url)."""
    try:
        put()
    except Exception as exc:  # noqa: BLE001 - any failure of the store is raised again, naming the object
        _raise_naming(to_url(fs, path), exc)


def writes_whole_objects(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is an object store where one PUT makes an object appear whole (no temp name in the folder)."""
    return any(p in _WHOLE_OBJECT_PROTOCOLS for p in _protocols(fs))


# The longest file name most filesystems take (NAME_MAX, in bytes), and what a temp name adds to the name it holds.
NAME_MAX = 255
_TEMP_NAME_EXTRA = len(".") + len(".tmp-") + 32


def temp_name(path: str) -> str:
    """A temp file's name beside `path`: `.<name>.tmp-<32 hex>` (outputclaim.TEMP_FILE finds those that runs killed
    mid-write left behind), with `<name>` cut short where the whole would pass NAME_MAX: a shard of a name that
    long (a legal one, of 218 bytes or more) otherwise got no .idx, no output, and aborted the run's planning."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{shortened(name, NAME_MAX - _TEMP_NAME_EXTRA)}.tmp-{uuid.uuid4().hex}")


def shortened(name: str, max_bytes: int) -> str:
    """`name`, cut (by whole characters) to at most `max_bytes` bytes of the file name it spells."""
    while len(name.encode("utf-8", "surrogateescape")) > max_bytes:
        name = name[:-1]
    return name


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except OSError:  # never written, or already gone
        pass


def _arrow_file(path: str) -> pa.NativeFile:
    """`path` opened for writing as Arrow's own file, whose writes run without the GIL. pyarrow writing a table to a
    Python file object takes the GIL for each of its writes (about 170 per 80 MB table), and waits for it whenever
    another thread runs Python: in a GPU worker, whose other threads do, a shard's two 80 MB writes took over a
    second. On the 2-core machine, one busy Python thread made such a write 6x slower, and three 23x; this way 1.2x."""
    return pa.OSFile(path, "wb")


def _write_local(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[BinaryIO], None],
                 before_commit: Callable[[], None]) -> None:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        fs.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, os.path.basename(temp_name(path)))
    try:
        with fs.open(tmp, "wb"):  # created through the filesystem, so that its own refusals apply
            pass
        with _arrow_file(tmp) as f:
            write(f)
            os.fsync(f.fileno())
    except BaseException as exc:
        _remove_quietly(fs, tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            # The errno stays (faults.is_disk_full); the message names the target, not the temp file.
            raise OSError(exc.errno, f"{os.strerror(exc.errno)}: cannot write {path} (nothing partial is left; "
                                     "free space there and run again: finished outputs are kept)") from exc
        if isinstance(exc, OSError) and exc.filename == tmp:
            # Named as the target: the temp name is random, and in many shards' reasons would make one cause (a
            # folder this user may not write) look like as many causes.
            raise type(exc)(exc.errno, exc.strerror, path) from exc
        raise
    try:
        # What before_commit raises is its own, passed on as it is: a kNN view's full disk, written in a thread
        # beside this file, already names the view and says what to do.
        before_commit()
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------
# What a killed upload leaves


def abort_incomplete_uploads(fs: fsspec.AbstractFileSystem, root: str, names: Callable[[str], bool],
                             initiated_before: float) -> list[str]:
    """Abort the incomplete multipart uploads under folder `root` of an S3 store whose key, relative to `root`,
    `names` accepts and that were initiated before `initiated_before` (epoch seconds); their paths relative to
    `root`. A process killed during a large upload (s3fs uploads files over 100 MB in parts) leaves one: in no
    listing, yet its parts are stored, and billed, until it is aborted. Other stores: []. A refusal to list or abort
    (a policy without s3:ListBucketMultipartUploads or s3:AbortMultipartUpload) raises as s3fs raises it
    (PermissionError)."""
    if not is_s3(fs):
        return []
    bucket, key, _ = fs.split_path(root)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    stale, page_marks = [], {}
    while True:  # s3fs's list_multipart_uploads asks for the whole bucket, one page only
        page = _call_s3(fs, f"listing the uploads under s3://{bucket}/{prefix}", "list_multipart_uploads",
                        Bucket=bucket, Prefix=prefix, **page_marks)
        for upload in page.get("Uploads") or []:
            initiated = upload.get("Initiated")
            if (upload["Key"].startswith(prefix) and names(upload["Key"][len(prefix):])
                    and initiated is not None and initiated.timestamp() < initiated_before):
                stale.append((upload["Key"], upload["UploadId"]))
        if not page.get("IsTruncated"):
            break
        page_marks = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}
    aborted = []
    for upload_key, upload_id in stale:
        try:
            _call_s3(fs, f"aborting the upload of s3://{bucket}/{upload_key}", "abort_multipart_upload",
                     Bucket=bucket, Key=upload_key, UploadId=upload_id)
        except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
            continue
        aborted.append(upload_key[len(prefix):])
    return sorted(aborted)


def _call_s3(fs: fsspec.AbstractFileSystem, doing: str, operation: str, **kwargs: Any) -> dict:
    """s3fs's `call_s3`, its errors saying what was being done (s3fs's say "Access Denied" and no more)."""
    try:
        return fs.call_s3(operation, **kwargs)
    except OSError as exc:
        raise type(exc)(f"{doing}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# Preflight: fail at once, naming the URL, where a store cannot be used at all


# A path missing there may be a missing bucket rather than a new prefix.
_BUCKET_PROTOCOLS = BUCKET_PROTOCOLS


def _not_an_s3_answer(fs: fsspec.AbstractFileSystem, exc: BaseException) -> str | None:
    """Where `exc` came from an endpoint that does not speak S3 (endpoint_url naming another HTTP service: a web
    console's port, a Prefect server), what it answered. botocore makes such an answer an error of the bare HTTP
    status (404, or 500 for a 200 it cannot parse), which s3fs raises as a missing bucket or a server error: the
    message blamed the bucket or the store. An S3 store's errors carry a code (NoSuchBucket) in an XML body, or an
    x-amz-request-id header (a HEAD's error has no body)."""
    if not is_s3(fs):
        return None
    cause = exc
    while cause is not None and not hasattr(cause, "response"):
        cause = cause.__cause__  # s3fs raises its own errors from botocore's
    response = getattr(cause, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    meta = response.get("ResponseMetadata", {})
    headers = {k.lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}
    kind = headers.get("content-type", "")
    if not code.isdigit() or code in ("502", "503", "504") or "x-amz-request-id" in headers or "xml" in kind:
        return None  # an S3 store's error, or a gateway's in front of one (an outage, said as before)
    try:
        endpoint = fs.s3.meta.endpoint_url
    except Exception:  # noqa: BLE001 - no client yet: name the option instead
        endpoint = getattr(fs, "endpoint_url", None) or "the store's endpoint"
    answered = f"HTTP {meta.get('HTTPStatusCode', code)}" + (f", {kind.split(';')[0]}" if kind else "")
    return (f"the endpoint {endpoint} does not answer as an S3 store ({answered}): check endpoint_url (a storage "
            "option, or AWS_ENDPOINT_URL)")


def _explain(url: str, exc: BaseException, action: str, fs: fsspec.AbstractFileSystem | None = None) -> StoreError:
    if fs is not None and (not_s3 := _not_an_s3_answer(fs, exc)):
        return StoreError(f"cannot {action} {url}: {not_s3}")
    name = type(exc).__name__
    text = str(exc) or name
    if isinstance(exc, PermissionError):
        return StoreError(f"cannot {action} {url}: access denied ({text}); check the credentials: {credentials_hint()}")
    if "credential" in name.lower() or "credential" in text.lower():
        return StoreError(f"cannot {action} {url}: no usable credentials ({text}); {credentials_hint()}")
    return StoreError(f"cannot {action} {url}: {name}: {text}")


def _check_bucket(fs: fsspec.AbstractFileSystem, path: str, url: str, action: str) -> None:
    """Raise StoreError naming `url` if the bucket of `path` (a missing path) does not exist or cannot be asked
    about (other than by a refusal: a policy may allow a prefix and not the bucket). The store is asked about the bucket itself (HEAD bucket on S3): the error that said `path` is missing
    names the path, whose bucket or prefix may well have "bucket" in its name. Stores without buckets pass."""
    if not any(p in _BUCKET_PROTOCOLS for p in _protocols(fs)):
        return
    bucket = fs._strip_protocol(path).strip("/").split("/", 1)[0]
    try:
        fs.info(bucket, refresh=True)  # not from a cached list of buckets, which holds only the user's own
    except FileNotFoundError:  # a HEAD: its error has no body to tell an S3 store's from another server's
        raise StoreError(f"cannot {action} {url}: the bucket {bucket} does not exist") from None
    except PermissionError:
        return  # a user allowed only a prefix of a shared bucket may not ask about the bucket: the path's answer stands
    except Exception as exc:  # noqa: BLE001 - any other failure to ask is reported with the URL
        raise _explain(url, exc, action, fs) from None


def check_input(url: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Raise StoreError naming `url` unless it can be listed (one LIST request on object stores)."""
    try:
        fs, path = filesystem(url, storage_options)
    except Exception as exc:  # noqa: BLE001
        raise _explain(url, exc, "read input") from None
    try:
        fs.invalidate_cache(path)  # a long-lived process must see shards added since its last listing
        fs.ls(path, detail=False)
    except FileNotFoundError as exc:
        if not_s3 := _not_an_s3_answer(fs, exc):
            raise StoreError(f"cannot read input {url}: {not_s3}") from None
        _check_bucket(fs, path, url, "read input")
        raise StoreError(f"input {url} does not exist") from None
    except NotADirectoryError:
        raise StoreError(f"input {url} is not a folder of *.tar shards") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to list is reported with the URL
        raise _explain(url, exc, "read input", fs) from None


def check_output(url: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Raise StoreError naming `url` when the output's bucket is missing or cannot be read with these credentials.
    A folder (prefix) that does not exist yet is fine: writing creates it. Writes nothing (and never creates a
    bucket, which fsspec's makedirs would do)."""
    try:
        fs, path = filesystem(url, storage_options)
    except Exception as exc:  # noqa: BLE001
        raise _explain(url, exc, "write output") from None
    if is_local(fs):
        return  # created on first write; a read-only folder shows at that write, naming the file
    try:
        found = fs.info(path)
        if found.get("type") == "file" and is_s3(fs):
            _check_lists_as_s3(fs, path)
    except FileNotFoundError as exc:
        if not_s3 := _not_an_s3_answer(fs, exc):
            raise StoreError(f"cannot write output {url}: {not_s3}") from None
        _check_bucket(fs, path, url, "write output")  # else a new prefix
    except Exception as exc:  # noqa: BLE001
        raise _explain(url, exc, "write output", fs) from None
    finally:
        fs.invalidate_cache(path)  # other processes write here: never trust a listing of it later


def _check_lists_as_s3(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """One listing of at most one key under `path`, which a HEAD found to be an object: a web server (endpoint_url
    naming a console's port) answers every HEAD with 200, and no error tells it from S3; its answer to a listing,
    a page where XML is expected, raises what _not_an_s3_answer recognizes. Of an S3 store's answer nothing is
    kept: an object at OUTPUT's own key is no folder's, but the run writes under it all the same."""
    bucket, key, _ = fs.split_path(path)
    fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
