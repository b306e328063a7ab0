"""The ingress housekeeper, through the real store (SQLite and PostgreSQL) and real files: expired
idempotency records go, and so do the files the store queued for deletion in the transaction that
doomed them — a job's reference photos however the job ended (completed, failed, reaped, cancelled
by the worker, deleted), a deleted avatar's images — even when nobody deleted them inline."""
from __future__ import annotations

import secrets

import pytest
from PIL import Image

from helpers import BACKENDS, FakeClock, store_url
from serve.assets import AssetStore, image_key
from serve.housekeeping import DELETION_GRACE_S, Housekeeper
from serve.store import open_store


def test_housekeeper_purges_expired_idempotency_records(tmp_path):
    now = [1_700_000_000.0]
    store = open_store(f"sqlite:///{tmp_path / 'h.db'}", clock=lambda: now[0])
    account = store.create_account("free", 0)
    store.begin_idempotent(account.id, "k1", "hash")
    store.finish_idempotent(account.id, "k1", 200, b"{}", {})
    keeper = Housekeeper(store)
    assert keeper.run_once() == 0  # still within 24 h
    now[0] += 25 * 3600
    assert keeper.run_once() >= 1
    assert store.begin_idempotent(account.id, "k1", "other-hash").state.name == "NEW"
    store.close()


@pytest.fixture(params=BACKENDS)
def world(request, tmp_path):
    clock = FakeClock()
    store = open_store(store_url(request.param, tmp_path, "hk"), clock=clock)
    assets = AssetStore.from_url(str(tmp_path / "assets"))
    account = store.create_account("pro", 1000)
    yield store, assets, account, clock
    store.drop_all()
    store.close()


def _photo_job(store, assets, account, kind="percify", n_photos=2):
    """A job submitted the way the API does it: photos written under its upload id first."""
    upload_id = f"up_{secrets.token_hex(6)}"
    store.expect_upload(f"uploads/{upload_id}")
    keys = [assets.put_upload(upload_id, i, Image.new("RGB", (8, 8), (i * 40, 0, 0))) for i in range(n_photos)]
    job = store.submit_job(account.id, kind, {"prompt": "me", "uploadId": upload_id}, cost=10, max_concurrent=100)
    return job, keys


def _claim(store, job):
    (claimed,) = [j for j in store.claim_jobs("w1", 10, lease_seconds=30) if j.id == job.id]
    return claimed


def _sweep_after_grace(keeper, clock):
    assert keeper.sweep_assets() == 0  # inside the grace period nothing is touched
    clock.t += DELETION_GRACE_S + 1
    return keeper.sweep_assets()


def _queued(store):
    return store.due_asset_deletions(0.0, 1000)


def test_photos_of_every_terminal_path_are_deleted_without_an_inline_delete(world):
    store, assets, account, clock = world
    keeper = Housekeeper(store, assets=assets)
    done, done_keys = _photo_job(store, assets, account)
    failed, failed_keys = _photo_job(store, assets, account, kind="cast")
    cancelled, cancelled_keys = _photo_job(store, assets, account)
    running, running_keys = _photo_job(store, assets, account)
    held = {j.id: j for j in store.claim_jobs("w1", 10, lease_seconds=3600)}
    assert set(held) == {done.id, failed.id, cancelled.id, running.id}
    reaped, reaped_keys = _photo_job(store, assets, account)
    queued_cancel, queued_cancel_keys = _photo_job(store, assets, account)

    assert store.complete_job(done.id, held[done.id].lease_token, {"images": []})
    assert store.fail_job(failed.id, held[failed.id].lease_token, "generation_failed", "boom")
    store.request_cancel(cancelled.id, account.id)  # processing: the worker ends it at a step
    assert store.finish_cancelled(cancelled.id, held[cancelled.id].lease_token) is not None
    store.request_cancel(queued_cancel.id, account.id)  # queued: ends at once
    # A job whose workers keep dying: claimed up to max_attempts, then reaped (worker_lost).
    for _ in range(3):
        assert [j.id for j in store.claim_jobs("dead", 10, lease_seconds=1)] == [reaped.id]
        clock.t += 2
    assert reaped.id in store.reap_expired(max_attempts=3)
    assert store.get_avatar(reaped.id).status == "failed"

    assert len(_queued(store)) == 5  # one row per ended job, none for the running one
    assert _sweep_after_grace(keeper, clock) == 5
    for keys in (done_keys, failed_keys, cancelled_keys, reaped_keys, queued_cancel_keys):
        assert not any(assets.exists(k) for k in keys)
    assert all(assets.exists(k) for k in running_keys)  # a running job keeps its photos
    assert _queued(store) == []
    assert keeper.sweep_assets() == 0  # idempotent: nothing left to do


