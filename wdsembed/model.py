"""timm model loading and the embedding forward pass. Knows nothing of DALI or Prefect.

Weights, in order of precedence:

* ``checkpoint=FILE``: a local .safetensors / .pth / .pt / .bin (plain timm state dict, a training checkpoint with a
  ``state_dict``/``model`` entry, or a foreign format timm converts, e.g. an OpenAI/open_clip CLIP state dict) or an
  .npz for models with their own loader. Used whatever `pretrained` says: naming a file is the stronger request.
* ``pretrained=True``: the model's weights on the Hugging Face Hub, taken from the local cache when there (no network
  call at all), else downloaded. With HF_HUB_OFFLINE=1, or when the Hub does not answer a quick probe, a missing
  cache entry is a ModelLoadError at once, not a minute of retried HTTP requests.
* ``pretrained=False``: random initialisation, seeded, so every worker process gets the same weights.

The embedding: see ``resolve_embedding``.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Literal, Optional, Union

import torch
from torch import nn

from wdsembed.config import option, set_to

_logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0  # how long the Hub may take to accept a TCP connection before we call it unreachable
RANDOM_INIT_SEED = 0

# Tags / names of image-text contrastive pretraining (CLIP, OpenCLIP, EVA-CLIP, DFN, MetaCLIP, DataComp, SigLIP,
# MobileCLIP, TinyCLIP, Perception Encoder core ...). Matched as substrings of the lowercased "arch.tag".
_CONTRASTIVE_MARKERS = (
    "clip", "siglip", "openai", "laion", "dfn", "datacomp", "webli", "merged2b", "yfcc15m", "cc12m", "commonpool",
    "_pe_core",
)
# A supervised fine-tune on a labelled set turns the head into a classifier (openai_ft_in1k, clip_laion2b_ft_in12k).
_LABELLED_FINETUNE = re.compile(r"in\d+k|inw\d+k|_ft_in|bamboo")


class ModelLoadError(ValueError):
    """The model or its weights cannot be had; the message names the model and what to pass instead."""


@dataclass
class LoadedModel:
    model: "torch.nn.Module"
    name: str
    weights: str  # where the weights came from: "checkpoint:<path>", "pretrained:<hub id or cache>", "random-init"
    embedding: Literal["head", "pooled"]  # the resolved choice
    dim: int
    data_config: dict  # timm.data.resolve_model_data_config(model)
    device: "torch.device"
    channels_last: bool = False  # inputs are converted to channels_last (convnets)
    dtype: "torch.dtype" = torch.float32  # of the weights: bfloat16 once `to_bfloat16` ran
    # what each requested embedding resolves to on this model (embedding_forms); empty where not measured
    embedding_forms: dict = field(default_factory=dict)
    # the local file that pretrained weights were loaded from (the Hub's cache, torch's hub cache), where known
    weights_file: Optional[str] = None
    # the checkpoint's tensors that hold NaN or infinite values (or a negative batch-norm variance), found on the meta
    # device only (no arithmetic there to probe with): plan.check_model then probes the model for real
    suspect_weights: tuple = ()
    # what the checkpoint's load changed without a word from timm, for the run to warn of once, before any work
    # (plan.check_model): position embeddings of another grid, resampled to the model's (_resampled_positions)
    checkpoint_warning: Optional[str] = None


# --------------------------------------------------------------------------------------------------- embedding rule


def resolve_embedding(model: nn.Module, requested: str, *, classifier: bool = False) -> Literal["head", "pooled"]:
    """Which output is the embedding.

    auto -> "head" when all hold, else "pooled":
      1. the model has a head (num_classes > 0, classifier not Identity);
      2. "<architecture>.<pretrained tag>" names image-text contrastive pretraining (clip, siglip, openai, laion*,
         dfn*, datacomp*, webli*, merged2b, yfcc15m, cc12m, commonpool, apple_mclip*, tinyclip*, *_pe_core*);
      3. the tag shows no supervised fine-tune on a labelled set (in1k, in12k, in21k, in22k, _ft_in*, bamboo).
    So vit_large_patch14_clip_quickgelu_224.openai -> head (768, the CLIP projection), its .openai_ft_in1k ->
    pooled, convnext_base.clip_laion2b -> head (640), resnet50 -> pooled (2048), SigLIP/DINOv2 (no head) -> pooled.
    A head is never taken on a guess: "pooled" is the safe default, it can't return class logits.

    classifier=True: the head is a classifier whatever the tag says (a checkpoint replaced the pretrained head with
    its own classes, e.g. a CLIP tower fine-tuned on the user's labels), as if rule 3 failed.

    head on a model without a head falls back to pooled (same values: an Identity head returns the pooled
    features), with a log line. head on a classifier is honoured (class logits), with a warning.
    """
    resolved, why = _embedding_choice(model, requested, classifier)
    if why == "no head":
        _logger.info("%s has no head (num_classes=0); its head output is the pooled embedding", _arch_tag(model))
    elif why == "classifier":
        _logger.warning(
            "embedding='head' on %s: its head looks like a classifier, the embedding will be class logits",
            _arch_tag(model),
        )
    return resolved


def embedding_forms(model: nn.Module, *, classifier: bool = False) -> dict[str, Literal["head", "pooled"]]:
    """What each requested embedding resolves to on this model ({"auto": ..., "head": ..., "pooled": "pooled"}):
    resolve_embedding's choice for each, without its log lines. Recorded with each output, so that a later run with
    another request can be told, before any model loads, whether it gives the same embedding."""
    return {requested: _embedding_choice(model, requested, classifier)[0] for requested in ("auto", "head", "pooled")}


def _embedding_choice(model: nn.Module, requested: str,
                      classifier: bool) -> tuple[Literal["head", "pooled"], Optional[str]]:
    """resolve_embedding's decision, and what it has to say about it: "no head" (head asked of a model without
    one), "classifier" (head asked of a classifier: class logits), else None."""
    if requested not in ("auto", "head", "pooled"):
        raise ValueError(f"embedding must be 'auto', 'head' or 'pooled', not {requested!r}")
    has_head = _has_head(model)
    if requested == "pooled":
        return "pooled", None
    if requested == "head":
        if not has_head:
            return "pooled", "no head"
        return "head", ("classifier" if classifier or not _is_projection_head(model) else None)
    return ("head" if has_head and not classifier and _is_projection_head(model) else "pooled"), None


def _has_head(model: nn.Module) -> bool:
    if getattr(model, "num_classes", None) == 0:
        return False
    try:
        return not isinstance(model.get_classifier(), nn.Identity)
    except (AttributeError, NotImplementedError):
        return getattr(model, "num_classes", 0) > 0


def _arch_tag(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    tag = cfg.get("tag") or ""
    if not tag and cfg.get("hf_hub_id"):
        # hf-hub:timm/<arch>.<tag> configs may lack the tag field
        tag = cfg["hf_hub_id"].split("/")[-1].split("@")[0].partition(".")[2]
    return f"{arch}.{tag}" if tag else arch


def _is_projection_head(model: nn.Module) -> bool:
    name = _arch_tag(model).lower()
    tag = name.partition(".")[2]
    contrastive = any(m in name for m in _CONTRASTIVE_MARKERS)
    return contrastive and not _LABELLED_FINETUNE.search(tag)


# --------------------------------------------------------------------------------------------------- hub access


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _env_offline() -> bool:
    # Read at call time (huggingface_hub reads it once at import).
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _hub_cache_dir() -> str:
    """The Hub cache folder as huggingface_hub would resolve it from the environment now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return os.path.join(os.path.expanduser(home), "hub")


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hub (or the proxy that leads there) within `timeout`?

    huggingface_hub retries a failing request five times with backoff (about 25 s, even for a DNS failure); this
    probe answers in at most `timeout`. DNS lookups ignore socket timeouts, hence the thread.
    """
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 8080
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _hub_filenames(pretrained_cfg: Any) -> list[str]:
    """The files timm would try for these weights, safetensors first (timm's own preference)."""
    override = pretrained_cfg.hf_hub_filename
    if not override:
        return ["model.safetensors", "pytorch_model.bin"]
    names = []
    if override == "pytorch_model.bin":
        names.append("model.safetensors")
    elif override == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif override.endswith(".bin"):
        names.append(override[: -len(".bin")] + ".safetensors")
    return names + [override]


def _no_weights_message(model_name: str, why: str, hub_id: Optional[str] = None) -> str:
    fill = f" (e.g. `hf download {hub_id.split('@')[0]}` with the same HF_HOME)" if hub_id else ""
    return (
        f"cannot load pretrained weights for {model_name!r}: {why}. Pass {option('checkpoint')} a local weights "
        f"file, {option('pretrained')} for random weights, or fill the Hugging Face cache ({_hub_cache_dir()}) "
        f"where the Hub is reachable{fill}."
    )


def _fetch_hub_weights(model_name: str, hub_id: str, filenames: list[str]) -> str:
    """Local path of the weights: from the cache if there, else downloaded. ModelLoadError when neither works."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    repo, _, revision = hub_id.partition("@")
    cache_dir = _hub_cache_dir()
    for fn in filenames:
        hit = huggingface_hub.try_to_load_from_cache(repo, fn, cache_dir=cache_dir, revision=revision or None)
        if isinstance(hit, str):
            return hit
    if _env_offline():
        raise ModelLoadError(
            _no_weights_message(model_name, f"{hub_id} is not in the cache and HF_HUB_OFFLINE is set", hub_id)
        )
    endpoint = _hub_endpoint()
    if not _hub_reachable(endpoint):
        raise ModelLoadError(
            _no_weights_message(
                model_name, f"{hub_id} is not in the cache and the Hub ({endpoint}) is unreachable", hub_id
            )
        )
    last: Optional[Exception] = None
    for fn in filenames:
        try:
            return huggingface_hub.hf_hub_download(
                repo, fn, revision=revision or None, cache_dir=cache_dir, endpoint=endpoint, etag_timeout=10
            )
        except hf_errors.LocalEntryNotFoundError as e:  # network failed after the probe: same answer
            raise ModelLoadError(_no_weights_message(model_name, f"downloading {hub_id} failed ({e})")) from e
        except hf_errors.EntryNotFoundError as e:  # this repo lacks that file name: try the next one
            last = e
        except (hf_errors.HfHubHTTPError, OSError) as e:  # gated/missing repo, auth, disk
            raise ModelLoadError(_no_weights_message(model_name, f"downloading {hub_id} failed: {e}")) from e
    raise ModelLoadError(_no_weights_message(model_name, f"{hub_id} has none of {filenames} ({last})"))


@contextlib.contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub serve from its cache only, for calls we don't make ourselves (hf-hub: model names)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hub_weights_in_cache(model_name: str, model: nn.Module) -> Optional[str]:
    """The cached file that timm loaded an hf-hub: model's weights from (it fetches them itself), or None."""
    import huggingface_hub

    repo, _, revision = model_name.split(":", 1)[1].partition("@")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    filenames = _hub_filenames(type("Cfg", (), {"hf_hub_filename": cfg.get("hf_hub_filename")}))
    for fn in filenames:
        hit = huggingface_hub.try_to_load_from_cache(repo, fn, cache_dir=_hub_cache_dir(), revision=revision or None)
        if isinstance(hit, str):
            return hit
    return None


_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def weights_file_record(path: str) -> dict:
    """Which pretrained weights a file holds, for the outputs' provenance: its name, the Hub snapshot (commit) it
    belongs to where it lies in the Hugging Face cache, and "sha256:<hex>" of its bytes. The cache stores a file
    tracked by LFS (weights) under its SHA-256: that name is taken as it is, else the file is hashed."""
    parent = os.path.dirname(path)
    revision = (os.path.basename(parent) if os.path.basename(os.path.dirname(parent)) == "snapshots" else None)
    blob = os.path.basename(os.path.realpath(path))
    if _SHA256_NAME.fullmatch(blob):
        digest = blob
    else:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                sha.update(chunk)
        digest = sha.hexdigest()
    return {"file": os.path.basename(path), "revision": revision, "fingerprint": f"sha256:{digest}"}


# --------------------------------------------------------------------------------------------------- names


# Where to look for a model name, when no close name can be suggested.
LIST_HINT = " See timm.list_models() / timm.list_pretrained()."


def _suggest(model_name: str) -> str:
    import timm

    arch, dot, tag = model_name.partition(".")
    if dot and timm.is_model(arch):
        options = timm.list_pretrained(f"{arch}.*")
        pool = options
    else:
        options = timm.list_models(f"*{arch}*")[:8]
        pool = timm.list_models() + timm.list_pretrained()
    close = difflib.get_close_matches(model_name, pool, n=5, cutoff=0.6)
    names = list(dict.fromkeys(close + options))[:8]
    return f" Did you mean: {', '.join(names)}?" if names else LIST_HINT


@functools.lru_cache(maxsize=None)
def timm_name(model_name: str) -> str:
    """The architecture and pretrained tag timm builds `model_name` as: a name without a tag takes its architecture's
    default one (timm.models.get_pretrained_cfg: `resnet18` -> `resnet18.a1_in1k`), whose pretrained cfg (weights,
    preprocessing, head) it then is in every way. The name itself where it has a tag, where timm registers no tagged
    cfg for it (or does not know it), and for hf-hub: / local-dir: names: their config.json is the Hub repo's or the
    folder's own, not timm's registry, and is not shown to match it."""
    if ":" in model_name or "." in model_name:
        return model_name
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _ = split_model_name_tag(model_name)
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:
        return model_name
    return f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag and cfg.architecture == arch else model_name


def spellings(model_name: str) -> tuple[str, ...]:
    """Every name of the model that timm builds as `model_name` (timm_name), `model_name` first: an architecture and
    its default tag spelled out (`resnet18`, `resnet18.a1_in1k`); the name alone for any other tag (resnet18.tv_in1k)
    and for hf-hub: / local-dir: names. Built from either, with the same weights or seed, the model is the same."""
    resolved = timm_name(model_name)
    arch = resolved.partition(".")[0]
    return tuple(dict.fromkeys(n for n in (model_name, resolved, arch) if timm_name(n) == resolved))


def _hub_form(model_name: str) -> str:
    """For a name spelled as a Hub repo id (`owner/name`, as the Hub's pages show it): timm takes one only with its
    `hf-hub:` prefix, which the user most likely left out."""
    owner, slash, repo = model_name.partition("/")
    if not slash or not owner or not repo or "/" in repo or owner.startswith("."):
        return ""
    return f" A Hugging Face Hub repo is named with the hf-hub: prefix: 'hf-hub:{model_name}'."


def check_model_name(model_name: str) -> None:
    """Raise ModelLoadError, with suggestions, for a name timm does not know or a pretrained tag it lacks."""
    _check_name(model_name)


def _check_name(model_name: str) -> None:
    """Fail early, with suggestions, for names timm does not know (hf-hub: / local-dir: names are timm's to check)."""
    import timm

    if ":" in model_name:
        return
    arch, dot, tag = model_name.partition(".")
    if not timm.is_model(arch):
        raise ModelLoadError(f"unknown timm model {model_name!r}.{_hub_form(model_name)}{_suggest(model_name)}")
    # Exactly that name: list_pretrained takes a pattern ("resnet18.a1_*", or "resnet18." with an empty tag, matches
    # other tags), and timm's own refusal of such a tag is a bare RuntimeError from inside create_model.
    if dot and model_name not in timm.list_pretrained(model_name):
        raise ModelLoadError(
            f"unknown timm model {model_name!r}: {arch!r} exists but has no pretrained tag {tag!r}.{_suggest(model_name)}"
        )


def _require_source_config(model_name: str, offline: bool) -> None:
    """The config.json that timm builds an hf-hub: or local-dir: model from (its architecture and preprocessing),
    needed whatever the weights, random ones or a checkpoint's too: its absence is said here, naming where it was
    looked for, rather than as the Hub client's or the file system's error from inside timm."""
    source, _, where = model_name.partition(":")
    if source.lower() == "local-dir":
        if not os.path.isfile(os.path.join(where, "config.json")):  # timm joins it as it is (no ~ expanded)
            raise ModelLoadError(
                f"cannot create {model_name!r}: {where!r} has no config.json, which timm builds a local-dir: model "
                "from (timm.models.save_for_hf writes one beside the weights). Pass "
                f"{option('model_name')} local-dir: a folder with one, or the timm model name with "
                f"{option('checkpoint')} its weights file"
            )
    elif offline:  # hf-hub: timm downloads the config, unless the cache holds it
        import huggingface_hub

        repo, _, revision = where.partition("@")
        cached = huggingface_hub.try_to_load_from_cache(repo, "config.json", cache_dir=_hub_cache_dir(),
                                                        revision=revision or None)
        if not isinstance(cached, str):
            why = "HF_HUB_OFFLINE is set" if _env_offline() else f"the Hub ({_hub_endpoint()}) is unreachable"
            raise ModelLoadError(
                f"cannot create {model_name!r}: its config.json (the architecture and preprocessing, needed whatever "
                f"the weights) is not in the Hugging Face cache ({_hub_cache_dir()}) and {why}. Fill the cache where "
                f"the Hub is reachable (e.g. `hf download {repo}` with the same HF_HOME), or pass "
                f"{option('model_name')} the timm model name"
            )


# --------------------------------------------------------------------------------------------------- checkpoints


def _read_checkpoint(path: str, model_name: str) -> dict:
    """A state dict from a local file, through timm's reader (safetensors, torch pickles with state_dict/model/EMA
    entries, `module.` prefixes). A TorchScript archive (OpenAI's original CLIP .pt) is read with torch.jit."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(path, use_ema=True, device="cpu")
    except Exception as e:  # noqa: BLE001 - any reader failure is "this file is not a usable checkpoint"
        if "torch.jit.load" in str(e) or "TorchScript" in str(e):
            try:
                return {k: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
            except Exception:  # noqa: BLE001
                pass
        why, fix = _short(e), "a timm/PyTorch state dict (.safetensors, .pth or .bin)"
        unpickled = _pickled_objects(path)
        head = _head(path)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            why = "it is an empty file"
        elif head is not None and not _checkpoint_format(head):  # the readers' own words (KeyError: 101) say nothing
            why = (f"it is in no checkpoint format (not safetensors, nor a PyTorch zip archive or pickle): it starts "
                   f"with {head[:12]!r}")
        elif unpickled:  # torch's own words advise loading it unsafely, which no option here does
            saved = "torch.save(model.state_dict(), FILE)"
            fix = f"the weights alone, saved with {saved} or safetensors"
            if any(name.startswith("torch.nn.modules.") for name in unpickled):
                why = "it holds a whole pickled model (saved with torch.save(model))"
            else:
                shown = ", ".join(unpickled[:3]) + (", ..." if len(unpickled) > 3 else "")
                why = f"it holds Python objects besides tensors ({shown}), which are not unpickled: that runs code"
        raise ModelLoadError(f"checkpoint {path!r} for {model_name!r} cannot be read: {why}; pass "
                             f"{option('checkpoint')} {fix}") from e


def _head(path: str) -> Optional[bytes]:
    """The first 16 bytes of a local file; None where it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError:
        return None


def _checkpoint_format(head: bytes) -> bool:
    """Whether a file starting with `head` is in a format a checkpoint reader takes: safetensors (a little-endian
    header length, then its JSON), a zip archive (torch.save since 1.6, TorchScript), or a pickle (older
    torch.save)."""
    return (len(head) > 8 and head[8:9] == b"{") or head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def _pickled_objects(path: str) -> list[str]:
    """The classes and functions a torch pickle would import to load (a whole model's, numpy's), sorted; none for a
    file that is not such a pickle."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a torch zip pickle: the reader's own error says what it is
        return []


def _classifier_names(pretrained_cfg: Any) -> tuple[str, ...]:
    """The modules of the model's head, as timm names them in a state dict ("fc", "head.fc", ("head", "head_dist"))."""
    classifiers = pretrained_cfg.classifier
    if not classifiers:
        return ()
    return (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)


def _classifier_override(state_dict: dict, pretrained_cfg: Any) -> Optional[int]:
    """num_classes of a fine-tuned classifier checkpoint whose head differs from the pretrained cfg's, else None.

    Without it timm would refuse the checkpoint (size mismatch) although the pooled features are what we want.
    """
    for name in _classifier_names(pretrained_cfg):
        w = state_dict.get(f"{name}.weight")
        if isinstance(w, torch.Tensor) and w.ndim >= 1 and w.shape[0] != pretrained_cfg.num_classes:
            return int(w.shape[0])
    return None


# Where a checkpoint keeps its absolute position embedding and its patch kernel, in the layouts that timm's ViT
# conversion takes (vision_transformer.checkpoint_filter_fn: timm's own, OpenCLIP's timm trunk, OpenAI CLIP's).
_POSITION_KEYS = (
    ("pos_embed", "patch_embed.proj.weight"),
    ("visual.trunk.pos_embed", "visual.trunk.patch_embed.proj.weight"),
    ("module.visual.trunk.pos_embed", "module.visual.trunk.patch_embed.proj.weight"),
    ("visual.positional_embedding", "visual.conv1.weight"),
    ("module.visual.positional_embedding", "module.visual.conv1.weight"),
)


def _checkpoint_positions(state_dict: dict) -> Optional[tuple[int, Optional[int]]]:
    """How many positions a checkpoint's absolute position embedding holds (prefix tokens included) and the side of
    its patch kernel (None where it has none), read from the tensors' shapes; None for a checkpoint without one."""
    for positions, patch in _POSITION_KEYS:
        v, w = state_dict.get(positions), state_dict.get(patch)
        if isinstance(v, torch.Tensor) and v.ndim >= 2:
            kernel = int(w.shape[-1]) if isinstance(w, torch.Tensor) and w.ndim == 4 else None
            return int(v.shape[-2]), kernel
    return None


def _resampled_positions(held: tuple[int, Optional[int]], model: nn.Module, model_name: str,
                         checkpoint: str) -> Optional[str]:
    """The warning for a checkpoint whose position embeddings are of another patch grid than the model's (a ViT
    fine-tuned at 384 px loaded as a 224 px model), else None. timm resamples them to fit without a word
    (resample_abs_pos_embed, logged at INFO), and the run embeds at the model's size, with its preprocessing: a size
    the weights were not trained at. Said, not refused: resampling is a use of timm's (a checkpoint run at a smaller
    size, faster), and no option here sets the input size. Only a square grid is told: a checkpoint's tensor holds a
    count of positions, not their grid (384 is 16x24, 24x16 or 12x32), and timm, which reads the source grid only
    from the model's own config (timm.models._input.get_pretrained_grid_size) and takes it square otherwise, refuses
    to load a non-square one into a model of another grid (load_model's ModelLoadError): none is resampled."""
    pos, embed = getattr(model, "pos_embed", None), getattr(model, "patch_embed", None)
    grid, patch = getattr(embed, "grid_size", None), getattr(embed, "patch_size", None)
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or not grid or not patch:
        return None
    positions, kernel = held
    if positions == pos.shape[1]:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1) or 0)
    side = math.isqrt(max(positions - prefix, 0))
    if side == 0 or side * side != positions - prefix:
        return None
    size = side * (kernel or patch[0])
    ours = (grid[0] * patch[0], grid[1] * patch[1])
    ours_px = f"{ours[0]} px" if ours[0] == ours[1] else f"{ours[0]}x{ours[1]} px"
    arch = _arch_tag(model).partition(".")[0]
    named = _name_at_size(model_name, ours, size)
    local_dir = (f"{option('model_name')} local-dir:FOLDER with this checkpoint, FOLDER written by "
                 f"timm.models.save_for_hf(timm.create_model({arch!r}, img_size={size}), FOLDER)")
    fix = (f"{set_to('model_name', named)}, timm's {size} px form of it, with this checkpoint" if named
           else f"{local_dir} (timm names no {size} px form of {model_name!r})")
    return (f"checkpoint {checkpoint!r} holds position embeddings for a patch grid of {side}x{side} ({size} px "
            f"images), but {model_name!r}'s grid is {grid[0]}x{grid[1]} ({ours_px}): timm resamples them to fit, and the run "
            f"embeds at {ours_px} with that size's preprocessing, a size the weights were not trained at. To embed at "
            f"the checkpoint's own size, pass {fix}")


