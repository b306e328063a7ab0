"""Face analysis interface shared by every backend, plus identity helpers used by
percify-yourself and cast. Backends differ in how they detect and embed; everything
downstream (IP-Adapter FaceID, similarity scores) only sees `Face` and 512-d embeddings."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from ..errors import NoFaceError

EMBEDDING_DIM = 512
ALIGNED_SIZE = 112

#: ArcFace's 5-point template for a 112×112 crop (left eye, right eye, nose, left mouth
#: corner, right mouth corner), as used by insightface and IP-Adapter FaceID.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the image it was found in.

    bbox: (x0, y0, x1, y1); kps: 5×2 landmarks in ArcFace order; det_score: detector
    confidence 0..1; embedding: 512-d float32, L2-normed (None when only detected)."""

    bbox: tuple[float, float, float, float]
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray | None = None

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB from a PIL image or an RGB array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def alignment_matrix(kps: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """2×3 similarity transform (rotation, uniform scale, translation) taking the 5 landmarks
    onto the ArcFace template, least squares (Umeyama) as insightface's `estimate_norm`."""
    src = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    dst = ARCFACE_TEMPLATE.astype(np.float64) * (size / 112.0)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / 5
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var = (s0 ** 2).sum() / 5
    scale = (sig * np.diag(sign)).sum() / var if var > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image: Image.Image | np.ndarray, kps: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """size×size RGB uint8 crop with the landmarks moved onto the ArcFace template."""
    arr = to_rgb_array(image)
    return cv2.warpAffine(arr, alignment_matrix(kps, size), (size, size), borderValue=0.0)


class FaceAnalyzer(abc.ABC):
    """One interface over face backends. Images are RGB (PIL or HxWx3 uint8)."""

    name: str = "abstract"

    @abc.abstractmethod
    def detect(self, image: Image.Image | np.ndarray) -> list[Face]:
        """All faces, largest first, each with its embedding."""

    def embed(self, image: Image.Image | np.ndarray) -> list[Face]:
        """Faces with embeddings (the same as `detect` for backends that always embed)."""
        return self.detect(image)

    def align(self, image: Image.Image | np.ndarray, kps: np.ndarray) -> np.ndarray:
        """112×112 RGB ArcFace-aligned crop."""
        return align_face(image, kps)


# ---------------------------------------------------------------------------------------
# identity helpers

def l2_normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n == 0.0:
        raise ValueError("cannot normalise a zero or non-finite embedding")
    return (v / n).astype(np.float32)


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box (the subject of a portrait), or None."""
    return max(faces, key=lambda f: f.area) if faces else None


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def combine_embeddings(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Several photos of one person → one identity: mean of the normed embeddings, renormed."""
    if len(embeddings) == 0:
        raise ValueError("combine_embeddings needs at least one embedding")
    stacked = np.stack([l2_normalize(e) for e in embeddings])
    return l2_normalize(stacked.mean(0))


@dataclass
class IdentityReference:
    """One person's identity from 1..n reference photos.

    embedding: combined 512-d normed embedding; faces_per_photo: faces found in each photo;
    used_faces: the face used from each photo; notes: human-readable remarks (e.g. the largest
    of several faces was used); consistency: lowest cosine similarity of a photo's face to the
    combined identity (1.0 for one photo) — low values hint the photos show different people."""

    embedding: np.ndarray
    faces_per_photo: list[int]
    used_faces: list[Face]
    notes: list[str] = field(default_factory=list)
    consistency: float = 1.0

    @property
    def multiple_faces(self) -> bool:
        return any(n > 1 for n in self.faces_per_photo)


def analyze_reference_photos(analyzer: FaceAnalyzer, images: Sequence[Image.Image | np.ndarray], *,
                             param: str = "photos", min_face_size: int = 32) -> IdentityReference:
    """Apply the reference-photo policy: no face → NoFaceError naming the photo; a face
    smaller than min_face_size px (shorter box side) → NoFaceError; several faces → the
    largest is used and reported in notes."""
    if len(images) == 0:
        raise NoFaceError("at least one reference photo is required", param=param)
    counts: list[int] = []
    used: list[Face] = []
    notes: list[str] = []
    for i, image in enumerate(images):
        p = f"{param}[{i}]"
        faces = analyzer.embed(image)
        counts.append(len(faces))
        if not faces:
            raise NoFaceError(
                f"no face was found in photo {i + 1} ({p}); upload a clear, front-facing photo "
                f"in which the face is visible", param=p)
        face = largest_face(faces)
        side = min(face.width, face.height)
        if side < min_face_size:
            raise NoFaceError(
                f"the face in photo {i + 1} ({p}) is too small ({side:.0f} px); it must be at least "
                f"{min_face_size} px across — use a closer or higher-resolution photo", param=p)
        if face.embedding is None:
            raise NoFaceError(f"the face in photo {i + 1} ({p}) could not be embedded", param=p)
        if len(faces) > 1:
            notes.append(f"{p}: {len(faces)} faces found; the largest was used")
        used.append(face)
    combined = combine_embeddings([f.embedding for f in used])
    consistency = min(cosine_similarity(f.embedding, combined) for f in used)
    return IdentityReference(embedding=combined, faces_per_photo=counts, used_faces=used,
                             notes=notes, consistency=consistency)
