"""Identity services shared by percify and cast: an engine's face scorer, its cache of analysed
reference photos, and scoring of outputs against references.

Conditioning and scoring are separate (faces/scoring.py): the face analyzer gives the 512-d
embedding the identity methods condition on; the face *scorer* (dlib's ResNet descriptor by
default) produces every identity number reported.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..faces import align_face, analyze_reference_photos, combine_embeddings
from ..faces.descriptors import check_reference_identity, image_digest
from ..faces.scoring import FaceScorer, ReferenceCheck, default_scorer, scorer_from_config
from ..requests.common import PHOTOS_PARAM, photo_param

REFERENCE_CACHE_SIZE = 32
CROP_SIZE = 224  # aligned face crop side for CLIP (faceid-plus-v2)


@dataclass
class IdentityConditioning:
    """What one percify request (or one cast character) conditions on and is scored against."""

    embedding: np.ndarray  # 512-d, L2-normed: the conditioning identity
    source: str  # "photos" | "embedding"
    faces: list[dict] = field(default_factory=list)  # per reference photo
    notes: list[str] = field(default_factory=list)
    consistency: float | None = None  # lowest leave-one-out cosine similarity of the scorer's descriptors
    crops: list = field(default_factory=list)  # aligned 224 px face crops (faceid-plus-v2 only)
    kps: np.ndarray | None = None  # 5 keypoints of the first kept photo's face, in its pixels (instantid)
    photo_size: tuple[int, int] | None = None  # (width, height) of that photo
    score_reference: np.ndarray | None = None  # scorer centroid of the kept photos (None: nothing to score against)
    check: dict | None = None  # the reference-photo check, as reported


def _face_json(face) -> dict:
    return {"bbox": [round(float(v), 1) for v in face.bbox], "detScore": round(float(face.det_score), 4),
            "size": round(min(face.width, face.height), 1)}


def _check_json(check: ReferenceCheck, param: str) -> dict:
    return {"consistent": check.consistent, "enforced": check.enforced,
            "dropped": [photo_param(i, param) for i in check.dropped],
            "unscored": [photo_param(i, param) for i in check.unscored],
            "photos": [None if m is None else {"photo": photo_param(i, param), **m.to_json()}
                       for i, m in enumerate(check.matches)]}


class IdentityServices:
    """One engine's face scorer and reference-photo cache (kept on the engine, so two engines in
    one process never share a scorer picked by another's config)."""

    def __init__(self, engine):
        self.engine = engine
        self._scorer: FaceScorer | None = None
        self._references: OrderedDict = OrderedDict()

    @property
    def analyzer(self):
        return self.engine.face_analyzer

    @property
    def scorer(self) -> FaceScorer:
        """From `EngineConfig.face_scorer` ("auto": the process-wide default, dlib when installed
        — the same object request validation uses, so reference photos are described once)."""
        if self._scorer is None:
            name = getattr(self.engine.config, "face_scorer", "auto") or "auto"
            if name == "auto" or (name == "dlib" and default_scorer().name == "dlib-resnet"):
                self._scorer = default_scorer()
            else:
                analyzer = self.analyzer if name in ("arcface", "handcrafted") else None
                self._scorer = scorer_from_config(name, analyzer=analyzer)
        return self._scorer

    @scorer.setter
    def scorer(self, scorer: FaceScorer) -> None:
        self._scorer = scorer

    def analyze(self, photos: Sequence, min_face_size: int, *, param: str = PHOTOS_PARAM, crops: bool = False,
                mismatched: str = "refuse") -> IdentityConditioning:
        """Reference photos → identity, applying the face policy (errors name `param[i]`) and the
        one-person check by the scorer (refuse or drop, see `check_same_person`). Cached by pixel
        content (a user often sends the same photos again, to percify or cast; detection dominates
        a tiny model's cost). Callers hold the engine lock and must not mutate the result."""
        analyzer, scorer = self.analyzer, self.scorer
        key = (id(analyzer), id(scorer), min_face_size, crops, param, mismatched,
               tuple(image_digest(p) for p in photos))
        if key in self._references:
            self._references.move_to_end(key)
            return self._references[key]
        ref = analyze_reference_photos(analyzer, list(photos), param=param, min_face_size=min_face_size)
        check = check_reference_identity(scorer, photos, param, mismatched)
        faces = []
        for i, (n, face) in enumerate(zip(ref.faces_per_photo, ref.used_faces)):
            faces.append({"photo": photo_param(i, param), "found": int(n), "used": _face_json(face),
                          "usedRule": "largest" if n > 1 else "only", "dropped": i in check.dropped})
        kept = [i for i in range(len(photos)) if i not in check.dropped]
        embedding = ref.embedding if not check.dropped else combine_embeddings([ref.used_faces[i].embedding
                                                                                for i in kept])
        cond = IdentityConditioning(embedding=np.asarray(embedding, np.float32), source="photos", faces=faces,
                                    notes=list(ref.notes) + check.notes,
                                    consistency=round(float(check.consistency), 4),
                                    score_reference=check.reference, check=_check_json(check, param))
        if kept:
            cond.kps = np.asarray(ref.used_faces[kept[0]].kps, np.float64)
            cond.photo_size = tuple(photos[kept[0]].size)
        if crops:
            cond.crops = [align_face(photos[i], ref.used_faces[i].kps, CROP_SIZE) for i in kept]
        self._references[key] = cond
        while len(self._references) > REFERENCE_CACHE_SIZE:
            self._references.popitem(last=False)
        return cond

    def scoring_reference(self, cond: IdentityConditioning | None, embedding) -> np.ndarray | None:
        """What outputs are scored against: the photos' scorer centroid; for a bare identity
        embedding only when the scorer works in the conditioning space (same analyzer), else None."""
        if cond is not None and cond.score_reference is not None:
            return cond.score_reference
        if embedding is not None and getattr(self.scorer, "analyzer", None) is self.analyzer:
            return np.asarray(embedding, np.float32)
        return None


def identity_similarity(scorer: FaceScorer, reference: np.ndarray | None, image) -> tuple[Any, int]:
    """(`Match` of the largest face the scorer finds in `image` against `reference`, faces
    found); the match is None when no face is found or there is no reference."""
    faces = scorer.describe(image)
    if not faces or reference is None:
        return None, len(faces)
    return scorer.compare(reference, faces[0].descriptor), len(faces)


def match_faces(scorer: FaceScorer, references: Sequence[np.ndarray | None],
                descriptors: Sequence[np.ndarray]) -> list:
    """One-to-one assignment of faces to references minimising the total scorer distance
    (Hungarian algorithm). Returns (face index, Match) per reference; (None, None) for a
    reference that is None or left without a face."""
    from scipy.optimize import linear_sum_assignment

    out: list = [(None, None)] * len(references)
    rows = [i for i, r in enumerate(references) if r is not None]
    if not rows or len(descriptors) == 0:
        return out
    cost = np.array([[scorer.distance(references[i], d) for d in descriptors] for i in rows])
    for r, c in zip(*linear_sum_assignment(cost)):
        out[rows[r]] = (int(c), scorer.compare(references[rows[r]], descriptors[c]))
    return out


def face_scorer(engine) -> FaceScorer:
    """The engine's face scorer (`engine.identity.scorer`)."""
    return engine.identity.scorer

