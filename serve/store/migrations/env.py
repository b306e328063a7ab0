"""Alembic environment: always run on a connection handed over by the store.

`Database.migrate()` opens the connection (SQLite: inside `BEGIN IMMEDIATE`; PostgreSQL: holding
an advisory lock on the schema), so concurrent replicas starting at once migrate one at a time.
Run from the command line, `alembic -x url=sqlite:///path.db upgrade head` works too.
"""
from __future__ import annotations

from alembic import context

from serve.store.schema import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # command line: `alembic -x url=... upgrade head`
    from serve.store.db import Database

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("pass the database as: alembic -x url=sqlite:///path.db upgrade head")
    Database(url, migrate=True).close()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
