"""A long-lived DALI pipeline per worker: encoded image bytes in, model-ready tensors out.

Built once per worker process; each shard streams through it. Recovers from undecodable images so that one
bad sample costs only itself.

How a bad sample is handled: DALI fails a whole batch when one image in it cannot be decoded, and (with the
default dynamic executor) keeps running the batches queued behind it. We keep the (keys, bytes) of every batch
in flight, in order; when a batch's outputs raise, that batch is split and fed again: the sample the error
message names (truncated JPEGs: "Failed to decode sample #i") on its own and the rest together, or else two
halves, until a batch of one sample fails, which is then reported with the reason from DALI's message. A part that
fails again has its rest halved too: DALI names one bad sample per run, so a batch of many bad images fed again
whole once per bad one would be decoded over and over (a shard with 30% of them: 65 times its images). Every
batch also carries a running sample id through the pipeline and its outputs are checked against the ids fed, so
an embedding can never be attached to another sample's key.

Before a sample reaches DALI its header is read on the host (`wdsembed.imagesize`): data that is not an image at
all (empty, HTML, text, unknown magic bytes) or whose header gives no size is rejected there with its reason, as is
an image larger than `max_pixels` (a decompression bomb is never decoded). The header sizes (EXIF-oriented, as DALI
decodes) give each batch's resize and crop arguments (`PreprocessRecipe.geometry`, NumPy), which are fed with the
bytes; a batch that is split and fed again carries its samples' own sizes.

Never fork a process after CUDA is initialised, run one pipeline per GPU per process, and call a pipeline from
one thread at a time: DALI pipelines are not thread-safe.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, TYPE_CHECKING

import numpy as np

from wdsembed.imagesize import UnreadableImage, image_size, image_sizes, jpeg_frame, jpeg_scan_start, tiff_samples
from wdsembed.preprocess import (
    PreprocessRecipe,
    dali_preprocess,
    feed_geometry,
    geometry_source,
    read_ids,
    split_geometry,
)

if TYPE_CHECKING:  # torch is imported where it is used: its import takes seconds the checks before a run skip
    import torch

log = logging.getLogger(__name__)

# Magic bytes of the formats DALI decodes (nvImageCodec: JPEG, JPEG 2000, TIFF, PNG, BMP, PNM, WebP).
_SUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xffO\xffQ", "jpeg2000"),  # raw J2K codestream
)
# Known image formats DALI cannot decode: named in the failure reason.
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"8BPS", "psd"),
    (b"\xff\x0a", "jpeg-xl"),
    (b"\x00\x00\x00\x0cJXL ", "jpeg-xl"),
)
_NVIMGCODEC_STATUS = {
    2: "invalid parameter",
    3: "bad codestream",
    4: "codestream unsupported",
    5: "allocator failure",
    6: "execution failed",
    8: "internal error",
    9: "implementation unsupported",
    13: "bad codestream",
    14: "codestream unsupported",
    17: "internal error",
    19: "incomplete bitstream",
    20: "execution failed",
}
# Errors that say the pipeline or the device is broken, not one sample: never blamed on a sample.
_FATAL_PATTERNS = re.compile(r"CUDA error|cudaError|CUDA_ERROR|out of memory|illegal memory access", re.IGNORECASE)


def sniff_image(data: bytes | memoryview) -> Optional[str]:
    """None when the bytes start like an image DALI can decode; otherwise a short reason why they can't be one."""
    if len(data) == 0:
        return "empty image data (0 bytes)"
    if len(data) >= 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF:
        return None  # JPEG, nearly every image of a web dataset: told from three bytes, without copying a head
    head = bytes(data[:16])
    for magic, _ in _SUPPORTED_MAGIC:
        if head.startswith(magic):
            return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return None  # PNM family
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"unsupported image format: {name}"
    if head[4:8] == b"ftyp":
        return f"unsupported image format: {head[8:12].decode('latin-1').strip() or 'iso-bmff'} (HEIF/AVIF/MP4)"
    return f"not an image (starts with {head[:8]!r})"


def too_large_reason(h: int, w: int, limit: int) -> str:
    return f"image too large: {w}x{h} pixels > max_pixels={limit}"


def refusal_from_head(head: bytes, max_pixels: Optional[int]) -> Optional[str]:
    """Why an image member that starts with `head` would be refused before decoding (not an image, more pixels
    than `max_pixels`), where its first bytes tell; None where they do not (a header longer than `head`)."""
    why = sniff_image(head)
    if why is not None or max_pixels is None:
        return why
    try:
        h, w = image_size(head)
    except UnreadableImage:
        return None
    return too_large_reason(h, w, max_pixels) if h * w > max_pixels else None


