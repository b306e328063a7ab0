"""The submission service: how a validated body (with its photos decoded, `serve.photos`)
becomes a queued job.

    validation → content policy → photos (stored as uploads) → one store transaction
    (`submit_job`: concurrency + credits + insert) → nudge the worker → the queued Avatar

Nothing is held in memory: the job is persisted as `queued`, with its credits reserved, before the
202 is sent. Wire fields become engine requests only through `avatar_engine.protocol` (the same
conversion the worker uses to run the stored job).
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from avatar_engine.errors import AvatarEngineError
from avatar_engine.identity_methods import check_identity_method
from avatar_engine.protocol import COMMON_FIELDS, TASK_FIELDS, request_from_wire, request_to_wire, wire_fields
from avatar_engine.requests import GenerationRequest

from . import schemas as S
from .assets import encode_png, upload_key
from .auth import Principal
from .engine_client import ProfileInfo
from .errors import content_policy_violation, invalid_request, param_from_loc
from .logctx import current_request_id, logger
from .photos import PhotoRequest, check_faces, check_photo_safety, photo_error
from .policy import PolicyChecker
from .services import Services, call, get_visible
from .store import Avatar
from .vocab import JobKind, JobStatus

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
    """Validate the common fields against the model profile (defaults and seed resolved; a style
    the model does not offer is refused by `resolve`, listing its styles; a style's recommended
    steps and guidance apply when the body gives none) and the content policy; the
    stored params are the resolved request's wire fields (`styleStrength` among them)."""
    profile = await profile_for(svc, body.model, kind)
    request = request_from_wire(wire_fields(body), JobKind.GENERATE)
    if strength is not None:
        request.strength, request.init_image = strength, init_image
    resolved = request.resolve(profile.for_requests())
    check_policy(svc.policy, [("prompt", body.prompt), *extra_prompts])
    params = request_to_wire(resolved)
    if body.model and body.model != profile.name:
        params["requestedModel"] = body.model  # an alias: reported back as the avatar's `model`
    if strength is not None:
        params["strength"] = strength
    return Submission(kind, body, profile, resolved, params)


async def submit(svc: Services, principal: Principal, sub: Submission) -> Avatar:
    """Uploads written, then the job in one transaction (files removed again if it is refused),
    then the worker nudged; returns the queued avatar (the API answers 202 with it)."""
    store, assets, body = svc.store, svc.assets, sub.body
    tags = check_meta(body.title, body.description, body.tags, body.metadata, svc.policy)
    files = bool(sub.uploads or sub.copies)
    if files:
        sub.params["uploadId"] = sub.upload_id

        def write_uploads() -> None:
            store.expect_upload(f"uploads/{sub.upload_id}")  # swept unless submit_job accepts the job
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
    return av


# ---------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------
async def generate(svc: Services, principal: Principal, body: S.GenerateRequest) -> Avatar:
    return await submit(svc, principal, await prepare(svc, JobKind.GENERATE, body))


def _engine_fields(body: Any, kind: str) -> dict[str, Any]:
    """The body's wire fields that the engine request of `kind` takes (its own validation)."""
    return wire_fields(body, {**COMMON_FIELDS, **{k: v for k, v in TASK_FIELDS[kind].items()
                                                  if k not in ("photos", "characters")}})


async def percify(svc: Services, principal: Principal, form: PhotoRequest) -> Avatar:
    body = form.body
    sub = await prepare(svc, JobKind.PERCIFY, body)
    method = identity_method_for(sub.profile, body.identity_method)
    await check_faces(svc, sub.profile, form.images, form.params)
    await check_photo_safety(svc, form.images, form.params)
    try:  # the engine's own checks (one person across the photos: IdentityMismatchError), same params
        request_from_wire({**_engine_fields(body, JobKind.PERCIFY), "photos": form.images}, JobKind.PERCIFY).validate()
    except AvatarEngineError as exc:
        raise photo_error(exc, form.params) from None
    sub.params["photos"] = [sub.add_upload(img) for img in form.images]
    if body.identity_strength is not None:
        sub.params["identityStrength"] = body.identity_strength
    if method is not None:
        sub.params["identityMethod"] = method
    return await submit(svc, principal, sub)


