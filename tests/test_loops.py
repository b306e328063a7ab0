"""serve.loops.BackgroundLoop: the one helper behind the worker, heartbeat, dispatcher and
housekeeper threads."""
from __future__ import annotations

import threading
import time

from serve.loops import BackgroundLoop

WAIT_S = 10  # bound for a starved thread on a busy machine, never asserted


def _until(cond) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_runs_back_to_back_while_there_is_work_then_waits_for_a_wake():
    work = [True, True, False]
    calls = []

    def step():
        calls.append(time.monotonic())
        return work.pop(0) if work else False

    loop = BackgroundLoop("t-work", step, interval=3600).start()
    try:
        assert _until(lambda: len(calls) == 3)  # two "more work" answers: no waiting in between
        time.sleep(0.05)
        assert len(calls) == 3  # now idle for an hour...
        loop.wake()
        assert _until(lambda: len(calls) == 4)  # ...unless woken
    finally:
        loop.stop(timeout=WAIT_S)
    assert not loop.running


def test_a_failing_step_is_logged_and_the_loop_goes_on(caplog):
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database blip")
        return False

    loop = BackgroundLoop("t-fail", step, interval=0.01).start()
    try:
        assert _until(lambda: len(calls) >= 2)
    finally:
        loop.stop(timeout=WAIT_S)
    assert any("database blip" in (r.exc_text or "") or r.exc_info for r in caplog.records if r.name == "serve.loops")


def test_wait_first_and_stop_during_the_wait():
    ran = threading.Event()
    loop = BackgroundLoop("t-chore", lambda: ran.set(), interval=3600, wait_first=True).start()
    time.sleep(0.05)
    assert not ran.is_set()  # a periodic chore waits one interval before its first run
    started = time.monotonic()
    loop.stop(timeout=WAIT_S)
    assert not loop.running and not ran.is_set() and time.monotonic() - started < WAIT_S
