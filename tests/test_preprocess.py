"""The DALI graph in wdsembed.preprocess against timm's own eval transform (CPU-only DALI)."""
from __future__ import annotations

import io
import json
import os
import sys
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from wdsembed.imagesize import image_size
from wdsembed.preprocess import (
    INTERPOLATIONS,
    PreprocessRecipe,
    UnsupportedRecipe,
    crop_anchor,
    dali_preprocess,
    feed_geometry,
    geometry_rows,
    pass_inputs,
    pillow_resizes_height_first,
    read_ids,
    resized_size,
    stack_geometry,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/

pytest.importorskip("nvidia.dali")
skimage_data = pytest.importorskip("skimage.data")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photos() -> dict[str, bytes]:
    """Real photographs re-encoded at varied sizes, aspect ratios, formats and color modes."""
    d = skimage_data
    rgba = np.array(Image.fromarray(d.astronaut()).resize((257, 190)).convert("RGBA"))
    rgba[..., 3] = 128
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90 CW to display
    return {
        "astronaut_300x451.jpg": _encode(Image.fromarray(d.astronaut()).resize((300, 451)), "JPEG", quality=90),
        "coffee_640x427.jpg": _encode(Image.fromarray(d.coffee()).resize((640, 427)), "JPEG", quality=90),
        "chelsea_517x517.png": _encode(Image.fromarray(d.chelsea()).resize((517, 517)), "PNG"),
        "rocket_213x700.jpg": _encode(Image.fromarray(d.rocket()).resize((213, 700)), "JPEG", quality=85),
        "camera_gray.png": _encode(Image.fromarray(d.camera()), "PNG"),
        "camera_gray_333x250.jpg": _encode(Image.fromarray(d.camera()).resize((333, 250)), "JPEG"),
        "astronaut_rgba.png": _encode(Image.fromarray(rgba), "PNG"),
        "coffee_palette.png": _encode(Image.fromarray(d.coffee()).resize((300, 200)).convert("P"), "PNG"),
        "coffee_cmyk.jpg": _encode(Image.fromarray(d.coffee()).resize((320, 240)).convert("CMYK"), "JPEG"),
        "chelsea_exif6.jpg": _encode(Image.fromarray(d.chelsea()).resize((400, 300)), "JPEG", exif=rotated.tobytes()),
    }


def timm_reference(data: bytes, data_config: dict) -> torch.Tensor:
    """What timm computes: EXIF orientation applied (as DALI does), RGB, then its eval transform."""
    from timm.data import create_transform

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return create_transform(**data_config)(img)


def data_config_of(name: str, **overrides) -> dict:
    """A pretrained tag's data config, without instantiating (or downloading) the model."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
    cfg.update(overrides)
    return cfg


def run_graph(recipe: PreprocessRecipe, encoded: list[bytes], *, old: bool = False, half: bool = False,
              rows: Optional[np.ndarray] = None) -> np.ndarray:
    """The graph on a batch, its geometry from the headers or `rows` (or, old=True, the graph before issue #11, one
    resize pass, geometry computed inside it from peek_image_shape)."""
    from nvidia.dali import fn, pipeline_def, types

    from bench.old_geometry import old_dali_preprocess

    @pipeline_def(batch_size=len(encoded), num_threads=2, device_id=None, prefetch_queue_depth=1)
    def graph():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        return old_dali_preprocess(enc, recipe, "cpu") if old else dali_preprocess(enc, recipe, "cpu", half=half)

    pipe = graph()
    pipe.build()
    pipe.feed_input("enc", [np.frombuffer(b, np.uint8) for b in encoded])
    if not old:
        sizes = np.array([image_size(b) for b in encoded])
        feed_geometry(pipe, recipe.source_geometry(sizes) if rows is None else rows)
    (out,) = pipe.run()
    return np.array(out.as_tensor())


# ---------------------------------------------------------------------------------------------------------------
# recipe


def test_recipe_from_data_config_and_describe():
    cfg = data_config_of("resnet18.a1_in1k")
    r = PreprocessRecipe.from_data_config(cfg)
    assert r.input_size == (3, 224, 224) and r.crop_pct == 0.95 and r.crop_mode == "center"
    assert r.interpolation == "bicubic" and r.mean == (0.485, 0.456, 0.406)
    assert r.scale_size == (235, 235)  # floor(224 / 0.95)
    d = r.describe()
    assert json.loads(json.dumps(d)) == d and d["crop_pct"] == 0.95 and d["exif_transpose"] is True
    # timm's eval defaults when the config leaves them out
    r2 = PreprocessRecipe.from_data_config({**cfg, "crop_pct": None, "crop_mode": None})
    assert (r2.crop_pct, r2.crop_mode) == (0.875, "center")
    border = PreprocessRecipe.from_data_config(data_config_of("deepseek_vit_412m.deepseek_v4_flash_vision_exp"))
    assert border.pad_fill == (128.0, 128.0, 128.0)  # round(255 * 0.5), in pixel units


@pytest.mark.parametrize(
    "bad",
    [{"input_size": (1, 224, 224)}, {"interpolation": "hamming"}, {"crop_mode": "random"}, {"mean": (0.5,)}],
)
def test_recipe_rejects_what_it_cannot_reproduce(bad):
    with pytest.raises(UnsupportedRecipe):
        PreprocessRecipe.from_data_config({**data_config_of("resnet18.a1_in1k"), **bad})


# ---------------------------------------------------------------------------------------------------------------
# geometry: the per-sample sizes and anchors computed in the DALI graph, against timm/torchvision's own code


def _reference_geometry(h: int, w: int, recipe: PreprocessRecipe) -> tuple[int, int, int, int]:
    from timm.data.transforms import ResizeKeepRatio
    from torchvision.transforms.functional import _compute_resized_output_size

    sh, sw = recipe.scale_size
    fake = torch.empty(1, 1, 1).expand(3, h, w)  # only its shape is read
    if recipe.crop_mode == "squash":
        rh, rw = sh, sw
    elif recipe.crop_mode == "center" and sh == sw:
        rh, rw = _compute_resized_output_size((h, w), [sh])
    else:
        longest = 1.0 if recipe.crop_mode == "border" else 0.0
        rh, rw = ResizeKeepRatio.get_params(fake, (sh, sw), longest)
    ch, cw = recipe.crop_size

    def anchor(r: int, c: int) -> int:  # torchvision CenterCrop / timm center_crop_or_pad
        return int(round((r - c) / 2.0)) if r >= c else -((c - r) // 2)

    return rh, rw, anchor(rh, ch), anchor(rw, cw)


GEOMETRY_CONFIGS = {
    "center_square": dict(name="resnet18.a1_in1k"),
    "center_pct1": dict(name="mambaout_femto.in1k"),
    "center_pct_gt1_pads": dict(name="volo_d4_448.sail_in1k"),
    "center_nonsquare": dict(name="resnet18.a1_in1k", input_size=(3, 160, 224)),
    "squash": dict(name="tf_efficientnetv2_b3.in21k_ft_in1k"),
    "squash_nonsquare": dict(name="vit_base_patch16_sapiens2.fb"),  # bilinear
    "center_bilinear": dict(name="dla34.in1k"),
    "border": dict(name="deepseek_vit_412m.deepseek_v4_flash_vision_exp"),
    "border_nonsquare": dict(name="resnet18.a1_in1k", input_size=(3, 224, 160), crop_mode="border", crop_pct=0.9),
}


# tf_efficientnetv2_b3.in21k_ft_in1k's and resnet18.a1_in1k's data configs (timm 1.0.31), as literals
SQUASH = dict(input_size=(3, 240, 240), interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
              crop_pct=0.9, crop_mode="squash")
CENTER = dict(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
              std=(0.229, 0.224, 0.225), crop_pct=0.95, crop_mode="center")


def _recipe(config: str) -> PreprocessRecipe:
    kw = dict(GEOMETRY_CONFIGS[config])
    return PreprocessRecipe.from_data_config(data_config_of(kw.pop("name"), **kw))


def _sizes() -> list[tuple[int, int]]:
    """Edge cases, random sizes, extreme aspect ratios and sizes smaller than every crop."""
    rng = np.random.default_rng(0)
    hw = [(1, 1), (1, 2000), (2000, 1), (224, 224), (235, 235), (236, 235), (256, 255), (448, 333), (427, 640),
          (1, 65535), (65535, 1), (3, 100_000), (100_000, 7), (2, 2), (13, 9), (223, 225), (512, 1), (1, 512)]
    hw += [tuple(x) for x in rng.integers(1, 5000, size=(400, 2))]
    hw += [tuple(x) for x in rng.integers(150, 700, size=(400, 2))]
    hw += [tuple(x) for x in rng.integers(1, 230, size=(200, 2))]  # smaller than the crop
    short, ratio = rng.integers(1, 400, size=200), np.exp(rng.uniform(1.5, 6.0, size=200))  # aspect 4:1 to 400:1
    hw += [(int(s), int(s * r)) if i % 2 else (int(s * r), int(s)) for i, (s, r) in enumerate(zip(short, ratio))]
    return [(int(h), int(w)) for h, w in hw]


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_sizes_and_anchors_match_timm(config):
    """NumPy sizes and anchors, element by element, against timm's and torchvision's own size code."""
    recipe = _recipe(config)
    hw = _sizes()
    h, w = np.array(hw).T
    rh, rw = resized_size(h, w, recipe)
    got = np.stack([rh, rw, crop_anchor(rh, recipe.crop_size[0]), crop_anchor(rw, recipe.crop_size[1])], axis=1)
    checked = 0
    for (hh, ww), g in zip(hw, got):
        ref = _reference_geometry(hh, ww, recipe)
        if min(ref[:2]) < 1:  # the keep-ratio modes are only defined while the short side stays >= 1 pixel
            assert min(g[:2]) >= 1  # we clamp where timm would fail
            continue
        assert tuple(int(x) for x in g) == ref, f"{hh}x{ww}: ours {tuple(g)} != timm {ref}"
        checked += 1
    assert checked > 1000


def _scalar_arguments(h: int, w: int, recipe: PreprocessRecipe) -> tuple:
    """fn.resize's arguments for one image, written out plainly in Python floats (float64) from timm's sizes, and
    the lengths crop_mirror_normalize then gets."""
    rh, rw, _, _ = _reference_geometry(h, w, recipe)
    rh, rw = max(rh, 1), max(rw, 1)
    out = []
    for length, resized, crop in ((h, rh, recipe.crop_size[0]), (w, rw, recipe.crop_size[1])):
        fits = resized >= crop
        start = int(round((resized - crop) / 2.0)) if fits else 0
        out_len = crop if fits else resized
        scale = length / resized
        out.append((np.float32(start * scale), np.float32((start + out_len) * scale), out_len))
    (y0, y1, oh), (x0, x1, ow) = out
    return (np.float32(oh), np.float32(ow)), (y0, x0), (y1, x1)


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_geometry_arguments_match_a_scalar_reimplementation(config):
    recipe = _recipe(config)
    hw = [x for x in _sizes() if min(_reference_geometry(*x, recipe)[:2]) >= 1]
    h, w = np.array(hw).T
    g = recipe.geometry(h, w)
    assert set(g) == {"resize_size", "roi_start", "roi_end"}
    assert all(a.dtype == np.float32 and a.shape == (len(hw), 2) for a in g.values())
    for i, (hh, ww) in enumerate(hw):
        expected = _scalar_arguments(hh, ww, recipe)
        got = (tuple(g["resize_size"][i]), tuple(g["roi_start"][i]), tuple(g["roi_end"][i]))
        assert got == expected, f"{hh}x{ww}"


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_the_fed_geometry_is_the_geometrys_rows_bit_for_bit(config):
    """What the feeding loop computes per batch (source_geometry: a shortcut for the usual center crop) is the
    reference geometry's rows, stacked as the graph takes them, to the last bit."""
    recipe = _recipe(config)
    sizes = np.array(_sizes(), dtype=np.int64)
    expected = stack_geometry(recipe.pass_geometry(sizes[:, 0], sizes[:, 1]), recipe)
    got = recipe.source_geometry(sizes)
    if recipe.two_passes:  # both of PIL's orders are in the batch, side by side
        rh, rw = resized_size(sizes[:, 0], sizes[:, 1], recipe)
        height_first = pillow_resizes_height_first(sizes[:, 0], sizes[:, 1], rh, rw)
        assert 0 < height_first.sum() < len(sizes) and (np.diff(height_first.astype(int)) != 0).sum() > 10
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(sizes), len(geometry_rows(recipe)), 2)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_ids_ride_in_a_last_row_and_come_back_exactly(config):
    """With ids, the geometry rows are the same to the last bit and one row longer; the ids read back exactly,
    across the float32 halves' boundary and up to the largest id the rows can carry."""
    recipe = _recipe(config)
    sizes = np.array(_sizes(), dtype=np.int64)
    n = len(sizes)
    ids = np.array([0, 1, 2**24 - 1, 2**24, 2**24 + 1, 2**40 + 12345, 2**48 - 1] * n, dtype=np.int64)[:n]
    plain = recipe.source_geometry(sizes)
    for got in (recipe.source_geometry(sizes, ids),
                stack_geometry(recipe.pass_geometry(sizes[:, 0], sizes[:, 1]), recipe, ids)):
        assert got.dtype == np.float32 and got.shape == (n, plain.shape[1] + 1, 2)
        assert np.array_equal(got[:, :-1].view(np.uint32), plain.view(np.uint32))
        assert read_ids(got).tolist() == ids.tolist()


