"""The submission service: how a request becomes a queued job.

    validation → content policy → photos (decoded, stored as uploads) → one store transaction
    (`submit_job`: concurrency + credits + insert) → nudge the worker

Nothing is held in memory: the job is persisted as `queued`, with its credits reserved, before the
202 is sent. Wire fields become engine requests only through `avatar_engine.protocol` (the same
conversion the worker uses to run the stored job).
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from avatar_engine import requests as ereq
from avatar_engine.errors import AvatarEngineError
from avatar_engine.protocol import COMMON_FIELDS, TASK_FIELDS, request_from_wire, request_to_wire, wire_fields
from avatar_engine.requests import GenerationRequest

from .logctx import current_request_id, logger
from . import schemas as S
from .api.common import Services, call, dump, get_visible, json_response
from .api.rendering import render_avatar
from .api.textguard import FILE_PARTS
from .assets import encode_png, upload_key
from .auth import Principal
from .destinations import FetchRefused, fetch_url
from .engine_client import ProfileInfo, face_analyzer_for
from .errors import ApiError, BodyTooLarge, content_policy_violation, invalid_request, unauthorized_access
from .policy import PolicyChecker
from .uploads import b64_to_bytes, decode_photo
from .vocab import TERMINAL_STATUSES, JobKind, JobStatus
from .waiting import parse_prefer_wait, wait_for_end

log = logger("serve.submissions")

METADATA_MAX_BYTES = 16 * 1024


# ---------------------------------------------------------------------------------------------
# Validation shared with PATCH
# ---------------------------------------------------------------------------------------------
def check_meta(title: Any, description: Any, tags: Any, metadata: Any, policy: PolicyChecker) -> list[str] | None:
    """Tags trimmed and bounded, metadata at most 16 KB of JSON, and the descriptive texts
    through the content policy; returns the cleaned tags."""
    clean_tags = None
    if tags is not None:
        clean_tags = []
        for i, t in enumerate(tags):
            t = t.strip()
            if not t or len(t) > S.MAX_TAG_CHARS:
                raise invalid_request(f"tags[{i}] must be 1 to {S.MAX_TAG_CHARS} characters", f"tags[{i}]")
            clean_tags.append(t)
    if metadata is not None and len(json.dumps(metadata)) > METADATA_MAX_BYTES:
        raise invalid_request(f"metadata must serialise to at most {METADATA_MAX_BYTES} bytes of JSON", "metadata")
    fields = [("title", title), ("description", description)]
    fields += [(f"tags[{i}]", t) for i, t in enumerate(clean_tags or [])]
    check_policy(policy, fields)
    return clean_tags


def check_policy(policy: PolicyChecker, fields: list[tuple[str, Any]],
                 message: str = "{param} contains text that violates the content policy") -> None:
    """content_policy_violation naming the first field whose text the policy refuses."""
    v = policy.check_fields(fields)
    if v:
        raise content_policy_violation(v.param, message.format(param=v.param))


# ---------------------------------------------------------------------------------------------
# One submission
# ---------------------------------------------------------------------------------------------
@dataclass
class Submission:
    """Everything needed to persist one job; built by `prepare`, committed by `submit`."""

    kind: str
    body: Any
    profile: ProfileInfo
    resolved: GenerationRequest
    params: dict[str, Any]
    uploads: list[tuple[str, Any]] = field(default_factory=list)  # (key, PIL image) written before submit
    copies: list[tuple[str, str]] = field(default_factory=list)  # (src key, dst key) asset copies
    upload_id: str = field(default_factory=lambda: "up_" + secrets.token_hex(10))
    remixed_from: str | None = None

    def add_upload(self, image: Any) -> str:
        key = upload_key(self.upload_id, len(self.uploads) + len(self.copies))
        self.uploads.append((key, image))
        return key

    def add_copy(self, src_key: str) -> str:
        key = upload_key(self.upload_id, len(self.uploads) + len(self.copies))
        self.copies.append((src_key, key))
        return key

    def cost(self, svc: Services) -> int:
        """API.md "Credits": generate and remix = per-model cost × images; percify and cast flat."""
        s = svc.settings
        if self.kind == JobKind.PERCIFY:
            return s.cost_percify
        if self.kind == JobKind.CAST:
            return s.cost_cast
        return s.per_image_cost(self.profile.name, self.profile.credit_cost) * self.resolved.batch_size


def identity_method_for(profile: ProfileInfo, method: str | None) -> str | None:
    """The identity method a percify/cast job runs with: the body's, which the model must offer
    (else 400 invalid_request naming identityMethod, before any credit is reserved), or the
    model's default. None for a model without identity methods."""
    offered = tuple(profile.identity_methods)
    if method is None:
        return offered[0] if offered else None
    from avatar_engine.identity_methods import check_identity_method

    check_identity_method(method)  # a name that is no method at all
    if method not in offered:
        raise invalid_request(f"identityMethod {method!r} is not offered by model {profile.name!r}; it offers "
                              f"{', '.join(offered) or 'none'}", "identityMethod")
    return method


