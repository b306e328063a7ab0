"""Face analysis behind one interface (`FaceAnalyzer`): the offline `EmbeddedFaceAnalyzer`
(default; real detection, hand-crafted embedding) and the production `InsightFaceAnalyzer`
(ArcFace embeddings, as IP-Adapter FaceID expects). Those give the *conditioning* embedding.
Identity *scoring* is a separate interface (`FaceScorer`, scoring.py): dlib's ResNet face
descriptor by default, ArcFace optionally, the hand-crafted descriptor only as a labelled fallback."""
from __future__ import annotations

from ..errors import ProfileError
from .base import (ALIGNED_SIZE, ARCFACE_TEMPLATE, EMBEDDING_DIM, Face, FaceAnalyzer, IdentityReference,
                   align_face, alignment_matrix, analyze_reference_photos, combine_embeddings,
                   cosine_similarity, l2_normalize, largest_face)
from .embedded import EmbeddedFaceAnalyzer
from .insightface_backend import InsightFaceAnalyzer
from .scoring import DlibScorer, FaceScorer, Match, default_scorer, scorer_from_config

BACKENDS = ("embedded", "insightface")


def face_analyzer_from_config(backend: str = "embedded", **options) -> FaceAnalyzer:
    """Build a backend by name; options go to its constructor (e.g. model_root, name,
    providers, det_size for insightface; detector, max_side for embedded)."""
    if backend == "embedded":
        return EmbeddedFaceAnalyzer(**options)
    if backend == "insightface":
        return InsightFaceAnalyzer(**options)
    raise ProfileError(f"unknown face backend {backend!r}; choose one of {', '.join(BACKENDS)}",
                       param="faceBackend")


__all__ = ["ALIGNED_SIZE", "ARCFACE_TEMPLATE", "BACKENDS", "EMBEDDING_DIM", "DlibScorer", "EmbeddedFaceAnalyzer",
           "Face", "FaceAnalyzer", "FaceScorer", "Match", "default_scorer", "scorer_from_config", "IdentityReference",
           "InsightFaceAnalyzer", "align_face", "alignment_matrix", "analyze_reference_photos", "combine_embeddings",
           "cosine_similarity", "face_analyzer_from_config", "l2_normalize", "largest_face"]
