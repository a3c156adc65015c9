"""wdsembed.imagesize against DALI's own fn.peek_image_shape(adjust_orientation=True) and decoded shapes (CPU)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from wdsembed.imagesize import UnreadableImage, image_size, image_sizes

pytest.importorskip("nvidia.dali")
skimage_data = pytest.importorskip("skimage.data")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()  # b"Exif\0\0" + TIFF block (Pillow strips the prefix for PNG and WebP)


def _ifd(entries: list[tuple[int, int, int, bytes]], *, le: bool = True, extra: bytes = b"") -> bytes:
    """A raw EXIF/TIFF block: header, IFD0 with (tag, type, count, 4-byte value) entries, then `extra`."""
    o = "<" if le else ">"
    head = (b"II" if le else b"MM") + struct.pack(o + "HI", 42, 8)
    body = struct.pack(o + "H", len(entries))
    for tag, kind, count, value in entries:
        body += struct.pack(o + "HHI", tag, kind, count) + value.ljust(4, b"\0")
    return head + body + struct.pack(o + "I", 0) + extra


def _short(v: int, le: bool = True) -> bytes:
    return struct.pack("<H" if le else ">H", v)


def _orient(v: int, le: bool = True) -> tuple[int, int, int, bytes]:
    return (0x0112, 3, 1, _short(v, le))


def _jpeg_segments(jpeg: bytes, *, after_soi: bytes = b"", before_sos: bytes = b"") -> bytes:
    sos = jpeg.index(b"\xff\xda")
    return jpeg[:2] + after_soi + jpeg[2:sos] + before_sos + jpeg[sos:]


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with(png: bytes, chunk: bytes, *, at_end: bool = False) -> bytes:
    cut = png.index(b"IEND") - 4 if at_end else 33
    return png[:cut] + chunk + png[cut:]


def _webp_vp8x(simple: bytes, w: int, h: int, exif: bytes, *, flags: int = 0x08, before: bytes = b"") -> bytes:
    """A VP8X container around a simple (VP8/VP8L) WebP's image chunk, with an EXIF chunk after it and the raw
    chunks `before` ahead of the image."""
    image_chunk = before + simple[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + \
        (h - 1).to_bytes(3, "little")
    chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif + (b"\0" if len(exif) % 2 else b"")
    body = b"WEBP" + vp8x + image_chunk + chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


def corpus() -> dict[str, bytes]:
    """Every format DALI decodes, all 8 orientations where a format carries EXIF, odd sizes, color modes, real
    photographs, and EXIF blocks that DALI's EXIF reader accepts or rejects for particular reasons."""
    d = skimage_data
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))  # 61 wide, 37 high: odd, not square
    out: dict[str, bytes] = {}
    for o in range(1, 9):
        ex = _exif(o)
        out[f"jpeg_o{o}"] = _encode(base, "JPEG", exif=ex)
        out[f"jpeg_progressive_o{o}"] = _encode(base, "JPEG", exif=ex, progressive=True)
        out[f"png_o{o}"] = _encode(base, "PNG", exif=ex)
        out[f"webp_lossy_o{o}"] = _encode(base, "WEBP", exif=ex, quality=80)
        out[f"webp_lossless_o{o}"] = _encode(base, "WEBP", exif=ex, lossless=True)
        out[f"tiff_o{o}"] = _encode(base, "TIFF", tiffinfo={274: o})
        out[f"tiff_be_o{o}"] = _encode(base.convert("L"), "TIFF", tiffinfo={274: o}, compression="raw")
    for w, h in ((1, 1), (1, 300), (300, 1), (2, 3), (640, 427), (427, 640), (1000, 17)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for fmt, kw in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                        ("PPM", {}), ("TIFF", {}), ("JPEG2000", {}), ("JPEG2000", {"no_jp2": True})):
            out[f"{fmt.lower()}{'_'.join(map(str, kw))}_{w}x{h}"] = _encode(img, fmt, **kw)
    # color modes and variants
    photo = Image.fromarray(d.coffee()).resize((301, 199))
    out["jpeg_gray"] = _encode(photo.convert("L"), "JPEG")
    out["jpeg_cmyk"] = _encode(photo.convert("CMYK"), "JPEG")
    out["jpeg_444"] = _encode(photo, "JPEG", subsampling=0)
    out["png_gray"] = _encode(photo.convert("L"), "PNG")
    out["png_palette"] = _encode(photo.convert("P"), "PNG")
    out["png_rgba"] = _encode(photo.convert("RGBA"), "PNG")
    out["png_la"] = _encode(photo.convert("LA"), "PNG")
    out["png_16bit_gray"] = _encode(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG")
    out["png_1bit"] = _encode(photo.convert("1"), "PNG")
    out["webp_alpha"] = _encode(photo.convert("RGBA"), "WEBP")
    out["bmp_palette"] = _encode(photo.convert("P"), "BMP")
    out["bmp_gray"] = _encode(photo.convert("L"), "BMP")
    out["pgm"] = _encode(photo.convert("L"), "PPM")
    out["pbm"] = _encode(photo.convert("1"), "PPM")
    out["ppm_comment"] = b"P6\n# a comment\n301 # width\n199\n255\n" + photo.tobytes()
    out["pgm_ascii"] = b"P2 4 3 255\n" + b" ".join(b"%d" % v for v in range(12)) + b"\n"
    out["tiff_palette"] = _encode(photo.convert("P"), "TIFF")
    out["tiff_jpeg"] = _encode(photo, "TIFF", compression="jpeg")
    out["tiff_lzw"] = _encode(photo, "TIFF", compression="tiff_lzw")
    frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["webp_animated"] = buf.getvalue()
    # real photographs, as the parity tests use them
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field"):
        img = Image.fromarray(getattr(d, name)())
        out[f"photo_{name}.jpg"] = _encode(img, "JPEG", quality=90)
        out[f"photo_{name}.png"] = _encode(img, "PNG")
        out[f"photo_{name}_exif6.jpg"] = _encode(img, "JPEG", exif=_exif(6))
    # EXIF blocks read (or rejected) the way nvImageCodec's EXIF reader does
    plain_jpeg = _encode(base, "JPEG")
    plain_png = _encode(base, "PNG")
    lossy = _encode(base, "WEBP", quality=80)
    blocks = {
        "ok6": _ifd([_orient(6)]),
        "ok6_be": _ifd([_orient(6, le=False)], le=False),
        "bad_string_after": _ifd([_orient(6), (0x010F, 2, 40, struct.pack("<I", 5000))]),  # Make out of bounds
        "bad_string_before": _ifd([(0x010F, 2, 40, struct.pack("<I", 5000)), _orient(6)]),
        "short_string_ok": _ifd([(0x010F, 2, 3, b"ab\0"), _orient(8)]),
        "bad_rational": _ifd([_orient(5), (0x011A, 5, 1, struct.pack("<I", 999))]),
        "good_rational": _ifd([_orient(7), (0x011A, 5, 1, struct.pack("<I", 38))], extra=struct.pack("<II", 72, 1)),
        "two_orientations": _ifd([_orient(6), _orient(1)]),
        "orientation_9": _ifd([_orient(9)]),
        "orientation_0": _ifd([_orient(0)]),
        "no_orientation": _ifd([(0x0128, 3, 1, _short(2))]),
        "unknown_tags_only": _ifd([(0x9999, 3, 1, _short(6))]),
        "wrong_mark": b"II\x2b\x00" + _ifd([_orient(6)])[4:],
        "mixed_byte_order": b"IM" + _ifd([_orient(6, le=False)], le=False)[2:],
        "ifd_out_of_bounds": b"II\x2a\x00" + struct.pack("<I", 4000) + b"\0" * 20,
        "cut_in_entry": _ifd([_orient(6), (0x0128, 3, 1, _short(2))])[:30],
    }
    for name, block in blocks.items():
        out[f"exif_jpeg_{name}"] = _jpeg_segments(plain_jpeg, after_soi=_app1(b"Exif\0\0" + block))
        out[f"exif_png_{name}"] = _png_with(plain_png, _png_chunk(b"eXIf", block))
        out[f"exif_webp_{name}"] = _webp_vp8x(lossy, 61, 37, block)
    # where the EXIF sits
    xmp = _app1(b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>")
    out["exif_jpeg_after_xmp"] = _jpeg_segments(plain_jpeg, after_soi=xmp + _app1(b"Exif\0\0" + blocks["ok6"]))
    out["exif_jpeg_after_sof"] = _jpeg_segments(plain_jpeg, before_sos=_app1(b"Exif\0\0" + blocks["ok6"]))
    out["exif_jpeg_two_blocks"] = _jpeg_segments(
        plain_jpeg, after_soi=_app1(b"Exif\0\0" + blocks["ok6"]), before_sos=_app1(b"Exif\0\0" + _ifd([_orient(3)])))
    out["exif_jpeg_two_blocks_agree"] = _jpeg_segments(
        plain_jpeg, after_soi=_app1(b"Exif\0\0" + blocks["ok6"]), before_sos=_app1(b"Exif\0\0" + _ifd([_orient(8)])))
    out["exif_jpeg_second_block_bad"] = _jpeg_segments(
        plain_jpeg, after_soi=_app1(b"Exif\0\0" + blocks["ok6"]), before_sos=_app1(b"Exif\0\0" + blocks["wrong_mark"]))
    out["exif_jpeg_fill_bytes"] = _jpeg_segments(plain_jpeg, after_soi=b"\xff\xff" + _app1(b"Exif\0\0" + blocks["ok6"]))
    out["exif_png_after_idat"] = _png_with(plain_png, _png_chunk(b"eXIf", blocks["ok6"]), at_end=True)
    out["exif_png_two_chunks"] = _png_with(_png_with(plain_png, _png_chunk(b"eXIf", blocks["ok6"])),
                                           _png_chunk(b"eXIf", _ifd([_orient(3)])), at_end=True)
    out["exif_png_two_chunks_agree"] = _png_with(_png_with(plain_png, _png_chunk(b"eXIf", blocks["ok6"])),
                                                 _png_chunk(b"eXIf", _ifd([_orient(8)])), at_end=True)
    out["exif_png_no_orientation_then_turned"] = _png_with(
        _png_with(plain_png, _png_chunk(b"eXIf", blocks["no_orientation"])), _png_chunk(b"eXIf", blocks["ok6"]),
        at_end=True)
    out["exif_webp_flag_off"] = _webp_vp8x(lossy, 61, 37, blocks["ok6"], flags=0)
    out["exif_webp_with_prefix"] = _webp_vp8x(lossy, 61, 37, b"Exif\0\0" + blocks["ok6"])
    return out


# Images that DALI's CPU decoder turns otherwise than their shape says: a PNG eXIf chunk with a quarter turn that
# DALI's EXIF reader rejects, EXIF blocks or chunks that disagree on a quarter turn. Decoding one corrupts the heap
# and kills the process, or scrambles the pixels (DALI 2.4), so image_size refuses them and they are never decoded
# here (test_pipeline decodes them, each in a process of its own).
MISDECODED_BY_DALI = ("exif_png_bad_string_after", "exif_png_bad_rational", "exif_png_cut_in_entry",
                      "exif_jpeg_two_blocks", "exif_png_two_chunks", "exif_png_no_orientation_then_turned")


def dali_shapes(images: dict[str, bytes]) -> dict[str, tuple]:
    """name -> (peek_image_shape[:2], decoded shape[:2] or None) from DALI. The crafted EXIF cases are only
    peeked (see MISDECODED_BY_DALI); the shapes of decoded images are checked on every real one."""
    from nvidia.dali import fn, pipeline_def, types

    def run(names: list[str], decode: bool) -> list:
        @pipeline_def(batch_size=len(names), num_threads=1, device_id=None, prefetch_queue_depth=1)
        def graph():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            peek = fn.peek_image_shape(enc, adjust_orientation=True)
            return (peek, fn.decoders.image(enc, output_type=types.RGB).shape()) if decode else (peek,)

        pipe = graph()
        pipe.build()
        pipe.feed_input("enc", [np.frombuffer(images[n], np.uint8) for n in names])
        outs = pipe.run()
        return [[tuple(int(x) for x in np.array(o[i])[:2]) for o in outs] for i in range(len(names))]

    real = [n for n in images if not n.startswith("exif_")]
    crafted = [n for n in images if n.startswith("exif_")]
    shapes = dict(zip(real, run(real, decode=True)))
    shapes.update((n, (s[0], None)) for n, s in zip(crafted, run(crafted, decode=False)))
    return shapes


def test_sizes_match_dali_peek_image_shape_and_decoder():
    images = corpus()
    dali = dali_shapes(images)
    for name, data in images.items():
        peek, decoded = dali[name]
        if decoded is not None:
            assert peek == decoded, name
        if name in MISDECODED_BY_DALI:
            with pytest.raises(UnreadableImage, match="refused, DALI's decoder crashes on it"):
                image_size(data)
            continue
        assert image_size(data) == peek, f"{name}: ours {image_size(data)}, DALI {peek}"
        assert image_size(memoryview(data)) == peek, name
        assert image_size(bytearray(data)) == peek, name
    # every orientation of every format that carries one was decoded and checked
    assert all(dali[f"{f}_o{o}"][1] is not None for f in ("jpeg", "png", "webp_lossy", "tiff") for o in range(1, 9))


def test_what_dali_rotates():
    """The cases above, spelled out: which EXIF blocks turn the image (61x37 stored) for DALI and so for us."""
    images = corpus()
    turned = {n for n, data in images.items()
              if n.startswith("exif_") and n not in MISDECODED_BY_DALI and image_size(data) == (61, 37)}
    for fmt in ("jpeg", "png", "webp"):
        # "IM": byte orders that disagree are read big-endian
        for case in ("ok6", "ok6_be", "short_string_ok", "good_rational", "two_orientations", "mixed_byte_order"):
            assert f"exif_{fmt}_{case}" in turned, (fmt, case)
        for case in ("orientation_9", "orientation_0", "no_orientation", "unknown_tags_only", "wrong_mark",
                     "ifd_out_of_bounds", "bad_string_before"):
            assert f"exif_{fmt}_{case}" not in turned, (fmt, case)
    # an entry DALI's EXIF reader cannot read voids the whole block for JPEG (and PNG), not for WebP
    assert "exif_jpeg_bad_string_after" not in turned
    assert "exif_webp_bad_string_after" in turned
    # the last readable block (JPEG) or chunk (PNG) with an orientation wins (where they disagree on a quarter turn,
    # the image is refused: MISDECODED_BY_DALI); WebP reads its first EXIF chunk only
    assert "exif_jpeg_two_blocks_agree" in turned and "exif_png_two_chunks_agree" in turned
    assert "exif_jpeg_second_block_bad" in turned and "exif_jpeg_after_sof" in turned


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 7 + b"\x12\x34\x56\x78\x9a\xbc",
         "unreadable JPEG header: no marker at byte 20 (0x56)"),
        (b"\xff\xd8\xff\xe0", "unreadable JPEG header: no frame header (SOF)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "unreadable PNG header: no IHDR chunk"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "unreadable WebP header: bad VP8 sync code"),
        (b"BM\x00\x00", "unreadable BMP header"),
        (b"GIF89a" + b"\x00" * 20, "unreadable image header"),
        (b"<html></html>", "unreadable image header"),
        (b"", "unreadable image header"),
    ],
)
def test_unreadable_headers_raise_with_a_reason(data, reason):
    with pytest.raises(UnreadableImage, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
        image_size(data)


def test_zero_size_is_refused():
    jpeg = bytearray(_encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 7] = b"\x00\x00"  # height 0 (a DNL-defined height)
    with pytest.raises(UnreadableImage, match="JPEG header gives a size of 8x0 pixels"):
        image_size(bytes(jpeg))


def test_cut_short_after_the_header_still_gives_the_size():
    """The decoder names what is wrong with a truncated file; the size is known from its header."""
    jpeg = _encode(Image.fromarray(skimage_data.coffee()), "JPEG", exif=_exif(6))
    png = _encode(Image.fromarray(skimage_data.coffee()), "PNG")
    assert image_size(jpeg[:4000]) == (600, 400)
    assert image_size(png[:5000]) == (400, 600)


def test_what_dali_cannot_parse_still_gets_a_size_and_dali_names_the_failure():
    """A WebP whose EXIF chunk follows an odd-sized chunk: nvImageCodec walks chunks without RIFF's pad byte, loses
    its way and fails the image; the size is in the first chunk, so the image is fed and DALI's decoder reports it."""
    from nvidia.dali import fn, pipeline_def, types

    lossy = _encode(Image.new("RGB", (61, 37)), "WEBP")
    odd = b"XYZW" + struct.pack("<I", 3) + b"abc\0"
    data = _webp_vp8x(lossy, 61, 37, _ifd([_orient(6)]), before=odd)
    assert image_size(data) == (37, 61)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def graph():
        return fn.decoders.image(fn.external_source(name="enc", dtype=types.UINT8, ndim=1))

    pipe = graph()
    pipe.build()
    pipe.feed_input("enc", [np.frombuffer(data, np.uint8)])
    with pytest.raises(RuntimeError, match="nvImageCodec"):
        pipe.run()


def test_pillow_reads_what_the_fast_path_cannot():
    """Junk bytes between JPEG segments: nvImageCodec (and so the fast path) stops at them, Pillow skips them. The
    size comes from Pillow, and DALI's decoder decides whether it can decode the image."""
    jpeg = _encode(Image.new("RGB", (20, 10)), "JPEG", exif=_exif(8))
    dqt = jpeg.index(b"\xff\xdb")
    assert image_size(jpeg[:dqt] + b"\x00junk" + jpeg[dqt:]) == (20, 10)


def test_damaged_headers_give_a_size_or_a_reason_never_another_error():
    """Every corpus image cut short and with bytes overwritten: image_size returns a size or raises UnreadableImage."""
    rng = np.random.default_rng(1)
    outcomes = {"size": 0, "reason": 0}
    for name, data in corpus().items():
        for _ in range(20):
            b = bytearray(data[: int(rng.integers(0, min(len(data), 2000) + 1))])
            for i in rng.integers(0, max(len(b), 1), size=int(rng.integers(0, 4))):
                if i < len(b):
                    b[i] = int(rng.integers(0, 256))
            try:
                h, w = image_size(bytes(b))
            except UnreadableImage as e:
                assert str(e), name
                outcomes["reason"] += 1
            else:
                assert isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1, name
                outcomes["size"] += 1
    assert min(outcomes.values()) > 100, outcomes


def _one_at_a_time(datas) -> list:
    out = []
    for d in datas:
        try:
            out.append(image_size(d))
        except UnreadableImage as e:
            out.append(str(e))
    return out


def _as_a_batch(datas) -> list:
    sizes, reasons, _ = image_sizes(datas)
    return [reasons[i] if i in reasons else tuple(sizes[i].tolist()) for i in range(len(datas))]


def _same_layout_batch() -> tuple[list[bytes], list[bytes]]:
    """Photographs re-encoded at many sizes by one encoder (as img2dataset writes a shard): one header layout. And
    images spliced in among them that the batch walk must not settle: another layout, an EXIF turn, damage."""
    rng = np.random.default_rng(2)
    photo = Image.fromarray(skimage_data.astronaut())
    same = [_encode(photo.resize((int(rng.integers(1, 900)), int(rng.integers(1, 900)))), "JPEG", quality=85)
            for _ in range(40)]
    jpeg = same[0]
    sof, dht = jpeg.index(b"\xff\xc0"), jpeg.index(b"\xff\xc4")
    odd = [
        _encode(photo, "JPEG", exif=_exif(6)),  # turned: 512 wide, 512 high either way, so a non-square one too
        _encode(photo.resize((300, 200)), "JPEG", exif=_exif(6)),
        _encode(photo.resize((300, 200)), "JPEG", optimize=True),  # another layout (its own Huffman tables)
        _jpeg_segments(jpeg, before_sos=_app1(b"Exif\0\0" + _ifd([_orient(8)]))),  # EXIF after the frame
        _jpeg_segments(jpeg, after_soi=_app1(b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>")),
        jpeg[: dht + 3],  # cut short inside the header
        jpeg[:sof + 5] + b"\x00\x00" + jpeg[sof + 7:],  # height 0
        jpeg[:sof + 9] + b"\x05" + jpeg[sof + 10:],  # five components
        jpeg[:dht] + b"\x00" + jpeg[dht + 1:],  # no marker where one must be
        jpeg[:2] + b"\xff" + jpeg[2:],  # a fill byte
        _encode(photo.resize((30, 20)), "PNG"),
        b"",
    ]
    return same, odd


def test_a_batch_gets_the_sizes_and_reasons_of_one_image_at_a_time():
    """image_sizes (the feeding loop's, a batch at a time) against image_size on each image: every corpus image,
    damaged copies of them, and a batch of one layout with odd images spliced in, as bytes and as memoryviews."""
    rng = np.random.default_rng(3)
    images = list(corpus().values())
    damaged = []
    for data in images:
        b = bytearray(data[: int(rng.integers(0, min(len(data), 2000) + 1))])
        for i in rng.integers(0, max(len(b), 1), size=int(rng.integers(0, 4))):
            if i < len(b):
                b[i] = int(rng.integers(0, 256))
        damaged.append(bytes(b))
    same, odd = _same_layout_batch()
    spliced = same[:10] + odd[:6] + same[10:30] + odd[6:] + same[30:]
    batches = (images, damaged, spliced, [memoryview(d) for d in spliced], same, [memoryview(d) for d in same],
               same + odd[6:7], odd[2:3] + same, same[:1], [])  # one layout throughout: settled in one pass
    for batch in batches:
        assert _as_a_batch(batch) == _one_at_a_time(batch)


def test_a_second_layout_with_a_longer_header_is_read_in_one_step_too():
    """The batch copies each image's first bytes as far as the first layout's header reaches; a later layout whose
    header reaches further (here an XMP block of a few KB) gets a longer copy, not the one-at-a-time parser."""
    from wdsembed import imagesize

    same, _ = _same_layout_batch()
    xmp = _app1(b"http://ns.adobe.com/xap/1.0/\0" + b"<x:xmpmeta/>" * 300)
    longer = [_jpeg_segments(jpeg, after_soi=xmp) for jpeg in same[20:30]]
    batch = same[:20] + longer
    assert imagesize._jpeg_layout(longer[0])[2] > imagesize._jpeg_layout(same[0])[2] + 3000
    settled, sizes, _ = imagesize.jpeg_frames(batch)
    assert settled.all()
    assert [tuple(s) for s in sizes.tolist()] == [imagesize.image_size(d) for d in batch]


def test_a_batch_of_one_layout_is_read_in_one_step():
    """The batch walk settles every image of the shared layout itself (the odd ones go one at a time), so the
    feeding loop pays NumPy's cost per batch, not the parser's per image (bench/dali_probe.py --geometry-only)."""
    from wdsembed import imagesize

    same, odd = _same_layout_batch()
    batch = odd[:3] + same + odd[3:]
    settled, _, components = imagesize.jpeg_frames(batch)
    assert settled[3:3 + len(same)].all() and (components[3:3 + len(same)] == 3).all()
    # of the odd ones, only the two that make a layout of their own (no EXIF, nothing wrong) are settled: the one
    # with its own Huffman tables, and the one with an XMP block
    odd_rows = [0, 1, 2, *range(3 + len(same), len(batch))]
    assert [i for i, row in enumerate(odd_rows) if settled[row]] == [2, 4]
