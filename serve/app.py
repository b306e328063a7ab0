"""The HTTP app: `create_app(settings, store, engine_client)` assembles the routers of
`serve.api` with the services they use. It holds no job in memory (see `serve.submissions`).
The same app runs under TestClient with an in-process engine (`LocalEngineClient`) and inside
the Ray Serve ingress (`RayEngineClient`)."""
from __future__ import annotations

from fastapi import Depends, FastAPI

import avatar_engine

from .api import account, avatars, community, jobcontrol, provenance, submissions, system, webhooks
from .api.common import Services
from .api.openapi import install_openapi
from .api.rendering import event_renderer, render_avatar
from .api.textguard import reject_unstorable_text
from .assets import AssetStore
from .engine_client import EngineClient
from .links import ImageLinks
from .errors import install_error_handlers, store_error
from .metrics import IngressMetrics, MetricsMiddleware
from .middleware import RequestContextMiddleware, SchemaMethodGuard
from .policy import PolicyChecker
from .settings import ServiceSettings
from .store import Store
from .studio import install_offline_docs, install_studio
from .waiting import Waiters

API_VERSION = getattr(avatar_engine, "__version__", "0.1.0")
DESCRIPTION = ("Prompt → avatar, percify-yourself and cast. Submissions return **202** with the queued avatar; "
               "poll `GET /v1/avatars/{avatarId}` until `status` is `completed` (or `failed`/`cancelled`), send "
               "`Prefer: wait[=N]` (N ≤ 60) to get the finished avatar in the answer (201), or follow "
               "`GET /v1/avatars/{avatarId}/events` (Server-Sent Events). Image URLs are absolute and open without a "
               "header: stable for public avatars, signed and expiring (`expires`, `signature`) for the others. "
               'Every error has the shape `{"error": {"code", "message", "param", "requestId"}}`.')
ROUTERS = (system, account, submissions, avatars, jobcontrol, provenance, community, webhooks)


def create_app(settings: ServiceSettings, store: Store, engine_client: EngineClient, *,
               assets: AssetStore | None = None, policy: PolicyChecker | None = None,
               metrics: IngressMetrics | None = None, proxy_request_id: bool = False) -> FastAPI:
    """The HTTP app. Dependencies are injected so tests and Ray build the same thing.
    `proxy_request_id`: behind Ray Serve, whose proxy assigns each request's `x-request-id`
    and adds that header to every response: adopt its id instead of adding a second header."""
    app = FastAPI(title="Avatar API", version=API_VERSION, description=DESCRIPTION,
                  openapi_url="/v1/openapi.json", docs_url=None, redoc_url=None,  # docs: install_offline_docs
                  # One check for text no store keeps (NUL, lone surrogates), before any handler.
                  dependencies=[Depends(reject_unstorable_text)])
    assets = assets or AssetStore.from_url(settings.resolved_assets_url)
    svc = Services(settings=settings, store=store, engine=engine_client, assets=assets,
                   policy=policy or PolicyChecker(settings.all_policy_words()), metrics=metrics or IngressMetrics(),
                   links=ImageLinks.from_settings(settings, assets), waiters=Waiters(settings))
    app.state.services = svc
    # Read by the auth dependency, the error handlers and the middleware:
    app.state.settings, app.state.store, app.state.metrics = settings, store, svc.metrics
    app.state.max_body_bytes = settings.max_body_bytes
    install_error_handlers(app)
    app.add_middleware(SchemaMethodGuard)  # innermost: after the request id and metrics
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes,
                       proxy_request_id=proxy_request_id)
    for module in ROUTERS:
        app.include_router(module.router)
    install_openapi(app)
    install_offline_docs(app)
    install_studio(app)
    return app


__all__ = ["API_VERSION", "create_app", "event_renderer", "render_avatar", "store_error"]
