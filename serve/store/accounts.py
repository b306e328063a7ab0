"""Accounts, hashed API keys and the credit ledger."""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Mapping

from sqlalchemy import Connection, bindparam, func, insert, select, update

from ..vocab import TIERS, LedgerKind
from .base import StorePart, check_choice, check_limit, new_id, page, random_string
from .records import Account, AccountNotFound, ApiKey, InvalidArgument, LedgerEntry, Page
from .schema import accounts, api_keys, credit_ledger

_KEY_ENV_RE = re.compile(r"^[a-z]{2,10}$")
_PREFIX_RANDOM_LEN = 8
_SECRET_LEN = 32
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


_ADD_LEDGER = insert(credit_ledger)
_MOVE_CREDITS = update(accounts).where(accounts.c.id == bindparam("acct")).values(
    credits=accounts.c.credits + bindparam("delta"))
_GET_ACCOUNT = select(accounts).where(accounts.c.id == bindparam("acct"))
_KEY_LOOKUP = (select(api_keys.c.secret_hash, api_keys.c.revoked, *accounts.c)
               .join(accounts, accounts.c.id == api_keys.c.account_id).where(api_keys.c.prefix == bindparam("prefix")))


def _hash_key(plaintext: str) -> str:
    # Keys carry ~190 random bits, so an unsalted SHA-256 cannot be brute-forced.
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _key_prefix(plaintext: str) -> str | None:
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != "ak" or not _KEY_ENV_RE.match(parts[1]):
        return None
    if len(parts[2]) != _PREFIX_RANDOM_LEN + _SECRET_LEN:
        return None
    return f"ak_{parts[1]}_{parts[2][:_PREFIX_RANDOM_LEN]}"


def to_account(r: Mapping[str, Any]) -> Account:
    return Account(id=r["id"], tier=r["tier"], credits=int(r["credits"]), created_at=r["created_at"])


def to_api_key(r: Mapping[str, Any]) -> ApiKey:
    return ApiKey(id=r["id"], account_id=r["account_id"], prefix=r["prefix"], revoked=bool(r["revoked"]),
                  created_at=r["created_at"], revoked_at=r["revoked_at"])


def to_ledger_entry(r: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(id=int(r["id"]), account_id=r["account_id"], kind=r["kind"], amount=int(r["amount"]),
                       delta=int(r["delta"]), avatar_id=r["avatar_id"], created_at=r["created_at"], note=r["note"])


class AccountsStore(StorePart):
    def add_ledger(self, conn: Connection, account_id: str, kind: LedgerKind, amount: int, delta: int,
                   avatar_id: str | None, note: str | None = None) -> None:
        """Append one ledger entry (inside the caller's transaction)."""
        conn.execute(_ADD_LEDGER, {"account_id": account_id, "kind": kind, "amount": amount, "delta": delta,
                                   "avatar_id": avatar_id, "note": note, "created_at": self._now()})

    def move_credits(self, conn: Connection, account_id: str, delta: int) -> None:
        if delta:
            conn.execute(_MOVE_CREDITS, {"acct": account_id, "delta": delta})

    def create_account(self, tier: str = "free", credits: int = 0) -> Account:
        """New account; initial credits are recorded as a `grant` ledger entry."""
        check_choice(tier, TIERS, "tier")
        if not isinstance(credits, int) or credits < 0:
            raise InvalidArgument("credits", f"must be a non-negative integer, got {credits!r}")
        account_id = new_id("acct", 16)

        def work(conn: Connection) -> Account:
            now = self._now()
            conn.execute(insert(accounts).values(id=account_id, tier=tier, credits=credits, created_at=now))
            if credits:
                self.add_ledger(conn, account_id, LedgerKind.GRANT, credits, credits, None, "initial credits")
            return Account(account_id, tier, credits, now)

        return self.db.run(work)

    def get_account(self, account_id: str) -> Account | None:
        row = self.db.read(lambda c: c.execute(_GET_ACCOUNT, {"acct": account_id}).mappings().first())
        return to_account(row) if row else None

    def _update_account(self, account_id: str, **values: Any) -> Any:
        def work(conn: Connection) -> Account:
            row = conn.execute(update(accounts).where(accounts.c.id == account_id).values(**values)
                               .returning(*accounts.c)).mappings().first()
            if row is None:
                raise AccountNotFound(account_id)
            return to_account(row)

        return work

    def set_tier(self, account_id: str, tier: str) -> Account:
        """Change an account's tier (operator action). Raises AccountNotFound."""
        check_choice(tier, TIERS, "tier")
        return self.db.run(self._update_account(account_id, tier=tier))

    def grant_credits(self, account_id: str, amount: int, note: str | None = None) -> Account:
        """Add `amount` (> 0) credits with a `grant` ledger entry. Raises AccountNotFound."""
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise InvalidArgument("amount", f"must be a positive integer, got {amount!r}")
        change = self._update_account(account_id, credits=accounts.c.credits + amount)

        def work(conn: Connection) -> Account:
            account = change(conn)
            self.add_ledger(conn, account_id, LedgerKind.GRANT, amount, amount, None, note)
            return account

        return self.db.run(work)

    def ledger(self, account_id: str, limit: int = 1000) -> list[LedgerEntry]:
        """Ledger entries of an account, oldest first."""
        stmt = (select(credit_ledger).where(credit_ledger.c.account_id == account_id)
                .order_by(credit_ledger.c.id).limit(limit))
        return [to_ledger_entry(r) for r in self.db.read(lambda c: c.execute(stmt).mappings().all())]

    def ledger_page(self, account_id: str, *, limit: int = 20, cursor: str | None = None,
                    offset: int | None = None) -> Page[LedgerEntry]:
        """The account's ledger, newest first, one page (by cursor or offset) with the total."""
        check_limit(limit)
        stmt = select(credit_ledger).where(credit_ledger.c.account_id == account_id)
        return self.db.read(lambda c: page(c, stmt, credit_ledger.c.id, credit_ledger.c.id, "desc", "", limit,
                                           cursor, to_ledger_entry, offset))

    def credit_summary(self, account_id: str, since: float) -> dict[str, Any]:
        """What `GET /v1/user/credits/balance` reports, read in one transaction from the ledger:
        `granted` (all grants), `used` (all charges), `used_since` (charges at or after `since`),
        `reserved` (reserved for jobs not yet settled) and `by_operation` ({operation: {count,
        credits}} of the charges; the operation is the job kind kept in the entry's note)."""
        L = credit_ledger

        def total(*where: Any) -> Any:
            return select(func.coalesce(func.sum(L.c.amount), 0)).where(L.c.account_id == account_id, *where)

        def work(conn: Connection) -> dict[str, Any]:
            rows = conn.execute(select(L.c.note, func.count(), func.coalesce(func.sum(L.c.amount), 0))
                                .where(L.c.account_id == account_id, L.c.kind == LedgerKind.CHARGE)
                                .group_by(L.c.note)).all()
            settled = select(L.c.avatar_id).where(L.c.account_id == account_id,
                                                  L.c.kind.in_((LedgerKind.CHARGE, LedgerKind.RELEASE)),
                                                  L.c.avatar_id.is_not(None))
            return {
                "granted": int(conn.execute(total(L.c.kind == LedgerKind.GRANT)).scalar_one()),
                "used": int(conn.execute(total(L.c.kind == LedgerKind.CHARGE)).scalar_one()),
                "used_since": int(conn.execute(total(L.c.kind == LedgerKind.CHARGE, L.c.created_at >= since))
                                  .scalar_one()),
                "reserved": int(conn.execute(total(L.c.kind == LedgerKind.RESERVE, L.c.avatar_id.not_in(settled)))
                                .scalar_one()),
                "by_operation": {(note or "other"): {"count": int(n), "credits": int(amount)} for note, n, amount in rows},
            }

        return self.db.read(work)

    def ledger_balance(self, account_id: str) -> int:
        """Sum of the account's ledger deltas (must equal `Account.credits`)."""
        stmt = select(func.coalesce(func.sum(credit_ledger.c.delta), 0)).where(credit_ledger.c.account_id == account_id)
        return int(self.db.read(lambda c: c.execute(stmt).scalar_one()))

    def create_api_key(self, account_id: str, *, environment: str = "live") -> tuple[ApiKey, str]:
        """New key; returns (record, plaintext). The plaintext `ak_<env>_<8 chars><secret>` is
        never stored: only its SHA-256 is. Raises AccountNotFound."""
        if not _KEY_ENV_RE.match(environment):
            raise InvalidArgument("environment", f"must be 2..10 lowercase letters, got {environment!r}")
        prefix = f"ak_{environment}_{random_string(_PREFIX_RANDOM_LEN)}"
        plaintext = prefix + random_string(_SECRET_LEN)
        key_id = new_id("key", 16)

        def work(conn: Connection) -> ApiKey:
            if conn.execute(select(accounts.c.id).where(accounts.c.id == account_id)).first() is None:
                raise AccountNotFound(account_id)
            now = self._now()
            conn.execute(insert(api_keys).values(id=key_id, account_id=account_id, prefix=prefix,
                                                 secret_hash=_hash_key(plaintext), revoked=False, created_at=now))
            return ApiKey(key_id, account_id, prefix, False, now, None)

        return self.db.run(work), plaintext

    def authenticate(self, plaintext_key: str) -> Account | None:
        """Account of a valid, non-revoked key, else None. Looks the key up by its visible
        prefix and compares hashes with `hmac.compare_digest`."""
        if not isinstance(plaintext_key, str) or len(plaintext_key) > 256:
            return None
        prefix = _key_prefix(plaintext_key)
        row = None
        if prefix is not None:
            row = self.db.read(lambda c: c.execute(_KEY_LOOKUP, {"prefix": prefix}).mappings().first())
        expected = row["secret_hash"] if row else _DUMMY_HASH
        # Compare even when the prefix is unknown so timing does not reveal valid prefixes.
        ok = hmac.compare_digest(expected.encode(), _hash_key(plaintext_key).encode())
        if not ok or row is None or bool(row["revoked"]):
            return None
        return to_account(row)

    def list_api_keys(self, account_id: str) -> list[ApiKey]:
        """Keys of the account (revoked included), oldest first."""
        stmt = (select(api_keys).where(api_keys.c.account_id == account_id)
                .order_by(api_keys.c.created_at, api_keys.c.id))
        return [to_api_key(r) for r in self.db.read(lambda c: c.execute(stmt).mappings().all())]

    def revoke_api_key(self, account_id: str, key_id: str) -> bool:
        """Revoke one of the account's keys; False if not found or not the account's."""
        def work(conn: Connection) -> bool:
            stmt = (update(api_keys).values(revoked=True, revoked_at=self._now())
                    .where(api_keys.c.id == key_id, api_keys.c.account_id == account_id, api_keys.c.revoked.is_(False)))
            return conn.execute(stmt).rowcount > 0

        return self.db.run(work)
