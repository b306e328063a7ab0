"""What the HTTP layer and the service modules share: the services one app was built with
(`Services`), the way blocking store/asset calls leave the event loop (`call`), and the one
visibility rule of an avatar (`get_visible`). No FastAPI types: the API layer wraps these."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool

from .assets import AssetStore
from .auth import Principal
from .engine_client import EngineClient
from .errors import avatar_not_found, unauthorized_access
from .links import REQUEST_BASE_URL, ImageLinks
from .metrics import IngressMetrics
from .policy import PolicyChecker
from .settings import ServiceSettings
from .store import Avatar, Store
from .vocab import Visibility
from .waiting import Waiters


@dataclass(frozen=True)
class Services:
    """Everything a handler may use; built once by `create_app`."""

    settings: ServiceSettings
    store: Store
    engine: EngineClient
    assets: AssetStore
    policy: PolicyChecker
    metrics: IngressMetrics
    links: ImageLinks
    waiters: Waiters  # bounds on waiting requests (Prefer: wait, event streams)

    @property
    def base_url(self) -> str:
        """Prefix of absolute URLs: `public_base_url`, else the current request's base URL."""
        return self.settings.public_base_url.rstrip("/") or REQUEST_BASE_URL.get()


async def call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Store and asset calls are blocking: run them off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


def visible_to(av: Avatar, principal: Principal) -> bool:
    return av.account_id == principal.id or av.visibility in (Visibility.PUBLIC, Visibility.UNLISTED) or bool(av.published)


async def get_visible(svc: Services, avatar_id: str, principal: Principal) -> Avatar:
    """The avatar if the caller may see it: own, public, unlisted or published (404 / 403 otherwise)."""
    av = await call(svc.store.get_avatar, avatar_id)
    if av is None:
        raise avatar_not_found(avatar_id)
    if not visible_to(av, principal):
        raise unauthorized_access("This avatar is private to another account")
    return av
