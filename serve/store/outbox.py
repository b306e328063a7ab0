"""Webhook endpoints and the durable outbox: events are written in the same transaction as the
state change they announce (`emit`), and delivery workers lease due messages from here."""
from __future__ import annotations

import base64
import secrets
from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, bindparam, delete, exists, func, insert, select, update

from ..vocab import ALL_EVENTS, EVENT_TYPES, EventType, OutboxStatus
from .base import StorePart, check_limit, new_id, new_token, page
from .records import AccountNotFound, Avatar, Delivery, EndpointNotFound, InvalidArgument, Page, WebhookEndpoint
from .schema import accounts, webhook_endpoints as E, webhook_outbox as O

_DELIVERY_COLUMNS = (*O.c, E.c.url, E.c.secret, E.c.consecutive_failures)


_SUBSCRIBERS = (select(E.c.id, E.c.events).where(E.c.account_id == bindparam("acct"), E.c.disabled.is_(False))
                .order_by(E.c.created_at, E.c.id))
_ADD_MESSAGES = insert(O)
# The avatar's last message number: the emitting transaction changed (and so locked) the avatar
# row, so two transactions about one avatar cannot pick the same next number.
_LAST_SEQ = select(func.max(O.c.subject_seq)).where(O.c.subject_id == bindparam("subject"))


def to_endpoint(r: Mapping[str, Any]) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=r["id"], account_id=r["account_id"], url=r["url"], events=r["events"], secret=r["secret"],
        disabled=bool(r["disabled"]), disabled_reason=r["disabled_reason"],
        consecutive_failures=int(r["consecutive_failures"]), created_at=r["created_at"], description=r["description"],
    )


def to_delivery(r: Mapping[str, Any]) -> Delivery:
    return Delivery(
        id=r["id"], event_id=r["event_id"], endpoint_id=r["endpoint_id"], account_id=r["account_id"],
        event_type=r["event_type"], payload=r["payload"], status=r["status"], attempts=int(r["attempts"]),
        next_attempt_at=r["next_attempt_at"], created_at=r["created_at"], last_error=r["last_error"],
        lease_token=r["lease_token"], url=r["url"], secret=r["secret"],
        endpoint_consecutive_failures=int(r["consecutive_failures"]), request_id=r["request_id"],
    )


def default_payload(event_type: str, avatar: Avatar, extra: dict) -> dict:
    """`{"type", "avatar": <record as a dict, worker internals removed>, **extra}`."""
    data = avatar.to_dict()
    for private in ("lease_owner", "lease_token", "lease_expires_at", "request_id"):
        data.pop(private, None)
    return {"type": event_type, "avatar": data, **extra}


def _deliveries():
    return select(*_DELIVERY_COLUMNS).join(E, E.c.id == O.c.endpoint_id)


