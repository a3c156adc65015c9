"""timm's eval transform as DALI operators. The one place that knows the preprocessing recipe.

The reference is `timm.data.create_transform(**resolve_model_data_config(model))` applied to
`PIL.ImageOps.exif_transpose(img).convert("RGB")`:

- center: torchvision `Resize(scale)` (short side = scale, long side truncated), or `ResizeKeepRatio(scale)` for a
  non-square target; then `CenterCrop(size)` (zero padding where the image is smaller).
- squash: `Resize((scale_h, scale_w))`, then `CenterCrop(size)`.
- border: `ResizeKeepRatio(scale, longest=1)`, then `CenterCropOrPad(size, fill=round(255 * mean))`.
- `ToTensor` + `Normalize(mean, std)`.

where `scale = floor(size / crop_pct)`. Pixel-exact sizes and crop anchors matter (one pixel off costs more
than all decoder/resampler rounding together): DALI's own `resize_shorter` and crop rounding differ by a pixel, so
the resized size and the crop anchor are computed here, with the same arithmetic (and the same float64 rounding) as
timm/torchvision. The crop is folded into `resize` as a region of interest (same scale, same sample positions, no
full-size intermediate) and `crop_mirror_normalize` only pads where the crop is larger than the image, then
normalizes to CHW float32.

PIL (torchvision's Resize of a PIL image) resizes in two passes, one axis into an 8-bit image (rounded and clipped
to 0..255), then the other. Which axis goes first it decides per image, from the image's size and the whole resized
size (Pillow 13: `pillow_resizes_height_first`): the width first, unless the height shrinks by more than twice as
many pixels as the width does (tall images, portrait ones among them). A bicubic filter overshoots at a sharp edge
and PIL clips the overshoot between its passes; resized in one pass in float, black-and-white graphics (QR codes,
1-bit scans, thin lines) agreed with timm only to 0.998-0.999 cosine, and in two passes in the order other than
PIL's, worse still (0.996). So a bicubic recipe resizes in two fn.resize calls as PIL does, in PIL's order per
image (first axis to uint8, then the other: `resize_passes`), with the crop's region split between them; a bilinear
one, which does not overshoot, in one (`PreprocessRecipe.two_passes`). What is left differs at an image's own
edges: where the filter reaches past them, PIL leaves those taps out (and rescales the others), DALI repeats the
edge pixel.

The geometry is computed on the host for a whole batch at once (`PreprocessRecipe.pass_geometry`, NumPy) from each
image's header size (`wdsembed.imagesize`: EXIF-oriented, as DALI decodes it), and reaches the graph as per-sample
argument inputs through external sources. Computed inside the graph instead (about 80 scalar DALI operators per
batch, each run one after the other), it capped the GPU input path near 5,000 images/s (issue #11).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# Bumped whenever the DALI graph changes the numbers it produces; part of `describe()` and so of cache keys.
# 2: bicubic resizes in PIL's two passes, 8 bits between them, always the width first (bilinear's numbers are
#    version 1's).
# 3: bicubic passes in Pillow 13's order per image (the height first for some tall images).
RECIPE_IMPL_VERSION = 3

DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT
CROP_MODES = ("center", "squash", "border")
# timm interpolation name -> DALI interpolation name. PIL's bilinear/bicubic antialias when downscaling, like DALI's
# filters with antialias=True (bicubic: Keys a=-0.5 in both).
INTERPOLATIONS = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR"}


class UnsupportedRecipe(ValueError):
    """The model's data config asks for something this pipeline does not reproduce exactly."""