async def cast(svc: Services, principal: Principal, form: PhotoRequest) -> Avatar:
    body, refs = form.body, form.refs
    extra = [(f"characters[{i}].prompt", c.prompt) for i, c in enumerate(body.characters)]
    sub = await prepare(svc, JobKind.CAST, body, extra_prompts=extra)
    method = identity_method_for(sub.profile, body.identity_method)
    for ref in refs:  # each character's photos, as percify's: a photo without a face is refused now
        await check_faces(svc, sub.profile, ref["images"], ref["params"])
        await check_photo_safety(svc, ref["images"], ref["params"])
    chars = []
    for i, c in enumerate(body.characters):
        keys = [sub.add_upload(img) for img in refs[i]["images"]]
        keys += [sub.add_copy(k) for k in refs[i]["src"] or []]
        chars.append({"prompt": c.prompt, "photos": keys, "avatarId": c.avatar_id})
    # The engine's own checks on the real request: the decoded photos each character was given. A
    # character given as an avatarId has none here: its photos are that avatar's, validated when
    # it was submitted (at most 5 photos of one person), and are never given with photos.
    request_from_wire({**_engine_fields(body, JobKind.CAST), "characters": [
        {"prompt": c.prompt, "photos": refs[i]["images"], "box": c.box}
        for i, c in enumerate(body.characters)]}, JobKind.CAST).validate()
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


async def remix(svc: Services, principal: Principal, avatar_id: str, body: S.RemixRequest) -> Avatar:
    src = await get_visible(svc, avatar_id, principal)
    imgs = (src.result or {}).get("images") or []
    if src.status != JobStatus.COMPLETED or not imgs:
        raise invalid_request("only completed avatars can be remixed", "avatarId")
    if body.image_index >= len(imgs):
        raise invalid_request(f"imageIndex must be below {len(imgs)}", "imageIndex")
    sp = src.params or {}
    merged = remixed_body(body, src.prompt or sp.get("prompt"), src.model, sp)
    init = await call(svc.assets.load_image, imgs[body.image_index]["key"])
    sub = await prepare(svc, JobKind.REMIX, merged, strength=body.strength, init_image=init.convert("RGB"))
    sub.params["initImage"] = sub.add_copy(imgs[body.image_index]["key"])
    sub.remixed_from = src.id
    return await submit(svc, principal, sub)


def remixed_body(body: S.RemixRequest, source_prompt: str | None, model: str | None,
                 source_params: dict[str, Any]) -> S.GenerateRequest:
    """The generate request a remix runs: the remix body's fields over the source avatar's
    (prompt, negative prompt, style and, while the style is the source's, its styleStrength; its
    aspect ratio and model), validated as a GenerateRequest like any generate body (a 400 naming
    the field if the merge is not one)."""
    style = body.style_preset if body.style_preset is not None else source_params.get("stylePreset")
    style_strength = body.style_strength
    if style_strength is None and style == source_params.get("stylePreset"):
        style_strength = source_params.get("styleStrength")
    merged = {
        "prompt": body.prompt or source_prompt,
        "negative_prompt": body.negative_prompt if body.negative_prompt is not None else source_params.get("negativePrompt"),
        "style_preset": style, "style_strength": style_strength,
        "aspect_ratio": source_params.get("aspectRatio", "1:1"), "guidance_scale": body.guidance_scale,
        "seed": body.seed, "steps": body.steps, "model": model, "batch_size": body.batch_size, "title": body.title,
        "description": body.description, "tags": body.tags, "metadata": body.metadata, "visibility": body.visibility}
    try:
        return S.GenerateRequest.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_from_loc(first.get("loc", ()))
        raise invalid_request(f"the remixed request is invalid: {param}: {first.get('msg')}", param) from None
