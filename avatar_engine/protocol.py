"""The wire format and its one conversion to and from the engine's request dataclasses.

The wire format is the API's camelCase JSON: what `POST /v1/avatars/*` accepts, what the service
stores as a job's `params` and hands to its worker, what the CLI's JSONL batches and result
sidecars hold. Everything that turns wire fields into an engine request (or back) goes through
this module: `request_from_wire` (wire → request), `request_to_wire` (request → wire) and
`result_to_wire` (a finished result → the JSON sidecar / report).

Photos travel as whatever the caller has: decoded images or bytes in the library and CLI, asset
keys in stored jobs (the worker passes `load=` to turn each key into an image).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .errors import RequestValidationError
from .requests import CastCharacter, CastRequest, GenerationRequest, GenerationResult, PercifyRequest

#: Wire name → field of every request (GenerationRequest).
COMMON_FIELDS: dict[str, str] = {
    "prompt": "prompt", "negativePrompt": "negative_prompt", "stylePreset": "style_preset",
    "aspectRatio": "aspect_ratio", "guidanceScale": "guidance_scale", "seed": "seed", "batchSize": "batch_size",
    "steps": "steps", "model": "model", "styleStrength": "style_strength",
}
#: Wire fields of one task beyond the common ones (wire name → request field).
TASK_FIELDS: dict[str, dict[str, str]] = {
    "generate": {"strength": "strength"},
    "remix": {"strength": "strength", "initImage": "init_image"},
    "percify": {"photos": "photos", "identityStrength": "identity_strength", "identityEmbedding": "identity_embedding",
                "identityMethod": "identity_method"},
    "cast": {"characters": "characters", "layout": "layout", "identityStrength": "identity_strength",
             "identityMethod": "identity_method"},
}
#: Wire name → field of one cast character.
CHARACTER_FIELDS: dict[str, str] = {
    "prompt": "prompt", "photos": "photos", "identityEmbedding": "identity_embedding", "box": "box",
}
#: Filled by `resolve()`; reported back, never read from the wire (the profile decides them).
RESOLVED_FIELDS: dict[str, str] = {"width": "width", "height": "height"}
#: The default img2img strength of a remix that names none (the API's documented default).
REMIX_STRENGTH = 0.6

_REPORT_ORDER = ("model", "prompt", "negativePrompt", "stylePreset", "styleStrength", "aspectRatio", "width", "height",
                 "guidanceScale", "steps", "seed", "batchSize")

Loader = Callable[[Any], Any]


def _fail(param: str | None, message: str) -> RequestValidationError:
    return RequestValidationError(message, param=param)


#: Request kind on the wire → request class (remix is an img2img GenerationRequest).
REQUEST_CLASSES: dict[str, type] = {"generate": GenerationRequest, "remix": GenerationRequest,
                                    "percify": PercifyRequest, "cast": CastRequest}


def _request_class(kind: str) -> type:
    if kind not in REQUEST_CLASSES:
        raise _fail("kind", f"unknown request kind {kind!r}")
    return REQUEST_CLASSES[kind]


def _character(i: int, data: Any, load: Loader | None, strict: bool) -> CastCharacter:
    if not isinstance(data, Mapping):
        raise _fail(f"characters[{i}]", f"characters[{i}] must be an object with a prompt")
    kwargs = {}
    for key, value in data.items():
        if key not in CHARACTER_FIELDS:
            if strict:
                raise _fail(f"characters[{i}].{key}", f"unknown field {key!r} in characters[{i}]")
            continue
        if value is not None:
            kwargs[CHARACTER_FIELDS[key]] = value
    if "prompt" not in kwargs:
        raise _fail(f"characters[{i}].prompt", f"characters[{i}].prompt is required")
    if load is not None and kwargs.get("photos"):
        kwargs["photos"] = [load(p) for p in kwargs["photos"]]
    return CastCharacter(**kwargs)


def request_from_wire(data: Mapping[str, Any], kind: str = "generate", *, load: Loader | None = None,
                      strict: bool = True, ignore: Sequence[str] = ()) -> GenerationRequest:
    """A request of `kind` (generate, remix, percify, cast) from wire (camelCase) fields.

    strict: an unknown field is a RequestValidationError naming it (API bodies, JSONL lines);
    otherwise unknown fields are ignored (stored jobs carry bookkeeping such as `uploadId`).
    load: turns each photo / `initImage` reference into an image (the worker's asset loader).
    ignore: fields the caller handles itself (e.g. an `id` in a batch file). None values count
    as absent, so the request's defaults apply. The request is built, not validated: call
    `validate()` / `resolve()` (the engine does)."""
    if not isinstance(data, Mapping):
        raise _fail(None, "request must be a JSON object")
    cls = _request_class(kind)
    known = {**COMMON_FIELDS, **TASK_FIELDS[kind]}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ignore:
            continue
        if key not in known:
            if strict:
                raise _fail(key, f"unknown field {key!r}")
            continue
        if value is not None:
            kwargs[known[key]] = value
    if "prompt" not in kwargs:
        raise _fail("prompt", "prompt is required")
    if kind == "cast":
        characters = kwargs.get("characters")
        if not isinstance(characters, list):
            raise _fail("characters", "characters must be a list of character objects")
        kwargs["characters"] = [_character(i, c, load, strict) for i, c in enumerate(characters)]
    elif load is not None and kind == "percify":
        kwargs["photos"] = [load(p) for p in kwargs.get("photos") or []]
    elif kind == "remix":
        kwargs.setdefault("strength", REMIX_STRENGTH)
        if load is not None and "init_image" in kwargs:
            kwargs["init_image"] = load(kwargs["init_image"])
    return cls(**kwargs)


def request_to_wire(request: GenerationRequest) -> dict[str, Any]:
    """The common fields of a (resolved) request as wire fields, with its resolved size; task
    inputs (photos, characters, init image) are the caller's to describe."""
    names = {**COMMON_FIELDS, **RESOLVED_FIELDS}
    return {wire: getattr(request, names[wire]) for wire in _REPORT_ORDER}


def result_to_wire(result: GenerationResult) -> dict[str, Any]:
    """A finished result as JSON: the resolved request's fields, seeds, timings, the prompt
    report, the engine's call facts (`batchImages`, `nsfw`) and the task's report (`identity`
    for percify; `characters`, `scorer`, `layout`, ... for cast). What the CLI writes beside
    the images."""
    out = {"kind": result.request.kind, **request_to_wire(result.request), "seeds": result.seeds,
           "timings": result.timings, "promptReport": result.prompt_report}
    out.update(result.extra)
    if result.report is not None:
        out.update(result.report.to_json())
    return out


def request_from_dict(data: dict[str, Any], cls: type = GenerationRequest,
                      extra_fields: Sequence[str] = ()) -> GenerationRequest:
    """A validated request of class `cls` from API-style (camelCase) JSON; unknown fields are
    rejected by name. `extra_fields` are keys the caller handles itself (e.g. an `id` in a batch
    file). Photos must already be bytes or PIL images."""
    req = request_from_wire(data, cls.kind, ignore=extra_fields)
    req.validate()
    return req


def wire_fields(obj: Any, fields: Mapping[str, str] = COMMON_FIELDS) -> dict[str, Any]:
    """Wire fields read from any object with the request's (snake_case) attribute names, e.g. a
    validated API body: `{"negativePrompt": obj.negative_prompt, ...}` (missing attributes skipped)."""
    return {wire: getattr(obj, name) for wire, name in fields.items() if hasattr(obj, name)}


__all__ = ["CHARACTER_FIELDS", "COMMON_FIELDS", "REQUEST_CLASSES", "RESOLVED_FIELDS", "TASK_FIELDS",
           "request_from_dict", "request_from_wire", "request_to_wire", "result_to_wire", "wire_fields"]
