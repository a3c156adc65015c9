"""The per-sample geometry as it was computed inside the DALI graph before issue #11 (wdsembed/preprocess.py up to
commit e2f7501): ~80 scalar DALI arithmetic operators fed by `fn.peek_image_shape`. Kept only to time it against the
host-side NumPy geometry (bench/dali_probe.py --geometry-only) and to check that both give bit-identical arguments,
and the same pixels where the graph still resizes in one pass (bilinear; tests/test_preprocess.py). Nothing in
wdsembed uses it.
"""
from __future__ import annotations

from typing import Any

from wdsembed.preprocess import PreprocessRecipe


def _f64(x: Any) -> Any:
    from nvidia.dali import fn, types

    return fn.cast(x, dtype=types.FLOAT64)


def _c64(v: float) -> Any:
    from nvidia.dali import types

    return types.Constant(float(v), dtype=types.FLOAT64)


def _round_half_even(x: Any) -> Any:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    f = dmath.floor(x)
    frac = x - f
    odd = (f - _c64(2.0) * dmath.floor(f / _c64(2.0))) == _c64(1.0)
    up = (frac > _c64(0.5)) | ((frac == _c64(0.5)) & odd)
    return fn.cast(f, dtype=types.INT64) + fn.cast(up, dtype=types.INT64)


def _select(cond: Any, a: Any, b: Any) -> Any:
    from nvidia.dali import fn, types

    c = fn.cast(cond, dtype=types.INT64)
    return c * a + (1 - c) * b


def _at_least_1(x: Any) -> Any:
    return _select(x < 1, x * 0 + 1, x)


def resized_size(h: Any, w: Any, recipe: PreprocessRecipe) -> tuple[Any, Any]:
    sh, sw = recipe.scale_size
    if recipe.crop_mode == "squash":
        return h * 0 + sh, w * 0 + sw
    if recipe.crop_mode == "center" and sh == sw:
        portrait = w <= h
        short = _select(portrait, w, h)
        long = _select(portrait, h, w)
        new_long = (long * sh) // short
        return _select(portrait, new_long, h * 0 + sh), _select(portrait, w * 0 + sw, new_long)
    rh = _f64(h) / _c64(sh)
    rw = _f64(w) / _c64(sw)
    take_h = rh > rw if recipe.crop_mode == "border" else rh < rw
    t = _f64(take_h)
    ratio = t * rh + (_c64(1.0) - t) * rw
    return _at_least_1(_round_half_even(_f64(h) / ratio)), _at_least_1(_round_half_even(_f64(w) / ratio))


def crop_anchor(size: Any, crop: int) -> Any:
    d = size - crop
    q = d // 2
    odd_d = d - 2 * q
    odd_q = q - 2 * (q // 2)
    inside = q + odd_d * odd_q
    pad = 0 - ((0 - d) // 2)
    return _select(d >= 0, inside, pad)


def _crop_pos(size: Any, crop: int) -> Any:
    from nvidia.dali import fn, types

    d = size - crop
    d = _select(d == 0, d * 0 + 1, d)
    return fn.cast(_f64(crop_anchor(size, crop)) / _f64(d), dtype=types.FLOAT)


def _axis_roi(length: Any, resized: Any, crop: int) -> tuple[Any, Any, Any]:
    from nvidia.dali import fn, types

    fits = resized >= crop
    start = _select(fits, crop_anchor(resized, crop), resized * 0)
    out_len = _select(fits, resized * 0 + crop, resized)
    scale = _f64(length) / _f64(resized)
    roi_start = fn.cast(_f64(start) * scale, dtype=types.FLOAT)
    roi_end = fn.cast(_f64(start + out_len) * scale, dtype=types.FLOAT)
    return roi_start, roi_end, out_len


def old_geometry(h: Any, w: Any, recipe: PreprocessRecipe) -> dict[str, Any]:
    """The old graph's resize/crop arguments for int64 nodes h, w, as it passed them (resize_x/resize_y where the
    new graph passes the two as `size`)."""
    from nvidia.dali import fn, types

    rh, rw = resized_size(h, w, recipe)
    ch, cw = recipe.crop_size
    y0, y1, out_h = _axis_roi(h, rh, ch)
    x0, x1, out_w = _axis_roi(w, rw, cw)
    return {
        "resize_x": fn.cast(out_w, dtype=types.FLOAT),
        "resize_y": fn.cast(out_h, dtype=types.FLOAT),
        "roi_start": fn.stack(y0, x0),
        "roi_end": fn.stack(y1, x1),
        "crop_pos_x": _crop_pos(out_w, cw),
        "crop_pos_y": _crop_pos(out_h, ch),
    }


def old_geometry_from_bytes(encoded: Any, recipe: PreprocessRecipe) -> dict[str, Any]:
    """The whole old subgraph: peek_image_shape on the encoded bytes, then the arithmetic."""
    from nvidia.dali import fn

    shape = fn.peek_image_shape(encoded, adjust_orientation=True)
    return old_geometry(shape[0], shape[1], recipe)


def old_dali_preprocess(encoded: Any, recipe: PreprocessRecipe, decode_device: str = "cpu") -> Any:
    """The old graph end to end (no max_pixels guard): decode, peek-sized resize with ROI, crop/pad, normalize."""
    from nvidia.dali import fn, types

    from wdsembed.preprocess import INTERPOLATIONS

    geometry = old_geometry_from_bytes(encoded, recipe)
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    images = fn.resize(
        images,
        resize_x=geometry["resize_x"],
        resize_y=geometry["resize_y"],
        roi_start=geometry["roi_start"],
        roi_end=geometry["roi_end"],
        interp_type=getattr(types, INTERPOLATIONS[recipe.interpolation]),
        antialias=True,
        subpixel_scale=False,
    )
    mean = [255.0 * m for m in recipe.mean]
    std = [255.0 * s for s in recipe.std]
    return fn.crop_mirror_normalize(
        images,
        crop=recipe.crop_size,
        crop_pos_x=geometry["crop_pos_x"],
        crop_pos_y=geometry["crop_pos_y"],
        out_of_bounds_policy="pad",
        fill_values=[(f - m) / s for f, m, s in zip(recipe.pad_fill, mean, std)],
        mean=mean,
        std=std,
        dtype=types.FLOAT,
        output_layout="CHW",
    )
