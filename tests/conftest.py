"""Test hygiene shared by every test: offline, private caches, two threads (see STACK.md)."""
from __future__ import annotations

import os
import tempfile

_ROOT = tempfile.mkdtemp(prefix="ae-test-")
for var, sub in (("XDG_CACHE_HOME", "xdg"), ("HF_HOME", "hf"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(var, os.path.join(_ROOT, sub))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_TMPDIR", "/tmp/ae-ray")
# Tiny models are cached once per machine, outside the per-run temp dir, so repeated runs stay fast.
os.environ.setdefault("AVATAR_ENGINE_CACHE", os.path.join(tempfile.gettempdir(), "avatar-engine-test-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_engine():
    """One warm engine with the tiny SD1.5 profile, shared by the whole session."""
    from avatar_engine import AvatarEngine, EngineConfig

    return AvatarEngine(EngineConfig(device="cpu"))


@pytest.fixture(scope="session", autouse=True)
def _drop_leftover_pg_schemas():
    """Belt and braces: drop this session's PostgreSQL schemas even if a teardown was interrupted."""
    yield
    import pg_support

    pg_support.drop_session_schemas()