def cut_short(data: bytes | memoryview) -> Optional[str]:
    """Why a JPEG or a PNG must not be decoded because it was cut short (a partial download), else None.

    JPEG: nvJPEG decodes such a file without complaint, filling the missing part with gray, where libjpeg-turbo (the
    CPU path) and PIL fail: refused here, both paths give the same row. Entropy-coded data never holds FF D9 (an FF
    there is followed by 00 or a restart marker), so the first FF D9 after the image's start of scan is its end.
    That start is found by walking the header's segments: an EXIF thumbnail inside one has a scan and an end marker
    of its own, which must not count. Bytes appended after the end (motion photos) are not looked at.

    PNG: one whose last chunk runs past the end of its data (png_cut) killed the whole process in DALI 2.4's
    decoder (a segfault, in batches of 64 images or more: every shard holding one failed on every retry), and PIL
    fails it too. One whose chunks are whole but lack the IEND chunk is not refused: with_png_end gives it one."""
    n = len(data)
    if _is_png(data):
        cut = png_cut(data)
        if cut is None or not cut[1]:
            return None
        return f"truncated PNG ({cut[1]}, {n} bytes): not decoded (a partial decode is not the image)"
    if n < 3 or not (data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF):
        return None
    if _end_of_image_missing(data):
        return f"truncated JPEG (no end-of-image marker, {n} bytes): not decoded (a partial decode is not the image)"
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # an IEND chunk: no data, its CRC


def _is_png(data: bytes | memoryview) -> bool:
    return len(data) >= 8 and data[0] == 0x89 and bytes(data[:8]) == _PNG_SIGNATURE


def png_cut(data: bytes | memoryview) -> Optional[tuple[int, str]]:
    """For a PNG, where its chunks stop short of an IEND chunk: (offset, what runs past the end) where a chunk before
    IEND is cut off by the end of the data; (offset, "") where the chunks end whole, at the end of the data or in
    an IEND cut short, with no whole IEND (the offset: where one goes); None where a whole IEND chunk is there.
    Bytes after IEND are not looked at."""
    if bytes(data[-12:]) == _PNG_END:
        return None  # nearly every PNG: its last chunk a whole IEND, told without walking the others
    n, pos = len(data), 8
    while pos < n:
        if pos > 8 and pos + 12 > n and _PNG_END.startswith(bytes(data[pos:])):
            return pos, ""  # the start of an IEND chunk, cut short
        if pos + 8 > n:
            return pos, f"a chunk header at byte {pos} runs past the end"
        kind = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        if kind == b"IEND":
            return None if end <= n else (pos, "")
        if end > n:
            return pos, f"its {kind.decode('latin-1')} chunk at byte {pos} runs past the end"
        pos = end
    return pos, ""


def with_png_end(data: bytes | memoryview) -> bytes | memoryview:
    """A PNG whose chunks are whole but that lacks its IEND chunk (cut right after its image data), with one: PIL
    decodes such a file, and DALI 2.4's decoder read past its end (a segfault, as for a PNG cut inside a chunk). A
    copy, for these rare ones only; any other bytes as they are."""
    if not _is_png(data):
        return data
    cut = png_cut(data)
    if cut is None or cut[1]:
        return data
    return b"".join((data[:cut[0]], _PNG_END))


def _end_of_image_missing(data: bytes | memoryview) -> Optional[bool]:
    """For a JPEG: whether no end-of-image marker follows its start of scan (bytes appended after the marker, as
    motion photos carry, do not hide it); None where there is no start of scan to judge by."""
    n = len(data)
    if data[n - 2] == 0xFF and data[n - 1] == 0xD9:
        return False  # ends with its end-of-image marker, which no start-of-scan can follow: the usual case
    scan = jpeg_scan_start(data)
    if scan is None:  # a header the walk cannot follow (or cut inside it): the first start-of-scan bytes, if any
        # Searched with re, which reads a memoryview (the tar reader's images) in place: no copy of the image.
        found = _START_OF_SCAN.search(data, 2)
        if found is None:
            return None
        scan = found.start()
    return _END_OF_IMAGE.search(data, scan) is None


_START_OF_SCAN, _END_OF_IMAGE = re.compile(b"\xff\xda"), re.compile(b"\xff\xd9")