def _name_at_size(model_name: str, ours: tuple[int, int], size: int) -> Optional[str]:
    """The timm name of `model_name`'s architecture at `size` px (vit_base_patch16_224.augreg_in21k ->
    vit_base_patch16_384.augreg_in21k, or the bare architecture where that tag has no such form), where timm has
    one; None for hf-hub: / local-dir: names and sizes timm names no model for."""
    import timm

    if ":" in model_name or ours[0] != ours[1]:
        return None
    arch, dot, tag = model_name.partition(".")
    other = re.sub(rf"(?<=_){ours[0]}(?=_|$)", str(size), arch)
    if other == arch or not timm.is_model(other):
        return None
    tagged = f"{other}.{tag}"
    return tagged if dot and tagged in timm.list_pretrained(tagged) else other


def _source_cfg(model_name: str, offline: bool) -> Any:
    """The pretrained cfg (a timm PretrainedCfg) that timm builds an hf-hub: or local-dir: model with, from its
    config.json (`_require_source_config` has checked that it can be had): its head's names and classes, which a
    checkpoint is judged against as a timm name's own cfg is."""
    import dataclasses

    from timm.models import PretrainedCfg, load_model_config_from_hf
    from timm.models._hub import load_model_config_from_path

    source, _, where = model_name.partition(":")
    if source.lower() == "local-dir":
        cfg, _, _ = load_model_config_from_path(where)
    else:
        with _hub_offline_mode(offline):
            cfg, _, _ = load_model_config_from_hf(where, cache_dir=_hub_cache_dir())
    return PretrainedCfg(**{f.name: cfg[f.name] for f in dataclasses.fields(PretrainedCfg) if f.name in cfg})


