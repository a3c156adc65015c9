"""The options of a store, apart from the store itself: what a run may pass in `storage_options` (never
credentials), and how they become fsspec's and s3fs's settings. Imported by storage.py, config.py and s3fetch.py,
and imports none of them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from fsspec.core import split_protocol

# storage_options names that carry credentials (s3fs key/secret/token, adlfs account_key/sas_token, passwords...)
SECRET_OPTION_PATTERN = r"(^|_)(key|secret|token|password|passwd|pwd|credential|credentials|connection_string|sas)(_|$)"

_SECRET_OPTION = re.compile(SECRET_OPTION_PATTERN, re.IGNORECASE)
# Stores whose URL's user part names a place, by fsspec's own definition of their URLs, never a credential: GitHub's
# github://org:repo@sha/path and git's git://repo:ref@path (their tokens go in storage options, refused there).
_PLACE_USERINFO_SCHEMES = ("github", "git")
# A user name alone (s3://AKIAIOSFODNN7EXAMPLE@bucket, https://TOKEN@host) is a credential too, but where the part
# before '@' names a place or a login: Azure's container@account, ssh's user@host, HDFS's user@namenode (a login
# name, its secret a Kerberos ticket or a token option), OCI's bucket@namespace.
_NAMED_USER_SCHEMES = ("az", "abfs", "abfss", "wasb", "wasbs", "sftp", "ssh", "hdfs", "webhdfs", "oci", "ocilake",
                       *_PLACE_USERINFO_SCHEMES)


def _scheme_other_than(names: tuple[str, ...]) -> str:
    """A URL's scheme and '://', of any link of a chained URL, in any case, unless it is one of `names`."""
    spelled = "|".join("".join(f"[{c}{c.upper()}]" for c in name) for name in names)
    return r"(^|[^A-Za-z0-9+.-])(?!(" + spelled + r")://)[A-Za-z][A-Za-z0-9+.-]*://"


# A URL with a password (scheme://user:password@host): a ':' before an '@' of its host part, in any link of a chained
# URL (simplecache::s3://...). The rule of url_has_password, also the JSON schema's, for the Prefect run form.
URL_PASSWORD_PATTERN = _scheme_other_than(_PLACE_USERINFO_SCHEMES) + r"[^/?#]*:[^/?#]*@"
_URL_PASSWORD = re.compile(URL_PASSWORD_PATTERN)
URL_USER_PATTERN = _scheme_other_than(_NAMED_USER_SCHEMES) + r"[^/?#]*@"
# Either: what url_has_credentials refuses, also the JSON schema's rule.
URL_CREDENTIALS_PATTERN = f"{URL_PASSWORD_PATTERN}|{URL_USER_PATTERN}"
_URL_CREDENTIALS = re.compile(URL_CREDENTIALS_PATTERN)

_S3_PROTOCOLS = ("s3", "s3a")
# Stores whose paths start with a bucket (or container), which a run never creates.
BUCKET_PROTOCOLS = frozenset({*_S3_PROTOCOLS, "gs", "gcs", "az", "abfs", "abfss", "oss"})
# Strings from the CLI (`--storage-option max_paths=1000`) that fsspec's listings cache, which every store has,
# wants as numbers (it computes `max_paths + 1`).
_FSSPEC_INT_OPTIONS = ("max_paths",)
_FSSPEC_FLOAT_OPTIONS = ("listings_expiry_time",)
# Strings from the CLI (`--storage-option read_timeout=30`) that s3fs wants as numbers.
_S3_INT_OPTIONS = ("default_block_size", "max_concurrency", "max_attempts", "retries")
_S3_FLOAT_OPTIONS = ("connect_timeout", "read_timeout")
# Settings accepted as top-level options here (connect_timeout, read_timeout, max_attempts, retry_mode), with these
# defaults; the timeouts and retry_mode go to botocore in s3fs's `config_kwargs`.
# One retry policy: every S3 request is tried at most `max_attempts` times in all (s3fs's own name for it,
# `retries`, is taken too and wins), by one layer: s3fs's, around each call and its body read, and the shard
# fetcher's (s3fetch) for tar parts. botocore's own retries are off (unless `config_kwargs` sets `retries`, or the
# options go where s3_retry_handler is not installed: fsspec_options' `elsewhere`): they
# ran inside s3fs's, 9 x 5 = 45 requests and minutes per key under a steady SlowDown. s3fs retries SlowDown,
# timeouts, dropped connections and cut bodies itself; s3_retry_handler adds what botocore retried and s3fs does
# not (other 5xx, 429, refused connections). 403/404 are never retried.
S3_DEFAULTS = {"max_attempts": 5, "retry_mode": "standard", "connect_timeout": 10.0, "read_timeout": 60.0}


