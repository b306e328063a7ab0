"""Model replicas follow the job queue (`serve.autoscale.QueueDepthPolicy`).

The rule itself is pure and checked here without Ray; `test_replicas_follow_a_burst` (marker
`ray`) runs the real app on a private Ray with the cluster YAML's `AvatarModel` autoscaling
section (bounds 1..2, short delays) and watches `serve.status()` go 1 → 2 → 1 replicas while a
burst of jobs drains, every job completing exactly once.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from serve.autoscale import QueueDepthPolicy, desired_replicas


def _want(queued, leases, current, per=4, lo=1, hi=4):
    return desired_replicas(queued, dict(enumerate(leases)), current=current, jobs_per_replica=per,
                            min_replicas=lo, max_replicas=hi)


def test_replicas_for_queued_plus_in_flight_work_within_bounds():
    assert _want(0, [0], 1) == 1            # idle: the minimum
    assert _want(3, [0], 1) == 1            # fits one replica
    assert _want(5, [0], 1) == 2            # 5 / 4 → 2
    assert _want(4, [4], 1) == 2            # in-flight work counts too
    assert _want(100, [4], 1) == 4          # capped at max
    assert _want(0, [0], 1, lo=2) == 2      # raised to min


def test_scale_down_removes_only_replicas_that_hold_no_lease():
    assert _want(0, [0, 0, 0], 3) == 1      # all idle: down to what the work needs
    assert _want(0, [2, 0, 0], 3) == 1      # 2 in flight fits one replica, two idle ones may go
    assert _want(0, [2, 2, 0], 3) == 2      # one idle replica: remove at most one
    assert _want(0, [1, 1, 1], 3) == 3      # every replica busy: keep them all
    assert _want(0, [0.3, 0], 2) == 1       # averaged over the window: any lease means busy


def _ctx(metrics, running, target=1, lo=1, hi=2):
    return SimpleNamespace(aggregated_metrics=metrics, running_replicas=running, target_num_replicas=target,
                           capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi)


def test_policy_reads_the_replicas_reported_metrics():
    policy = QueueDepthPolicy(jobs_per_replica=2)
    ctx = _ctx({"queued": {"r1": 5.0}, "leases": {"r1": 2.0}}, ["r1"])
    assert policy(ctx)[0] == 2
    busy = _ctx({"queued": {"r1": 0.0, "r2": 0.0}, "leases": {"r1": 1.0, "r2": 1.0}}, ["r1", "r2"], target=2)
    assert policy(busy)[0] == 2
    idle = _ctx({"queued": {"r1": 0.0, "r2": 0.0}, "leases": {"r1": 0.0, "r2": 0.0}}, ["r1", "r2"], target=2)
    assert policy(idle)[0] == 1


def test_policy_holds_while_figures_are_missing():
    policy = QueueDepthPolicy(jobs_per_replica=2)
    assert policy(_ctx({}, ["r1"], target=2))[0] == 2                      # nothing reported yet
    partial = _ctx({"queued": {"r1": 0.0}, "leases": {"r1": 0.0}}, ["r1", "r2"], target=2)
    assert policy(partial)[0] == 2                                        # r2 has not reported: may be busy
    with pytest.raises(ValueError):
        QueueDepthPolicy(jobs_per_replica=0)


# ---------------------------------------------------------------------------------------------
# The real thing: a burst on a private Ray
# ---------------------------------------------------------------------------------------------
POLL_LIMIT_S = 420  # a bound for a stuck run on a busy 2-core machine; never asserted on


def _model_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("avatar")
    if app is None or "AvatarModel" not in app.deployments:
        return 0
    return int(app.deployments["AvatarModel"].replica_states.get("RUNNING", 0))


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_replicas_follow_a_burst(tmp_path, monkeypatch):
    from helpers import make_account, ray_serve_session
    from serve.deployments import default_config_path, load_config, run_config
    from serve.store import open_store

    httpx = pytest.importorskip("httpx")
    # Replicas report their metrics every 0.5 s here (default 10 s): the env reaches them
    # because the private Ray is started from this process.
    monkeypatch.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    config = load_config(default_config_path("serve_local.yaml"))
    cluster_model = next(d for d in load_config(default_config_path("serve_cluster.yaml"))["applications"][0]
                         ["deployments"] if d["name"] == "AvatarModel")
    scaling = dict(cluster_model["autoscaling_config"], min_replicas=1, max_replicas=2, upscale_delay_s=0,
                   downscale_delay_s=3, look_back_period_s=2, metrics_interval_s=1)
    scaling["policy"] = dict(scaling["policy"], policy_kwargs={"jobs_per_replica": 2})
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] == "AvatarModel":
            dep.pop("num_replicas")
            dep["autoscaling_config"] = scaling
    db_url = f"sqlite:///{tmp_path}/avatar.db"
    overrides = {"data_dir": str(tmp_path), "db_url": db_url, "models": ["tiny-sd15"], "device": "cpu",
                 "max_batch": 2, "poll_seconds": 0.2, "lease_seconds": 20.0,
                 "tiers": {"free": [10, 1], "pro": [60, 5], "enterprise": [600, 50]}}
    with ray_serve_session() as port:
        run_config(config, overrides)
        store = open_store(db_url)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        try:
            acct, auth = make_account(store, "enterprise", 10_000)
            seen = [_model_replicas()]
            assert seen == [1]
            ids = [client.post("/v1/avatars/generate", headers=auth, json={
                "prompt": f"burst {i}", "seed": i, "steps": 150, "batchSize": 4}).json()["id"] for i in range(16)]
            deadline = time.monotonic() + POLL_LIMIT_S
            statuses: dict = {}
            while time.monotonic() < deadline:
                n = _model_replicas()
                if n != seen[-1]:
                    seen.append(n)
                statuses = store.job_statuses(ids)
                done = all(s in ("completed", "failed", "cancelled") for s in statuses.values())
                if done and 2 in seen and seen[-1] == 1:
                    break
                time.sleep(0.25)
            assert seen[:3] == [1, 2, 1], (seen, statuses)
            assert max(seen) == 2  # never above max_replicas
            assert set(statuses.values()) == {"completed"}, statuses
            ledger = store.ledger(acct.id)
            for i in ids:  # exactly once: one reservation and one charge per job, nothing refunded
                assert sorted(e.kind for e in ledger if e.avatar_id == i) == ["charge", "reserve"], i
        finally:
            client.close()
            store.close()
