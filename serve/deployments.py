"""Ray Serve deployments: a FastAPI ingress and the `AvatarModel` engine deployment.

`AvatarIngress` (CPU, scales with traffic) serves the HTTP API. It validates and persists each
submission as a `queued` job, then nudges the model deployment. `AvatarModel` (one GPU per
replica) holds the warm engine and runs the `JobWorker` loop in a background thread: it claims
up to `max_batch` jobs at once from the store — which is the durable queue — so batching comes
from the claim, and a replica crash loses nothing (leases expire, jobs are claimed again).
The ingress never waits for a generation; clients poll (or use webhooks). `AvatarModel` reports
the queue depth and its own leases to Serve's autoscaler (`serve.autoscale`).

`build_app(args)` is the application builder named by `serve/config/serve_*.yaml`
(`import_path: serve.deployments:build_app`). It follows Ray's builder contract: one dict (the
YAML's `args`); Ray itself applies the YAML's `deployments:` options on top. `run_config(path,
overrides)` — what `avatar-serve run` and the tests use — hands the same YAML to Serve's config
path (the one `serve run <config>` takes), so every way of starting the app is the same.
"""
from __future__ import annotations

import asyncio
import copy
import os
import time
from typing import Any, Mapping

import yaml
from ray import serve

from .app import create_app, event_renderer
from .assets import AssetStore
from .engine_client import EngineRunner, RayEngineClient, build_engine
from .housekeeping import Housekeeper
from .links import ImageLinks
from .logctx import logger
from .metrics import WorkerMetrics
from .policy import PolicyChecker
from .settings import ServiceSettings
from .store import open_store
from .store.capacity import worker_load
from .webhooks import WebhookDispatcher
from .worker import JobWorker

log = logger("serve.deployments")

INGRESS_NAME = "AvatarIngress"
MODEL_NAME = "AvatarModel"


def _open_store(settings: ServiceSettings):
    if settings.resolved_db_url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(settings.resolved_db_url[len("sqlite:///"):]) or ".", exist_ok=True)
    # Webhook payloads have no request to take a base URL from: public_base_url, else host:port.
    base = settings.public_base_url.rstrip("/") or f"http://{settings.host}:{settings.port}"
    links = ImageLinks.from_settings(settings, AssetStore.from_url(settings.resolved_assets_url))
    return open_store(settings.resolved_db_url, event_renderer=event_renderer(base, links))


def served_models(engine: EngineRunner, settings: ServiceSettings) -> list[str]:
    """Profiles this deployment serves: the configured ones, else the engine's default."""
    return list(settings.models) if settings.models else [engine.default_model]


