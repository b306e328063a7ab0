"""What every part of the store shares: the database, the clock, ids, cursors and argument checks."""
from __future__ import annotations

import re
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


def check_offset(offset: int | None) -> None:
    """`offset` is None or a non-negative integer."""
    if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool) or offset < 0):
        raise InvalidArgument("offset", f"must be a non-negative integer, got {offset!r}")


def check_limit(limit: int, param: str = "limit", hi: int = 100) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= hi:
        raise InvalidArgument(param, f"must be an integer in 1..{hi}, got {limit!r}")


def check_choice(value: Any, allowed: tuple[str, ...], param: str) -> None:
    if value not in allowed:
        raise InvalidArgument(param, f"must be one of {', '.join(allowed)}, got {value!r}")


#: Cursors are readable positions, `[<order>~]<sort value>~<last id>` (e.g.
#: `createdAt~desc~1764400000.25~av_x`): exactly what `cursor_pattern` matches is accepted, so the
#: OpenAPI document can state the format, and a cursor carries the order it was issued for.
CURSOR_VALUE = r"-?[0-9]{1,17}(?:\.[0-9]{1,17})?"
CURSOR_ID = r"[A-Za-z0-9_]{1,64}"


CURSOR_INT = r"[0-9]{1,17}"


def cursor_pattern(*orders: str, int_keys: bool = False) -> str:
    """The regular expression of the cursors issued for `orders` (none: a list with one order);
    `int_keys`: a list ordered by an integer id (the ledger)."""
    prefix = f"(?:{'|'.join(re.escape(o) for o in orders)})~" if orders else ""
    if int_keys:
        return f"^{prefix}{CURSOR_INT}~{CURSOR_INT}$"
    return f"^{prefix}{CURSOR_VALUE}~{CURSOR_ID}$"


def _cursor_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"cannot page on {value!r}")
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))  # round-trips exactly: ties on equal values stay exact
    return text if "e" not in text else format(value, ".6f")


def encode_cursor(tag: str, value: Any, last_id: str | int) -> str:
    """The cursor after the row (value, last_id) of a list ordered as `tag` ("" for lists with one order)."""
    return "~".join([*([tag] if tag else []), _cursor_value(value), str(last_id)])


def decode_cursor(tag: str, cursor: str, int_id: bool = False) -> tuple[Any, str | int]:
    """The (sort value, id) a page ended at; InvalidCursor when malformed or issued for another order."""
    m = re.fullmatch(f"{re.escape(tag) + '~' if tag else ''}({CURSOR_VALUE})~({CURSOR_ID})", cursor or "")
    if m is None or (int_id and not (m.group(2).isdigit() and len(m.group(2)) <= 17)):
        raise InvalidCursor()
    raw_value, raw_id = m.groups()
    value: Any = float(raw_value) if "." in raw_value else int(raw_value)
    return value, int(raw_id) if int_id else raw_id


def keyset(column: Any, id_column: Any, order: str, value: Any, last_id: str) -> ColumnElement[bool]:
    """Rows strictly after (value, id) in `order`: id breaks ties so pages never repeat or skip."""
    if order == "desc":
        return (column < value) | ((column == value) & (id_column < last_id))
    return (column > value) | ((column == value) & (id_column > last_id))


def page(conn: Connection, stmt: Select, column: Any, id_column: Any, order: str, tag: str, limit: int,
         cursor: str | None, convert: Any, offset: int | None = None) -> Page:
    """One page of `stmt` ordered by (column, id): after the keyset `cursor` (the last row of the
    previous page) if given, then skipping `offset` rows; with the total under the same filters
    and the page's offset (matching rows before it). One transaction, so they agree."""
    check_offset(offset)
    total = conn.execute(select(func.count()).select_from(stmt.order_by(None).subquery())).scalar_one()
    start = 0
    if cursor:
        int_id = getattr(id_column.type, "python_type", str) is int
        after = stmt.where(keyset(column, id_column, order, *decode_cursor(tag, cursor, int_id)))
        start = total - conn.execute(select(func.count()).select_from(after.subquery())).scalar_one()
        stmt = after
    if offset:
        stmt = stmt.offset(offset)
        start += offset
    direction = (lambda c: c.desc()) if order == "desc" else (lambda c: c.asc())
    rows = conn.execute(stmt.order_by(direction(column), direction(id_column)).limit(limit + 1)).mappings().all()
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(tag, last[column.name], last[id_column.name])
    return Page([convert(r) for r in rows[:limit]], next_cursor, total=int(total), offset=int(min(start, total)))


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
