"""FastAPI application: routes, wire mapping and submission pipeline.

`create_app(settings, store, engine_client)` builds the whole HTTP surface. It holds no job in
memory: a submission is validated, checked against the content policy, persisted as `queued`
with its credits reserved (`store.submit_job`, one transaction) and only then answered with
**202 Accepted** and the avatar (plus a `Location` header to poll). The same app runs under
TestClient with an in-process engine (`LocalEngineClient`) and inside the Ray Serve ingress
(`RayEngineClient`).

Seams for cross-cutting features are dependencies/helpers in this module: `authenticate`
(auth + per-tier rate limit), `_idempotent` (Idempotency-Key replay), and the store's outbox
(webhook events are written by the store in the same transaction as the state change).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, Literal, Optional

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from pydantic.alias_generators import to_camel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

import avatar_engine
from avatar_engine import requests as ereq
from avatar_engine.cast import CastCharacter
from avatar_engine.cast import CastRequest as EngineCast
from avatar_engine.identity import PercifyRequest as EnginePercify
from avatar_engine.requests import GenerationRequest

from . import schemas as S
from .assets import AssetStore, upload_key
from .auth import Principal, authenticate
from .engine_client import EngineClient, EngineDescription, ProfileInfo
from .errors import (
    ApiError, RequestContextMiddleware, authentication_required, avatar_not_found, content_policy_violation, error_body,
    install_error_handlers, invalid_request, not_found, request_id_of, unauthorized_access,
)
from .metrics import IngressMetrics
from .policy import PolicyChecker
from .settings import ServiceSettings
from .store import (
    UNSET, ConcurrencyLimitExceeded, IdempotencyState, InsufficientCredits, InvalidArgument, InvalidState,
    NotFound, PermissionDenied, Store, StoreError,
)
from .store import Avatar as AvatarRecord
from .uploads import b64_to_bytes, decode_photo
from .webhooks import DestinationRefused, check_destination

log = logging.getLogger("serve.app")

API_VERSION = getattr(avatar_engine, "__version__", "0.1.0")
METADATA_MAX_BYTES = 16 * 1024
IDEMPOTENCY_KEY_MAX = 255
ERROR_RESPONSES = {
    400: {"model": S.ErrorResponse, "description": "invalid_request / content_policy_violation"},
    401: {"model": S.ErrorResponse, "description": "authentication_required"},
    403: {"model": S.ErrorResponse, "description": "unauthorized_access"},
    404: {"model": S.ErrorResponse, "description": "avatar_not_found"},
    429: {"model": S.ErrorResponse, "description": "rate_limit_exceeded (Retry-After)"},
}
SUBMIT_RESPONSES = {**ERROR_RESPONSES,
                    402: {"model": S.ErrorResponse, "description": "insufficient_credits"},
                    409: {"model": S.ErrorResponse, "description": "Idempotency-Key still in flight"},
                    413: {"model": S.ErrorResponse, "description": "request_too_large"},
                    422: {"model": S.ErrorResponse, "description": "Idempotency-Key reused with another body"}}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _identity(value: Any) -> S.Identity | None:
    """The engine's identity report → the API's compact `identity` object."""
    if not isinstance(value, dict):
        return None
    faces = value.get("faces")
    if isinstance(faces, list):
        faces = sum(1 for f in faces if f)
    sims = value.get("similarity")
    per_image = [_num(x) for x in sims] if isinstance(sims, list) else None
    vals = [x for x in (per_image or [_num(sims)]) if x is not None]
    notes = value.get("notes")
    return S.Identity(faces=faces if isinstance(faces, int) else None,
                      similarity=round(sum(vals) / len(vals), 4) if vals else None, per_image=per_image,
                      strength=_num(value.get("strength")),
                      notes=[str(n) for n in notes] if isinstance(notes, list) else None)


def render_avatar(av: AvatarRecord, base_url: str = "") -> S.Avatar:
    """Store record → the API's Avatar object."""
    p, r = av.params or {}, av.result or {}
    images = [S.AvatarImage(url=f"{base_url}/v1/avatars/{av.id}/images/{i}", width=int(img["width"]),
                            height=int(img["height"]), seed=img.get("seed"))
              for i, img in enumerate(r.get("images") or [])]
    queued_ms = None
    if av.started_at is not None:
        queued_ms = max(0, int(round((av.started_at - av.created_at) * 1000)))
    characters = None
    if av.kind == "cast":
        res_chars = r.get("characters") if isinstance(r.get("characters"), list) else []
        characters = []
        for i, c in enumerate(p.get("characters") or []):
            rc = res_chars[i] if i < len(res_chars) and isinstance(res_chars[i], dict) else {}
            characters.append(S.CastCharacterOut(
                prompt=c.get("prompt", ""), avatar_id=c.get("avatarId"),
                photos=0 if c.get("avatarId") else len(c.get("photos") or []),
                box=rc.get("box", c.get("box")), has_identity=rc.get("hasIdentity"), similarity=_num(rc.get("similarity"))))
    return S.Avatar(
        id=av.id, kind=av.kind, status=av.status, prompt=p.get("prompt", av.prompt),
        negative_prompt=p.get("negativePrompt"), style_preset=p.get("stylePreset"), model=av.model,
        width=p.get("width"), height=p.get("height"), aspect_ratio=p.get("aspectRatio"),
        guidance_scale=p.get("guidanceScale"), steps=p.get("steps"), seed=p.get("seed"),
        batch_size=int(p.get("batchSize", 1)), strength=p.get("strength"), images=images,
        thumbnail_url=f"{base_url}/v1/avatars/{av.id}/thumbnail" if images else None,
        title=av.title, description=av.description, tags=list(av.tags or []), metadata=dict(av.metadata or {}),
        visibility=av.visibility, published=bool(av.published), published_at=iso(av.published_at),
        likes=av.likes, comments=av.comments, remixes=av.remixes, remixed_from=av.remixed_from,
        credit_cost=av.credit_cost,
        error=S.ErrorInfo(code=av.error_code, message=av.error_message or "") if av.error_code else None,
        timings=S.Timings(queued_ms=queued_ms, generation_ms=r.get("generationMs")),
        identity=_identity(r.get("identity")) if av.kind == "percify" else None,
        characters=characters,
        created_at=iso(av.created_at), updated_at=iso(av.updated_at), completed_at=iso(av.completed_at),
    )


def dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True)


def _event_extra(avatar_id: str, extra: dict) -> dict:
    """The store's event extras (snake_case, epoch seconds) → the API's wire names: `likedBy`
    (avatar.liked) and `comment` as the API's Comment object (avatar.commented)."""
    out: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        if key == "comment" and isinstance(value, dict):
            value = dump(S.Comment(id=value.get("id"), avatar_id=avatar_id, account_id=value.get("account_id"),
                                   text=value.get("text"), created_at=iso(value.get("created_at"))))
        out[to_camel(key)] = value
    return out


def event_renderer(base_url: str = "") -> Callable[..., dict]:
    """Webhook payloads carry the same Avatar object as the API (pass to `open_store`)."""

    def render(event_type: str, avatar: AvatarRecord, extra: dict) -> dict:
        return {"type": event_type,
                "data": {"object": dump(render_avatar(avatar, base_url)), **_event_extra(avatar.id, extra)}}

    return render


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _state(request: Request):
    return request.app.state


async def _call(fn: Callable, *args, **kwargs):
    """Store calls are blocking: run them off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


def _check_meta(title: Any, description: Any, tags: Any, metadata: Any, policy: PolicyChecker) -> list[str] | None:
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
    v = policy.check_fields(fields)
    if v:
        raise content_policy_violation(v.param, f"{v.param} contains text that violates the content policy")
    return clean_tags


def _pydantic_to_fastapi(exc: ValidationError, prefix: tuple = ("body",)) -> FastAPIValidationError:
    errors = []
    for e in exc.errors():
        e = dict(e)
        e["loc"] = prefix + tuple(e.get("loc", ()))
        errors.append(e)
    return FastAPIValidationError(errors)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _avatar_visible(av: AvatarRecord, principal: Principal) -> bool:
    return av.account_id == principal.id or av.visibility in ("public", "unlisted") or bool(av.published)


async def _get_visible(request: Request, avatar_id: str, principal: Principal) -> AvatarRecord:
    av = await _call(_state(request).store.get_avatar, avatar_id)
    if av is None:
        raise avatar_not_found(avatar_id)
    if not _avatar_visible(av, principal):
        raise unauthorized_access("This avatar is private to another account")
    return av


def _json(request: Request, model: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(dump(model), status_code=status, headers=headers)


def check_webhook_url(url: str, settings: ServiceSettings) -> None:
    """400 naming `url` for non-HTTP(S) or (unless allowed) private/loopback destinations."""
    try:
        check_destination(url, allow_private=settings.webhook_allow_private, allowlist=settings.webhook_allowlist)
    except DestinationRefused as exc:
        raise invalid_request(str(exc), "url") from None


# ---------------------------------------------------------------------------------------------
# Idempotency
# ---------------------------------------------------------------------------------------------
#: Refusals that say "not now" rather than answering the request: never stored under a key, so
#: a retry with the same Idempotency-Key runs afresh once the limit allows (as Stripe does).
_RETRYABLE_STATUSES = frozenset({409, 429})


def request_fingerprint(method: str, path: str, canonical: Any) -> str:
    """What an Idempotency-Key is bound to: method, path and the canonical (parsed, defaults
    filled, photos hashed) request body."""
    return hashlib.sha256(f"{method.upper()} {path}\n{_canonical(canonical)}".encode()).hexdigest()


async def _idempotent(request: Request, principal: Principal, canonical: Any,
                      produce: Callable[[], Awaitable[Response]]) -> Response:
    """Run `produce` at most once per (account, Idempotency-Key) within 24 h. Same key + same
    request → the stored response with `Idempotent-Replayed: true`; other request → 422;
    first still running → 409. The record lives in the store, so this holds across replicas.
    5xx/unexpected failures and 409/429 refusals abandon the key so a retry runs afresh."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return await produce()
    if not key.strip() or len(key) > IDEMPOTENCY_KEY_MAX:
        raise invalid_request(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters", "Idempotency-Key")
    store: Store = _state(request).store
    digest = request_fingerprint(request.method, request.url.path, canonical)
    res = await _call(store.begin_idempotent, principal.id, key, digest)
    if res.state == IdempotencyState.REPLAY:
        stored = res.response
        headers = {**stored.headers, "Idempotent-Replayed": "true"}
        return Response(stored.body, status_code=stored.status, headers=headers)
    if res.state == IdempotencyState.MISMATCH:
        raise ApiError(422, "invalid_request", "This Idempotency-Key was used with a different request",
                       param="Idempotency-Key")
    if res.state == IdempotencyState.IN_FLIGHT:
        raise ApiError(409, "idempotency_conflict",
                       "A request with this Idempotency-Key is still being processed; retry later",
                       param="Idempotency-Key", headers={"Retry-After": "1"})
    try:
        response = await produce()
    except ApiError as exc:
        if exc.status >= 500:
            await _call(store.abandon_idempotent, principal.id, key)
            raise
        body = error_body(exc.code, exc.message, exc.param, request_id_of(request))
        response = JSONResponse(body, status_code=exc.status, headers=exc.headers)
    except StoreError as exc:
        mapped = store_error(exc)
        body = error_body(mapped.code, mapped.message, mapped.param, request_id_of(request))
        response = JSONResponse(body, status_code=mapped.status, headers=mapped.headers)
    except avatar_engine.AvatarEngineError as exc:
        if exc.code != "invalid_request":
            await _call(store.abandon_idempotent, principal.id, key)
            raise
        body = error_body(exc.code, exc.message, exc.param, request_id_of(request))
        response = JSONResponse(body, status_code=400)
    except BaseException:
        await _call(store.abandon_idempotent, principal.id, key)
        raise
    if response.status_code >= 500 or response.status_code in _RETRYABLE_STATUSES:
        await _call(store.abandon_idempotent, principal.id, key)
        return response
    keep = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "location", "retry-after")}
    await _call(store.finish_idempotent, principal.id, key, response.status_code, bytes(response.body), keep)
    return response


