"""Where shards and outputs live: local folders or any fsspec URL (s3://...), through one small API."""
from __future__ import annotations

import posixpath
from typing import Mapping

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str, storage_options: Mapping[str, str] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind `url` and the path within it (no scheme for local paths)."""
    return url_to_fs(url, **dict(storage_options or {}))


def join(base: str, name: str) -> str:
    return posixpath.join(base, name)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URL that `filesystem` opens again (keeps local paths plain)."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
