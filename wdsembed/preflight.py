"""Mistakes refused before any work starts, each in seconds and in one line that says what to change.

Plain functions over an EmbedConfig; each raises PreflightError (a ValueError) or returns None. They read, never
write (a write check makes a folder and removes it at once), and never download:

* check_storage_options: every --storage-option is an option of a store this run uses, and its value is one the
  store accepts (the filesystems are built with them, as the run will build them).
* check_weights: pretrained weights are in the local cache, or the place they come from answers.
* check_output_writable: a local output folder can be created or written by this user (and the result storage's;
  an index cache folder is not a file).
* check_dask_security: a tls:// --dask-address has Dask's TLS configuration (CA, client certificate) to use.
* check_dask_reachable: a Dask scheduler answers at --dask-address (one connection, closed at once).
* check_device: --device cuda on a local cluster has a GPU to run on.

They complement `plan.check_config` (model name, checkpoint file, input folder, buckets): run
check_storage_options before it (every later check builds filesystems from those options), the others after it.
"""
from __future__ import annotations

import difflib
import inspect
import os
import tempfile
from typing import Optional
from urllib.parse import urlsplit

from wdsembed import storage, storeoptions
from wdsembed.config import EmbedConfig, option


class PreflightError(ValueError):
    """The run cannot work as asked; the message says what to change."""


# ------------------------------------------------------------------------------------------------- storage options

# fsspec's base class takes these through **kwargs for every store (instance and listings caches).
_FSSPEC_COMMON_OPTIONS = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
# Read by wdsembed.storage.fsspec_options for S3 and handed on to botocore or the client (s3fs's `retries`, which
# its constructor does not take, is set by storage.filesystem).
_OUR_S3_OPTIONS = set(storeoptions.S3_DEFAULTS) | {"region_name", "retries"}
# The options that storage.fsspec_options turns from the command line's strings into numbers: for every store,
# and for S3 only.
_NUMBERS = (dict.fromkeys(storeoptions._FSSPEC_INT_OPTIONS, int)
            | dict.fromkeys(storeoptions._FSSPEC_FLOAT_OPTIONS, float))
_S3_NUMBERS = dict.fromkeys(storeoptions._S3_INT_OPTIONS, int) | dict.fromkeys(storeoptions._S3_FLOAT_OPTIONS, float)


def _locations(config: EmbedConfig) -> list[tuple[str, str]]:
    """(what, url) of every place this run opens with storage_options."""
    places = [("input", config.input), ("output", config.output)]
    if config.result_storage:
        places.append(("result storage", config.result_storage))
    if config.checkpoint:
        places.append(("checkpoint", config.checkpoint))
    return places


def _init_parameters(cls) -> dict[str, inspect.Parameter]:
    """Named keyword parameters of a filesystem class's constructors, along its class hierarchy."""
    params: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            signature = inspect.signature(init)
        except (TypeError, ValueError):
            continue
        for p in signature.parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params[p.name] = p
    return params


def _store_options(protocol: str) -> dict[str, Optional[inspect.Parameter]]:
    """The option names a store of this protocol takes (None where we know the name but not its parameter)."""
    import fsspec

    cls = fsspec.get_filesystem_class(protocol)
    options: dict[str, Optional[inspect.Parameter]] = dict.fromkeys(_FSSPEC_COMMON_OPTIONS)
    options.update(_init_parameters(cls))
    if protocol in ("s3", "s3a"):
        # s3fs hands its remaining keyword arguments to the botocore session (profile=...).
        from aiobotocore.session import AioSession

        options.update(_init_parameters(AioSession))
        options.update(dict.fromkeys(_OUR_S3_OPTIONS))
    for internal in ("args", "kwargs", "loop", "asynchronous", "session"):
        options.pop(internal, None)
    return options