FIXED_OUTPUT = {"center_square", "center_pct1", "center_nonsquare", "squash", "squash_nonsquare", "center_bilinear"}


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_a_fixed_output_size_is_every_images_size(config):
    """Where the recipe says fn.resize's output size is a constant of the graph, it is every image's, whatever its
    size or aspect ratio; where it does not, images of some sizes get others (they are padded)."""
    recipe = _recipe(config)
    h, w = np.array(_sizes()).T
    g = recipe.pass_geometry(h, w)
    sizes = g["resize_size"]
    fixed = recipe.fixed_output_size
    assert (fixed is not None) == (config in FIXED_OUTPUT)
    regions = ("pass1_size", "pass1_roi_start", "pass1_roi_end", "pass2_roi_start", "pass2_roi_end")
    if not recipe.two_passes:
        regions = ("roi_start", "roi_end")
    if fixed is not None:
        assert np.array_equal(sizes, np.broadcast_to(np.float32(fixed), sizes.shape))
        assert geometry_rows(recipe) == regions
    else:
        assert len(np.unique(sizes, axis=0)) > 1
        assert geometry_rows(recipe) == pass_inputs(recipe) and geometry_rows(recipe)[-len(regions):] == regions


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_two_passes_split_the_fused_region_by_axis(config):
    """Pass 1 resizes the fused region on the axis PIL resizes first (the width, or the height where Pillow goes
    height first), over a band of whole pixels of the other axis that covers what pass 2's filter reaches (2 output
    pixels either side, in input pixels where it downscales) and stays in the image; pass 2 resizes the region on
    the other axis, counted from the band's first pixel, over all of pass 1's output on the first. A bilinear recipe
    resizes in one pass, with the fused region itself."""
    recipe = _recipe(config)
    hw = np.array(_sizes(), dtype=np.int64)
    h, w = hw.T
    fused, g = recipe.geometry(h, w), recipe.pass_geometry(h, w)
    assert set(g) == set(pass_inputs(recipe))
    assert recipe.two_passes == (recipe.interpolation == "bicubic")
    if not recipe.two_passes:
        assert all(np.array_equal(g[k].view(np.uint32), fused[k].view(np.uint32)) for k in fused)
        return
    assert all(a.dtype == np.float32 and a.shape == (len(hw), 2) for a in g.values())
    assert np.array_equal(g["resize_size"], fused["resize_size"])
    rh, rw = resized_size(h, w, recipe)
    resized = np.stack([rh, rw], 1)
    height_first = pillow_resizes_height_first(h, w, rh, rw)
    assert height_first.any() and not height_first.all()
    for first_axis, which in ((1, ~height_first), (0, height_first)):  # width first, then height first
        band_axis = 1 - first_axis
        size1, start1, end1 = (g[k][which] for k in ("pass1_size", "pass1_roi_start", "pass1_roi_end"))
        start2, end2 = g["pass2_roi_start"][which], g["pass2_roi_end"][which]
        length, out = hw[which], fused["resize_size"][which]
        # the first axis: the fused region and output length in pass 1, then all of it at scale 1 in pass 2
        for a, b in ((start1, "roi_start"), (end1, "roi_end"), (size1, "resize_size")):
            assert np.array_equal(a[:, first_axis].view(np.uint32), fused[b][which][:, first_axis].view(np.uint32))
        assert (start2[:, first_axis] == 0).all() and np.array_equal(end2[:, first_axis], out[:, first_axis])
        # the other axis: a band of whole pixels in pass 1, copied (size = its length), the region in pass 2
        first, last = start1[:, band_axis].astype(np.float64), end1[:, band_axis].astype(np.float64)
        assert np.array_equal(size1[:, band_axis], last - first)
        assert np.array_equal(first, np.floor(first)) and np.array_equal(last, np.floor(last))
        n = length[:, band_axis]
        assert (0 <= first).all() and (first < last).all() and (last <= n).all()
        start = start2[:, band_axis] + first
        end = end2[:, band_axis] + first
        assert np.allclose(start, fused["roi_start"][which][:, band_axis], rtol=2e-7, atol=1e-5)
        assert np.allclose(end, fused["roi_end"][which][:, band_axis], rtol=2e-7, atol=1e-5)
        reach = 2 * np.maximum(n / resized[which][:, band_axis], 1)
        assert ((first <= start - reach) | (first == 0)).all()
        assert ((last >= end + reach) | (last == n)).all()
        assert (last - first <= end - start + 2 * reach + 6).all()  # no more than that


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_pass_one_makes_no_intermediate_far_larger_than_the_image_or_the_output(config):
    """PIL's order keeps pass 1's output (its size, pixels) within a few times the image's own size or the output's,
    whatever the shape: width first, the band of rows is never more than the image's and the width shrinks or the
    rows are few; height first (where the height shrinks most: tall narrow images, squashed), the columns are never
    widened before the height has shrunk. Always widening first, a 1 x 1,000,000 image squashed to 266 x 266 made
    pass 1 write 240 million pixels."""
    recipe = _recipe(config)
    rng = np.random.default_rng(3)
    hw = np.array(_sizes() + [(1_000_000, 1), (179_000_000, 1), (1, 179_000_000), (100_000, 3), (3, 100_000),
                              (40_000, 200), (200, 40_000), (30_000, 30_000)], dtype=np.int64)
    hw = np.concatenate([hw, rng.integers(1, 20_000, size=(2000, 2))])
    h, w = hw.T
    g = recipe.pass_geometry(h, w)
    pass1 = g.get("pass1_size", g["resize_size"]).astype(np.float64).prod(axis=1)
    ch, cw = recipe.crop_size
    bound = 4 * np.maximum(h * w, ch * cw)
    worst = np.argmax(pass1 / bound)
    assert (pass1 <= bound).all(), f"pass 1 writes {pass1[worst]:.3g} pixels for a {h[worst]}x{w[worst]} image"


