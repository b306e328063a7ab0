"""InstantID: face keypoints drawn as its IdentityNet expects them, placed in the output frame
(percify) or in a character's region (cast), and the IdentityNet ControlNet applied to a UNet
call through a forward pre-hook held only for that call."""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...faces.base import ARCFACE_TEMPLATE


KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


def draw_kps(width: int, height: int, faces_kps: Sequence[np.ndarray]) -> np.ndarray:
    """InstantID's `draw_kps`: on black, the four limbs eye/eye/mouth/mouth → nose as filled
    ellipses (60 % brightness) and the five keypoints as discs, in its colours. InstantID draws
    at ~1024 px with limb half-width 4 and radius 10; both scale with the image's shorter side
    here (at 1024 px they are InstantID's). Several faces may be drawn (cast). HxWx3 uint8."""
    import cv2

    scale = min(width, height) / 1024.0
    stick, radius = max(1, int(round(4 * scale))), max(1, int(round(10 * scale)))
    limbs = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    out = np.zeros((height, width, 3), np.float64)
    for kps in faces_kps:
        kps = np.asarray(kps, np.float64).reshape(5, 2)
        for a, b in limbs:
            x, y = kps[[a, b], 0], kps[[a, b], 1]
            length = float(np.hypot(x[0] - x[1], y[0] - y[1]))
            angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
            poly = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), stick), int(angle), 0, 360, 1)
            out = cv2.fillConvexPoly(out.copy(), poly, KPS_COLORS[a])
    out = (out * 0.6).astype(np.uint8)
    for kps in faces_kps:
        for i, (x, y) in enumerate(np.asarray(kps, np.float64).reshape(5, 2)):
            out = cv2.circle(out.copy(), (int(x), int(y)), radius, KPS_COLORS[i], -1)
    return out


def frontal_kps() -> np.ndarray:
    """A frontal face's keypoints (ArcFace's template), for identities without a photo."""
    return ARCFACE_TEMPLATE.astype(np.float64)


def kps_in_frame(kps: np.ndarray | None, photo_size: tuple[int, int] | None, width: int, height: int) -> np.ndarray:
    """Percify: the reference face's keypoints carried into the output frame (the photo fitted
    into the frame, centred — InstantID's demo resizes the photo to the output likewise); a
    centred frontal face filling ~40 % of the shorter side when there is no photo."""
    if kps is None or photo_size is None:
        return kps_in_box(frontal_kps(), (0.0, 0.0, 1.0, 1.0), width, height, face_frac=0.4, top=0.3)
    pw, ph = photo_size
    s = min(width / pw, height / ph)
    off = np.array([(width - pw * s) / 2, (height - ph * s) / 2])
    return np.asarray(kps, np.float64).reshape(5, 2) * s + off


def kps_in_box(kps: np.ndarray | None, box, width: int, height: int, face_frac: float = 0.5,
               top: float = 0.25) -> np.ndarray:
    """Cast: a face's keypoints placed in a character's region (normalised box): the keypoint
    spread scaled to `face_frac` of the region's shorter side, centred horizontally with the
    keypoints' centre `top` of the way down the region (a head above a body)."""
    kps = frontal_kps() if kps is None else np.asarray(kps, np.float64).reshape(5, 2)
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    centre = kps.mean(0)
    spread = max(float(np.ptp(kps[:, 0])), float(np.ptp(kps[:, 1])), 1e-6)
    s = face_frac * min(x1 - x0, y1 - y0) / spread
    target = np.array([(x0 + x1) / 2, y0 + top * (y1 - y0)])
    return (kps - centre) * s + target


class IdentityNet:
    """InstantID's ControlNet for one pipeline: its residuals are added to the UNet call by a
    forward pre-hook that exists only inside `applied(...)`, so plain calls never see it."""

    def __init__(self, controlnet):
        self.controlnet = controlnet

    @contextlib.contextmanager
    def applied(self, unet, tokens: torch.Tensor, images: torch.Tensor, scale: torch.Tensor,
                masks: torch.Tensor | None = None, active: Sequence[bool] | None = None):
        """tokens [N, F, T, D] (N counts the CFG halves), images [N, F, 3, H, W] in 0..1, scale
        [N] per-image ControlNet weight, masks [N, F, H, W] pixel weights (cast: each face's
        residuals confined to its region) or None; `active[f]` False skips face f's ControlNet
        run (no image of the call has that face)."""
        faces = tokens.shape[1]
        active = list(active) if active is not None else [True] * faces

        def pre_hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            down_total, mid_total = None, None
            for f in range(faces):
                if not active[f]:
                    continue
                down, mid = self.controlnet(sample, t, encoder_hidden_states=tokens[:, f], controlnet_cond=images[:, f],
                                            conditioning_scale=1.0, guess_mode=False,
                                            added_cond_kwargs=kwargs.get("added_cond_kwargs"), return_dict=False)
                w = scale.to(sample.dtype)[:, None, None, None]

                def weigh(r, f=f):
                    if masks is None:
                        return r * w
                    m = F.interpolate(masks[:, f:f + 1].to(torch.float32), size=r.shape[-2:], mode="area")
                    return r * w * m.to(r.dtype)

                down, mid = [weigh(d) for d in down], weigh(mid)
                down_total = down if down_total is None else [a + b for a, b in zip(down_total, down)]
                mid_total = mid if mid_total is None else mid_total + mid
            if down_total is not None:
                kwargs = dict(kwargs)
                kwargs["down_block_additional_residuals"] = tuple(down_total)
                kwargs["mid_block_additional_residual"] = mid_total
            return args, kwargs

        handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def keypoint_images(per_image: Sequence[Sequence[np.ndarray | None]], width: int, height: int, device, dtype,
                    do_cfg: bool) -> torch.Tensor:
    """[N, F, 3, H, W] 0..1 control images: per image, per face slot, that face's keypoints
    drawn alone (None: a black image). The unconditional half repeats them (as the community
    pipeline does: the ControlNet sees the keypoints under both halves)."""
    rows = []
    for faces in per_image:
        rows.append(np.stack([draw_kps(width, height, [k]) if k is not None else np.zeros((height, width, 3), np.uint8)
                              for k in faces]))
    arr = torch.from_numpy(np.stack(rows)).permute(0, 1, 4, 2, 3).to(device=device, dtype=dtype) / 255.0
    return torch.cat([arr, arr]) if do_cfg else arr
