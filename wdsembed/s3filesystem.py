"""s3fs's filesystem with its try count as a constructor argument (imported only where a URL is on S3: s3fs takes
about 0.3 s to import)."""
from __future__ import annotations

import s3fs


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs's S3FileSystem trying each request `attempts` times (its `retries` attribute, which its constructor does
    not take). As an argument, the count is part of fsspec's instance cache key: s3fs shares one instance among all
    threads of a process that ask for the same options (two runs on one shared Dask worker, say), and setting the
    attribute on that shared instance let the last run's count win for both."""

    def __init__(self, *args, attempts: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retries = attempts


# One instance cache with s3fs's own (the keys differ by class), so that S3FileSystem.clear_instance_cache(), which
# users and tests call to drop instances holding old credentials, drops these too. fsspec only ever clears it in
# place (after a fork as well), never replaces it.
S3FileSystem._cache = s3fs.S3FileSystem._cache
