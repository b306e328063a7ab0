"""Percify-yourself requests: a prompt and 1..5 photos of one person (or a precomputed identity).

Validation here is what a service runs at submit time (no engine): field ranges, photo types,
the identity method's needs, and the one-person check by the default face scorer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestValidationError
from ..faces.scoring import MISMATCH_POLICIES
from ..identity_methods import check_identity_method, method_for_profile, needs_photos
from .common import (IDENTITY_STRENGTH_RANGE, PHOTOS_PARAM, check_photo_types, check_photos, is_number, load_photo,
                     normed_embedding, photo_param, refuse_other_people)
from .generate import GenerationRequest


@dataclass
class PercifyRequest(GenerationRequest):
    """Prompt + 1..5 photos of one person → avatars with that person's face.

    photos: PIL images or encoded image bytes (JPEG/PNG/WebP; decoded safely by
    `images.load_image`). identity_strength: IP-Adapter scale, 0 = plain generation.
    identity_embedding: a precomputed 512-d identity (e.g. from an earlier request or the cast
    task) used instead of photos. score_outputs: False skips the per-image similarity (the
    report then says `"scored": false`), e.g. for throughput benchmarks.
    mismatched_photos: "refuse" (default) — photos that are not one person by the face scorer's
    verdict are an `IdentityMismatchError` naming the odd photo, raised by `validate()` (so a
    service refuses them at submit time); "drop" — the odd photos are left out with a note (at
    most half of them)."""

    photos: list = field(default_factory=list)
    identity_strength: float = 0.8
    identity_embedding: Any = None
    score_outputs: bool = True  # face-analyse every output for the similarity report (CPU time per image)
    mismatched_photos: str = "refuse"
    identity_method: str | None = None  # faceid | faceid-plus-v2 | instantid; None: the profile's default

    kind = "percify"

    def validate(self) -> None:
        super().validate()
        lo, hi = IDENTITY_STRENGTH_RANGE
        if not (is_number(self.identity_strength) and lo <= self.identity_strength <= hi):
            raise RequestValidationError(f"identityStrength must be a number between {lo:g} and {hi:g}",
                                         param="identityStrength")
        if self.mismatched_photos not in MISMATCH_POLICIES:
            raise RequestValidationError(f"mismatchedPhotos must be one of {', '.join(MISMATCH_POLICIES)}",
                                         param="mismatchedPhotos")
        check_identity_method(self.identity_method)
        if self.identity_embedding is not None:
            if self.photos:
                raise RequestValidationError("pass photos or identityEmbedding, not both", param="identityEmbedding")
            if needs_photos(self.identity_method):
                raise RequestValidationError(f"identityMethod {self.identity_method} reads the face crop of a reference "
                                             f"photo: send photos, not only an identityEmbedding", param="identityEmbedding")
            normed_embedding(self.identity_embedding)
            return
        check_photos(self.photos, PHOTOS_PARAM)
        check_photo_types(self.photos, PHOTOS_PARAM)
        if self.mismatched_photos == "refuse":
            refuse_other_people(self.photos, PHOTOS_PARAM)

    def resolve(self, profile) -> "PercifyRequest":
        """Also decodes photo bytes (errors name `photos[i]`) and normalises the embedding."""
        out = super().resolve(profile)
        photos = [load_photo(p, photo_param(i)) for i, p in enumerate(self.photos)]
        emb = None if self.identity_embedding is None else normed_embedding(self.identity_embedding)
        method = method_for_profile(profile, self.identity_method)
        if emb is not None and needs_photos(method):
            raise RequestValidationError(f"model {profile.name!r} uses identityMethod {method}, which reads the face "
                                         f"crop of a reference photo: send photos, not only an identityEmbedding",
                                         param="identityEmbedding")
        return dataclasses.replace(out, photos=photos, identity_strength=float(self.identity_strength),
                                   identity_embedding=emb, identity_method=method)
