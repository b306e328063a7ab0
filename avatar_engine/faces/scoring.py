"""Face *scoring*: is this the same person? Kept apart from face *conditioning*.

Conditioning (what IP-Adapter FaceID is fed: a 512-d embedding from a `FaceAnalyzer`) and
scoring (what every identity number the product reports comes from: a `FaceScorer`) are two
interfaces, so either can be swapped without the other. The published practice (PuLID, Table 1)
is the same: identity fidelity is measured with a different face model from the one that
conditions generation.

Scorers (`scorer_from_config`):
- ``dlib`` (`DlibScorer`, the default whenever installed): dlib's 128-d ResNet face descriptor
  (LFW 99.38 %), weights from the `face-recognition-models` package (CC0), runtime from the
  `dlib-bin` wheel (Boost licence). Faces are found by MTCNN (the embedded detector, when its
  weights are installed) or dlib's HOG detector, aligned by dlib's 5-point landmark model (the
  68-point model is never used: it is trained on iBUG-300W, non-commercial).
- ``arcface``: the insightface backend's ArcFace embeddings (non-commercial weights).
- ``handcrafted``: the embedded backend's HOG+LBP descriptor. NOT a recognition model; only a last
  resort when dlib is not installed, and labelled as such in every report.

Every comparison gives a `Match`:
- ``similarity``: cosine similarity of the two descriptors (FaceSim's definition; its scale
  depends on the scorer — see each scorer's docstring);
- ``distance``: the scorer's own metric (L2 for dlib, 1 − cosine for the others);
- ``same``: the calibrated verdict, ``distance < threshold``.
"""
from __future__ import annotations

import abc
import functools
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import IdentityMismatchError, ProfileError
from .base import FaceAnalyzer, to_rgb_array
from .embedded import EmbeddedFaceAnalyzer
from .mtcnn import MTCNN, mtcnn_weights_dir

log = logging.getLogger(__name__)

SCORERS = ("auto", "dlib", "arcface", "handcrafted")
DLIB_INSTALL_HINT = "pip install dlib-bin face-recognition-models (the `face` extra: pip install 'avatar-engine[face]')"
DLIB_THRESHOLD = 0.6  # dlib's published "same person" cut on the L2 distance of its descriptors
ARCFACE_THRESHOLD = 0.65  # 1 - cosine; cosine >= 0.35 (a common ArcFace operating point; calibrate for your data)
HANDCRAFTED_THRESHOLD = 0.29  # 1 - cosine; cosine >= 0.71, between the measured same/different ranges (unreliable)
DLIB_MODEL_FILES = {"landmarks": "shape_predictor_5_face_landmarks.dat",
                    "descriptor": "dlib_face_recognition_resnet_model_v1.dat"}


@dataclass
class ScoredFace:
    """One face as a scorer sees it: box (x0, y0, x1, y1) in the image's pixels, detector
    confidence, and the scorer's descriptor."""

    bbox: tuple[float, float, float, float]
    det_score: float
    descriptor: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1])


@dataclass(frozen=True)
class Match:
    similarity: float  # cosine of the descriptors
    distance: float  # the scorer's metric
    same: bool  # distance < scorer.threshold

    def to_json(self) -> dict:
        return {"similarity": self.similarity, "distance": self.distance, "sameIdentity": self.same}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else 0.0


class FaceScorer(abc.ABC):
    """Finds faces and compares them. Subclasses set the class attributes and `describe`."""

    name: str = "abstract"  # short id in reports, e.g. "dlib-resnet"
    label: str = ""  # human-readable description
    metric: str = "l2"  # "l2" or "cosine-distance"
    threshold: float = 0.6  # same person when distance < threshold
    recognition_model: bool = True  # False: the hand-crafted fallback
    detector: str = ""

    @abc.abstractmethod
    def describe(self, image: Image.Image | np.ndarray) -> list[ScoredFace]:
        """All faces with descriptors, largest first."""

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        a = np.asarray(a, np.float64).reshape(-1)
        b = np.asarray(b, np.float64).reshape(-1)
        if self.metric == "l2":
            return float(np.linalg.norm(a - b))
        return 1.0 - _cos(a, b)

    def compare(self, a: np.ndarray, b: np.ndarray) -> Match:
        d = self.distance(a, b)
        return Match(similarity=round(_cos(a, b), 4), distance=round(d, 4), same=bool(d < self.threshold))

    def centroid(self, descriptors: Sequence[np.ndarray]) -> np.ndarray:
        """Several photos of one person → one reference descriptor (the mean; unit-normed
        for cosine metrics)."""
        if len(descriptors) == 0:
            raise ValueError("centroid needs at least one descriptor")
        mean = np.mean([np.asarray(d, np.float64).reshape(-1) for d in descriptors], 0)
        if self.metric != "l2":
            mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return mean.astype(np.float32)

    def info(self) -> dict:
        """What the report says about the scorer that produced its numbers."""
        verdict = (f"L2 distance < {self.threshold:g}" if self.metric == "l2"
                   else f"cosine similarity > {1 - self.threshold:g}")
        return {"name": self.name, "label": self.label, "detector": self.detector,
                "similarity": "cosine similarity of the descriptors", "metric": self.metric,
                "threshold": self.threshold, "verdict": verdict, "fallback": not self.recognition_model}