def store_error(exc: StoreError) -> ApiError:
    """Store exceptions → API errors."""
    if isinstance(exc, InsufficientCredits):
        return ApiError(402, "insufficient_credits",
                        f"This request costs {exc.required} credits; the account has {exc.balance}")
    if isinstance(exc, ConcurrencyLimitExceeded):
        return ApiError(429, "rate_limit_exceeded",
                        f"Concurrent generation limit reached: {exc.active} queued or processing, your tier "
                        f"allows {exc.limit}; retry when one finishes", headers={"Retry-After": "5"})
    if isinstance(exc, PermissionDenied):
        return unauthorized_access("This object belongs to another account")
    if isinstance(exc, NotFound):
        if exc.code == "avatar_not_found":
            return avatar_not_found(exc.object_id)
        return not_found(str(exc))
    if isinstance(exc, InvalidArgument):
        return invalid_request(exc.message if exc.param in exc.message else f"{exc.param}: {exc.message}", exc.param)
    if isinstance(exc, InvalidState):
        return ApiError(400, "invalid_request", exc.message, param="avatarId")
    return ApiError(500, "internal_error", "A storage error occurred")


# ---------------------------------------------------------------------------------------------
# Submission pipeline
# ---------------------------------------------------------------------------------------------
class Submission:
    """Everything needed to persist one job; built by the route, committed by `submit`."""

    def __init__(self, kind: str, body: Any, profile: ProfileInfo, resolved: GenerationRequest):
        self.kind = kind
        self.body = body
        self.profile = profile
        self.resolved = resolved
        self.params: dict[str, Any] = {}
        self.uploads: list[tuple[str, Any]] = []  # (key, PIL image) written before submit
        self.upload_id = "up_" + secrets.token_hex(10)
        self.copies: list[tuple[str, str]] = []  # (src key, dst key) asset copies
        self.remixed_from: str | None = None

    def add_upload(self, image) -> str:
        key = upload_key(self.upload_id, len(self.uploads) + len(self.copies))
        self.uploads.append((key, image))
        return key

    def add_copy(self, src_key: str) -> str:
        key = upload_key(self.upload_id, len(self.uploads) + len(self.copies))
        self.copies.append((src_key, key))
        return key


async def _profile_for(request: Request, model: str | None, kind: str) -> ProfileInfo:
    desc: EngineDescription = await _state(request).engine.describe()
    name = model or desc.default_model
    profile = desc.profiles.get(name)
    if profile is None:
        raise invalid_request(f"unknown model {name!r}; available: {', '.join(sorted(desc.profiles))}", "model")
    if kind not in profile.kinds:
        raise invalid_request(f"model {name!r} does not support {kind}", "model")
    return profile


def _base_kwargs(body: Any) -> dict[str, Any]:
    return dict(prompt=body.prompt, negative_prompt=body.negative_prompt, style_preset=body.style_preset,
                aspect_ratio=body.aspect_ratio, guidance_scale=body.guidance_scale, seed=body.seed,
                steps=body.steps, model=body.model, batch_size=getattr(body, "batch_size", 1))


async def _prepare(request: Request, kind: str, body: Any, *, extra_prompts: list[tuple[str, str]] = (),
                   strength: float | None = None, init_image: Any = None) -> Submission:
    st = _state(request)
    profile = await _profile_for(request, body.model, kind)
    kw = _base_kwargs(body)
    if strength is not None:
        kw.update(strength=strength, init_image=init_image)
    resolved = GenerationRequest(**kw).resolve(profile)
    v = st.policy.check_fields([("prompt", body.prompt), *extra_prompts])
    if v:
        raise content_policy_violation(v.param, f"{v.param} contains text that violates the content policy")
    sub = Submission(kind, body, profile, resolved)
    r = resolved
    sub.params = {
        "prompt": r.prompt, "negativePrompt": r.negative_prompt, "stylePreset": r.style_preset,
        "aspectRatio": r.aspect_ratio, "guidanceScale": r.guidance_scale, "steps": r.steps, "seed": r.seed,
        "batchSize": r.batch_size, "model": r.model, "width": r.width, "height": r.height,
    }
    if strength is not None:
        sub.params["strength"] = strength
    return sub


def _cost(settings: ServiceSettings, sub: Submission) -> int:
    """API.md "Credits": generate and remix = per-model cost × images; percify and cast flat."""
    if sub.kind == "percify":
        return settings.cost_percify
    if sub.kind == "cast":
        return settings.cost_cast
    return settings.per_image_cost(sub.profile.name, sub.profile.credit_cost) * sub.resolved.batch_size