# Adobe's APP14 segment (version 100, no flags, transform 0: CMYK as stored), as libjpeg writes it for CMYK.
_ADOBE_APP14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def with_adobe_marker(data: bytes | memoryview) -> bytes:
    """A CMYK JPEG that lacks Adobe's APP14 segment (`imagesize.adobe_marker_missing`), with one after its
    start-of-image marker: DALI's decoder then reads its ink as inverted, as Pillow (the reference), browsers and
    OpenCV read every CMYK JPEG, instead of giving its colours wrong. A copy of the image, made for these rare
    ones only."""
    return b"".join((data[:2], _ADOBE_APP14, data[2:]))


def explain_decode_failure(data: bytes | memoryview, reason: str) -> str:
    """DALI's reason for one undecodable image, prefixed with what its bytes show where that is plain (a JPEG
    without its end-of-image marker, a PNG without its IEND chunk: a file cut short, e.g. a partial download; a
    12-bit, lossless or hierarchical JPEG, or a TIFF of samples other than 8 or 16-bit unsigned, which DALI's
    decoder does not read; a PNG chunk failing its CRC). A
    JPEG is judged as `cut_short` judges it, by the marker after its start of scan, so that bytes appended after
    the marker (motion photos) do not make it look cut short; one without a scan, by its last bytes."""
    head, tail = bytes(data[:8]), bytes(data[-16:]).rstrip(b"\x00")
    if head.startswith(b"\xff\xd8\xff"):
        if _end_of_image_missing(data) is not False:
            return f"truncated JPEG (no end-of-image marker, {len(data)} bytes): {reason}"
        process = _jpeg_process(data)
        return f"{process}: {reason}" if process else reason
    if head.startswith(b"\x89PNG"):
        if b"IEND" not in tail:
            return f"truncated PNG (no IEND chunk, {len(data)} bytes): {reason}"
        damaged = _png_crc_error(data)
        return f"damaged PNG ({damaged}): {reason}" if damaged else reason
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        samples = tiff_samples(data)
        # what DALI 2.4's CPU decoder fails ("bad codestream", "Invalid sample_type: 8198"): it reads 8 and 16-bit
        # unsigned samples only (floating-point ones never reach it: imagesize refuses them)
        if samples is not None and samples[3] != 3 and (samples[2] not in (8, 16) or samples[3] == 2):
            signed = "signed integer " if samples[3] == 2 else ""
            return f"TIFF of {samples[2]}-bit {signed}samples, which DALI's decoder does not support: {reason}"
    return reason


# JPEG processes that DALI 2.4's CPU decoder (libjpeg-turbo) fails with a bare "failed to decode", by frame marker
# (nvJPEG reads 8-bit baseline and progressive only). Arithmetic coding (SOF9, SOF10) it decodes.
_JPEG_UNSUPPORTED = {0xFFC3: "lossless JPEG (SOF3)", 0xFFC5: "hierarchical JPEG (SOF5)",
                     0xFFC6: "hierarchical JPEG (SOF6)", 0xFFC7: "hierarchical lossless JPEG (SOF7)",
                     0xFFCB: "lossless arithmetic-coded JPEG (SOF11)", 0xFFCD: "hierarchical JPEG (SOF13)",
                     0xFFCE: "hierarchical JPEG (SOF14)", 0xFFCF: "hierarchical lossless JPEG (SOF15)"}


