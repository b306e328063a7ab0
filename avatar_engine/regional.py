"""Regional conditioning for one denoising pass: each character's prompt (and FaceID identity)
acts only inside its region, the scene prompt everywhere else.

How: the text conditioning of a call is the scene prompt embedding followed by one embedding
per character slot, concatenated along the token axis (`[B, (1+MAX_CHARACTERS)·77, D]`; slots
of a cast with fewer characters repeat the scene prompt with zero weight). The model's
attention processors (attention.py, mode `regional`) attend to each 77-token chunk separately
and blend the outputs per pixel with the region weights computed here for every UNet level
(area average of the pixel masks): weight w_k inside character k's region, 1 − Σw_k for the
background (scene prompt). Each character's FaceID identity is added through the same weights
(times zero when it has none), so a face cannot leak outside its region and a face under an
all-zero mask contributes exactly 0.0.

Overlapping regions split the overlap: pixel weights are normalised so Σw_k ≤ 1 everywhere,
which keeps prompts and identities from being added on top of each other.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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


def region_masks(boxes: Sequence[Box], width: int, height: int) -> torch.Tensor:
    """[K, H, W] float32 pixel weights: 1 inside a box, overlaps split evenly (Σ ≤ 1).

    Rasterised through diffusers' IPAdapterMaskProcessor (the format `ip_adapter_masks` wants)."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image, ImageDraw

    images = []
    for box in boxes:
        img = Image.new("L", (width, height), 0)
        x0, y0, x1, y1 = pixel_box(box, width, height)
        ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
        images.append(img)
    masks = IPAdapterMaskProcessor().preprocess(images, height=height, width=width)[:, 0].float()  # [K, H, W]
    return normalise_overlaps(masks)


def normalise_overlaps(masks: torch.Tensor) -> torch.Tensor:
    """Divide by Σ_k where regions overlap, so the weights of one pixel never exceed 1.
    A region of zeros stays zeros and leaves the others untouched."""
    total = masks.sum(dim=-3, keepdim=True)
    return torch.where(total > 1.0, masks / total.clamp(min=1.0), masks)


def region_weights_at(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, 1 + K, h·w, 1] blend weights at one attention resolution: background (1 - Σ regions,
    the scene prompt) first, then one per region; area-averaged, so a region's weight is zero
    wherever its box does not reach."""
    m = F.interpolate(masks.to(torch.float32), size=hw, mode="area").flatten(2)  # [B, K, seq]
    background = (1.0 - m.sum(dim=1, keepdim=True)).clamp(min=0.0)
    return torch.cat([background, m], dim=1).unsqueeze(-1)


def regional_conditioning(masks: torch.Tensor, has_face: torch.Tensor, latent_hw: tuple[int, int], levels: int,
                          device, dtype) -> dict:
    """Per-UNet-level region weights and identity masks for a regional (cast) call.

    masks: [B, K, H, W] pixel weights (K = attention.MAX_CHARACTERS, unused regions all zero);
    has_face: [B, K] whether character k of image b has an identity. Character k's identity
    enters exactly where its prompt does (same weights), times zero when it has no face, so a
    face under a zero mask adds exactly 0.0. Returns `region_weights` and `face_masks` tuples
    indexed by level (attention.CallConditioning)."""
    from .attention import level_sizes

    weights, faces = [], []
    face_on = has_face.to(torch.float32)[:, :, None, None]
    for hw in level_sizes(latent_hw, levels):
        w = region_weights_at(masks, hw)
        weights.append(w.to(device=device, dtype=dtype))
        faces.append((w[:, 1:] * face_on).to(device=device, dtype=dtype))
    return {"region_weights": tuple(weights), "face_masks": tuple(faces)}
