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
the resized size and the crop anchor are computed here, per sample in the graph, with the same arithmetic (and the
same float64 rounding) as timm/torchvision. The crop is then folded into `resize` as a region of interest (same
scale, same sample positions, no full-size intermediate) and `crop_mirror_normalize` only pads where the crop is
larger than the image, then normalizes to CHW float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

# Bumped whenever the DALI graph changes the numbers it produces; part of `describe()` and so of cache keys.
RECIPE_IMPL_VERSION = 1

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
            raise UnsupportedRecipe(f"only 3-channel RGB input is supported, the model wants {c} channels")
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
# DALI graph. Everything below runs inside a pipeline definition; the nodes are per-sample CPU scalars.


def _f64(x: Any) -> Any:
    from nvidia.dali import fn, types

    return fn.cast(x, dtype=types.FLOAT64)


def _c64(v: float) -> Any:
    from nvidia.dali import types

    return types.Constant(float(v), dtype=types.FLOAT64)


def _round_half_even(x: Any) -> Any:
    """Python's `round()` of a non-negative float64 node, as int64 (DALI has no such op)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    f = dmath.floor(x)
    frac = x - f  # exact for doubles
    odd = (f - _c64(2.0) * dmath.floor(f / _c64(2.0))) == _c64(1.0)
    up = (frac > _c64(0.5)) | ((frac == _c64(0.5)) & odd)
    return fn.cast(f, dtype=types.INT64) + fn.cast(up, dtype=types.INT64)


def _select(cond: Any, a: Any, b: Any) -> Any:
    """cond ? a : b for int64 nodes (bool promotes to 0/1; one term is always exact zero)."""
    from nvidia.dali import fn, types

    c = fn.cast(cond, dtype=types.INT64)
    return c * a + (1 - c) * b


def resized_size(h: Any, w: Any, recipe: PreprocessRecipe) -> tuple[Any, Any]:
    """Per-sample (height, width) after timm's resize step, for an image of h x w (int64 nodes)."""
    sh, sw = recipe.scale_size
    if recipe.crop_mode == "squash":
        return h * 0 + sh, w * 0 + sw
    if recipe.crop_mode == "center" and sh == sw:
        # torchvision Resize(int): short side = s, long side = int(s * long / short) (exact integer floor here).
        portrait = w <= h
        short = _select(portrait, w, h)
        long = _select(portrait, h, w)
        new_long = (long * sh) // short
        return _select(portrait, new_long, h * 0 + sh), _select(portrait, w * 0 + sw, new_long)
    # timm ResizeKeepRatio: ratio = max (border) or min (center) of h/sh, w/sw in float64, size = round(dim / ratio).
    rh = _f64(h) / _c64(sh)
    rw = _f64(w) / _c64(sw)
    take_h = rh > rw if recipe.crop_mode == "border" else rh < rw
    t = _f64(take_h)
    ratio = t * rh + (_c64(1.0) - t) * rw
    # at least one pixel: timm itself fails on the zero-size resize of an extreme aspect ratio
    return _at_least_1(_round_half_even(_f64(h) / ratio)), _at_least_1(_round_half_even(_f64(w) / ratio))


def _at_least_1(x: Any) -> Any:
    return _select(x < 1, x * 0 + 1, x)


