"""The one registry of identity methods: their names, aliases and needs, and how a request's
method is resolved against what a model offers.

Everything that knows about identity methods (profiles in config.py, request validation, the
adapters, warm-up, the CLI's choices, the service's schema) reads it from here, so adding a
method is one entry below plus its adapter code (model/adapters/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .errors import RequestValidationError


@dataclass(frozen=True)
class IdentityMethod:
    """One identity method. `needs_photos`: it reads the aligned face crop of a reference photo
    (through CLIP), so a bare identity embedding is not enough; `architectures`: the model
    architectures it runs on; `tokens_per_face`: identity tokens its projection makes per face."""

    name: str
    description: str
    architectures: tuple[str, ...] = ("sd15", "sdxl")
    needs_photos: bool = False
    tokens_per_face: int = 4
    aliases: tuple[str, ...] = ()


METHODS: dict[str, IdentityMethod] = {m.name: m for m in (
    IdentityMethod("faceid", "IP-Adapter FaceID: the ArcFace identity as 4 tokens, plus its LoRA"),
    IdentityMethod("faceid-plus-v2", "IP-Adapter FaceID Plus v2: the identity plus CLIP features of the face crop",
                   needs_photos=True, aliases=("faceid-plusv2", "faceid_plus_v2")),
    IdentityMethod("instantid", "InstantID: a Resampler over the identity plus the IdentityNet ControlNet on "
                                "face keypoints", architectures=("sdxl",), tokens_per_face=16),
)}
#: Method names, in the order the docs and the API list them.
IDENTITY_METHODS: tuple[str, ...] = tuple(METHODS)
_ALIASES = {alias: m.name for m in METHODS.values() for alias in m.aliases}


def canonical_method(name: Any) -> Any:
    """A method's own name for one of its aliases (models.yaml spellings); anything else unchanged."""
    return _ALIASES.get(name, name) if isinstance(name, str) else name


def needs_photos(method: str | None) -> bool:
    """Whether `method` reads reference photos (None, or an unknown name: no)."""
    return method in METHODS and METHODS[method].needs_photos


def check_identity_method(value: Any, param: str = "identityMethod") -> None:
    """A known identity method name or None (which model offers it is checked at resolve)."""
    if value is not None and value not in METHODS:
        raise RequestValidationError(f"{param} must be one of {', '.join(IDENTITY_METHODS)}", param=param)


def resolve_method(model_name: str, offered: Sequence[str], method: str | None) -> str:
    """The request's identity method, or the model's default (`offered[0]`: default first). A
    model offering none, or a method it does not offer, is a RequestValidationError."""
    if not offered:
        raise RequestValidationError(
            f"model {model_name!r} has no IP-Adapter configured (identity_methods / ip_adapter in models.yaml), "
            f"so it cannot do identity-preserving generation", param="model")
    chosen = method or offered[0]
    if chosen not in offered:
        raise RequestValidationError(f"identityMethod {chosen!r} is not offered by model {model_name!r}; it offers "
                                     f"{', '.join(offered)}", param="identityMethod")
    return chosen


def method_for_profile(profile: Any, method: str | None) -> str | None:
    """`resolve_method` against a profile's offer (`ModelProfile.offered_identity_methods`). A
    stand-in profile that says nothing about identity methods (a test or benchmark engine's)
    leaves the method as asked."""
    offered = getattr(profile, "offered_identity_methods", None)
    if offered is None:
        return method
    return resolve_method(profile.name, offered, method)
