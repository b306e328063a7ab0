"""Alembic migrations: an empty database migrates to exactly the store's metadata, and a database
made by the former hand-written migration runner upgrades in place with its data intact.

`fixtures/legacy_v1.db` was made by the store at b0cb314 (`fixtures/make_legacy_v1.py`); on
PostgreSQL the same legacy schema is built from the old runner's statements
(`fixtures/legacy_schema_v1.py`) with a row in every table.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

import pg_support
from helpers import FakeClock
from fixtures import legacy_schema_v1
from serve.store import IdempotencyState, open_store
from serve.store.db import Database
from serve.store.schema import metadata

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = json.loads((FIXTURES / "legacy_v1.json").read_text())
HEAD = Database.head_revision()


def schema_diff(store) -> list:
    """What Alembic's autogenerate would change to make the database match `metadata`."""
    with store.db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def table_names(store) -> set[str]:
    with store.db.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


@pytest.fixture
def pg_urls():
    urls: list[str] = []
    yield urls
    pg_support.drop_schemas(urls)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_an_empty_database_migrates_to_exactly_the_metadata(backend, tmp_path, pg_urls):
    if backend == "postgresql":
        pg_support.require_postgres()
        pg_urls.append(pg_support.fresh_url("mig"))
        url = pg_urls[-1]
    else:
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    store = open_store(url)
    try:
        assert store.schema_revision() == HEAD
        assert schema_diff(store) == []
        assert table_names(store) == set(metadata.tables) | {"alembic_version"}
    finally:
        store.close()


def sqlite_equivalent(diff: list) -> list:
    """`diff` without what only SQLite's reflection tells apart and storage does not: the old
    runner spelled timestamps DOUBLE PRECISION (reflected as REAL, Alembic's as DOUBLE: both REAL
    affinity), and left single-column TEXT primary keys without NOT NULL (SQLite allows NULL
    there; the store always sets an id)."""
    out = []
    for change in diff:
        op = change[0] if isinstance(change, list) else change
        if op[0] == "modify_type" and type(op[5]).__name__ == "REAL" and type(op[6]).__name__ == "Double":
            continue
        if op[0] == "modify_nullable" and op[3] == "id" and op[4]["existing_type"].__class__.__name__ == "TEXT":
            continue
        out.append(change)
    return out


def _check_upgraded(store, clock) -> None:
    """The legacy rows are all there and every part of the store works on them."""
    assert store.schema_revision() == HEAD
    assert "schema_version" not in table_names(store)
    diff = schema_diff(store)
    assert (sqlite_equivalent(diff) if store.dialect == "sqlite" else diff) == []
    owner = store.authenticate(LEGACY["key"])
    assert owner is not None and owner.id == LEGACY["owner"] and owner.tier == "pro"
    assert owner.credits == store.ledger_balance(owner.id) == 46
    assert [e.kind for e in store.ledger(owner.id)] == ["grant", "reserve", "reserve", "charge"]
    done = store.get_avatar(LEGACY["completed"])
    assert (done.status, done.published, done.likes, done.comments, done.title, done.tags, done.metadata) == (
        "completed", True, 1, 1, "Fox", ["fox"], {"k": 1})
    assert done.params["prompt"] == "a red fox" and done.result["images"][0]["seed"] == 7
    assert [a.id for a in store.feed().items] == [done.id]
    assert store.has_liked(done.id, LEGACY["fan"])
    assert [c.text for c in store.list_comments(done.id).items] == ["lovely"]
    assert [e.id for e in store.list_endpoints(owner.id)] == [LEGACY["endpoint"]]
    assert {d.event_type for d in store.list_deliveries(owner.id)} == {
        "avatar.completed", "avatar.published", "avatar.liked", "avatar.commented"}
    replay = store.begin_idempotent(owner.id, "idem-1", "hash-1")
    assert replay.state is IdempotencyState.REPLAY and replay.response.body == b'{"id":"x"}'
    # New writes on the upgraded schema: the queued legacy job runs, the ledger id sequence goes on.
    (job,) = store.claim_jobs("w-new")
    assert job.id == LEGACY["queued"]
    assert store.complete_job(job.id, job.lease_token, {"images": []})
    assert store.grant_credits(owner.id, 4).credits == 50 == store.ledger_balance(owner.id)
    assert [e.id for e in store.ledger(owner.id)] == sorted({e.id for e in store.ledger(owner.id)})
    assert store.hit_rate_limit(owner.id, 60).allowed


def test_a_sqlite_file_made_by_the_previous_code_upgrades_in_place(tmp_path):
    path = tmp_path / "legacy.db"
    shutil.copy(FIXTURES / "legacy_v1.db", path)
    clock = FakeClock(LEGACY["clock"] + 60)
    store = open_store(f"sqlite:///{path}", clock=clock)
    try:
        _check_upgraded(store, clock)
    finally:
        store.close()
    again = open_store(f"sqlite:///{path}", clock=clock)  # reopening is a no-op
    try:
        assert again.schema_revision() == HEAD and again.get_account(LEGACY["owner"]).credits == 50
    finally:
        again.close()


@pytest.mark.postgres
def test_a_postgresql_schema_made_by_the_previous_code_upgrades_in_place(pg_urls):
    pg_support.require_postgres()
    import psycopg

    pg_urls.append(pg_support.fresh_url("legacy"))
    schema = pg_support.schema_of(pg_urls[-1])
    sqlite_rows = _legacy_rows()
    with psycopg.connect(pg_support.PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        with conn.transaction():
            conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                         " applied_at DOUBLE PRECISION NOT NULL)")
            for statement in legacy_schema_v1.MIGRATIONS[0][1]:
                conn.execute(legacy_schema_v1.render(statement, "postgresql"))
            conn.execute("INSERT INTO schema_version VALUES (1, 1700000000.0)")
            for table, rows in sqlite_rows.items():  # the same rows as the SQLite fixture
                for row in rows:
                    cols = ", ".join(row)
                    marks = ", ".join(["%s"] * len(row))
                    override = " OVERRIDING SYSTEM VALUE" if table == "credit_ledger" else ""
                    conn.execute(f"INSERT INTO {table} ({cols}){override} VALUES ({marks})", list(row.values()))
            # As if the old code had inserted them: the identity sequence continues after the rows.
            conn.execute("SELECT setval(pg_get_serial_sequence('credit_ledger', 'id'), MAX(id)) FROM credit_ledger")
    clock = FakeClock(LEGACY["clock"] + 60)
    store = open_store(pg_urls[-1], clock=clock)
    try:
        _check_upgraded(store, clock)
    finally:
        store.close()


def _legacy_rows() -> dict[str, list[dict]]:
    """Every row of the SQLite fixture, by table (booleans as bool for PostgreSQL)."""
    import sqlite3

    con = sqlite3.connect(FIXTURES / "legacy_v1.db")
    con.row_factory = sqlite3.Row
    bools = {"revoked", "published", "disabled"}
    out = {}
    for table in ("accounts", "api_keys", "avatars", "credit_ledger", "likes", "comments", "idempotency_keys",
                  "rate_limits", "webhook_endpoints", "webhook_outbox"):
        out[table] = [{k: (bool(r[k]) if k in bools else r[k]) for k in r.keys()}
                      for r in con.execute(f"SELECT * FROM {table}")]
    con.close()
    return out
