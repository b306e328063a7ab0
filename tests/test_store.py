"""serve.store on real SQLite (file, WAL) and real PostgreSQL: every invariant under concurrency.

PostgreSQL comes from AVATAR_TEST_POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test);
each test gets its own schema (dropped afterwards), so parallel runs do not collide. Every test
ends by checking, for every account, that the balance equals the sum of its ledger.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text as sa_text

from helpers import BACKENDS, FakeClock, run_parallel, store_url
from serve.store import (
    IDEMPOTENCY_TTL_S,
    WORKER_LOST_CODE,
    AvatarNotFound,
    ConcurrencyLimitExceeded,
    IdempotencyState,
    InsufficientCredits,
    InvalidArgument,
    InvalidCursor,
    InvalidState,
    PermissionDenied,
    open_store,
)
from serve.store.db import Database

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> str:
    """The URL of a fresh, empty database (PostgreSQL: its own schema)."""
    return store_url(request.param, tmp_path, "store")


@pytest.fixture
def store(backend, clock):
    s = open_store(backend, clock=clock)
    yield s
    try:
        mismatched = sql(s, (  # the ledger invariant, checked after every test
            "SELECT a.id, a.credits, COALESCE(SUM(l.delta), 0) AS ledger FROM accounts a"
            " LEFT JOIN credit_ledger l ON l.account_id = a.id GROUP BY a.id, a.credits"
            " HAVING a.credits <> COALESCE(SUM(l.delta), 0)"))
        assert mismatched == [], f"balance differs from ledger: {mismatched}"
    finally:
        s.drop_all()


def sql(store, query: str) -> list[dict[str, Any]]:
    """Rows of a raw read-only query, as dicts."""
    return [dict(r) for r in store.db.read(lambda c: c.execute(sa_text(query)).mappings().all())]


def submit(store, account_id: str, cost: int = 2, max_concurrent: int = 100, **kw):
    params = {"prompt": kw.pop("prompt", "a portrait"), "model": kw.pop("model", "tiny-sd15"), "seed": 1}
    return store.submit_job(account_id, kw.pop("kind", "generate"), params, cost=cost,
                            max_concurrent=max_concurrent, **kw)


def run_job(store, avatar_id: str, result: dict | None = None) -> None:
    """Claim (everything queued) and complete `avatar_id`."""
    claimed = {j.id: j for j in store.claim_jobs("w-test", limit=100)}
    assert store.complete_job(avatar_id, claimed[avatar_id].lease_token, result or {"images": []})
    for other in claimed.values():
        if other.id != avatar_id:
            assert store.requeue_job(other.id, other.lease_token)


# --------------------------------------------------------------------------------------------
def test_migrations_are_versioned_and_idempotent(store, backend, clock):
    head = Database.head_revision()
    assert head == "0007" and store.schema_revision() == head
    acct = store.create_account("pro", 5)
    assert store.migrate() == head
    again = open_store(backend, clock=clock)
    try:
        assert again.schema_revision() == head
        assert again.get_account(acct.id) == acct
        assert sql(again, "SELECT version_num FROM alembic_version") == [{"version_num": head}]
    finally:
        again.close()


def test_open_store_rejects_unusable_urls():
    for url in ("sqlite:///:memory:", "mysql://x/y"):
        with pytest.raises(InvalidArgument) as info:
            open_store(url)
        assert info.value.param == "url"


def test_api_keys_hashed_and_authenticated(store, clock):
    acct = store.create_account("free", 0)
    record, plaintext = store.create_api_key(acct.id)
    assert plaintext.startswith(record.prefix) and record.prefix.startswith("ak_live_")
    assert store.authenticate(plaintext) == acct
    wrong = plaintext[:-4] + ("AAAA" if not plaintext.endswith("AAAA") else "BBBB")
    assert store.authenticate(wrong) is None
    other_prefix = "ak_live_" + "Z" * 8 + plaintext[len(record.prefix):]
    assert store.authenticate(other_prefix) is None
    for junk in ("", "Bearer x", "ak_live_short", plaintext + "x", "ak_" + "x" * 300):
        assert store.authenticate(junk) is None
    rows = sql(store, "SELECT * FROM api_keys")
    assert all(plaintext not in str(v) for r in rows for v in r.values()), "plaintext key stored"

    clock.advance(1)
    second, plaintext2 = store.create_api_key(acct.id, environment="test")
    assert store.revoke_api_key("acct_someoneelse", record.id) is False
    assert store.revoke_api_key(acct.id, record.id) is True
    assert store.authenticate(plaintext) is None
    assert store.authenticate(plaintext2) == acct
    assert [(k.id, k.revoked) for k in store.list_api_keys(acct.id)] == [(record.id, True), (second.id, False)]


def test_parallel_submits_reserve_exactly_the_balance(store):
    acct = store.create_account("enterprise", 10)
    results = run_parallel([lambda: submit(store, acct.id, cost=1) for _ in range(50)])
    accepted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(accepted) == 10
    assert all(isinstance(e, InsufficientCredits) for e in refused), refused[:3]
    assert store.get_account(acct.id).credits == 0
    assert store.ledger_balance(acct.id) == 0
    reserves = [e for e in store.ledger(acct.id) if e.kind == "reserve"]
    assert sorted(e.avatar_id for e in reserves) == sorted(a.id for a in accepted)


def test_parallel_submits_respect_concurrency_limit(store):
    acct = store.create_account("free", 100)
    results = run_parallel([lambda: submit(store, acct.id, cost=2, max_concurrent=1) for _ in range(8)])
    accepted = [r for r in results if not isinstance(r, Exception)]
    assert len(accepted) == 1
    assert all(isinstance(r, ConcurrencyLimitExceeded) and r.limit == 1
               for r in results if isinstance(r, Exception))
    assert store.get_account(acct.id).credits == 98
    with pytest.raises(ConcurrencyLimitExceeded):
        submit(store, acct.id, max_concurrent=1)
    run_job(store, accepted[0].id)  # a finished job frees the slot
    assert submit(store, acct.id, max_concurrent=1).status == "queued"


def test_submits_from_several_processes(store, backend):
    acct = store.create_account("enterprise", 13)
    script = (
        "import sys\n"
        "from serve.store import open_store, InsufficientCredits\n"
        "s = open_store(sys.argv[1])\n"
        "ok = 0\n"
        "for _ in range(8):\n"
        "    try:\n"
        "        s.submit_job(sys.argv[2], 'generate', {'prompt': 'p'}, cost=1, max_concurrent=1000)\n"
        "        ok += 1\n"
        "    except InsufficientCredits:\n"
        "        pass\n"
        "print(ok)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, backend, acct.id],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sum(int(o[0]) for o in outs) == 13
    assert store.get_account(acct.id).credits == 0
    assert store.list_avatars(acct.id, limit=100, status="queued").items.__len__() == 13


def test_insufficient_credits_and_bad_remix_leave_no_trace(store):
    acct = store.create_account("pro", 3)
    with pytest.raises(InsufficientCredits) as info:
        submit(store, acct.id, cost=4)
    assert (info.value.balance, info.value.required) == (3, 4)
    with pytest.raises(AvatarNotFound):
        submit(store, acct.id, cost=1, kind="remix", remixed_from="av_doesnotexist")
    assert store.list_avatars(acct.id).items == []
    assert store.get_account(acct.id).credits == 3
    with pytest.raises(InvalidArgument) as bad:
        submit(store, acct.id, kind="paint")
    assert bad.value.param == "kind"


def test_claim_is_fifo_filtered_and_exclusive(store, clock):
    acct = store.create_account("enterprise", 100)
    first = submit(store, acct.id, model="tiny-sd15")
    clock.advance(1)
    second = submit(store, acct.id, model="tiny-sdxl", kind="percify")
    clock.advance(1)
    third = submit(store, acct.id, model="tiny-sd15")
    assert store.claim_jobs("w1", kinds=["cast"]) == []
    got = store.claim_jobs("w1", limit=5, models=["tiny-sdxl"])
    assert [j.id for j in got] == [second.id]
    assert got[0].status == "processing" and got[0].lease_owner == "w1" and got[0].attempts == 1
    got = store.claim_jobs("w2", limit=1)
    assert [j.id for j in got] == [first.id]
    tokens = run_parallel([lambda: store.claim_jobs("w3", limit=1) for _ in range(6)])
    claimed = [j.id for r in tokens for j in r]
    assert claimed == [third.id], "a queued job was claimed twice or lost"


def test_lease_heartbeat_expiry_and_reclaim(store, clock):
    acct = store.create_account("pro", 10)
    job = submit(store, acct.id)
    (held,) = store.claim_jobs("w1", lease_seconds=30)
    clock.advance(20)
    assert store.heartbeat("w1", {job.id: held.lease_token}, lease_seconds=30) == {job.id}
    assert store.heartbeat("w2", {job.id: held.lease_token}) == set()  # wrong owner
    clock.advance(20)  # 40 s after the claim, but the heartbeat moved expiry to 50 s
    assert store.claim_jobs("w2") == []
    clock.advance(15)
    (again,) = store.claim_jobs("w2", lease_seconds=30)
    assert again.id == job.id and again.attempts == 2 and again.lease_token != held.lease_token
    assert store.heartbeat("w1", {job.id: held.lease_token}) == set()
    assert store.complete_job(job.id, held.lease_token, {"images": []}) is False
    assert store.complete_job(job.id, again.lease_token, {"images": [{"seed": 1}]}) is True
    assert store.get_avatar(job.id).result == {"images": [{"seed": 1}]}


def test_a_dead_worker_instances_jobs_are_reclaimed_without_waiting_for_the_lease(store, clock):
    """A registered worker that stops beating is dead after `dead_after` seconds: the next claim
    expires its leases and takes its jobs (long before their 60 s lease would end); its late
    completion is refused, so each job is completed and charged once."""
    acct = store.create_account("pro", 100)
    jobs = [submit(store, acct.id, cost=2) for _ in range(3)]
    store.register_worker("gpu-a", "host-1", 111, "t0")
    store.register_worker("gpu-b", "host-2", 222, None)
    held = store.claim_jobs("gpu-a", limit=2, lease_seconds=60, dead_after=5)
    assert len(held) == 2
    clock.advance(3)
    assert store.worker_heartbeat("gpu-b", 60) == set()  # b beats, a has gone silent
    assert store.worker_heartbeat("gpu-a", 60, [j.id for j in held]) == {j.id for j in held}  # alive at 3 s
    clock.advance(4)
    store.worker_heartbeat("gpu-b", 60)
    # 4 s after a's last beat: alive still, so b only gets the queued job.
    queued = {j.id for j in jobs} - {j.id for j in held}
    assert {j.id for j in store.claim_jobs("gpu-b", limit=3, lease_seconds=60, dead_after=5.0)} == queued
    clock.advance(3)  # a's last beat was 7 s ago: dead
    store.worker_heartbeat("gpu-b", 60)
    again = store.claim_jobs("gpu-b", limit=3, lease_seconds=60, dead_after=5.0)
    assert {j.id for j in again} == {j.id for j in held} and all(j.attempts == 2 for j in again)
    assert [w.id for w in store.list_workers()] == ["gpu-b"]
    # gpu-a comes back (a long pause, not a death): its leases are gone, its result is refused.
    assert store.worker_heartbeat("gpu-a", 60, [j.id for j in held]) == set()
    assert not any(store.complete_job(j.id, j.lease_token, {"images": []}) for j in held)
    assert all(store.complete_job(j.id, j.lease_token, {"images": []}) for j in again)
    ledger = store.ledger(acct.id)
    for j in held:
        assert sorted(e.kind for e in ledger if e.avatar_id == j.id) == ["charge", "reserve"]
    assert {w.id for w in store.list_workers()} == {"gpu-a", "gpu-b"}  # re-registered by its beat


def test_retire_workers_releases_their_jobs_at_once(store, clock):
    acct = store.create_account("pro", 100)
    job = submit(store, acct.id)
    store.register_worker("old", "h", 1)
    (held,) = store.claim_jobs("old", lease_seconds=60)
    assert store.claim_jobs("new", lease_seconds=60) == []
    assert store.retire_workers(["old"]) == [job.id]
    (again,) = store.claim_jobs("new", lease_seconds=60)
    assert again.id == job.id and again.lease_token != held.lease_token
    assert store.list_workers() == []
    assert store.worker_heartbeat("new", 30, [job.id, "av_other"]) == {job.id}
    assert store.get_avatar(job.id).lease_expires_at == clock() + 30
    clock.advance(10)
    assert store.worker_heartbeat("new", 30) == set()  # a job it no longer names is not extended
    assert store.get_avatar(job.id).lease_expires_at == clock() + 20


def test_claims_are_fair_between_accounts(store, clock):
    """Round-robin over accounts (jobs an account already has processing count as its earlier
    turns), higher tiers first within a round, oldest first within an account."""
    heavy = store.create_account("pro", 1000)
    light = store.create_account("free", 100)
    big = store.create_account("enterprise", 100)
    heavy_jobs = []
    for _ in range(20):
        heavy_jobs.append(submit(store, heavy.id, cost=1, max_concurrent=50))
        clock.advance(1)
    single = submit(store, light.id, cost=1)
    clock.advance(1)
    rich = [submit(store, big.id, cost=1), None]
    clock.advance(1)
    rich[1] = submit(store, big.id, cost=1)
    first = store.claim_jobs("w", limit=4)
    # Round 1: enterprise, pro, free (tier order); round 2 starts with the enterprise's second.
    assert [j.id for j in first] == [rich[0].id, heavy_jobs[0].id, single.id, rich[1].id]
    # heavy now has one processing: its next queued job counts as its 2nd turn, so a newly
    # submitted job of another account still goes first.
    newcomer = store.create_account("free", 10)
    late = submit(store, newcomer.id, cost=1)
    assert [j.id for j in store.claim_jobs("w", limit=2)] == [late.id, heavy_jobs[1].id]
    assert [j.id for j in store.claim_jobs("w", limit=30)] == [j.id for j in heavy_jobs[2:]]
    # A reclaimed job (its worker died) goes before everything queued.
    redo = submit(store, light.id, cost=1)
    store.register_worker("dead", "h", 1)
    (lost,) = [j for j in store.claim_jobs("dead", limit=1)]
    assert lost.id == redo.id
    again = submit(store, newcomer.id, cost=1)
    store.retire_workers(["dead"])
    assert [j.id for j in store.claim_jobs("w", limit=2)] == [redo.id, again.id]


def test_jobs_out_of_attempts_fail_with_refund(store, clock):
    acct = store.create_account("pro", 10)
    endpoint = store.create_endpoint(acct.id, "https://hooks.example/a", ["avatar.failed"])
    job = submit(store, acct.id, cost=4)
    for _ in range(2):
        assert [j.id for j in store.claim_jobs("w", lease_seconds=10, max_attempts=2)] == [job.id]
        clock.advance(11)
    assert store.claim_jobs("w", lease_seconds=10, max_attempts=2) == []
    dead = store.get_avatar(job.id)
    assert (dead.status, dead.error_code, dead.attempts) == ("failed", WORKER_LOST_CODE, 2)
    assert store.get_account(acct.id).credits == 10
    assert [d.event_type for d in store.list_deliveries(acct.id, endpoint_id=endpoint.id)] == ["avatar.failed"]


def test_complete_twice_charges_once_and_emits_once(store):
    acct = store.create_account("pro", 10)
    wanted = store.create_endpoint(acct.id, "https://hooks.example/all")
    store.create_endpoint(acct.id, "https://hooks.example/failed-only", ["avatar.failed"])
    job = submit(store, acct.id, cost=4)
    (held,) = store.claim_jobs("w1")
    results = run_parallel([lambda: store.complete_job(job.id, held.lease_token, {"images": []})
                            for _ in range(6)])
    assert sorted(results) == [False] * 5 + [True]
    assert store.fail_job(job.id, held.lease_token, "x", "y") is False
    done = store.get_avatar(job.id)
    assert done.status == "completed" and done.completed_at is not None and done.lease_token is None
    assert [e.kind for e in store.ledger(acct.id)] == ["grant", "reserve", "charge"]
    assert store.get_account(acct.id).credits == 6
    messages = store.list_deliveries(acct.id)
    assert [(m.endpoint_id, m.event_type) for m in messages] == [(wanted.id, "avatar.completed")]
    assert messages[0].payload["avatar"]["id"] == job.id


def test_fail_refunds(store):
    acct = store.create_account("pro", 10)
    job = submit(store, acct.id, cost=4)
    (held,) = store.claim_jobs("w1")
    assert store.fail_job(job.id, "not-the-token", "engine_error", "boom") is False
    assert store.fail_job(job.id, held.lease_token, "engine_error", "CUDA OOM") is True
    assert store.fail_job(job.id, held.lease_token, "engine_error", "again") is False
    failed = store.get_avatar(job.id)
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", "engine_error", "CUDA OOM")
    assert store.get_account(acct.id).credits == 10
    assert [e.kind for e in store.ledger(acct.id)] == ["grant", "reserve", "release"]


def test_cancel_queued_and_processing(store):
    acct = store.create_account("pro", 10)
    other = store.create_account("pro", 10)
    queued = submit(store, acct.id, cost=3)
    with pytest.raises(PermissionDenied):
        store.cancel_job(queued.id, other.id)
    assert store.cancel_job(queued.id, acct.id).status == "cancelled"
    assert store.get_account(acct.id).credits == 10
    running = submit(store, acct.id, cost=3)
    (held,) = store.claim_jobs("w1")
    assert store.cancel_job(running.id, acct.id).status == "cancelled"
    assert store.heartbeat("w1", {running.id: held.lease_token}) == set()
    assert store.job_statuses([running.id, "av_missing"]) == {running.id: "cancelled"}
    assert store.complete_job(running.id, held.lease_token, {}) is False
    assert store.cancel_job(running.id, acct.id).status == "cancelled"  # no-op, no 2nd refund
    assert store.get_account(acct.id).credits == 10
    finished = submit(store, acct.id, cost=3)
    run_job(store, finished.id)
    assert store.cancel_job(finished.id, acct.id).status == "completed"
    assert store.get_account(acct.id).credits == 7


def test_requeue_keeps_job_alive(store):
    acct = store.create_account("pro", 10)
    job = submit(store, acct.id)
    (held,) = store.claim_jobs("w1")
    assert store.requeue_job(job.id, held.lease_token) is True
    assert store.requeue_job(job.id, held.lease_token) is False
    (again,) = store.claim_jobs("w2")
    assert again.id == job.id and again.attempts == 2


def test_list_filters_sort_and_cursor(store, clock):
    acct = store.create_account("enterprise", 1000)
    other = store.create_account("enterprise", 1000)
    made = []
    for i in range(7):
        if i % 3 == 0:
            clock.advance(1)  # groups of equal created_at: the cursor must break ties by id
        made.append(submit(store, acct.id, prompt=f"Red Fox {i}" if i % 2 else f"blue whale {i}",
                           kind="percify" if i == 6 else "generate",
                           model="tiny-sdxl" if i == 5 else "tiny-sd15"))
    submit(store, other.id)
    run_job(store, made[1].id)
    run_job(store, made[2].id)
    store.publish_avatar(made[2].id, acct.id)
    for liker in range(3):
        store.like(made[4].id, f"acct_liker{liker}")
    store.like(made[2].id, "acct_liker0")
    store.update_avatar(made[3].id, acct.id, title="Sunset 100%_done", visibility="unlisted")

    def walk(**kw) -> list[str]:
        ids, cursor = [], None
        while True:
            page = store.list_avatars(acct.id, limit=3, cursor=cursor, **kw)
            ids += [a.id for a in page.items]
            if page.next_cursor is None:
                return ids
            cursor = page.next_cursor

    newest = sorted(made, key=lambda a: (a.created_at, a.id), reverse=True)
    assert walk() == [a.id for a in newest]
    assert walk(sort_order="asc") == [a.id for a in reversed(newest)]
    by_likes = walk(sort_by="likes")
    assert by_likes[:2] == [made[4].id, made[2].id] and sorted(by_likes) == sorted(a.id for a in made)
    assert walk(status="completed") == [a.id for a in newest if a.id in (made[1].id, made[2].id)]
    assert walk(kind="percify") == [made[6].id]
    assert walk(model="tiny-sdxl") == [made[5].id]
    assert walk(visibility="unlisted") == [made[3].id]
    assert walk(published=True) == [made[2].id]
    assert set(walk(search="red fox")) == {made[1].id, made[3].id, made[5].id}
    assert walk(search="100%_") == [made[3].id]  # wildcards are literal
    assert walk(search="%") == [made[3].id]
    page = store.list_avatars(acct.id, limit=2)
    with pytest.raises(InvalidCursor):
        store.list_avatars(acct.id, limit=2, cursor=page.next_cursor, sort_by="likes")
    with pytest.raises(InvalidCursor):
        store.list_avatars(acct.id, cursor="not-a-cursor")
    with pytest.raises(InvalidArgument) as bad:
        store.list_avatars(acct.id, sort_by="title")
    assert bad.value.param == "sortBy"
    with pytest.raises(InvalidArgument):
        store.list_avatars(acct.id, limit=101)


def test_update_publish_and_feed(store, clock):
    owner = store.create_account("pro", 100)
    stranger = store.create_account("pro", 100)
    hook = store.create_endpoint(owner.id, "https://hooks.example/p", ["avatar.published"])
    a = submit(store, owner.id)
    with pytest.raises(InvalidState):
        store.publish_avatar(a.id, owner.id)
    run_job(store, a.id)
    with pytest.raises(PermissionDenied):
        store.update_avatar(a.id, stranger.id, title="mine now")
    with pytest.raises(PermissionDenied):
        store.publish_avatar(a.id, stranger.id)
    with pytest.raises(InvalidArgument) as bad:
        store.update_avatar(a.id, owner.id, visibility="friends")
    assert bad.value.param == "visibility"
    updated = store.update_avatar(a.id, owner.id, title="Astronaut", description=None,
                                  tags=["space", "portrait"], metadata={"k": 1})
    assert (updated.title, updated.tags, updated.metadata, updated.visibility) == (
        "Astronaut", ["space", "portrait"], {"k": 1}, "private")
    clock.advance(1)
    published = store.publish_avatar(a.id, owner.id)
    assert published.published and published.visibility == "public" and published.published_at == clock.t
    store.publish_avatar(a.id, owner.id)  # repeat: no second event
    assert [d.event_type for d in store.list_deliveries(owner.id, endpoint_id=hook.id)] == ["avatar.published"]

    b = submit(store, stranger.id)
    run_job(store, b.id)
    clock.advance(1)
    store.publish_avatar(b.id, stranger.id)
    store.like(a.id, stranger.id)
    assert [x.id for x in store.feed().items] == [b.id, a.id]
    assert [x.id for x in store.feed(sort="most_liked").items] == [a.id, b.id]
    first = store.feed(limit=1)
    assert [x.id for x in store.feed(limit=1, cursor=first.next_cursor).items] == [a.id]
    hidden = store.update_avatar(a.id, owner.id, visibility="private")
    assert hidden.published is False
    assert [x.id for x in store.feed().items] == [b.id]


def test_delete_cancels_running_job_and_removes_social_rows(store):
    acct = store.create_account("pro", 10)
    fan = store.create_account("pro", 0)
    running = submit(store, acct.id, cost=4)
    store.claim_jobs("w1")
    store.like(running.id, fan.id)
    store.add_comment(running.id, fan.id, "first")
    with pytest.raises(PermissionDenied):
        store.delete_avatar(running.id, fan.id)
    gone = store.delete_avatar(running.id, acct.id)
    assert gone.status == "cancelled" and gone.id == running.id
    assert store.get_avatar(running.id) is None
    assert store.get_account(acct.id).credits == 10
    assert store.has_liked(running.id, fan.id) is False
    assert store.list_comments(running.id).items == []
    with pytest.raises(AvatarNotFound):
        store.delete_avatar(running.id, acct.id)


def test_likes_exact_under_parallel_clients(store):
    owner = store.create_account("pro", 10)
    store.create_endpoint(owner.id, "https://hooks.example/l", ["avatar.liked"])
    avatar = submit(store, owner.id)
    fans = [f"acct_fan{i:02d}" for i in range(20)]
    results = run_parallel([lambda f=f: store.like(avatar.id, f) for f in fans + fans])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(r.changed for r in results) == 20
    assert store.get_avatar(avatar.id).likes == 20
    assert len([d for d in store.list_deliveries(owner.id) if d.event_type == "avatar.liked"]) == 20
    assert store.like(avatar.id, fans[0]).changed is False
    assert store.unlike(avatar.id, fans[0]) .likes == 19
    assert store.unlike(avatar.id, fans[0]).changed is False
    assert store.get_avatar(avatar.id).likes == 19
    with pytest.raises(AvatarNotFound):
        store.like("av_missing", fans[0])


def test_comments_count_page_and_validate(store, clock):
    owner = store.create_account("pro", 10)
    store.create_endpoint(owner.id, "https://hooks.example/c", ["avatar.commented"])
    avatar = submit(store, owner.id)
    made = []
    for i in range(5):
        clock.advance(1 if i != 3 else 0)  # two comments share a timestamp
        made.append(store.add_comment(avatar.id, f"acct_c{i}", f"comment {i}"))
    assert store.get_avatar(avatar.id).comments == 5
    ids, cursor = [], None
    while True:
        page = store.list_comments(avatar.id, limit=2, cursor=cursor)
        ids += [c.id for c in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert ids == [c.id for c in sorted(made, key=lambda c: (c.created_at, c.id))]
    assert store.list_comments(avatar.id, sort_order="desc").items[0].id == ids[-1]
    for text in ("", "   ", "x" * 2001):
        with pytest.raises(InvalidArgument) as bad:
            store.add_comment(avatar.id, "acct_c0", text)
        assert bad.value.param == "text"
    with pytest.raises(AvatarNotFound):
        store.add_comment("av_missing", "acct_c0", "hi")
    events = [d for d in store.list_deliveries(owner.id) if d.event_type == "avatar.commented"]
    assert len(events) == 5 and {e.payload["comment"]["text"] for e in events} == {c.text for c in made}


def test_remix_counts_on_source_in_same_transaction(store):
    acct = store.create_account("pro", 10)
    source = submit(store, acct.id, cost=2)
    run_job(store, source.id)
    remix = submit(store, acct.id, cost=2, kind="remix", remixed_from=source.id)
    assert remix.remixed_from == source.id
    assert store.get_avatar(source.id).remixes == 1


def test_idempotency_states(store, clock):
    acct = store.create_account("pro", 0)
    other = store.create_account("pro", 0)
    begin = store.begin_idempotent
    states = run_parallel([lambda: begin(acct.id, "k1", "hash-a").state for _ in range(10)])
    assert sorted(s.value for s in states) == ["in_flight"] * 9 + ["new"]
    assert begin(acct.id, "k1", "hash-b").state is IdempotencyState.MISMATCH
    assert begin(other.id, "k1", "hash-b").state is IdempotencyState.NEW  # keys are per account
    store.finish_idempotent(acct.id, "k1", 201, b'{"id":"av_1"}', {"Location": "/v1/avatars/av_1"})
    replay = begin(acct.id, "k1", "hash-a")
    assert replay.state is IdempotencyState.REPLAY
    assert (replay.response.status, replay.response.body, replay.response.headers) == (
        201, b'{"id":"av_1"}', {"Location": "/v1/avatars/av_1"})
    assert begin(acct.id, "k1", "hash-b").state is IdempotencyState.MISMATCH
    store.abandon_idempotent(acct.id, "k1")  # only in_flight rows are abandoned
    assert begin(acct.id, "k1", "hash-a").state is IdempotencyState.REPLAY

    assert begin(acct.id, "k2", "h").state is IdempotencyState.NEW
    store.abandon_idempotent(acct.id, "k2")
    assert begin(acct.id, "k2", "h").state is IdempotencyState.NEW
    clock.advance(601)  # the in_flight owner crashed long ago
    assert begin(acct.id, "k2", "h").state is IdempotencyState.NEW
    assert begin(acct.id, "k2", "h").state is IdempotencyState.IN_FLIGHT

    clock.advance(IDEMPOTENCY_TTL_S + 1)
    assert begin(acct.id, "k1", "hash-b").state is IdempotencyState.NEW  # expired after 24 h
    assert store.purge_expired() >= 1  # other's k1 and k2 expired too
    with pytest.raises(InvalidArgument):
        begin(acct.id, "", "h")


def test_rate_limit_sliding_window_across_threads(store, clock):
    acct = store.create_account("free", 0)
    clock.t = 1_700_000_020.0  # 20 s before a minute boundary
    decisions = [store.hit_rate_limit(acct.id, 10) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions[:3]] == [9, 8, 7] and decisions[9].remaining == 0
    # 20 s to the boundary, then 6 s until 9 of the 10 are older than a sliding minute.
    assert decisions[10].reset_seconds == pytest.approx(26.0)
    clock.advance(20)  # a new fixed window, but the last minute still holds 10 requests
    assert not store.hit_rate_limit(acct.id, 10).allowed
    clock.advance(6)
    assert store.hit_rate_limit(acct.id, 10) == (True, 0, 54.0)
    assert not store.hit_rate_limit(acct.id, 10).allowed
    clock.advance(60)  # the burst window has slid out entirely
    assert store.hit_rate_limit(acct.id, 10).allowed
    other = store.create_account("free", 0)
    results = run_parallel([lambda: store.hit_rate_limit(other.id, 10).allowed for _ in range(25)])
    assert sum(results) == 10


def test_purge_keeps_the_window_a_sliding_limit_still_needs(store, clock):
    acct = store.create_account("free", 0)
    clock.t = 1_700_000_039.0
    assert all(store.hit_rate_limit(acct.id, 10).allowed for _ in range(10))
    clock.advance(2)  # next window: the full previous one still counts
    store.purge_expired()
    assert not store.hit_rate_limit(acct.id, 10).allowed
    clock.advance(120)
    assert store.purge_expired() >= 1 and store.hit_rate_limit(acct.id, 10).allowed


def test_rate_limit_burst_across_a_boundary_is_refused(store, clock):
    """A fixed window would allow 10 at :59 and 10 more at :01; a minute must hold 10."""
    acct = store.create_account("free", 0)
    clock.t = 1_700_000_039.0  # 1 s before a boundary
    assert all(store.hit_rate_limit(acct.id, 10).allowed for _ in range(10))
    clock.advance(2)
    assert sum(store.hit_rate_limit(acct.id, 10).allowed for _ in range(10)) == 0


def test_webhook_endpoints_are_scoped(store):
    acct = store.create_account("pro", 0)
    other = store.create_account("pro", 0)
    ep = store.create_endpoint(acct.id, "https://hooks.example/x", ["avatar.completed", "avatar.liked"])
    assert ep.id.startswith("wh_") and ep.secret.startswith("whsec_") and not ep.disabled
    assert store.list_endpoints(acct.id) == [ep] and store.list_endpoints(other.id) == []
    assert store.get_endpoint(other.id, ep.id) is None
    assert store.delete_endpoint(other.id, ep.id) is False
    with pytest.raises(InvalidArgument) as bad:
        store.create_endpoint(acct.id, "https://hooks.example/y", ["avatar.exploded"])
    assert bad.value.param == "events"
    with pytest.raises(InvalidArgument) as bad:
        store.create_endpoint(acct.id, "ftp://hooks.example/y")
    assert bad.value.param == "url"
    assert store.delete_endpoint(acct.id, ep.id) is True
    assert store.list_endpoints(acct.id) == []


def test_outbox_claimed_once_retried_and_disabled(store, clock):
    acct = store.create_account("pro", 100)
    ep = store.create_endpoint(acct.id, "https://hooks.example/all")
    jobs = [submit(store, acct.id) for _ in range(4)]
    for j in jobs:
        run_job(store, j.id)
    claims = run_parallel([lambda: store.claim_deliveries("d", limit=2, lease_seconds=30) for _ in range(5)])
    claimed = [d for batch in claims for d in batch]
    assert sorted(d.payload["avatar"]["id"] for d in claimed) == sorted(j.id for j in jobs)
    assert all(d.url == ep.url and d.secret == ep.secret and d.event_type == "avatar.completed"
               for d in claimed)
    assert store.claim_deliveries("d2") == []
    first, second, third, fourth = claimed
    assert store.mark_delivered(first.id, "stale-token") is False
    assert store.mark_delivered(first.id, first.lease_token) is True
    assert store.mark_delivered(first.id, first.lease_token) is False
    assert store.mark_attempt_failed(second.id, second.lease_token, "HTTP 500",
                                     next_attempt_at=clock.t + 60) is True
    assert store.mark_attempt_failed(third.id, third.lease_token, "HTTP 410", next_attempt_at=None)
    assert store.claim_deliveries("d2") == []
    clock.advance(61)  # the retry is due and `fourth`'s lease has expired
    retry = {d.id: d for d in store.claim_deliveries("d2")}
    assert set(retry) == {second.id, fourth.id}
    assert retry[second.id].attempts == 1 and retry[second.id].endpoint_consecutive_failures == 2
    status = {d.id: (d.status, d.last_error) for d in store.list_deliveries(acct.id)}
    assert status[first.id] == ("delivered", None) and status[third.id] == ("failed", "HTTP 410")
    assert store.mark_attempt_failed(second.id, retry[second.id].lease_token, "timeout",
                                     next_attempt_at=clock.t, disable_endpoint=True,
                                     disable_reason="5 failures")
    disabled = store.get_endpoint(acct.id, ep.id)
    assert disabled.disabled and disabled.disabled_reason == "5 failures"
    clock.advance(31)
    assert store.claim_deliveries("d3") == []  # messages of a disabled endpoint fail instead
    assert store.list_deliveries(acct.id)[0].status in ("failed", "delivered")
    assert {d.status for d in store.list_deliveries(acct.id) if d.id in (second.id, fourth.id)} == {"failed"}
    late = submit(store, acct.id)
    run_job(store, late.id)
    assert len(store.list_deliveries(acct.id)) == 4  # no new messages for a disabled endpoint
    enabled = store.set_endpoint_disabled(acct.id, ep.id, False)
    assert not enabled.disabled and enabled.consecutive_failures == 0


def test_grant_credits_and_tier(store):
    acct = store.create_account("free", 0)
    assert store.grant_credits(acct.id, 25, note="promo").credits == 25
    assert store.set_tier(acct.id, "pro").tier == "pro"
    with pytest.raises(InvalidArgument) as bad:
        store.grant_credits(acct.id, 0)
    assert bad.value.param == "amount"
    with pytest.raises(InvalidArgument):
        store.create_account("platinum")
    assert store.ledger(acct.id)[-1].note == "promo"


def test_event_renderer_and_queue_stats(backend, clock):
    seen = []

    def render(event_type, avatar, extra):
        seen.append(event_type)
        return {"type": event_type, "data": {"id": avatar.id, "status": avatar.status}, **extra}

    s = open_store(backend, clock=clock, event_renderer=render)
    try:
        acct = s.create_account("pro", 10)
        s.create_endpoint(acct.id, "https://hooks.example/r")
        job = submit(s, acct.id)
        assert s.active_jobs(acct.id) == 1 and s.queue_stats() == {"queued": 1, "processing": 0}
        (held,) = s.claim_jobs("w")
        assert s.queue_stats() == {"queued": 0, "processing": 1}
        s.like(job.id, "acct_fan")  # while processing: the worker's lease must not leak
        clock.advance(1)
        assert s.fail_job(job.id, held.lease_token, "engine_error", "boom")
        assert s.active_jobs(acct.id) == 0
        payloads = [d.payload for d in s.list_deliveries(acct.id)]
        assert payloads == [{"type": "avatar.failed", "data": {"id": job.id, "status": "failed"}},
                            {"type": "avatar.liked", "data": {"id": job.id, "status": "processing"},
                             "liked_by": "acct_fan"}]
        assert seen == ["avatar.liked", "avatar.failed"]
    finally:
        s.drop_all()


def test_default_payload_hides_lease(store):
    acct = store.create_account("pro", 10)
    store.create_endpoint(acct.id, "https://hooks.example/l", ["avatar.liked"])
    job = submit(store, acct.id)
    store.claim_jobs("w")
    store.like(job.id, "acct_fan")
    (message,) = store.list_deliveries(acct.id)
    assert message.payload["avatar"]["status"] == "processing"
    assert not {"lease_token", "lease_owner", "lease_expires_at"} & set(message.payload["avatar"])


def test_progress_and_link_epoch(store):
    acct = store.create_account("pro", 10)
    av = submit(store, acct.id)
    assert store.watch_rows([av.id, "av_missing"]) == {av.id: ("queued", None)}
    job = store.claim_jobs("w1", limit=1)[0]
    assert store.set_progress("w1", {av.id: job.lease_token}, 3, 20) == 1
    assert store.set_progress("w2", {av.id: job.lease_token}, 4, 20) == 0  # not the lease holder
    assert store.set_progress("w1", {av.id: "stale"}, 4, 20) == 0
    assert store.watch_rows([av.id]) == {av.id: ("processing", {"step": 3, "totalSteps": 20})}
    assert store.get_avatar(av.id).progress == {"step": 3, "totalSteps": 20}
    assert store.complete_job(av.id, job.lease_token, {"images": []})
    assert store.set_progress("w1", {av.id: job.lease_token}, 5, 20) == 0  # finished: no more writes
    # Leaving `public` bumps the link epoch (old links die); other edits and publishing do not.
    assert store.get_avatar(av.id).link_epoch == 0
    store.update_avatar(av.id, acct.id, title="t")
    store.publish_avatar(av.id, acct.id)
    assert store.get_avatar(av.id).link_epoch == 0
    store.update_avatar(av.id, acct.id, visibility="unlisted")
    assert store.get_avatar(av.id).link_epoch == 1
    store.update_avatar(av.id, acct.id, visibility="private")  # not public before: unchanged
    assert store.get_avatar(av.id).link_epoch == 1