@dataclass(frozen=True)
class PreprocessRecipe:
    """What timm's `resolve_model_data_config` says about a model's eval input."""

    input_size: tuple[int, int, int]  # (C, H, W)
    interpolation: str  # "bicubic" | "bilinear"
    crop_pct: float
    crop_mode: str  # "center" | "squash" | "border"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        c, h, w = self.input_size
        if c != 3:
            raise UnsupportedRecipe(f"the model takes {c}-channel input, and the run feeds it RGB images")
        if h < 1 or w < 1:
            raise UnsupportedRecipe(f"bad input size {self.input_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise UnsupportedRecipe(
                f"interpolation {self.interpolation!r} is not supported (supported: {', '.join(INTERPOLATIONS)})"
            )
        if self.crop_mode not in CROP_MODES:
            raise UnsupportedRecipe(f"crop_mode {self.crop_mode!r} is not one of {CROP_MODES}")
        if not self.crop_pct > 0:
            raise UnsupportedRecipe(f"crop_pct must be > 0, got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UnsupportedRecipe(f"mean/std must have 3 entries and std > 0: {self.mean}, {self.std}")

    @classmethod
    def from_data_config(cls, data_config: dict) -> "PreprocessRecipe":
        """From `timm.data.resolve_model_data_config(model)` (or `resolve_data_config`). Missing crop_pct/crop_mode
        take timm's eval defaults, as `transforms_imagenet_eval` does."""
        input_size = data_config.get("input_size", (3, 224, 224))
        if isinstance(input_size, int):
            input_size = (3, input_size, input_size)
        return cls(
            input_size=tuple(int(x) for x in input_size),  # type: ignore[arg-type]
            interpolation=str(data_config.get("interpolation") or "bilinear"),
            crop_pct=float(data_config.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=str(data_config.get("crop_mode") or "center"),
            mean=tuple(float(x) for x in data_config["mean"]),
            std=tuple(float(x) for x in data_config["std"]),
        )

    @classmethod
    def from_model(cls, model: Any) -> "PreprocessRecipe":
        """Shortcut for a timm model instance."""
        from timm.data import resolve_model_data_config

        return cls.from_data_config(resolve_model_data_config(model))

    @property
    def crop_size(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return self.input_size[1], self.input_size[2]

    @property
    def scale_size(self) -> tuple[int, int]:
        """(H, W) that the resize aims at before the crop: timm's `floor(size / crop_pct)`."""
        return math.floor(self.input_size[1] / self.crop_pct), math.floor(self.input_size[2] / self.crop_pct)

    @property
    def pad_fill(self) -> tuple[float, float, float]:
        """Pixel value (0..255) of padding where the crop is larger than the resized image: torchvision's
        CenterCrop pads with 0, timm's CenterCropOrPad (border mode) with round(255 * mean)."""
        if self.crop_mode == "border":
            return tuple(float(round(255 * m)) for m in self.mean)  # type: ignore[return-value]
        return (0.0, 0.0, 0.0)

    @property
    def two_passes(self) -> bool:
        """Whether the graph resizes as PIL does, in two passes with 8 bits between them, in PIL's order of the axes
        for each image (`pillow_resizes_height_first`) (bicubic), or in one (bilinear). PIL clips a bicubic
        filter's overshoot at hard edges between its passes, which moves values by up to a third of the range on
        black-and-white graphics; a bilinear filter does not overshoot, and PIL's rounding between the passes moves
        none by more than half a level. Two passes cost more: on the CPU, three
        to four times the resize's time (`resize_passes`), bilinear's as much as bicubic's."""
        return self.interpolation == "bicubic"

    def geometry(self, heights: Any, widths: Any) -> dict[str, np.ndarray]:
        """The resize and crop of a batch of images of heights x widths (as decoded: EXIF-oriented), fused, as
        [y, x] float32 rows: the output size ("resize_size", the crop, or the whole resized axis where that is
        shorter) and the input region that maps onto it ("roi_start", "roi_end"). These are the arguments of a
        one-pass graph; `pass_geometry` splits them between two passes. (The padding anchor needs no per-sample
        argument: see `pad_crop_pos`.)"""
        out_len, start, end, _, _, _ = self._fused(heights, widths)
        return {
            "resize_size": out_len.astype(np.float32),
            "roi_start": start.astype(np.float32),
            "roi_end": end.astype(np.float32),
        }

    def _fused(self, heights: Any, widths: Any) -> tuple[np.ndarray, ...]:
        """`geometry` in float64, then the [height, width] sizes as float64 rows, the input pixels per output
        pixel of each axis, and the whole resized size."""
        # Resize and crop fused, per axis: the input interval that maps onto the crop window of the resized image,
        # and the output length. Same scale (length / resized) and same sample positions as resizing the whole image
        # and cropping it, without making the resized image (an extreme aspect ratio can make that huge). Where the
        # crop is longer than the resized axis, the whole axis is resized and crop_mirror_normalize pads.
        # Both axes at once, as (N, 2) [y, x] rows of integer-valued float64 (exact: every size is far below 2**53):
        # a few NumPy calls per batch on the feeding thread, and the rows come out in the form fn.resize takes.
        hw = np.empty((len(heights), 2))
        hw[:, 0], hw[:, 1] = heights, widths
        resized = _resized(hw, self)
        crop = np.asarray(self.crop_size, dtype=np.float64)
        start = np.where(resized >= crop, crop_anchor(resized, crop), 0)  # in resized pixels; 0 where it pads
        out_len = np.minimum(resized, crop)  # the crop, or the whole axis where it is shorter
        scale = hw / resized
        return out_len, start * scale, (start + out_len) * scale, hw, scale, resized

    def pass_geometry(self, heights: Any, widths: Any) -> dict[str, np.ndarray]:
        """Per-sample arguments of the graph's resize (`resize_passes`), keyed by `pass_inputs`, as [y, x] float32
        rows: in one pass, `geometry`; in two (`two_passes`), `geometry`'s region split by axis, as PIL resizes:
        one axis first, to 8 bits, then the other, in the order Pillow picks for the image
        (`pillow_resizes_height_first`, from its size and the whole resized size):

        - Pass 1 ("pass1_size", "pass1_roi_start"/"pass1_roi_end") resizes the first axis: `geometry`'s region and
          output length on it, and on the other axis a band of whole pixels [first, last) at scale 1 (copied as they
          are; size last - first). Width first: the width, over a band of rows; height first: the height, over a
          band of columns.
        - Pass 2 ("resize_size", "pass2_roi_start"/"pass2_roi_end") resizes the other axis of pass 1's output:
          `geometry`'s region on it, counted from the band's first pixel, and all of pass 1's output on the first
          axis at scale 1.

        The band holds the pixels that pass 2's filter reaches (Keys cubic: 2 output pixels either side, widened by
        the scale where it downscales; 2 more to spare: `_needed_span`), so pass 1 never resizes rows or columns that
        are not needed. Where the band stops short of the image, pass 2's filter does not reach the edge of its
        input, so its own edge handling never applies there. PIL's order also keeps pass 1's output within about
        the image's size or the output's (an image much taller than wide, squashed, goes height first: its rows are
        never widened)."""
        if not self.two_passes:
            return self.geometry(heights, widths)
        out_len, start, end, hw, scale, resized = self._fused(heights, widths)
        return _split_passes(out_len, start, end, hw, scale, resized)

    def source_geometry(self, sizes: np.ndarray, ids: Optional[np.ndarray] = None) -> np.ndarray:
        """`pass_geometry` for a batch of (N, 2) [height, width] sizes, as the (N, rows, 2) float32 array that the
        graph's geometry source takes (`geometry_rows`; `feed_geometry` feeds it). The same values, bit for bit. With
        `ids` (one int64 per image), a last row carries them (`put_ids`; `read_ids` reads them back)."""
        scale, crop = self.scale_size, self.crop_size
        if not (self.crop_mode == "center" and scale[0] == scale[1] and self.fixed_output_size):
            return stack_geometry(self.pass_geometry(sizes[:, 0], sizes[:, 1]), self, ids)
        # The usual recipe (center crop from a square scale no smaller than the crop): the resized image always
        # covers the crop, so the output size is the crop, the anchor never pads, and only pass 1's size and the
        # regions of interest are fed. The arithmetic of `pass_geometry` with nothing it cannot need, in place where
        # it can be: on the feeding thread for every batch (two passes in PIL's order per image: 47-58 us per batch
        # of 256 on the 2-core machine beside a test run, where always width first took 29-30 us and, earlier and
        # under another load, one pass 21 us).
        hw = sizes.astype(np.float64)
        resized = hw * float(scale[0])
        resized /= np.minimum(hw[:, :1], hw[:, 1:])
        np.floor(resized, out=resized)  # `_resized`: short side = scale, long side truncated
        if self.two_passes:  # from the whole resized size, before it is overwritten below
            height_first = pillow_resizes_height_first(hw[:, 0], hw[:, 1], resized[:, 0], resized[:, 1])
        crop64 = np.asarray(crop, dtype=np.float64)
        start = resized - crop64
        start *= 0.5
        np.rint(start, out=start)  # `crop_anchor` where the crop fits (always, here): half to even
        input_per_output = np.divide(hw, resized, out=resized)
        lo = start * input_per_output  # the region of interest, computed in float64 as `geometry`'s
        start += crop64
        hi = np.multiply(start, input_per_output, out=start)
        if not self.two_passes:
            rows = np.empty((len(hw), 2 if ids is None else 3, 2), np.float32)
            rows[:, 0] = lo  # roi_start
            rows[:, 1] = hi  # roi_end
            if ids is not None:
                put_ids(rows, ids)
            return rows
        # `_split_passes`, with the same operations on the same values (so the same bits), written into the rows
        rows = np.empty((len(hw), 5 if ids is None else 6, 2), np.float32)
        # geometry_rows: pass1_size, pass1_roi_start, pass1_roi_end, pass2_roi_start, pass2_roi_end
        for i, row in enumerate(_pass_regions(crop64, lo, hi, hw, input_per_output, height_first)):
            rows[:, i] = row
        if ids is not None:
            put_ids(rows, ids)
        return rows

    @property
    def fixed_output_size(self) -> Optional[tuple[int, int]]:
        """fn.resize's output size, (H, W), where it is the same for every image, else None. It is then a constant of
        the graph rather than a per-sample input: one DALI operator per sample fewer. The output is min(resized,
        crop) per axis: the crop itself wherever the resize never falls short of it (center mode with crop_pct <= 1:
        the resized image covers the scale size, which covers the crop), min(scale, crop) where the resize is the
        same for every image (squash). Border mode can fall short by an amount that depends on the image."""
        scale, crop = self.scale_size, self.crop_size
        if self.crop_mode == "squash":
            return min(scale[0], crop[0]), min(scale[1], crop[1])
        if self.crop_mode == "center" and scale[0] >= crop[0] and scale[1] >= crop[1]:
            return crop
        return None

    @property
    def pad_crop_pos(self) -> float:
        """crop_mirror_normalize's relative anchor, one for every sample and both axes. Its input is, per axis,
        either exactly the crop (anchor 0 whatever the position) or the whole resized axis of length r < crop, to be
        padded with torchvision's left pad (crop - r) // 2, i.e. anchor -((crop - r) // 2). DALI computes the anchor
        as roundf(pos * (r - crop)); with pos = 1/2 - 1/(4 * crop) that is -(d/2) + d/(4 * crop) for d = crop - r,
        d/(4 * crop) in (0, 1/4): it rounds to -(d/2) for even d and to -((d - 1)/2) for odd d, never a tie, so
        float32 rounding cannot move it (checked for every r < crop in the tests)."""
        return 0.5 - 0.25 / max(self.crop_size)

    def describe(self) -> dict:
        """JSON-ready form, written into the manifest and hashed into cache keys."""
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "exif_transpose": True,
            "impl": f"dali-timm-eval-v{RECIPE_IMPL_VERSION}",
        }


# ---------------------------------------------------------------------------------------------------------------
# Geometry: per-sample sizes and anchors for a whole batch, in NumPy, with timm/torchvision's own arithmetic.


def resized_size(h: np.ndarray, w: np.ndarray, recipe: PreprocessRecipe) -> tuple[np.ndarray, np.ndarray]:
    """(height, width) after timm's resize step for images of h x w (int64 arrays)."""
    resized = _resized(np.stack([h, w], axis=1).astype(np.float64), recipe).astype(np.int64)
    return resized[:, 0], resized[:, 1]


def _resized(hw: np.ndarray, recipe: PreprocessRecipe) -> np.ndarray:
    """`resized_size` on (N, 2) [height, width] rows of integer-valued float64, in the same form."""
    scale = np.asarray(recipe.scale_size, dtype=np.float64)
    if recipe.crop_mode == "squash":
        return np.broadcast_to(scale, hw.shape).copy()
    if recipe.crop_mode == "center" and scale[0] == scale[1]:
        # torchvision Resize(int): short side = s, long side = int(s * long / short). The float64 quotient of two
        # integers this small is never rounded across an integer, so its floor is the exact integer floor; on the
        # short axis it is s itself, so one division gives both axes.
        return np.floor(hw * scale[0] / hw.min(axis=1, keepdims=True))
    # timm ResizeKeepRatio: ratio = max (border) or min (center) of h/sh, w/sw in float64, size = round(dim / ratio)
    # (half to even, as Python's round of a float)
    rows = hw / scale
    ratio = rows.max(axis=1, keepdims=True) if recipe.crop_mode == "border" else rows.min(axis=1, keepdims=True)
    # at least one pixel: timm itself fails on the zero-size resize of an extreme aspect ratio
    return np.maximum(np.rint(hw / ratio), 1)


def crop_anchor(size: np.ndarray, crop: Any) -> np.ndarray:
    """torchvision's CenterCrop/timm's CenterCropOrPad anchor on an axis of length `size` (an array of integer
    values; `crop` an int, or one per column of `size` for both axes at once):
    `int(round((size - crop) / 2))` (half to even) when the crop fits, else `-((crop - size) // 2)` (left pad)."""
    d = size - crop
    return np.where(d >= 0, np.rint(d / 2.0).astype(np.int64), -((-d) // 2))


def pillow_resizes_height_first(in_h: Any, in_w: Any, out_h: Any, out_w: Any) -> np.ndarray:
    """Whether Pillow (13.0, src/libImaging/Resample.c, ImagingResampleInner) resizes an image of in_h x in_w to
    out_h x out_w height first (else width first): where the height shrinks, and by more than twice as many pixels
    as the width does. (Where an axis keeps its size Pillow skips its pass, and the order makes no difference.)
    torchvision's Resize resizes the whole image, so out_* is the whole resized size, not the crop's. Elementwise,
    on arrays or scalars of integer values (float64 holds them exactly)."""
    shrink_h = np.subtract(in_h, out_h)
    return (shrink_h > 0) & (shrink_h > 2 * np.subtract(in_w, out_w))


def _needed_span(start: np.ndarray, end: np.ndarray, input_per_output: np.ndarray,
                 length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The whole input pixels [first, last) along an axis that a resize of that axis reads for the input region
    [start, end) of an image `length` pixels long (float64, elementwise: one value per image, or [y, x] rows for
    both axes): the region widened by the filter's reach, 2 output pixels (Keys cubic; bilinear reaches 1) in input
    pixels where it downscales, and 2 pixels to spare; clipped to the image."""
    reach = np.maximum(input_per_output, 1.0)
    reach *= 2.0
    reach += 2.0
    first = start - reach
    np.floor(first, out=first)
    np.maximum(first, 0.0, out=first)
    last = np.add(end, reach, out=reach)
    np.ceil(last, out=last)
    np.minimum(last, length, out=last)
    return first, last


def _pass_regions(out_len: np.ndarray, start: np.ndarray, end: np.ndarray, hw: np.ndarray,
                  input_per_output: np.ndarray, height_first: np.ndarray) -> tuple[np.ndarray, ...]:
    """The two passes' [y, x] float64 rows (N, 2): pass 1's size, region start and end, pass 2's region start and
    end (`PreprocessRecipe.pass_geometry`), from the fused region [start, end) of the images' hw, its output length
    and scale per axis, and Pillow's order per image. Pass 1 takes a band of whole pixels at scale 1 on the axis
    that pass 2 resizes (rows where the width goes first, columns where the height does)."""
    band = np.empty(hw.shape, bool)  # per [y, x]: the axis pass 2 resizes, banded in pass 1
    band[:, 0] = ~height_first
    band[:, 1] = height_first
    first, last = _needed_span(start, end, input_per_output, hw)
    return (
        np.where(band, last - first, out_len),  # pass1_size
        np.where(band, first, start),  # pass1_roi_start
        np.where(band, last, end),  # pass1_roi_end
        np.where(band, start - first, 0.0),  # pass2_roi_start
        np.where(band, end - first, out_len),  # pass2_roi_end
    )


def _split_passes(out_len: np.ndarray, start: np.ndarray, end: np.ndarray, hw: np.ndarray, scale: np.ndarray,
                  resized: np.ndarray) -> dict[str, np.ndarray]:
    """`PreprocessRecipe.pass_geometry` of two passes from `PreprocessRecipe._fused`'s values."""
    height_first = pillow_resizes_height_first(hw[:, 0], hw[:, 1], resized[:, 0], resized[:, 1])
    regions = _pass_regions(out_len, start, end, hw, scale, height_first)
    geometry = {name: row.astype(np.float32) for name, row in zip(TWO_PASS_INPUTS[1:], regions)}
    geometry["resize_size"] = out_len.astype(np.float32)
    return geometry


# ---------------------------------------------------------------------------------------------------------------
# DALI graph. The geometry arrives through one external source, fed per batch with feed_geometry.

# `PreprocessRecipe.pass_geometry`'s rows, [y, x] float32 per sample, in this order: the output size(s), then the
# region(s) of interest; for one pass, and for two (`PreprocessRecipe.two_passes`)
ONE_PASS_INPUTS = ("resize_size", "roi_start", "roi_end")
TWO_PASS_INPUTS = ("resize_size", "pass1_size", "pass1_roi_start", "pass1_roi_end", "pass2_roi_start",
                   "pass2_roi_end")
GEOMETRY_SOURCE = "geometry"  # the external source that takes them, as one (rows, 2) sample per image
_ID_BITS = 24  # float32 holds every integer below 2**24 exactly: an id is two such halves


def geometry_rows(recipe: PreprocessRecipe) -> tuple[str, ...]:
    """The rows of `PreprocessRecipe.pass_geometry` that the graph takes per sample, in order: all of its
    `pass_inputs`, or all but the output size where that is a constant (`PreprocessRecipe.fixed_output_size`).
    Pass 1's size is always fed: its band's length varies per image, and so does which axis it is on."""
    names = pass_inputs(recipe)
    return names[1:] if recipe.fixed_output_size else names


def pass_inputs(recipe: PreprocessRecipe) -> tuple[str, ...]:
    """The keys of `PreprocessRecipe.pass_geometry`, in the order of the graph's geometry rows."""
    return TWO_PASS_INPUTS if recipe.two_passes else ONE_PASS_INPUTS


def geometry_source() -> Any:
    """The external source that `feed_geometry` feeds: one (rows, 2) float32 sample per image."""
    from nvidia.dali import fn, types

    return fn.external_source(name=GEOMETRY_SOURCE, dtype=types.FLOAT, ndim=2)


def geometry_inputs(recipe: PreprocessRecipe) -> dict[str, Any]:
    """The resize passes' geometry arguments, keyed as `PreprocessRecipe.pass_geometry`: rows of one external
    source, and the output sizes as constants where they are."""
    return split_geometry(geometry_source(), recipe)


def split_geometry(node: Any, recipe: PreprocessRecipe) -> dict[str, Any]:
    """The argument nodes of a node whose samples are `stack_geometry`'s rows (and the constant output sizes)."""
    # One fed input instead of one per row: each feed_input call makes and copies a whole batch of samples on the
    # feeding thread, holding the GIL, while the subscripts run in DALI's own threads. (On the 2-core machine, with
    # one DALI thread, the two forms took the same wall time per batch.) Each subscript is one more operator per
    # sample, hence none for a constant size: two rows took 0.4 ms less per batch of 256 than three (same machine).
    arguments: dict[str, Any] = {name: node[i] for i, name in enumerate(geometry_rows(recipe))}
    fixed = recipe.fixed_output_size
    if fixed:
        arguments["resize_size"] = [float(fixed[0]), float(fixed[1])]
    return arguments


def stack_geometry(geometry: dict[str, np.ndarray], recipe: PreprocessRecipe,
                   ids: Optional[np.ndarray] = None) -> np.ndarray:
    """One batch's `PreprocessRecipe.pass_geometry` as the (N, rows, 2) float32 array that `geometry_inputs` is fed
    (and a last row of `ids`, as `put_ids` writes them, where given)."""
    names = geometry_rows(recipe)
    rows = np.empty((len(geometry[names[0]]), len(names) + (ids is not None), 2), np.float32)
    for i, name in enumerate(names):
        rows[:, i] = geometry[name]
    if ids is not None:
        put_ids(rows, ids)
    return rows


def put_ids(rows: np.ndarray, ids: np.ndarray) -> None:
    """Write one int64 id per image (0 <= id < 2**48) into the last row of geometry rows, as two exact float32
    halves. The geometry source then also tells which fed images a batch of outputs holds: returned as an output of
    the graph, it is the check that outputs and inputs are in step, with no source (and no feed per batch) of its
    own (a feed_input call costs the feeding thread about 70 us per batch of 256). ImagePipeline numbers its images
    from 0 for as long as it lives: 2**48 of them would take six centuries at 14,000 images/s."""
    rows[:, -1, 0] = ids >> _ID_BITS
    rows[:, -1, 1] = ids & ((1 << _ID_BITS) - 1)


def read_ids(rows: np.ndarray) -> np.ndarray:
    """The int64 ids that `put_ids` wrote into (N, rows, 2) geometry rows."""
    halves = rows[:, -1].astype(np.int64)
    return (halves[:, 0] << _ID_BITS) | halves[:, 1]


def feed_geometry(pipe: Any, rows: np.ndarray) -> None:
    """Feed one batch's `PreprocessRecipe.source_geometry` to a pipeline built with `dali_preprocess`."""
    from nvidia.dali.tensors import TensorListCPU

    # Wrapped first: feed_input then skips its checks of a NumPy batch (DALI 2.4, 2-core machine: 12 + 16 us
    # against 56 us per batch of 256 fed as the array itself).
    pipe.feed_input(GEOMETRY_SOURCE, TensorListCPU(rows))


def dali_preprocess(
    encoded: Any,
    recipe: PreprocessRecipe,
    decode_device: str = "cpu",
    *,
    geometry: Optional[dict[str, Any]] = None,
    hw_decoder_load: float = 0.9,
    device_memory_padding: int = 32 << 20,
    host_memory_padding: int = 16 << 20,
    jpeg_fancy_upsampling: bool = False,
    half: bool = False,
) -> Any:
    """Encoded image bytes (a CPU uint8 node) -> normalized float32 CHW images, on the GPU for decode_device="mixed";
    float16 with `half` (computed in float32 and rounded once, for a model that runs in 16 bits).

    Decoding applies EXIF orientation and yields 3-channel RGB for gray, RGBA (alpha dropped, as PIL's
    convert("RGB")), palette and CMYK inputs. `geometry` holds the resize passes' geometry arguments (default:
    `geometry_inputs(recipe)`, an external source to be fed with `feed_geometry(pipe, recipe.source_geometry(sizes))`
    for the (EXIF-oriented) header sizes of the same batch, from `wdsembed.imagesize`)."""
    from nvidia.dali import fn, types

    decoder_args: dict[str, Any] = dict(device=decode_device, output_type=types.RGB)
    if decode_device == "mixed":
        decoder_args.update(
            hw_decoder_load=hw_decoder_load,
            # preallocated per thread so that typical web and camera images never reallocate mid-stream
            device_memory_padding=device_memory_padding,
            host_memory_padding=host_memory_padding,
            # libjpeg-turbo (PIL, DALI's CPU decoder) upsamples chroma "fancily"; asking nvJPEG to do the same
            # keeps it off the hardware JPEG decoder, several times slower. Measured on an H200 (docs/benchmarks.md),
            # the plain upsampling keeps embeddings within the fidelity target, so it is the default.
            jpeg_fancy_upsampling=jpeg_fancy_upsampling,
        )
    if geometry is None:
        geometry = geometry_inputs(recipe)
    images = fn.decoders.image(encoded, **decoder_args)
    return crop_normalize(resize_passes(images, recipe, geometry), recipe, half=half)


def resize_passes(images: Any, recipe: PreprocessRecipe, geometry: dict[str, Any]) -> Any:
    """Decoded uint8 HWC images -> the recipe's resize and crop, uint8 (padding left to `crop_normalize`), with
    the geometry arguments of `geometry_inputs`: in one fn.resize, or in two (`PreprocessRecipe.two_passes`).

    Two passes cost more than one. On the CPU, DALI's horizontal pass is the slow one (a scalar loop per output
    pixel; the vertical one runs along whole rows): one pass resizes the height first and then the width of the
    output's rows only, PIL's width-first order (most images') resizes the width of every input row that it needs.
    And DALI has no shortcut for a pass's axis at scale 1: it runs its filter over it all the same. Batches of 256
    photographs (short side 256-480) to 224 x 224, on the 2-core machine (bench/resize_passes.py, CPU time, every
    image width first): bicubic took 1.3 ms per image in one pass and 4.6 in two, bilinear 0.66 and 2.0, where
    decoding took 0.7.
    """
    from nvidia.dali import fn, types

    resampling = dict(interp_type=getattr(types, INTERPOLATIONS[recipe.interpolation]), antialias=True,
                      subpixel_scale=False)
    if not recipe.two_passes:
        # The resize and the crop in one pass, in float (DALI picks the order of its axes), rounded once to 8 bits.
        return fn.resize(images, size=geometry["resize_size"], roi_start=geometry["roi_start"],
                         roi_end=geometry["roi_end"], **resampling)
    # PIL's two passes: one axis first, to 8 bits (rounded and clipped, as PIL's intermediate image), then the
    # other, in PIL's order per image. The order is in the geometry, not in the graph: each pass resizes both axes,
    # one of them whole pixels at scale 1 (a band of rows or of columns), which DALI's filters copy exactly (tested).
    images = fn.resize(
        images,
        size=geometry["pass1_size"],
        roi_start=geometry["pass1_roi_start"],
        roi_end=geometry["pass1_roi_end"],
        **resampling,
    )
    return fn.resize(
        images,
        size=geometry["resize_size"],
        roi_start=geometry["pass2_roi_start"],
        roi_end=geometry["pass2_roi_end"],
        **resampling,
    )


def crop_normalize(images: Any, recipe: PreprocessRecipe, *, half: bool = False) -> Any:
    """Resized uint8 HWC images -> the recipe's crop size (padded where an image is smaller), normalized, CHW."""
    from nvidia.dali import fn, types

    ch, cw = recipe.crop_size
    mean = [255.0 * m for m in recipe.mean]
    std = [255.0 * s for s in recipe.std]
    # fill_values are output (normalized) values: padding must come out as the normalized pixel value pad_fill.
    fill = [(f - m) / s for f, m, s in zip(recipe.pad_fill, mean, std)]
    return fn.crop_mirror_normalize(
        images,
        crop=(ch, cw),
        crop_pos_x=recipe.pad_crop_pos,
        crop_pos_y=recipe.pad_crop_pos,
        out_of_bounds_policy="pad",
        fill_values=fill,
        mean=mean,
        std=std,
        dtype=types.FLOAT16 if half else types.FLOAT,
        output_layout="CHW",
    )
