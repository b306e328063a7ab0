"""HTTP service for the Avatar API: FastAPI routes (app.py), a durable job worker (worker.py) and
the Ray Serve deployments that host both (deployments.py). The inference library lives in
`avatar_engine/` and never imports anything from here."""
