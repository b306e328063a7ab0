"""Test helpers shared by the service test modules (PostgreSQL specifics: `pg_support`).

- `FakeClock`: injected time for the store and dispatcher; tests move it instead of sleeping.
- `store_backend` / `open_test_store`: a fresh store on SQLite or PostgreSQL (own schema).
- `run_parallel`: callables released together from threads.
- `make_account`: an account and its `Authorization` header, the operator's way.
- `assert_error`: the API's error shape, with code and param.
- `png_bytes`: a small encoded image.
- `reference_verify`: a webhook checked with the reference `standardwebhooks` package.
- `ray_serve_session`, `wait_for_jobs`: the real Ray Serve app on 127.0.0.1 (`ray` tests).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

import pytest

import pg_support

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


class FakeClock:
    """Injected time for the store and dispatcher: tests move it instead of sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# ---------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------
def store_url(backend: str, tmp_path, prefix: str = "svc") -> str:
    """Where a fresh database of `backend` lives (PostgreSQL: skipped locally / failed under CI
    when unreachable; a new schema, created on open)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'{prefix}.db'}"
    pg_support.require_postgres()
    return pg_support.fresh_url(prefix)


@contextlib.contextmanager
def open_test_store(backend: str, tmp_path, prefix: str = "svc", **kwargs: Any) -> Iterator[Any]:
    """A fresh store; its tables (or PostgreSQL schema) are dropped afterwards."""
    from serve.store import open_store

    store = open_store(store_url(backend, tmp_path, prefix), **kwargs)
    try:
        yield store
    finally:
        store.drop_all()


def run_parallel(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables in threads released together; returns results or raised exceptions."""
    barrier = threading.Barrier(len(fns))
    out: list[Any] = [None] * len(fns)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - collected for assertions
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def make_account(store: Any, tier: str = "pro", credits: int = 100) -> tuple[Any, dict[str, str]]:
    """An account with one API key (as `avatar-serve create-key` makes them) and its auth header."""
    acct = store.create_account(tier, credits)
    _, key = store.create_api_key(acct.id)
    return acct, {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
def assert_error(resp: Any, status: int, code: str, param: str | None = None) -> dict:
    """The response is the API's error shape with this status, code (and param)."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "message", "param", "requestId"}
    assert err["code"] == code, err
    # One x-request-id per response, the id in the body (ours, `req_…`, or Ray Serve's proxy's).
    assert isinstance(err["requestId"], str) and err["requestId"]
    assert resp.headers.get_list("x-request-id") == [err["requestId"]], resp.headers
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in resp.text
    return err


def png_bytes(size: tuple[int, int] = (96, 96), color: tuple[int, int, int] = (200, 120, 90)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def reference_verify(secret: str, headers: dict[str, str], body: bytes, *, now: float | None = None) -> str:
    """Verify a received webhook with the reference implementation (`standardwebhooks`), not with
    the module that signed it; returns its `webhook-id`. `now`: the receiver's (fake) clock for
    the reference's 5-minute timestamp tolerance, which otherwise reads the wall clock."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    hook = Webhook(secret)
    if now is not None:
        def check_timestamp(header: str) -> datetime:
            ts = datetime.fromtimestamp(float(header), tz=timezone.utc)
            if abs(ts - datetime.fromtimestamp(now, tz=timezone.utc)) > timedelta(minutes=5):
                raise WebhookVerificationError("Message timestamp outside the tolerance")
            return ts

        hook._Webhook__verify_timestamp = check_timestamp  # the reference's own check, at `now`
    hook.verify(body, headers, json_parse=False)
    return {k.lower(): v for k, v in headers.items()}["webhook-id"]


# ---------------------------------------------------------------------------------------------
# Ray Serve (`ray` tests)
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_serve_session() -> Iterator[int]:
    """A private Ray (2 CPUs, no dashboard) with Serve's HTTP proxy on 127.0.0.1; yields its port."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    ray_tmp = tempfile.mkdtemp(prefix="aer", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             _temp_dir=ray_tmp, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        if not os.environ.get("AE_KEEP_RAY_LOGS"):  # set it to read Ray's and the replicas' logs afterwards
            shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for_jobs(client: Any, auth: dict[str, str], ids: list[str], limit_s: float,
                  until: tuple[str, ...] = ("completed", "failed", "cancelled"), poll_s: float = 0.25) -> dict:
    """Poll the avatars until each has a status in `until` (fails the test after `limit_s`,
    a bound for a stuck job on a busy machine, never an assertion on speed)."""
    deadline = time.monotonic() + limit_s
    out: dict = {}
    while time.monotonic() < deadline:
        pause = poll_s
        for i in ids:
            r = client.get(f"/v1/avatars/{i}", headers=auth)
            if r.status_code == 429:  # a polite client: wait as told, keep the last answer
                pause = max(pause, float(r.headers.get("retry-after", 1)))
                out.setdefault(i, r.json())
                break
            out[i] = r.json()
        if len(out) == len(ids) and all(a.get("status") in until for a in out.values()):
            return out
        time.sleep(pause)
    pytest.fail(f"jobs did not settle: {[(i, a.get('status') or a) for i, a in out.items()]}")
