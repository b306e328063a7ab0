"""Where each character of a cast stands: normalised boxes, automatic layouts, overlap.

Plain geometry (no torch), so request validation and the report share it with the regional
conditioning (model/regional.py) that turns boxes into attention masks.
"""
from __future__ import annotations

Box = tuple[float, float, float, float]  # normalised x0, y0, x1, y1

LAYOUT_MARGIN = 0.04  # outer margin of automatic layouts (fraction of the side)
LAYOUT_GAP = 0.03  # gap between neighbouring regions
LAYOUT_HEADROOM = 0.06  # free band above side-by-side characters
LAYOUTS = ("auto", "columns", "rows", "custom")


def auto_layout(n: int, width: int, height: int, mode: str = "auto") -> list[Box]:
    """n regions for an image of width×height.

    auto: side-by-side columns for landscape and square frames (people stand next to each
    other, and a column is the shape of a standing or seated person); stacked rows for portrait
    frames with 3-4 characters, where columns would be slivers (9:16 with 4 columns gives each
    person 14 % of the width). Regions keep a margin to the frame and a gap between them so
    neighbouring identities do not touch."""
    if n < 1:
        raise ValueError("auto_layout needs at least one region")
    if mode == "auto":
        mode = "rows" if height > width and n >= 3 else "columns"
    m, g = LAYOUT_MARGIN, LAYOUT_GAP
    boxes: list[Box] = []
    if mode == "columns":
        w = (1.0 - 2 * m - g * (n - 1)) / n
        for i in range(n):
            x0 = m + i * (w + g)
            boxes.append((x0, LAYOUT_HEADROOM, x0 + w, 1.0))
    elif mode == "rows":
        h = (1.0 - 2 * m - g * (n - 1)) / n
        for i in range(n):
            y0 = m + i * (h + g)
            boxes.append((m, y0, 1.0 - m, y0 + h))
    else:
        raise ValueError(f"unknown layout mode {mode!r}")
    return [tuple(round(v, 4) for v in b) for b in boxes]  # type: ignore[misc]


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle [x0, x1) × [y0, y1) of a normalised box, at least one pixel wide."""
    x0 = min(width - 1, max(0, int(round(box[0] * width))))
    y0 = min(height - 1, max(0, int(round(box[1] * height))))
    x1 = max(x0 + 1, min(width, int(round(box[2] * width))))
    y1 = max(y0 + 1, min(height, int(round(box[3] * height))))
    return x0, y0, x1, y1


def box_overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area (1.0: one box inside the other)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return (iw * ih) / smaller if smaller > 0 else 0.0
