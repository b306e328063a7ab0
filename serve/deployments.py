"""Ray Serve deployments: a FastAPI ingress and the `AvatarModel` engine deployment.

`AvatarIngress` (CPU, scales with traffic) serves the HTTP API. It validates and persists each
submission as a `queued` job, then nudges the model deployment. `AvatarModel` (one GPU per
replica) holds the warm engine and runs the `JobWorker` loop in a background thread: it claims
up to `max_batch` jobs at once from the store — which is the durable queue — so batching comes
from the claim, and a replica crash loses nothing (leases expire, jobs are claimed again).
The ingress never waits for a generation; clients poll (or use webhooks).

`build_app(args)` is the application builder named by `serve/config/serve_*.yaml`
(`import_path: serve.deployments:build_app`); `serve deploy`/`serve run` pass the YAML's
`args`. `run_config(path, overrides)` is what `avatar-serve run` and the tests use to start the
same YAML on an already running Ray with public APIs only.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

import yaml
from ray import serve

from .logctx import logger
from .loops import BackgroundLoop
from .settings import ServiceSettings

log = logger("serve.deployments")

INGRESS_NAME = "AvatarIngress"
MODEL_NAME = "AvatarModel"


def _open_store(settings: ServiceSettings):
    from .app import event_renderer
    from .store import open_store

    if settings.resolved_db_url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(settings.resolved_db_url[len("sqlite:///"):]) or ".", exist_ok=True)
    from .assets import AssetStore
    from .links import ImageLinks

    # Webhook payloads have no request to take a base URL from: public_base_url, else host:port.
    base = settings.public_base_url.rstrip("/") or f"http://{settings.host}:{settings.port}"
    links = ImageLinks.from_settings(settings, AssetStore.from_url(settings.resolved_assets_url))
    return open_store(settings.resolved_db_url, event_renderer=event_renderer(base, links))


def served_models(engine: Any, settings: ServiceSettings) -> list[str]:
    """Profiles this deployment serves: the configured ones, else the engine's default."""
    return list(settings.models) if settings.models else [engine.default_model]


@serve.deployment(name=MODEL_NAME, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  health_check_period_s=10)
class AvatarModel:
    """Warm engine + job worker loop. Its methods are small control calls; generation happens
    in the worker thread, never inside a request."""

    def __init__(self, settings: Mapping[str, Any]):
        from avatar_engine import AvatarEngine

        from .assets import AssetStore
        from .engine_client import EngineDescription
        from .metrics import WorkerMetrics
        from .policy import PolicyChecker
        from .worker import JobWorker

        self.settings = ServiceSettings.from_dict(settings, env=False)
        s = self.settings
        try:
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("AVATAR_TORCH_THREADS", "2"))))
        except Exception:  # noqa: BLE001
            pass
        self.engine = AvatarEngine.from_config(models_yaml_path=s.models_yaml, profile_names=s.models or None,
                                               device=s.device)
        models = served_models(self.engine, s)
        for name in models:  # load (and warm) before accepting jobs
            self.engine.load(name)
        self.description = EngineDescription.from_engine(self.engine, models)
        self.store = _open_store(s)
        self.metrics = WorkerMetrics(ray_mirror=True)
        self.worker = JobWorker(self.store, self.engine, AssetStore.from_url(s.resolved_assets_url), s,
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


class Housekeeper:
    """Periodically deletes expired idempotency records and old rate-limit windows so those
    tables stay small. Cheap and idempotent: every ingress replica may run one."""

    def __init__(self, store: Any, interval_s: float = 600.0):
        self.store, self.interval_s = store, interval_s
        self._loop = BackgroundLoop("avatar-housekeeper", self._step, interval_s, wait_first=True)

    def start(self) -> "Housekeeper":
        self._loop.start()
        return self

    def run_once(self) -> int:
        try:
            removed = self.store.purge_expired()
            log.info("housekeeping: removed %d expired rows", removed)
            return removed
        except Exception:  # noqa: BLE001 - retried next interval; never kill the replica
            log.exception("housekeeping failed")
            return 0

    def stop(self) -> None:
        self._loop.stop(timeout=5)

    def _step(self) -> bool:
        self.run_once()
        return False  # a chore per interval, never "more work now"


@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress()
class AvatarIngress:
    """HTTP entry point; the FastAPI app is built per replica by `create_app`."""

    def __init__(self, model_handle: Any, settings: Mapping[str, Any]):
        from .engine_client import RayEngineClient

        self.settings = ServiceSettings.from_dict(settings, env=False)
        self.store = _open_store(self.settings)
        self.client = RayEngineClient(model_handle)
        # Webhook delivery is I/O only: every ingress replica runs a dispatcher; leases in the
        # outbox keep them from sending the same message concurrently.
        from .webhooks import WebhookDispatcher

        self.dispatcher = WebhookDispatcher(self.store, self.settings.webhooks).start()
        self.housekeeper = Housekeeper(self.store).start()

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.settings, self.store, self.client)

    def __del__(self):
        try:
            self.dispatcher.stop(timeout=5)
            self.housekeeper.stop()
        except Exception:  # noqa: BLE001
            pass