async def _submit(request: Request, principal: Principal, sub: Submission) -> JSONResponse:
    st = _state(request)
    store: Store = st.store
    assets: AssetStore = st.assets
    body = sub.body
    tags = _check_meta(body.title, body.description, body.tags, body.metadata, st.policy)
    if sub.uploads or sub.copies:
        sub.params["uploadId"] = sub.upload_id

    def write_uploads() -> None:
        for key, img in sub.uploads:
            assets.backend.put(key, _png(img))
        for src, dst in sub.copies:
            assets.backend.put(dst, assets.get_bytes(src))

    if sub.uploads or sub.copies:
        await _call(write_uploads)
    try:
        av = await _call(store.submit_job, principal.id, sub.kind, sub.params, cost=_cost(st.settings, sub),
                         max_concurrent=principal.limits.concurrent_jobs, model=sub.resolved.model,
                         prompt=sub.resolved.prompt, remixed_from=sub.remixed_from, title=body.title,
                         description=body.description, tags=tags, metadata=body.metadata,
                         visibility=body.visibility)
    except BaseException:
        if sub.uploads or sub.copies:
            await _call(assets.backend.delete_prefix, f"uploads/{sub.upload_id}")
        raise
    st.metrics.submitted.labels(kind=sub.kind).inc()
    await st.engine.notify()
    return _json(request, render_avatar(av, st.settings.public_base_url), 202,
                 headers={"Location": f"/v1/avatars/{av.id}"})


def _png(img) -> bytes:
    from .assets import encode_png

    return encode_png(img)