def secret_options(storage_options: Mapping[str, Any]) -> list[str]:
    """The option names (or names whose URL values) that would carry credentials."""
    bad = []
    for name, value in storage_options.items():
        if _SECRET_OPTION.search(name):
            bad.append(name)
        elif isinstance(value, str) and url_has_credentials(value):
            bad.append(name)
    return bad


def url_has_credentials(url: str) -> bool:
    """Whether any link of `url` holds a password or a user name (URL_USER_PATTERN). Read as text, as the run form
    reads it, not parsed: urlsplit sees none in a chained URL (its first link has no `//`) nor in one it cannot
    parse (a stray bracket)."""
    return _URL_CREDENTIALS.search(url) is not None


def url_has_password(url: str) -> bool:
    """Whether any link of `url` holds a password (user:password@), the worse of url_has_credentials's two."""
    return _URL_PASSWORD.search(url) is not None


def protocol(url: str) -> str:
    """'s3' for s3://bucket/x, 'file' for local paths; the outermost protocol of chained URLs."""
    proto, _ = split_protocol(url.split("::", 1)[-1] if "::" in url else url)
    return proto or "file"


def fsspec_options(url: str, storage_options: Mapping[str, Any] | None, *, elsewhere: bool = False) -> dict[str, Any]:
    """The keyword arguments for the filesystem of `url`: CLI strings turned into the types the back end wants,
    and, for S3, retry and timeout defaults.

    `elsewhere`: the options go to a process that may never import this module (Dask's own read_parquet on a
    user's workers, in the NeMo export), where s3_retry_handler is not installed and s3fs alone would not retry a
    500 or a plain 503: botocore keeps its retries there (max_attempts in all), inside s3fs's, as before."""
    options: dict[str, Any] = {}
    for name, value in dict(storage_options or {}).items():
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        options[name] = value
    _to_numbers(options, _FSSPEC_INT_OPTIONS, _FSSPEC_FLOAT_OPTIONS)
    if protocol(url) not in _S3_PROTOCOLS:
        return options
    _to_numbers(options, _S3_INT_OPTIONS, _S3_FLOAT_OPTIONS)
    if "region_name" in options:  # s3fs would hand it to botocore's session, which refuses it: the client takes it
        options["client_kwargs"] = {**(options.get("client_kwargs") or {}), "region_name": options.pop("region_name")}
    ours = {name: options.pop(name, default) for name, default in S3_DEFAULTS.items()}
    options.pop("retries", None)  # s3fs takes it as an attribute, not an argument: storage.filesystem sets it
    config = dict(options.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", ours["connect_timeout"])
    config.setdefault("read_timeout", ours["read_timeout"])
    botocore_tries = s3_attempts({**ours, **dict(storage_options or {})}) if elsewhere else 1
    config.setdefault("retries", {"total_max_attempts": botocore_tries, "mode": ours["retry_mode"]})
    options["config_kwargs"] = config
    install_s3_retry_handler()
    return options


def s3_attempts(storage_options: Mapping[str, Any] | None) -> int:
    """How many times an S3 request is tried in all (S3_DEFAULTS): the options' `retries` (s3fs's name), else
    `max_attempts`, else the default; at least 1."""
    options = dict(storage_options or {})
    value = options.get("retries", options.get("max_attempts", S3_DEFAULTS["max_attempts"]))
    return max(int(value), 1)


def s3_retry_handler(exc: BaseException) -> bool:
    """Whether s3fs should try again after `exc`, where its own rules say no: what botocore's standard retries
    took as transient (an S3 answer of 5xx or 429, a throttling or timeout code, a connection refused or timed
    out), which s3fs leaves to botocore, whose retries are off here."""
    import botocore.exceptions as bex

    if isinstance(exc, bex.ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(meta.get("HTTPStatusCode") or 0)
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(exc, bex.ConnectionError)


_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                               "RequestThrottled", "TooManyRequestsException", "RequestTimeout", "InternalError"})
_handler_installed = False


def install_s3_retry_handler() -> None:
    """Give s3fs s3_retry_handler, once per process, before any handler set before it (which keeps its say)."""
    global _handler_installed
    if _handler_installed:
        return
    import s3fs.core

    before = s3fs.core.CUSTOM_ERROR_HANDLER
    s3fs.core.set_custom_error_handler(lambda exc: s3_retry_handler(exc) or before(exc))
    _handler_installed = True


def _to_numbers(options: dict[str, Any], ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    for names, kind in ((ints, int), (floats, float)):
        for name in names:
            if isinstance(options.get(name), str):
                options[name] = kind(options[name])