def check_storage_options(config: EmbedConfig) -> None:
    """Refuse a storage option that no store of this run takes (a typo, or a local path where an s3:// URL was
    meant) or a value its store refuses (`read_timeout=abc`, `anon=maybe`, a malformed endpoint_url)."""
    options = config.storage_options
    if not options:
        return
    places = _locations(config)
    by_protocol: dict[str, dict[str, Optional[inspect.Parameter]]] = {}
    for what, url in places:
        protocol = storage.protocol(url)
        if protocol not in by_protocol:
            try:
                by_protocol[protocol] = _store_options(protocol)
            except (ValueError, ImportError) as exc:
                raise PreflightError(f"{what} {url!r}: no filesystem for {protocol}:// ({exc})") from None
    # Every store of the run gets the same options. Local folders ignore what they do not take; s3fs hands what
    # it does not take to botocore's session, which raises TypeError at the first request.
    strict = [p for p in by_protocol if p != "file"] or ["file"]
    for name in sorted(options):
        refusing = [p for p in strict if name not in by_protocol[p]]
        if refusing:
            known = sorted({n for p in refusing for n in by_protocol[p]})
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            stores = " and ".join(f"{p}://" if p != "file" else "local folders" for p in refusing)
            raise PreflightError(f"storage option {name}: not an option of {stores}.{hint}")
    for name, value in options.items():
        for protocol, names in by_protocol.items():
            problem = _bad_value(names.get(name), value)
            numbers = _NUMBERS | (_S3_NUMBERS if protocol in ("s3", "s3a") else {})
            if name in numbers:
                problem = _not_a(numbers[name], value)
            if problem:
                raise PreflightError(f"storage option {name}={value}: {problem}")
    endpoint = options.get("endpoint_url")
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PreflightError(f"storage option endpoint_url={endpoint}: not an http(s)://host[:port] URL")
    for what, url in places:
        try:
            fs, _ = storage.filesystem(url, options)  # as the run will build it: converted values included
            if storage.protocol(url) in ("s3", "s3a"):
                fs.connect()  # builds the botocore session and client from the options; sends no request
        except Exception as exc:  # noqa: BLE001 - any refusal of the options by the store is this mistake
            raise PreflightError(f"storage options for {what} {url}: the store refuses them "
                                 f"({type(exc).__name__}: {exc})") from None


def _bad_value(param: Optional[inspect.Parameter], value: str) -> Optional[str]:
    """Why a string value cannot be what a parameter's default shows it wants (bool, int, float), else None."""
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return None
    return _not_a(type(param.default), value)


def _not_a(wanted: type, value: str) -> Optional[str]:
    if wanted is bool:
        return None if value.lower() in ("true", "false") else "takes true or false"
    if wanted in (int, float):
        try:
            wanted(value)
        except ValueError:
            return f"takes a number ({wanted.__name__})"
    return None


# ------------------------------------------------------------------------------------------------- weights


