"""Limits and validators shared by every request type (generate, percify, cast).

Validation errors carry the API's camelCase field name in `param`, so the HTTP layer returns it
unchanged; the limits here are also what the service's schema (serve/schemas/) reads.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import RequestValidationError
from ..faces.descriptors import check_reference_identity
from ..faces.scoring import default_scorer
from ..images import load_image

STYLE_PRESETS = ("professional", "anime", "fantasy", "cyberpunk", "renaissance", "realistic")
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4")
SEED_MAX = 2_147_483_647
MAX_BATCH_SIZE = 4
GUIDANCE_RANGE = (1.0, 20.0)
STEPS_RANGE = (1, 150)
PROMPT_MAX_CHARS = 2000
IDENTITY_STRENGTH_RANGE = (0.0, 2.0)
MAX_REFERENCE_PHOTOS = 5
CAST_CHARACTERS_RANGE = (2, 4)
EMBEDDING_DIM = 512  # an identity embedding (ArcFace / the face analyzer's), what FaceID projects
PHOTOS_PARAM = "photos"


def check(cond: bool, param: str, message: str) -> None:
    if not cond:
        raise RequestValidationError(message, param=param)


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def size_for_aspect_ratio(native: int, aspect_ratio: str, multiple: int = 8) -> tuple[int, int]:
    """(width, height) with about native² pixels, each side a multiple of `multiple`.

    1:1 at native 512 → 512×512; 16:9 → 680×384 rounded to multiples of 8 (the VAE factor)."""
    w_ratio, h_ratio = (int(x) for x in aspect_ratio.split(":"))
    area = native * native
    height = math.sqrt(area * h_ratio / w_ratio)
    width = height * w_ratio / h_ratio

    def snap(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return snap(width), snap(height)


def photo_param(i: int, param: str = PHOTOS_PARAM) -> str:
    return f"{param}[{i}]"


def check_photos(photos: Sequence[Any], param: str = PHOTOS_PARAM) -> None:
    check(isinstance(photos, (list, tuple)) and 1 <= len(photos) <= MAX_REFERENCE_PHOTOS, param,
          f"{param} must hold 1 to {MAX_REFERENCE_PHOTOS} photos of one person")


def check_photo_types(photos: Sequence, param: str = PHOTOS_PARAM) -> None:
    """Each photo must be a PIL image or encoded bytes; the error names `param[i]`."""
    for i, photo in enumerate(photos):
        if not isinstance(photo, (Image.Image, bytes, bytearray, memoryview)):
            raise RequestValidationError(f"{photo_param(i, param)} must be an image (PIL image or JPEG/PNG/WebP "
                                         f"bytes)", param=photo_param(i, param))


def load_photo(photo: Any, param: str):
    """An upright RGB PIL image from a PIL image or encoded bytes (decoded safely by
    `images.load_image`, errors naming `param`)."""
    if isinstance(photo, Image.Image):
        return ImageOps.exif_transpose(photo).convert("RGB")
    return load_image(bytes(photo), param=param)


def normed_embedding(value: Any, param: str = "identityEmbedding") -> np.ndarray:
    """A 512-d L2-normed float32 identity, or an error naming `param`."""
    try:
        v = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise RequestValidationError(f"{param} must be a list of {EMBEDDING_DIM} numbers", param=param) from None
    if v.shape != (EMBEDDING_DIM,):
        raise RequestValidationError(f"{param} must have {EMBEDDING_DIM} numbers, got {v.size}", param=param)
    norm = float(np.linalg.norm(v))
    if not np.all(np.isfinite(v)) or not math.isfinite(norm) or norm == 0.0:
        raise RequestValidationError(f"{param} must be finite and not all zeros", param=param)
    return (v / norm).astype(np.float32)


def refuse_other_people(photos: Sequence, param: str = PHOTOS_PARAM) -> None:
    """Request-time one-person check (no engine needed, so a service runs it at submit): with
    2+ photos, photos that the process-wide default scorer judges to be another person raise
    `IdentityMismatchError` naming `param[i]`. Photos in which it finds no face are left to the
    engine's face policy; with the hand-crafted fallback scorer nothing is checked."""
    if len(photos) < 2:
        return
    scorer = default_scorer()
    if scorer.recognition_model:  # the hand-crafted fallback's verdict is never enforced
        images = [load_photo(p, photo_param(i, param)) for i, p in enumerate(photos)]
        check_reference_identity(scorer, images, param, "refuse")
