"""Invisible watermark: invisible-watermark's DWT-DCT (the method diffusers' SDXL pipeline uses)
carrying 64 bits = a 16-bit tag + a 48-bit payload derived from the avatar id.

Payload: the first 48 bits of HMAC-SHA256(key, "avatar-engine/watermark/v1:" + avatar_id). The
default key is public, so anyone holding an avatar id can check an image against it; an operator
who sets a secret key makes payloads unforgeable for outsiders (and checkable only by them). The
tag (0xAE01: avatar-engine, version 1) tells a marked image from an unmarked one.

DWT-DCT flips a few bits even on a lossless copy (the encoder clips to uint8 in YUV: on the
astronaut photo one tag bit comes back wrong), so both comparisons tolerate bit errors: the tag
is accepted within 2 of 16 bits (an unmarked image, i.e. random bits, passes with probability
137/65536 = 0.2 %), and a payload matches an avatar within 4 of 48 bits (a random payload matches
with probability about 7.6e-10).

DWT-DCT is cheap (about 65 ms per 512² image here) but weak, as measured in
benchmarks/watermark_robustness.py: it reads back from every lossless tiny-sd15 output and from
half of the natural photos, and from none after JPEG q90/q75, WebP q85, a 50 % resize or a crop
(the 0.2.0 encoder writes the inverse DWT into a uint8 array, so bright/saturated areas wrap).
The signed manifest is the strong mark; the watermark is a second one for lossless copies whose
metadata was stripped. It needs an image of at least
256×256 pixels (the library's limit); smaller images are left unmarked and say so."""
from __future__ import annotations

import hashlib
import hmac

import numpy as np
from PIL import Image

from ..errors import AvatarEngineError

TAG = b"\xae\x01"
PAYLOAD_BYTES = 6  # 48 bits
MARK_BITS = (len(TAG) + PAYLOAD_BYTES) * 8
MIN_PIXELS = 256 * 256
TAG_MAX_BIT_ERRORS = 2
PAYLOAD_MAX_BIT_ERRORS = 4
DEFAULT_KEY = b"avatar-engine-watermark-v1"
_METHOD = "dwtDct"


class WatermarkUnavailable(AvatarEngineError):
    """invisible-watermark is not installed."""

    code = "provenance_unavailable"


def watermark_payload(avatar_id: str, key: bytes = DEFAULT_KEY) -> bytes:
    """The 48-bit payload for an avatar id (see the module docstring)."""
    digest = hmac.new(key, f"avatar-engine/watermark/v1:{avatar_id}".encode(), hashlib.sha256).digest()
    return digest[:PAYLOAD_BYTES]


def bit_errors(a: bytes, b: bytes) -> int:
    """Hamming distance of two equal-length byte strings."""
    if len(a) != len(b):
        raise ValueError("bit_errors needs byte strings of equal length")
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b))


def payload_matches(decoded: bytes | None, avatar_id: str, key: bytes = DEFAULT_KEY) -> bool:
    """Whether a decoded payload is this avatar's (within PAYLOAD_MAX_BIT_ERRORS bits)."""
    return decoded is not None and bit_errors(decoded, watermark_payload(avatar_id, key)) <= PAYLOAD_MAX_BIT_ERRORS


def can_watermark(image: Image.Image) -> bool:
    return image.width * image.height >= MIN_PIXELS


def _codec():
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError as exc:
        raise WatermarkUnavailable("invisible-watermark is not installed "
                                   "(pip install --no-deps invisible-watermark==0.2.0 PyWavelets)") from exc
    return WatermarkEncoder, WatermarkDecoder


def _to_bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def embed_watermark(image: Image.Image, payload: bytes) -> Image.Image:
    """A copy of `image` (RGB) carrying TAG + payload. Raises ValueError for an image under 256²
    pixels; check `can_watermark` first."""
    if len(payload) != PAYLOAD_BYTES:
        raise ValueError(f"watermark payload must be {PAYLOAD_BYTES} bytes, got {len(payload)}")
    if not can_watermark(image):
        raise ValueError(f"image {image.width}x{image.height} is too small to watermark (needs {MIN_PIXELS} pixels)")
    encoder_cls, _ = _codec()
    encoder = encoder_cls()
    encoder.set_watermark("bytes", TAG + payload)
    bgr = encoder.encode(_to_bgr(image), _METHOD)
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


def decode_watermark(image: Image.Image) -> bytes | None:
    """The 48-bit payload when the image carries avatar-engine's tag, else None (also for images
    too small to have been marked)."""
    if not can_watermark(image):
        return None
    _, decoder_cls = _codec()
    bits = decoder_cls("bytes", MARK_BITS).decode(_to_bgr(image), _METHOD)
    return bits[len(TAG):] if bit_errors(bits[:len(TAG)], TAG) <= TAG_MAX_BIT_ERRORS else None