async def _read_photo_sources(request: Request, model_cls: type, file_field: str | None = None):
    """Parse a JSON or multipart body into (validated model, raw dict, {param: bytes}).

    For multipart, `file_field` names the model field the uploaded files stand in for (it gets
    one placeholder per file so count limits are validated by the model, under the same name)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, bytes] = {}
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=32, max_fields=64, max_part_size=1024 * 1024)
        except Exception as exc:  # noqa: BLE001 - malformed multipart
            from .errors import BodyTooLarge

            if isinstance(exc, BodyTooLarge) or isinstance(exc.__cause__, BodyTooLarge):
                raise
            raise invalid_request("The multipart body could not be parsed") from None
        data: dict[str, Any] = {}
        counters: dict[str, int] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                base = name
                n = counters.get(base, 0)
                counters[base] = n + 1
                files[f"{base}[{n}]"] = await value.read()
            elif name == "tags":
                data.setdefault("tags", []).extend(t for t in value.split(",") if t.strip())
            elif name in ("metadata", "characters"):
                try:
                    data[name] = json.loads(value)
                except json.JSONDecodeError:
                    raise invalid_request(f"{name} must be a JSON document", name) from None
            else:
                data[name] = value
        await form.close()
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
    elif not files and file_field is not None and file_field not in data and ctype == "multipart/form-data":
        raise invalid_request("at least one 'photo' file part is required", "photo")
    try:
        model = model_cls.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_to_fastapi(exc) from None
    return model, data, files


def _decode(st, data: bytes, param: str):
    s: ServiceSettings = st.settings
    return decode_photo(data, param, max_bytes=s.max_photo_bytes, max_pixels=s.max_photo_pixels)


# ---------------------------------------------------------------------------------------------
# App factory
# ---------------------------------------------------------------------------------------------
def create_app(settings: ServiceSettings, store: Store, engine_client: EngineClient, *,
               assets: AssetStore | None = None, policy: PolicyChecker | None = None,
               metrics: IngressMetrics | None = None) -> FastAPI:
    """The HTTP app. Dependencies are injected so tests and Ray build the same thing."""
    app = FastAPI(
        title="Avatar API", version=API_VERSION,
        description="Prompt → avatar, percify-yourself and cast. Submissions return **202** with the "
                    "queued avatar; poll `GET /v1/avatars/{avatarId}` until `status` is `completed` "
                    "(or `failed`/`cancelled`). Every error has the shape "
                    '`{"error": {"code", "message", "param", "requestId"}}`.',
        openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.engine = engine_client
    app.state.assets = assets or AssetStore.from_url(settings.resolved_assets_url)
    app.state.policy = policy or PolicyChecker(settings.all_policy_words())
    app.state.metrics = metrics or IngressMetrics()
    app.state.max_body_bytes = settings.max_body_bytes
    install_error_handlers(app)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        from .errors import error_response

        mapped = store_error(exc)
        if mapped.status >= 500:
            log.error("store error (requestId=%s): %r", request_id_of(request), exc)
        return error_response(request, mapped.status, mapped.code, mapped.message, mapped.param, mapped.headers)

    app.add_middleware(_MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)

    v1 = APIRouter(prefix="/v1")
    auth = Depends(authenticate)
    base = settings.public_base_url

    # -- health / account -----------------------------------------------------------------
    @v1.get("/health", response_model=S.Health, tags=["meta"], summary="Liveness, models and database state",
            responses={503: {"model": S.Health, "description": "degraded: database or engine unavailable"}})
    async def health(request: Request):
        db_ok = True
        try:
            await _call(store.schema_revision)
        except Exception:  # noqa: BLE001
            log.exception("health: database check failed")
            db_ok = False
        models: list[S.ModelInfo] = []
        default = None
        try:
            desc = await engine_client.describe()
            default = desc.default_model
            models = [S.ModelInfo(name=p.name, credit_cost=settings.per_image_cost(p.name, p.credit_cost),
                                  resolution=p.resolution, kinds=list(p.kinds))
                      for p in desc.profiles.values()]
        except Exception:  # noqa: BLE001
            log.exception("health: engine describe failed")
        ok = db_ok and bool(models)
        out = S.Health(status="ok" if ok else "degraded", version=API_VERSION, default_model=default,
                       models=models, database="ok" if db_ok else "error")
        return _json(request, out, 200 if ok else 503)

    @v1.get("/account", response_model=S.Account, responses=ERROR_RESPONSES, tags=["account"])
    async def account(request: Request, principal: Principal = auth):
        acct = await _call(store.get_account, principal.id)
        desc = await engine_client.describe()
        costs = S.Costs(generate_per_image={n: settings.per_image_cost(n, p.credit_cost)
                                            for n, p in desc.profiles.items()},
                        percify=settings.cost_percify, cast=settings.cost_cast)
        out = S.Account(id=acct.id, tier=acct.tier, credits=acct.credits,
                        limits=S.Limits(requests_per_minute=principal.limits.requests_per_minute,
                                        concurrent_generations=principal.limits.concurrent_jobs),
                        costs=costs, created_at=iso(acct.created_at))
        return _json(request, out)

    # -- submissions ----------------------------------------------------------------------
    @v1.post("/avatars/generate", status_code=202, response_model=S.Avatar, responses=SUBMIT_RESPONSES,
             tags=["avatars"], summary="Prompt → 1..4 images (queued job)")
    async def generate(request: Request, body: S.GenerateRequest, principal: Principal = auth):
        async def produce():
            sub = await _prepare(request, "generate", body)
            return await _submit(request, principal, sub)

        return await _idempotent(request, principal, dump(body), produce)

    percify_openapi = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PercifyRequest"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["photo"], "properties": {
            "photo": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 5},
            "prompt": {"type": "string"}, "stylePreset": {"type": "string"}, "aspectRatio": {"type": "string"},
            "identityStrength": {"type": "number"}, "seed": {"type": "integer"}, "model": {"type": "string"},
            "guidanceScale": {"type": "number"}, "steps": {"type": "integer"}, "batchSize": {"type": "integer"},
            "negativePrompt": {"type": "string"}, "title": {"type": "string"}, "visibility": {"type": "string"},
        }}}}}}

    @v1.post("/avatars/percify-yourself", status_code=202, response_model=S.Avatar, responses=SUBMIT_RESPONSES,
             tags=["avatars"], openapi_extra=percify_openapi,
             summary="1..5 photos of one person + prompt/style → identity-preserving avatar")
    async def percify(request: Request, principal: Principal = auth):
        body, data, files = await _read_photo_sources(request, S.PercifyRequest, file_field="photos")
        if files:
            unexpected = [k for k in files if not k.startswith("photo[")]
            if unexpected:
                name = unexpected[0].split("[")[0]
                raise invalid_request(f"unexpected file part {name!r}; use 'photo'", name)
            photo_bytes = list(files.items())
        else:
            photo_bytes = [(f"photos[{i}]", b64_to_bytes(s, f"photos[{i}]")) for i, s in enumerate(body.photos)]
        if len(photo_bytes) > ereq.MAX_REFERENCE_PHOTOS:
            raise invalid_request(f"at most {ereq.MAX_REFERENCE_PHOTOS} photos of one person", "photo")
        st = _state(request)
        images = [await _call(_decode, st, b, param) for param, b in photo_bytes]
        canonical = {**{k: v for k, v in dump(body).items() if k != "photos"},
                     "photos": [hashlib.sha256(b).hexdigest() for _, b in photo_bytes]}

        async def produce():
            sub = await _prepare(request, "percify", body)
            kw = _base_kwargs(body)
            if body.identity_strength is not None:
                kw["identity_strength"] = body.identity_strength
            EnginePercify(**kw, photos=images).validate()  # the engine's own checks, same params
            sub.params["photos"] = [sub.add_upload(img) for img in images]
            if body.identity_strength is not None:
                sub.params["identityStrength"] = body.identity_strength
            return await _submit(request, principal, sub)

        return await _idempotent(request, principal, canonical, produce)

    cast_openapi = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/CastRequest"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["prompt", "characters"], "properties": {
            "prompt": {"type": "string"},
            "characters": {"type": "string", "description": "JSON list of {prompt, avatarId?} (no photos)"},
            "photo0": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "photo1": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "layout": {"type": "string"}, "seed": {"type": "integer"}, "model": {"type": "string"},
        }}}}}}

    @v1.post("/avatars/cast", status_code=202, response_model=S.Avatar, responses=SUBMIT_RESPONSES,
             tags=["avatars"], openapi_extra=cast_openapi,
             summary="Scene prompt + 2..4 characters (photos or own avatarId) → one image")
    async def cast(request: Request, principal: Principal = auth):
        body, data, files = await _read_photo_sources(request, S.CastRequest)
        st = _state(request)
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
                per_char[i] += [(f"characters[{i}].photos[{j}]", b64_to_bytes(s, f"characters[{i}].photos[{j}]"))
                                for j, s in enumerate(c.photos)]
            if len(per_char[i]) > ereq.MAX_REFERENCE_PHOTOS:
                raise invalid_request(f"at most {ereq.MAX_REFERENCE_PHOTOS} photos per character", f"characters[{i}].photos")
            if per_char[i] and c.avatar_id:
                raise invalid_request("give either photos or avatarId for a character, not both", f"characters[{i}].avatarId")
            src_key = None
            if c.avatar_id:
                src = await _call(store.get_avatar, c.avatar_id)
                if src is None:
                    raise ApiError(404, "avatar_not_found", f"No avatar with id {c.avatar_id!r}", param=f"characters[{i}].avatarId")
                if src.account_id != principal.id:
                    raise unauthorized_access(f"characters[{i}].avatarId must be one of your own avatars")
                if src.status != "completed" or not (src.result or {}).get("images"):
                    raise invalid_request("the referenced avatar is not completed", f"characters[{i}].avatarId")
                # A percify avatar carries the person's own reference photos: reuse those (the
                # real face); otherwise the avatar's first image is the reference.
                src_keys = list((src.params or {}).get("photos") or []) if src.kind == "percify" else []
                src_key = src_keys or [src.result["images"][0]["key"]]
            images = [await _call(_decode, st, b, p) for p, b in per_char[i]]
            refs.append({"images": images, "src": src_key, "hashes": [hashlib.sha256(b).hexdigest() for _, b in per_char[i]]})
        canonical = dump(body)
        for i, ch in enumerate(canonical["characters"]):
            ch["photos"] = refs[i]["hashes"]

        async def produce():
            extra = [(f"characters[{i}].prompt", c.prompt) for i, c in enumerate(body.characters)]
            sub = await _prepare(request, "cast", body, extra_prompts=extra)
            chars = []
            for i, c in enumerate(body.characters):
                keys = [sub.add_upload(img) for img in refs[i]["images"]]
                keys += [sub.add_copy(k) for k in refs[i]["src"] or []]
                chars.append({"prompt": c.prompt, "photos": keys, "avatarId": c.avatar_id})
            from PIL import Image

            init_placeholder = Image.new("RGB", (8, 8))  # stands for an avatarId reference in validate()
            kw = _base_kwargs(body)
            kw.update({k: v for k, v in (("layout", body.layout), ("identity_strength", body.identity_strength))
                       if v is not None})
            EngineCast(**kw, characters=[
                CastCharacter(prompt=c.prompt, photos=refs[i]["images"] + [init_placeholder] * len(refs[i]["src"] or []),
                              box=c.box) for i, c in enumerate(body.characters)]).validate()
            for i, c in enumerate(body.characters):
                if c.box is not None:
                    chars[i]["box"] = list(c.box)
            sub.params["characters"] = chars
            if body.layout is not None:
                sub.params["layout"] = body.layout
            if body.identity_strength is not None:
                sub.params["identityStrength"] = body.identity_strength
            return await _submit(request, principal, sub)

        return await _idempotent(request, principal, canonical, produce)

    @v1.post("/avatars/{avatarId}/remix", status_code=202, response_model=S.Avatar, responses=SUBMIT_RESPONSES,
             tags=["social"], summary="New avatar derived (img2img) from a visible completed one")
    async def remix(request: Request, body: S.RemixRequest, avatar_id: str = Path(alias="avatarId"),
                    principal: Principal = auth):
        async def produce():
            src = await _get_visible(request, avatar_id, principal)
            imgs = (src.result or {}).get("images") or []
            if src.status != "completed" or not imgs:
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
            init = await _call(st_assets(request).load_image, imgs[body.image_index]["key"])
            sub = await _prepare(request, "remix", merged, strength=body.strength, init_image=init.convert("RGB"))
            sub.params["initImage"] = sub.add_copy(imgs[body.image_index]["key"])
            sub.remixed_from = src.id
            return await _submit(request, principal, sub)

        return await _idempotent(request, principal, {"src": avatar_id, **dump(body)}, produce)

    # -- reading ---------------------------------------------------------------------------
    @v1.get("/avatars", response_model=S.AvatarList, responses=ERROR_RESPONSES, tags=["avatars"],
            summary="Your avatars, cursor-paginated")
    async def list_avatars(
        request: Request, principal: Principal = auth,
        limit: int = Query(20, ge=1, le=100), cursor: Optional[str] = Query(None, max_length=512),
        status: Optional[S.Status] = None, model: Optional[str] = Query(None, max_length=100),
        visibility: Optional[S.Visibility] = None, published: Optional[bool] = None,
        kind: Optional[S.Kind] = None, search: Optional[str] = Query(None, max_length=200),
        sort_by: Literal["createdAt", "likes", "comments", "remixes"] = Query("createdAt", alias="sortBy"),
        sort_order: Literal["asc", "desc"] = Query("desc", alias="sortOrder"),
    ):
        page = await _call(store.list_avatars, principal.id, limit=limit, cursor=cursor, status=status, model=model,
                           visibility=visibility, published=published, kind=kind, search=search,
                           sort_by=sort_by, sort_order=sort_order)
        out = S.AvatarList(data=[render_avatar(a, base) for a in page.items], has_more=page.next_cursor is not None,
                           next_cursor=page.next_cursor)
        return _json(request, out)

    @v1.get("/feed", response_model=S.AvatarList, responses=ERROR_RESPONSES, tags=["social"],
            summary="Published avatars of everyone")
    async def feed(request: Request, principal: Principal = auth, limit: int = Query(20, ge=1, le=100),
                   cursor: Optional[str] = Query(None, max_length=512),
                   sort: Literal["newest", "mostLiked"] = "newest"):
        page = await _call(store.feed, limit=limit, cursor=cursor, sort="most_liked" if sort == "mostLiked" else "newest")
        out = S.AvatarList(data=[render_avatar(a, base) for a in page.items], has_more=page.next_cursor is not None,
                           next_cursor=page.next_cursor)
        return _json(request, out)

    @v1.get("/avatars/{avatarId}", response_model=S.Avatar, responses=ERROR_RESPONSES, tags=["avatars"])
    async def get_avatar(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth):
        return _json(request, render_avatar(await _get_visible(request, avatar_id, principal), base))

    @v1.patch("/avatars/{avatarId}", response_model=S.Avatar, responses=ERROR_RESPONSES, tags=["avatars"],
              summary="Update metadata (title, description, tags, visibility, metadata)")
    async def patch_avatar(request: Request, body: S.UpdateAvatarRequest, avatar_id: str = Path(alias="avatarId"),
                           principal: Principal = auth):
        av = await _call(store.get_avatar, avatar_id)
        if av is None:
            raise avatar_not_found(avatar_id)
        if av.account_id != principal.id:
            raise unauthorized_access("Only the owner can modify this avatar")
        given = body.model_fields_set
        tags = _check_meta(body.title if "title" in given else None, body.description if "description" in given else None,
                           body.tags if "tags" in given else None, body.metadata if "metadata" in given else None,
                           app.state.policy)
        for f in ("tags", "visibility", "metadata"):
            if f in given and getattr(body, f) is None:
                raise invalid_request(f"{f} cannot be null", f)
        updated = await _call(
            store.update_avatar, avatar_id, principal.id,
            title=body.title if "title" in given else UNSET,
            description=body.description if "description" in given else UNSET,
            tags=tags if "tags" in given else UNSET,
            visibility=body.visibility if "visibility" in given else UNSET,
            metadata=body.metadata if "metadata" in given else UNSET)
        return _json(request, render_avatar(updated, base))

    @v1.delete("/avatars/{avatarId}", response_model=S.DeletedAvatar, responses=ERROR_RESPONSES, tags=["avatars"],
               summary="Delete an avatar and its images; a running job is cancelled and refunded")
    async def delete_avatar(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth):
        av = await _call(store.get_avatar, avatar_id)
        if av is None:
            raise avatar_not_found(avatar_id)
        if av.account_id != principal.id:
            raise unauthorized_access("Only the owner can delete this avatar")
        final = await _call(store.delete_avatar, avatar_id, principal.id)

        def remove_files() -> None:
            app.state.assets.delete_avatar(avatar_id)
            up = (final.params or {}).get("uploadId")
            if up:
                app.state.assets.backend.delete_prefix(f"uploads/{up}")

        await _call(remove_files)
        return _json(request, S.DeletedAvatar(id=avatar_id, status=final.status))

    @v1.get("/avatars/{avatarId}/images/{index}", response_class=Response, tags=["avatars"],
            responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}, "image/webp": {}},
                                                 "description": "The image bytes"}},
            summary="Image bytes (PNG; `?format=webp` for WebP)")
    async def get_image(request: Request, avatar_id: str = Path(alias="avatarId"), index: int = Path(ge=0),
                        format: Literal["png", "webp"] = "png", principal: Principal = auth):
        av = await _get_visible(request, avatar_id, principal)
        imgs = (av.result or {}).get("images") or []
        if av.status != "completed" or index >= len(imgs):
            raise not_found(f"avatar {avatar_id} has no image {index} (status {av.status})", "index")
        data = await _call(app.state.assets.get_bytes, imgs[index]["key"])
        media = "image/png"
        if format == "webp":
            data = await _call(_to_webp, data)
            media = "image/webp"
        return Response(data, media_type=media, headers=_cache_headers(av))

    @v1.get("/avatars/{avatarId}/thumbnail", response_class=Response, tags=["avatars"],
            responses={**ERROR_RESPONSES, 200: {"content": {"image/webp": {}}, "description": "WebP thumbnail"}})
    async def get_thumbnail(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth):
        av = await _get_visible(request, avatar_id, principal)
        key = (av.result or {}).get("thumbnailKey")
        if av.status != "completed" or not key:
            raise not_found(f"avatar {avatar_id} has no thumbnail (status {av.status})", "avatarId")
        data = await _call(app.state.assets.get_bytes, key)
        return Response(data, media_type="image/webp", headers=_cache_headers(av))

    # -- social ----------------------------------------------------------------------------
    @v1.post("/avatars/{avatarId}/publish", response_model=S.Avatar, responses=ERROR_RESPONSES, tags=["social"],
             summary="Publish a completed own avatar to the public feed")
    async def publish(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth):
        async def produce():
            av = await _call(store.get_avatar, avatar_id)
            if av is None:
                raise avatar_not_found(avatar_id)
            if av.account_id != principal.id:
                raise unauthorized_access("Only the owner can publish this avatar")
            return _json(request, render_avatar(await _call(store.publish_avatar, avatar_id, principal.id), base))

        return await _idempotent(request, principal, {"publish": avatar_id}, produce)

    async def _like(request: Request, avatar_id: str, principal: Principal, on: bool) -> Response:
        await _get_visible(request, avatar_id, principal)
        res = await _call(store.like if on else store.unlike, avatar_id, principal.id)
        liked = on
        return _json(request, S.LikeState(avatar_id=avatar_id, liked=liked, likes=res.likes))

    @v1.post("/avatars/{avatarId}/like", response_model=S.LikeState, responses=ERROR_RESPONSES, tags=["social"],
             summary="Like (once per account; repeating is a no-op)")
    async def like(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth):
        return await _idempotent(request, principal, {"like": avatar_id},
                                 lambda: _like(request, avatar_id, principal, True))

    @v1.delete("/avatars/{avatarId}/like", response_model=S.LikeState, responses=ERROR_RESPONSES, tags=["social"])
    async def unlike(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth):
        return await _like(request, avatar_id, principal, False)

    def _comment(c) -> S.Comment:
        return S.Comment(id=c.id, avatar_id=c.avatar_id, account_id=c.account_id, text=c.text,
                         created_at=iso(c.created_at))

    @v1.post("/avatars/{avatarId}/comment", status_code=201, response_model=S.Comment, responses=ERROR_RESPONSES,
             tags=["social"])
    async def comment(request: Request, body: S.CommentRequest, avatar_id: str = Path(alias="avatarId"),
                      principal: Principal = auth):
        async def produce():
            await _get_visible(request, avatar_id, principal)
            v = app.state.policy.check_fields([("text", body.text)])
            if v:
                raise content_policy_violation("text", "text contains words that violate the content policy")
            c = await _call(store.add_comment, avatar_id, principal.id, body.text)
            return _json(request, _comment(c), 201)

        return await _idempotent(request, principal, {"comment": avatar_id, **dump(body)}, produce)

    @v1.get("/avatars/{avatarId}/comments", response_model=S.CommentList, responses=ERROR_RESPONSES, tags=["social"])
    async def comments(request: Request, avatar_id: str = Path(alias="avatarId"), principal: Principal = auth,
                       limit: int = Query(20, ge=1, le=100), cursor: Optional[str] = Query(None, max_length=512),
                       sort_order: Literal["asc", "desc"] = Query("asc", alias="sortOrder")):
        await _get_visible(request, avatar_id, principal)
        page = await _call(store.list_comments, avatar_id, limit=limit, cursor=cursor, sort_order=sort_order)
        return _json(request, S.CommentList(data=[_comment(c) for c in page.items],
                                            has_more=page.next_cursor is not None, next_cursor=page.next_cursor))

    # -- webhooks --------------------------------------------------------------------------
    def _endpoint(e, with_secret: bool = False) -> S.WebhookEndpoint:
        return S.WebhookEndpoint(id=e.id, url=e.url, events=list(e.events), description=e.description,
                                 disabled=e.disabled, disabled_reason=e.disabled_reason, created_at=iso(e.created_at),
                                 secret=e.secret if with_secret else None)

    @v1.post("/webhooks", status_code=201, response_model=S.WebhookEndpoint, responses=ERROR_RESPONSES,
             tags=["webhooks"], summary="Create an endpoint; the signing secret is only shown here")
    async def create_webhook(request: Request, body: S.WebhookCreateRequest, principal: Principal = auth):
        async def produce():
            await _call(check_webhook_url, body.url, settings)
            e = await _call(store.create_endpoint, principal.id, body.url, list(body.events), description=body.description)
            return _json(request, _endpoint(e, with_secret=True), 201)

        return await _idempotent(request, principal, dump(body), produce)

    @v1.get("/webhooks", response_model=S.WebhookEndpointList, responses=ERROR_RESPONSES, tags=["webhooks"])
    async def list_webhooks(request: Request, principal: Principal = auth):
        eps = await _call(store.list_endpoints, principal.id)
        return _json(request, S.WebhookEndpointList(data=[_endpoint(e) for e in eps]))

    @v1.get("/webhooks/{webhookId}", response_model=S.WebhookEndpoint, responses=ERROR_RESPONSES, tags=["webhooks"])
    async def get_webhook(request: Request, webhook_id: str = Path(alias="webhookId"), principal: Principal = auth):
        e = await _call(store.get_endpoint, principal.id, webhook_id)
        if e is None:
            raise ApiError(404, "webhook_not_found", f"No webhook endpoint {webhook_id!r}", param="webhookId")
        return _json(request, _endpoint(e))

    @v1.delete("/webhooks/{webhookId}", response_model=S.DeletedWebhook, responses=ERROR_RESPONSES, tags=["webhooks"])
    async def delete_webhook(request: Request, webhook_id: str = Path(alias="webhookId"), principal: Principal = auth):
        if not await _call(store.delete_endpoint, principal.id, webhook_id):
            raise ApiError(404, "webhook_not_found", f"No webhook endpoint {webhook_id!r}", param="webhookId")
        return _json(request, S.DeletedWebhook(id=webhook_id))

    app.include_router(v1)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the JSON bodies of the routes that parse their own body
        (JSON or multipart), so every `$ref` resolves."""
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (S.PercifyRequest, S.CastRequest):
            schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            comps.update(schema.pop("$defs", {}))
            comps[model.__name__] = schema
        app.openapi_schema = spec
        return spec

    app.openapi = openapi

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request):
        token = settings.metrics_token
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise authentication_required("GET /metrics needs 'Authorization: Bearer <metrics token>'")
        body = app.state.metrics.exposition() + await engine_client.metrics_text()
        from .metrics import CONTENT_TYPE

        return Response(body, media_type=CONTENT_TYPE)

    return app


def st_assets(request: Request) -> AssetStore:
    return request.app.state.assets


def _to_webp(png: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def _cache_headers(av: AvatarRecord) -> dict[str, str]:
    scope = "public" if av.visibility == "public" else "private"
    return {"Cache-Control": f"{scope}, max-age=3600", "ETag": f'"{av.id}-{int(av.updated_at)}"'}


class _MetricsMiddleware:
    """Counts requests by route template (not raw path, to keep label cardinality bounded)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics = getattr(scope.get("app").state, "metrics", None) if scope.get("app") else None
            if metrics is not None:
                metrics.requests.labels(method=scope.get("method", ""), route=path, status=str(status["code"])).inc()


__all__ = ["create_app", "render_avatar", "event_renderer", "store_error", "check_webhook_url", "request_fingerprint"]
