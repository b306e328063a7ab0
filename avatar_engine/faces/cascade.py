"""Fallback detector: scikit-image's LBP frontal-face cascade (OpenCV's lbpcascade_frontalface,
shipped by scikit-image) with landmarks from a fixed geometric prior.

Why: it needs nothing beyond scikit-image, so the embedded backend still detects faces when
the MTCNN weights (facenet-pytorch) are not installed. Limits (measured on astronaut and
insightface's t1.jpg): upright frontal faces only; no real landmarks (eyes/nose/mouth are
placed at their average position inside the cascade box, so alignment ignores head roll);
in busy scenes it also fires on hands or poker chips, so it is filtered by detection count
(image + mirror image) and, for colour photos, a skin-tone check. OpenCV 5 dropped
`cv2.CascadeClassifier`, hence skimage's implementation.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

#: Average landmark positions inside an lbpcascade_frontalface box (fractions of w, h).
CASCADE_LANDMARK_PRIOR = np.array(
    [[0.29, 0.37], [0.71, 0.37], [0.50, 0.58], [0.33, 0.78], [0.67, 0.78]], dtype=np.float32)


def _iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = ix * iy
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / np.maximum(union, 1e-9)


def _skin_fraction(rgb: np.ndarray) -> float:
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr")).astype(np.int16)
    cb, cr = ycc[..., 1], ycc[..., 2]
    return float(((cr >= 133) & (cr <= 180) & (cb >= 77) & (cb <= 130)).mean())


class CascadeDetector:
    def __init__(self, *, min_face: int = 24, min_hits: int = 20, scale_factor: float = 1.1):
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        self.cascade = Cascade(lbp_frontal_face_cascade_filename())
        self.min_face = min_face
        self.min_hits = min_hits
        self.scale_factor = scale_factor

    def _raw(self, gray: np.ndarray) -> np.ndarray:
        hits = self.cascade.detect_multi_scale(
            img=gray, scale_factor=self.scale_factor, step_ratio=1, min_size=(self.min_face, self.min_face),
            max_size=(min(gray.shape),) * 2, min_neighbor_number=0, intersection_score_threshold=1.01)
        return np.array([[d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"]] for d in hits],
                        dtype=np.float64).reshape(-1, 4)

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns boxes [N,4], scores [N] (0..1, from the hit count), points [N,5,2]."""
        from skimage.color import rgb2gray

        gray = rgb2gray(rgb)
        width = gray.shape[1]
        raw = self._raw(gray)
        mirrored = self._raw(np.ascontiguousarray(gray[:, ::-1]))
        mirrored = np.stack([width - mirrored[:, 2], mirrored[:, 1], width - mirrored[:, 0], mirrored[:, 3]], 1)
        windows = np.concatenate([raw, mirrored])
        clusters: list[list[np.ndarray]] = []
        for w in windows:
            for c in clusters:
                if _iou(np.array([w]), np.mean(c, 0))[0] > 0.4:
                    c.append(w)
                    break
            else:
                clusters.append([w])
        colourful = float(np.abs(rgb.astype(np.int16) - rgb.mean(-1, keepdims=True)).mean()) > 4.0
        boxes, scores = [], []
        for c in sorted(clusters, key=len, reverse=True):
            if len(c) < self.min_hits:
                break
            box = np.mean(c, 0)
            inset = (box[2] - box[0]) / 5
            core = rgb[int(box[1] + inset):int(box[3] - inset), int(box[0] + inset):int(box[2] - inset)]
            if colourful and core.size and _skin_fraction(core) < 0.5:
                continue
            if boxes and _iou(np.array(boxes), box).max() > 0.3:
                continue
            boxes.append(box)
            scores.append(min(1.0, len(c) / (4.0 * self.min_hits)))
        boxes_a = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        wh = boxes_a[:, 2:4] - boxes_a[:, 0:2]
        points = boxes_a[:, None, 0:2] + CASCADE_LANDMARK_PRIOR[None] * wh[:, None, :]
        return boxes_a, np.array(scores, dtype=np.float32), points.astype(np.float32)