# ---------------------------------------------------------------------------------------
# dlib

def dlib_model_dir() -> str | None:
    """Folder of the `face-recognition-models` package's .dat files, located by path:
    `import face_recognition_models` fails with setuptools >= 82 (it imports pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        folder = os.path.join(base, "models")
        if all(os.path.isfile(os.path.join(folder, f)) for f in DLIB_MODEL_FILES.values()):
            return folder
    return None


def dlib_available() -> bool:
    return importlib.util.find_spec("dlib") is not None and dlib_model_dir() is not None


class DlibScorer(FaceScorer):
    """dlib's 128-d ResNet face descriptor (`dlib_face_recognition_resnet_model_v1`).

    Detection: "mtcnn" (the embedded detector), "dlib" (dlib's HOG frontal-face detector) or
    "auto" (MTCNN when its weights are installed). Landmarks: dlib's 5-point model; dlib then
    aligns a 150 px chip itself. Verdict: L2 distance < 0.6 (dlib's published cut: 99.38 % on
    LFW). Descriptors have norm ≈ 1.45, so cosine similarity lives in a narrow high band:
    measured on the bundled photos, the same person (edited copies) scores cosine ≥ 0.99 /
    L2 ≤ 0.2, different people cosine 0.81–0.91 / L2 0.64–0.90; the L2 cut 0.6 corresponds to
    cosine ≈ 0.91 (d² ≈ 2·1.45²·(1 − cos)). Thread-safe (one lock around dlib)."""

    name = "dlib-resnet"
    label = "dlib ResNet face descriptor (128-d, LFW 99.38%), 5-point alignment"
    metric = "l2"
    threshold = DLIB_THRESHOLD

    def __init__(self, *, detector: str = "auto", model_dir: str | None = None, max_side: int = 1024,
                 min_face: int = 20, det_threshold: float = 0.8, threshold: float = DLIB_THRESHOLD):
        if detector not in ("auto", "mtcnn", "dlib"):
            raise ProfileError(f"unknown dlib scorer detector {detector!r}; use auto, mtcnn or dlib", param="faceScorer")
        try:
            import dlib
        except ImportError as exc:
            raise ProfileError(f"the dlib face scorer is not installed; run `{DLIB_INSTALL_HINT}`",
                               param="faceScorer") from exc
        folder = model_dir or dlib_model_dir()
        if folder is None or not all(os.path.isfile(os.path.join(folder, f)) for f in DLIB_MODEL_FILES.values()):
            raise ProfileError(f"dlib's model files ({', '.join(DLIB_MODEL_FILES.values())}) were not found"
                               f"{' in ' + folder if folder else ''}; run `{DLIB_INSTALL_HINT}`", param="faceScorer")
        weights = mtcnn_weights_dir()
        if detector == "mtcnn" and weights is None:
            raise ProfileError("the MTCNN detector weights are not installed (pip install --no-deps "
                               "facenet-pytorch==2.6.0); use detector='dlib'", param="faceScorer")
        self.detector = "mtcnn" if detector == "mtcnn" or (detector == "auto" and weights) else "dlib-hog"
        self.threshold = float(threshold)
        self.max_side = max_side
        self.model_dir = folder
        self._dlib = dlib
        self._lock = threading.Lock()
        self._shape = dlib.shape_predictor(os.path.join(folder, DLIB_MODEL_FILES["landmarks"]))
        self._net = dlib.face_recognition_model_v1(os.path.join(folder, DLIB_MODEL_FILES["descriptor"]))
        if self.detector == "mtcnn":
            self._mtcnn = MTCNN(weights, min_face=min_face, thresholds=(0.6, 0.7, det_threshold))
        else:
            self._hog = dlib.get_frontal_face_detector()

    def _boxes(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        work = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)),
                                                   interpolation=cv2.INTER_AREA)
        if self.detector == "mtcnn":
            det = self._mtcnn.detect(work)
            return det.boxes / scale, det.scores
        upsample = 1 if max(work.shape[:2]) < 800 else 0
        rects, scores, _ = self._hog.run(work, upsample, 0.0)
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float32).reshape(-1, 4)
        conf = 1.0 / (1.0 + np.exp(-np.asarray(scores, np.float32)))  # HOG margin → 0..1
        return boxes / scale, conf

    def describe(self, image: Image.Image | np.ndarray) -> list[ScoredFace]:
        rgb = np.ascontiguousarray(to_rgb_array(image))
        with self._lock:
            boxes, scores = self._boxes(rgb)
            if len(boxes) == 0:
                return []
            dlib = self._dlib
            shapes = dlib.full_object_detections()
            for x0, y0, x1, y1 in boxes:
                shapes.append(self._shape(rgb, dlib.rectangle(int(round(x0)), int(round(y0)),
                                                              int(round(x1)) - 1, int(round(y1)) - 1)))
            descs = self._net.compute_face_descriptor(rgb, shapes)
        faces = [ScoredFace(bbox=tuple(float(v) for v in box), det_score=float(s),
                            descriptor=np.asarray(d, np.float32))
                 for box, s, d in zip(boxes, scores, descs)]
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


# ---------------------------------------------------------------------------------------
# scoring with a FaceAnalyzer's embeddings (ArcFace; the hand-crafted fallback)

class AnalyzerScorer(FaceScorer):
    """Scores with a `FaceAnalyzer`'s own embeddings, cosine metric. With the insightface
    backend that is ArcFace (`arcface`: same person when cosine > 0.35, a common operating
    point — calibrate for your data); with the embedded backend it is the HOG+LBP descriptor
    (`handcrafted`: NOT a recognition model — measured cosine 0.73–0.93 for the same person and
    0.41–0.69 for different people on the bundled photos, so its verdict is unreliable)."""

    metric = "cosine-distance"

    def __init__(self, analyzer: FaceAnalyzer, *, kind: str, threshold: float | None = None):
        self.analyzer = analyzer
        if kind == "arcface":
            self.name = "arcface"
            self.label = f"ArcFace embeddings from the insightface backend ({getattr(analyzer, 'model_dir', '')})"
            self.threshold = ARCFACE_THRESHOLD if threshold is None else float(threshold)
            self.recognition_model = True
        else:
            self.name = "handcrafted-hog-lbp"
            self.label = ("FALLBACK: hand-crafted HOG+LBP descriptor, not a face-recognition model; scores and "
                          f"verdicts are unreliable — install dlib for real scores ({DLIB_INSTALL_HINT})")
            self.threshold = HANDCRAFTED_THRESHOLD if threshold is None else float(threshold)
            self.recognition_model = False
        self.detector = getattr(analyzer, "detector_name", analyzer.name)

    def describe(self, image: Image.Image | np.ndarray) -> list[ScoredFace]:
        return [ScoredFace(bbox=tuple(f.bbox), det_score=float(f.det_score), descriptor=f.embedding)
                for f in self.analyzer.embed(image) if f.embedding is not None]


# ---------------------------------------------------------------------------------------
# construction

def scorer_from_config(name: str = "auto", analyzer: FaceAnalyzer | None = None, **options) -> FaceScorer:
    """Build a scorer by name. "auto": dlib when installed, else the hand-crafted fallback
    (logged as a warning; every report labels it). "arcface" needs an insightface analyzer;
    "handcrafted" uses `analyzer` when it is the embedded one (else builds one)."""
    if name not in SCORERS:
        raise ProfileError(f"unknown face scorer {name!r}; choose one of {', '.join(SCORERS)}", param="faceScorer")
    if name == "dlib" or (name == "auto" and dlib_available()):
        return DlibScorer(**options)
    if name == "arcface":
        if analyzer is None or analyzer.name != "insightface":
            raise ProfileError("the arcface scorer needs the insightface face backend (--face-backend insightface)",
                               param="faceScorer")
        return AnalyzerScorer(analyzer, kind="arcface", **options)
    if name == "auto":
        log.warning("dlib is not installed: identity scores fall back to a hand-crafted descriptor that is not a "
                    "face-recognition model; run `%s`", DLIB_INSTALL_HINT)
    if analyzer is None or analyzer.name != "embedded":
        analyzer = EmbeddedFaceAnalyzer()
    return AnalyzerScorer(analyzer, kind="handcrafted", **options)


_DEFAULT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _default() -> FaceScorer:
    return scorer_from_config("auto")


def default_scorer() -> FaceScorer:
    """The process-wide "auto" scorer (built once; shared by request validation and engines
    configured with face_scorer="auto")."""
    with _DEFAULT_LOCK:
        return _default()


# ---------------------------------------------------------------------------------------
# reference photos of one person

MISMATCH_POLICIES = ("refuse", "drop")


@dataclass
class ReferenceCheck:
    """Do the reference photos show one person? Each photo is compared with the centroid of
    the *other* kept photos (leave-one-out; for two photos that is the pair's own distance).

    kept / dropped: photo indices; unscored: photos in which the scorer found no face (not
    checked); matches: per photo its leave-one-out `Match` (None for one photo or unscored);
    consistent: every kept photo agrees by the scorer's verdict; enforced: False when the scorer
    is the hand-crafted fallback (its verdict is unreliable, so nothing is refused or dropped);
    reference: centroid of the kept photos' descriptors (what outputs are scored against)."""

    kept: list[int]
    dropped: list[int]
    unscored: list[int]
    matches: list[Match | None]
    consistent: bool
    enforced: bool
    reference: np.ndarray | None
    notes: list[str]

    @property
    def consistency(self) -> float:
        """Lowest leave-one-out cosine similarity among kept photos (1.0 for one photo)."""
        sims = [self.matches[i].similarity for i in self.kept if self.matches[i] is not None]
        return min(sims) if sims else 1.0


def check_same_person(scorer: FaceScorer, descriptors: Sequence[np.ndarray | None], *, param: str = "photos",
                      policy: str = "refuse") -> ReferenceCheck:
    """Apply the one-person policy to the photos' descriptors (None: no face found by the
    scorer). policy "refuse": the photo that disagrees most → IdentityMismatchError naming
    `param[i]`; "drop": drop it with a note and check the rest again (at most half the photos
    may go; more → refused, since no majority says who the person is). Ties name the later photo."""
    if policy not in MISMATCH_POLICIES:
        raise ValueError(f"policy must be one of {MISMATCH_POLICIES}")
    n = len(descriptors)
    unscored = [i for i, d in enumerate(descriptors) if d is None]
    kept = [i for i, d in enumerate(descriptors) if d is not None]
    dropped: list[int] = []
    notes = [f"{param}[{i}]: the {scorer.name} scorer found no face; not checked against the others"
             for i in unscored]
    enforced = scorer.recognition_model
    matches: list[Match | None] = [None] * n
    consistent = True
    while len(kept) >= 2:
        for i in kept:
            matches[i] = scorer.compare(descriptors[i], scorer.centroid([descriptors[j] for j in kept if j != i]))
        worst = max(kept, key=lambda i: (matches[i].distance, i))
        if matches[worst].same:
            consistent = True
            break
        consistent = False
        if not enforced:
            notes.append(f"{param}[{worst}] may show another person ({scorer.name} distance "
                         f"{matches[worst].distance:.3f}); not enforced: the fallback scorer is not a "
                         "face-recognition model")
            break
        m = matches[worst]
        others = "the other photo" if len(kept) == 2 else f"the other {len(kept) - 1} photos"
        why = (f"{param}[{worst}] does not show the same person as {others} ({scorer.name}: distance "
               f"{m.distance:.2f}, same person below {scorer.threshold:g}); send photos of one person only")
        if policy == "refuse" or len(dropped) + 1 > n // 2:
            if policy == "drop":
                why += " (too many photos disagree to tell which person is meant)"
            raise IdentityMismatchError(why, param=f"{param}[{worst}]")
        dropped.append(worst)
        kept.remove(worst)
        notes.append(f"{param}[{worst}] was dropped: it does not show the same person as the other photos "
                     f"({scorer.name} distance {m.distance:.3f} >= {scorer.threshold:g})")
        consistent = True
    if len(kept) < 2:
        for i in kept:
            matches[i] = None
    reference = scorer.centroid([descriptors[i] for i in kept]) if kept else None
    return ReferenceCheck(kept=kept, dropped=sorted(dropped), unscored=unscored, matches=matches,
                          consistent=consistent, enforced=enforced, reference=reference, notes=notes)