def _is_headless(state_dict: dict, model_name: str, pretrained_cfg: Any, *, offline: bool = False,
                 cache_dir: Optional[str] = None) -> bool:
    """Whether the checkpoint holds the model's weights less its head: saved from num_classes=0 (a feature
    extractor, the output of self-supervised training), so that a strict load would refuse it for the missing head.
    offline, cache_dir: an hf-hub: model's, as load_model builds it.

    Judged key for key against the model built without a head, on the meta device (no memory, no init): a checkpoint
    in a foreign layout that timm converts (an OpenAI CLIP state dict) lacks timm's head keys too, yet has a head.
    """
    import timm

    names = _classifier_names(pretrained_cfg)
    if not names or not pretrained_cfg.num_classes:
        return False  # the model has no head to leave out
    if any(k.startswith(f"{name}.") for name in names for k in state_dict):
        return False
    with torch.random.fork_rng(devices=[]), torch.device("meta"), _hub_offline_mode(offline):
        headless = timm.create_model(model_name, pretrained=False, num_classes=0, cache_dir=cache_dir)
    return set(state_dict) == set(headless.state_dict())


def _short(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def _misfit(e: BaseException) -> str:
    """What a strict load of a checkpoint into the model found, in a few words: how many of the model's weights the
    file lacks, how many of its own the model has no place for, how many have another shape, each with the first
    names. torch's message lists every key: thousands of characters, on several lines, for a ViT. Any other error
    (a conversion of timm's that failed), shortened."""
    missing: list[str] = []
    unexpected: list[str] = []
    reshaped: list[str] = []
    for line in str(e).splitlines():
        keys = re.match(r"\s*(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)
        if keys:
            (missing if keys[1] == "Missing" else unexpected).extend(re.findall(r'"([^"]*)"', keys[2]))
        shape = re.match(r"\s*size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                         r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", line)
        if shape:
            reshaped.append(f"{shape[1]} {shape[2]} for {shape[3]}")
    if not (missing or unexpected or reshaped):
        return _short(e)

    def first(names: list[str]) -> str:
        # weights rather than BatchNorm's step counters, which tell nothing of the architecture
        shown = [n for n in names if not n.endswith("num_batches_tracked")] or names
        return ", ".join(shown[:3]) + (", ..." if len(names) > 3 else "")

    said = []
    if missing:
        said.append(f"{len(missing)} of the model's weights missing ({first(missing)})")
    if unexpected:
        said.append(f"{len(unexpected)} in the file that the model has no place for ({first(unexpected)})")
    if reshaped:
        said.append(f"{len(reshaped)} of another shape ({first(reshaped)})")
    return "; ".join(said)


# --------------------------------------------------------------------------------------------------- load


@contextlib.contextmanager
def _on_meta(dev: torch.device) -> Iterator[None]:
    """device="meta": build the model without memory (shapes only), so that a checkpoint can be checked against it
    cheaply before a run (wdsembed.plan.check_config); loading real tensors into it is a no-op, shapes still checked."""
    if dev.type != "meta":
        yield
        return
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        yield


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_convnet(model: nn.Module) -> bool:
    # A ViT has one conv (its patch embedding); convnets and hybrids have many and gain from channels_last, on CUDA
    # and on the CPU (oneDNN's convolutions: ResNet-18 ran 1.25x as fast in float32 on one core, docs/benchmarks.md).
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 4


def load_model(
    model_name: str,
    *,
    pretrained: bool = True,
    checkpoint: Optional[str] = None,
    embedding: Literal["auto", "head", "pooled"] = "auto",
    device: str = "cpu",
) -> LoadedModel:
    """Create `model_name` with timm, load its weights, put it in eval mode on `device` and measure its embedding.

    Raises ModelLoadError (a ValueError) for an unknown name, weights that cannot be had, or a checkpoint that is
    missing, unreadable or does not fit the model; the message names the model or file and what to pass instead.
    """
    import timm
    from timm.models import get_pretrained_cfg

    if embedding not in ("auto", "head", "pooled"):
        raise ModelLoadError(f"embedding must be 'auto', 'head' or 'pooled', not {embedding!r}")
    _check_name(model_name)
    dev = _resolve_device(device)
    kwargs: dict[str, Any] = {}
    sd: Optional[dict] = None
    replaced_head = False
    sourced = ":" in model_name  # hf-hub:org/name or local-dir:path: timm reads its config (and weights) there
    hub_name = sourced and model_name.split(":", 1)[0].lower() in ("hf-hub", "hf_hub")
    cfg = None if sourced else get_pretrained_cfg(model_name)
    # For hub names timm calls the Hub itself: where it is unreachable, make those calls cache-only.
    offline = hub_name and (_env_offline() or not _hub_reachable(_hub_endpoint()))
    if sourced:
        _require_source_config(model_name, offline)
        if checkpoint:  # judged against its head as a timm name's checkpoint is (a fine-tune's classes, none)
            cfg = _source_cfg(model_name, offline)

    weights_file: Optional[str] = None
    suspect: list[str] = []
    held: Optional[tuple[int, Optional[int]]] = None  # the checkpoint's position embedding (_checkpoint_positions)
    if checkpoint:
        path = os.path.abspath(os.path.expanduser(checkpoint))
        if not os.path.isfile(path):
            raise ModelLoadError(f"checkpoint file {checkpoint!r} for {model_name!r} does not exist (or is not a file)")
        weights = f"checkpoint:{path}"
        if path.endswith(".npz"):
            overlay: dict[str, Any] = dict(file=path, custom_load=True, source=None)
        else:
            sd = _read_checkpoint(path, model_name)
            held = _checkpoint_positions(sd)
            if dev.type == "meta":
                suspect = _suspect_tensors(sd)
            # Pass the tensors, not the file, so the file is read once; timm's filter (format conversion) and
            # strict load still apply exactly as for a file.
            overlay = dict(state_dict=sd, source=None)
            n = _classifier_override(sd, cfg) if cfg is not None else None
            if n is not None:
                _logger.info("checkpoint %s has a %d-class head; building %s with it", path, n, model_name)
                overlay["num_classes"] = n
                kwargs["num_classes"] = n
                # its own classes: a classifier now, even where the pretrained tag names a CLIP projection
                replaced_head = True
            elif cfg is not None and _is_headless(sd, model_name, cfg, offline=offline,
                                                  cache_dir=_hub_cache_dir() if hub_name else None):
                if embedding == "head":
                    raise ModelLoadError(
                        f"checkpoint {checkpoint!r} has no head for {model_name!r} (none of the weights of "
                        f"{' / '.join(_classifier_names(cfg))}: a feature extractor's, saved with num_classes=0), "
                        f"so {set_to('embedding', 'head')} cannot be had. Pass {option('embedding')} pooled or auto: "
                        "both give its pooled features."
                    )
                _logger.info("checkpoint %s has no head; building %s without one (pooled features)", path, model_name)
                # timm then loads it strictly: every other key must be there; no label offset to cut from a head
                overlay.update(num_classes=0, label_offset=0)
                kwargs["num_classes"] = 0
        want_pretrained = True
    elif pretrained:
        if sourced:
            weights = f"pretrained:{model_name}"
            overlay = {}
        else:
            if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
                raise ModelLoadError(
                    f"timm has no pretrained weights for {model_name!r}. Pass {option('checkpoint')} a local "
                    f"weights file or {option('pretrained')}."
                )
            if cfg.hf_hub_id:
                local = _fetch_hub_weights(model_name, cfg.hf_hub_id, _hub_filenames(cfg))
                weights = f"pretrained:{cfg.hf_hub_id}"
                overlay = dict(file=local, custom_load=cfg.custom_load == "hf")
                weights_file = local
            else:
                # Weights only at a URL: timm downloads them into the torch hub cache, or finds them there.
                cached = os.path.join(
                    torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlsplit(cfg.url).path)
                )
                if not os.path.isfile(cached) and (_env_offline() or not _hub_reachable(cfg.url)):
                    raise ModelLoadError(_no_weights_message(model_name, f"{cfg.url} is not in {cached} and offline"))
                weights = f"pretrained:{cfg.url}"
                overlay = {}
                weights_file = cached
        want_pretrained = True
    else:
        weights, overlay, want_pretrained = "random-init", {}, False

    try:
        # Seeded so random-init (and any layer a checkpoint leaves out) is the same in every worker process.
        with torch.random.fork_rng(devices=[]), _hub_offline_mode(offline), _on_meta(dev):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(
                model_name,
                pretrained=want_pretrained,
                pretrained_cfg_overlay=overlay or None,
                cache_dir=_hub_cache_dir() if hub_name else None,
                **kwargs,
            )
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - everything timm/torch raise here means "cannot build these weights"
        if checkpoint:
            raise ModelLoadError(
                f"checkpoint {checkpoint!r} does not fit {model_name!r}: {_misfit(e)}. Pass {option('checkpoint')} "
                f"a weights file of {model_name!r}, or {option('model_name')} the model the file was trained as"
            ) from e
        if offline:
            why = f"its config/weights are not in the cache and the Hub is offline ({_short(e, 160)})"
            raise ModelLoadError(_no_weights_message(model_name, why)) from e
        raise ModelLoadError(f"cannot create {model_name!r}: {_short(e)}") from e
    finally:
        overlay, sd = {}, None  # drop our references to the checkpoint tensors
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        # timm keeps the cfg on the model; a state dict in it would hold a second copy of the weights
        model.pretrained_cfg.pop("state_dict", None)

    model.eval().requires_grad_(False).to(dev)
    channels_last = dev.type in ("cuda", "cpu") and _is_convnet(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_config = timm.data.resolve_model_data_config(model)
    resolved = resolve_embedding(model, embedding, classifier=replaced_head)
    loaded = LoadedModel(
        embedding_forms=embedding_forms(model, classifier=replaced_head),
        weights_file=weights_file or (_hub_weights_in_cache(model_name, model)
                                      if hub_name and want_pretrained and not checkpoint else None),
        model=model,
        name=model_name,
        weights=weights,
        embedding=resolved,
        dim=0,
        data_config=data_config,
        device=dev,
        channels_last=channels_last,
        suspect_weights=tuple(suspect),
        checkpoint_warning=_resampled_positions(held, model, model_name, checkpoint) if checkpoint and held else None,
    )
    # Measure, don't infer: the dim is whatever the forward we run per batch returns.
    probe = torch.zeros((1, *data_config["input_size"]), device=dev)
    try:
        out = embed_batch(loaded, probe, autocast=False, normalize=False)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise  # the device's state, not the model's: a retry may pass
    except Exception as e:  # noqa: BLE001 - the model's own: an encoder without a pooled output (timm raises
        # NotImplementedError from its forward_head), whatever the device, so refused before a run (plan.check_model)
        part = "forward" if resolved == "head" else "forward_head"
        raise ModelLoadError(
            f"{model_name!r} gives no embedding: its {part} raises {_short(e, 300).rstrip('.')}. "
            f"Pass {_what_could_work(loaded, probe)}"
        ) from e
    if out.ndim != 2:
        no_head = " (it has no head)" if embedding == "head" and resolved == "pooled" else ""
        raise ModelLoadError(
            f"{model_name!r} gives no embedding{no_head}: its {'head' if resolved == 'head' else 'pooled'} output has "
            f"shape {tuple(out.shape)}, not (N, dim). Pass {_what_could_work(loaded, probe)}"
        )
    if dev.type != "meta" and not bool(torch.isfinite(out).all()):
        _refuse_nonfinite(loaded, checkpoint)
    loaded.dim = int(out.shape[1])
    _logger.info("loaded %s (%s): embedding=%s dim=%d on %s", model_name, weights, resolved, loaded.dim, dev)
    return loaded


def _what_could_work(loaded: LoadedModel, probe: "torch.Tensor") -> str:
    """The advice of a refused embedding: the model's other embedding only where it gives (N, dim) (probed: with no
    head, or none over unpooled features, it does not), and another model."""
    another = f"{option('model_name')} a model with a pooling head"
    for other in sorted(set(loaded.embedding_forms.values()) - {loaded.embedding}):
        try:
            out = embed_batch(replace(loaded, embedding=other), probe, autocast=False, normalize=False)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            raise
        except Exception:  # noqa: BLE001 - it does not work either: not offered
            continue
        if out.ndim == 2:
            return f"{set_to('embedding', other)}, which gives (N, {out.shape[1]}), or {another}"
    return another


# --------------------------------------------------------------------------------------------------- forward


def _suspect_tensors(state_dict: dict) -> list[str]:
    """The names of a state dict's floating tensors that hold NaN or infinite values, or a batch norm's running
    variance below zero (its square root is NaN)."""
    def suspect(name: str, v: torch.Tensor) -> bool:
        return not bool(torch.isfinite(v).all()) or (name.endswith("running_var") and bool((v < 0).any()))

    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta" and suspect(k, v)]


def _refuse_nonfinite(loaded: LoadedModel, checkpoint: Optional[str]) -> None:
    """Raise ModelLoadError where the model's embedding is not finite for noise either (the blank probe's was not):
    broken weights (a diverged training run's save) would fail every image of every shard, one row at a time. A model
    that is only not finite for a blank image is left to do so, image by image."""
    noise = torch.randn((2, *loaded.data_config["input_size"]), generator=torch.Generator().manual_seed(0))
    if bool(torch.isfinite(embed_batch(loaded, noise, autocast=False, normalize=False)).all()):
        return
    bad = _suspect_tensors(loaded.model.state_dict())
    where = f"checkpoint {checkpoint!r}" if checkpoint else loaded.weights
    cause = (f"its weights hold NaN or infinite values, or a negative batch-norm variance ({len(bad)} tensor(s): "
             f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad
             else "its weights are finite, but its activations are not (an overflow)")
    fix = (f"Pass {option('checkpoint')} a weights file without them (an earlier save of the training run)"
           if checkpoint and bad else f"Pass {option('checkpoint')} other weights of it")
    raise ModelLoadError(f"{loaded.name!r} with the weights of {where} gives NaN or infinite embeddings for every "
                         f"image tried (a blank one and noise), so every image would fail: {cause}. {fix}")


def to_bfloat16(loaded: LoadedModel) -> LoadedModel:
    """The model's weights in bfloat16, in place, on a GPU: its fastest eager form, faster than bfloat16 autocast
    over float32 weights (no per-call weight casts). The CPU keeps float32 (bf16 is slower on most CPUs)."""
    if loaded.device.type == "cuda" and loaded.dtype != torch.bfloat16:
        loaded.model.to(torch.bfloat16)
        loaded.dtype = torch.bfloat16
    return loaded


def embed_batch(loaded: LoadedModel, images: "torch.Tensor", *, autocast: bool, normalize: bool) -> "torch.Tensor":
    """(N, C, H, W) -> (N, dim) float32 on the model's device.

    With bfloat16 weights (`to_bfloat16`), the images are cast to bfloat16 and the model runs in it. Otherwise
    autocast: bfloat16 autocast on CUDA only; on the CPU the model runs float32 regardless (CPU bf16 is slower on
    most CPUs and changes values). normalize: L2 over dim, in float32; an all-zero row stays zero. No host sync.
    """
    x = images.to(device=loaded.device, dtype=loaded.dtype, non_blocking=True)
    if loaded.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    use_amp = autocast and loaded.device.type == "cuda" and loaded.dtype == torch.float32
    amp_device = "cpu" if loaded.device.type == "meta" else loaded.device.type  # meta: load_model's shape check
    with torch.inference_mode(), torch.autocast(device_type=amp_device, dtype=torch.bfloat16, enabled=use_amp):
        out = _model_output(loaded, x)
    out = out.float()
    return l2_normalize(out) if normalize else out


def l2_normalize(out: "torch.Tensor") -> "torch.Tensor":
    """F.normalize over dim 1, but a row whose values are finite and whose L2 norm overflows float32 (values past
    about 1e19) is divided by its largest magnitude first: else it was divided by an infinite norm and came out all
    zeros. Every other row is divided by 1.0 there, so it is normalized bit for bit as F.normalize does; a row
    holding NaN or infinity stays as F.normalize leaves it (non-finite). No host sync."""
    peak = out.abs().amax(dim=1, keepdim=True)
    overflows = torch.isinf(torch.linalg.vector_norm(out, dim=1, keepdim=True)) & torch.isfinite(peak)
    out = out / torch.where(overflows, peak, torch.ones_like(peak))
    return torch.nn.functional.normalize(out, p=2.0, dim=1, eps=1e-12)


def _model_output(loaded: LoadedModel, x: "torch.Tensor") -> "torch.Tensor":
    """The model's output that is the embedding (resolve_embedding's choice), before any cast or normalization."""
    model = loaded.model
    return model(x) if loaded.embedding == "head" else model.forward_head(model.forward_features(x), pre_logits=True)


def compile_embedding(loaded: LoadedModel, *, normalize: bool) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """`embed_batch` for a model in bfloat16 (or float32 without autocast) through torch.compile: inductor, with the
    weights frozen in as constants, so that it can fuse the model's elementwise work (norms, activations, residual
    adds) into fewer kernels. The first call compiles (tens of seconds for a ResNet-50 or a ViT-B/16); the result
    is a function of a batch already in the model's dtype, device and memory format, to run in inference mode."""
    def forward(x: "torch.Tensor") -> "torch.Tensor":
        out = _model_output(loaded, x).float()
        return l2_normalize(out) if normalize else out

    return torch.compile(forward, options={"freezing": True})


# --------------------------------------------------------------------------------------------------- CUDA graph


class BatchGraph:
    """`embed_batch` on batches of one shape, captured once as a CUDA graph and replayed: one launch per batch instead
    of one per kernel, the same kernels on the same inputs.

    Why: fed by DALI, a model's eager launches (hundreds per batch for a convnet) hold the GIL that the threads
    feeding the pipeline also need. On one H200 the full flow ran 11% (ViT-B/16) and 15% (ResNet-50) faster with the
    graph than eagerly (docs/benchmarks.md, seventh session). Build it before the pipeline runs: capturing
    synchronises the device. Memory: the graph keeps one batch's activations in a pool of its own (ViT-B/16's worker
    held 1.35 GiB more GPU memory). compiled: the graph of compile_embedding's kernels, which the GPU worker captures
    by default (ResNet-50's flow ran 26% faster that way, ViT-B/16's 6%: docs/benchmarks.md, thirty-sixth session).
    """

    def __init__(self, loaded: LoadedModel, shape: tuple[int, ...], *, autocast: bool, normalize: bool,
                 compiled: bool = False) -> None:
        if loaded.device.type != "cuda":
            raise ValueError("a CUDA graph needs the model on a GPU")
        layout = torch.channels_last if loaded.channels_last else torch.contiguous_format
        self.flags = (autocast, normalize)
        self.compiled = compiled
        self.static_in = torch.zeros(shape, dtype=loaded.dtype, device=loaded.device).contiguous(memory_format=layout)
        if compiled:  # compile_embedding's kernels captured instead of the eager ones
            if autocast and loaded.dtype == torch.float32:
                raise ValueError("compile_embedding runs the weights' own dtype: autocast over float32 is not compiled")
            fn = compile_embedding(loaded, normalize=normalize)

            def forward() -> "torch.Tensor":
                with torch.inference_mode():
                    return fn(self.static_in)
        else:
            def forward() -> "torch.Tensor":
                return embed_batch(loaded, self.static_in, autocast=autocast, normalize=normalize)
        side = torch.cuda.Stream(loaded.device)
        side.wait_stream(torch.cuda.current_stream(loaded.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # cuBLAS/cuDNN handles, autotuning and lazy buffers (and compiling), outside the capture
                forward()
        side.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (DALI's, a fidelity reference) may use CUDA meanwhile.
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.static_out = forward()
        torch.cuda.empty_cache()  # the warm-ups' activations would stay cached beside the graph's own pool

    def images_per_second(self, seconds: float = 0.2, least: int = 3) -> float:
        """The model's own rate as this graph runs it: replays of whole batches, as the worker makes them, on a
        resident batch, back to back and timed on the GPU (at least `least`, about `seconds` in all). What the
        GPU could embed with nothing in front of it, against which a run's rate tells whether the input held it
        back (wdsembed.report.gpu_use)."""
        device = self.static_in.device
        # random values, as a photo's pixels are: through the same graph on one H200, zeros ran 0.8% (ResNet-50) and
        # 2% (ViT-B/16) faster than random batches (forty-sixth session)
        batch = torch.randn_like(self.static_in)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            once = time.perf_counter()
            self(batch)
            stream.synchronize()
            # as many as fill `seconds` at the rate of one (not a loop on the clock: replays queue up far faster
            # than they run)
            n = max(least, min(100, round(seconds / max(time.perf_counter() - once, 1e-4))))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(n):
                self(batch)
            end.record(stream)
        end.synchronize()
        return n * batch.shape[0] / (start.elapsed_time(end) / 1000)

    def fits(self, images: "torch.Tensor", *, autocast: bool, normalize: bool) -> bool:
        """Whether a batch can be replayed: the captured shape, dtype and device, and the captured flags."""
        return (images.shape == self.static_in.shape and images.dtype == self.static_in.dtype
                and images.device == self.static_in.device and (autocast, normalize) == self.flags)

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        """The embeddings of `images` (which must fit), on the current stream: a tensor of their own, since the next
        replay overwrites the graph's output."""
        with torch.inference_mode():
            self.static_in.copy_(images)
            self.graph.replay()
            return self.static_out.clone()


def capture_batch_graph(loaded: LoadedModel, shape: tuple[int, ...], *, autocast: bool,
                        normalize: bool, compiled: bool = False) -> Optional[BatchGraph]:
    """A BatchGraph of the model for batches of `shape`, or None (the model then runs eagerly) on the CPU, or where
    the model cannot be captured (a forward that syncs with the host, out of memory): logged, never fatal.
    compiled: of compile_embedding's kernels, falling back to the eager ones where compiling fails."""
    if loaded.device.type != "cuda":
        return None
    if compiled:
        try:
            return BatchGraph(loaded, shape, autocast=autocast, normalize=normalize, compiled=True)
        except Exception as e:  # noqa: BLE001 - no compiler, an operator inductor cannot lower: the eager kernels
            _logger.warning("%s is captured uncompiled: torch.compile failed (%s)", loaded.name, _short(e, 300))
            torch.cuda.synchronize(loaded.device)
            torch.cuda.empty_cache()
    try:
        return BatchGraph(loaded, shape, autocast=autocast, normalize=normalize)
    except Exception as e:  # noqa: BLE001 - whatever stops the capture, the eager forward still works
        _logger.info("%s runs eagerly: it cannot be captured as a CUDA graph (%s)", loaded.name, _short(e, 300))
        torch.cuda.synchronize(loaded.device)
        torch.cuda.empty_cache()
        return None
