"""The asset store's PNG encoder: lossless for every mode it takes, at every level."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve.assets import encode_png


@pytest.mark.parametrize("mode,shape", [("RGB", (37, 53, 3)), ("RGBA", (37, 53, 4)), ("L", (37, 53))])
@pytest.mark.parametrize("level", [0, 1, 3, 6, 9])
def test_png_round_trip_is_exact(mode, shape, level):
    pixels = np.random.default_rng(level).integers(0, 256, shape, dtype=np.uint8)
    back = Image.open(io.BytesIO(encode_png(Image.fromarray(pixels, mode), level)))
    assert back.format == "PNG" and back.mode == mode
    assert np.array_equal(np.asarray(back), pixels)


def test_other_modes_are_stored_as_rgb():
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").convert("P")
    back = Image.open(io.BytesIO(encode_png(image)))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(image.convert("RGB")))
