"""Typed requests (generate, percify, cast) and their validators; no wire format (protocol.py),
no model code. A request's `validate()` is what a service runs at submit time; `resolve(profile)`
returns a copy with every default filled in (seed, size, steps, guidance, identity method)."""
from __future__ import annotations

from .cast import DEFAULT_IDENTITY_STRENGTH, MAX_BOX_OVERLAP, MIN_BOX_SIDE, CastCharacter, CastRequest, validate_box
from .common import (ASPECT_RATIOS, CAST_CHARACTERS_RANGE, EMBEDDING_DIM, GUIDANCE_RANGE, IDENTITY_STRENGTH_RANGE,
                     MAX_BATCH_SIZE, MAX_REFERENCE_PHOTOS, PHOTOS_PARAM, PROMPT_MAX_CHARS, SEED_MAX, STEPS_RANGE,
                     STYLE_PRESETS, check_photo_types, check_photos, load_photo, normed_embedding, refuse_other_people,
                     size_for_aspect_ratio)
from .generate import GenerationRequest, GenerationResult
from .layout import LAYOUTS, Box, auto_layout, box_overlap, pixel_box
from .percify import PercifyRequest

__all__ = [
    "ASPECT_RATIOS", "CAST_CHARACTERS_RANGE", "DEFAULT_IDENTITY_STRENGTH", "EMBEDDING_DIM", "GUIDANCE_RANGE",
    "IDENTITY_STRENGTH_RANGE", "LAYOUTS", "MAX_BATCH_SIZE", "MAX_BOX_OVERLAP", "MAX_REFERENCE_PHOTOS", "MIN_BOX_SIDE",
    "PHOTOS_PARAM", "PROMPT_MAX_CHARS", "SEED_MAX", "STEPS_RANGE", "STYLE_PRESETS", "Box", "CastCharacter",
    "CastRequest", "GenerationRequest", "GenerationResult", "PercifyRequest", "auto_layout", "box_overlap",
    "check_photo_types", "check_photos", "load_photo", "normed_embedding", "pixel_box", "refuse_other_people",
    "size_for_aspect_ratio", "validate_box",
]
