"""What every part of the store shares: the database, the clock, ids, cursors and argument checks."""
from __future__ import annotations

import base64
import json
import secrets
import string
from typing import Any, Callable

from sqlalchemy import Connection, ColumnElement, Select, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

from .db import Database
from .records import InvalidArgument, InvalidCursor, Page

_ALPHABET = string.ascii_letters + string.digits


def random_string(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_id(prefix: str, n: int = 20) -> str:
    """Random, unguessable id (`av_` + 20 base62 chars ≈ 119 bits)."""
    return f"{prefix}_{random_string(n)}"


def new_token() -> str:
    """A lease token (jobs and outbox messages)."""
    return secrets.token_urlsafe(16)


def check_offset(offset: int | None, cursor: str | None) -> None:
    """`offset` is a non-negative integer, and pages go by `offset` or by `cursor`, not both."""
    if offset is None:
        return
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidArgument("offset", f"must be a non-negative integer, got {offset!r}")
    if cursor:
        raise InvalidArgument("offset", "page with offset or with cursor, not both")


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
        last_id = data.get("id") if isinstance(data, dict) else None
        if data.get("t") != tag or not isinstance(last_id, (str, int)) or isinstance(last_id, bool):
            raise ValueError
        value = data["v"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError
        return value, data["id"]
    except Exception:
        raise InvalidCursor() from None

def keyset(column: Any, id_column: Any, order: str, value: Any, last_id: str) -> ColumnElement[bool]:
    """Rows strictly after (value, id) in `order`: id breaks ties so pages never repeat or skip."""
    if order == "desc":
        return (column < value) | ((column == value) & (id_column < last_id))
    return (column > value) | ((column == value) & (id_column > last_id))


def page(conn: Connection, stmt: Select, column: Any, id_column: Any, order: str, tag: str, limit: int,
         cursor: str | None, convert: Any, offset: int | None = None) -> Page:
    """One page of `stmt` ordered by (column, id), by keyset `cursor` (which encodes the last row
    of the previous page) or by `offset`, with the total under the same filters and the page's
    offset (for a cursor page: the matching rows before it). All in the caller's transaction, so
    the total and the page agree."""
    check_offset(offset, cursor)
    total = conn.execute(select(func.count()).select_from(stmt.order_by(None).subquery())).scalar_one()
    start = offset or 0
    if cursor:
        after = stmt.where(keyset(column, id_column, order, *decode_cursor(tag, cursor)))
        start = total - conn.execute(select(func.count()).select_from(after.subquery())).scalar_one()
        stmt = after
    elif offset:
        stmt = stmt.offset(offset)
    direction = (lambda c: c.desc()) if order == "desc" else (lambda c: c.asc())
    rows = conn.execute(stmt.order_by(direction(column), direction(id_column)).limit(limit + 1)).mappings().all()
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(tag, last[column.name], last[id_column.name])
    return Page([convert(r) for r in rows[:limit]], next_cursor, total=int(total), offset=int(start))


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