def test_squash_pass_one_makes_no_intermediate_far_larger_than_the_image():
    """Squashed, every row of the image is needed: width first, pass 1 widened each of them to the crop width, and a
    1 x 1,000,000 image (a 17 kB deflate TIFF of 4,000,000 rows: 2.5 GB of extra RSS and 27 s on the CPU; 1 x 179M
    is within max_image_pixels: ~130 GB) was a decompression bomb. Pillow resizes such an image height first, and so
    does the graph."""
    recipe = PreprocessRecipe.from_data_config(SQUASH)
    h, w = 1_000_000, 1
    g = recipe.pass_geometry(np.array([h]), np.array([w]))
    pass1_pixels = float(np.prod(g["pass1_size"][0].astype(np.float64)))
    ch, cw = recipe.crop_size
    assert pass1_pixels <= 4 * max(h * w, ch * cw), f"pass 1 writes {pass1_pixels:.3g} pixels for a {h * w}-pixel image"


def _pillow_pass_order(img: Image.Image, size: tuple[int, int]) -> str:
    """Which order Pillow's own resize of `img` to (w, h) ran its passes in: 'width first' or 'height first'."""
    w, h = img.size
    once = np.asarray(img.resize(size, Image.BICUBIC))
    width_first = np.asarray(img.resize((size[0], h), Image.BICUBIC).resize(size, Image.BICUBIC))
    height_first = np.asarray(img.resize((w, size[1]), Image.BICUBIC).resize(size, Image.BICUBIC))
    return {(True, False): "width first", (False, True): "height first"}.get(
        (np.array_equal(once, width_first), np.array_equal(once, height_first)), "neither/both")