def check_weights(config: EmbedConfig) -> None:
    """Pretrained weights must be in the local cache (timm's Hugging Face cache or torch hub's) or reachable:
    refused at once when they are neither, naming --no-pretrained and --checkpoint. Downloads nothing; the
    reachability probe takes at most a few seconds, and none with HF_HUB_OFFLINE set."""
    if config.checkpoint or not config.pretrained:
        return
    # The model module's own rules for where weights come from (wdsembed.model.load_model), minus the download.
    from wdsembed.model import (
        _env_offline,
        _hub_cache_dir,
        _hub_endpoint,
        _hub_filenames,
        _hub_reachable,
        _no_weights_message,
    )

    name = config.model_name
    if name.startswith("local-dir:"):
        _check_weights_file(name, _local_dir_weights(name), "replace it")
        return
    if ":" in name:  # hf-hub:org/repo: timm reads its config and weights from that repository
        hub_id = name.split(":", 1)[1]
        filenames = ["open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                     "pytorch_model.bin"]
        url = None
        cached = _hub_file(hub_id, _hf_hub_names(hub_id), _hub_cache_dir())
        if cached:
            _check_weights_file(name, cached, "delete it from the cache to download it again")
    else:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise PreflightError(f"timm has no pretrained weights for {name!r}: pass {option('checkpoint')} a local "
                                 f"weights file, or {option('pretrained')} for random weights")
        if cfg.file:
            if os.path.isfile(cfg.file):
                _check_weights_file(name, cfg.file, "replace it")
            return
        hub_id, filenames, url = cfg.hf_hub_id, (_hub_filenames(cfg) if cfg.hf_hub_id else []), cfg.url
        # the file timm will load: the first of its names that the cache holds
        cached = hub_id and _hub_file(hub_id, filenames, _hub_cache_dir())
        if cached:
            _check_weights_file(name, cached, "delete it from the cache to download it again")
            return
    if hub_id and _in_hub_cache(hub_id, filenames, _hub_cache_dir()):
        return
    if not hub_id and url and os.path.isfile(_torch_hub_file(url)):
        _check_weights_file(name, _torch_hub_file(url), "delete it to download it again")
        return
    source = hub_id or url
    if _env_offline():
        raise PreflightError(_no_weights_message(name, f"{source} is not in the cache and HF_HUB_OFFLINE is set",
                                                 hub_id or None))
    endpoint = _hub_endpoint() if hub_id else url
    if not _hub_reachable(endpoint):
        raise PreflightError(_no_weights_message(
            name, f"{source} is not in the cache and {endpoint} is unreachable", hub_id or None))


def _hub_file(hub_id: str, filenames: list[str], cache_dir: str) -> Optional[str]:
    """The cached file of the first of `filenames` that the Hugging Face cache holds for `hub_id`, or None."""
    import huggingface_hub

    repo, _, revision = hub_id.partition("@")
    for fn in filenames:
        hit = huggingface_hub.try_to_load_from_cache(repo, fn, cache_dir=cache_dir, revision=revision or None)
        if isinstance(hit, str):
            return hit
    return None


def _hf_hub_names(hub_id: str) -> list[str]:
    """The weights files timm tries for an hf-hub: model, in its order: those of the cached config.json's
    hf_hub_filename (pytorch_model.bin where it names none). Empty where the config is not cached."""
    import json

    from wdsembed.model import _hub_cache_dir, _hub_filenames

    config = _hub_file(hub_id, ["config.json"], _hub_cache_dir())
    if not config:
        return []
    try:
        with open(config, encoding="utf-8") as f:
            override = (json.load(f).get("pretrained_cfg") or {}).get("hf_hub_filename")
    except (OSError, ValueError, AttributeError):
        return []
    return _hub_filenames(type("Cfg", (), {"hf_hub_filename": override}))


def _local_dir_weights(name: str) -> Optional[str]:
    """The file timm loads a local-dir: model's weights from (timm.models._hub.load_state_dict_from_path's choice:
    its preferred names, then the first file of each extension in turn), or None where the folder holds none."""
    from pathlib import Path

    try:
        from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
    except ImportError:  # another timm: the worker's load says what is wrong
        return None
    folder = Path(name.split(":", 1)[1])
    if not folder.is_dir():
        return None  # no config.json either: plan.check_model said so
    for fname in _PREFERRED_FILES:
        if (folder / fname).exists():
            return str(folder / fname)
    for ext in _EXT_PRIORITY:
        files = sorted(folder.glob(f"*{ext}"))
        if files:
            return str(files[0])
    raise PreflightError(f"cannot load pretrained weights for {name!r}: {str(folder)!r} holds no weights file (none "
                         f"of {', '.join(_PREFERRED_FILES[:2])}, nor any {', '.join(_EXT_PRIORITY)}). Put the "
                         f"model's weights there, or pass {option('pretrained')} for random weights")


def _check_weights_file(name: str, path: Optional[str], fix: str) -> None:
    """Refuse a weights file that no reader can take, from its size and its safetensors header or zip directory
    alone: the tensors are not read (gigabytes, for a large model), which the workers would do, each failing."""
    why = path and weights_file_problem(path)
    if why:
        raise PreflightError(f"cannot load pretrained weights for {name!r}: {path} {why}. Fix the file ({fix}), "
                             f"pass {option('checkpoint')} a weights file, or {option('pretrained')} for random "
                             "weights")


def weights_file_problem(path: str) -> Optional[str]:
    """Why a weights file is unreadable (empty, cut short, not in its format), or None where it looks whole.
    A .safetensors file: its 8-byte header length, its JSON header and the tensors' offsets against its size.
    A zip archive (torch.save): its central directory. A pickle (older torch.save) is not looked into."""
    import json
    import struct
    import zipfile

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "is empty"
        with open(path, "rb") as f:
            head = f.read(16)
            if path.endswith(".safetensors") or head[8:9] == b"{":  # by name, as timm reads it, or content
                if size < 8:
                    return f"is truncated ({size} bytes: not even a safetensors header's length)"
                (length,) = struct.unpack("<Q", head[:8])
                f.seek(8)
                if length > size - 8:
                    return (f"is not a whole safetensors file: its header is too large ({length} bytes said, the "
                            f"file has {size}; not safetensors, or truncated)")
                try:
                    header = json.loads(f.read(length))
                    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                              default=0)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                    return f"is not a safetensors file: its header is not safetensors' JSON ({type(e).__name__})"
                if 8 + length + end > size:
                    return (f"is truncated: its header places tensors up to byte {8 + length + end}, the file has "
                            f"{size}")
                return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    if member.header_offset + member.compress_size > size:
                        return (f"is truncated: its zip member {member.filename} runs past the file's end "
                                f"({size} bytes)")
        except (zipfile.BadZipFile, OSError) as e:
            return f"is truncated or damaged: not a whole zip archive (torch.save's format): {e}"
        return None
    from wdsembed.model import _checkpoint_format

    if not _checkpoint_format(head):
        return f"is in no weights format (not safetensors, a zip archive or a pickle): it starts with {head!r}"
    return None


