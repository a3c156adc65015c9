"""Image sizes from encoded headers, as DALI's decoder will output them: (height, width) after EXIF orientation.

`image_size(data)` is what `fn.peek_image_shape(adjust_orientation=True)` reports, computed on the host in a few
microseconds per JPEG, so that the per-sample resize and crop arguments can be computed for a whole batch in NumPy
before the bytes reach DALI (see `preprocess.PreprocessRecipe.geometry`).

The parsers follow the ones DALI uses (nvImageCodec's JPEG, PNG, WebP, TIFF, BMP, PNM and JPEG 2000 parsers),
including where they read EXIF orientation (JPEG APP1, PNG eXIf, WebP EXIF, TIFF tag 274) and how their EXIF reader
(OpenCV's) accepts or rejects a block. Orientations 5-8 (a quarter turn) swap height and width. They are lenient
where nvImageCodec is strict about bytes that do not change the size (a stream cut short after its header): such
an image is fed to DALI, whose decoder then names what is wrong with it. What no parser here can read is tried with
Pillow (`Image.open` reads the header only); what that cannot read either raises `UnreadableImage`, as does an image
that DALI's decoder would turn otherwise than it sizes it (EXIF blocks that disagree on a quarter turn), which
crashes the process that decodes it.
"""
from __future__ import annotations

import io
import operator
import struct
from typing import Callable, Optional, Sequence, Union

import numpy as np

Bytes = Union[bytes, bytearray, memoryview]

_ORIENTATION_TAG = 0x0112
_QUARTER_TURN = frozenset((5, 6, 7, 8))  # EXIF orientations that rotate by 90 or 270 degrees


class UnreadableImage(ValueError):
    """The image's header gives no size; str() is the reason, fit for a failure row."""


def image_size(data: Bytes) -> tuple[int, int]:
    """(height, width) of the decoded image, EXIF orientation applied, from its header. Raises UnreadableImage."""
    n = len(data)
    if n >= 3 and data[0] == 0xFF and data[1] == 0xD8:  # most images: no dispatch
        parser, fmt = _jpeg, "JPEG"
    else:
        parser, fmt = _parser_for(data, n)
    hw, why = None, "not a format DALI decodes"
    if parser is not None:
        try:
            hw = parser(data, n)
        except _Bad as e:
            why = str(e)
        except (IndexError, struct.error):
            why = "header cut short"
    if hw is None:
        hw = _pil_size(data)
        if hw is None:
            raise UnreadableImage(f"unreadable {fmt} header: {why}")
    h, w = hw
    if h < 1 or w < 1:
        raise UnreadableImage(f"{fmt} header gives a size of {w}x{h} pixels")
    return hw


def image_sizes(datas: Sequence[Bytes]) -> tuple[np.ndarray, dict[int, str], set[int]]:
    """`image_size` for a batch: an (N, 2) int64 array of (height, width), the reason for each image that has
    none, by index (its row is (0, 0)), and the indices of the CMYK JPEGs without an Adobe marker
    (`adobe_marker_missing`). The same sizes and reasons as `image_size` one image at a time, at a fraction of its
    cost for a batch of JPEGs from one encoder (`jpeg_frames`); what that cannot settle (EXIF orientation, other
    formats, anything unusual) goes through `image_size` itself."""
    errors: dict[int, str] = {}
    settled, sizes, components = jpeg_frames(datas)
    unmarked = {i for i in np.flatnonzero(components == 4).tolist() if adobe_marker_missing(datas[i])}
    for i in np.flatnonzero(~settled).tolist():
        try:
            sizes[i] = image_size(datas[i])
        except UnreadableImage as e:
            errors[i] = str(e)
            continue
        if adobe_marker_missing(datas[i]):
            unmarked.add(i)
    return sizes, errors, unmarked


