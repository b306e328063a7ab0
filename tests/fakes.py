"""Test doubles shared by the service test modules."""
from __future__ import annotations


class FakeClock:
    """Injected time for the store and dispatcher: tests move it instead of sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
