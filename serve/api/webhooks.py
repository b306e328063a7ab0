"""Webhook endpoints: create (the signing secret is shown once), list, read, delete."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Path, Query

from .. import schemas as S
from ..errors import ApiError, invalid_request
from ..settings import ServiceSettings
from ..webhooks import DestinationRefused, check_destination
from .common import ERROR_RESPONSES, Auth, Principal, Services, Svc, call, cursor_query, offset_query, dump, json_response
from .idempotency import Idem, Idempotency
from .rendering import render_endpoint, render_page

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=ERROR_RESPONSES)
WebhookId = Path(alias="webhookId")


def check_webhook_url(url: str, settings: ServiceSettings) -> None:
    """400 naming `url` for non-HTTP(S) or (unless allowed) private/loopback destinations."""
    try:
        check_destination(url, allow_private=settings.webhooks.allow_private, allowlist=settings.webhooks.allowlist)
    except DestinationRefused as exc:
        raise invalid_request(str(exc), "url") from None


def webhook_not_found(webhook_id: str) -> ApiError:
    return ApiError(404, "webhook_not_found", f"No webhook endpoint {webhook_id!r}", param="webhookId")


@router.post("/webhooks", status_code=201, response_model=S.WebhookEndpoint,
             summary="Create an endpoint; the signing secret is only shown here")
async def create_webhook(body: S.WebhookCreateRequest, principal: Principal = Auth, svc: Services = Svc,
                         idem: Idempotency = Idem):
    async def produce():
        await call(check_webhook_url, body.url, svc.settings)
        e = await call(svc.store.create_endpoint, principal.id, body.url, list(body.events), description=body.description)
        return json_response(render_endpoint(e, with_secret=True), 201)

    return await idem.run(dump(body), produce)


@router.get("/webhooks", response_model=S.WebhookEndpointList, summary="Your endpoints, oldest first")
async def list_webhooks(principal: Principal = Auth, svc: Services = Svc, limit: int = Query(20, ge=1, le=100),
                        offset: Optional[int] = offset_query(), cursor: Optional[str] = cursor_query()):
    page = await call(svc.store.page_endpoints, principal.id, limit=limit, cursor=cursor, offset=offset)
    return json_response(S.WebhookEndpointList(**render_page(page, limit, webhooks=[render_endpoint(e) for e in page.items])))


@router.get("/webhooks/{webhookId}", response_model=S.WebhookEndpoint)
async def get_webhook(webhook_id: str = WebhookId, principal: Principal = Auth, svc: Services = Svc):
    e = await call(svc.store.get_endpoint, principal.id, webhook_id)
    if e is None:
        raise webhook_not_found(webhook_id)
    return json_response(render_endpoint(e))


@router.delete("/webhooks/{webhookId}", response_model=S.DeletedWebhook)
async def delete_webhook(webhook_id: str = WebhookId, principal: Principal = Auth, svc: Services = Svc):
    if not await call(svc.store.delete_endpoint, principal.id, webhook_id):
        raise webhook_not_found(webhook_id)
    return json_response(S.DeletedWebhook(id=webhook_id))
