"""Every run proves its embeddings: a small deterministic sample of its own images is embedded again with timm's own
eval transform (PIL) and the same weights in float32, and compared (cosine) with what the run wrote.

    collector = SampleCollector(quota)                    # wraps the shard's (key, bytes) stream; keeps a few
    record = check_sample(worker, collector.chosen(), keys, embeddings, failures, max_pixels)   # per shard
    summary = summarize(config, results)                  # over the run's shards (cached ones: their stored record)
    check(manifest)                                       # raises FidelityError below the threshold

Nothing here imports Prefect.
"""
from __future__ import annotations

import contextlib
import heapq
import io
import threading
import warnings
from concurrent.futures import CancelledError, Future
from typing import Iterable, Iterator, Optional

import numpy as np

from wdsembed.config import EmbedConfig, option
# imagesize's JPEG marker tables: the same header reading as the size check before decoding
from wdsembed.imagesize import _MARKER_AND_LENGTH, _MARKER_KIND, _SOF_FIELDS, _exif_orientation
from wdsembed.validate import unusable_rows

GPU_THRESHOLD = 0.999  # bfloat16 weights on a GPU against float32 on PIL input (docs/benchmarks.md)
CPU_THRESHOLD = 0.9999  # float32 both sides: only the decoder and resize implementations differ
WORST_SHOWN = 3


class FidelityError(RuntimeError):
    """The run's embeddings differ from timm's own preprocessing beyond the threshold. Outputs and the manifest
    are written; `manifest` is the run's."""

    def __init__(self, message: str, manifest: Optional[dict] = None) -> None:
        super().__init__(message)
        self.manifest = manifest

    def __reduce__(self):
        return type(self), (str(self), self.manifest)


# --------------------------------------------------------------------------------------------------- the sample


def shard_quota(sample: int, run_shards: Optional[int], run_index: int = 0) -> int:
    """Images checked in the `run_index`-th of the run's `run_shards` shards: the run's sample spread evenly over
    them (shares differ by one at most; with fewer images asked than shards, one every few shards), the shares
    adding up to the sample. Each shard's task works out its own share from its place alone."""
    if sample <= 0:
        return 0
    if not run_shards:
        return sample
    return (run_index + 1) * sample // run_shards - run_index * sample // run_shards


