"""The OpenAPI document: FastAPI's, plus what it cannot know on its own, so that the document
says exactly what the app accepts (schema fuzzing checks it, `tests/test_schema_fuzz.py`):

- the JSON and multipart bodies of the routes that parse their own body (percify-yourself, cast),
  the multipart fields derived from the same wire models as the JSON ones (`metadata` and
  `characters` parts are JSON documents, `tags` comma-separated text, photos image files);
- bearer auth (`components.securitySchemes`, `security`), so generated clients send the key;
- the `model` names this deployment serves (its profiles and their aliases), the identity methods
  and the styles its profiles offer as enums: the served `/v1/openapi.json` is built once per app
  from the engine's profile table.
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from .. import schemas as S

#: Operations that need no API key.
PUBLIC_PATHS = ("/v1/health", "/v1/models")
#: Request bodies that name a `model` (their JSON component and multipart variant).
MODEL_BODIES = ("GenerateRequest", "PercifyRequest", "CastRequest")
#: Request bodies that name a `stylePreset` (remix's runs on its source's model).
STYLE_BODIES = (*MODEL_BODIES, "RemixRequest")

_FILES = {"type": "array", "items": {"type": "string", "format": "binary"},
          "description": "Image files (PNG, JPEG or WebP; each side at least 64 px)"}
#: `tags` as a form field: comma-separated, at most 20 pieces of at most 50 characters (blank ones dropped).
_FORM_TAGS = {"type": "string", "pattern": f"^[^,]{{0,{S.MAX_TAG_CHARS}}}(?:,[^,]{{0,{S.MAX_TAG_CHARS}}}){{0,{S.MAX_TAGS - 1}}}$",
              "description": "Comma-separated tags"}
#: Form fields that carry a JSON document (the rest are text).
_JSON_PART = {"contentType": "application/json"}


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A property as a form field: text or a JSON part, never null (a form cannot send null)."""
    schema = {k: v for k, v in schema.items() if not (k == "default" and v is None)}
    options = schema.pop("anyOf", None)
    if options:
        kept = [o for o in options if o.get("type") != "null"]
        schema = {**(kept[0] if len(kept) == 1 else {"anyOf": kept}), **schema}
    return schema


def _form_schema(model: type, drop: tuple[str, ...], extra: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """The multipart variant of a JSON body model: the same fields (minus `drop`) plus `extra`."""
    full = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    props = {name: _not_null(p) for name, p in full["properties"].items() if name not in drop}
    if "tags" in props:
        props["tags"] = _FORM_TAGS
    return {"type": "object", "additionalProperties": False, "required": required, "properties": {**props, **extra}}


PERCIFY_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/PercifyRequest"}},
    "multipart/form-data": {"schema": {**_form_schema(
        S.PercifyRequest, ("photos",), {"photo": {**_FILES, "minItems": 1, "maxItems": 5}}, []),
        # at least one photo: file parts, photoUrl or photoUrls
        "anyOf": [{"required": ["photo"]}, {"required": ["photoUrl"]}, {"required": ["photoUrls"]}],
        "not": {"required": ["photoUrl", "imageUrl"]}},  # imageUrl is photoUrl's other name
        "encoding": {"metadata": _JSON_PART}},
}}}

_FORM_CHARACTER = {"type": "object", "additionalProperties": False, "required": ["prompt"], "properties": {
    k: v for k, v in S.CastCharacterIn.model_json_schema(by_alias=True)["properties"].items() if k != "photos"}}

CAST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/CastRequest"}},
    "multipart/form-data": {"schema": _form_schema(S.CastRequest, ("characters",), {
        "characters": {"type": "array", "minItems": 2, "maxItems": 4, "items": _FORM_CHARACTER,
                       "description": "JSON list of {prompt, box?, avatarId?}: the characters without photos"},
        **{f"photo{i}": {**_FILES, "maxItems": 5, "description": f"Reference photos of character {i}"}
           for i in range(4)},
    }, ["prompt", "characters"]), "encoding": {
        "characters": _JSON_PART, "metadata": _JSON_PART}},
}}}


