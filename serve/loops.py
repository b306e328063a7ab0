"""One helper for the service's background threads (job worker, job heartbeat, webhook
dispatcher, housekeeper): run a step, then wait for `interval` seconds or a `wake()`."""
from __future__ import annotations

import threading
from typing import Callable

from .logctx import logger

log = logger("serve.loops")


class BackgroundLoop:
    """Calls `step()` in a daemon thread until `stop()`.

    `step()` returns True when more work is due right now (the next step runs at once) and
    False to wait `interval` seconds, cut short by `wake()`. An exception in a step is logged
    and the loop goes on: a database or engine hiccup must not end a replica's worker.
    `wait_first`: wait one interval before the first step (periodic chores)."""

    def __init__(self, name: str, step: Callable[[], bool | None], interval: float, *, wait_first: bool = False) -> None:
        self.name, self.step, self.interval, self.wait_first = name, step, interval, wait_first
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "BackgroundLoop":
        """Start the thread (a no-op while it runs)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def wake(self) -> None:
        """Skip the rest of the current wait."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """End the loop after the current step and wait for the thread up to `timeout` seconds."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self.wait_first:
            self._pause()
        while not self._stop.is_set():
            try:
                more = bool(self.step())
            except Exception:  # noqa: BLE001 - keep the loop alive; the next step retries
                log.exception("%s: step failed", self.name)
                more = False
            if not more:
                self._pause()

    def _pause(self) -> None:
        if not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
