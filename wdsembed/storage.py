"""Where shards and outputs live: local folders or any fsspec URL (s3://...), through one small API.

Credentials never travel in `storage_options`: the options are part of the run's parameters, which Prefect stores
in its database. They come from where the store's own library looks (for S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE or `profile=`, ~/.aws, instance roles);
`storage_options` carries only the rest (endpoint_url, region_name, profile, timeouts).
"""
from __future__ import annotations

import posixpath
import re
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

import fsspec
from fsspec.core import split_protocol, url_to_fs

# storage_options names that carry credentials (s3fs key/secret/token, adlfs account_key/sas_token, passwords...)
SECRET_OPTION_PATTERN = r"(^|_)(key|secret|token|password|passwd|pwd|credential|credentials|connection_string|sas)(_|$)"

_SECRET_OPTION = re.compile(SECRET_OPTION_PATTERN, re.IGNORECASE)
CREDENTIALS_HINT = (
    "credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), "
    "an AWS profile (AWS_PROFILE or --storage-option profile=NAME) or the store's own credential files"
)

_S3_PROTOCOLS = ("s3", "s3a")
# Strings from the CLI (`--storage-option read_timeout=30`) that s3fs wants as numbers.
_S3_INT_OPTIONS = ("default_block_size", "max_concurrency", "max_attempts")
_S3_FLOAT_OPTIONS = ("connect_timeout", "read_timeout", "listings_expiry_time")
# botocore settings accepted as top-level options here (connect_timeout, read_timeout, max_attempts, retry_mode),
# passed on in s3fs's `config_kwargs`, with these defaults.
# Transient store errors (timeouts, 5xx, SlowDown, dropped connections) are retried by botocore (these attempts,
# with backoff) and again by s3fs around each call and body read; 403/404 are never retried, so a missing bucket
# or wrong credentials fail at once.
S3_DEFAULTS = {"max_attempts": 8, "retry_mode": "standard", "connect_timeout": 10.0, "read_timeout": 60.0}


class StoreError(ValueError):
    """A store location cannot be used (missing bucket, access denied, no credentials); names the URL."""


def secret_options(storage_options: Mapping[str, Any]) -> list[str]:
    """The option names (or names whose URL values) that would carry credentials."""
    bad = []
    for name, value in storage_options.items():
        if _SECRET_OPTION.search(name):
            bad.append(name)
        elif isinstance(value, str) and "://" in value and _url_password(value):
            bad.append(name)
    return bad


def url_has_password(url: str) -> bool:
    return "://" in url and _url_password(url)


def _url_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def protocol(url: str) -> str:
    """'s3' for s3://bucket/x, 'file' for local paths; the outermost protocol of chained URLs."""
    proto, _ = split_protocol(url.split("::", 1)[-1] if "::" in url else url)
    return proto or "file"


def fsspec_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for the filesystem of `url`: CLI strings turned into the types the back end wants,
    and, for S3, retry and timeout defaults."""
    options: dict[str, Any] = {}
    for name, value in dict(storage_options or {}).items():
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        options[name] = value
    if protocol(url) not in _S3_PROTOCOLS:
        return options
    for name in _S3_INT_OPTIONS:
        if isinstance(options.get(name), str):
            options[name] = int(options[name])
    for name in _S3_FLOAT_OPTIONS:
        if isinstance(options.get(name), str):
            options[name] = float(options[name])
    if "region_name" in options:  # s3fs would hand it to botocore's session, which refuses it: the client takes it
        options["client_kwargs"] = {**(options.get("client_kwargs") or {}), "region_name": options.pop("region_name")}
    botocore = {name: options.pop(name, default) for name, default in S3_DEFAULTS.items()}
    config = dict(options.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", botocore["connect_timeout"])
    config.setdefault("read_timeout", botocore["read_timeout"])
    config.setdefault("retries", {"max_attempts": botocore["max_attempts"], "mode": botocore["retry_mode"]})
    options["config_kwargs"] = config
    return options


def filesystem(url: str, storage_options: Mapping[str, str] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind `url` and the path within it (no scheme for local paths)."""
    return url_to_fs(url, **fsspec_options(url, storage_options))


def join(base: str, name: str) -> str:
    return posixpath.join(base, name)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URL that `filesystem` opens again (keeps local paths plain)."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return any(p in _S3_PROTOCOLS for p in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


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
    """Start fetching the S3 shards that this process will open next (in order), so that the next shard's first
    bytes are in memory when the current one ends. No-op for local and non-S3 URLs. Call it with the shards that
    come after the one about to be read; the same process's open_sequential then finds them."""
    urls = [u for u in urls if protocol(u) in _S3_PROTOCOLS]
    if not urls:
        return
    from wdsembed import s3fetch

    fs, _ = filesystem(urls[0], storage_options)
    s3fetch.fetcher_for(fs).prefetch(urls)


# ---------------------------------------------------------------------------------------------------------------
# Preflight: fail at once, naming the URL, where a store cannot be used at all


def _explain(url: str, exc: BaseException, action: str) -> StoreError:
    name = type(exc).__name__
    text = str(exc) or name
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        return StoreError(f"cannot {action} {url}: the bucket does not exist ({text})")
    if isinstance(exc, PermissionError):
        return StoreError(f"cannot {action} {url}: access denied ({text}); check the credentials: {CREDENTIALS_HINT}")
    if "credential" in name.lower() or "credential" in text.lower():
        return StoreError(f"cannot {action} {url}: no usable credentials ({text}); {CREDENTIALS_HINT}")
    return StoreError(f"cannot {action} {url}: {name}: {text}")


def check_input(url: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Raise StoreError naming `url` unless it can be listed (one LIST request on object stores)."""
    try:
        fs, path = filesystem(url, storage_options)
        fs.invalidate_cache(path)  # a long-lived process must see shards added since its last listing
        fs.ls(path, detail=False)
    except FileNotFoundError as exc:
        if "bucket" in str(exc).lower():
            raise _explain(url, exc, "read input") from None
        raise StoreError(f"input {url} does not exist") from None
    except NotADirectoryError:
        raise StoreError(f"input {url} is not a folder of *.tar shards") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to list is reported with the URL
        raise _explain(url, exc, "read input") from None


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
        fs.info(path)
    except FileNotFoundError as exc:
        bucket = path.strip("/").split("/", 1)[0]
        if "bucket" in str(exc).lower() or path.strip("/") == bucket:
            raise _explain(url, FileNotFoundError(f"The specified bucket does not exist: {bucket}"),
                           "write output") from None
    except Exception as exc:  # noqa: BLE001
        raise _explain(url, exc, "write output") from None
    finally:
        fs.invalidate_cache(path)  # other processes write here: never trust a listing of it later
