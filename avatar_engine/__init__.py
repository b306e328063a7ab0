"""avatar-engine: prompt → avatar generation, percify-yourself and cast on diffusers.

The library never imports HTTP or Ray code; the service in `serve/` wraps it.
"""
from .config import EngineConfig, IPAdapterSource, ModelProfile, SpeedOptions, load_profiles
from .engine import AvatarEngine, generate
from .errors import (AvatarEngineError, IdentityMismatchError, ImageError, NoFaceError, ProfileError,
                     RequestValidationError)
from .prompts import PromptBuilder
from .requests import (ASPECT_RATIOS, STYLE_PRESETS, CastCharacter, CastRequest, GenerationRequest, GenerationResult,
                       PercifyRequest)

__all__ = [
    "AvatarEngine", "EngineConfig", "ModelProfile", "SpeedOptions", "IPAdapterSource", "load_profiles", "generate",
    "GenerationRequest", "GenerationResult", "PercifyRequest", "CastRequest", "CastCharacter", "PromptBuilder", "STYLE_PRESETS", "ASPECT_RATIOS",
    "AvatarEngineError", "RequestValidationError", "ImageError", "NoFaceError", "IdentityMismatchError", "ProfileError",
]
__version__ = "0.1.0"
