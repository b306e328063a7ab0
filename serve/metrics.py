"""Prometheus metrics for the ingress and the job worker.

Each process keeps its own `prometheus_client` registry. The ingress serves `GET /metrics`
(outside `/v1`, unauthenticated, meant for a scraper on the private network): its own series
plus, with Ray, the model replicas' series fetched through the deployment handle. Inside Ray the
worker also mirrors its series to `ray.util.metrics`, so Ray's own Prometheus export (the
metrics port of each node, see Ray's "Collecting and monitoring metrics" docs) carries them
per replica with no extra wiring.

Series: `avatar_queue_depth` (jobs queued, sampled by the worker), `avatar_batch_size`,
`avatar_generation_seconds`, `avatar_queue_wait_seconds`, `avatar_jobs_total{kind,outcome}`,
`avatar_image_encode_seconds{size}` (PNG + thumbnail encoding per image, e.g. size="512x512"),
`avatar_postprocess_seconds` (per job: policy check, encoding, upload, completion),
`avatar_http_requests_total{method,route,status}`, `avatar_jobs_submitted_total{kind}`.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .logctx import logger

log = logger("serve.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
_ENCODE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, ray_mirror: bool = False):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram("avatar_batch_size", "Jobs per engine call", buckets=_BATCH_BUCKETS, registry=r)
        self.generation = Histogram("avatar_generation_seconds", "Engine wall time per batch", ["model"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("avatar_queue_wait_seconds", "Time from submit to claim",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.jobs = Counter("avatar_jobs_total", "Finished job attempts by outcome", ["kind", "outcome"], registry=r)
        self.queue_depth = Gauge("avatar_queue_depth", "Queued jobs, as last sampled", registry=r)
        self.encode = Histogram("avatar_image_encode_seconds", "PNG (+ thumbnail) encoding time per image", ["size"],
                                buckets=_ENCODE_BUCKETS, registry=r)
        self.postprocess = Histogram("avatar_postprocess_seconds", "Post-processing time per job (encode, upload, "
                                     "complete)", buckets=_ENCODE_BUCKETS + (2, 5), registry=r)
        self.images_checked = Counter("avatar_images_checked_total", "Generated images scored by the safety check",
                                      ["checker"], registry=r)
        self.images_flagged = Counter("avatar_images_flagged_total", "Images at or over the safety threshold, by "
                                      "label and the action taken", ["label", "action"], registry=r)
        self._ray: dict[str, Any] | None = None
        if ray_mirror:
            try:
                from ray.util import metrics as rm

                self._ray = {
                    "batch": rm.Histogram("avatar_batch_size", "Jobs per engine call", boundaries=list(_BATCH_BUCKETS)),
                    "gen": rm.Histogram("avatar_generation_seconds", "Engine wall time per batch",
                                        boundaries=list(_LATENCY_BUCKETS), tag_keys=("model",)),
                    "jobs": rm.Counter("avatar_jobs_total", "Finished job attempts", tag_keys=("kind", "outcome")),
                    "depth": rm.Gauge("avatar_queue_depth", "Queued jobs, as last sampled"),
                }
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.warning("ray metrics unavailable", exc_info=True)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)
        if self._ray:
            self._ray["batch"].observe(size)

    def observe_generation(self, seconds: float, model: str, batch: int) -> None:
        self.generation.labels(model=model).observe(seconds)
        if self._ray:
            self._ray["gen"].observe(seconds, tags={"model": model})

    def observe_encode(self, seconds: float, width: int, height: int) -> None:
        self.encode.labels(size=f"{width}x{height}").observe(seconds)

    def observe_postprocess(self, seconds: float) -> None:
        self.postprocess.observe(seconds)

    def observe_safety(self, verdicts: Any, decisions: list[str]) -> None:
        """One job's safety verdicts and the policy's decisions (pass/flag/blur/block)."""
        for verdict, decision in zip(verdicts, decisions):
            self.images_checked.labels(checker=verdict.checker).inc()
            if decision != "pass":
                self.images_flagged.labels(label=verdict.label, action=decision).inc()

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def job_outcome(self, kind: str, outcome: str) -> None:
        self.jobs.labels(kind=kind, outcome=outcome).inc()
        if self._ray:
            self._ray["jobs"].inc(tags={"kind": kind, "outcome": outcome})

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)
        if self._ray:
            self._ray["depth"].set(depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("avatar_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.submitted = Counter("avatar_jobs_submitted_total", "Jobs accepted", ["kind"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts requests by route template (not raw path, to keep label cardinality bounded)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics = getattr(scope.get("app").state, "metrics", None) if scope.get("app") else None
            if metrics is not None:
                metrics.requests.labels(method=scope.get("method", ""), route=path, status=str(status["code"])).inc()