def adobe_marker_missing(d: Bytes) -> bool:
    """Whether `d` is a CMYK JPEG (4 components) without the Adobe APP14 segment that says its ink is stored
    inverted, as Photoshop stores it. Metadata strippers (exiftool -all=) remove that segment but not the
    inversion; Pillow, browsers and OpenCV take every CMYK JPEG as inverted, DALI's decoder only one with the
    segment (the colours of the others come out wrong). A segment as libjpeg accepts it: "Adobe" and at least 12
    bytes."""
    n = len(d)
    if n < 3 or d[0] != 0xFF or d[1] != 0xD8:
        return False
    pos, components, adobe = 2, None, False
    while pos + 4 <= n:
        marker, size = _MARKER_AND_LENGTH(d, pos)
        kind = _MARKER_KIND[marker]
        if kind == _FILL:
            pos += 1
            continue
        if kind in (_SOS, _NOT_A_MARKER, _INVALID) or size < 2:
            break
        if kind == _SOF and pos + 10 <= n:
            components = _SOF_FIELDS(d, pos + 5)[2]
            if components != 4:  # nearly every JPEG: the rest of its header need not be walked
                return False
        elif marker == 0xFFEE and size >= 14 and d[pos + 4 : pos + 9] == b"Adobe":
            adobe = True
        pos += 2 + size
    return components == 4 and not adobe


_LAYOUTS_PER_BATCH = 3  # header layouts tried per batch before the rest go one image at a time
_EXIF_MARK = b"Exif\x00\x00"


