"""Which shards a run's INPUT names (find_shards), and what each one's output is called.

What INPUT may be:

* a folder: its `*.tar` files; with `recursive`, also those of its subfolders at any depth (hidden files and
  folders excepted, either way: macOS's `._00000.tar` is no shard);
* a brace pattern as WebDataset users write it: `/data/{00000..00999}.tar`, `s3://b/p/{00000..00009}.tar`,
  `/data/{train,val}/{0000..0099}.tar` (every shard it names must exist); a name that exists as written, braces
  and all (a folder `run{1,2}/`, a shard `a{b,c}.tar`, or `a*b.tar`: braces and `*` are legal in file names and S3
  keys), is what it names, not a pattern (exists_as_written);
* one `.tar` file;
* a list file, `*.txt`: one shard per line (a path, a URL, or a brace pattern; relative paths are relative to the
  list file's folder; blank lines and `#` comments are skipped).

A local path is taken as its folder's listing spells it (`/data//00000.tar`, `/data/./00000.tar` are
`/data/00000.tar`), and a shard named twice, in any spelling, is embedded once.

Each shard's output is `OUTPUT/<stem>.parquet`, where the stem is the shard's path relative to the input's root
folder without `.tar`: the folder itself, the folder before a pattern's first brace, or the deepest folder holding
every shard of a list file. Shards of subfolders keep their subfolder (`OUTPUT/train/00000.parquet`), so two
`00000.tar` in different folders never share an output; the stem is the shard's name everywhere (manifest,
caching, validation).
"""
from __future__ import annotations

import codecs
import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from fsspec.core import split_protocol

from wdsembed import output, storage
from wdsembed.config import EmbedConfig, canonical_file_url, credentials_in_url, option, unsupported_url_form
from wdsembed.storeoptions import url_has_credentials
from wdsembed.threads import ContextThreadPool


class InputError(ValueError):
    """The run's input cannot be used; says what to change."""


LIST_SUFFIX = ".txt"
# Names under OUTPUT that are not shard outputs: a shard whose stem starts with one would collide with them.
RESERVED_OUTPUT_NAMES = ("_prefect_results", output.EMBEDDINGS_FOLDER)
# What readers of OUTPUT as one dataset (pyarrow.dataset, pandas.read_parquet, Spark) skip: every file or folder
# whose name starts with one of these. A shard output there would silently vanish from the dataset read.
SKIPPED_PREFIXES = ("_", ".")


def input_kind(url: str, storage_options: Optional[Mapping[str, str]] = None) -> str:
    """'list' (a .txt list file), 'pattern' (braces that expand, where the name does not exist as written:
    exists_as_written, which asks an object store only where `storage_options` are given), 'tar' (one shard) or
    'folder'. InputError for unbalanced braces in a name that does not exist as written."""
    if url.lower().endswith(LIST_SUFFIX):
        return "list"
    if _named(url, url, storage_options) != [url]:
        return "pattern"
    if url.lower().endswith(".tar"):
        return "tar"
    return "folder"


def input_folder(url: str, storage_options: Optional[Mapping[str, str]] = None) -> str:
    """The folder an input lives in: the folder itself, the folder before a pattern's first brace, the folder of
    a single .tar or of a list file (URLs keep their protocol)."""
    kind = input_kind(url, storage_options)
    if kind == "folder":
        return url
    if kind == "pattern":
        url = url[: url.index("{")]
        if url.endswith("/"):
            return url[:-1] or "/"
        return posixpath.dirname(url) or "."
    return posixpath.dirname(url) or "."


def _named(url: str, where: str, storage_options: Optional[Mapping[str, str]]) -> list[str]:
    """The URLs that `url` names: itself where it holds no brace or exists as written, else its brace expansion
    (InputError for unbalanced braces, naming `where`)."""
    if "{" not in url and "}" not in url or exists_as_written(url, storage_options):
        return [url]
    return _expand(url, where)


# How long an object store's answer to exists_as_written is taken as it is: a run asks it of its INPUT at each of its
# checks and again as it plans (one HEAD, and on its 404 a one-key LIST, each time); a long-lived process must see a
# key made or removed since.
_ASKED_FOR_S = 60.0
_asked: dict[tuple[str, str], tuple[float, bool]] = {}


