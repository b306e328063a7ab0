"""Schema fuzzing (marker `schema`, `make test-schema`): schemathesis generates requests from the
served `/v1/openapi.json` (valid ones, and for the negative checks invalid ones) and sends them
over HTTP to the app on 127.0.0.1, with the standard checks: no 5xx, status codes and content
types the schema declares, response bodies valid against it, schema-violating requests refused,
schema-valid ones accepted.

The app is the real one (FastAPI served by uvicorn on a free loopback port, SQLite store, asset
files, the real engine's profile table with the tiny model's aliases) without Ray: starting Ray
would only add minutes, and the HTTP contract is the same app's. No worker runs, so submissions
stay queued; the account is rich and its tier's limits are high so that credits and rate limits
do not hide other answers (both are covered in `test_api`). Examples per operation are bounded
(`AVATAR_SCHEMA_EXAMPLES`, default 25) to keep the run to a few minutes on 2 cores.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra (make install)")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

pytestmark = pytest.mark.schema

EXAMPLES = int(os.environ.get("AVATAR_SCHEMA_EXAMPLES", "25"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """The app under uvicorn on 127.0.0.1 in a background thread, with one rich account."""

    def __init__(self) -> None:
        import uvicorn

        from avatar_engine import AvatarEngine, EngineConfig
        from serve.app import create_app, event_renderer
        from serve.engine_client import LocalEngineClient
        from serve.settings import ServiceSettings
        from serve.store import open_store

        self.tmp = tempfile.mkdtemp(prefix="ae-schema-")
        settings_ = ServiceSettings.from_dict({
            "data_dir": self.tmp, "tiers": {"free": [10, 1], "pro": [60, 5], "enterprise": [1_000_000, 1_000_000]},
            "webhook_allow_private": False}, env=False)
        self.store = open_store(settings_.resolved_db_url, event_renderer=event_renderer())
        engine = AvatarEngine(EngineConfig(device="cpu"))  # profiles only: nothing is loaded or run
        app = create_app(settings_, self.store, LocalEngineClient(engine, None))
        acct = self.store.create_account("enterprise", 10**12)
        _, key = self.store.create_api_key(acct.id)
        self.auth = {"Authorization": f"Bearer {key}"}
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


_SERVER: LoopbackServer | None = None


def _server() -> LoopbackServer:
    global _SERVER
    if _SERVER is None:
        _SERVER = LoopbackServer()
    return _SERVER


@pytest.fixture(scope="module", autouse=True)
def _stop_server():
    yield
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema():
    server = _server()
    return schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_the_app_keeps_the_contract_it_publishes(case):
    case.call_and_validate(headers=_server().auth)