def _in_hub_cache(hub_id: str, filenames: list[str], cache_dir: str) -> bool:
    import huggingface_hub

    repo, _, revision = hub_id.partition("@")
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo, fn, cache_dir=cache_dir,
                                                                 revision=revision or None), str)
               for fn in filenames)


def _torch_hub_file(url: str) -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(url).path))


# ------------------------------------------------------------------------------------------------- output


def check_output_writable(config: EmbedConfig) -> None:
    """A local output (and a local result storage) must be a folder this user can write, or one it can create.
    Object stores are checked by storage.check_output (bucket there and readable, with these credentials)."""
    _check_local_folder("output", config.output, config, "output")
    if config.result_storage:
        _check_local_folder("result storage", config.result_storage, config, "result_storage")
    if config.index_cache_dir:
        # One this user cannot write is no mistake (a team's shared cache): shards are then read without an .idx.
        _check_local_folder("index cache", config.index_cache_dir, config, "index_cache_dir", written=False)


def _check_local_folder(what: str, url: str, config: EmbedConfig, field: str, *, written: bool = True) -> None:
    fs, root = storage.filesystem(url, config.storage_options)
    if not storage.is_local(fs):
        return
    path = os.path.abspath(root)
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    flag = option(field)
    if existing == path and not os.path.isdir(path):
        raise PreflightError(f"{what} {url!r} is a file, not a folder: pass {flag} a folder")
    if existing != path and not os.path.isdir(existing):
        raise PreflightError(f"{what} {url!r} cannot be created: {existing!r} is a file, not a folder; "
                             f"pass {flag} a folder path")
    if not written:
        return
    try:
        # A real attempt, not os.access: it also sees read-only mounts, and root's override where it applies.
        os.rmdir(tempfile.mkdtemp(prefix=".wdsembed-write-check-", dir=existing))
    except OSError as exc:
        verb = "written" if existing == path else "created"
        where = "" if existing == path else f" ({existing!r} does not let this user create folders)"
        raise PreflightError(f"{what} {url!r} cannot be {verb} by this user{where}: {exc.strerror}; pass {flag} "
                             "a folder you can write, or give this user write permission") from None


# ------------------------------------------------------------------------------------------------- dask security

_TLS_KEYS = {  # Dask's configuration key -> its environment variable
    "distributed.comm.tls.ca-file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "distributed.comm.tls.client.cert": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
    "distributed.comm.tls.client.key": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
}


