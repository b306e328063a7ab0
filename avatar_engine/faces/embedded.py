"""Embedded face backend: offline, CPU-only, no licence-restricted weights.

Detection is real: MTCNN with its published weights (from the facenet-pytorch wheel), which
gives boxes and 5 landmarks; without that package it falls back to scikit-image's LBP cascade
(see cascade.py for its limits). The *embedding* is NOT a face-recognition model: it is a
deterministic hand-crafted descriptor of the ArcFace-aligned 112×112 crop (HOG + uniform-LBP
histograms, centred, projected to 512-d by a fixed seeded Gaussian matrix, L2-normed). The same
face photographed again (rescaled, re-lit, slightly shifted) scores clearly higher than two
different faces, which is what demos and tests need; it does not generalise across pose,
expression or age the way ArcFace does, and its vectors are not in ArcFace's space — so
IP-Adapter FaceID weights trained on ArcFace embeddings expect the insightface backend.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np
from PIL import Image

from ..errors import ProfileError
from .base import ALIGNED_SIZE, EMBEDDING_DIM, Face, FaceAnalyzer, align_face, l2_normalize, to_rgb_array
from .cascade import CascadeDetector
from .mtcnn import INSTALL_HINT, MTCNN, mtcnn_weights_dir

DESCRIPTOR_SEED = 20_241_129


@functools.lru_cache(maxsize=4)
def _projection(in_dim: int, out_dim: int = EMBEDDING_DIM, seed: int = DESCRIPTOR_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)


def _centred_unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-8)


def handcrafted_descriptor(aligned_rgb: np.ndarray, *, seed: int = DESCRIPTOR_SEED) -> np.ndarray:
    """512-d L2-normed descriptor of a 112×112 aligned face crop (see module docstring)."""
    from skimage.feature import hog, local_binary_pattern

    if aligned_rgb.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
        raise ValueError(f"expected a {ALIGNED_SIZE}x{ALIGNED_SIZE} aligned crop, got {aligned_rgb.shape}")
    gray = cv2.cvtColor(np.ascontiguousarray(aligned_rgb), cv2.COLOR_RGB2GRAY)
    core = gray[16:112, 8:104]  # brows to chin; drops most background and hair
    core = cv2.equalizeHist(core)  # robustness to exposure/contrast
    core_f = core.astype(np.float32) / 255.0
    h = hog(core_f, orientations=9, pixels_per_cell=(12, 12), cells_per_block=(2, 2),
            block_norm="L2-Hys", feature_vector=True)
    lbp = local_binary_pattern(core, P=8, R=1, method="uniform")
    cells = []
    step = 16
    for y in range(0, 96, step):
        for x in range(0, 96, step):
            hist, _ = np.histogram(lbp[y:y + step, x:x + step], bins=10, range=(0, 10))
            cells.append(np.sqrt(hist / hist.sum()))  # Hellinger mapping
    small = cv2.resize(core_f, (12, 12), interpolation=cv2.INTER_AREA)  # coarse shading layout
    parts = [_centred_unit(h), _centred_unit(np.concatenate(cells)), 0.5 * _centred_unit(small)]
    feat = np.concatenate(parts)
    return l2_normalize(feat @ _projection(feat.shape[0], EMBEDDING_DIM, seed))


class EmbeddedFaceAnalyzer(FaceAnalyzer):
    """Offline default backend. detector: "auto" (MTCNN if its weights are installed, else
    the cascade), "mtcnn" or "cascade". Images larger than max_side are analysed downscaled
    (coordinates are returned in the original image's pixels)."""

    name = "embedded"

    def __init__(self, *, detector: str = "auto", max_side: int = 1024, min_face: int = 20,
                 det_threshold: float = 0.8):
        if detector not in ("auto", "mtcnn", "cascade"):
            raise ProfileError(f"unknown embedded face detector {detector!r}; use auto, mtcnn or cascade",
                               param="detector")
        weights = mtcnn_weights_dir()
        if detector == "mtcnn" and weights is None:
            raise ProfileError(
                f"the MTCNN face detector weights are not installed; run `{INSTALL_HINT}` "
                "(only its weight files are used) or choose detector='cascade'", param="detector")
        self.detector_name = "mtcnn" if (detector == "mtcnn" or (detector == "auto" and weights)) else "cascade"
        self.max_side = max_side
        self.det_threshold = det_threshold
        if self.detector_name == "mtcnn":
            self._mtcnn = MTCNN(weights, min_face=min_face,
                                thresholds=(0.6, 0.7, det_threshold))
        else:
            self._cascade = CascadeDetector(min_face=max(min_face, 24))

    def _find(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        work = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)),
                                                   interpolation=cv2.INTER_AREA)
        if self.detector_name == "mtcnn":
            d = self._mtcnn.detect(work)
            boxes, scores, points = d.boxes, d.scores, d.points
        else:
            # The cascade's count-based filter was tuned at ~640 px; analyse at most that.
            s2 = min(1.0, 640 / max(work.shape[:2]))
            if s2 < 1.0:
                work = cv2.resize(work, (round(work.shape[1] * s2), round(work.shape[0] * s2)),
                                  interpolation=cv2.INTER_AREA)
                scale *= s2
            boxes, scores, points = self._cascade.detect(work)
        return boxes / scale, scores, points / scale

    def detect(self, image: Image.Image | np.ndarray) -> list[Face]:
        rgb = to_rgb_array(image)
        boxes, scores, points = self._find(rgb)
        faces = []
        for box, score, kps in zip(boxes, scores, points):
            emb = handcrafted_descriptor(align_face(rgb, kps))
            faces.append(Face(bbox=tuple(float(v) for v in box), kps=kps.astype(np.float32),
                              det_score=float(score), embedding=emb))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces
