"""Standard Webhooks signing (https://www.standardwebhooks.com) and its verification.

The secret is `whsec_<base64 key>`, the key is the base64-decoded part, and `webhook-signature`
is `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">` (several
space-separated signatures are accepted on verification, for key rotation). The tests check it
against the reference implementation (`standardwebhooks`). Each delivery also carries
`X-Avatar-Signature: sha256=<hex HMAC-SHA256 of the raw body>` for receivers written for
Percify's docs (a hex body HMAC; it does not bind a timestamp, so those receivers get no replay
bound: prefer the Standard Webhooks headers).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Mapping

SECRET_PREFIX = "whsec_"


class SignatureError(ValueError):
    """A webhook failed verification; the message says why (missing header, stale, mismatch)."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (the prefix is optional, as in the reference
    libraries). Raises ValueError naming the secret when the base64 part is malformed."""
    raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("secret: not a Standard Webhooks secret (whsec_ + base64)") from None
    if not key:
        raise ValueError("secret: empty key")
    return key


def _body_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """`v1,<base64 HMAC-SHA256("{msg_id}.{timestamp}.{body}")>`."""
    to_sign = f"{msg_id}.{int(timestamp)}.".encode() + _body_bytes(body)
    digest = hmac.new(secret_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


#: The body-signature header for receivers written against Percify-style docs: `sha256=<hex>`.
BODY_SIGNATURE_HEADER = "X-Avatar-Signature"


def body_signature(secret: str, body: bytes | str) -> str:
    """Hex HMAC-SHA256 of the raw body, keyed with the endpoint's secret exactly as shown at
    creation (the whole `whsec_…` string, UTF-8), as receivers written for Percify compute it."""
    return hmac.new(secret.encode("utf-8"), _body_bytes(body), hashlib.sha256).hexdigest()


def verify_body_signature(secret: str, header_value: str, body: bytes | str) -> bool:
    """Check an `X-Avatar-Signature` value (`sha256=<hex>`, or the bare hex) in constant time."""
    given = header_value.strip()
    if given.startswith("sha256="):
        given = given[len("sha256="):]
    return hmac.compare_digest(given.lower().encode("ascii", "replace"), body_signature(secret, body).encode("ascii"))


def signature_headers(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt, plus the hex body signature
    (`X-Avatar-Signature: sha256=<hex HMAC-SHA256 of the body>`)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        BODY_SIGNATURE_HEADER: "sha256=" + body_signature(secret, body),
    }


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes | str, *,
                     tolerance_s: float = 300.0, now: float | None = None) -> str:
    """Verify a received webhook (receivers and tests); returns its `webhook-id`.

    Header names are case-insensitive; the timestamp must lie within `tolerance_s` of `now`
    (default: the wall clock) in either direction, which bounds replays; any one of the
    space-separated `v1,` signatures may match (compared in constant time). Raises
    SignatureError."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lower.get(h)]
    if missing:
        raise SignatureError(f"missing header(s): {', '.join(missing)}")
    msg_id, ts_raw = lower["webhook-id"], lower["webhook-timestamp"]
    try:
        ts = int(ts_raw)
    except ValueError:
        raise SignatureError(f"webhook-timestamp: not an integer ({ts_raw[:32]!r})") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError(f"webhook-timestamp: {ts} is outside the {tolerance_s:g} s tolerance")
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1].encode("ascii")
    for candidate in lower["webhook-signature"].split():
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode("ascii", "replace"), expected):
            return msg_id
    raise SignatureError("webhook-signature: no matching v1 signature")


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, *, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """`verify_signature` as a boolean, for receivers that only need yes/no."""
    try:
        verify_signature(secret, headers, body, tolerance_s=tolerance_s, now=now)
        return True
    except (SignatureError, ValueError):
        return False