class WebhooksStore(StorePart):
    def emit(self, conn: Connection, event_type: EventType, avatar: Avatar, extra: dict | None = None) -> int:
        """Write one outbox message per enabled endpoint of the owner subscribed to the event
        (inside the caller's transaction); returns how many."""
        endpoints = conn.execute(_SUBSCRIBERS, {"acct": avatar.account_id}).all()
        targets = [e.id for e in endpoints if ALL_EVENTS in (e.events or []) or event_type in (e.events or [])]
        if not targets:
            return 0
        now = self._now()
        payload = self._render(str(event_type), avatar, dict(extra or {}))
        event_id = new_id("evt")
        seq = int(conn.execute(_LAST_SEQ, {"subject": avatar.id}).scalar() or 0) + 1
        conn.execute(_ADD_MESSAGES, [
            {"id": new_id("msg"), "event_id": event_id, "endpoint_id": endpoint_id, "account_id": avatar.account_id,
             "event_type": str(event_type), "payload": payload, "status": OutboxStatus.PENDING, "attempts": 0,
             "next_attempt_at": now, "created_at": now, "updated_at": now, "request_id": avatar.request_id,
             "subject_id": avatar.id, "subject_seq": seq}
            for endpoint_id in targets])
        return len(targets)

    def create_endpoint(self, account_id: str, url: str, events: Sequence[str] = (ALL_EVENTS,), *,
                        secret: str | None = None, description: str | None = None) -> WebhookEndpoint:
        """New endpoint; `secret` defaults to a fresh `whsec_…`. Events must be EVENT_TYPES or
        "*" (InvalidArgument names `events`). URL safety (private ranges) is the caller's check."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
            raise InvalidArgument("url", "must be an http(s) URL of at most 2048 characters")
        if isinstance(events, str) or not events:
            raise InvalidArgument("events", "must be a non-empty list of event types")
        bad = [e for e in events if e != ALL_EVENTS and e not in EVENT_TYPES]
        if bad:
            raise InvalidArgument("events", f"unknown event types {bad}; known: {', '.join(EVENT_TYPES)}")
        secret = secret or "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        endpoint_id = new_id("wh")
        events_list = sorted({str(e) for e in events})

        def work(conn: Connection) -> WebhookEndpoint:
            if conn.execute(select(accounts.c.id).where(accounts.c.id == account_id)).first() is None:
                raise AccountNotFound(account_id)
            now = self._now()
            row = conn.execute(insert(E).values(
                id=endpoint_id, account_id=account_id, url=url, events=events_list, secret=secret,
                description=description, disabled=False, consecutive_failures=0, created_at=now, updated_at=now,
            ).returning(*E.c)).mappings().one()
            return to_endpoint(row)

        return self.db.run(work)

    def emit_account_event(self, conn: Connection, account_id: str, event_type: EventType, data: dict) -> int:
        """Like `emit`, for an event about the account rather than an avatar (`credits.low_balance`):
        the payload is `{"type", "data": data}`, written inside the caller's transaction."""
        endpoints = conn.execute(_SUBSCRIBERS, {"acct": account_id}).all()
        targets = [e.id for e in endpoints if ALL_EVENTS in (e.events or []) or event_type in (e.events or [])]
        if not targets:
            return 0
        now = self._now()
        event_id = new_id("evt")
        conn.execute(_ADD_MESSAGES, [
            {"id": new_id("msg"), "event_id": event_id, "endpoint_id": endpoint_id, "account_id": account_id,
             "event_type": str(event_type), "payload": {"type": str(event_type), "data": data},
             "status": OutboxStatus.PENDING, "attempts": 0, "next_attempt_at": now, "created_at": now,
             "updated_at": now, "request_id": None}
            for endpoint_id in targets])
        return len(targets)

    def page_endpoints(self, account_id: str, *, limit: int = 20, cursor: str | None = None,
                       offset: int | None = None) -> Page[WebhookEndpoint]:
        """The account's endpoints, oldest first, one page (by cursor or offset) with the total."""
        check_limit(limit)
        stmt = select(E).where(E.c.account_id == account_id)
        return self.db.read(lambda c: page(c, stmt, E.c.created_at, E.c.id, "asc", "", limit, cursor,
                                           to_endpoint, offset))

    def list_endpoints(self, account_id: str) -> list[WebhookEndpoint]:
        """The account's endpoints, oldest first."""
        stmt = select(E).where(E.c.account_id == account_id).order_by(E.c.created_at, E.c.id)
        return [to_endpoint(r) for r in self.db.read(lambda c: c.execute(stmt).mappings().all())]

    def get_endpoint(self, account_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        """One of the account's endpoints, or None (also for another account's endpoint)."""
        stmt = select(E).where(E.c.id == endpoint_id, E.c.account_id == account_id)
        row = self.db.read(lambda c: c.execute(stmt).mappings().first())
        return to_endpoint(row) if row else None

    def delete_endpoint(self, account_id: str, endpoint_id: str) -> bool:
        """Delete one of the account's endpoints and its undelivered messages; False if absent."""
        def work(conn: Connection) -> bool:
            if conn.execute(delete(E).where(E.c.id == endpoint_id, E.c.account_id == account_id)).rowcount == 0:
                return False
            conn.execute(delete(O).where(O.c.endpoint_id == endpoint_id))
            return True

        return self.db.run(work)

    def set_endpoint_disabled(self, account_id: str, endpoint_id: str, disabled: bool,
                              reason: str | None = None) -> WebhookEndpoint:
        """Disable or re-enable an endpoint (re-enabling resets consecutive failures).
        Raises EndpointNotFound."""
        def work(conn: Connection) -> WebhookEndpoint:
            values: dict[str, Any] = {"disabled": True, "disabled_reason": reason} if disabled else {
                "disabled": False, "disabled_reason": None, "consecutive_failures": 0}
            row = conn.execute(update(E).where(E.c.id == endpoint_id, E.c.account_id == account_id)
                               .values(**values, updated_at=self._now()).returning(*E.c)).mappings().first()
            if row is None:
                raise EndpointNotFound(endpoint_id)
            return to_endpoint(row)

        return self.db.run(work)

    def claim_deliveries(self, worker_id: str, limit: int = 10, lease_seconds: float = 30.0) -> list[Delivery]:
        """Lease up to `limit` due pending messages (next_attempt_at <= now, no live lease),
        oldest first. Messages of disabled endpoints are marked failed instead of claimed.
        Events of one avatar reach an endpoint in the order they happened: a message waits
        while an earlier message of the same avatar to the same endpoint is still pending
        (being sent or waiting for a retry); one given up (failed) no longer holds it back."""
        check_limit(limit, "limit", 1000)

        def work(conn: Connection) -> list[Delivery]:
            now = self._now()
            conn.execute(update(O).values(status=OutboxStatus.FAILED, last_error="endpoint disabled", updated_at=now)
                         .where(O.c.status == OutboxStatus.PENDING, O.c.next_attempt_at <= now,
                                O.c.endpoint_id.in_(select(E.c.id).where(E.c.disabled.is_(True)))))
            free = (O.c.lease_expires_at.is_(None)) | (O.c.lease_expires_at < now)
            earlier = O.alias("earlier")
            first_of_subject = ~exists().where(
                earlier.c.subject_id == O.c.subject_id, earlier.c.endpoint_id == O.c.endpoint_id,
                earlier.c.subject_seq < O.c.subject_seq, earlier.c.status == OutboxStatus.PENDING)
            ids = conn.execute(select(O.c.id).where(O.c.status == OutboxStatus.PENDING, O.c.next_attempt_at <= now, free,
                                                    O.c.subject_id.is_(None) | first_of_subject)
                               .order_by(O.c.next_attempt_at, O.c.created_at, O.c.id).limit(limit)
                               .with_for_update(skip_locked=True)).scalars().all()
            claimed = []
            for message_id in ids:
                taken = conn.execute(update(O).where(O.c.id == message_id, O.c.status == OutboxStatus.PENDING, free)
                                     .values(lease_owner=worker_id, lease_token=new_token(),
                                             lease_expires_at=now + lease_seconds, updated_at=now)).rowcount
                if taken:
                    row = conn.execute(_deliveries().where(O.c.id == message_id)).mappings().first()
                    if row is not None:
                        claimed.append(to_delivery(row))
            return claimed

        return self.db.run(work)

    def mark_delivered(self, message_id: str, lease_token: str) -> bool:
        """pending + matching lease -> delivered; resets the endpoint's consecutive failures."""
        def work(conn: Connection) -> bool:
            now = self._now()
            endpoint_id = conn.execute(
                update(O).where(O.c.id == message_id, O.c.status == OutboxStatus.PENDING, O.c.lease_token == lease_token)
                .values(status=OutboxStatus.DELIVERED, attempts=O.c.attempts + 1, delivered_at=now, updated_at=now,
                        lease_owner=None, lease_token=None, lease_expires_at=None, last_error=None)
                .returning(O.c.endpoint_id)).scalar()
            if endpoint_id is None:
                return False
            conn.execute(update(E).where(E.c.id == endpoint_id).values(consecutive_failures=0))
            return True

        return self.db.run(work)

    def mark_attempt_failed(self, message_id: str, lease_token: str, error: str, *, next_attempt_at: float | None,
                            disable_endpoint: bool = False, disable_reason: str | None = None) -> bool:
        """Record a failed attempt: attempts+1, last_error, endpoint consecutive_failures+1;
        retry at `next_attempt_at`, or mark the message failed when it is None. With
        `disable_endpoint` the endpoint is disabled (its other pending messages fail at claim)."""
        def work(conn: Connection) -> bool:
            now = self._now()
            status = OutboxStatus.PENDING if next_attempt_at is not None else OutboxStatus.FAILED
            endpoint_id = conn.execute(
                update(O).where(O.c.id == message_id, O.c.status == OutboxStatus.PENDING, O.c.lease_token == lease_token)
                .values(status=status, attempts=O.c.attempts + 1, last_error=str(error)[:2000],
                        next_attempt_at=next_attempt_at if next_attempt_at is not None else now, updated_at=now,
                        lease_owner=None, lease_token=None, lease_expires_at=None)
                .returning(O.c.endpoint_id)).scalar()
            if endpoint_id is None:
                return False
            values: dict[str, Any] = {"consecutive_failures": E.c.consecutive_failures + 1}
            if disable_endpoint:
                values.update(disabled=True, disabled_reason=disable_reason or "too many failed deliveries",
                              updated_at=now)
            conn.execute(update(E).where(E.c.id == endpoint_id).values(**values))
            return True

        return self.db.run(work)

    def list_deliveries(self, account_id: str, *, endpoint_id: str | None = None, limit: int = 100) -> list[Delivery]:
        """The account's outbox messages, newest first (for inspection and tests)."""
        check_limit(limit, "limit", 1000)
        stmt = _deliveries().where(O.c.account_id == account_id)
        if endpoint_id is not None:
            stmt = stmt.where(O.c.endpoint_id == endpoint_id)
        stmt = stmt.order_by(O.c.created_at.desc(), O.c.id.desc()).limit(limit)
        return [to_delivery(r) for r in self.db.read(lambda c: c.execute(stmt).mappings().all())]
