"""Safe intake of user-uploaded images (reference photos), shared by the library and the
HTTP service. The format is decided by magic bytes, never by file name or declared type; size
and pixel caps are checked before any pixel is decoded (decompression-bomb protection)."""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ALLOWED_FORMATS = ("jpeg", "png", "webp")
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

# load_image checks its own pixel cap from the header first. Pillow's global guard
# (Image.MAX_IMAGE_PIXELS, DecompressionBombError) is the backstop; it is restored if disabled.
if Image.MAX_IMAGE_PIXELS is None:
    Image.MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class ImageLimits:
    """Caps for one uploaded image.

    max_bytes: largest accepted file (default 10 MiB).
    max_pixels: largest width×height, checked from the header before decoding (default 25 MP).
    min_side: smallest accepted width or height in pixels (default 64).
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    min_side: int = 64


def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png' or 'webp' from the first bytes, or None for anything else."""
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def declared_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read straight from the file header, without Pillow; None if unreadable.

    Lets the pixel cap be enforced before any decoder (even Pillow's header parser) runs."""
    try:
        if fmt == "png":
            if data[12:16] == b"IHDR":
                return struct.unpack(">II", data[16:24])
        elif fmt == "webp":
            kind = data[12:16]
            if kind == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if kind == b"VP8L" and data[20] == 0x2F:
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
        elif fmt == "jpeg":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                length = struct.unpack(">H", data[i + 2:i + 4])[0]
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                    h, w = struct.unpack(">HH", data[i + 5:i + 9])
                    return w, h
                i += 2 + length
    except (struct.error, IndexError):
        return None
    return None


def _describe(data: bytes) -> str:
    head = bytes(data[:12])
    for magic, name in ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                        (b"%PDF", "PDF"), (b"\x00\x00\x00", "HEIC/AVIF or video")):
        if head.startswith(magic):
            return name
    stripped = bytes(data[:256]).lstrip().lower()
    if stripped.startswith(b"<svg") or stripped.startswith(b"<?xml"):
        return "SVG/XML"
    if not data:
        return "an empty file"
    return "an unrecognised file"


def load_image(data: bytes, *, param: str = "photo", max_bytes: int | None = None,
               max_pixels: int | None = None, min_side: int | None = None,
               limits: ImageLimits | None = None) -> Image.Image:
    """Decode an uploaded JPEG/PNG/WebP into an upright RGB image, or raise ImageError(param).

    Explicit max_bytes/max_pixels/min_side override `limits` (defaults: ImageLimits())."""
    lim = limits or ImageLimits()
    max_bytes = lim.max_bytes if max_bytes is None else max_bytes
    max_pixels = lim.max_pixels if max_pixels is None else max_pixels
    min_side = lim.min_side if min_side is None else min_side
    allowed = "JPEG, PNG or WebP"

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{param} must be image bytes ({allowed})", param=param)
    data = bytes(data)
    if len(data) > max_bytes:
        raise ImageError(f"{param} is {len(data) / 1048576:.1f} MiB; the limit is "
                         f"{max_bytes / 1048576:.1f} MiB per image", param=param)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"{param} is {_describe(data)}, not an allowed image; upload {allowed}", param=param)

    def too_many(width: int, height: int) -> ImageError:
        return ImageError(f"{param} is {width}x{height} ({width * height / 1e6:.1f} MP); the limit is "
                          f"{max_pixels / 1e6:.1f} MP", param=param)

    header = declared_size(data, fmt)
    if header is not None and header[0] * header[1] > max_pixels:
        raise too_many(*header)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
            width, height = img.size  # header only; nothing decoded yet
            if width * height > max_pixels:
                raise too_many(width, height)
            if min(width, height) < min_side:
                raise ImageError(f"{param} is {width}x{height}; each side must be at least {min_side} px",
                                 param=param)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated PNG/WebP: the first frame is the photo
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{param} declares too many pixels to decode safely; the limit is "
                         f"{max_pixels / 1e6:.1f} MP", param=param) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{param} looks like {fmt.upper()} but is corrupt or truncated and cannot be "
                         f"decoded ({exc.__class__.__name__}); upload a complete {allowed} file",
                         param=param) from exc

    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white (uploads with alpha are usually cut-outs)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img
