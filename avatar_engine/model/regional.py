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

from ..requests.layout import Box, pixel_box
from .attention import level_sizes


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
    weights, faces = [], []
    face_on = has_face.to(torch.float32)[:, :, None, None]
    for hw in level_sizes(latent_hw, levels):
        w = region_weights_at(masks, hw)
        weights.append(w.to(device=device, dtype=dtype))
        faces.append((w[:, 1:] * face_on).to(device=device, dtype=dtype))
    return {"region_weights": tuple(weights), "face_masks": tuple(faces)}
