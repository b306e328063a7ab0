"""Deprecated alias: cast moved to `avatar_engine.requests` (CastRequest, CastCharacter) and
`avatar_engine.tasks.cast` (CastTask). Kept so existing imports keep working; import from the
new places."""
from __future__ import annotations

import warnings

from .protocol import request_from_dict
from .requests import MAX_BOX_OVERLAP, MIN_BOX_SIDE, CastCharacter, CastRequest, validate_box
from .tasks.cast import CastPlan, CastTask, identity_report

warnings.warn("avatar_engine.cast is deprecated: import CastRequest and CastCharacter from avatar_engine (or "
              "avatar_engine.requests) and CastTask from avatar_engine.tasks", DeprecationWarning, stacklevel=2)


def cast_request_from_dict(data: dict) -> CastRequest:
    """A validated CastRequest from API-style JSON (`protocol.request_from_dict(data, CastRequest)`)."""
    return request_from_dict(data, CastRequest)


__all__ = ["MAX_BOX_OVERLAP", "MIN_BOX_SIDE", "CastCharacter", "CastPlan", "CastRequest", "CastTask",
           "cast_request_from_dict", "identity_report", "validate_box"]
