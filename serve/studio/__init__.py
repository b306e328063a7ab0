"""The web studio (`/studio`) and offline API docs (`/v1/docs`), served by the API app itself.

The studio is static files (`static/`: one HTML page, its CSS and ES modules; no build step,
nothing from another origin) that talk to the same `/v1` API with the user's key as a bearer
header, so no cookie exists and a forged cross-site request carries no credential. Every
studio response carries a strict Content-Security-Policy: scripts and styles only from this
origin (no inline code), images also from `data:`/`blob:` (previews, local photo thumbnails).

Swagger UI's assets (Swagger UI 5, which reads OpenAPI 3.1) come from the `fastapi-offline`
package (MIT; the Swagger UI files in it are Apache-2.0) instead of a CDN, so `/v1/docs` renders
on a machine without internet.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC_DIR = Path(str(resources.files(__name__) / "static"))
STUDIO_PATH = "/studio"
DOCS_ASSETS = "/v1/docs/assets"

#: The studio's policy: same-origin code only, no inline script or style, no framing, no plugins.
STUDIO_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
              "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
              "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": STUDIO_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class StudioHeaders:
    """Adds `SECURITY_HEADERS` to every response under `/studio` (page and assets)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == STUDIO_PATH or path.startswith(STUDIO_PATH + "/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.lower().encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def install_studio(app: FastAPI) -> None:
    """`GET /studio` (the page) and `/studio/static/*` (its assets), outside the OpenAPI document."""

    @app.get(STUDIO_PATH, include_in_schema=False)
    async def studio_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount(f"{STUDIO_PATH}/static", StaticFiles(directory=STATIC_DIR), name="studio-static")
    app.add_middleware(StudioHeaders)


def install_offline_docs(app: FastAPI) -> None:
    """`GET /v1/docs`: Swagger UI with its script, CSS and icon served from the installed
    `fastapi-offline` package's static folder (the app must be built with `docs_url=None`)."""
    assets = Path(str(resources.files("fastapi_offline") / "static"))
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="swagger-ui")

    @app.get("/v1/docs", include_in_schema=False)
    async def swagger_docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/v1/openapi.json", title=f"{app.title} — docs",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")
