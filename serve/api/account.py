"""GET /v1/account: tier, limits, credit balance and costs."""
from __future__ import annotations

from fastapi import APIRouter

from .. import schemas as S
from ..schemas import iso
from .common import ERROR_RESPONSES, Auth, Principal, Services, Svc, call, json_response

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