def exists_as_written(url: str, storage_options: Optional[Mapping[str, str]] = None) -> bool:
    """Whether `url`, taken as written (no brace expanded, no wildcard), names a file or folder that exists: `{`,
    `}`, `*`, `?` and `[` are legal in file names and S3 keys (`run{1}/`, `a{b,c}.tar`, `best*photos/`), and a name
    that exists so is what it names. A local path is asked of the disk; an object store's object or prefix only
    where `storage_options` are given (where they are not, the name is not asked after: a brace pattern, a `*` a
    wildcard). A store that cannot answer (no credentials, no bucket, which the checks that follow say) is a no."""
    if "::" in url:
        return False
    if _is_local_url(url):
        return os.path.lexists(split_protocol(url)[1])
    if storage_options is None:
        return False
    key = (url, json.dumps(dict(storage_options), sort_keys=True, default=str))
    known = _asked.get(key)
    if known is not None and time.monotonic() - known[0] < _ASKED_FOR_S:
        return known[1]
    try:
        fs, path = storage.filesystem(url, storage_options)
        fs.info(path.rstrip("/"), refresh=True)  # an object (HEAD), else a prefix with a key below it
        exists = True
    except Exception:  # noqa: BLE001 - missing, or the store cannot be asked: taken as a pattern, as before
        exists = False
    if len(_asked) > 1024:
        _asked.clear()
    _asked[key] = (time.monotonic(), exists)
    return exists


def _expand(pattern: str, where: str) -> list[str]:
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        return list(braceexpand(pattern))
    except UnbalancedBracesError:
        raise InputError(f"{where}: unbalanced braces in {pattern!r}: write a range as {{00000..00999}} or a list "
                         "as {a,b}") from None


@dataclass
class FoundShards:
    """The shards of a run, as paths of one filesystem, and the files beside them (for img2dataset siblings)."""

    fs: Any
    root: str  # the folder that stems are relative to (a path of `fs`, no protocol)
    tars: list[str]  # sorted
    files: set[str] = field(default_factory=set)  # every file listed in the shards' folders
    # the subfolders listed there: a shard's parquet written as a folder (Spark, Dask) is one, not a file
    folders: set[str] = field(default_factory=set)

    def stem(self, tar: str) -> str:
        rel = posixpath.relpath(tar, self.root) if self.root else tar.lstrip("/")
        return rel[: -len(".tar")]

    def parquet(self, tar: str) -> Optional[str]:
        """The shard's img2dataset parquet beside it (`00000.parquet`): one file, or a folder of part files as Spark
        and Dask write one (shards.read_rows reads either); None where it has none."""
        path = tar[: -len(".tar")] + ".parquet"
        return path if path in self.files or path in self.folders else None


def find_shards(config: EmbedConfig, *, fresh: bool = False) -> FoundShards:
    """The shards that config.input names (see the module docstring), or InputError saying what is wrong: a
    folder without shards (naming subfolders that hold some, for `recursive`), a shard of a pattern or list that
    does not exist, a list line that is not a .tar, two shards that would share an output. `fresh`: check_storage
    has just listed INPUT's folder (input_folder), and its listing in the filesystem's cache is taken as it is, not
    made again (on an object store, hundreds of LIST requests at 100,000 shards)."""
    refuse_wildcard(config.input, f"input {config.input!r}", config.storage_options)
    kind = input_kind(config.input, config.storage_options)
    if kind == "folder":
        found = _find_in_folder(config)
    else:
        if kind == "list":
            urls = _list_file_entries(config)
        elif kind == "pattern":
            urls = _expand(config.input, "input")
        else:  # one .tar, as written (input_kind: braces and all, where it exists so)
            urls = [config.input]
        found = _find_named(config, urls, kind, fresh=fresh)
    _check_stems(config, found)
    return found