async def profile_for(svc: Services, model: str | None, kind: str) -> ProfileInfo:
    desc = await svc.engine.describe()
    name = model or desc.default_model
    profile = desc.resolve(name)
    if profile is None:
        raise invalid_request(f"unknown model {name!r}; available: {', '.join(desc.names())}", "model")
    if kind not in profile.kinds:
        raise invalid_request(f"model {name!r} does not support {kind}", "model")
    return profile


async def prepare(svc: Services, kind: str, body: Any, *, extra_prompts: list[tuple[str, str]] = (),
                  strength: float | None = None, init_image: Any = None) -> Submission:
    """Validate the common fields against the model profile (defaults and seed resolved) and the
    content policy; the stored params are the resolved request's wire fields."""
    profile = await profile_for(svc, body.model, kind)
    request = request_from_wire(wire_fields(body), JobKind.GENERATE)
    if strength is not None:
        request.strength, request.init_image = strength, init_image
    resolved = request.resolve(profile)
    check_policy(svc.policy, [("prompt", body.prompt), *extra_prompts])
    params = request_to_wire(resolved)
    if body.model and body.model != profile.name:
        params["requestedModel"] = body.model  # an alias: reported back as the avatar's `model`
    if strength is not None:
        params["strength"] = strength
    return Submission(kind, body, profile, resolved, params)


async def submit(svc: Services, principal: Principal, sub: Submission) -> JSONResponse:
    """Uploads written, then the job in one transaction (files removed again if it is refused),
    then the worker nudged: 202 with the queued avatar and its Location."""
    store, assets, body = svc.store, svc.assets, sub.body
    tags = check_meta(body.title, body.description, body.tags, body.metadata, svc.policy)
    files = bool(sub.uploads or sub.copies)
    if files:
        sub.params["uploadId"] = sub.upload_id

        def write_uploads() -> None:
            for key, img in sub.uploads:
                assets.backend.put(key, encode_png(img))
            for src, dst in sub.copies:
                assets.backend.put(dst, assets.get_bytes(src))

        await call(write_uploads)
    try:
        av = await call(store.submit_job, principal.id, sub.kind, sub.params, cost=sub.cost(svc),
                        max_concurrent=principal.limits.concurrent_jobs, model=sub.resolved.model,
                        prompt=sub.resolved.prompt, remixed_from=sub.remixed_from, title=body.title,
                        description=body.description, tags=tags, metadata=body.metadata, visibility=body.visibility,
                        request_id=current_request_id(), low_balance_threshold=svc.settings.low_balance_threshold)
    except BaseException:
        if files:
            await call(assets.backend.delete_prefix, f"uploads/{sub.upload_id}")
        raise
    svc.metrics.submitted.labels(kind=sub.kind).inc()
    log.info("job %s accepted: %s, %d credits reserved, account %s", av.id, sub.kind, av.credit_cost, principal.id)
    await svc.engine.notify()
    return json_response(created(av, svc), 202, headers={"Location": f"/v1/avatars/{av.id}"})