def crop_anchor(size: Any, crop: int) -> Any:
    """torchvision's CenterCrop/timm's CenterCropOrPad anchor along one axis of length `size` (int64 node):
    `int(round((size - crop) / 2))` (half to even) when the crop fits, else `-((crop - size) // 2)` (left pad)."""
    d = size - crop
    q = d // 2  # floor for d >= 0
    odd_d = d - 2 * q
    odd_q = q - 2 * (q // 2)
    inside = q + odd_d * odd_q
    pad = 0 - ((0 - d) // 2)
    return _select(d >= 0, inside, pad)


def _crop_pos(size: Any, crop: int) -> Any:
    """crop_mirror_normalize takes a relative anchor `pos` and computes roundf(pos * (size - crop)); hand it
    anchor / (size - crop) so that the rounding lands on the exact anchor, also for negative (padding) extents."""
    from nvidia.dali import fn, types

    d = size - crop
    d = _select(d == 0, d * 0 + 1, d)
    return fn.cast(_f64(crop_anchor(size, crop)) / _f64(d), dtype=types.FLOAT)


def _axis_roi(length: Any, resized: Any, crop: int) -> tuple[Any, Any, Any]:
    """Resize and crop fused along one axis: the input interval that maps onto the crop window of the resized
    image, and the output length. Same scale (length / resized) and same sample positions as resizing the whole
    image and cropping it, without materialising the resized image (an extreme aspect ratio can make that huge).
    Where the crop is larger than the resized image the whole axis is resized and crop_mirror_normalize pads."""
    from nvidia.dali import fn, types

    fits = resized >= crop
    start = _select(fits, crop_anchor(resized, crop), resized * 0)  # in resized pixels
    out_len = _select(fits, resized * 0 + crop, resized)
    scale = _f64(length) / _f64(resized)
    roi_start = fn.cast(_f64(start) * scale, dtype=types.FLOAT)
    roi_end = fn.cast(_f64(start + out_len) * scale, dtype=types.FLOAT)
    return roi_start, roi_end, out_len


def _oversize_stub(encoded: Any) -> Any:
    """A 1x1 RGB 'image' made of the first bytes of the stream, standing in for an image that must not be
    decoded; its row is reported as a failure and dropped."""
    from nvidia.dali import fn

    head = fn.slice(encoded, 0, 3, axes=[0], out_of_bounds_policy="pad")
    return fn.reshape(head, shape=[1, 1, 3], layout="HWC")


def dali_preprocess(
    encoded: Any,
    recipe: PreprocessRecipe,
    decode_device: str = "cpu",
    *,
    max_pixels: Optional[int] = None,
    hw_decoder_load: float = 0.9,
    device_memory_padding: int = 32 << 20,
    host_memory_padding: int = 16 << 20,
    jpeg_fancy_upsampling: bool = False,
) -> tuple[Any, Optional[Any]]:
    """Encoded image bytes (a CPU uint8 node) -> normalized float32 CHW images, on the GPU for decode_device="mixed".

    Decoding applies EXIF orientation and yields 3-channel RGB for gray, RGBA (alpha dropped, as PIL's
    convert("RGB")), palette and CMYK inputs. Returns (images, oversize): with `max_pixels`, images whose header
    says height * width > max_pixels are not decoded and `oversize` holds their [height, width] ([0, 0] for the
    others); their image rows are placeholders. Without it, `oversize` is None. `max_pixels` needs a pipeline built
    with enable_conditionals=True."""
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

    oversize = None
    if max_pixels is None:
        images = fn.decoders.image(encoded, **decoder_args)
    else:
        peeked = fn.peek_image_shape(encoded)  # header only, EXIF-rotated like the decoder's output
        too_big = peeked[0] * peeked[1] > max_pixels
        oversize = peeked[0:2] * fn.cast(too_big, dtype=types.INT64)
        if too_big:
            images = _oversize_stub(encoded)
            if decode_device == "mixed":
                images = images.gpu()
        else:
            images = fn.decoders.image(encoded, **decoder_args)

    # Sizes from the image's header (EXIF-rotated, as the decoder's output), read on the CPU before decoding: the
    # resize arguments then never wait on the GPU decode, which would serialize every iteration (measured on an
    # H200: about 4.5k images/s with the decoded image's own shape).
    shape = fn.peek_image_shape(encoded, adjust_orientation=True)
    h, w = shape[0], shape[1]
    if oversize is not None:
        # A refused image's 1x1 stand-in is what gets resized: size its row as 1x1.
        fits = fn.cast(oversize[0] == 0, dtype=types.INT64)
        h, w = h * fits + (1 - fits), w * fits + (1 - fits)
    rh, rw = resized_size(h, w, recipe)
    ch, cw = recipe.crop_size
    y0, y1, out_h = _axis_roi(h, rh, ch)
    x0, x1, out_w = _axis_roi(w, rw, cw)
    images = fn.resize(
        images,
        resize_x=fn.cast(out_w, dtype=types.FLOAT),
        resize_y=fn.cast(out_h, dtype=types.FLOAT),
        roi_start=fn.stack(y0, x0),
        roi_end=fn.stack(y1, x1),
        interp_type=getattr(types, INTERPOLATIONS[recipe.interpolation]),
        antialias=True,
        subpixel_scale=False,
    )
    mean = [255.0 * m for m in recipe.mean]
    std = [255.0 * s for s in recipe.std]
    # fill_values are output (normalized) values: padding must come out as the normalized pixel value pad_fill.
    fill = [(f - m) / s for f, m, s in zip(recipe.pad_fill, mean, std)]
    images = fn.crop_mirror_normalize(
        images,
        crop=(ch, cw),
        crop_pos_x=_crop_pos(out_w, cw),
        crop_pos_y=_crop_pos(out_h, ch),
        out_of_bounds_policy="pad",
        fill_values=fill,
        mean=mean,
        std=std,
        dtype=types.FLOAT,
        output_layout="CHW",
    )
    return images, oversize