def _find_in_folder(config: EmbedConfig) -> FoundShards:
    fs, root = storage.filesystem(config.input, config.storage_options)
    if not fs.exists(root):
        raise InputError(f"input {config.input!r} does not exist")
    if not fs.isdir(root):
        raise InputError(f"input {config.input!r} is not a folder of *.tar shards" + compressed_file(root))
    if config.recursive:
        fs.invalidate_cache(root)  # a long-lived process must see shards added since its last listing
        try:
            # locally, an unreadable subfolder must fail the listing, not vanish from it (fsspec's walk omits it by
            # default); object stores list a prefix flat and have no such option
            options = {"on_error": "raise"} if storage.is_local(fs) else {}
            # locally with the folders: an empty `00000.parquet/` (a write that did not finish) is the shard's parquet,
            # which the shard says it cannot read, as without `recursive`; on an object store an empty folder is no
            # prefix, and the folders are those of the files (_parent_folders)
            listed = fs.find(root, withdirs=storage.is_local(fs), detail=True, **options).values()
            files = set(storage.listed_files(fs, listed))
        except PermissionError as exc:
            raise InputError(f"a subfolder of input {config.input!r} cannot be read by this user ({exc}): give it "
                             "read and execute permission (chmod a+rx) or run as a user who can read it") from None
        _refuse_compressed(config, root, files, recursive=True)
        tars = sorted(p for p in files if _is_shard(p, root))
        if not tars:
            raise InputError(f"input {config.input!r} holds no *.tar shards, in no subfolder either")
        return FoundShards(fs, root, tars, files, _parent_folders(files, root) | set(storage.listed_folders(listed)))
    entries = fs.ls(root, detail=True)
    files = set(storage.listed_files(fs, entries))
    _refuse_compressed(config, root, files, recursive=False)
    tars = sorted(p for p in files if _is_shard(p, root))
    if not tars:
        nested = sorted(p for p in storage.listed_files(fs, fs.find(root, withdirs=False, detail=True).values())
                        if _is_shard(p, root))
        if nested:
            example = posixpath.relpath(nested[0], root)
            raise InputError(f"input {config.input!r} holds no *.tar shards directly, but its subfolders hold "
                             f"{len(nested)} (e.g. {example}): pass {option('recursive')} to embed them, "
                             "or a brace pattern or list file naming them")
        raise InputError(f"input {config.input!r} holds no *.tar shards")
    return FoundShards(fs, root, tars, files, set(storage.listed_folders(entries)))


def _parent_folders(files: set[str], root: str) -> set[str]:
    """The folders below `root` that hold the files of a recursive listing (which lists files only)."""
    top = root.rstrip("/")
    folders: set[str] = set()
    for path in files:
        folder = posixpath.dirname(path)
        while folder.startswith(top + "/") and folder not in folders:
            folders.add(folder)
            folder = posixpath.dirname(folder)
    return folders


def refuse_wildcard(url: str, what: str, storage_options: Optional[Mapping[str, str]] = None) -> None:
    """A `*` is a shell's wildcard, which nothing here expands: said as such, not as a shard named '*.tar' that does
    not exist. A name that exists as written (a folder `best*photos`, a shard `a*b.tar`; in a brace pattern, one of
    the names it expands to) is what it names. On an object store (asked where `storage_options` are given) a
    pattern's names are not asked one by one: those of its folder's listing are its shards, and one holding `*` that
    is not there is said to be a wildcard then (_find_named)."""
    if "*" not in url or exists_as_written(url, storage_options):
        return
    local = _is_local_url(url)
    try:
        named = _expand(url, url) if "{" in url or "}" in url else [url]
    except InputError:  # unbalanced braces: said where the input is read
        named = [url]
    if local and any(exists_as_written(u) for u in named if u != url):
        return
    if not local and storage_options is not None and len(named) > 1:
        # the folder before the first brace, which the store check lists before any shard is named (input_folder)
        head = url[: url.index("{")]
        head = head[:-1] if head.endswith("/") else posixpath.dirname(head)
        if "*" not in head or exists_as_written(head, storage_options):
            return
    raise InputError(wildcard_said(url, what))


def wildcard_said(url: str, what: str) -> str:
    folder = posixpath.dirname(url[: url.index("*")]) or "."
    return (f"{what} is a wildcard pattern, which is not expanded: name the shards with a brace pattern "
            f"('{folder}/{{00000..00099}}.tar'), or pass the folder that holds them ({folder!r})")


