"""Deprecated alias: percify moved to `avatar_engine.requests` (PercifyRequest),
`avatar_engine.tasks.percify` (PercifyTask) and `avatar_engine.tasks.identity` (identity
services). Kept so existing imports keep working; import from the new places."""
from __future__ import annotations

import warnings

from .faces.descriptors import check_reference_identity, reference_descriptor
from .identity_methods import check_identity_method
from .requests import PercifyRequest
from .requests.common import check_photo_types, load_photo, normed_embedding, refuse_other_people
from .tasks.identity import IdentityConditioning, face_scorer, identity_similarity, match_faces
from .tasks.percify import PercifyTask

warnings.warn("avatar_engine.identity is deprecated: import PercifyRequest from avatar_engine (or "
              "avatar_engine.requests) and PercifyTask from avatar_engine.tasks", DeprecationWarning, stacklevel=2)

__all__ = ["IdentityConditioning", "PercifyRequest", "PercifyTask", "check_identity_method", "check_photo_types",
           "check_reference_identity", "face_scorer", "identity_similarity", "load_photo", "match_faces",
           "normed_embedding", "reference_descriptor", "refuse_other_people"]