def _jpeg_process(data: bytes | memoryview) -> Optional[str]:
    """What a JPEG's frame header shows that DALI's decoder cannot read (a precision other than 8 bits, a lossless
    or hierarchical process), worded for its failure row; else, for arithmetic coding, just what it is."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    marker, precision = frame
    sof = f"SOF{marker - 0xFFC0}"
    if marker in _JPEG_UNSUPPORTED:
        return f"{_JPEG_UNSUPPORTED[marker]}, which DALI's decoder does not support"
    if precision != 8:
        return f"{precision}-bit JPEG ({sof}, precision {precision}), which DALI's decoder does not support"
    if marker in (0xFFC9, 0xFFCA):
        return f"arithmetic-coded JPEG ({sof})"
    return None


def _png_crc_error(data: bytes | memoryview) -> Optional[str]:
    """The first PNG chunk whose CRC does not match its bytes (a damaged file: Pillow skips the check on the
    image data, DALI's libpng fails it), worded for its failure row; None where every chunk checks out."""
    n, pos = len(data), 8
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > n:
            return None
        kind = bytes(data[pos + 4:pos + 8])
        if zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return f"its {kind.decode('latin-1')} chunk at byte {pos} fails its CRC check"
        if kind == b"IEND":
            return None
        pos = end + 4
    return None


def failure_reason(message: str) -> str:
    """A one-line reason from a DALI pipeline error: the failing operator and what it said."""
    op = re.search(r"Error in (?:CPU|GPU|MIXED|mixed|cpu|gpu) operator `(?:nvidia\.dali\.fn\.)?([^`]+)`", message)
    detail = message
    start = message.find("encountered:")
    if start >= 0:
        detail = message[start + len("encountered:") :]
    detail = detail.split("Current pipeline object is no longer valid")[0]
    detail = " ".join(detail.split()).rstrip(" :")
    detail = re.sub(r"Failed to decode sample #\d+", "failed to decode", detail)

    def _status(m: re.Match) -> str:
        code = int(m.group(1))
        return f"nvImageCodec: {_NVIMGCODEC_STATUS.get(code, 'error')} (#{code})"

    detail = re.sub(r"nvImageCodec failure: '#(\d+)'", _status, detail)
    reason = f"{op.group(1)}: {detail}" if op else detail
    return (reason or "DALI error")[:300]


@dataclass
class PreprocessedBatch:
    keys: list[str]  # keys of the rows of `images`, in order
    images: "torch.Tensor"  # (N, C, H, W) float32, normalized; on the GPU for device_id != None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of samples that failed here


# Decoded pixels that the batches in flight may hold together (ImagePipeline's max_pixels_in_flight): DALI decodes
# a batch whole before it resizes, so a batch of 256 unresized 12-Mpx photos took 9 GB, and two in flight twice that,
# per worker; batches of larger images are cut short to fit (an image larger than a batch's share goes alone).
# 2^30 pixels (3 GiB as RGB) leaves batches of 256 images of up to 2 Mpx each (with two in flight) uncut.
MAX_PIXELS_IN_FLIGHT = 1 << 30

# A key that ends the current batch where it appears in `ImagePipeline.process`'s samples, (BATCH_END, None):
# what is gathered so far is fed as a short batch. It keeps a batch to one caller's samples where several callers'
# samples follow each other in one stream (wdsembed.worker), so each caller's batches are the ones it would get alone.
BATCH_END = object()

# A key that says the next samples are not read yet, (NOT_READY, wait): `ImagePipeline.process` takes out the batches
# DALI holds in the meantime, and calls wait() (which returns once samples are in) only when it holds none, after
# an empty batch (the failures found so far, if any). So a caller's last batches come out, and the caller can
# finish, while the next caller's samples are still on their way (threads.read_ahead).
NOT_READY = object()


@dataclass
class _Batch:
    keys: list[str]
    data: list[bytes | memoryview]  # the encoded bytes, referenced until the batch's outputs are taken
    tensors: list[Any]  # DALI TensorCPU views of `data` (no copies here)
    sizes: Optional[np.ndarray] = None  # (N, 2) int64 [height, width] from the headers, EXIF-oriented
    ids: Optional[np.ndarray] = None  # running sample ids, set when fed
    split_from_failed: bool = False  # a part of a batch that failed: it held another bad sample if it fails too

    def split(self, bad_index: Optional[int]) -> list["_Batch"]:
        """Parts to feed again, each with its own sizes: the named sample alone and the rest, else two halves. A
        part that fails again held two bad samples or more: its rest goes in halves too, so that a batch with many
        bad images (DALI names one per failure) is searched in halves, not fed again once per bad image."""
        n = len(self.keys)
        if bad_index is not None and 0 <= bad_index < n:
            rest = [i for i in range(n) if i != bad_index]
            parts = [[bad_index], *_halves(rest)] if self.split_from_failed else [[bad_index], rest]
        else:
            parts = _halves(list(range(n)))
        return [
            _Batch([self.keys[i] for i in p], [self.data[i] for i in p], [self.tensors[i] for i in p],
                   None if self.sizes is None else self.sizes[p], split_from_failed=True)
            for p in parts
            if p
        ]


def _halves(indices: list[int]) -> list[list[int]]:
    return [indices[: len(indices) // 2], indices[len(indices) // 2 :]]


class PipelineBroken(RuntimeError):
    """The DALI pipeline failed in a way no single sample explains; it cannot be used any more."""


def _warmup_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 130, 140)).save(buf, "JPEG")
    return buf.getvalue()


def define_pipeline(
    recipe: PreprocessRecipe,
    *,
    batch_size: int,
    num_threads: int,
    device_id: Optional[int],
    prefetch: int = 2,
    copy_inputs: bool = True,
    **graph_args: Any,
) -> Any:
    """The DALI pipeline behind ImagePipeline, defined but not built (building a GPU one needs a GPU).

    Inputs: external sources "encoded" (uint8 bytes per sample) and the per-sample geometry of `dali_preprocess`,
    with each image's id in its last row (fed with `feed_geometry(pipe, recipe.source_geometry(sizes, ids))`).
    Outputs: images (N, C, H, W), float32 (float16 with `half`), and the geometry rows (`read_ids` gives the ids)."""
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,  # survives a failed iteration and keeps outputs valid while we hold them
    )
    def graph():  # type: ignore[no-untyped-def]
        # copy_inputs: DALI copies each batch into its own buffers, which it pins when they feed a GPU decoder, so
        # nvJPEG reads them directly; but feed_input holds the GIL while it copies (8.3 ms per batch of 256 on one
        # H200's host). Without the copy it reads our pageable buffers in place and stages them itself, in its own
        # threads: a GPU worker feeds it that way (wdsembed.worker).
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=not copy_inputs)
        # The ids ride in the geometry rows, which come back as an output: one feed per batch fewer than a source
        # of their own (preprocess.put_ids).
        geometry = geometry_source()
        images = dali_preprocess(encoded, recipe, decode_device, geometry=split_geometry(geometry, recipe),
                                 **graph_args)
        return images, geometry

    return graph()