def _is_local_url(url: str) -> bool:
    return "::" not in url and storage.protocol(url) in ("file", "local")


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar")


# Shards as webdataset reads them too (it decompresses by extension); DALI's reader and .idx take plain tars only.
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")


def _compressed_tar_stem(path: str) -> Optional[str]:
    """`x/00001` for `x/00001.tar.gz` (any letter case), None for any other name."""
    lower = path.lower()
    return next((path[: -len(e)] for e in _COMPRESSED_TAR if lower.endswith(e)), None)


_DECOMPRESS = {"gz": "gzip", "tgz": "gzip", "bz2": "bzip2", "tbz2": "bzip2", "xz": "xz", "txz": "xz", "zst": "zstd",
               "lz4": "lz4"}


def _decompress_example(path: str) -> str:
    """How to decompress the compressed shard `path` beside itself, as a command line."""
    name = posixpath.basename(path)
    return f"{_DECOMPRESS[name.rsplit('.', 1)[-1].lower()]} -dc {name} > {_compressed_tar_stem(name)}.tar"


def compressed_file(path: str) -> str:
    """What to add where INPUT is one compressed shard."""
    if _compressed_tar_stem(path) is None:
        return ""
    return (f"; it is a compressed shard, which this run does not read: DALI reads plain *.tar only: decompress it "
            f"({_decompress_example(path)}) and pass that .tar")


def _refuse_compressed(config: EmbedConfig, root: str, files: set[str], recursive: bool) -> None:
    """A folder input's compressed shards (its own, or its subfolders' with `recursive`) would be left out without
    a word: refused, naming them, unless each has its plain tar beside it."""
    lost = sorted(p for p in files
                  if (stem := _compressed_tar_stem(p)) is not None and stem + ".tar" not in files
                  and not any(part.startswith(".") for part in posixpath.relpath(p, root).split("/"))
                  and (recursive or posixpath.dirname(p) == root.rstrip("/")))
    if lost:
        names = [posixpath.relpath(p, root) for p in lost]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise InputError(f"input {config.input!r} holds {len(names)} compressed shard(s) that this run would not "
                         f"read: {shown}. DALI reads plain *.tar only: decompress each beside itself "
                         f"({_decompress_example(names[0])}), or name the *.tar shards alone with a brace pattern or "
                         "a list file")


def _is_shard(path: str, root: str) -> bool:
    """A `*.tar` of a folder input, hidden ones (`.x.tar`, macOS's `._00000.tar`, any under `.cache/`) left out
    alike with and without `recursive`."""
    return _is_tar(path) and not any(part.startswith(".") for part in posixpath.relpath(path, root).split("/"))