def _ranks(keys: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each key, a batch at once (this runs on every image, in the thread that feeds DALI):
    the same keys are picked on every run and every machine (not Python's hash()). FNV-1a over the key's code
    points, each key's own length only, then splitmix64's finalizer so that neighbouring keys land far apart."""
    codes = np.array(keys, dtype=str)
    width = codes.dtype.itemsize // 4
    h = np.full(len(keys), 0xCBF29CE484222325, dtype=np.uint64)
    if width:
        points = codes.view(np.uint32).reshape(len(keys), width).astype(np.uint64)
        lengths = np.char.str_len(codes)
        for i in range(width):
            h = np.where(lengths > i, (h ^ points[:, i]) * _FNV_PRIME, h)
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h = (h ^ (h >> np.uint64(shift))) * np.uint64(factor)
    return h ^ (h >> np.uint64(31))


_FNV_PRIME = np.uint64(0x100000001B3)


def special_kind(data: bytes) -> Optional[str]:
    """What makes an image worth checking first (EXIF-rotated, grayscale, CMYK, PNG), from its header only. Runs on
    every image of the run as it streams past: JPEG and PNG (nearly all images) are read from their first bytes
    in a few microseconds; only other formats are opened with Pillow (lazily, header only)."""
    head = bytes(data[:8])
    if head == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"\xff\xd8":
        return _jpeg_kind(data)
    return _pil_kind(data)


_OFFERED_AT_ONCE = 256


def special_kinds(datas: list[bytes]) -> list[Optional[str]]:
    """special_kind of each image: the JPEGs of one header layout from their frame headers, read for the batch in
    one step (those hold no EXIF block: gray, CMYK or nothing special), the others one by one."""
    from wdsembed.imagesize import jpeg_frames

    settled, _, components = jpeg_frames(datas)
    return [_BY_COMPONENTS.get(c) if ok else special_kind(d)
            for d, ok, c in zip(datas, settled.tolist(), components.tolist())]


_BY_COMPONENTS = {1: "grayscale", 4: "cmyk"}


def _jpeg_kind(d: bytes) -> Optional[str]:
    """Components (1: gray, 4: CMYK/YCCK) and EXIF orientation, from the segments before the first scan."""
    pos, n, components, orientation = 2, len(d), None, None
    try:
        while pos + 4 <= n:
            marker, size = _MARKER_AND_LENGTH(d, pos)
            kind = _MARKER_KIND[marker]
            if kind == 4:  # a fill byte
                pos += 1
                continue
            if kind in (3, 5, 6) or size < 2:  # start of scan, or not a marker where one should be
                break
            if kind == 1 and pos + 10 <= n:  # SOF
                components = _SOF_FIELDS(d, pos + 5)[2]
            elif kind == 2 and d[pos + 4:pos + 10] == b"Exif\x00\x00":  # APP1
                ok, o = _exif_orientation(bytes(d[pos + 10:pos + 2 + size]))
                orientation = o if o is not None else orientation
            pos += 2 + size
    except Exception:  # noqa: BLE001 - a header the decoders may read differently: worth checking
        return "broken-header"
    if components is None:
        return "unreadable-by-pil"  # no frame header: neither side should decode it; check they agree
    if components == 4:
        return "cmyk"
    if components == 1:
        return "grayscale"
    if orientation not in (None, 1):
        return "exif-rotated"
    return None


def _pil_kind(data: bytes) -> Optional[str]:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
                if im.mode == "CMYK":
                    return "cmyk"
                if im.mode in ("L", "LA", "I", "I;16", "1"):
                    return "grayscale"
                try:
                    if im.getexif().get(0x0112, 1) not in (1, None):
                        return "exif-rotated"
                except Exception:  # noqa: BLE001 - broken EXIF: DALI and PIL may disagree, check it
                    return "broken-exif"
        except Exception:  # noqa: BLE001 - PIL cannot open it: worth checking whether DALI could
            return "unreadable-by-pil"
    return None


# Images PIL cannot open (or whose EXIF it cannot read) come after the format specials: they test whether both
# sides refuse the same images, but should not crowd out the images that test the preprocessing.
_ODD = ("unreadable-by-pil", "broken-exif", "broken-header")


class SampleCollector:
    """Keeps `quota` images of a stream as it passes: special ones first (EXIF-rotated, grayscale, CMYK, PNG), then
    ones PIL cannot read, then the others; by the lowest key hashes within each. Holds at most 3 x quota images'
    bytes, never the shard's."""

    def __init__(self, quota: int) -> None:
        self.quota = quota
        self._tiers: tuple[list, list, list] = ([], [], [])  # max-heaps on rank, as (-rank, key, bytes, kind)

    def wrap(self, samples: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        """`samples` as they are, each offered on the way: a batch of them at a time, so that the headers of a
        batch's JPEGs are read in one step (this runs in the thread that feeds DALI)."""
        if not self.quota:
            yield from samples
            return
        chunk: list[tuple[str, bytes]] = []
        for item in samples:
            chunk.append(item)
            if len(chunk) == _OFFERED_AT_ONCE:
                self._offer_all(chunk)
                yield from chunk
                chunk = []
        if chunk:
            self._offer_all(chunk)
            yield from chunk

    def _offer_all(self, items: list[tuple[str, bytes]]) -> None:
        kinds = special_kinds([data for _, data in items])
        ranks = _ranks([key for key, _ in items])
        # Plain images (nearly all) need offering only where they rank below the worst one kept so far: after the
        # first batch, a handful per shard. Special ones are rare and all offered.
        plain = self._tiers[2]
        offered = (range(len(items)) if len(plain) < self.quota else
                   sorted({*np.flatnonzero(ranks < np.uint64(-plain[0][0])).tolist(),
                           *(i for i, kind in enumerate(kinds) if kind is not None)}))
        for i in offered:
            self.offer(*items[i], kinds[i], int(ranks[i]))

    def offer(self, key: str, data: bytes, kind: Optional[str], rank: Optional[int] = None) -> None:
        """Keep the image if it ranks among the `quota` best of its tier (by its special_kind) so far."""
        rank = int(_ranks([key])[0]) if rank is None else rank
        heap = self._tiers[2 if kind is None else 1 if kind in _ODD else 0]
        if len(heap) < self.quota:
            heapq.heappush(heap, (-rank, key, bytes(data), kind))
        elif -heap[0][0] > rank:
            heapq.heapreplace(heap, (-rank, key, bytes(data), kind))

    def chosen(self) -> list[tuple[str, bytes, Optional[str]]]:
        """(key, bytes, special kind or None): tier by tier, each by rank, `quota` in all."""
        ordered = [item for heap in self._tiers for item in sorted(heap, reverse=True)]
        return [(key, data, kind) for _, key, data, kind in ordered[:self.quota]]


# --------------------------------------------------------------------------------------------------- one shard


def _pil_rgb(im):
    """Pillow's convert("RGB") of a freshly opened image, except that 16-bit samples are reduced to 8 bits as the
    pipeline's decoder (nvImageCodec, in DALI) reduces them: v * 255 / 65535 rounded to nearest, so that the check
    measures the preprocessing rather than the two decoders' reductions. Pillow itself clips 16-bit gray to 255 (a
    near-white image) and keeps the top byte of each sample of 48-bit RGB, 64-bit RGBA and 32-bit gray+alpha PNGs
    (one level off for a quarter of the values). The image's info (its EXIF) stays, for exif_transpose."""
    from PIL import Image

    samples = _samples16(im)
    if samples is None:
        return im.convert("RGB")
    reduced = Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8))
    reduced.info = dict(im.info)
    return reduced.convert("RGB")


# Pillow opens 16-bit RGB and RGBA PNGs at 8 bits a sample, unpacking the top byte of each (rawmode "RGB;16B"):
# decoded again with the unpacker of little-endian samples, which takes each sample's second byte, they give the
# bottom bytes. Gray+alpha ("LA;16B") fits RGBA whole: decoded once so, L's two bytes land in R and G.
_PNG16_BOTTOM = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _samples16(im) -> Optional[np.ndarray]:
    """The 16-bit values of a freshly opened (not yet loaded) image's color samples, (H, W) or (H, W, 3) uint32, or
    None for an image of 8 bits a sample or fewer."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint32)
    rawmode = im.tile[0][3] if im.format == "PNG" and im.tile else None
    if rawmode == "LA;16B":
        la = _decoded_as(im, "RGBA").astype(np.uint32)
        im.load()  # for its info: an eXIf chunk after the image data is read with the data
        return la[..., 0] << 8 | la[..., 1]
    if rawmode in _PNG16_BOTTOM:
        bottom = _decoded_as(im, _PNG16_BOTTOM[rawmode])
        return (np.asarray(im).astype(np.uint32) << 8 | bottom)[..., :3]
    return None


def _decoded_as(im, rawmode: str) -> np.ndarray:
    """The pixels of a not yet loaded PNG, decoded again from its file with its samples unpacked by `rawmode`."""
    from PIL import Image

    im.fp.seek(0)
    twin = Image.open(io.BytesIO(im.fp.read()))
    twin.tile = [(*t[:3], rawmode) for t in twin.tile]
    return np.asarray(twin)


# Images per pass of the reference (PIL transform, then the float32 model): a shard's sample can hold thousands
# (fidelity_sample up to 100,000 over few shards), and one batch of all of them would take gigabytes.
REFERENCE_CHUNK = 64


def reference_embeddings(worker, chosen: list, max_pixels: Optional[int],
                         stop: Optional[threading.Event] = None) -> tuple[dict, dict]:
    """timm's eval transform on PIL + the float32 model: key -> embedding (normalized), and key -> why PIL could
    not give one. REFERENCE_CHUNK images at a time. Once `stop` is set, raises CancelledError before the next image
    or batch."""
    import torch

    def go_on() -> None:
        if stop is not None and stop.is_set():
            raise CancelledError("fidelity reference stopped: its shard ended without it")

    transform, forward, lock, device = worker.reference()
    # On a GPU, a stream of its own: the legacy default stream would wait for the decoder's and the model's work.
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    embedded, refused = {}, {}
    for first in range(0, len(chosen), REFERENCE_CHUNK):
        tensors, keys = [], []
        for key, data, _ in chosen[first:first + REFERENCE_CHUNK]:
            go_on()
            tensor, why = _reference_input(transform, data, max_pixels)
            if why is not None:
                refused[key] = why
            else:
                tensors.append(tensor)
                keys.append(key)
        if not keys:
            continue
        go_on()
        with lock, torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            out = forward(torch.stack(tensors).to(device)).float().cpu().numpy()
        bad = unusable_rows(out, normalized=True)  # as the run refuses them: no cosine with a NaN or a zero
        refused.update({keys[i]: f"float32 model: {why}" for i, why in bad.items()})
        embedded.update((key, row) for i, (key, row) in enumerate(zip(keys, out)) if i not in bad)
    return embedded, refused


def _reference_input(transform, data: bytes, max_pixels: Optional[int]):
    """One image through PIL (EXIF applied) and timm's eval transform: (tensor, None), or (None, why not)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            if max_pixels and im.size[0] * im.size[1] > max_pixels:
                return None, f"PIL: {im.size[0]}x{im.size[1]} is above max_image_pixels, not decoded"
            return transform(ImageOps.exif_transpose(_without_orientation_outside_exif(_pil_rgb(im)))), None
    except Exception as exc:  # noqa: BLE001 - reported in the record, not skipped
        return None, f"PIL: {type(exc).__name__}: {exc}"[:300]


# Where Pillow's exif_transpose also finds an orientation, though no EXIF block holds it: an XMP packet's
# tiff:Orientation (JPEG, WebP, PNG) and ImageMagick's "Raw profile type exif" PNG text chunk. DALI's decoder, like
# browsers, turns an image by its EXIF blocks only, and the run embeds such an image as it is stored.
_ORIENTATION_OUTSIDE_EXIF = ("xmp", "XML:com.adobe.xmp", "Raw profile type exif")


def _without_orientation_outside_exif(im):
    """`im` (a converted copy, its info its own) without the metadata that would turn it but is not EXIF."""
    for key in _ORIENTATION_OUTSIDE_EXIF:
        im.info.pop(key, None)
    return im


@contextlib.contextmanager
def reference_beside(worker, chosen: list, max_pixels: Optional[int]) -> Iterator[Future]:
    """reference_embeddings in a thread of its own, so that it overlaps the shard's table building: the block gets
    its future (for check_sample). However the block ends (done, an error, Ctrl-C), the thread is stopped between
    images and waited for: a shard that fails leaves no thread running the model, and a process exiting with one
    still in torch aborts ('terminate called without an active exception')."""
    future: Future = Future()
    stop = threading.Event()

    def run() -> None:
        try:
            future.set_result(reference_embeddings(worker, chosen, max_pixels, stop) if chosen else ({}, {}))
        except BaseException as exc:  # noqa: BLE001 - raised where the result is taken
            future.set_exception(exc)

    thread = threading.Thread(target=run, name="wdsembed-fidelity", daemon=True)
    thread.start()
    try:
        yield future
    finally:
        stop.set()  # a no-op where the block took the result: the thread has ended
        thread.join()


def check_sample(worker, chosen: list, keys: list[str], embeddings: np.ndarray, failures: dict[str, str],
                 max_pixels: Optional[int], reference: Optional[Future] = None) -> dict:
    """The shard's fidelity record: cosine per checked key, and every sampled image only one side could embed.
    `reference`: a reference_beside future for these images, else computed here."""
    if not chosen:
        return {}
    row = {k: i for i, k in enumerate(keys)}
    reference, refused = (reference.result() if reference is not None
                          else reference_embeddings(worker, chosen, max_pixels))
    cosines, mismatches, both_refused = {}, {}, []
    for key, _, _ in chosen:
        ours = row.get(key)
        if ours is not None and key in reference:
            a, b = embeddings[ours].astype(np.float64), reference[key].astype(np.float64)
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            cosines[key] = round(float(a @ b / denom), 7) if denom > 0 else 0.0
        elif ours is not None:
            mismatches[key] = f"embedded by the pipeline, but the reference could not: {refused.get(key)}"
        elif key in reference:
            mismatches[key] = f"PIL/timm embedded it, but the pipeline failed it: {failures.get(key, 'no row')}"
        else:
            both_refused.append(key)
    return {"sampled": len(chosen), "cosines": cosines, "mismatches": mismatches, "both_refused": both_refused,
            "special": {key: kind for key, _, kind in chosen if kind}}


# --------------------------------------------------------------------------------------------------- the run


def threshold(config: EmbedConfig, results: list[dict]) -> float:
    """min_fidelity, or the default of the path the shards ran on (the GPU's where any shard ran on one)."""
    if config.min_fidelity is not None:
        return config.min_fidelity
    devices = {str((r.get("model") or {}).get("device", "cpu")) for r in results}
    return GPU_THRESHOLD if any(d.startswith("cuda") for d in devices) else CPU_THRESHOLD


def summarize(config: EmbedConfig, results: list[dict]) -> dict:
    """The run's fidelity over its shards' records (a cached shard's from its output footer), against this run's
    threshold."""
    if config.fidelity_sample <= 0:
        return {"enabled": False}
    limit = threshold(config, results)
    cos = [(c, r["stem"], k) for r in results for k, c in ((r.get("fidelity") or {}).get("cosines") or {}).items()]
    mismatches = [{"shard": r["stem"], "key": k, "reason": why} for r in results
                  for k, why in ((r.get("fidelity") or {}).get("mismatches") or {}).items()]
    unchecked = sorted(r["stem"] for r in results if not r.get("fidelity") and r.get("embedded"))
    cos.sort()
    summary = {
        "enabled": True,
        "threshold": limit,
        "images": len(cos),
        "min_cosine": cos[0][0] if cos else None,
        "mean_cosine": round(sum(c for c, _, _ in cos) / len(cos), 7) if cos else None,
        "worst": [{"shard": stem, "key": key, "cosine": c} for c, stem, key in cos[:WORST_SHOWN]],
        "below_threshold": sum(1 for c, _, _ in cos if c < limit),
        "mismatches": mismatches,
        "both_refused": sum(len((r.get("fidelity") or {}).get("both_refused") or []) for r in results),
        # Outputs written before this check existed, or with fidelity_sample=0: nothing stored to compare.
        "shards_unchecked": unchecked,
        # Finished shards keep the check of the run that computed them, made with that run's fidelity_sample.
        "shards_reused": sorted(r["stem"] for r in results if r.get("cached") and r.get("fidelity")),
    }
    summary["passed"] = summary["below_threshold"] == 0
    return summary


def failure_message(summary: dict) -> Optional[str]:
    """Why the run fails its fidelity check, naming the worst keys; None when it passes (or is off)."""
    if not summary.get("enabled") or summary.get("passed", True):
        return None
    return (f"fidelity check failed: {summary['below_threshold']} of {summary['images']} sampled image(s) below "
            f"cosine {summary['threshold']} against timm's own preprocessing; worst: {_worst(summary)}. The outputs "
            f"are written; re-run with a lower {option('min_fidelity')} to accept them (nothing is re-embedded)")


def _worst(summary: dict) -> str:
    """The worst keys, each with its shard: keys of shards not made by img2dataset repeat from shard to shard."""
    return ", ".join(f"{w['key']} ({w['shard']}): {w['cosine']:.7f}" for w in summary["worst"])


def describe(summary: Optional[dict]) -> Optional[str]:
    """One line for the summaries."""
    if not summary or not summary.get("enabled"):
        return "fidelity check: off" if summary else None
    if not summary["images"]:
        text = "fidelity check: no image compared"
    else:
        text = (f"fidelity vs timm: {summary['images']} images, min cosine {summary['min_cosine']:.7f}, mean "
                f"{summary['mean_cosine']:.7f} (threshold {summary['threshold']}: "
                f"{'passed' if summary['passed'] else 'FAILED'}); worst: {_worst(summary)}")
    if summary["mismatches"]:
        text += "; only one side could embed: " + "; ".join(
            f"{m['key']} ({m['shard']}): {m['reason']}" for m in summary["mismatches"][:5])
    if summary["both_refused"]:
        text += f"; {summary['both_refused']} sampled image(s) refused by both (not compared)"
    if summary["shards_unchecked"]:
        text += f"; {len(summary['shards_unchecked'])} shard(s) without a stored check"
    if summary.get("shards_reused"):  # not in manifests written before it was recorded
        text += (f"; the checks of {len(summary['shards_reused'])} finished shard(s) are those of the runs that "
                 "computed them (a run's --fidelity-sample samples the shards it computes)")
    return text


def check(manifest: dict) -> None:
    """Raise FidelityError when the run's manifest says its fidelity check failed (the flow and the API call this
    after the manifest is written)."""
    message = failure_message(manifest.get("fidelity") or {})
    if message:
        raise FidelityError(message, manifest)