class ImagePipeline:
    """Decode + timm eval preprocessing of encoded images with one DALI pipeline, built once and reused.

    `device_id=None` runs DALI on the CPU only (decoding with libjpeg-turbo and friends) and yields CPU tensors;
    an int decodes with nvJPEG (`mixed`, hardware decoder where present), resizes and normalizes on that GPU and
    yields CUDA tensors shared through DLPack, no host round trip. Up to `prefetch` batches are in flight, so
    decoding overlaps whatever the consumer does with the previous batch. `copy_inputs` (default) copies each
    batch's encoded bytes into DALI's buffers, pinned where they feed the GPU decoder; False lets DALI read the
    caller's buffers in place. `max_pixels` refuses, unread, images whose header gives more pixels than that.
    `max_pixels_in_flight` bounds the decoded pixels of the batches in flight: a batch whose images' header sizes
    add up to more than its share (this divided by `prefetch`) is cut short, the rest starting the next batch; an
    image larger than the share goes in a batch of its own. None: batches are cut by count only.

    On a GPU each batch's images are copied out of DALI's output buffer as the batch is taken, converted on the way
    to `output_dtype` and, with `channels_last`, to that memory format: the form the model takes, made in one
    device copy (about 0.1 ms for 256 images) instead of a conversion in the model step, and DALI's buffer goes
    straight back instead of waiting in the consumer's queue. Where `output_dtype` is a 16-bit float, DALI writes
    float16 (`half_from_dali=False`: float32).

    >>> pipe = ImagePipeline(PreprocessRecipe.from_model(model), batch_size=256, num_threads=4, device_id=0)
    >>> for batch in pipe.process((s.key, s.image) for s in samples):
    ...     embeddings = model(batch.images); record(batch.keys, embeddings, batch.failures)
    """

    def __init__(
        self,
        recipe: PreprocessRecipe,
        *,
        batch_size: int,
        num_threads: int,
        device_id: Optional[int],
        prefetch: int = 2,
        hw_decoder_load: float = 0.9,
        max_pixels: Optional[int] = None,
        max_pixels_in_flight: Optional[int] = MAX_PIXELS_IN_FLIGHT,
        device_memory_padding: int = 32 << 20,
        host_memory_padding: int = 16 << 20,
        jpeg_fancy_upsampling: bool = False,
        copy_inputs: bool = True,
        output_dtype: Optional["torch.dtype"] = None,
        channels_last: bool = False,
        half_from_dali: bool = True,
    ) -> None:
        if batch_size < 1 or num_threads < 1 or prefetch < 1:
            raise ValueError("batch_size, num_threads and prefetch must be >= 1")
        self.recipe = recipe
        self.batch_size = batch_size
        self.device_id = device_id
        self.prefetch = prefetch
        self.max_pixels = max_pixels
        self.batch_pixels = None if max_pixels_in_flight is None else max(1, max_pixels_in_flight // prefetch)
        self.copy_inputs = copy_inputs
        self.output_dtype = output_dtype
        self.channels_last = channels_last
        self._next_id = 0
        self._active = False
        self._stream: Optional["torch.cuda.Stream"] = None
        self._broken: Optional[str] = None
        # A model that runs in 16 bits gets its batches from DALI in float16: half the bytes DALI writes, holds in
        # flight and we read to convert, rounded from the same float32 values (ViT-L/14's GPU worker peaked 0.4 GiB
        # lower on one H200, at the same rate). The CPU path returns DALI's own float32 buffer.
        half = (half_from_dali and device_id is not None and output_dtype is not None
                and output_dtype.is_floating_point and output_dtype.itemsize == 2)
        self._pipe = self._build(
            half=half,
            num_threads=num_threads,
            hw_decoder_load=hw_decoder_load,
            device_memory_padding=device_memory_padding,
            host_memory_padding=host_memory_padding,
            jpeg_fancy_upsampling=jpeg_fancy_upsampling,
        )
        self._warmup()

    # -- construction -------------------------------------------------------------------------------------------

    def _build(self, **graph_args: Any) -> Any:
        pipe = define_pipeline(
            self.recipe,
            batch_size=self.batch_size,
            device_id=self.device_id,
            prefetch=self.prefetch,
            copy_inputs=self.copy_inputs,
            **graph_args,
        )
        pipe.build()
        return pipe

    def _warmup(self) -> None:
        """Run `prefetch` full batches of a tiny image: the first schedule_run of a pipeline prefetches that many
        iterations at once, after which each schedule_run runs exactly one, which is what the feeding loop relies
        on. Also checks the pipeline works before the first shard and preallocates.

        Full batches, not one image each: warmed up with batches of one image, the GPU path stayed at a lower rate
        for good (one H200 run of `bench/dali_probe.py --ladder`: 14,152 images/s against 19,186 with full
        batches)."""
        from nvidia.dali.tensors import TensorCPU

        data = _warmup_image()
        n = self.batch_size
        sizes = np.array([image_size(data)] * n, dtype=np.int64)
        batches = [_Batch(["__warmup__"] * n, [data] * n, [TensorCPU(data)] * n, sizes) for _ in range(self.prefetch)]
        for b in batches:
            self._feed(b)
        self._pipe.schedule_run()
        try:
            for b in batches:
                self._collect(b)
        except _BatchFailed as e:
            raise PipelineBroken(f"the pipeline cannot decode a plain JPEG: {e.reason}") from e

    # -- public ---------------------------------------------------------------------------------------------------

    @property
    def device(self) -> "torch.device":
        import torch

        return torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)

    def process(
        self, samples: Iterable[tuple[str, bytes | memoryview]], *, cuda_stream: Optional["torch.cuda.Stream"] = None
    ) -> Iterator[PreprocessedBatch]:
        """Decode and preprocess (key, encoded bytes) pairs; every input key comes out once, either as a row of
        some batch's `images` or in some batch's `failures`.

        On a GPU, each batch's `images` are bound to `cuda_stream` (default: the current stream of the thread that
        iterates): ready for work queued on it, and given back to DALI in its order once released.

        Batches come out in input order except that the parts of a batch that had a bad image come out later.
        Keys are opaque here (any hashable). A (BATCH_END, None) pair ends the batch being gathered (see BATCH_END);
        a (NOT_READY, wait) pair says the next samples are on their way (see NOT_READY).
        The byte buffers must stay unmodified until the batch holding them has come out (a batch with a bad image
        is fed again from them; with copy_inputs=False DALI also reads them in place).
        """
        if self._broken:
            raise PipelineBroken(self._broken)
        if self._active:
            raise RuntimeError("ImagePipeline.process() is already running; a pipeline serves one stream at a time")
        self._active = True
        self._stream = cuda_stream
        source = self._batches(samples)
        pending: deque[_Batch] = deque()  # fed to DALI, outputs not yet taken, in feeding order
        retry: deque[_Batch] = deque()  # parts of failed batches, to be fed again
        failures: list[tuple[str, str]] = []
        source_done = False

        def fill() -> Optional[Callable[[], None]]:
            """Feed DALI up to `prefetch` batches, as far as samples are read; where the next ones are not, return
            the function that waits for them."""
            nonlocal source_done
            while len(pending) < self.prefetch:
                if retry:
                    batch = retry.popleft()
                elif not source_done:
                    got = next(source, None)
                    if got is None:
                        source_done = True
                        continue
                    batch, rejected = got
                    if batch is NOT_READY:
                        return rejected  # here, the wait function
                    failures.extend(rejected)
                    if not batch.keys:
                        continue
                else:
                    return None
                try:
                    self._feed(batch)
                    self._pipe.schedule_run()
                except Exception as e:  # half-fed inputs would put every later batch out of step
                    self._broken = f"feeding DALI failed: {e}"[:500]
                    raise PipelineBroken(self._broken) from e
                pending.append(batch)
            return None

        try:
            while True:
                if not pending:
                    wait = fill()
                    if not pending:
                        if wait is None:
                            break
                        # Nothing in DALI, the next samples on their way: what is known so far goes out first, the
                        # failures and, even where there are none, a turn of the consumer's, which may finish a
                        # caller whose samples are all out (an empty shard, one whose reader ended after its last
                        # batch).
                        yield PreprocessedBatch([], self._empty(), failures)
                        failures = []
                        wait()
                        continue
                batch = pending.popleft()
                try:
                    result = self._collect(batch)
                except _BatchFailed as e:
                    if len(batch.keys) == 1:
                        failures.append((batch.keys[0], explain_decode_failure(batch.data[0], e.reason)))
                    else:
                        parts = batch.split(e.bad_index)
                        log.debug("a batch of %d failed (%s); feeding it again as %s", len(batch.keys), e.reason,
                                  [len(p.keys) for p in parts])
                        retry.extend(parts)
                    fill()
                    continue
                fill()  # keep DALI busy while the consumer works on this batch
                result.failures, failures = failures + result.failures, []
                yield result
            if failures:
                yield PreprocessedBatch([], self._empty(), failures)
        except PipelineBroken:
            raise
        except BaseException:
            # The consumer stopped early (GeneratorExit) or the sample source failed (an unreadable shard): the
            # pipeline is fine, but the iterations in flight must be taken so the next process() starts in step.
            try:
                self._drain(pending)
            except Exception as drain_error:
                self._broken = self._broken or f"could not drain the pipeline: {drain_error}"[:500]
            raise
        finally:
            self._active = False

    def close(self) -> None:
        """Free the pipeline (and the GPU memory DALI pooled for it)."""
        pipe, self._pipe = getattr(self, "_pipe", None), None
        self._broken = self._broken or "closed"
        if pipe is not None:
            del pipe
            if self.device_id is not None:
                from nvidia.dali.backend import ReleaseUnusedMemory

                ReleaseUnusedMemory()

    def __enter__(self) -> "ImagePipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _batches(
        self, samples: Iterable[tuple[str, bytes | memoryview]]
    ) -> Iterator[tuple[_Batch, list[tuple[str, str]]]]:
        from nvidia.dali.tensors import TensorCPU

        # Per-sample work is kept to a sniff, an end-of-image check and a zero-copy TensorCPU view (~1.5 us): DALI's
        # feed_input would otherwise inspect and wrap each numpy array in Python, about twice as slow. The header
        # sizes are read for a batch at once (imagesize.image_sizes: about a microsecond per JPEG of one encoder).
        keys: list[str] = []
        datas: list[bytes | memoryview] = []
        tensors: list[Any] = []
        sizes: list[np.ndarray] = []
        rejected: list[tuple[str, str]] = []
        sniffed: list[tuple[str, bytes | memoryview]] = []  # images whose sizes are not read yet
        limit = self.max_pixels
        budget = self.batch_pixels

        def settle() -> None:
            """Read the sniffed images' sizes; keep those fit to feed, reject the others with their reason."""
            hw, unreadable, unmarked = image_sizes([data for _, data in sniffed])
            # a list: indexing a NumPy array one element at a time costs more than the check itself
            too_large = (hw[:, 0] * hw[:, 1] > limit).tolist() if limit is not None else [False] * len(sniffed)
            kept = []
            for i, (key, data) in enumerate(sniffed):
                if i in unreadable:
                    rejected.append((key, explain_decode_failure(data, unreadable[i])))
                    continue
                if too_large[i]:  # decompression-bomb guard: never fed, never decoded
                    h, w = hw[i].tolist()
                    rejected.append((key, too_large_reason(h, w, limit)))
                    continue
                why = cut_short(data)
                if why is not None:
                    rejected.append((key, why))
                    continue
                if i in unmarked:
                    data = with_adobe_marker(data)
                elif data[0] == 0x89:  # a PNG without its IEND chunk gets one (cut_short refused those cut inside one)
                    data = with_png_end(data)
                keys.append(key)
                datas.append(data)
                tensors.append(TensorCPU(data))
                kept.append(i)
            sizes.append(hw[kept])
            sniffed.clear()

        def take() -> tuple[_Batch, list[tuple[str, str]]]:
            """The batch gathered so far and the samples refused on the way; the next one starts empty."""
            nonlocal keys, datas, tensors, sizes, rejected
            out = _Batch(keys, datas, tensors, np.concatenate(sizes) if sizes else np.zeros((0, 2), np.int64)), rejected
            keys, datas, tensors, sizes, rejected = [], [], [], [], []
            return out

        def over_budget() -> Iterator[tuple[_Batch, list[tuple[str, str]]]]:
            """Batches cut from the front of the images gathered while their decoded pixels pass the batch's share;
            the rest stay gathered."""
            nonlocal keys, datas, tensors, sizes, rejected
            while budget is not None and keys:
                hw = np.concatenate(sizes) if len(sizes) > 1 else sizes[0]
                total = np.cumsum(hw[:, 0] * hw[:, 1])
                if total[-1] <= budget:
                    sizes = [hw]
                    return
                n = max(1, int(np.searchsorted(total, budget, side="right")))
                yield _Batch(keys[:n], datas[:n], tensors[:n], hw[:n]), rejected
                keys, datas, tensors, sizes, rejected = keys[n:], datas[n:], tensors[n:], [hw[n:]], []

        for key, data in samples:
            if key is NOT_READY:  # passed up as it is: the batch so far stays gathered
                yield key, data
                continue
            if key is BATCH_END:  # the stream asks for a batch boundary here: the batch so far goes out short
                if sniffed:
                    settle()
                yield from over_budget()
                if keys or rejected:
                    yield take()
                continue
            why = "no image data" if data is None else sniff_image(data)
            if why is not None:
                rejected.append((key, why))
                continue
            sniffed.append((key, data))
            if len(keys) + len(sniffed) == self.batch_size:
                settle()
                yield from over_budget()
                if len(keys) == self.batch_size:
                    yield take()
        if sniffed:
            settle()
        yield from over_budget()
        if keys or rejected:
            yield take()

    def _feed(self, batch: _Batch) -> None:
        from nvidia.dali.tensors import TensorListCPU

        n = len(batch.keys)
        batch.ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        geometry = self.recipe.source_geometry(batch.sizes, batch.ids)  # before any input is fed
        # One TensorListCPU sharing the views: feed_input then takes the batch as it is, instead of checking and
        # wrapping each sample in Python and again in C++ while it holds the GIL (2-core machine, in place: 0.26
        # against 0.50 ms per batch of 256).
        self._pipe.feed_input("encoded", TensorListCPU(batch.tensors, contiguous=False))
        feed_geometry(self._pipe, geometry)

    def _collect(self, batch: _Batch) -> PreprocessedBatch:
        """Take the outputs of the oldest iteration in flight, which must be `batch`'s."""
        import torch

        stream = None
        if self.device_id is not None:
            stream = self._stream if self._stream is not None else torch.cuda.current_stream(self.device_id)
        try:
            outs = self._pipe.outputs(cuda_stream=stream)
        except RuntimeError as e:
            message = str(e)
            if _FATAL_PATTERNS.search(message):
                self._broken = f"DALI pipeline failed: {failure_reason(message)}"
                raise PipelineBroken(self._broken) from e
            hint = re.search(r"Failed to decode sample #(\d+)", message)
            raise _BatchFailed(failure_reason(message), int(hint.group(1)) if hint else None) from None
        images_tl, geometry_tl = outs
        got = read_ids(np.asarray(geometry_tl.as_tensor()))
        if not np.array_equal(got, batch.ids):
            self._broken = f"DALI outputs out of step with inputs: expected ids {batch.ids[:4]}..., got {got[:4]}..."
            raise PipelineBroken(self._broken)
        # The DLPack hand-over is queued on the stream the outputs are bound to.
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            images = self._to_torch(images_tl)
        return PreprocessedBatch(batch.keys, images)

    def _to_torch(self, tl: Any) -> "torch.Tensor":
        import torch

        if self.device_id is None:  # the CPU path shares DALI's buffer (decoding, not buffers, bounds its rate)
            if tl.is_dense_tensor():
                return torch.from_dlpack(tl.as_tensor())
            return torch.stack([torch.from_numpy(np.asarray(tl[i])) for i in range(len(tl))])
        with torch.cuda.device(self.device_id):
            if tl.is_dense_tensor():  # the usual case: one contiguous batch
                shared = torch.from_dlpack(tl.as_tensor())
            else:
                shared = torch.stack([torch.from_dlpack(tl[i]) for i in range(len(tl))])
            # Our own copy in the model's form; DALI's buffer goes back now (see the class docstring).
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            return shared.to(dtype=self.output_dtype or shared.dtype, memory_format=memory_format, copy=True)

    def _empty(self) -> "torch.Tensor":
        import torch

        return torch.empty((0, *self.recipe.input_size), dtype=torch.float32, device=self.device)

    def _drain(self, pending: deque[_Batch]) -> None:
        """The consumer stopped early: take (and drop) the outputs still in flight so that the next process()
        starts in step."""
        while pending:
            batch = pending.popleft()
            try:
                self._collect(batch)
            except _BatchFailed:
                pass


class _BatchFailed(Exception):
    def __init__(self, reason: str, bad_index: Optional[int]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad_index = bad_index
