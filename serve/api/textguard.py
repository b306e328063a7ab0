"""One check at the edge for text no store can keep: NUL characters (PostgreSQL's text type
refuses U+0000, SQLite keeps it) and lone UTF-16 surrogates (not encodable as UTF-8 at all).
Every request's path parameters, query parameters, JSON body and form fields pass through
`reject_unstorable_text` (an app-wide dependency) so such input gets the same 400
`invalid_request`, naming the parameter, on every store, before any handler or store sees it.
A query parameter the route does not declare is refused there too, as unknown body fields are.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

from fastapi import Request

from ..errors import _camel, invalid_request

# Code points no store keeps: NUL and the surrogate range (only reachable through JSON escapes
# such as "\ud800" or a decoder that let them through).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
#: Form parts that are photo files, also when sent without a filename (RFC 7578 makes it
#: optional; the form parser then hands their bytes over as text): never checked as text.
FILE_PARTS = re.compile(r"photo[0-9]*")
# A JSON body can only carry them as a raw NUL byte (invalid JSON anyway) or as \u escapes:
# bodies without any of these byte patterns skip the parse (the common case).
_SUSPECT_BYTES = re.compile(rb"\x00|\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def unstorable(text: str) -> bool:
    """True when `text` holds a character no store can keep."""
    return _UNSTORABLE.search(text) is not None


def _walk(value: Any, path: str) -> Iterator[str]:
    """The parameter paths (`characters[1].prompt`, wire spelling) whose key or value is unstorable."""
    if isinstance(value, str):
        if unstorable(value):
            yield path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and unstorable(key):
                yield path or "body"
            else:
                yield from _walk(item, child)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")


def _refuse(param: str):
    return invalid_request(f"{param} contains a character that cannot be stored (NUL or an unpaired surrogate)",
                           param)


def declared_query_params(request: Request) -> set[str] | None:
    """The query parameter names the matched route declares (None when unknown)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return None
    names: set[str] = set()
    stack = [dependant]
    while stack:
        d = stack.pop()
        names.update(p.alias for p in getattr(d, "query_params", []))
        stack.extend(getattr(d, "dependencies", []))
    return names


async def reject_unstorable_text(request: Request) -> None:
    """App-wide dependency: 400 invalid_request naming the first parameter with unstorable text."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and unstorable(value):
            raise _refuse(_camel(name))
    known = declared_query_params(request)
    for name, value in request.query_params.multi_items():
        if unstorable(name) or unstorable(value):
            raise _refuse(name if not unstorable(name) else "query")
        if known is not None and name not in known:  # like unknown body fields: a typo gets a 400 naming it
            raise invalid_request(f"{name or '(empty name)'} is not a recognised query parameter"
                                  f"{'; known: ' + ', '.join(sorted(known)) if known else ''}", name or "query")
    if request.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()  # cached: the handler gets the same parsed form
        for name, value in form.multi_items():
            if isinstance(value, str) and FILE_PARTS.fullmatch(name):
                continue
            if unstorable(name) or (isinstance(value, str) and unstorable(value)):
                raise _refuse(name if not unstorable(name) else "body")
        return
    body = await request.body()  # cached: the handler parses the same bytes
    if not body or _SUSPECT_BYTES.search(body) is None:
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        return  # not JSON: the handler's own parsing reports it
    for param in _walk(parsed, ""):
        raise _refuse(param)