def created(av: Any, svc: Services) -> S.CreatedAvatar:
    """What a create call answers: the Avatar plus `creditsUsed` (Percify's create response)."""
    return S.CreatedAvatar(**render_avatar(av, svc.base_url, svc.links).model_dump(), credits_used=av.credit_cost)


async def maybe_wait(svc: Services, principal: Principal, resp: Response, prefer: str | None) -> Response:
    """`Prefer: wait[=N]` (RFC 7240, the Replicate pattern) on a create request: once the job is
    persisted (and its response stored for the Idempotency-Key), hold the answer until the job
    ends — 201 with the finished avatar (completed, failed or cancelled) — or N seconds pass —
    202 with its current state. Waiting polls the store (`serve.waiting`); it holds no database
    connection and no engine slot. Over the waiter bounds, the 202 is returned at once."""
    seconds = parse_prefer_wait(prefer, svc.settings.max_wait_s)
    if seconds is None or resp.status_code != 202:
        return resp
    try:
        avatar_id = json.loads(bytes(resp.body))["id"]
    except (ValueError, KeyError, TypeError):
        return resp
    headers = {k: v for k, v in resp.headers.items() if k.lower() in ("location", "idempotent-replayed")}
    with svc.waiters.slot(principal.id, principal.limits.concurrent_jobs) as ok:
        if not ok:
            return resp
        status = await wait_for_end(svc.store, avatar_id, svc.settings, seconds)
    av = await call(svc.store.get_avatar, avatar_id)
    if av is None or status is None:
        return resp
    applied = {"Preference-Applied": f"wait={int(seconds)}"}
    code = 201 if av.status in TERMINAL_STATUSES else 202
    return json_response(created(av, svc), code, headers={**headers, **applied})


# ---------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------
async def generate(svc: Services, principal: Principal, body: S.GenerateRequest) -> JSONResponse:
    return await submit(svc, principal, await prepare(svc, JobKind.GENERATE, body))


@dataclass
class PhotoRequest:
    """A percify or cast body with its photos decoded, and what its Idempotency-Key binds to."""

    body: Any
    canonical: dict[str, Any]
    images: list[Any] = field(default_factory=list)  # percify: the person's photos
    refs: list[dict[str, Any]] = field(default_factory=list)  # cast: per character {images, src}
    params: list[str] = field(default_factory=list)  # percify: how the request named each photo


def _engine_fields(body: Any, kind: str) -> dict[str, Any]:
    """The body's wire fields that the engine request of `kind` takes (its own validation)."""
    return wire_fields(body, {**COMMON_FIELDS, **{k: v for k, v in TASK_FIELDS[kind].items()
                                                  if k not in ("photos", "characters")}})


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


