"""Typed reports of identity tasks, each with one `to_json` giving the fields it adds to a
result's JSON. The CLI's sidecar (protocol.result_to_wire), the service's worker payload and
the CLI's summary line all read these, so the report's shape is written once, here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


@dataclass
class IdentityReport:
    """Percify: how the identity was conditioned and how like the reference each output is.

    similarity / distance / same_identity / output_faces: one entry per output image (None
    where the scorer found no face or scoring was off); scorer: `FaceScorer.info()`."""

    source: str  # "photos" | "embedding"
    strength: float
    backend: str  # face analyzer backend
    method: str | None  # identity method that produced the images
    adapter: str  # the adapter's label, e.g. "faceid (random weights)"
    reference_photos: int
    faces: list[dict]
    notes: list[str]
    scorer: dict
    consistency: float | None
    reference_check: dict | None
    scored: bool
    similarity: list = field(default_factory=list)
    distance: list = field(default_factory=list)
    same_identity: list = field(default_factory=list)
    output_faces: list = field(default_factory=list)
    photo_files: list[str] | None = None  # the CLI's reference photo paths

    def to_json(self) -> dict[str, Any]:
        body = {
            "source": self.source, "strength": self.strength, "backend": self.backend, "method": self.method,
            "adapter": self.adapter, "referencePhotos": self.reference_photos, "faces": self.faces,
            "notes": self.notes, "scorer": self.scorer, "consistency": self.consistency,
            "referenceCheck": self.reference_check, "scored": self.scored, "similarity": self.similarity,
            "distance": self.distance, "sameIdentity": self.same_identity, "outputFaces": self.output_faces,
        }
        if self.photo_files is not None:
            body["photoFiles"] = self.photo_files
        return {"identity": _plain(body)}

    def summary(self) -> str:
        """One human-readable line: the scorer, its verdict rule and each image."""
        parts = []
        for i, (sim, dist, same) in enumerate(zip(self.similarity, self.distance, self.same_identity)):
            if sim is None:
                parts.append(f"image {i + 1}: no face found" if self.scored else f"image {i + 1}: not scored")
            else:
                parts.append(f"image {i + 1}: similarity {sim:.3f}, distance {dist:.3f} → "
                             f"{'same person' if same else 'NOT the same person'}")
        fallback = " [fallback: not a recognition model]" if self.scorer.get("fallback") else ""
        consistent = (self.reference_check or {}).get("consistent", True)
        return (f"identity by {self.scorer.get('name')} ({self.scorer.get('verdict')}){fallback}; reference photos "
                f"{'consistent' if consistent else 'INCONSISTENT'}: " + "; ".join(parts))


@dataclass
class CharacterReport:
    """One cast character: its region, identity, and per output image the face matched to it
    (`images`: similarity, distance, sameIdentity, faceBox, foundInRegion)."""

    index: int
    prompt: str
    region_prompt: str
    dropped_words: list
    box: list[float]
    pixel_box: list[int]
    has_identity: bool
    identity_source: str | None
    reference_photos: int
    reference_consistency: float | None
    notes: list[str]
    similarity: float | None  # mean over the images where a face was matched to this identity
    same_identity: bool | None
    images: list[dict]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "regionPrompt": self.region_prompt,
                "droppedWords": self.dropped_words, "box": self.box, "pixelBox": self.pixel_box,
                "hasIdentity": self.has_identity, "identitySource": self.identity_source,
                "referencePhotos": self.reference_photos, "referenceConsistency": self.reference_consistency,
                "notes": self.notes, "similarity": self.similarity, "sameIdentity": self.same_identity,
                "images": self.images}


@dataclass
class CastReport:
    """Cast: each character's report, the scorer, the layout used, and faces detected per image
    (None when no character had an identity to look for)."""

    characters: list[CharacterReport]
    scorer: dict
    layout: str
    identity_strength: float
    identity_method: str | None
    faces_detected: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"characters": [c.to_json() for c in self.characters], "scorer": self.scorer, "layout": self.layout,
               "identityStrength": self.identity_strength, "identityMethod": self.identity_method}
        if self.faces_detected:
            out["facesDetected"] = self.faces_detected
        return _plain(out)
