"""Errors raised by the engine. Each names what is wrong so a caller (CLI, HTTP layer) can
map it to a user-facing message without parsing strings."""
from __future__ import annotations


class AvatarEngineError(Exception):
    """Base class. `code` matches the API's error codes where one applies."""

    code = "engine_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class RequestValidationError(AvatarEngineError, ValueError):
    """A request field is invalid; `param` is the field's API (camelCase) name."""

    code = "invalid_request"


class ImageError(RequestValidationError):
    """An uploaded image is unsupported, corrupt, too large or too small."""


class NoFaceError(RequestValidationError):
    """A reference photo holds no usable face."""


class IdentityMismatchError(RequestValidationError):
    """The reference photos of one person are not the same person (by the face scorer's
    verdict); `param` names the odd photo, e.g. `photos[1]`."""


class ProfileError(AvatarEngineError):
    """A model profile is unknown, misconfigured, or its weights cannot be found."""

    code = "model_unavailable"