async def photo_bytes_of(svc: Services, value: str, param: str) -> bytes:
    """A photo given as base64 / data: URL, or as an http(s) URL fetched through the webhooks'
    SSRF guard (`destinations.fetch_url`: DNS pinning, re-vetted redirects, size and time caps);
    the bytes are then checked and decoded like an upload (`decode`)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text[:8].lower().startswith(("http://", "https://")):
        s = svc.settings
        try:
            return await call(fetch_url, text, max_bytes=s.max_photo_bytes, timeout_s=s.photo_fetch_timeout_s,
                              allow_private=s.photo_fetch_allow_private, allowlist=s.photo_fetch_allowlist)
        except FetchRefused as exc:
            raise invalid_request(f"{param}: the photo URL could not be fetched: {exc}", param) from None
    return b64_to_bytes(value, param)


_FACE_LOCK = threading.Lock()  # one detection at a time per process (the analyzer is shared)


async def check_faces(svc: Services, profile: ProfileInfo, images: list[Any], params: list[str]) -> None:
    """Refuse at submit — before any credit is reserved — a photo in which the engine's own face
    analyzer (same backend and options, from the engine description) finds no usable face: a
    400 invalid_request whose `param` names the photo as the request gave it."""
    desc = await svc.engine.describe()
    if not svc.settings.face_check_at_submit or not desc.face or not images:
        return
    from avatar_engine.errors import NoFaceError
    from avatar_engine.faces import analyze_reference_photos

    def run() -> None:
        analyzer = face_analyzer_for(desc.face)
        with _FACE_LOCK:
            analyze_reference_photos(analyzer, images, param="photos", min_face_size=profile.face_min_size)

    try:
        await call(run)
    except NoFaceError as exc:
        index = int(exc.param.split("[", 1)[1].rstrip("]")) if exc.param and "[" in exc.param else 0
        param = params[index] if index < len(params) else exc.param
        message = exc.message.replace(f"(photos[{index}])", f"({param})")
        raise invalid_request(message, param) from None


def _photo_error(exc: AvatarEngineError, params: list[str]) -> Exception:
    """An engine error naming `photos[i]` → the same error naming the photo as the request gave it
    (`photoUrl`, `photoUrls[0]`, `photo[1]`...); other errors unchanged."""
    match = re.fullmatch(r"photos\[(\d+)\]", exc.param or "")
    if not match or int(match.group(1)) >= len(params) or params[int(match.group(1))] == exc.param:
        return exc
    param = params[int(match.group(1))]
    status = 400 if exc.code in ("invalid_request", "content_policy_violation") else 500
    return ApiError(status, exc.code, exc.message.replace(exc.param, param), param=param)


async def percify(svc: Services, principal: Principal, form: PhotoRequest) -> JSONResponse:
    body = form.body
    sub = await prepare(svc, JobKind.PERCIFY, body)
    method = identity_method_for(sub.profile, body.identity_method)
    await check_faces(svc, sub.profile, form.images, form.params)
    try:  # the engine's own checks (one person across the photos: IdentityMismatchError), same params
        request_from_wire({**_engine_fields(body, JobKind.PERCIFY), "photos": form.images}, JobKind.PERCIFY).validate()
    except AvatarEngineError as exc:
        raise _photo_error(exc, form.params) from None
    sub.params["photos"] = [sub.add_upload(img) for img in form.images]
    if body.identity_strength is not None:
        sub.params["identityStrength"] = body.identity_strength
    if method is not None:
        sub.params["identityMethod"] = method
    return await submit(svc, principal, sub)


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
        src_keys = await _character_source(svc, principal, i, c.avatar_id) if c.avatar_id else None
        if per_char[i] and c.avatar_id:
            raise invalid_request("give either photos or avatarId for a character, not both", f"characters[{i}].avatarId")
        images = [await call(decode, svc, b, p) for p, b in per_char[i]]
        refs.append({"images": images, "src": src_keys, "params": [p for p, _ in per_char[i]],
                     "hashes": [hashlib.sha256(b).hexdigest() for _, b in per_char[i]]})
    canonical = dump(body)
    for i, ch in enumerate(canonical["characters"]):
        ch["photos"] = refs[i]["hashes"]
    return PhotoRequest(body, canonical, refs=refs)


async def _character_source(svc: Services, principal: Principal, i: int, avatar_id: str) -> list[str]:
    """Reference photo keys of a character given as one of the caller's completed avatars."""
    param = f"characters[{i}].avatarId"
    src = await call(svc.store.get_avatar, avatar_id)
    if src is None:
        raise ApiError(404, "avatar_not_found", f"No avatar with id {avatar_id!r}", param=param)
    if src.account_id != principal.id:
        raise unauthorized_access(f"characters[{i}].avatarId must be one of your own avatars")
    if src.status != JobStatus.COMPLETED or not (src.result or {}).get("images"):
        raise invalid_request("the referenced avatar is not completed", param)
    # A percify avatar carries the person's own reference photos: reuse those (the real face);
    # otherwise the avatar's first image is the reference.
    src_keys = list((src.params or {}).get("photos") or []) if src.kind == JobKind.PERCIFY else []
    return src_keys or [src.result["images"][0]["key"]]