@serve.deployment(name=MODEL_NAME, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  health_check_period_s=2)  # a crashed replica is replaced within ~2 s
class AvatarModel:
    """Warm engine + job worker loop. Its methods are small control calls; generation happens
    in the worker thread, never inside a request."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = ServiceSettings.from_dict(settings, env=False)
        s = self.settings
        try:
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("AVATAR_TORCH_THREADS", "2"))))
        except Exception:  # noqa: BLE001
            pass
        self.engine = build_engine(s)  # the models.yaml engine, or `engine_factory`'s (benchmarks)
        models = served_models(self.engine, s)
        for name in models:  # load (and warm) before accepting jobs
            self.engine.load(name)
        self.description = self.engine.describe(models)
        self.store = _open_store(s)
        self.metrics = WorkerMetrics(ray_mirror=True)
        assets = AssetStore.from_url(s.resolved_assets_url, s.png_compress_level)
        self.worker = JobWorker(self.store, self.engine, assets, s,
                                policy=PolicyChecker(s.all_policy_words()), metrics=self.metrics, models=models)
        self.worker.start()
        log.info("AvatarModel ready: models=%s worker=%s", models, self.worker.worker_id)

    def describe(self) -> dict[str, Any]:
        return self.description.to_dict()

    def nudge(self) -> bool:
        self.worker.wake()
        return True

    def metrics_text(self) -> bytes:
        return self.metrics.exposition()

    def replica_info(self) -> dict[str, Any]:
        """Process id and worker id (operators' debugging; tests use the pid to simulate a crash)."""
        return {"pid": os.getpid(), "worker_id": self.worker.worker_id, "batches": self.worker.batches_run}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (`serve.autoscale.QueueDepthPolicy`): the queue depth and
        the jobs this replica holds. Serve calls this periodically on the replica."""
        load = await asyncio.to_thread(worker_load, self.store, self.worker.worker_id)
        return load.to_metrics()

    def check_health(self) -> None:
        """Serve restarts the replica if the worker loop died."""
        if not self.worker.running:
            raise RuntimeError("job worker loop is not running")

    def __del__(self):
        try:
            self.worker.stop(timeout=30)
            self.store.close()
        except Exception:  # noqa: BLE001
            pass


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress()
class AvatarIngress:
    """HTTP entry point; the FastAPI app is built per replica by `create_app`."""

    def __init__(self, model_handle: Any, settings: Mapping[str, Any]):
        self.settings = ServiceSettings.from_dict(settings, env=False)
        self.store = _open_store(self.settings)
        self.client = RayEngineClient(model_handle)
        # Webhook delivery is I/O only: every ingress replica runs a dispatcher; leases in the
        # outbox keep them from sending the same message concurrently.
        self.dispatcher = WebhookDispatcher(self.store, self.settings.webhooks).start()
        self.housekeeper = Housekeeper(self.store, assets=AssetStore.from_url(self.settings.resolved_assets_url),
                                       photo_retention=self.settings.photo_retention).start()

    def __serve_build_asgi_app__(self):
        # Serve's proxy sets x-request-id on every response: one header, its id (see errors.py).
        return create_app(self.settings, self.store, self.client, proxy_request_id=True)

    def __del__(self):
        try:
            self.dispatcher.stop(timeout=5)
            self.housekeeper.stop()
        except Exception:  # noqa: BLE001
            pass


def build_app(args: Mapping[str, Any] | None = None):
    """Serve application builder (Ray's contract: exactly one dict argument). `args` are
    ServiceSettings fields over `AVATAR_*` env; per-deployment options (replicas, resources,
    autoscaling) come from the config's `deployments:` section, which Serve applies itself."""
    settings = ServiceSettings.from_dict(dict(args or {}))
    # Resolve paths here (where the builder runs), not in replicas whose cwd may differ.
    settings = settings.replace(data_dir=os.path.abspath(settings.data_dir), db_url=settings.resolved_db_url,
                                assets_url=settings.resolved_assets_url)
    d = settings.to_dict()
    return AvatarIngress.bind(AvatarModel.bind(d), d)


# ---------------------------------------------------------------------------------------------
# Starting a Serve config YAML on a running Ray (CLI and tests)
# ---------------------------------------------------------------------------------------------
def load_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def default_config_path(name: str = "serve_local.yaml") -> str:
    return os.path.join(os.path.dirname(__file__), "config", name)


def with_args(config: Mapping[str, Any] | str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config (YAML path or parsed dict) with `overrides` merged into every application's
    `args` (a copy; the input is not changed)."""
    cfg = copy.deepcopy(load_config(config) if isinstance(config, str) else dict(config))
    for app_cfg in cfg["applications"]:
        app_cfg["args"] = {**(app_cfg.get("args") or {}), **(overrides or {})}
    return cfg


def run_config(config: Mapping[str, Any] | str, overrides: Mapping[str, Any] | None = None, *,
               timeout_s: float = 900.0):
    """Deploy a Serve config (YAML path or parsed dict; `overrides` merged into its `args`) on
    the running Serve instance through Serve's own config path — the one `serve run <config>`
    and `serve deploy` take: Serve validates the schema, calls the builder with `args` and
    applies the `deployments:` options. Serve must already be started (`serve.start`; its HTTP
    options win over the file's). Waits until every application runs (a failed deploy raises
    RuntimeError with Serve's message); returns the first application's ingress handle."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    cfg = with_args(config, overrides)
    schema = ServeDeploySchema.model_validate(cfg)
    names = [a.name for a in schema.applications]
    # Same call as `serve run <config>` (ray/serve/scripts.py): the controller builds the apps.
    _get_global_client().deploy_apps(schema)
    wait_running(names, timeout_s)
    return serve.get_app_handle(names[0])


def wait_running(names: list[str], timeout_s: float) -> None:
    """Block until the named applications are RUNNING; DEPLOY_FAILED raises RuntimeError."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        last = {n: str(apps[n].status) if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError(f"application {failed[0]!r} failed to deploy: {apps[failed[0]].message}")
        if all(apps.get(n) is not None and apps[n].status == "RUNNING" for n in names):
            return
        time.sleep(0.5)
    raise RuntimeError(f"applications not running after {timeout_s:.0f}s: {last}")
