"""Bodies with photos (percify, cast): JSON with base64/URL photos or multipart/form-data with
file parts, parsed into the validated wire model plus each photo's bytes named as the request gave
it (`photo[0]`, `photoUrls[1]`, `characters[0].photos[2]`...). The photos are then fetched and
decoded by `serve.photos`; the submission service receives a `PhotoRequest`."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from avatar_engine import requests as ereq

from .. import schemas as S
from ..auth import Principal
from ..errors import ApiError, BodyTooLarge, invalid_request
from ..photos import PhotoRequest, character_source, decode, photo_bytes_of
from ..schemas import dump
from ..services import Services, call
from .textguard import FILE_PARTS

_PHOTO_PART = FILE_PARTS  # photo parts, also without a filename (RFC 7578 makes it optional)


async def read_percify(request: Request, svc: Services) -> PhotoRequest:
    body, files = await read_photo_sources(request, S.PercifyRequest, file_field="photos")
    if files:
        unexpected = [k for k in files if not k.startswith("photo[")]
        if unexpected:
            name = unexpected[0].split("[")[0]
            raise invalid_request(f"unexpected file part {name!r}; use 'photo'", name)
        photo_bytes = list(files.items())
        if body.photo_url is not None or body.photo_urls:
            photo_bytes += [(p, await photo_bytes_of(svc, v, p)) for p, v in body.photo_sources() if p.startswith("photoUrl")]
    else:
        sources = body.photo_sources()
        if not sources:
            raise invalid_request("give at least one photo: photos (base64 or URLs), photoUrl or photoUrls", "photos")
        if len(sources) > ereq.MAX_REFERENCE_PHOTOS:
            raise invalid_request(f"at most {ereq.MAX_REFERENCE_PHOTOS} photos of one person", sources[-1][0])
        photo_bytes = [(p, await photo_bytes_of(svc, v, p)) for p, v in sources]
    if len(photo_bytes) > ereq.MAX_REFERENCE_PHOTOS:
        raise invalid_request(f"at most {ereq.MAX_REFERENCE_PHOTOS} photos of one person", "photo")
    images = [await call(decode, svc, b, param) for param, b in photo_bytes]
    canonical = {**{k: v for k, v in dump(body).items() if k not in ("photos", "photoUrl", "photoUrls")},
                 "photos": [hashlib.sha256(b).hexdigest() for _, b in photo_bytes]}
    return PhotoRequest(body, canonical, images=images, params=[p for p, _ in photo_bytes])


async def read_cast(request: Request, svc: Services, principal: Principal) -> PhotoRequest:
    body, files = await read_photo_sources(request, S.CastRequest)
    per_char: list[list[tuple[str, bytes]]] = [[] for _ in body.characters]
    for key, b in files.items():
        name = key.split("[")[0]
        idx = name[len("photo"):] if name.startswith("photo") else ""
        if not idx.isdigit() or int(idx) >= len(body.characters):
            raise invalid_request(f"unexpected file part {name!r}; use photo0..photo{len(body.characters) - 1}", name)
        per_char[int(idx)].append((f"{name}[{len(per_char[int(idx)])}]", b))
    refs: list[dict[str, Any]] = []
    for i, c in enumerate(body.characters):
        if c.photos:
            per_char[i] += [(f"characters[{i}].photos[{j}]", await photo_bytes_of(svc, s, f"characters[{i}].photos[{j}]"))
                            for j, s in enumerate(c.photos)]
        if len(per_char[i]) > ereq.MAX_REFERENCE_PHOTOS:
            raise invalid_request(f"at most {ereq.MAX_REFERENCE_PHOTOS} photos per character", f"characters[{i}].photos")
        src_keys = await character_source(svc, principal, i, c.avatar_id) if c.avatar_id else None
        if per_char[i] and c.avatar_id:
            raise invalid_request("give either photos or avatarId for a character, not both", f"characters[{i}].avatarId")
        images = [await call(decode, svc, b, p) for p, b in per_char[i]]
        refs.append({"images": images, "src": src_keys, "params": [p for p, _ in per_char[i]],
                     "hashes": [hashlib.sha256(b).hexdigest() for _, b in per_char[i]]})
    canonical = dump(body)
    for i, ch in enumerate(canonical["characters"]):
        ch["photos"] = refs[i]["hashes"]
    return PhotoRequest(body, canonical, refs=refs)


def _pydantic_to_fastapi(exc: ValidationError, prefix: tuple = ("body",)) -> FastAPIValidationError:
    return FastAPIValidationError([{**e, "loc": prefix + tuple(e.get("loc", ()))} for e in exc.errors()])


def _part_bytes(text: str) -> bytes:
    """The bytes of a file part the form parser took for a text field (no filename): it decoded
    them as UTF-8, or as Latin-1 (lossless) when they are not UTF-8 — as image data never is."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


async def _read_form(request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        form = await request.form(max_files=32, max_fields=64, max_part_size=1024 * 1024)
    except Exception as exc:  # noqa: BLE001 - malformed multipart
        if isinstance(exc, BodyTooLarge) or isinstance(exc.__cause__, BodyTooLarge):
            raise
        raise invalid_request("The multipart body could not be parsed") from None
    data: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    counters: dict[str, int] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile) or _PHOTO_PART.fullmatch(name):
            n = counters.get(name, 0)
            counters[name] = n + 1
            files[f"{name}[{n}]"] = await value.read() if isinstance(value, UploadFile) else _part_bytes(value)
        elif name == "tags":  # comma-separated: at most 20 pieces of at most 50 characters, blank ones dropped
            pieces = value.split(",")
            if len(pieces) > S.MAX_TAGS or any(len(p) > S.MAX_TAG_CHARS for p in pieces):
                raise invalid_request(f"tags must be at most {S.MAX_TAGS} comma-separated tags of at most "
                                      f"{S.MAX_TAG_CHARS} characters", "tags")
            data.setdefault("tags", []).extend(p for p in pieces if p.strip())
        elif name == "photoUrls":  # repeatable form field
            data.setdefault("photoUrls", []).append(value)
        elif name in ("metadata", "characters"):
            try:
                data[name] = json.loads(value)
            except json.JSONDecodeError:
                raise invalid_request(f"{name} must be a JSON document", name) from None
        else:
            data[name] = value
    await form.close()
    return data, files


async def read_photo_sources(request: Request, model_cls: type, file_field: str | None = None):
    """Parse a JSON or multipart body into (validated model, {param: bytes}).

    For multipart, `file_field` names the model field the uploaded files stand in for (it gets
    one placeholder per file so count limits are validated by the model, under the same name)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, bytes] = {}
    if ctype == "multipart/form-data":
        data, files = await _read_form(request)
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise invalid_request("The request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise invalid_request("The request body must be a JSON object")
    else:
        raise ApiError(415, "invalid_request", "Content-Type must be application/json or multipart/form-data")
    if files and file_field is not None and file_field not in data:
        data[file_field] = ["<multipart>"] * len(files)
    elif not files and file_field is not None and file_field not in data and ctype == "multipart/form-data" \
            and not {"photoUrl", "photoUrls"} & set(data):
        raise invalid_request("at least one 'photo' file part is required", "photo")
    try:  # form fields are all text: converted there, JSON types taken strictly
        return model_cls.model_validate(data, strict=False if ctype == "multipart/form-data" else None), files
    except ValidationError as exc:
        raise _pydantic_to_fastapi(exc) from None