def test_deleting_an_avatar_queues_its_images_and_photos(world):
    store, assets, account, clock = world
    keeper = Housekeeper(store, assets=assets)
    job, photo_keys = _photo_job(store, assets, account)
    claimed = _claim(store, job)
    image = assets.put_image(job.id, 0, Image.new("RGB", (16, 16)))
    assert store.complete_job(job.id, claimed.lease_token, {"images": [{"key": image.key}]})
    # The process died after completing: neither the photos nor (later) the images went inline.
    store.delete_avatar(job.id, account.id)
    assert _sweep_after_grace(keeper, clock) >= 2
    assert not assets.exists(image_key(job.id, 0))
    assert not any(assets.exists(k) for k in photo_keys)


def test_photos_kept_with_the_avatar_go_when_the_avatar_is_deleted(world):
    store, assets, account, clock = world
    keeper = Housekeeper(store, assets=assets, photo_retention="avatar")
    job, keys = _photo_job(store, assets, account)
    assert store.complete_job(job.id, _claim(store, job).lease_token, {"images": []})
    clock.t += DELETION_GRACE_S + 1
    assert keeper.sweep_assets() == 0
    assert all(assets.exists(k) for k in keys)  # kept: cast by avatarId reuses them
    assert _queued(store) == []  # the job's row was dropped, not left to grow the table
    store.delete_avatar(job.id, account.id)
    assert _sweep_after_grace(keeper, clock) >= 1
    assert not any(assets.exists(k) for k in keys)


def test_a_failing_object_store_keeps_the_row_for_the_next_run(world):
    store, assets, account, clock = world
    job, keys = _photo_job(store, assets, account)
    assert store.complete_job(job.id, _claim(store, job).lease_token, {"images": []})

    class Down:
        def delete_prefix(self, prefix):
            raise ConnectionError("object store unreachable")

    down = Housekeeper(store, assets=AssetStore(Down()))
    assert _sweep_after_grace(down, clock) == 0
    (row,) = _queued(store)
    assert row.attempts == 1 and "unreachable" in row.last_error
    assert all(assets.exists(k) for k in keys)
    assert Housekeeper(store, assets=assets).sweep_assets() == 1  # back up: done
    assert not any(assets.exists(k) for k in keys) and _queued(store) == []


@pytest.mark.parametrize("retention", ["job", "avatar"])
def test_photos_of_a_submission_that_never_committed_are_deleted(world, retention):
    """The API writes the photos, then commits the job; a process killed in between (or a refused
    submission whose inline delete failed) leaves files no job owns: they go, whatever the retention."""
    store, assets, account, clock = world
    keeper = Housekeeper(store, assets=assets, photo_retention=retention)
    store.expect_upload("uploads/up_orphan")
    orphan = [assets.put_upload("up_orphan", i, Image.new("RGB", (8, 8))) for i in range(2)]
    accepted, accepted_keys = _photo_job(store, assets, account)  # accepted: its photos are the job's
    assert [d.prefix for d in _queued(store)] == ["uploads/up_orphan"]
    assert _sweep_after_grace(keeper, clock) == 1
    assert not any(assets.exists(k) for k in orphan)
    assert all(assets.exists(k) for k in accepted_keys)
    assert store.get_avatar(accepted.id).status == "queued"