def check_dask_security(config: EmbedConfig) -> None:
    """A tls:// scheduler needs this client to present a certificate that the cluster's CA signed (Dask's TLS is
    mutual), read from Dask's configuration as distributed.Client reads it; a plain tcp:// address is refused when
    that configuration requires encryption. Said here in one line instead of a handshake error later."""
    address = config.dask_address
    if not address:
        return
    import dask

    scheme = address.split("://", 1)[0].lower() if "://" in address else "tcp"
    if scheme != "tls":
        if dask.config.get("distributed.comm.require-encryption", None):
            raise PreflightError(f"Dask address {address} is not encrypted, but Dask's configuration sets "
                                 "distributed.comm.require-encryption: use the scheduler's tls:// address")
        return
    values = {key: dask.config.get(key, None) for key in _TLS_KEYS}
    missing = [key for key in ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert") if not values[key]]
    if missing:
        raise PreflightError(
            f"Dask address {address} uses TLS, but Dask's configuration has no {' or '.join(missing)}: set "
            + ", ".join(f"{_TLS_KEYS[k]}" for k in _TLS_KEYS)
            + " (or the keys in a Dask config file) to the cluster's CA file and a client certificate and key it signed")
    for key, value in values.items():
        # A value holding a newline is the PEM itself (Dask accepts that too), not a path.
        if value and "\n" not in str(value) and not os.path.isfile(value):
            raise PreflightError(f"Dask's {key} ({_TLS_KEYS[key]}) is {value!r}, which is not a file")


# How long the check tries to reach the scheduler (Dask's own connect timeout is 30 s).
DASK_CONNECT_TIMEOUT_S = 5.0


def check_dask_reachable(config: EmbedConfig) -> None:
    """A scheduler answers at --dask-address: a mistyped host or port, or a scheduler not started, refused in
    seconds, before the model's checks import torch, instead of after them and Dask's 30 s connect timeout. One
    connection as distributed.Client makes it (its handshake, and TLS with Dask's configured certificates), closed
    at once: a bare TCP probe would leave a warning in the scheduler's log at every run."""
    address = config.dask_address
    if not address:
        return
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect
    from distributed.security import Security

    async def probe() -> None:
        # bounded here too: Dask's own timeout does not cover a listener that never answers its handshake
        comm = await asyncio.wait_for(connect(address, timeout=DASK_CONNECT_TIMEOUT_S,
                                              **Security().get_connection_args("client")), DASK_CONNECT_TIMEOUT_S)
        await comm.close()

    with ThreadPoolExecutor(1) as pool:  # a thread of its own: the caller's may run an event loop (a flow's)
        try:
            pool.submit(asyncio.run, probe()).result()
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            raise PreflightError(f"Dask address {address}: no Dask scheduler answers there "
                                 f"({_why_unreachable(address, exc)}): start the scheduler, or pass the address it "
                                 "printed as it started") from None


def _why_unreachable(address: str, failed: Exception) -> str:
    """Dask's connect says only that it timed out, after retrying: the cause, from one plain TCP connection."""
    import socket

    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if (scheme or "tcp").lower() not in ("tcp", "tls"):
        return str(failed)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=DASK_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
    return (f"its port is open, but what listens there did not answer as a Dask scheduler in "
            f"{DASK_CONNECT_TIMEOUT_S:.0f} s")


# ----------------------------------------------------------------------------------------------------------- device


def check_device(config: EmbedConfig) -> None:
    """--device cuda on a local cluster needs a GPU that this process can see: without one, every shard would fail
    on its worker after Prefect and Dask had started. With --dask-address the GPUs are the workers', wherever they
    run, so nothing is checked here. Imports torch (seconds): call it where the run loads a model anyway."""
    if config.device != "cuda" or config.dask_address:
        return
    from wdsembed.cluster import visible_gpus

    if visible_gpus():
        return
    import torch

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = (f"CUDA_VISIBLE_DEVICES is {hidden!r}" if hidden is not None and hidden.strip() in ("", "-1")
           else f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
           else "torch finds no CUDA device")
    raise PreflightError(f"device cuda, but no GPU is visible here ({why}): run it on a GPU host, or pass "
                         f"{option('device')} auto (the CPU where no GPU is visible) or cpu, or "
                         f"{option('dask_address')} a scheduler whose workers have GPUs")
