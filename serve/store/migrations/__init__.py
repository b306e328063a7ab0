"""Alembic migrations of the service's store (run by `serve.store.db.Database.migrate`)."""
