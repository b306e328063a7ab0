"""Decoding of user-supplied photos (multipart parts or base64 strings) in the ingress.

Photos are validated here, before a job is accepted, so a bad image is a 400 naming the part
(`photos[1]`, `photo[0]`), never a failed job later. Decoding is the engine's
`avatar_engine.images.load_image` (bytes → upright RGB PIL, format sniffed, size-checked) with
the service's limits. Photo URLs are fetched by `photos.photo_bytes_of` (through the
SSRF guard of `serve.destinations`) before they get here.
"""
from __future__ import annotations

import base64
import binascii
import re

from PIL import Image

from avatar_engine.images import load_image

from .errors import invalid_request

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.I)


def b64_to_bytes(value: str, param: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{param} must be a base64-encoded image", param)
    value = _DATA_URL.sub("", value.strip())
    if value.startswith(("http://", "https://")):
        raise invalid_request(f"{param}: URLs are fetched only in a photo field; send the image bytes here", param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"{param} is not valid base64", param) from None


def decode_photo(data: bytes, param: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes → RGB image, or ImageError (a 400 invalid_request) naming `param`."""
    if not data:
        raise invalid_request(f"{param} is empty", param)
    return load_image(data, param=param, max_bytes=max_bytes, max_pixels=max_pixels)
