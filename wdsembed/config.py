"""Every parameter of an embedding run, in one pydantic model.

The same model is the CLI's argument set, the flow's single parameter (so the Prefect UI renders it as a
form and the API validates it before a run starts) and the Python API's keyword arguments.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from contextvars import ContextVar
from typing import Any, Literal, Mapping, Optional

from fsspec.core import split_protocol
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from wdsembed.storeoptions import (
    BUCKET_PROTOCOLS,
    SECRET_OPTION_PATTERN,
    URL_CREDENTIALS_PATTERN,
    protocol,
    secret_options,
    url_has_credentials,
    url_has_password,
)

DEFAULT_MODEL = "vit_large_patch14_clip_quickgelu_224.openai"
DEFAULT_INDEX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "wdsembed", "idx")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# Pillow's DecompressionBombError threshold (2 * Image.MAX_IMAGE_PIXELS): 20000 x 20000 is refused, 12000 x 12000 not.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def _any_case(pattern: str) -> str:
    """A regular expression that matches any letter case without flags: JSON schema patterns (ECMA 262, as Prefect
    checks a run's parameters) have none."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)


def _refused(pattern: str, expected: str, otherwise: Optional[dict] = None) -> dict:
    """A JSON schema rule that refuses the strings `pattern` finds, saying in words what is `expected`; strings it
    does not find are left to the rule `otherwise`. Prefect's refusal (the API's, and the UI's under the field) is
    jsonschema's message for the failing keyword, and `const`'s ("'EXPECTED' was expected") is the only one that
    quotes neither the value (a credential) nor the pattern (thousands of characters): `not`'s said
    "'VALUE' should not be valid under {PATTERN}", `pattern`'s "'VALUE' does not match PATTERN".
    `then` holds for no value: `const` takes `expected` only, which `not` refuses. So every string `pattern` finds
    is refused, `expected` too where `pattern` finds it (a rule of _unless), and any other value gets one message,
    `const`'s. `"type": "string"`: a pattern holds for every value that is not a string, so without it
    null, the optional fields' default, would be refused.
    """
    rule = {"if": {"type": "string", "pattern": pattern}, "then": {"const": expected, "not": {"const": expected}}}
    return rule | {"else": otherwise} if otherwise else rule


def _unless(pattern: str) -> str:
    """A pattern that finds the strings `pattern` does not find (jsonschema's `pattern` is re.search): from the start,
    no place where `pattern` matches. For _refused, where a value must match a `pattern` of its own."""
    return rf"^(?![\s\S]*?(?:{pattern}))"


# The rules of the validators below, also in the JSON schema: runs started from the Prefect UI/API are checked
# against it before their parameters are stored (and shown), so a credential is refused before it is kept.
# What the run form says of a credential (credentials_in_url says it for the validators):
_NO_CREDENTIALS = ("a value without credentials (a password or a user name, as an access key, in a URL): the run's "
                  "parameters are stored in Prefect's database; credentials come from the environment "
                  "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), an AWS profile or the store's own credential files")
_NO_URL_PASSWORD = _refused(URL_CREDENTIALS_PATTERN, _NO_CREDENTIALS)


def _not_blank(expected: str) -> dict:
    """Not empty, nor blanks only (the validators' "must not be empty"), in the form too, saying what is expected:
    after the credentials' rule, so that each value gets one reason."""
    return _refused(URL_CREDENTIALS_PATTERN, _NO_CREDENTIALS, otherwise=_refused(_unless(r"\S"), expected))


# A Dask scheduler's address: an optional scheme (tcp://, tls://), a host or [IPv6 address], and its port; an
# in-process one (inproc://, a LocalCluster(processes=False) of the API's caller); or empty, which is none (a
# cleared form field).
DASK_ADDRESS_PATTERN = (r"^(([A-Za-z][A-Za-z0-9+.-]*://)?(\[[0-9A-Fa-f:.]+\]|[^\s/:@\[\]]+):[0-9]{1,5}"
                        r"|inproc://\S+)?$")


def _store_url_form_pattern() -> str:
    """What EmbedConfig._store_url_form refuses, as one JSON schema pattern: a bucket store's URL that names no
    bucket (`s3://`), or a known fsspec protocol and ':' without '//' (`s3:/bucket/x`, a local path otherwise); a
    chained URL (`simplecache::s3://...`) never."""
    from fsspec.registry import known_implementations

    def spelled(name: str) -> str:  # any case; '.', '+', '-' in brackets: literal in ECMA 262 and Python alike
        if not name.isascii():
            return ""
        return "".join(_any_case(c) if c.isalpha() else c if c.isalnum() or c == "_" else f"[{c}]" for c in name)

    buckets = "|".join(sorted(filter(None, map(spelled, BUCKET_PROTOCOLS))))
    known = "|".join(sorted(filter(None, (spelled(p) for p in known_implementations
                                           if len(p) >= 2 and p.lower() not in ("file", "local")))))
    return rf"^(?!.*::)((?:{buckets}):///*$|(?:{known}):(?!//))"


# One image extension as a member's can be (the last dot-part of its name), with the blanks and leading dots that
# EmbedConfig drops: also the run form's rule for each item.
_EXTENSION = r"^\s*\.*[^.,/\s]+\s*$"
_AN_EXTENSION = {"type": "string", **_refused(
    _unless(_EXTENSION), "one image extension per item: the part of a member's name after its last dot (png for "
    "00001.seg.png), with no dot, comma, slash or blank within")}
# The credentials' rule first, the address's in its else: a URL with credentials fails both, and one reason is enough.
_DASK_ADDRESS = _refused(URL_CREDENTIALS_PATTERN, _NO_CREDENTIALS, otherwise=_refused(
    _unless(DASK_ADDRESS_PATTERN), "a Dask scheduler's address with its port (tcp://HOST:8786, tls://HOST:8786, "
    "HOST:8786), or empty for a local cluster"))


def _bounds_beside_null(schema: dict) -> None:
    """An optional number's bounds beside its anyOf (pydantic puts them in the number's branch), where they hold for
    numbers only, null still taken: the UI form then says "0 is less than the minimum of 1" under the field, not
    anyOf's "0 is not valid under any of the given schemas" (the API's refusal said the first already)."""
    for branch in schema.get("anyOf", ()):
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if bound in branch:
                schema[bound] = branch.pop(bound)


def _store_url(not_blank: Optional[str] = None) -> dict:
    """Input, output and result storage: neither credentials in the URL nor a store URL in a form that names no
    place; with `not_blank` (what is expected) not empty either, the rules chained so that each value gets one
    reason."""
    return _refused(URL_CREDENTIALS_PATTERN, _NO_CREDENTIALS, otherwise=_refused(
        _store_url_form_pattern(),
        "a store URL in full, as s3://BUCKET/PREFIX: not one that names no bucket (s3://), nor a scheme with one slash "
        "(s3:/BUCKET/x), which would be a local folder named s3: (start such a local path with ./)",
        otherwise=_refused(_unless(r"\S"), not_blank) if not_blank else None))


_NO_SECRET_OPTIONS = {
    "propertyNames": _refused(
        _any_case(SECRET_OPTION_PATTERN),
        "storage options without credentials (none such as key, secret, token, password, account_key, sas_token): "
        "the run's parameters are stored in Prefect's database; credentials come from the environment, an AWS "
        "profile or the store's own credential files"),
    "additionalProperties": {"type": "string", **_NO_URL_PASSWORD},
}


# The fields that may name local paths (or file:// URLs), made absolute where the config is made: in the process
# that orchestrates the run (the command, the API's caller, a deployment's flow run). Its tasks run on Dask workers
# whose working directory (a shared cluster's `dask worker` started elsewhere) or home may differ, where a relative
# path or `~` would name another place: another OUTPUT for the kNN views and the claim, another checkpoint.
LOCAL_PATH_FIELDS = ("input", "output", "checkpoint", "index_cache_dir", "result_storage")


# `file:/data/x` (Java's, Hadoop's and Spark's form of a local path) and `file://localhost/data/x` (RFC 8089): both
# are /data/x, but fsspec reads the second, and the path handling here both, as relative paths (`./localhost/data/x`).
_FILE_URL_OF_ABSOLUTE_PATH = re.compile(r"^(?:file|local):(?://localhost)?(?=/(?!/))", re.IGNORECASE)


def canonical_file_url(value: Optional[str]) -> Optional[str]:
    """`file:/data/x` and `file://localhost/data/x` (any letter case, or `local:`) as `file:///data/x`; anything
    else as it is."""
    return _FILE_URL_OF_ABSOLUTE_PATH.sub("file://", value, count=1) if value else value


def unsupported_url_form(value: Optional[str]) -> Optional[str]:
    """Why `value` is one of WebDataset's URL forms that fsspec reads otherwise, or None: `pipe:CMD` (fsspec knows
    no 'pipe' protocol; without one it is a relative path), and shard lists joined by '::' (fsspec's chain
    separator: it reads the first link's path, not both lists)."""
    if not value:
        return None
    links = [link.strip() for link in value.split("::")]
    if any(link[:5].lower() == "pipe:" for link in links):
        return ("is WebDataset's 'pipe:' form (a shell command whose output is read as the shard), which is not run "
                "here: each worker opens its shards itself, through fsspec. Pass the path or URL that the command "
                f"reads (a local path, s3://BUCKET/PREFIX/00000.tar, https://HOST/00000.tar), with "
                f"{option('storage_options')} for the store's settings")
    # A chain's links before the last are filesystems wrapping it (simplecache, zip://member): never shards.
    if len(links) > 1 and sum(link.lower().endswith(".tar") or "{" in link for link in links) > 1:
        return ("joins shard lists with '::', as WebDataset does, but to fsspec '::' chains filesystems "
                "(simplecache::s3://...): what it names is no shard. Write the shards of each, one path, URL or "
                "brace pattern per line, in a .txt file and pass that file")
    return None


def absolute_local_path(value: Optional[str]) -> Optional[str]:
    """A relative local path (or file:// URL), or one starting with `~`, as an absolute path of this process's
    working directory and user; anything else (an absolute path, another store's URL, a chained URL) as it is. A
    brace pattern is not normalized, so that `..` within its braces keeps its meaning. A file URL of an absolute
    path in another form (canonical_file_url) becomes `file:///...`."""
    value = canonical_file_url(value)
    if not value or "::" in value or protocol(value) not in ("file", "local"):
        return value
    path = split_protocol(value)[1]
    if os.path.isabs(path) and not path.startswith("~"):
        return value
    path = os.path.expanduser(path)
    if "{" in path:
        return os.path.join(os.getcwd(), path)
    return os.path.abspath(path)


def _local_path(value: Optional[str], what: str, why: str) -> Optional[str]:
    """A field that names a place on each worker's own disk: a file:// URL as its path; another store's URL refused
    (ValueError saying `what` it must be and `why`). Empty (an empty variable, a cleared form field): none, as left
    out, which the cache key must not tell apart."""
    if not value:
        return None
    value = canonical_file_url(value)
    store = value.split("::")[0] + "::" if "::" in value else protocol(value) + "://"
    if store not in ("file://", "local://"):
        raise ValueError(f"must be {what} or file:// URL, not a URL of another store ({store}): {why}")
    return split_protocol(value)[1]


class EmbedConfig(BaseModel):
    """What to embed, with which model, and how."""

    # hide_input_in_errors: a refused storage option or URL may be a secret; errors name the field, not the value.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    input: str = Field(
        json_schema_extra=_store_url(not_blank="a folder or URL holding the shards (/data/shards, "
                                               "s3://BUCKET/PREFIX), not empty"),
        description="Folder or fsspec URL (s3://bucket/prefix) holding the WebDataset shards (*.tar), "
        "optionally with img2dataset siblings (00000.parquet, 00000_stats.json).",
    )
    output: str = Field(
        json_schema_extra=_store_url(not_blank="a folder or URL for the outputs (/data/embeddings, "
                                               "s3://BUCKET/PREFIX), not empty"),
        description="Folder or fsspec URL that receives one <shard>.parquet per shard and _manifest.json.",
    )
    model_name: str = Field(
        DEFAULT_MODEL,
        json_schema_extra=_not_blank("a timm model name (resnet50.a1_in1k), not empty"),
        description="Any timm model name, with an optional pretrained tag (resnet50.a1_in1k).",
    )
    pretrained: bool = Field(
        True, description="Load pretrained weights (from --checkpoint, the local timm/Hugging Face cache, or the Hub)."
    )
    checkpoint: Optional[str] = Field(
        None, json_schema_extra=_NO_URL_PASSWORD, description="Local weights file (.safetensors, .pth, .bin) to load instead of downloading: a path or a "
        "file:// URL, at the same place on every worker. A URL of another store is refused: copy the file to each "
        "worker first.",
    )
    embedding: Literal["auto", "head", "pooled"] = Field(
        "auto",
        description="Which output is the embedding: 'head' is the model's head output (the projection of CLIP "
        "image towers), 'pooled' the pooled pre-logits features; 'auto' picks 'head' for CLIP/SigLIP-style "
        "towers and 'pooled' for classifiers (never class logits).",
    )
    batch_size: int = Field(256, ge=1, le=16384, description="Images per model batch.")
    num_threads_per_worker: int = Field(
        4, ge=1, le=256, description="DALI CPU threads per worker (decoding on CPU, resize, reading)."
    )
    normalize_embeddings: bool = Field(True, description="L2-normalize every embedding.")
    autocast: bool = Field(
        True,
        description="Run the model in bfloat16 on a GPU: its weights are turned to bfloat16, which runs faster than "
        "autocast over float32 weights and keeps the fidelity target. False keeps float32. Ignored on the CPU, which "
        "runs float32.",
    )
    use_index_files: bool = Field(
        True,
        description="Write a DALI .idx (v1.2) beside each shard lacking one (or under index_cache_dir where the "
        "shard's folder is read-only), for DALI's own readers and other tools. Reading streams each tar front to back "
        "either way; an existing .idx is checked against the tar's headers as it is read, and a stale one rebuilt.",
    )
    index_cache_dir: Optional[str] = Field(
        None, json_schema_extra=_NO_URL_PASSWORD, description="Where .idx files go when the shard folder is not writable (default: ~/.cache/wdsembed/idx): "
        "a local folder (or file:// URL) on each worker; another store's URL is refused."
    )
    id_column: str = Field("key", min_length=1, json_schema_extra=_NO_URL_PASSWORD,
                           description="Parquet column that holds the sample key.")
    embedding_column: str = Field("image_embedding", min_length=1, json_schema_extra=_NO_URL_PASSWORD,
                                  description="Name of the embedding column.")
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Type of the stored embedding values. float16 halves their space (LAION's released embeddings "
        "are float16), within 0.9999 cosine of the float32 values; it refuses, naming the shard, values beyond "
        "float16's range (65504), which only unnormalized embeddings can reach. pyarrow, pandas and "
        "embedding-reader read parquet's FLOAT16 type; readers older than it (2023) cannot.",
    )
    error_column: str = Field(
        "embedding_error", min_length=1, json_schema_extra=_NO_URL_PASSWORD, description="Name of the column that says why a row has no embedding."
    )
    knn_view: bool = Field(
        True,
        description="Also write OUTPUT/_embeddings/<shard>.parquet: the embedded rows only (id, embedding, shard), "
        "which kNN tools (embedding-reader, autofaiss) read as they are, where the full tables' failed rows stop "
        "them. Off: each embedding is stored once, in the full table, half the space; an earlier view of a shard "
        "embedded again is removed, and a later run with it on writes the missing views from the full tables "
        "without embedding again.",
    )
    image_extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, json_schema_extra={"minItems": 1, "items": _AN_EXTENSION},
        description="Member extensions read as the sample's image, any letter case, in order of preference: each the "
        "part of a member's name after its last dot (png for 00001.seg.png)."
    )
    max_image_pixels: Optional[int] = Field(
        MAX_IMAGE_PIXELS,
        ge=0,
        json_schema_extra=_bounds_beside_null,
        description="Images whose header says width x height is above this are not decoded (decompression bombs: "
        "a small file that would decode to gigabytes) and get the error 'image too large'. Default: Pillow's "
        "refusal limit (2 x 89,478,485 pixels). 0 or null: no limit.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="'auto' uses a GPU where one is visible, else the CPU-only DALI pipeline."
    )
    force: bool = Field(False, description="Recompute every shard even where a finished output exists.")
    verify_outputs: bool = Field(
        False,
        description="Before a finished output counts as done, read it whole (every column) and check it as "
        "validate_output does, against its kNN view too: one damaged below its intact footer (bit rot, a bad copy) "
        "is embedded again, with a warning naming what is wrong. Off: a re-run reads only footers, and finds such "
        "damage only where it must rebuild a view from the table. On, a re-run reads every output and view whole "
        "and starts its workers even where nothing is to compute.",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        json_schema_extra=_NO_SECRET_OPTIONS,
        description="fsspec options for INPUT/OUTPUT (endpoint_url=..., profile=..., region_name=..., "
        "read_timeout=...). No credentials: these are stored with the run's parameters; keys come from the "
        "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), an AWS profile or the store's credential files.",
    )
    result_storage: Optional[str] = Field(
        None,
        json_schema_extra=_store_url(),
        description="Folder or fsspec URL, reachable by every worker, where Prefect keeps the embedding tasks' "
        "results (the task cache); default OUTPUT/_prefect_results. Uses storage_options; never credentials.",
    )
    dask_address: Optional[str] = Field(
        None, json_schema_extra=_DASK_ADDRESS, description="Address of an existing Dask scheduler (tcp://host:8786, or tls://host:8786 with the TLS "
        "certificates in Dask's configuration); default starts a local cluster."
    )
    n_workers: Optional[int] = Field(
        None, ge=1, json_schema_extra=_bounds_beside_null, description="Local workers: default one per visible GPU, or on a CPU-only machine 2, or 1 where the run "
        "may use one core only (taskset, a container's CPU quota). With "
        "workers_per_gpu above 1, the GPUs used, each with that many workers."
    )
    workers_per_gpu: int = Field(
        1, ge=1, le=8,
        description="Worker processes on each GPU of a local cluster. Each feeds DALI from a Python thread of its "
        "own. A fast model can gain from 2 on a slow host: ResNet-50 (about 24,000 images/s alone on an H200) ran "
        "its flow 1.39x as fast on the slowest H200 host measured, 1.00-1.11x on others, but 0.91x on the fastest, "
        "where one process keeps the GPU busy. One that already fills the GPU loses a little (ViT-B/16: "
        "0.92-0.94x). Each worker holds its own model and DALI buffers in GPU memory. A GPU run's summary says "
        "when the input held its GPU's model back (GPU use), which is when 2 may help.",
    )
    shards_per_task: Optional[int] = Field(
        None, ge=1, le=10000, json_schema_extra=_bounds_beside_null,
        description="Shards embedded and validated by one task run (one cache entry per group). Default: one shard "
        "per task run for runs of up to 1,000 shards, and beyond that as many per task run as keep the run at 1,000 "
        "task runs (each is recorded by the Prefect API). 1: a task run per shard, however many."
    )
    recursive: bool = Field(
        False,
        description="When input is a folder, also embed the *.tar shards of its subfolders, at any depth (hidden "
        "files and folders excepted, as without it). Outputs mirror the subfolders (OUTPUT/train/00000.parquet), so "
        "shards of the same name in different folders never share an output. Input may also be a brace pattern "
        "(/data/{00000..00999}.tar), one .tar, or a .txt file listing one shard per line.",
    )
    fidelity_sample: int = Field(
        32, ge=0, le=100_000,
        description="Images of the run (spread over the shards it computes; EXIF-rotated, grayscale, CMYK and PNG "
        "ones first) embedded again with timm's own eval transform on PIL and the float32 model, and compared "
        "(cosine) with what the run wrote; min/mean cosine and the worst keys go to the manifest and summaries. 0: no "
        "check.",
    )
    min_fidelity: Optional[float] = Field(
        None, ge=-1.0, le=1.0, json_schema_extra=_bounds_beside_null,
        description="The run fails (outputs kept) when a checked image's cosine is below this. Default: 0.999 on "
        "the GPU path (bfloat16 weights), 0.9999 on the CPU path. Not part of the cache key: a re-run with another "
        "threshold re-checks the stored cosines without re-embedding.",
    )

    @field_validator("image_extensions")
    @classmethod
    def _lower_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # As the command's comma list takes them (blanks around each dropped); a repeat adds nothing, nor a cache key.
        exts = tuple(dict.fromkeys(e.strip().lower().lstrip(".") for e in value))
        if not exts:
            raise ValueError("must name at least one extension")  # the error's field names it
        for ext in exts:
            # A member's extension is the last dot-part of its name (shards.iter_samples): one that holds a dot, a
            # comma or a blank never matches, and every sample whose image has only it would fail 'no image member'.
            if not re.fullmatch(_EXTENSION, ext):
                said = "a URL with credentials (not shown here)" if url_has_credentials(ext) else repr(ext)
                raise ValueError(f"holds {said}, which no member's extension can be: it is the part of the name "
                                 "after its last dot (00001.seg.png: png), one per item"
                                 if ext else "holds an empty extension")
        return exts

    @field_validator("storage_options")
    @classmethod
    def _no_credentials_in_options(cls, value: dict[str, str]) -> dict[str, str]:
        # Flow parameters are persisted in Prefect's database and shown in its UI: secrets must not be among them.
        bad = secret_options(value)
        if bad:
            raise ValueError(f"must not hold credentials ({', '.join(sorted(bad))}): they would be stored with the "
                             f"run's parameters; {credentials_hint()}")
        return value

    @field_validator(*LOCAL_PATH_FIELDS, mode="before")
    @classmethod
    def _path_as_str(cls, value):
        # A pathlib.Path (tmp_path, Path.home() / "data") is its str: pydantic's str refuses it.
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    # Every text field, not only the paths: any value is stored with the run's parameters and shown in Prefect's UI
    # (a URL pasted after --model or --id-column went there whole, and into the refusals that quote the value).
    @field_validator("*")
    @classmethod
    def _no_credentials_in_url(cls, value):
        if isinstance(value, str) and url_has_credentials(value):
            raise ValueError(credentials_in_url(value))
        return value

    @field_validator("checkpoint")
    @classmethod
    def _local_checkpoint(cls, value: Optional[str]) -> Optional[str]:
        # Each worker loads it from its own disk (torch, safetensors): a file:// URL is its path; another store's
        # would pass the checks (which can list it) and then fail every shard.
        return _local_path(value, "a local path", "each worker loads it from its own disk; copy it to a local path "
                                                  "on every worker and pass that")

    @field_validator("index_cache_dir")
    @classmethod
    def _local_index_cache(cls, value: Optional[str]) -> Optional[str]:
        # shardindex writes and reads the cache through the local file system: another store's URL became a folder
        # named after its scheme ('s3:') in the worker's working directory.
        return _local_path(value, "a local folder", "each worker keeps the .idx files it cannot write beside their "
                                                    "shards in a folder on its own disk")

    @field_validator("input", "output", "model_name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("dask_address")
    @classmethod
    def _dask_address_form(cls, value: Optional[str]) -> Optional[str]:
        if value and not re.fullmatch(DASK_ADDRESS_PATTERN, value):
            raise ValueError("must be a Dask scheduler's address with its port: tcp://HOST:8786, tls://HOST:8786 or "
                             "HOST:8786")
        return value

    @field_validator("input", "output", "result_storage")
    @classmethod
    def _store_url_form(cls, value: Optional[str]) -> Optional[str]:
        # Before the trailing slashes go: `s3://` would become `s3:`, a local folder of the working directory, and
        # `s3:/bucket/x` (a slash short) is one already: every check would pass and the run write there. The value
        # stays out of the message, as in every error of this model.
        unsupported = unsupported_url_form(value)
        if unsupported:
            raise ValueError(unsupported)
        if not value or "::" in value:
            return value
        scheme, colon, rest = value.partition(":")
        if not colon or len(scheme) < 2 or scheme.lower() in ("file", "local"):
            return value
        if rest.startswith("//"):
            if scheme.lower() in BUCKET_PROTOCOLS and not rest.strip("/"):
                raise ValueError(f"{scheme}:// names no bucket: write {scheme}://BUCKET/PREFIX")
            return value
        from fsspec.registry import known_implementations

        if scheme.lower() in known_implementations:
            where = "BUCKET/PREFIX" if scheme.lower() in BUCKET_PROTOCOLS else "..."
            raise ValueError(f"starts with '{scheme}:' but not '{scheme}://', which makes it a local path: write "
                             f"{scheme}://{where}, or start a local folder's path with ./")
        return value

    @field_validator("input", "output")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/") or "/"

    @model_validator(mode="after")
    def _absolute_local_paths(self) -> "EmbedConfig":
        for name in LOCAL_PATH_FIELDS:
            # Frozen: set here, while the config is being made.
            object.__setattr__(self, name, absolute_local_path(getattr(self, name)))
        return self

    @model_validator(mode="after")
    def _distinct_columns(self) -> "EmbedConfig":
        # Three columns of one output table: with two of one name, every shard is embedded and then fails its join.
        columns = {"id_column": self.id_column, "embedding_column": self.embedding_column,
                   "error_column": self.error_column}
        for first, second in itertools.combinations(columns, 2):
            if columns[first] == columns[second]:
                raise ValueError(f"{setting(first)} and {setting(second)} are both {columns[first]!r}: the output's "
                                 "id, embedding and error columns need three different names")
        return self

    def index_cache(self) -> str:
        """Where .idx files go when a shard's own folder cannot hold them."""
        return self.index_cache_dir or DEFAULT_INDEX_CACHE

    def model_key(self, on_cpu: bool = False) -> dict:
        """The parameters that decide the embedding values (model, weights, head, preprocessing, precision).
        `on_cpu`: the run's model is known to run on the CPU though the device is auto (ShardPlan.on_cpu)."""
        return {
            "model_name": self.model_name,
            # A checkpoint is loaded whatever `pretrained` says (model.load_model): True then, as by default, so
            # that toggling it beside the same file recomputes nothing.
            "pretrained": self.pretrained or bool(self.checkpoint),
            "checkpoint": self.checkpoint,
            "embedding": self.embedding,
            "normalize_embeddings": self.normalize_embeddings,
            # The CPU runs float32 whatever autocast says: True there, as by default, so that toggling it with
            # device cpu, or auto where the run has no GPU, recomputes nothing (plan.run_precision; a precision
            # mixed in OUTPUT is refused there).
            "autocast": self.autocast or self.device == "cpu" or on_cpu,
        }


# Every field with the same rules, but `input` and `output` not required: the Python API checks its settings with it
# when it is built, before it knows where a run reads and writes (no placeholder paths, so none in any message).
EmbedSettings = create_model(
    "EmbedSettings",
    __base__=EmbedConfig,
    __doc__="An EmbedConfig's settings without (yet) its input and output.",
    input=(Optional[str], None),
    output=(Optional[str], None),
)


def field_default(name: str):
    """The default of an EmbedConfig field, as the model declares it (the CLI's help and the API's signature show it)."""
    return EmbedConfig.model_fields[name].get_default(call_default_factory=True)


# The command's flags whose name is not their field's (wdsembed.cli); for a switch, the name after --no- (or --).
FLAG_NAMES = {
    "model_name": "model",
    "num_threads_per_worker": "num-threads",
    "normalize_embeddings": "normalize",
    "use_index_files": "index-files",
    "storage_options": "storage-option",
}

# Who reads a refusal being made here: ("command", {}) names settings by the flags its user typed, ("api", given_as)
# by the Python API's keywords, under the names its caller gave (id_col for id_column); None: both forms, for what
# every surface reads (the manifest, the log, a deployed flow's run, a Dask worker's shard failure).
_AUDIENCE: ContextVar[Optional[tuple[str, Mapping[str, str]]]] = ContextVar("wdsembed_audience", default=None)


@contextlib.contextmanager
def speaking_to(audience: Optional[Literal["command", "api"]], given_as: Optional[Mapping[str, str]] = None):
    """Within it, `setting` and `option` name a field as `audience` sets it (a command's flag, an API keyword)."""
    token = _AUDIENCE.set((audience, dict(given_as or {})) if audience else None)
    try:
        yield
    finally:
        _AUDIENCE.reset(token)


def flag(name: str) -> str:
    """A field's flag as the command's user sets it; a switch as it turns from its default (--no-pretrained)."""
    if name == "input":  # the one positional argument
        return "INPUT"
    flag = FLAG_NAMES.get(name, name.replace("_", "-"))
    default = field_default(name)
    return f"--{'no-' if default is True else ''}{flag}"


def setting(name: str) -> str:
    """A field's name for whoever reads the message (speaking_to): its flag for the command, the caller's own keyword
    for the Python API, the field's name otherwise (as the deployed flow's form and pydantic's errors show it)."""
    audience = _AUDIENCE.get()
    if audience is None:
        return name
    who, given_as = audience
    return flag(name) if who == "command" else given_as.get(name, name)


def option(name: str) -> str:
    """A field in the advice of a message (`pass X one of them`), for whoever reads it (speaking_to): the command's
    flag (`--id-column`, `--no-pretrained`), the API's keyword (`id_column=`, `pretrained=False`), or where nobody
    in particular reads it, both (`--id-column (id_column=)`, `--recursive (recursive=True)`)."""
    audience = _AUDIENCE.get()
    default = field_default(name)
    keyword = f"{name}={not default}" if isinstance(default, bool) else f"{name}="
    if audience is None:
        return f"{flag(name)} ({keyword})"
    if audience[0] == "command":
        return flag(name)
    return setting(name) + keyword[len(name):]


def set_to(name: str, value: object) -> str:
    """A field given a value, as whoever reads the message would have given it (speaking_to): the command's
    `--embedding head`, the API's `embedding='head'`, or where nobody in particular reads it, both."""
    audience = _AUDIENCE.get()
    as_flag, as_keyword = f"{flag(name)} {value}", f"{setting(name) if audience else name}={value!r}"
    if audience is None:
        return f"{as_flag} ({as_keyword})"
    return as_flag if audience[0] == "command" else as_keyword


def storage_option(key: str, value: str) -> str:
    """One storage option in a message's advice, for whoever reads it (speaking_to): the command's
    `--storage-option KEY=VALUE`, the API's `storage_options={"KEY": VALUE}`, or where nobody in particular does,
    both."""
    audience = _AUDIENCE.get()
    as_flag = f"{flag('storage_options')} {key}={value}"
    as_keyword = f'{setting("storage_options") if audience else "storage_options"}={{"{key}": {value}}}'
    if audience is None:
        return f"{as_flag} ({as_keyword})"
    return as_flag if audience[0] == "command" else as_keyword


def credentials_hint() -> str:
    """Where a run's credentials come from (never its parameters), a profile named as the reader sets it."""
    return ("credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), "
            f"an AWS profile (AWS_PROFILE or {storage_option('profile', 'NAME')}) or the store's own credential files")


def credentials_in_url(url: str) -> str:
    """Why a URL holding a password or a user name (an access key ID, a token) is refused, without it, and where
    credentials come from instead."""
    held = "a password" if url_has_password(url) else "a user name"
    return f"the URL holds {held}, which would be logged and stored (not shown here); {credentials_hint()}"


def refuse_credentials_in_url(name: str, url: Any) -> None:
    """Raise ValueError, one line naming `name`, where `url` holds a password or a user name: called where a URL
    first enters, before any store is asked, since fsspec's, s3fs's and botocore's errors quote it whole
    (s3://AKIA@bucket is botocore's 'Invalid bucket name "AKIA@bucket"'). EmbedConfig's fields are checked by its
    validators."""
    if isinstance(url, (str, os.PathLike)) and url_has_credentials(os.fspath(url)):
        raise ValueError(f"{name}: {credentials_in_url(os.fspath(url))}")