def install_openapi(app: FastAPI) -> None:
    """`app.openapi()` (FastAPI's schema plus the bodies, security and public paths above) and the
    served `/v1/openapi.json` (that plus this deployment's model names)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (S.PercifyRequest, S.CastRequest):
            schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            comps.update(schema.pop("$defs", {}))
            comps[model.__name__] = schema
        storable_text(spec)
        # Bearer auth on every operation but the public ones, so generated clients send the key.
        spec["components"]["securitySchemes"] = {"bearerAuth": {
            "type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer ak_live_…`"}}
        spec["security"] = [{"bearerAuth": []}]
        for path in PUBLIC_PATHS:
            for op in spec["paths"].get(path, {}).values():
                op["security"] = []
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    url = app.openapi_url
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != url]

    @app.get(url, include_in_schema=False)
    async def served_openapi(request: Request) -> JSONResponse:
        return JSONResponse(await served_document(request.app))


#: Text any store keeps (PostgreSQL refuses NUL; `textguard` answers it with a 400).
_NO_NUL = {"pattern": r"^[^\x00]*$"}
_STORABLE_REF = {"$ref": "#/components/schemas/StorableJson"}
_METADATA = {"type": "object", "propertyNames": _NO_NUL, "additionalProperties": _STORABLE_REF,
             "description": "Free-form JSON object (≤ 16 KB of JSON; no NUL character in keys or strings)."}


#: Request bodies whose strings the app takes (every one passes `textguard`).
REQUEST_BODIES = ("GenerateRequest", "PercifyRequest", "CastRequest", "CastCharacterIn", "RemixRequest",
                  "UpdateAvatarRequest", "CommentRequest", "WebhookCreateRequest")


def _no_nul(schema: Any) -> None:
    """Every free string in `schema` (recursively) states that it holds no NUL."""
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "string" and "enum" not in schema and "const" not in schema \
            and schema.get("format") != "binary":
        if "pattern" not in schema:
            schema["pattern"] = _NO_NUL["pattern"]
        elif schema["pattern"] != _NO_NUL["pattern"]:
            schema.setdefault("allOf", []).append(dict(_NO_NUL))
    for key in ("properties",):
        for sub in (schema.get(key) or {}).values():
            _no_nul(sub)
    for key in ("items", "additionalProperties"):
        _no_nul(schema.get(key))
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            _no_nul(sub)


def storable_text(spec: dict[str, Any]) -> None:
    """What `textguard` refuses, stated in the schema: no NUL in request strings (bodies, form
    fields, path and query parameters), and `metadata` any JSON object without NUL."""
    storable_metadata(spec)
    comps = spec["components"]["schemas"]
    for name in REQUEST_BODIES:
        _no_nul(comps.get(name))
    for path in spec["paths"].values():
        for op in path.values():
            for param in op.get("parameters", []):
                _no_nul(param.get("schema"))
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            _no_nul(form)


def storable_metadata(spec: dict[str, Any]) -> None:
    """`metadata` as what is accepted: any JSON object whose keys and strings hold no NUL."""
    comps = spec["components"]["schemas"]
    comps["StorableJson"] = {"description": "Any JSON value without NUL characters in its strings or keys.", "anyOf": [
        {"type": "string", **_NO_NUL}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": _STORABLE_REF},
        {"type": "object", "propertyNames": _NO_NUL, "additionalProperties": _STORABLE_REF}]}

    def fix(props: dict[str, Any]) -> None:
        meta = props.get("metadata")
        if not isinstance(meta, dict):
            return
        if "anyOf" in meta:
            meta["anyOf"] = [dict(_METADATA) if o.get("type") == "object" else o for o in meta["anyOf"]]
        elif meta.get("type") == "object":
            props["metadata"] = {**dict(_METADATA), **{k: v for k, v in meta.items() if k in ("title",)}}

    for schema in comps.values():
        fix(schema.get("properties", {}))
    for path in spec["paths"].values():
        for op in path.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            fix(form.get("properties", {}))


async def served_document(app: FastAPI) -> dict[str, Any]:
    """The document `/v1/openapi.json` serves: `app.openapi()` with `model` restricted to the
    names this deployment accepts (profiles and aliases). Built once per app."""
    cached = getattr(app.state, "served_openapi", None)
    if cached is None:
        desc = await app.state.services.engine.describe()
        methods = sorted({m for p in desc.profiles.values() for m in getattr(p, "identity_methods", ())})
        styles = list(dict.fromkeys(s["name"] for p in desc.profiles.values() for s in p.styles))
        cached = with_model_names(app.openapi(), desc.names(), methods, styles)
        app.state.served_openapi = cached
    return cached


def with_model_names(spec: dict[str, Any], names: list[str], methods: list[str] | None = None,
                     styles: list[str] | None = None) -> dict[str, Any]:
    """A copy of `spec` whose request bodies accept only `names` as `model` and (when given) only
    `methods` (the identity methods the served profiles offer) as `identityMethod` and `styles`
    (the styles they offer; each model's own list is in GET /v1/models) as `stylePreset`."""
    out = copy.deepcopy(spec)
    enums = {"model": {"type": "string", "enum": list(names)}}
    if methods:  # none served: any identityMethod is refused, and an empty enum is not valid everywhere
        enums["identityMethod"] = {"type": "string", "enum": list(methods)}
    if styles:
        enums["stylePreset"] = {"type": "string", "enum": list(styles)}
    comps = out["components"]["schemas"]
    for name in STYLE_BODIES:
        props = comps.get(name, {}).get("properties", {})
        for field, enum in enums.items():
            if field in props:
                props[field] = {"anyOf": [enum, {"type": "null"}], "description": props[field].get("description", "")}
    for path in out["paths"].values():
        for op in path.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
            for field, enum in enums.items():
                if field in form.get("properties", {}):
                    form["properties"][field] = dict(enum)
    return out