def _list_file_entries(config: EmbedConfig) -> list[str]:
    """The shard URLs of a list file: one per line, brace patterns expanded, relative paths made relative to the
    list file's folder."""
    fs, path = storage.filesystem(config.input, config.storage_options)
    try:
        text = storage.cat_whole(fs, path).decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"input {config.input!r} does not exist: pass a folder of *.tar shards, a brace pattern, "
                         "or a .txt file listing one shard per line") from None
    except IsADirectoryError:
        raise InputError(f"input {config.input!r} is a folder: a .txt input is read as a list of shards") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"input {config.input!r} is not a text file listing shards ({exc})") from None
    base = input_folder(config.input, config.storage_options)
    lines: list[tuple[int, str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if url_has_credentials(line):  # said without the line: each shard's URL goes to logs and outputs' footers
            raise InputError(f"{config.input} line {number}: {credentials_in_url(line)}")
        unsupported = unsupported_url_form(line)
        if unsupported:
            raise InputError(f"{config.input} line {number}: {unsupported}")
        given = line
        line = canonical_file_url(line)
        if line.startswith("~") and storage.protocol(base) in ("file", "local"):
            line = os.path.expanduser(line)  # as INPUT's own `~` (config.absolute_local_path)
        if "://" not in line and not os.path.isabs(line):
            line = posixpath.join(base, line)
        lines.append((number, given, line))
    # On an object store, lines with braces are asked whether they exist as written 16 at a time (exists_as_written
    # keeps the answers); lines holding `*` are not asked one by one (a list of 100,000 shards of a folder
    # `best*photos/`): one that its folder's listing lacks is said to be a wildcard there (_find_named).
    braced = [line for _, _, line in lines if "{" in line or "}" in line]
    if braced and not _is_local_url(braced[0]):
        with ContextThreadPool(min(16, len(braced))) as pool:
            list(pool.map(lambda u: exists_as_written(u, config.storage_options), braced))
    urls: list[str] = []
    for number, given, line in lines:
        if _is_local_url(line):
            refuse_wildcard(line, f"{config.input} line {number}: {given!r}")
        for url in _named(line, f"{config.input} line {number}", config.storage_options):
            if not _is_tar(url):
                raise InputError(f"{config.input} line {number}: {url!r} is not a .tar shard" + compressed_file(url))
            urls.append(url)
    if not urls:
        raise InputError(f"list file {config.input!r} names no shards (one .tar path or URL per line)")
    return urls


def _find_named(config: EmbedConfig, urls: list[str], kind: str, *, fresh: bool = False) -> FoundShards:
    """Shards named one by one (pattern, .tar, list file): each must exist; their folders are listed once each."""
    protocols = sorted({storage.protocol(u) for u in urls})
    if len(protocols) > 1:
        raise InputError(f"input {config.input!r} names shards on several stores ({', '.join(protocols)}): one "
                         "run reads one store")
    bad = [u for u in urls if not _is_tar(u)]
    if bad:
        raise InputError(f"input {config.input!r} names {bad[0]!r}, which is not a .tar shard"
                         + compressed_file(bad[0]))
    fs, _ = storage.filesystem(urls[0], config.storage_options)
    spelled = _local_spelling if storage.is_local(fs) else str
    # a shard named twice is embedded once, also where two spellings name it (`00000.tar`, `./00000.tar`)
    tars = sorted(dict.fromkeys(spelled(fs._strip_protocol(u)) for u in urls))
    folders = sorted({posixpath.dirname(t) for t in tars})
    # listed by check_storage just now
    checked = fs._strip_protocol(input_folder(config.input, config.storage_options)) if fresh else None

    def listing(folder: str) -> tuple[set[str], set[str]]:
        if folder != checked:
            fs.invalidate_cache(folder)
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:
            return set(), set()
        except Exception:  # noqa: BLE001 - said with the URL and what to do (credentials, bucket)
            try:
                storage.check_input(storage.to_url(fs, folder), config.storage_options)
            except storage.StoreError as exc:
                raise InputError(str(exc)) from None
            raise
        return set(storage.listed_files(fs, entries)), set(storage.listed_folders(entries))

    with ContextThreadPool(max(1, min(16, len(folders)))) as pool:
        listings = list(pool.map(listing, folders))
    files = set().union(*(f for f, _ in listings))
    missing = [t for t in tars if t not in files]
    wildcard = next((t for t in missing if "*" in t), None)
    if wildcard is not None:  # a pattern's or list line's name on an object store (refuse_wildcard)
        raise InputError(wildcard_said(storage.to_url(fs, wildcard),
                                       f"{storage.to_url(fs, wildcard)!r} (named by input {config.input!r})"))
    if missing:
        shown = ", ".join(storage.to_url(fs, t) for t in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{len(missing)} of the {len(tars)} shard(s) that input {config.input!r} names do not "
                         f"exist: {shown}{more}")
    if kind == "pattern":
        root = spelled(fs._strip_protocol(input_folder(config.input, config.storage_options)))
    elif kind == "tar":
        root = posixpath.dirname(tars[0])
    else:  # the deepest folder holding every listed shard ("" when they share none: other buckets)
        root = posixpath.commonpath(folders)
    return FoundShards(fs, root, tars, files, set().union(*(d for _, d in listings)))


def _local_spelling(path: str) -> str:
    """A local path as a folder's listing spells it: `a//b`, `a/./b` and `a/x/../b` are `a/b` (`x/..` is dropped
    as text, even where x is a link). Object stores keep their keys as given: there `a//b` is a key of its own."""
    path = posixpath.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("//") else path  # POSIX keeps a leading `//`; Linux reads `/`


# The settings that name files or folders.
PATH_FIELDS = ("input", "output", "result_storage", "index_cache_dir", "checkpoint")


def check_path_names(config: EmbedConfig) -> None:
    """Every path the run takes must be UTF-8 text: its parquet files (pyarrow opens a path by its UTF-8 bytes),
    their `shard` column and Prefect's API (JSON) take nothing else."""
    for name in PATH_FIELDS:
        value = getattr(config, name)
        if value:
            refuse_name_not_utf8(value, f"{option(name)} '{_readable(value)}'")


def refuse_name_not_utf8(path: str, what: str) -> None:
    """InputError where `path` is not the UTF-8 text of its name: this Python decodes file names otherwise (the
    POSIX locale with PYTHONUTF8=0, a Latin-1 locale), or the name holds bytes that are not UTF-8."""
    if path.isascii():
        return
    encoding = sys.getfilesystemencoding()
    if codecs.lookup(encoding).name != "utf-8":
        # pyarrow would write OUTPUT's files elsewhere than Python (ISO-8859-1: out Ã© for out é), and Prefect's API
        # refuses the bytes ASCII cannot decode
        raise InputError(f"{what}: this Python reads file names as {encoding} (its locale), but the run's parquet "
                         "files and Prefect take them as UTF-8: run it in Python's UTF-8 mode (PYTHONUTF8=1, or "
                         "python -X utf8)")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} holds bytes that are not UTF-8 (shown as \\xNN), which the run's parquet files "
                         "and Prefect cannot take: rename it") from None


