"""A real multi-node Ray cluster on this machine, deployed the way the README's cluster section says.

What runs (all on 127.0.0.1, every port a free one):
- PostgreSQL for state and the job queue (a fresh schema; skipped locally when unreachable,
  failed under CI=true), an S3-compatible object store for images (moto's server; s3fs is the
  fsspec backend, the code path of real S3);
- `ray start --head --resources '{"ingress_node": 1}'` and `ray start --address …
  --resources '{"model_node": 1}'`, each node with AVATAR_DB_URL / AVATAR_ASSETS_URL / AWS_* in
  its environment;
- `serve deploy` of `serve/config/serve_cluster.yaml`, changed only where one machine and no GPU
  demand it (loopback HTTP on a free port, HeadOnly proxy, tiny-sd15 on CPU, one replica each).

Then: the ingress and the model replica run on different nodes (custom resources); a job goes
generate → completed, its PNG read back through the API and directly from the bucket; health
and metrics answer; the model node is killed (its whole process tree) with jobs in flight and
queued, a new model node joins, Serve starts a replica there, and every accepted job completes
exactly once (one reserve + one charge in the ledger each).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

import pg_support
from cluster_support import Tracked, kill_tree, ray_env, run, short_tmp, tool, tracked, wait_http
from helpers import free_port, make_account

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LIMIT_S = 420  # a bound for a stuck step on a busy 2-core machine; never asserted on
BUCKET = "avatar-assets"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _node_args(*, resources: dict, num_cpus: int) -> list[str]:
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    return ["--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources)}", "--object-store-memory=100000000", "--disable-usage-stats",
            "--block", *(f"{k}={v}" for k, v in ports.items())]


def _config(http_port: int) -> dict:
    from serve.deployments import default_config_path, load_config

    cfg = load_config(default_config_path("serve_cluster.yaml"))
    cfg["proxy_location"] = "HeadOnly"  # one machine: a proxy per node would share one port
    cfg["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = cfg["applications"][0]
    app["args"].update({"models": ["tiny-sd15"], "device": "cpu", "max_batch": 2, "lease_seconds": 8,
                        "poll_seconds": 0.2, "public_base_url": "",
                        "tiers": {"free": [10, 1], "pro": [60, 5], "enterprise": [600, 50]}})
    for dep in app["deployments"]:
        dep["autoscaling_config"].update(min_replicas=1, max_replicas=1, initial_replicas=1)
        if dep["name"] == "AvatarModel":
            dep["ray_actor_options"].update(num_cpus=1, num_gpus=0)
            dep["graceful_shutdown_timeout_s"] = 20
    return cfg


def _alive_actors(dashboard: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)


def _nodes_with(dashboard: str, resource: str) -> set[str]:
    from ray.util.state import list_nodes

    return {n.node_id for n in list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000,
                                          raise_on_missing_output=False)
            if resource in (n.resources_total or {})}


def _replica_nodes(dashboard: str, deployment: str) -> set[str]:
    return {a.node_id for a in _alive_actors(dashboard) if (a.class_name or "").endswith(f":{deployment}")}


def _wait(what: str, fn, limit_s: float = LIMIT_S, poll_s: float = 1.0, context=None):
    """Poll `fn` until it returns something truthy; on failure say what `context()` shows."""
    deadline = time.monotonic() + limit_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(poll_s)
    extra = ""
    if context is not None:
        try:
            extra = f"\n{context()}"
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            extra = f"\n(context failed: {exc!r})"
    pytest.fail(f"{what}: not after {limit_s}s (last: {last!r}){extra}")


def _serve_status(env: dict, dashboard: str) -> str:
    import subprocess

    r = subprocess.run([tool("serve"), "status", "--address", dashboard], env=env, capture_output=True, text=True,
                       timeout=60)
    return r.stdout[-3000:] + r.stderr[-1000:]


@pytest.mark.timeout(1500)  # several bounded steps, each generous for a loaded 2-core machine
def test_two_nodes_postgres_s3_and_a_lost_model_node(tmp_path):
    pg_support.require_postgres()
    httpx = pytest.importorskip("httpx")
    s3fs = pytest.importorskip("s3fs")
    from serve.store import open_store

    db_url = pg_support.fresh_url("cluster")
    store = open_store(db_url)  # creates and migrates the schema the cluster will use
    s3_port, gcs_port, dash_port, http_port = free_port(), free_port(), free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    dashboard = f"http://127.0.0.1:{dash_port}"
    env = ray_env(AVATAR_DB_URL=db_url, AVATAR_ASSETS_URL=f"s3://{BUCKET}/cluster", AWS_ENDPOINT_URL_S3=endpoint,
                  AVATAR_URL_SIGNING_SECRET="cluster-test-signing-secret",  # one key for every ingress node
                  **S3_ENV)
    nodes: list[Tracked] = []
    ray_tmp = short_tmp("aeclu")
    try:
        with tracked([tool("moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env=env) as s3:
            wait_http(endpoint + "/", 60, s3)
            fs.mkdir(BUCKET)
            # 1. The head node (GCS, dashboard, Serve controller, the HTTP proxy, the ingress).
            head = Tracked([tool("ray"), "start", "--head", f"--port={gcs_port}", "--include-dashboard=true",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                            f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_tmp}",
                            *_node_args(resources={"ingress_node": 1}, num_cpus=2)], env=env)
            nodes.append(head)
            wait_http(dashboard + "/api/version", LIMIT_S, head)
            # 2. A model node joins.
            join = ["start", f"--address=127.0.0.1:{gcs_port}"]
            model_node = Tracked([tool("ray"), *join, *_node_args(resources={"model_node": 1}, num_cpus=1)], env=env)
            nodes.append(model_node)
            first_model_nodes = _wait("model node alive", lambda: _nodes_with(dashboard, "model_node"))
            ingress_nodes = _nodes_with(dashboard, "ingress_node")
            # 3. `serve deploy` the cluster YAML through the dashboard.
            cfg_path = tmp_path / "serve_cluster.yaml"
            cfg_path.write_text(yaml.safe_dump(_config(http_port)))
            run([tool("serve"), "deploy", str(cfg_path), "--address", dashboard], env=env)
            api = f"http://127.0.0.1:{http_port}"
            health = wait_http(api + "/v1/health", LIMIT_S, head,
                               ok=lambda r: r.status_code == 200 and r.json().get("status") == "ok").json()
            assert [m["name"] for m in health["models"]] == ["tiny-sd15"]
            run([tool("serve"), "status", "--address", dashboard], env=env)
            # Placement by custom resources: the ingress on the head, the model on the model node.
            assert _replica_nodes(dashboard, "AvatarIngress") == ingress_nodes
            assert _replica_nodes(dashboard, "AvatarModel") == first_model_nodes
            assert not ingress_nodes & first_model_nodes

            client = httpx.Client(base_url=api, timeout=60)
            acct, auth = make_account(store, "enterprise", 10_000)
            # 4. generate → completed → the PNG from the API and straight from the bucket.
            first = client.post("/v1/avatars/generate", headers=auth,
                                json={"prompt": "portrait of an astronaut", "seed": 3, "steps": 4}).json()
            done = _wait("first job", lambda: (lambda a: a if a["status"] in ("completed", "failed") else None)(
                client.get(f"/v1/avatars/{first['id']}", headers=auth).json()), poll_s=0.5,
                context=lambda: _serve_status(env, dashboard))
            assert done["status"] == "completed", done
            from serve.assets import image_key
            from serve.links import image_path

            direct = fs.cat_file(f"{BUCKET}/cluster/{image_key(first['id'], 0)}")
            assert direct[:8] == b"\x89PNG\r\n\x1a\n"
            via_api = client.get(image_path(first["id"], 0), headers=auth)  # the ingress reads the bucket
            assert via_api.status_code == 200 and via_api.headers["content-type"] == "image/png"
            assert via_api.content == direct
            link = httpx.get(done["images"][0]["url"], timeout=30)  # the link handed out (presigned by s3fs)
            assert link.status_code == 200 and link.content == direct, done["images"][0]["url"]
            metrics = client.get("/metrics").text
            assert 'avatar_jobs_total{kind="generate",outcome="completed"}' in metrics

            # 5. Load, then lose the model node with jobs in flight and queued.
            ids = [client.post("/v1/avatars/generate", headers=auth, json={
                "prompt": f"load {i}", "seed": i, "steps": 150, "batchSize": 4}).json()["id"] for i in range(6)]
            _wait("a job in flight", lambda: "processing" in store.job_statuses(ids).values(), poll_s=0.05)
            model_node.remember()
            kill_tree([model_node.proc.pid, *sorted(model_node.seen)])  # the machine is gone
            time.sleep(1.0)  # let a commit that was already on the wire land before reading
            statuses = store.job_statuses(ids)
            in_flight = [i for i, s in statuses.items() if s == "processing"]
            assert in_flight, statuses
            assert set(statuses.values()) <= {"processing", "queued", "completed"}, statuses
            # 6. A replacement model node joins; Serve starts the replica there.
            new_node = Tracked([tool("ray"), *join, *_node_args(resources={"model_node": 1}, num_cpus=1)], env=env)
            nodes.append(new_node)
            final = _wait("every job settled", lambda: (lambda st: st if all(
                s in ("completed", "failed", "cancelled") for s in st.values()) else None)(store.job_statuses(ids)),
                context=lambda: f"jobs: {store.job_statuses(ids)}\n{_serve_status(env, dashboard)}")
            assert set(final.values()) == {"completed"}, final
            second_model_nodes = _nodes_with(dashboard, "model_node")
            assert _replica_nodes(dashboard, "AvatarModel") <= second_model_nodes
            assert not second_model_nodes & first_model_nodes  # the lost node is not counted alive
            ledger = store.ledger(acct.id)
            for i in [first["id"], *ids]:  # exactly once: one reservation and one charge each
                assert sorted(e.kind for e in ledger if e.avatar_id == i) == ["charge", "reserve"], i
            for i in in_flight:  # the lost node's batch was claimed again after its lease expired
                assert store.get_avatar(i).attempts >= 2
            for i in ids:
                assert fs.exists(f"{BUCKET}/cluster/{image_key(i, 3)}")
            client.close()
    finally:
        for node in reversed(nodes):
            node.stop(grace_s=15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        store.close()
        pg_support.drop_schemas([db_url])
