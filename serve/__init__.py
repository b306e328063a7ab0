"""HTTP service for the Avatar API: the FastAPI app (`app.py` assembles the routers of `api/`),
the submission service (`submissions.py`), the store (`store/`), a durable job worker
(`worker.py`), the webhook dispatcher (`webhooks.py`) and the Ray Serve deployments that host them
(`deployments.py`). docs/architecture.md has the map. The inference library lives in
`avatar_engine/` and never imports anything from here."""