def test_pillows_order_of_the_passes_is_the_installed_pillows():
    """`pillow_resizes_height_first` against the installed Pillow itself: on a random black-and-white image (where
    the 8-bit intermediate of the two orders differs), PIL's one-call resize equals exactly one of its own two-call
    resizes, width then height or height then width, and the rule names that one. A Pillow that decides otherwise
    fails here."""
    rng = np.random.default_rng(7)
    checked = {True: 0, False: 0}
    shapes = [(500, 375, 266, 266), (1000, 300, 783, 235), (375, 500, 266, 266), (300, 1000, 235, 783),
              (100, 40, 30, 20), (100, 40, 30, 5)]
    for _ in range(300):
        in_h, in_w = (int(x) for x in rng.integers(2, 300, size=2))
        out_h, out_w = (int(x) for x in rng.integers(2, 300, size=2))
        shapes.append((in_h, in_w, out_h, out_w))
    for in_h, in_w, out_h, out_w in shapes:
        if in_h == out_h or in_w == out_w:
            continue  # Pillow then runs one pass: no order to tell
        img = Image.fromarray(np.uint8(255 * rng.integers(0, 2, (in_h, in_w)))).convert("RGB")
        order = _pillow_pass_order(img, (out_w, out_h))
        expected = bool(pillow_resizes_height_first(in_h, in_w, out_h, out_w))
        assert order == ("height first" if expected else "width first"), (in_h, in_w, out_h, out_w, order)
        checked[expected] += 1
    assert min(checked.values()) > 30, checked  # both orders seen, many times


