"""Cast requests: a scene prompt and 2..4 characters, each with its own prompt and optionally
its own face (photos or an identity embedding) and region box."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import RequestValidationError
from ..identity_methods import check_identity_method, method_for_profile, needs_photos
from .common import (CAST_CHARACTERS_RANGE, IDENTITY_STRENGTH_RANGE, MAX_REFERENCE_PHOTOS, PROMPT_MAX_CHARS,
                     check_photo_types, is_number, normed_embedding, refuse_other_people)
from .generate import GenerationRequest
from .layout import LAYOUTS, Box, auto_layout, box_overlap

MIN_BOX_SIDE = 0.1  # a region narrower or lower than 10 % of the frame cannot hold a person
MAX_BOX_OVERLAP = 0.25  # intersection / smaller box; more and two people share one region
DEFAULT_IDENTITY_STRENGTH = 0.8  # as percify-yourself


def _fail(param: str, message: str) -> RequestValidationError:
    return RequestValidationError(message, param=param)


@dataclass
class CastCharacter:
    """One person in a cast scene.

    prompt: what this person looks like / does (applied inside their region).
    photos: 0..5 reference photos (PIL images or encoded bytes) of this person.
    identity_embedding: a precomputed 512-d face embedding instead of photos (e.g. the face of
    an existing avatar). Without photos and embedding the character is prompt-only.
    box: optional region (x0, y0, x1, y1), normalised to 0..1 of the frame."""

    prompt: str
    photos: list = field(default_factory=list)
    identity_embedding: Any = None
    box: Sequence[float] | None = None

    @property
    def has_identity(self) -> bool:
        return bool(self.photos) or self.identity_embedding is not None

    def validate(self, i: int) -> None:
        p = f"characters[{i}]"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise _fail(f"{p}.prompt", f"{p}.prompt must be a non-empty string")
        if len(self.prompt) > PROMPT_MAX_CHARS:
            raise _fail(f"{p}.prompt", f"{p}.prompt must be at most {PROMPT_MAX_CHARS} characters")
        if not isinstance(self.photos, (list, tuple)) or len(self.photos) > MAX_REFERENCE_PHOTOS:
            raise _fail(f"{p}.photos",
                        f"{p}.photos must be a list of at most {MAX_REFERENCE_PHOTOS} photos of one person")
        check_photo_types(self.photos, f"{p}.photos")
        refuse_other_people(self.photos, f"{p}.photos")  # photos of two people: 400 at submit, naming one
        if self.identity_embedding is not None:
            if self.photos:
                raise _fail(f"{p}.identityEmbedding", f"{p}: give photos or identityEmbedding, not both")
            normed_embedding(self.identity_embedding, f"{p}.identityEmbedding")
        if self.box is not None:
            validate_box(self.box, f"{p}.box")


def validate_box(box: Any, param: str) -> Box:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(is_number(v) for v in box):
        raise _fail(param, f"{param} must be four numbers [x0, y0, x1, y1] in 0..1")
    x0, y0, x1, y1 = (float(v) for v in box)
    if min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
        raise _fail(param, f"{param} {list(box)} lies outside the frame; coordinates are fractions 0..1")
    if x1 <= x0 or y1 <= y0:
        raise _fail(param, f"{param} {list(box)} is empty: x1 must exceed x0 and y1 must exceed y0")
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        raise _fail(param, f"{param} {list(box)} is too small: each side must be at least {MIN_BOX_SIDE:g} "
                           f"of the frame")
    return x0, y0, x1, y1


@dataclass
class CastRequest(GenerationRequest):
    """Scene prompt (`prompt`) + 2..4 characters → images with a distinct person per region.

    layout: "auto" (from aspect ratio), "columns", "rows", or "custom" (every character has a
    box; given boxes imply custom). identity_strength: IP-Adapter scale for every identity."""

    characters: list = field(default_factory=list)
    layout: str = "auto"
    identity_strength: float = DEFAULT_IDENTITY_STRENGTH
    identity_method: str | None = None  # faceid | faceid-plus-v2 | instantid; None: the profile's default

    kind = "cast"

    def validate(self) -> None:
        super().validate()
        lo, hi = CAST_CHARACTERS_RANGE
        if not isinstance(self.characters, (list, tuple)) or not lo <= len(self.characters) <= hi:
            n = len(self.characters) if isinstance(self.characters, (list, tuple)) else "no"
            raise _fail("characters", f"characters must hold {lo} to {hi} characters, got {n}")
        for i, c in enumerate(self.characters):
            if not isinstance(c, CastCharacter):
                raise _fail(f"characters[{i}]", f"characters[{i}] must be a character with a prompt")
            c.validate(i)
        if self.layout not in LAYOUTS:
            raise _fail("layout", f"layout must be one of {', '.join(LAYOUTS)}")
        with_box = [c.box is not None for c in self.characters]
        if any(with_box):
            if self.layout not in ("auto", "custom"):
                raise _fail("layout", f"layout {self.layout!r} conflicts with explicit boxes; use 'custom' or 'auto'")
            missing = with_box.index(False) if not all(with_box) else None
            if missing is not None:
                raise _fail(f"characters[{missing}].box",
                            f"characters[{missing}].box is required: when one character has a box, every "
                            f"character needs one")
            boxes = [validate_box(c.box, f"characters[{i}].box") for i, c in enumerate(self.characters)]
            for j in range(len(boxes)):
                for i in range(j):
                    ov = box_overlap(boxes[i], boxes[j])
                    if ov > MAX_BOX_OVERLAP:
                        raise _fail(f"characters[{j}].box",
                                    f"characters[{j}].box overlaps characters[{i}].box by {ov:.0%} of the smaller box; "
                                    f"at most {MAX_BOX_OVERLAP:.0%} is allowed so each person keeps their own region")
        elif self.layout == "custom":
            raise _fail("layout", "layout 'custom' needs a box for every character")
        lo_s, hi_s = IDENTITY_STRENGTH_RANGE
        if not is_number(self.identity_strength) or not lo_s <= self.identity_strength <= hi_s:
            raise _fail("identityStrength", f"identityStrength must be a number between {lo_s:g} and {hi_s:g}")
        if self.init_image is not None:
            raise _fail("initImage", "cast does not take an init image")
        check_identity_method(self.identity_method)
        if needs_photos(self.identity_method):
            self._require_photos(self.identity_method)

    def _require_photos(self, method: str) -> None:
        for i, c in enumerate(self.characters):
            if c.identity_embedding is not None:
                raise _fail(f"characters[{i}].identityEmbedding",
                            f"identityMethod {method} reads each face's reference photo: characters[{i}] needs photos, "
                            f"not only an identityEmbedding")

    def resolve(self, profile) -> "CastRequest":
        """Also fixes the identity method (the profile's default when none is named)."""
        out = super().resolve(profile)
        method = None
        if getattr(profile, "identity_method", None) or self.identity_method:  # without methods: prompts only
            method = method_for_profile(profile, self.identity_method)
            if needs_photos(method):
                self._require_photos(method)
        return dataclasses.replace(out, identity_method=method)

    def region_boxes(self) -> tuple[str, list[Box]]:
        """(layout used, one normalised box per character). Needs width/height (resolve first)."""
        if self.characters and all(c.box is not None for c in self.characters):
            return "custom", [tuple(float(v) for v in c.box) for c in self.characters]  # type: ignore[misc]
        mode = self.layout
        if mode == "auto":
            mode = "rows" if self.height > self.width and len(self.characters) >= 3 else "columns"
        return mode, auto_layout(len(self.characters), self.width, self.height, mode)

    @property
    def uses_identity(self) -> bool:
        return any(c.has_identity for c in self.characters)
