"""GET /v1/health (no auth: liveness, models, database), GET /v1/models (no auth: the served
models with their styles) and GET /metrics (Prometheus)."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response

from ..logctx import logger
from .. import schemas as S
from ..errors import authentication_required
from ..face_settings import face_report
from ..metrics import CONTENT_TYPE
from .common import Services, Svc, call, json_response

log = logger("serve.api")
router = APIRouter()


@router.get("/v1/health", response_model=S.Health, tags=["meta"], summary="Liveness, models and database state",
            responses={503: {"model": S.Health, "description": "degraded: database or engine unavailable"}})
async def health(request: Request, svc: Services = Svc):
    db_ok = True
    try:
        await call(svc.store.schema_revision)
    except Exception:  # noqa: BLE001
        log.exception("health: database check failed")
        db_ok = False
    models: list[S.ModelInfo] = []
    default = None
    face = None
    try:
        desc = await svc.engine.describe()
        default = desc.default_model
        face = face_report(desc.face, svc.settings)
        models = [S.ModelInfo(name=p.name, aliases=list(p.aliases),
                              credit_cost=svc.settings.per_image_cost(p.name, p.credit_cost),
                              resolution=p.resolution, kinds=list(p.kinds),
                              identity_methods=list(p.identity_methods), engine=p.engine,
                              styles=[S.StyleInfo.model_validate(s) for s in p.styles])
                  for p in desc.profiles.values()]
    except Exception:  # noqa: BLE001
        log.exception("health: engine describe failed")
    ok = db_ok and bool(models)
    out = S.Health(status="ok" if ok else "degraded", version=request.app.version, default_model=default,
                   models=models, database="ok" if db_ok else "error", face=face)
    return json_response(out, 200 if ok else 503)


@router.get("/v1/models", response_model=S.ModelList, tags=["meta"],
            summary="The served models: names and aliases, kinds, identity methods and styles")
async def models(svc: Services = Svc):
    desc = await svc.engine.describe()
    return json_response(S.ModelList(default_model=desc.default_model, models=[
        S.ServedModel(name=p.name, aliases=list(p.aliases), default=p.name == desc.default_model,
                      credit_cost=svc.settings.per_image_cost(p.name, p.credit_cost), resolution=p.resolution,
                      kinds=list(p.kinds), identity_methods=list(p.identity_methods),
                      styles=[S.StyleInfo.model_validate(s) for s in p.styles], fuse_style=p.fuse_style)
        for p in desc.profiles.values()]))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, svc: Services = Svc):
    token = svc.settings.metrics_token
    if token:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise authentication_required("GET /metrics needs 'Authorization: Bearer <metrics token>'")
    return Response(svc.metrics.exposition() + await svc.engine.metrics_text(), media_type=CONTENT_TYPE)
