"""Which face backends can condition which identity weights.

The released FaceID, FaceID Plus v2 and InstantID weights were trained on ArcFace embeddings
(insightface's recognisers). A backend that embeds faces in another space (the embedded,
hand-crafted descriptor) still produces a 512-d vector, so nothing fails: the avatars just lose
the person's likeness. This module names the mismatch so a service can refuse it at start.
Tiny / random identity weights are not trained on anything and accept any backend.
"""
from __future__ import annotations

from ..config import ModelProfile

#: Backends whose embeddings live in ArcFace's space (what the released identity weights expect).
ARCFACE_BACKENDS = frozenset({"insightface"})


def produces_arcface(backend: str) -> bool:
    return backend in ARCFACE_BACKENDS


def trained_identity_methods(profile: ModelProfile) -> list[str]:
    """The profile's identity methods that load real (trained, non-tiny) weights."""
    return [name for name, source in profile.identity_methods.items() if not source.tiny]


def arcface_mismatch(profile: ModelProfile, backend: str) -> str | None:
    """One line explaining why `backend` cannot condition `profile`'s trained identity weights,
    or None when it can (ArcFace backend, or no trained identity weights)."""
    methods = trained_identity_methods(profile)
    if not methods or produces_arcface(backend):
        return None
    return (f"profile {profile.name!r} serves identity weights trained on ArcFace embeddings "
            f"({', '.join(methods)}) but the face backend {backend!r} does not produce ArcFace embeddings: "
            f"avatars would lose the person's likeness. Use face backend "
            f"{' or '.join(sorted(ARCFACE_BACKENDS))} (with its model pack), or set the explicit override "
            f"to serve it anyway")
