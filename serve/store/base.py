"""What every part of the store shares: the database, the clock, ids, cursors and argument checks."""
from __future__ import annotations

import base64
import json
import secrets
import string
from typing import Any, Callable

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite

from .db import Database
from .records import InvalidArgument, InvalidCursor

_ALPHABET = string.ascii_letters + string.digits


def random_string(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(prefix: str, n: int = 20) -> str:
    """Random, unguessable id (`av_` + 20 base62 chars ≈ 119 bits)."""
    return f"{prefix}_{random_string(n)}"


def new_token() -> str:
    """A lease token (jobs and outbox messages)."""
    return secrets.token_urlsafe(16)


def check_limit(limit: int, param: str = "limit", hi: int = 100) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= hi:
        raise InvalidArgument(param, f"must be an integer in 1..{hi}, got {limit!r}")


def check_choice(value: Any, allowed: tuple[str, ...], param: str) -> None:
    if value not in allowed:
        raise InvalidArgument(param, f"must be one of {', '.join(allowed)}, got {value!r}")


def encode_cursor(tag: str, value: Any, last_id: str) -> str:
    raw = json.dumps({"t": tag, "v": value, "id": last_id}, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(tag: str, cursor: str) -> tuple[Any, str]:
    """The (sort value, id) a page ended at; InvalidCursor when malformed or issued for another tag."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("t") != tag or not isinstance(data.get("id"), str):
            raise ValueError
        value = data["v"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError
        return value, data["id"]
    except Exception:
        raise InvalidCursor() from None


def dialect_insert(conn: Connection, table: Table) -> Any:
    """INSERT with the dialect's `ON CONFLICT` clauses (SQLite and PostgreSQL spell them alike)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


class StorePart:
    """Base of the store's parts (one per aggregate); `Store` combines them over one Database."""

    db: Database
    _clock: Callable[[], float]
    _render: Callable[..., dict]

    def _now(self) -> float:
        return float(self._clock())
