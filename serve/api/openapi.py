"""OpenAPI additions for the routes that parse their own body (JSON or multipart)."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .. import schemas as S

_STR, _NUM, _INT = {"type": "string"}, {"type": "number"}, {"type": "integer"}
_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}

PERCIFY_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/PercifyRequest"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "photo": {**_FILES, "minItems": 1, "maxItems": 5},
        "photoUrl": {**_STR, "description": "An http(s) photo URL (instead of or besides file parts)"},
        "photoUrls": {"type": "array", "items": _STR, "maxItems": 5},
        "prompt": _STR, "stylePreset": _STR, "aspectRatio": _STR, "identityStrength": _NUM, "seed": _INT,
        "identityMethod": _STR, "model": _STR, "guidanceScale": _NUM, "steps": _INT, "batchSize": _INT, "negativePrompt": _STR,
        "title": _STR, "visibility": _STR,
    }}}}}}

CAST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/CastRequest"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["prompt", "characters"], "properties": {
        "prompt": _STR,
        "characters": {"type": "string", "description": "JSON list of {prompt, avatarId?} (no photos)"},
        "photo0": _FILES, "photo1": _FILES, "layout": _STR, "seed": _INT, "model": _STR,
        "identityStrength": _NUM, "identityMethod": _STR,
    }}}}}}


def install_openapi(app: FastAPI) -> None:
    """FastAPI's schema plus the JSON bodies of the routes that parse their own body, so every
    `$ref` resolves."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (S.PercifyRequest, S.CastRequest):
            schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            comps.update(schema.pop("$defs", {}))
            comps[model.__name__] = schema
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