def build_app(args: Mapping[str, Any] | ServiceSettings | None = None, *,
              deployment_options: Mapping[str, Mapping[str, Any]] | None = None):
    """Serve application builder. `args` are ServiceSettings fields (over `AVATAR_*` env);
    `deployment_options` maps a deployment name to `.options(...)` (what the YAML's
    `deployments:` section holds) for callers that start the app without Serve's config path."""
    settings = args if isinstance(args, ServiceSettings) else ServiceSettings.from_dict(dict(args or {}))
    opts = {k: dict(v) for k, v in (deployment_options or {}).items()}
    unknown = set(opts) - {INGRESS_NAME, MODEL_NAME}
    if unknown:
        raise ValueError(f"unknown deployment(s) in options: {sorted(unknown)}")
    # Resolve paths here (the driver's cwd), not in replicas whose cwd may differ.
    settings = settings.replace(data_dir=os.path.abspath(settings.data_dir), db_url=settings.resolved_db_url,
                                assets_url=settings.resolved_assets_url)
    d = settings.to_dict()
    model = AvatarModel.options(**opts.get(MODEL_NAME, {})).bind(d)
    return AvatarIngress.options(**opts.get(INGRESS_NAME, {})).bind(model, d)


# ---------------------------------------------------------------------------------------------
# Starting a Serve config YAML on a running Ray (CLI and tests)
# ---------------------------------------------------------------------------------------------
_DEPLOYMENT_KEYS = {"num_replicas", "max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                    "ray_actor_options", "health_check_period_s", "health_check_timeout_s",
                    "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "user_config",
                    "placement_group_bundles", "placement_group_strategy", "max_replicas_per_node"}


def load_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def default_config_path(name: str = "serve_local.yaml") -> str:
    return os.path.join(os.path.dirname(__file__), "config", name)


def run_config(config: Mapping[str, Any] | str, overrides: Mapping[str, Any] | None = None, *,
               app_name: str | None = None, blocking: bool = False):
    """Deploy the first application of a Serve config (YAML path or parsed dict) with
    `serve.run`, calling the builder its `import_path` names with `args` + `overrides` and the
    YAML's per-deployment options. Serve must already be started (`serve.start`). Returns the
    ingress DeploymentHandle."""
    cfg = load_config(config) if isinstance(config, str) else dict(config)
    app_cfg = cfg["applications"][0]
    module_name, _, attr = app_cfg["import_path"].replace(":", ".").rpartition(".")
    builder = getattr(importlib.import_module(module_name), attr)
    args = {**(app_cfg.get("args") or {}), **(overrides or {})}
    dep_opts = {}
    for d in app_cfg.get("deployments") or []:
        bad = set(d) - _DEPLOYMENT_KEYS - {"name"}
        if bad:
            raise ValueError(f"deployment {d.get('name')!r}: unsupported keys {sorted(bad)}")
        dep_opts[d["name"]] = {k: v for k, v in d.items() if k != "name"}
    app = builder(args, deployment_options=dep_opts)
    return serve.run(app, name=app_name or app_cfg.get("name", "avatar"),
                     route_prefix=app_cfg.get("route_prefix", "/"), blocking=blocking)
