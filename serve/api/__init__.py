"""The HTTP layer, one router per endpoint family (`serve.app.create_app` assembles them):

    system       GET /v1/health, GET /v1/models, GET /metrics
    account      GET /v1/account
    submissions  POST /v1/avatars/generate | percify-yourself | cast, POST /v1/avatars/{id}/remix
    avatars      GET/PATCH/DELETE /v1/avatars[/{id}], image and thumbnail bytes
    community    publish, like/unlike, comments, GET /v1/feed
    webhooks     POST/GET/DELETE /v1/webhooks[/{id}]

Handlers are a few lines each: parse (FastAPI + `serve.schemas`; bodies with photos, JSON or
multipart, in `forms`), call the store or the submission service (`serve.submissions`), render
(`rendering`). Shared dependencies live in `common` (services, auth) and `idempotency` (the
Idempotency-Key dependency).
"""
