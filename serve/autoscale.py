"""Scale `AvatarModel` replicas with the job queue (a Ray Serve custom autoscaling policy).

Model replicas pull jobs from the database, so Ray's default policy (ongoing requests per
replica) never sees the queue. Instead every replica reports two custom metrics through
`AvatarModel.record_autoscaling_stats` (Ray Serve calls it periodically and hands the values,
averaged over `look_back_period_s`, to the policy in `AutoscalingContext.aggregated_metrics`):

    queued   jobs waiting in the database (the same for every replica)
    leases   jobs this replica holds right now (claimed, running, not yet finished)

`QueueDepthPolicy` asks for `ceil((queued + leases) / jobs_per_replica)` replicas, bounded by the
YAML's `min_replicas`/`max_replicas`. It scales down by at most the number of replicas that
held no lease for the whole look-back window, and never while the metrics are missing, so an
idle replica is what goes away. Ray picks the replica it stops; should that one be busy after
all, its graceful shutdown (`AvatarModel.__del__` → `JobWorker.stop`) finishes the batch in
progress, and a replica killed past `graceful_shutdown_timeout_s` only leaves leases that
expire and are claimed again — completion is conditional on the lease token, so every job
completes (and is charged) exactly once. Ray applies `upscale_delay_s`/`downscale_delay_s` and
the scaling factors on top. Configured in the YAML:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      upscale_delay_s: 5
      downscale_delay_s: 60
      look_back_period_s: 10
      policy:
        policy_function: serve.autoscale:QueueDepthPolicy
        policy_kwargs: {jobs_per_replica: 16}

The policy runs inside the Serve controller: it only reads the reported metrics, never the
database, so the controller needs no database credentials and a slow database cannot stall it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

QUEUED_METRIC = "queued"
LEASES_METRIC = "leases"


def desired_replicas(queued: float, leases_by_replica: Mapping[Any, float], *, current: int, jobs_per_replica: int,
                     min_replicas: int, max_replicas: int) -> int:
    """The replica count for this much work. Pure, so the rule is testable without Ray."""
    work = max(0.0, queued) + sum(max(0.0, v) for v in leases_by_replica.values())
    want = min(max(math.ceil(work / jobs_per_replica), min_replicas), max_replicas)
    if want < current:
        idle = sum(1 for v in leases_by_replica.values() if v <= 0)
        want = max(want, current - idle)  # only replicas that hold nothing may go
    return want


class QueueDepthPolicy:
    """Ray Serve autoscaling policy (`policy_function: serve.autoscale:QueueDepthPolicy`).

    `jobs_per_replica`: the queued + in-flight jobs one replica should carry; `max_batch` (jobs
    per engine call) is a good start, a few batches if a short wait is acceptable."""

    def __init__(self, jobs_per_replica: int = 8):
        if int(jobs_per_replica) < 1:
            raise ValueError("jobs_per_replica must be >= 1")
        self.jobs_per_replica = int(jobs_per_replica)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        queued_by = metrics.get(QUEUED_METRIC) or {}
        leases_by = metrics.get(LEASES_METRIC) or {}
        running = list(ctx.running_replicas or [])
        # Every running replica must have reported: a replica without figures may be busy.
        if not queued_by or any(r not in leases_by for r in running):
            return ctx.target_num_replicas, {}
        leases = {r: leases_by[r] for r in running} if running else dict(leases_by)
        want = desired_replicas(max(queued_by.values()), leases, current=ctx.target_num_replicas,
                                jobs_per_replica=self.jobs_per_replica,
                                min_replicas=ctx.capacity_adjusted_min_replicas,
                                max_replicas=ctx.capacity_adjusted_max_replicas)
        return want, {"queued": max(queued_by.values()), "leases": sum(leases.values())}