async def cast(svc: Services, principal: Principal, form: PhotoRequest) -> JSONResponse:
    body, refs = form.body, form.refs
    extra = [(f"characters[{i}].prompt", c.prompt) for i, c in enumerate(body.characters)]
    sub = await prepare(svc, JobKind.CAST, body, extra_prompts=extra)
    method = identity_method_for(sub.profile, body.identity_method)
    for ref in refs:  # each character's photos, as percify's: a photo without a face is refused now
        await check_faces(svc, sub.profile, ref["images"], ref["params"])
    chars = []
    for i, c in enumerate(body.characters):
        keys = [sub.add_upload(img) for img in refs[i]["images"]]
        keys += [sub.add_copy(k) for k in refs[i]["src"] or []]
        chars.append({"prompt": c.prompt, "photos": keys, "avatarId": c.avatar_id})
    placeholder = Image.new("RGB", (8, 8))  # stands for an avatarId reference in validate()
    request_from_wire({**_engine_fields(body, JobKind.CAST), "characters": [
        {"prompt": c.prompt, "photos": refs[i]["images"] + [placeholder] * len(refs[i]["src"] or []), "box": c.box}
        for i, c in enumerate(body.characters)]}, JobKind.CAST).validate()  # the engine's own checks
    for i, c in enumerate(body.characters):
        if c.box is not None:
            chars[i]["box"] = list(c.box)
    sub.params["characters"] = chars
    if body.layout is not None:
        sub.params["layout"] = body.layout
    if body.identity_strength is not None:
        sub.params["identityStrength"] = body.identity_strength
    if method is not None and any(c["photos"] for c in chars):
        sub.params["identityMethod"] = method
    return await submit(svc, principal, sub)


async def remix(svc: Services, principal: Principal, avatar_id: str, body: S.RemixRequest) -> JSONResponse:
    src = await get_visible(svc, avatar_id, principal)
    imgs = (src.result or {}).get("images") or []
    if src.status != JobStatus.COMPLETED or not imgs:
        raise invalid_request("only completed avatars can be remixed", "avatarId")
    if body.image_index >= len(imgs):
        raise invalid_request(f"imageIndex must be below {len(imgs)}", "imageIndex")
    sp = src.params or {}
    merged = SimpleNamespace(
        prompt=body.prompt or src.prompt or sp.get("prompt"),
        negative_prompt=body.negative_prompt if body.negative_prompt is not None else sp.get("negativePrompt"),
        style_preset=body.style_preset if body.style_preset is not None else sp.get("stylePreset"),
        aspect_ratio=sp.get("aspectRatio", "1:1"), guidance_scale=body.guidance_scale, seed=body.seed,
        steps=body.steps, model=src.model, batch_size=body.batch_size, title=body.title,
        description=body.description, tags=body.tags, metadata=body.metadata, visibility=body.visibility)
    init = await call(svc.assets.load_image, imgs[body.image_index]["key"])
    sub = await prepare(svc, JobKind.REMIX, merged, strength=body.strength, init_image=init.convert("RGB"))
    sub.params["initImage"] = sub.add_copy(imgs[body.image_index]["key"])
    sub.remixed_from = src.id
    return await submit(svc, principal, sub)


# ---------------------------------------------------------------------------------------------
# Bodies with photos: JSON (base64) or multipart
# ---------------------------------------------------------------------------------------------
def _pydantic_to_fastapi(exc: ValidationError, prefix: tuple = ("body",)) -> FastAPIValidationError:
    return FastAPIValidationError([{**e, "loc": prefix + tuple(e.get("loc", ()))} for e in exc.errors()])


_PHOTO_PART = FILE_PARTS  # photo parts, also without a filename (RFC 7578 makes it optional)


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


def decode(svc: Services, data: bytes, param: str):
    s = svc.settings
    return decode_photo(data, param, max_bytes=s.max_photo_bytes, max_pixels=s.max_photo_pixels)
