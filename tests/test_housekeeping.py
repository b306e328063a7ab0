"""The ingress housekeeper purges expired idempotency records through the real store."""
from serve.deployments import Housekeeper
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
