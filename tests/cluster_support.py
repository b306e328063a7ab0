"""Processes for the `ray` CLI and `cluster` tests: Ray's own command-line tools in subprocesses.

Every process is started in its own session and stopped by the pids it (and its children) had,
never with `ray stop`, which would end every Ray instance on the machine.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name: str) -> str:
    """A console script of this interpreter's environment (`serve`, `ray`, `moto_server`)."""
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not installed next to {sys.executable} (make install)")
    return path


def ray_env(**extra: str) -> dict[str, str]:
    """The environment for Ray CLI processes: no auth token, no usage stats, this checkout first
    on the path (so replicas import the code under test), a short private temp dir."""
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p),
                "OMP_NUM_THREADS": "1", "AVATAR_TORCH_THREADS": "1"})
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def short_tmp(prefix: str) -> str:
    """Ray's socket paths have a length limit: keep its temp dir short."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Signal exactly these pids (best effort: some may be gone)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Tracked:
    """A subprocess plus every descendant seen while it ran, so that all of them can be stopped
    (Ray daemonizes its node processes; they stay children of the command or of each other)."""

    def __init__(self, args: list[str], *, env: dict[str, str], cwd: str | None = None, log: str | None = None):
        self.log_path = log or tempfile.mktemp(prefix="ae-proc-", suffix=".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.seen: set[int] = set()

    def remember(self) -> None:
        self.seen.update(descendants(self.proc.pid))

    def tail(self, n: int = 4000) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as fh:
            return fh.read()[-n:].decode("utf-8", "replace")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGINT (a clean shutdown for `serve run`), then SIGKILL whatever is left of the tree."""
        self.remember()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.remember()
        kill_tree([self.proc.pid, *sorted(self.seen)])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


def run(args: list[str], *, env: dict[str, str], timeout: float = 300, cwd: str | None = None) -> str:
    """Run a short CLI command; its output, or a test failure with it."""
    r = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def wait_http(url: str, limit_s: float, proc: Tracked | None = None, ok=lambda r: r.status_code == 200):
    """Poll `url` until `ok(response)`; fails with the process log when it never comes (a bound for
    a stuck start on a busy machine, never an assertion on speed)."""
    import httpx

    deadline = time.monotonic() + limit_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None:
            proc.remember()
            if proc.proc.poll() is not None:
                pytest.fail(f"process exited {proc.proc.returncode}:\n{proc.tail()}")
        try:
            last = httpx.get(url, timeout=10)
            if ok(last):
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1.0)
    pytest.fail(f"{url} not ready after {limit_s}s (last: {last!r})\n{proc.tail() if proc else ''}")


@contextlib.contextmanager
def tracked(args: list[str], **kwargs) -> Iterator[Tracked]:
    p = Tracked(args, **kwargs)
    try:
        yield p
    finally:
        p.stop()
