"""avatar-engine: prompt → avatar generation, percify-yourself and cast on diffusers.

The library never imports HTTP or Ray code; the service in `serve/` wraps it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import EngineConfig, IPAdapterSource, ModelProfile, SpeedOptions, load_profiles
from .errors import (AvatarEngineError, IdentityMismatchError, ImageError, NoFaceError, ProfileError,
                     RequestValidationError)
from .requests import (ASPECT_RATIOS, STYLE_PRESETS, CastCharacter, CastRequest, GenerationRequest, GenerationResult,
                       PercifyRequest)

if TYPE_CHECKING:
    from .engine import AvatarEngine, generate
    from .prompts import PromptBuilder

# The engine (diffusers, transformers) loads on first use of these names, not on `import
# avatar_engine`: the service's ingress imports the request types and the wire protocol and never
# runs a pipeline, so it starts without diffusers (seconds per replica, hundreds of MB less).
_ON_FIRST_USE = {"AvatarEngine": "engine", "generate": "engine", "PromptBuilder": "prompts"}


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'avatar_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AvatarEngine", "EngineConfig", "ModelProfile", "SpeedOptions", "IPAdapterSource", "load_profiles", "generate",
    "GenerationRequest", "GenerationResult", "PercifyRequest", "CastRequest", "CastCharacter", "PromptBuilder", "STYLE_PRESETS", "ASPECT_RATIOS",
    "AvatarEngineError", "RequestValidationError", "ImageError", "NoFaceError", "IdentityMismatchError", "ProfileError",
]
__version__ = "0.1.0"
