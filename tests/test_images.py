"""Upload intake: format by content, caps before decoding, orientation, alpha."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from avatar_engine.errors import ImageError, RequestValidationError
from avatar_engine.images import ImageLimits, load_image, sniff_format


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt,name", [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")])
def test_accepts_jpeg_png_webp(fmt, name):
    data = encode(photo(), fmt)
    assert sniff_format(data) == name
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (160, 120)


@pytest.mark.parametrize("fmt,label", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_rejects_other_formats_by_content(fmt, label):
    data = encode(photo(), fmt)  # would be named "selfie.png" by the client: irrelevant
    assert sniff_format(data) is None
    with pytest.raises(ImageError) as e:
        load_image(data, param="photos[1]")
    assert e.value.param == "photos[1]"
    assert label in e.value.message and "JPEG, PNG or WebP" in e.value.message
    assert isinstance(e.value, RequestValidationError)


@pytest.mark.parametrize("data", [b"hello, I am text pretending to be a .png",
                                  b'<svg xmlns="http://www.w3.org/2000/svg"></svg>',
                                  np.random.default_rng(1).bytes(4096), b""])
def test_rejects_text_svg_random_and_empty(data):
    with pytest.raises(ImageError, match="JPEG, PNG or WebP"):
        load_image(data)


def test_truncated_jpeg_is_a_clear_error():
    data = encode(photo((400, 300)), "JPEG", quality=90)
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(data[: len(data) // 2])
    assert e.value.param == "photo"


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose IHDR declares width×height, with a tiny (invalid) IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header(monkeypatch):
    data = _png_header_only(30000, 30000)
    assert len(data) < 200
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError, match="MP") as e:
        load_image(data)
    assert "900.0 MP" in e.value.message and "25.0 MP" in e.value.message
    assert decoded == []  # refused before any pixel was decoded


def test_pixel_cap_is_configurable():
    data = encode(photo((300, 300)), "PNG")
    with pytest.raises(ImageError, match="limit is 0.1 MP"):
        load_image(data, limits=ImageLimits(max_pixels=80_000))
    assert load_image(data, limits=ImageLimits(max_pixels=90_000)).size == (300, 300)


def test_oversize_bytes_rejected_before_parsing():
    data = encode(photo(), "PNG")
    with pytest.raises(ImageError, match="MiB") as e:
        load_image(data, max_bytes=len(data) - 1, param="photos[0]")
    assert e.value.param == "photos[0]"


def test_too_small_image():
    with pytest.raises(ImageError, match="at least 64 px"):
        load_image(encode(photo((200, 40)), "PNG"))


def test_exif_rotated_jpeg_comes_out_upright():
    # Stored landscape (120 wide × 80 high) with a red top rows; EXIF orientation 6 means
    # "rotate 90° clockwise to display", so the upright image is portrait with red on the right.
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[:10] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (80, 120)
    a = np.asarray(out).astype(int)
    assert a[:, -5:, 0].mean() > 200 and a[:, -5:, 1].mean() < 60  # red column on the right
    assert a[:, :40, 0].mean() < 40


def test_rgba_is_flattened_onto_white():
    arr = np.zeros((100, 100, 4), np.uint8)
    arr[..., 0] = 255
    arr[:50, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = load_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    a = np.asarray(out)
    assert out.mode == "RGB"
    assert tuple(a[10, 10]) == (255, 0, 0)
    assert tuple(a[90, 10]) == (255, 255, 255)


def test_rgba_webp_and_grayscale_become_rgb():
    assert load_image(encode(Image.new("L", (100, 100), 7), "PNG")).getpixel((0, 0)) == (7, 7, 7)
    img = Image.new("RGBA", (100, 100), (0, 0, 255, 0))
    assert load_image(encode(img, "WEBP", lossless=True)).getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}),
                                    ("WEBP", {}), ("WEBP", {"lossless": True})])
def test_header_size_matches_pillow(fmt, kw):
    from avatar_engine.images import declared_size

    data = encode(photo((173, 91)), fmt, **kw)
    assert declared_size(data, sniff_format(data)) == (173, 91)
