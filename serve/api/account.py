"""GET /v1/account (tier, limits, credit balance and costs) and Percify's user credits API:
GET /v1/user/credits/balance and GET /v1/user/credits/history (the ledger, paged)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from fastapi import APIRouter, Query

from .. import schemas as S
from ..schemas import iso
from ..store import Page
from .common import ERROR_RESPONSES, Auth, Principal, Services, Svc, call, cursor_query, offset_query, json_response
from .rendering import render_page

router = APIRouter(prefix="/v1", tags=["account"], responses=ERROR_RESPONSES)


@router.get("/account", response_model=S.Account)
async def account(principal: Principal = Auth, svc: Services = Svc):
    acct = await call(svc.store.get_account, principal.id)
    desc = await svc.engine.describe()
    s = svc.settings
    costs = S.Costs(generate_per_image={n: s.per_image_cost(n, p.credit_cost) for n, p in desc.profiles.items()},
                    percify=s.cost_percify, cast=s.cost_cast)
    limits = S.Limits(requests_per_minute=principal.limits.requests_per_minute,
                      concurrent_generations=principal.limits.concurrent_jobs)
    return json_response(S.Account(id=acct.id, tier=acct.tier, credits=acct.credits, limits=limits, costs=costs,
                                   created_at=iso(acct.created_at)))


def month_start(now: float) -> float:
    """Epoch seconds of the first instant of `now`'s UTC calendar month."""
    t = datetime.fromtimestamp(now, tz=timezone.utc)
    return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


@router.get("/user/credits/balance", response_model=S.CreditBalance, summary="Credit balance and usage per operation")
async def credit_balance(principal: Principal = Auth, svc: Services = Svc):
    acct = await call(svc.store.get_account, principal.id)
    summary = await call(svc.store.credit_summary, principal.id, month_start(svc.store._now()))
    usage = {op: S.OperationUsage(**u) for op, u in sorted(summary["by_operation"].items())}
    return json_response(S.CreditBalance(
        balance=acct.credits, reserved=summary["reserved"], lifetime=summary["used"],
        current_month=summary["used_since"], granted=summary["granted"], tier=acct.tier,
        low_balance_threshold=svc.settings.low_balance_threshold, usage=usage))


@router.get("/user/credits/history", response_model=S.CreditHistory,
            summary="The credit ledger, newest first, paged by offset or cursor")
async def credit_history(principal: Principal = Auth, svc: Services = Svc, limit: int = Query(20, ge=1, le=100),
                         offset: Optional[int] = offset_query(),
                         cursor: Optional[str] = cursor_query(int_keys=True)):
    page: Page = await call(svc.store.ledger_page, principal.id, limit=limit, cursor=cursor, offset=offset)
    job_kinds = ("reserve", "charge", "release")
    items = [S.CreditTransaction(id=e.id, type=e.kind, amount=e.amount, delta=e.delta,
                                 operation=e.note if e.kind in job_kinds else None, avatar_id=e.avatar_id,
                                 note=e.note if e.kind not in job_kinds else None, created_at=iso(e.created_at))
             for e in page.items]
    return json_response(S.CreditHistory(**render_page(page, limit, transactions=items)))