def _dali_anchor(pos, size, crop) -> np.ndarray:
    """crop_mirror_normalize's anchor: std::roundf(float pos * (size - crop)), float32 product."""
    x = (np.float32(pos) * np.asarray(size - crop, dtype=np.float32)).astype(np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


@pytest.mark.parametrize("crop", [1, 2, 3, 7, 160, 224, 225, 256, 384, 448, 518, 1024, 1536, 2048, 4096, 8192])
def test_one_crop_position_pads_every_size_like_torchvision(crop):
    """The resized axis reaches crop_mirror_normalize as exactly the crop (no padding) or shorter, r < crop: for
    every such r, the single relative position gives torchvision's left pad."""
    recipe = PreprocessRecipe(input_size=(3, crop, max(1, crop // 2)), interpolation="bicubic", crop_pct=1.0,
                              crop_mode="center", mean=(0.5,) * 3, std=(0.5,) * 3)
    r = np.arange(1, crop + 1)
    assert 0.0 <= recipe.pad_crop_pos <= 1.0  # DALI's allowed range
    assert np.array_equal(_dali_anchor(recipe.pad_crop_pos, r, crop), -((crop - r) // 2))
    assert np.array_equal(_dali_anchor(recipe.pad_crop_pos, r, crop), crop_anchor(r, crop))


@pytest.mark.parametrize("config", sorted(GEOMETRY_CONFIGS))
def test_geometry_arguments_are_the_old_graphs_bit_for_bit(config):
    """The host geometry computes the very float32 arguments that the in-graph geometry (before issue #11) handed
    its one fn.resize (`pass_geometry` splits them between two passes where the recipe resizes in two), and
    crop_mirror_normalize lands on the same anchors."""
    from nvidia.dali import fn, pipeline_def, types

    from bench.old_geometry import old_geometry

    recipe = _recipe(config)
    hw = _sizes()

    @pipeline_def(batch_size=len(hw), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def graph():
        h = fn.external_source(name="h", dtype=types.INT64, ndim=0)
        w = fn.external_source(name="w", dtype=types.INT64, ndim=0)
        old = old_geometry(h, w, recipe)
        return tuple(old[k] for k in ("resize_y", "resize_x", "roi_start", "roi_end", "crop_pos_x", "crop_pos_y"))

    pipe = graph()
    pipe.build()
    h, w = np.array(hw).T
    pipe.feed_input("h", h.astype(np.int64))
    pipe.feed_input("w", w.astype(np.int64))
    oy, ox, start, end, px, py = (np.array(o.as_tensor()) for o in pipe.run())
    new = recipe.geometry(h, w)
    for name, a, b in (("resize_y", new["resize_size"][:, 0], oy), ("resize_x", new["resize_size"][:, 1], ox),
                       ("roi_start", new["roi_start"], start), ("roi_end", new["roi_end"], end)):
        assert a.dtype == b.dtype == np.float32, name
        assert np.array_equal(a.view(np.uint32), b.reshape(a.shape).view(np.uint32)), name
    for pos, size, crop in ((px, ox, recipe.crop_size[1]), (py, oy, recipe.crop_size[0])):
        size = size.reshape(-1).astype(np.int64)
        assert np.array_equal(_dali_anchor(pos.reshape(-1), size, crop), _dali_anchor(recipe.pad_crop_pos, size, crop))


# ---------------------------------------------------------------------------------------------------------------
# pixels: parity with timm's create_transform on photographs

PARITY_CONFIGS = {
    "center_bicubic_pct0.95": ("resnet18.a1_in1k", {}),
    "center_bicubic_pct0.875": ("resnet18.a1_in1k", {"crop_pct": 0.875}),
    "center_bicubic_pct1.0": ("mambaout_femto.in1k", {}),
    "center_bilinear_pct0.875": ("dla34.in1k", {}),
    "center_pct1.15_zero_pad": ("volo_d4_448.sail_in1k", {}),
    "center_nonsquare": ("resnet18.a1_in1k", {"input_size": (3, 160, 224)}),
    "squash_pct0.9": ("tf_efficientnetv2_b3.in21k_ft_in1k", {}),
    "squash_bilinear_1024x768": ("vit_base_patch16_sapiens2.fb", {}),
    "border_pct1.0": ("deepseek_vit_412m.deepseek_v4_flash_vision_exp", {}),
    "border_nonsquare_pct0.9": (
        "resnet18.a1_in1k",
        {"input_size": (3, 224, 160), "crop_mode": "border", "crop_pct": 0.9},
    ),
}


@pytest.mark.parametrize("config", sorted(PARITY_CONFIGS))
def test_pixels_match_timm_create_transform(config):
    name, overrides = PARITY_CONFIGS[config]
    data_config = data_config_of(name, **overrides)
    recipe = PreprocessRecipe.from_data_config(data_config)
    imgs = photos()
    out = run_graph(recipe, list(imgs.values()))
    assert out.shape == (len(imgs), *recipe.input_size) and out.dtype == np.float32
    mads = {}
    for i, (key, data) in enumerate(imgs.items()):
        ref = timm_reference(data, data_config).numpy()
        assert ref.shape == out[i].shape
        mads[key] = float(np.abs(out[i] - ref).mean())
    # Decoders and resamplers differ by rounding only (PIL resamples in fixed point with an 8-bit intermediate):
    # a one-pixel shift or a wrong pad value would be > 0.02 here.
    assert max(mads.values()) < 0.01, mads
    assert np.mean(list(mads.values())) < 0.005, mads


def graphics() -> dict[str, bytes]:
    """Hard black-and-white edges, lossless, each at a size that is downscaled, one that is upscaled and a wide one:
    where a resampler's overshoot is largest, and where PIL clips it (to 8 bits, between its two passes)."""
    rng = np.random.default_rng(0)
    out = {}
    for w, h in ((500, 375), (97, 131), (1000, 300), (375, 500), (300, 1000)):  # the last two: PIL height first
        yy, xx = np.mgrid[0:h, 0:w]
        cell = max(2, min(w, h) // 25)
        blocks = np.kron(rng.integers(0, 2, (h // cell + 1, w // cell + 1)), np.ones((cell, cell)))[:h, :w]
        # 1-pixel lines in a frame of plain white, as round a QR code: where a filter reaches past the image's
        # edge, PIL leaves those taps out and DALI repeats the edge pixel (another difference, README.md)
        quiet = max(w, h) // 20
        lines = (yy % 4 == 2) | (xx % 5 == 2)
        lines[:quiet], lines[-quiet:], lines[:, :quiet], lines[:, -quiet:] = 1, 1, 1, 1
        wave = 0.5 + 0.5 * np.sin(xx / 17.0) * np.cos(yy / 11.0)
        text = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(text)
        font = ImageFont.load_default(size=max(8, h // 12))
        for i, y in enumerate(range(2, h, max(10, h // 10))):
            draw.text((3, y), f"The quick brown fox {i} jumps over 0123456789", fill="black", font=font)
        out[f"qr_blocks_{w}x{h}.png"] = _encode(Image.fromarray(np.uint8(255 * blocks)).convert("RGB"), "PNG")
        out[f"lines_{w}x{h}.png"] = _encode(Image.fromarray(np.uint8(255 * lines)).convert("RGB"), "PNG")
        out[f"text_{w}x{h}.png"] = _encode(text, "PNG")
        dithered = Image.fromarray(np.uint8(255 * wave)).convert("1")  # Floyd-Steinberg, 1 bit per pixel
        out[f"dithered_1bit_{w}x{h}.png"] = _encode(dithered, "PNG")
        assert Image.open(io.BytesIO(out[f"dithered_1bit_{w}x{h}.png"])).mode == "1"
    return out


@pytest.mark.parametrize("config", sorted(PARITY_CONFIGS))
def test_hard_edges_match_timm_create_transform(config):
    """Bicubic overshoots at a black-and-white edge; PIL resizes one axis, rounds and clips to 8 bits, then
    resizes the other (the width first, or the height for some portrait graphics here), and the graph does the
    same. Resized in one pass in float, the overshoot kept, these agreed to 0.998-0.999 cosine; in two, to 0.99997
    and better. Bilinear does not overshoot, and one pass agrees to 0.99998 and better."""
    name, overrides = PARITY_CONFIGS[config]
    data_config = data_config_of(name, **overrides)
    recipe = PreprocessRecipe.from_data_config(data_config)
    imgs = graphics()
    out = run_graph(recipe, list(imgs.values()))
    cosines, mads = {}, {}
    for i, (key, data) in enumerate(imgs.items()):
        ref = timm_reference(data, data_config).numpy().ravel().astype(np.float64)
        got = out[i].ravel().astype(np.float64)
        cosines[key] = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
        mads[key] = float(np.abs(got - ref).mean())
    assert min(cosines.values()) >= 0.9999, cosines
    assert max(mads.values()) < 0.004, mads


def _lines(h: int, w: int) -> Image.Image:
    """`graphics()`'s 1-px lines in a white frame."""
    yy, xx = np.mgrid[0:h, 0:w]
    lines = (yy % 5 == 2) | (xx % 4 == 2)
    quiet = max(w, h) // 20
    lines[:quiet], lines[-quiet:], lines[:, :quiet], lines[:, -quiet:] = 1, 1, 1, 1
    return Image.fromarray(np.uint8(255 * lines)).convert("RGB")


def _dithered(h: int, w: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    wave = 0.5 + 0.5 * np.sin(yy / 17.0) * np.cos(xx / 11.0)
    return Image.fromarray(np.uint8(255 * wave)).convert("1")


@pytest.mark.parametrize(
    "cfg,img,resized",
    [
        # squash: a 375 x 500 portrait graphic, resized to 266 x 266 (then cropped to 240): Pillow height first
        pytest.param(SQUASH, _lines(500, 375), (266, 266), id="squash_lines_375x500"),
        # center: a 300 x 1000 portrait 1-bit graphic, resized to 235 x 783 (then cropped to 224): Pillow height first
        pytest.param(CENTER, _dithered(1000, 300), (235, 783), id="center_dithered_300x1000"),
    ],
)
def test_portrait_hard_edges_match_timm_where_pillow_resizes_the_height_first(cfg, img, resized):
    """Pillow 13 resizes these portrait images height first (checked here). Resized width first, as the graph did
    for every image, the 8-bit intermediate was not PIL's: cosine 0.9958 (squash) and 0.9983 (center), max |diff|
    0.18 and 0.33 in normalized units, worse than one pass in float (0.9988 and 0.9987)."""
    data = _encode(img, "PNG")
    assert _pillow_pass_order(img.convert("RGB"), resized) == "height first"
    recipe = PreprocessRecipe.from_data_config(cfg)
    got = run_graph(recipe, [data])[0].ravel().astype(np.float64)
    ref = timm_reference(data, cfg).numpy().ravel().astype(np.float64)
    cos = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos >= 0.9999, (cos, float(np.abs(got - ref).max()))


@pytest.mark.parametrize("config", ["center_bicubic_pct0.95", "squash_pct0.9", "center_bilinear_pct0.875"])
def test_a_constant_output_size_gives_the_pixels_of_per_sample_sizes(config, monkeypatch):
    """Where the output size is a constant of the graph (center crop_pct <= 1, squash), the pixels are those of the
    same graph fed every size per sample."""
    name, overrides = PARITY_CONFIGS[config]
    recipe = PreprocessRecipe.from_data_config(data_config_of(name, **overrides))
    imgs = list(photos().values()) + list(graphics().values())
    constant = run_graph(recipe, imgs)
    assert recipe.fixed_output_size
    monkeypatch.setattr(PreprocessRecipe, "fixed_output_size", property(lambda self: None))
    assert len(recipe.source_geometry(np.array([[100, 200]]))[0]) == len(pass_inputs(recipe))
    assert np.array_equal(run_graph(recipe, imgs), constant)


@pytest.mark.parametrize("config", ["center_bilinear_pct0.875", "squash_bilinear_1024x768"])
def test_bilinear_pixels_are_the_one_pass_graphs_bit_for_bit(config):
    """A bilinear recipe resizes in one pass, as the graph did before PIL's two passes came in for bicubic (and as
    the one before issue #11, which computed every argument per sample): the same pixels."""
    name, overrides = PARITY_CONFIGS[config]
    recipe = PreprocessRecipe.from_data_config(data_config_of(name, **overrides))
    imgs = list(photos().values()) + list(graphics().values())
    assert not recipe.two_passes
    assert np.array_equal(run_graph(recipe, imgs), run_graph(recipe, imgs, old=True))


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_an_axis_at_scale_one_is_copied_exactly(interpolation):
    """A pass leaves its other axis at scale 1 over whole pixels: pass 1 takes a band of whole rows (width first) or
    of whole columns (height first), its size the band's length, pass 2 all of pass 1's output on that axis. DALI
    filters such an axis all the same (it has no shortcut for it), and the filter's weights at whole-pixel offsets
    copy each pixel exactly, rows or columns."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 53), (500, 375), (7, 1000), (1, 1))]
    rows = [(3, 30), (100, 401), (0, 7), (0, 1)]
    kind = getattr(types, INTERPOLATIONS[interpolation])

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def graph():
        x = fn.external_source(name="x", dtype=types.UINT8, ndim=3, layout="HWC")
        start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)
        end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        args = dict(roi_start=start, roi_end=end, interp_type=kind, antialias=True, subpixel_scale=False)
        return fn.resize(x, size=[0.0, 0.0], mode="stretch", **args), fn.resize(x, size=size, **args)

    pipe = graph()
    pipe.build()
    pipe.feed_input("x", imgs)
    pipe.feed_input("start", [np.float32([r0, 0]) for r0, _ in rows])
    pipe.feed_input("end", [np.float32([r1, im.shape[1]]) for (_, r1), im in zip(rows, imgs)])
    pipe.feed_input("size", [np.float32([r1 - r0, im.shape[1]]) for (r0, r1), im in zip(rows, imgs)])
    for out in pipe.run():
        for i, ((r0, r1), im) in enumerate(zip(rows, imgs)):
            assert np.array_equal(np.array(out[i]), im[r0:r1])
    # the same with bands of columns: the images transposed
    imgs = [np.ascontiguousarray(im.transpose(1, 0, 2)) for im in imgs]
    pipe = graph()
    pipe.build()
    pipe.feed_input("x", imgs)
    pipe.feed_input("start", [np.float32([0, c0]) for c0, _ in rows])
    pipe.feed_input("end", [np.float32([im.shape[0], c1]) for (_, c1), im in zip(rows, imgs)])
    pipe.feed_input("size", [np.float32([im.shape[0], c1 - c0]) for (c0, c1), im in zip(rows, imgs)])
    _, out = pipe.run()
    for i, ((c0, c1), im) in enumerate(zip(rows, imgs)):
        assert np.array_equal(np.array(out[i]), im[:, c0:c1])


@pytest.mark.parametrize("config", ["center_bicubic_pct0.875", "center_pct1.15_zero_pad", "squash_pct0.9",
                                    "border_nonsquare_pct0.9"])
def test_pass_one_resizes_only_the_rows_that_pass_two_reads(config):
    """Pass 1 resizing every row (width first) or every column (height first) of the image gives the same pixels,
    but for float32 rounding of the region's start and end (now counted from pixel 0), which moves a rounding tie
    here and there by one 8-bit level. A band too narrow for pass 2's filter would change pixels by several levels
    near the crop's edges."""
    name, overrides = PARITY_CONFIGS[config]
    recipe = PreprocessRecipe.from_data_config(data_config_of(name, **overrides))
    imgs = list(photos().values()) + list(graphics().values())
    sizes = np.array([image_size(b) for b in imgs])
    fused = recipe.geometry(sizes[:, 0], sizes[:, 1])
    g = recipe.pass_geometry(sizes[:, 0], sizes[:, 1])
    rh, rw = resized_size(sizes[:, 0], sizes[:, 1], recipe)
    band = np.where(pillow_resizes_height_first(sizes[:, 0], sizes[:, 1], rh, rw), 1, 0)  # the banded axis
    assert band.sum() > 0 or config == "center_pct1.15_zero_pad"  # that one upscales: width first throughout
    i = np.arange(len(sizes))
    g["pass1_roi_start"][i, band] = 0
    g["pass1_roi_end"][i, band] = sizes[i, band]
    g["pass1_size"][i, band] = sizes[i, band]
    g["pass2_roi_start"][i, band] = fused["roi_start"][i, band]
    g["pass2_roi_end"][i, band] = fused["roi_end"][i, band]
    restricted, whole = run_graph(recipe, imgs), run_graph(recipe, imgs, rows=stack_geometry(g, recipe))
    level = 1 / 255 / min(recipe.std)
    assert np.abs(restricted - whole).max() <= level * 1.001
    assert np.mean(restricted != whole) < 1e-3


@pytest.mark.parametrize("config", ["center_bicubic_pct0.95", "center_pct1.15_zero_pad", "squash_pct0.9"])
def test_half_output_is_the_float32_output_rounded_once(config):
    """What a GPU worker with a 16-bit model is fed: every value the float32 one, rounded to nearest (padding too)."""
    name, overrides = PARITY_CONFIGS[config]
    recipe = PreprocessRecipe.from_data_config(data_config_of(name, **overrides))
    imgs = list(photos().values())
    full, half = run_graph(recipe, imgs), run_graph(recipe, imgs, half=True)
    assert half.dtype == np.float16 and half.shape == full.shape
    assert np.array_equal(half.view(np.uint16), full.astype(np.float16).view(np.uint16))


def test_gray_comes_out_as_three_equal_channels():
    recipe = PreprocessRecipe.from_data_config(data_config_of("resnet18.a1_in1k"))
    out = run_graph(recipe, [photos()["camera_gray.png"]])[0]
    pixels = out * np.array(recipe.std)[:, None, None] + np.array(recipe.mean)[:, None, None]
    assert np.abs(pixels[0] - pixels[1]).max() < 1e-5 and np.abs(pixels[0] - pixels[2]).max() < 1e-5
    assert pixels.std() > 0.1  # a real picture, not a constant


def test_exif_orientation_is_applied():
    recipe = PreprocessRecipe.from_data_config(data_config_of("resnet18.a1_in1k"))
    base = Image.fromarray(skimage_data.chelsea()).resize((400, 300))
    tagged = photos()["chelsea_exif6.jpg"]
    upright = _encode(base.transpose(Image.Transpose.ROTATE_270), "PNG")  # what orientation 6 means
    sideways = _encode(base, "PNG")
    a, b, c = run_graph(recipe, [tagged, upright, sideways])
    upright_mad, sideways_mad = np.abs(a - b).mean(), np.abs(a - c).mean()
    assert upright_mad < 0.06  # a JPEG (quality 75) vs a PNG of the same upright picture
    assert sideways_mad > 5 * upright_mad  # and clearly not the unrotated one