def jpeg_frames(datas: Sequence[Bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frame header of the batch's JPEGs that share a header layout (up to three layouts): which rows it
    settled (N bools), their (height, width) (N, 2) and their colour components (N: 1 gray, 3 YCbCr, 4 CMYK/YCCK),
    zeros where not settled. Settled images hold no EXIF block, so their size is the decoded one.

    Encoders write one layout for all their images (the same segments, in the same order, of the same lengths; only
    the frame size differs), so one image's header is walked as `_jpeg` walks it, and every image with the same
    marker and length at each of its segment positions is walked the same way: its frame header is read at the same
    position, for the whole batch at once. Layouts with an EXIF block (which may turn the image) are left to
    `image_size`."""
    n = len(datas)
    block = lengths = None  # every image's first bytes, one row each (zero-padded), as far as a layout needs
    layout = _jpeg_layout(datas[0]) if n else None
    if layout is not None:
        # The usual batch, one encoder's: every image has the first one's layout and a usable frame header. Settled
        # in one pass of whole-batch checks, none of the per-layout masks below (34 against 48 us per batch of 256
        # on the 2-core machine); any image that fails them sends the batch the general way.
        block, lengths = _heads(datas, layout[2])
        if lengths is None:
            marks, fields = _frame_columns(block, layout)
            hw = np.ascontiguousarray(fields[:, :4]).view(">u2")  # big-endian height, width
            if (marks == marks[0]).all() and (fields[:, 4] <= 4).all() and hw.all():
                return np.ones(n, dtype=bool), hw.astype(np.int64), fields[:, 4].astype(np.int64)
    settled = np.zeros(n, dtype=bool)
    sizes = np.zeros((n, 2), dtype=np.int64)
    components = np.zeros(n, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)  # neither settled nor tried as a layout's first image
    # Whole-batch masks and column gathers, never row copies: this runs on the feeding thread for every batch.
    for _ in range(_LAYOUTS_PER_BATCH):
        layout = None
        for first in np.flatnonzero(open_).tolist():
            open_[first] = False
            layout = _jpeg_layout(datas[first])
            if layout is not None:
                break
        if layout is None:
            break
        _, frame, end = layout
        h, w, ncomp = _SOF_FIELDS(datas[first], frame + 5)
        sizes[first], components[first], settled[first] = (h, w), ncomp, True
        if not open_.any():
            break
        if block is None or end > block.shape[1]:  # copied as far as this layout's header reaches
            block, lengths = _heads(datas, end)
        marks, fields = _frame_columns(block, layout)
        fields = fields.astype(np.int64)
        same = open_ & (marks == marks[first]).all(axis=1)
        if lengths is not None:  # some images are shorter than the copies (zero-padded)
            same &= lengths >= end
        h, w = (fields[:, 0] << 8) | fields[:, 1], (fields[:, 2] << 8) | fields[:, 3]
        fine = same & (fields[:, 4] <= 4) & (h >= 1) & (w >= 1)  # else image_size says why
        np.copyto(sizes[:, 0], h, where=fine)
        np.copyto(sizes[:, 1], w, where=fine)
        np.copyto(components, fields[:, 4], where=fine)
        settled |= fine
        open_ &= ~fine
    return settled, sizes, components


def _frame_columns(block: np.ndarray, layout: tuple[np.ndarray, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One gather of the bytes of `_heads` rows that matter to a layout: each segment's marker and length bytes (the
    marks every image of the layout shares), and the frame header's height, width (big-endian) and components."""
    segments, frame, _ = layout
    cols = block[:, np.concatenate([segments, np.arange(frame + 5, frame + 10)])]
    return cols[:, : len(segments)], cols[:, len(segments) :]


def _heads(datas: Sequence[Bytes], size: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Each image's first `size` bytes as the rows of one array (shorter images zero-padded), and their lengths;
    None for the lengths when every image has `size` bytes or more (the usual batch)."""
    heads = list(map(operator.itemgetter(slice(0, size)), datas))  # no Python loop: 19 against 23 us per 256 slices
    joined = b"".join(heads)
    if len(joined) == len(heads) * size:
        return np.frombuffer(joined, dtype=np.uint8).reshape(len(heads), size), None
    lengths = np.fromiter(map(len, heads), dtype=np.int64, count=len(heads))
    for i in np.flatnonzero(lengths < size).tolist():
        heads[i] = bytes(heads[i]).ljust(size, b"\0")
    return np.frombuffer(b"".join(heads), dtype=np.uint8).reshape(len(heads), size), lengths


def _jpeg_layout(d: Bytes) -> Optional[tuple[np.ndarray, int, int]]:
    """A JPEG header walked as `_jpeg` walks it, where it meets nothing but segments to skip, frame headers and the
    start of scan: the byte positions every image of the same layout must match (SOI, then each segment's marker
    and length), the last frame header's position, and the end of the scan's marker and length. None otherwise
    (EXIF, fill bytes, anything wrong, no usable frame header: `image_size` decides)."""
    n = len(d)
    if n < 3 or d[0] != 0xFF or d[1] != 0xD8:
        return None
    pos, frame, at = 2, None, [0, 1]
    while pos + 4 <= n:
        marker, size = _MARKER_AND_LENGTH(d, pos)
        kind = _MARKER_KIND[marker]
        at += (pos, pos + 1, pos + 2, pos + 3)
        if kind == _SOS:
            if frame is None:
                return None
            h, w, ncomp = _SOF_FIELDS(d, frame + 5)
            return (np.asarray(at), frame, pos + 4) if ncomp <= 4 and h >= 1 and w >= 1 else None
        if size < 2 or kind not in (_SKIP, _SOF, _APP1):
            return None
        if kind == _SOF:
            if pos + 10 > n or frame is not None:  # `_jpeg` checks every frame header; a layout holds one
                return None
            frame = pos
        elif kind == _APP1:
            if d[pos + 4 : pos + 10] == _EXIF_MARK:
                return None
            at += range(pos + 4, pos + 10)  # not EXIF in every image of the layout either
        pos += 2 + size
    return None


def _parser_for(d: Bytes, n: int) -> tuple[Optional[Callable[[Bytes, int], tuple[int, int]]], str]:
    if n >= 3 and d[0] == 0xFF and d[1] == 0xD8:
        return _jpeg, "JPEG"
    if n >= 8 and d[:8] == b"\x89PNG\r\n\x1a\n":
        return _png, "PNG"
    if n >= 12 and d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        return _webp, "WebP"
    if n >= 4 and d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff, "TIFF"
    if n >= 2 and d[:2] == b"BM":
        return _bmp, "BMP"
    if n >= 3 and d[0] == 0x50 and 0x31 <= d[1] <= 0x36 and d[2] in _SPACE:
        return _pnm, "PNM"
    if n >= 12 and d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return _jp2, "JPEG 2000"
    if n >= 2 and d[0] == 0xFF and d[1] == 0x4F:
        return _j2k_file, "JPEG 2000"
    return None, "image"


class _Bad(Exception):
    """What a parser could not read, for the reason."""


def _oriented(h: int, w: int, orientation: Optional[int]) -> tuple[int, int]:
    return (w, h) if orientation in _QUARTER_TURN else (h, w)


def _be16(d: Bytes, p: int) -> int:
    return (d[p] << 8) | d[p + 1]


def _be32(d: Bytes, p: int) -> int:
    return (d[p] << 24) | (d[p + 1] << 16) | (d[p + 2] << 8) | d[p + 3]


def _le16(d: Bytes, p: int) -> int:
    return d[p] | (d[p + 1] << 8)


def _le32(d: Bytes, p: int) -> int:
    return d[p] | (d[p + 1] << 8) | (d[p + 2] << 16) | (d[p + 3] << 24)


# ---------------------------------------------------------------------------------------------------------------
# JPEG: segments up to the first scan; the last SOF gives the size, the last EXIF APP1 with an orientation tag the
# orientation (nvImageCodec reads every segment before SOS, APP1s after the SOF included).

_SKIP, _SOF, _APP1, _SOS, _FILL, _NOT_A_MARKER, _INVALID = range(7)
# what each big-endian 16-bit word where a marker is expected means: one table lookup per segment
_MARKER_KIND = tuple(
    _NOT_A_MARKER if word < 0xFF00
    else _INVALID if word == 0xFF00
    else _FILL if word == 0xFFFF
    else _SOS if word == 0xFFDA
    else _APP1 if word == 0xFFE1
    else _SOF if 0xFFC0 <= word <= 0xFFCF and word not in (0xFFC4, 0xFFC8, 0xFFCC)
    else _SKIP
    for word in range(0x10000)
)
_MARKER_AND_LENGTH = struct.Struct(">HH").unpack_from
_SOF_FIELDS = struct.Struct(">HHB").unpack_from  # height, width, components (after the precision byte)


def jpeg_scan_start(d: Bytes) -> Optional[int]:
    """The byte position of a JPEG's start-of-scan marker, found by walking its header segment by segment, so that
    the markers inside a segment (an EXIF thumbnail's own scan and end of image) are never taken for it. None where
    the header ends first or holds anything but segments and fill bytes."""
    n, pos = len(d), 2
    while pos + 4 <= n:
        marker, size = _MARKER_AND_LENGTH(d, pos)
        kind = _MARKER_KIND[marker]
        if kind == _SOS:
            return pos
        if kind == _FILL:
            pos += 1
            continue
        if kind in (_NOT_A_MARKER, _INVALID) or size < 2:
            return None
        pos += 2 + size
    return None


def jpeg_frame(d: Bytes) -> Optional[tuple[int, int]]:
    """The marker (0xFFC0-0xFFCF) and sample precision of a JPEG's last frame header before its first scan, as
    `_jpeg` walks the header; None where there is none to read."""
    n, pos, frame = len(d), 2, None
    while pos + 4 <= n:
        marker, size = _MARKER_AND_LENGTH(d, pos)
        kind = _MARKER_KIND[marker]
        if kind == _FILL:
            pos += 1
            continue
        if kind in (_SOS, _NOT_A_MARKER, _INVALID) or size < 2:
            break
        if kind == _SOF and pos + 5 <= n:
            frame = (marker, d[pos + 4])
        pos += 2 + size
    return frame


def _jpeg(d: Bytes, n: int) -> Optional[tuple[int, int]]:
    pos = 2
    hw = None
    orientation = None
    turns = set()  # whether each EXIF block's orientation tag is a quarter turn, the block readable or not
    marker_and_length, kinds = _MARKER_AND_LENGTH, _MARKER_KIND  # this loop is the per-image cost: lean
    while pos + 4 <= n:
        marker, size = marker_and_length(d, pos)
        kind = kinds[marker]
        if kind == 0 and size >= 2:  # _SKIP (literals: no global lookups here)
            pos += 2 + size
            continue
        if kind == 3:  # _SOS, start of scan: the header is over
            break
        if kind == 4:  # _FILL, a fill byte before the marker
            pos += 1
            continue
        if kind == 5:  # _NOT_A_MARKER
            raise _Bad(f"no marker at byte {pos} (0x{d[pos]:02x})")
        if kind == 6:  # _INVALID
            raise _Bad(f"invalid marker at byte {pos}")
        if size < 2:
            raise _Bad(f"segment 0x{marker & 0xFF:02x} at byte {pos} has length {size}")
        if kind == 1:  # _SOF
            if pos + 10 > n:
                break
            h, w, ncomp = _SOF_FIELDS(d, pos + 5)
            if ncomp > 4:
                raise _Bad(f"frame header with {ncomp} components")
            hw = (h, w)
        elif d[pos + 4 : pos + 10] == b"Exif\x00\x00":  # an APP1 segment
            block = d[pos + 10 : pos + 2 + size]
            if len(block) != size - 8:  # cut short inside EXIF: DALI fails it; the decoder will say so
                break
            ok, o = _exif_orientation(block)
            if o is not None:
                turns.add(o in _QUARTER_TURN)
                if ok:
                    orientation = o
        pos += 2 + size
    if hw is None:
        raise _Bad("no frame header (SOF) before the image data")
    if len(turns) > 1:
        raise UnreadableImage(_TURNS_DISAGREE.format("JPEG", "APP1 blocks"))
    return _oriented(hw[0], hw[1], orientation)


# DALI 2.4's CPU decoder turns an image by its first EXIF block (JPEG: the first that names an orientation, readable
# or not; PNG: the first eXIf chunk) but sizes it by the last readable one, as fn.peek_image_shape and `image_size`
# do. Where one is a quarter turn and the other not, it writes past its output (the process dies) or scrambles the
# pixels. Refused wherever the blocks disagree, also where DALI happens to decode it (a last block of orientation 1):
# such an image has no one upright to embed.
_TURNS_DISAGREE = ("{} EXIF {} disagree on whether the image is turned a quarter (orientations 5-8 against 1-4): "
                   "refused, DALI's decoder crashes on it or scrambles it")


# ---------------------------------------------------------------------------------------------------------------
# PNG: IHDR, then every chunk up to IEND for eXIf (nvImageCodec honours one anywhere in the file).

_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png(d: Bytes, n: int) -> tuple[int, int]:
    if n < 33 or _be32(d, 8) != 13 or d[12:16] != b"IHDR":
        raise _Bad("no IHDR chunk")
    w, h = _be32(d, 16), _be32(d, 20)
    depth, color = d[24], d[25]
    if depth not in _PNG_BIT_DEPTHS.get(color, ()):
        raise _Bad(f"bit depth {depth} with color type {color}")
    pos = 33
    orientation = None
    turns = set()  # whether each eXIf chunk turns the image a quarter: one without an orientation tag does not
    while pos + 8 <= n:
        length = _be32(d, pos)
        kind = d[pos + 4 : pos + 8]
        if kind == b"IEND":
            break
        if kind == b"eXIf":
            chunk = d[pos + 8 : pos + 8 + length]
            if len(chunk) != length:
                break
            ok, o = _exif_orientation(chunk)
            turns.add(o in _QUARTER_TURN)
            if ok and o is not None:
                orientation = o
            elif o in _QUARTER_TURN:
                # DALI 2.4's CPU decoder turns this image while its shape says unturned, and overruns its output
                # buffer (heap corruption, the process dies): never feed it
                raise UnreadableImage(
                    "PNG eXIf chunk with a quarter-turn orientation followed by an unreadable entry: refused, DALI's "
                    "decoder crashes on it"
                )
        pos += 12 + length
    if len(turns) > 1:
        raise UnreadableImage(_TURNS_DISAGREE.format("PNG", "eXIf chunks"))
    return _oriented(h, w, orientation)


# ---------------------------------------------------------------------------------------------------------------
# WebP: the first chunk (VP8, VP8L or VP8X canvas); with VP8X's EXIF flag, the first EXIF chunk. Chunks are walked
# without RIFF's pad byte, as nvImageCodec does.


def _webp(d: Bytes, n: int) -> tuple[int, int]:
    if n < 30:  # the shortest first chunk header read below
        raise _Bad("file too short")
    kind = d[12:16]
    size = _le32(d, 16)
    if kind == b"VP8 ":
        if d[23:26] != b"\x9d\x01\x2a":
            raise _Bad("bad VP8 sync code")
        return _le16(d, 28) & 0x3FFF, _le16(d, 26) & 0x3FFF
    if kind == b"VP8L":
        if d[20] != 0x2F:
            raise _Bad("bad VP8L signature")
        bits = _le32(d, 21)
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind != b"VP8X":
        raise _Bad(f"unexpected first chunk {bytes(kind)!r}")
    flags = d[20]
    w = (d[24] | (d[25] << 8) | (d[26] << 16)) + 1
    h = (d[27] | (d[28] << 8) | (d[29] << 16)) + 1
    orientation = None
    if flags & 0x08:
        pos = 20 + size
        while pos + 8 <= n:
            size = _le32(d, pos + 4)
            if d[pos : pos + 4] == b"EXIF":
                chunk = d[pos + 8 : pos + 8 + size]
                if len(chunk) == size:
                    orientation = _exif_orientation(chunk)[1]  # used even where the block fails to parse
                break
            pos += 8 + size
    return _oriented(h, w, orientation)


# ---------------------------------------------------------------------------------------------------------------
# TIFF: the first IFD's ImageWidth, ImageLength and Orientation.

_TIFF_SINGLE = frozenset((256, 257, 262, 274, 277, 278, 322, 323))


def _tiff(d: Bytes, n: int) -> Optional[tuple[int, int]]:
    le = d[0] == 0x49
    big = d[2 if le else 3] == 43
    order = "little" if le else "big"

    def u(p: int, k: int) -> int:
        if p + k > n:
            raise _Bad("file cut short inside its first directory")
        return int.from_bytes(d[p : p + k], order)

    if big:
        if u(4, 2) != 8:
            raise _Bad("unsupported BigTIFF offset size")
        ifd, count_size, entry_size, count_field = u(8, 8), 8, 20, 8
    else:
        ifd, count_size, entry_size, count_field = u(4, 4), 2, 12, 4
    count = u(ifd, count_size)
    width = height = None
    orientation = None
    palette = bits = sample_format = strips = tile_w = tile_h = False
    for i in range(count):
        p = ifd + count_size + i * entry_size
        tag, kind, num = u(p, 2), u(p + 2, 2), u(p + 4, count_field)
        value_at = p + 4 + count_field
        if tag == 258:
            bits = True
        elif tag == 339:
            sample_format = True
        elif tag in _TIFF_SINGLE:
            if num != 1:
                raise _Bad(f"tag {tag} has {num} values")
            if kind == 3:
                value = u(value_at, 2)
            elif kind == 4:
                value = u(value_at, 4)
            elif kind == 16:
                value = u(value_at, 8)
            else:
                raise _Bad(f"tag {tag} has type {kind}")
            if tag == 256:
                width = value
            elif tag == 257:
                height = value
            elif tag == 274:
                orientation = value
            elif tag == 262:
                palette = palette or value == 3
            elif tag == 322:
                tile_w = True
            elif tag == 323:
                tile_h = True
            elif tag == 278:
                strips = True
        # nvImageCodec stops reading the directory once it has all it needs (only ever before Orientation for
        # palette images written in tag order)
        if width is not None and height is not None and palette and bits and sample_format and (
            (tile_w and tile_h) or strips
        ):
            break
    if width is None or height is None:
        raise _Bad("no ImageWidth/ImageLength in the first directory")
    samples = tiff_samples(d)
    if samples is not None:
        photometric, per_pixel, _, sample_format = samples
        # DALI 2.4's CPU decoder gives both without an error, and not as Pillow (timm's reference) reads them
        if sample_format == 3:
            raise UnreadableImage("TIFF of floating-point samples: refused, DALI's decoder scales them otherwise "
                                  "than Pillow")
        if photometric in (0, 1) and per_pixel > 1:
            raise UnreadableImage(f"grayscale TIFF with {per_pixel} samples per pixel: refused, DALI's decoder "
                                  "reads the extra samples as colours")
    return _oriented(height, width, orientation)


def tiff_samples(d: Bytes) -> Optional[tuple[Optional[int], int, int, int]]:
    """A TIFF's first directory's PhotometricInterpretation (None where absent), SamplesPerPixel, BitsPerSample and
    SampleFormat (1 unsigned, 2 signed, 3 float), the first value of each, with TIFF's defaults; None where the
    directory cannot be read."""
    n = len(d)
    if n < 8 or bytes(d[:4]) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None
    order = "little" if d[0] == 0x49 else "big"
    big = d[2 if order == "little" else 3] == 43

    def u(p: int, k: int) -> int:
        if p + k > n:
            raise _Bad("cut short")
        return int.from_bytes(d[p : p + k], order)

    fields = {262: None, 277: 1, 258: 1, 339: 1}
    sizes = {1: 1, 3: 2, 4: 4, 16: 8}  # BYTE, SHORT, LONG, LONG8
    try:
        ifd, count_size, entry_size, count_field = (u(8, 8), 8, 20, 8) if big else (u(4, 4), 2, 12, 4)
        for i in range(u(ifd, count_size)):
            p = ifd + count_size + i * entry_size
            tag, kind, num = u(p, 2), u(p + 2, 2), u(p + 4, count_field)
            if tag in fields and kind in sizes and num >= 1:
                at = p + 4 + count_field
                if sizes[kind] * num > count_field:  # the values lie elsewhere; the first one is enough
                    at = u(at, count_field)
                fields[tag] = u(at, sizes[kind])
    except _Bad:
        return None
    return fields[262], fields[277], fields[258], fields[339]


# ---------------------------------------------------------------------------------------------------------------
# BMP, PNM, JPEG 2000: no orientation.


def _bmp(d: Bytes, n: int) -> tuple[int, int]:
    if n < 18:
        raise _Bad("file too short")
    header = _le32(d, 14)
    if n >= 26 and header == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        return _le16(d, 20), _le16(d, 18)
    if n >= 50 and header >= 40:  # BITMAPINFOHEADER and later: signed, negative height = top-down rows
        w = int.from_bytes(d[18:22], "little", signed=True)
        h = int.from_bytes(d[22:26], "little", signed=True)
        return abs(h), abs(w)
    raise _Bad(f"unknown header size {header}")


_SPACE = frozenset(b" \t\n\v\f\r")
_DIGITS = frozenset(b"0123456789")


def _pnm(d: Bytes, n: int) -> tuple[int, int]:
    pos = 3
    values = []
    for _ in range(2):
        while True:  # spaces and comments
            if pos >= n:
                raise _Bad("header cut short")
            c = d[pos]
            if c == 0x23:
                while pos < n and d[pos] != 0x0A:
                    pos += 1
                pos += 1
            elif c in _SPACE:
                pos += 1
            else:
                break
        value = 0
        while pos < n:  # digits; a comment may sit inside the number
            c = d[pos]
            if c in _DIGITS:
                value = value * 10 + c - 0x30
                pos += 1
            elif c == 0x23:
                while pos < n and d[pos] != 0x0A:
                    pos += 1
                pos += 1
            else:
                break
        values.append(value)
    w, h = values
    return h, w


def _jp2(d: Bytes, n: int) -> tuple[int, int]:
    pos = 12
    if n < pos + 8 or d[pos + 4 : pos + 8] != b"ftyp":
        raise _Bad("no file type box")
    pos += _be32(d, pos)
    while pos + 8 <= n:
        size, kind = _be32(d, pos), d[pos + 4 : pos + 8]
        if size == 0:
            size = n - pos
        if size < 8:
            raise _Bad(f"box of size {size}")
        if kind == b"jp2c":
            return _j2k(d, pos + 8, n)
        pos += size
    raise _Bad("no codestream box")


def _j2k_file(d: Bytes, n: int) -> tuple[int, int]:
    return _j2k(d, 0, n)


def _j2k(d: Bytes, pos: int, n: int) -> tuple[int, int]:
    # SOC, SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, then Ssiz XRsiz YRsiz per component
    if n < pos + 45 or _be16(d, pos) != 0xFF4F or _be16(d, pos + 2) != 0xFF51:
        raise _Bad("no SIZ marker after SOC")
    x, y = _be32(d, pos + 8), _be32(d, pos + 12)
    x0, y0 = _be32(d, pos + 16), _be32(d, pos + 20)
    xr, yr = d[pos + 43], d[pos + 44]  # first component's subsampling (after Csiz and its Ssiz)
    if xr == 0 or yr == 0 or x < x0 or y < y0:
        raise _Bad("bad image extent in SIZ")
    return -((y0 - y) // yr), -((x0 - x) // xr)  # ceil((Ysiz - YOsiz) / YRsiz), as nvImageCodec


# ---------------------------------------------------------------------------------------------------------------
# EXIF, as nvImageCodec's copy of OpenCV's ExifReader reads it: byte order, 0x2A, the first IFD only; a block
# "parses" when every IFD0 entry of a tag it knows reads within bounds. Returns (parsed, orientation tag or None).

_EXIF_STRINGS = frozenset((0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x8298))
_EXIF_RATIONALS = {0x011A: 1, 0x011B: 1, 0x013E: 2, 0x013F: 6, 0x0211: 3, 0x0214: 6}
_EXIF_SHORTS = frozenset((0x0128, 0x0213))


class _ExifEnd(Exception):
    pass


def _exif_orientation(b: Bytes) -> tuple[bool, Optional[int]]:
    n = len(b)
    le = n > 1 and b[0] == 0x49 and b[1] == 0x49

    def u16(p: int) -> int:
        if p + 1 >= n:
            raise _ExifEnd
        return (b[p] | (b[p + 1] << 8)) if le else ((b[p] << 8) | b[p + 1])

    def u32(p: int) -> int:
        if p + 3 >= n:
            raise _ExifEnd
        if le:
            return b[p] | (b[p + 1] << 8) | (b[p + 2] << 16) | (b[p + 3] << 24)
        return (b[p] << 24) | (b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3]

    orientation = None
    entries = 0
    try:
        if u16(2) != 0x2A:
            return False, None
        off = u32(4)
        count = u16(off)
        off += 2
        for _ in range(count):
            tag = u16(off)
            if tag == _ORIENTATION_TAG:
                value = u16(off + 8)
                if orientation is None:  # the first one wins (std::map::insert)
                    orientation = value
            elif tag in _EXIF_STRINGS:
                size = u32(off + 4)
                start = 8 if size <= 4 else u32(off + 8)
                if start > n or start + size > n:
                    raise _ExifEnd
            elif tag in _EXIF_RATIONALS:
                at = u32(off + 8)
                for _ in range(_EXIF_RATIONALS[tag]):
                    u32(at)
                    u32(at + 4)
                    at = (at + 8) & 0xFFFFFFFF
            elif tag in _EXIF_SHORTS:
                u16(off + 8)
            entries += 1
            off += 12
    except _ExifEnd:
        return False, orientation
    return entries > 0, orientation


# ---------------------------------------------------------------------------------------------------------------
# Fallback


def _pil_size(data: Bytes) -> Optional[tuple[int, int]]:
    """Pillow's header-only read, for what the parsers above cannot read (DALI's decoder decides whether it can)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's complaints about damaged metadata: the size is what counts
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                try:
                    orientation = im.getexif().get(_ORIENTATION_TAG)
                except Exception:  # a broken EXIF block: the size stands without it
                    orientation = None
        except Exception:
            return None
    return _oriented(h, w, orientation)