def _readable(path: str) -> str:
    """A path's name as UTF-8 text, whatever this Python decoded it as; a byte that is not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if not path.isascii() else path


def _check_stems(config: EmbedConfig, found: FoundShards) -> None:
    """Two shards must never share an output (`x.tar` and `x.TAR`), nor take a name OUTPUT uses for itself, nor
    one that dataset readers skip, nor (OUTPUT on a local disk) one too long for a file name."""
    seen: dict[str, str] = {}
    local_output = storage.is_local(storage.filesystem(config.output, config.storage_options)[0])
    for tar in found.tars:
        stem = found.stem(tar)
        refuse_name_not_utf8(stem, f"shard '{_readable(storage.to_url(found.fs, tar))}'")  # its output's name
        name = f"{posixpath.basename(stem)}.parquet"
        if local_output and len(name.encode()) > storage.NAME_MAX:
            # the tar's own name fits, 3 bytes shorter; only its output's cannot be written
            raise InputError(f"shard {storage.to_url(found.fs, tar)} would write OUTPUT/{stem}.parquet, a file name "
                             f"of {len(name.encode())} bytes, over the {storage.NAME_MAX} a file system allows: "
                             "rename the shard")
        if stem in seen:
            raise InputError(f"shards {storage.to_url(found.fs, seen[stem])} and {storage.to_url(found.fs, tar)} "
                             f"would both write OUTPUT/{stem}.parquet: rename one")
        seen[stem] = tar
        parts = stem.split("/")
        if len(parts) > 1 and parts[0] in RESERVED_OUTPUT_NAMES:
            raise InputError(f"shard {storage.to_url(found.fs, tar)} would write OUTPUT/{stem}.parquet, inside a "
                             f"folder OUTPUT keeps for itself: rename its folder")
        skipped = next((i for i, part in enumerate(parts) if part.startswith(SKIPPED_PREFIXES)), None)
        if skipped is not None:
            name = posixpath.basename(tar) if skipped == len(parts) - 1 else parts[skipped]
            what = "the shard" if skipped == len(parts) - 1 else "its folder"
            raise InputError(f"shard {storage.to_url(found.fs, tar)} would write OUTPUT/{stem}.parquet, which "
                             "pyarrow.dataset, pandas.read_parquet and Spark skip (as they skip every name starting "
                             f"with '_' or '.'): its rows would vanish from OUTPUT read as a dataset; rename {what} "
                             f"{name!r} to a name that does not start with {name[0]!r}")
