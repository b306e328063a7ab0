"""Typed service configuration.

One dataclass, every field defaulted and documented. Values come from (in increasing priority)
the defaults below, `AVATAR_*` environment variables, and the `args:` of a Serve config YAML /
CLI flags (`ServiceSettings.from_dict`). Settings travel to Ray replicas as a plain dict
(`to_dict()`), so every field is JSON-serialisable.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class TierLimits:
    """Per-account limits of one tier (API.md, "Rate limits")."""

    requests_per_minute: int
    concurrent_jobs: int

    def to_json(self) -> dict[str, int]:
        return {"requestsPerMinute": self.requests_per_minute, "concurrentGenerations": self.concurrent_jobs}


DEFAULT_TIERS: dict[str, TierLimits] = {
    "free": TierLimits(10, 1),
    "pro": TierLimits(60, 5),
    "enterprise": TierLimits(300, 20),
}

# A deliberately short default list: operators supply their own via AVATAR_POLICY_WORDS or
# AVATAR_POLICY_WORDS_FILE. Matching is on whole (normalised) words, see policy.py.
DEFAULT_POLICY_WORDS: tuple[str, ...] = (
    "nude", "naked", "nsfw", "porn", "pornographic", "sex", "sexual", "explicit",
    "gore", "beheading", "csam", "loli", "child abuse", "rape",
)


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the service needs that is not a model profile (those live in models.yaml)."""

    # --- storage -------------------------------------------------------------------------
    data_dir: str = "./.avatar-engine"
    """Root for the default SQLite database and the default local asset directory."""
    db_url: str | None = None
    """`sqlite:///path` or `postgresql://...`; default `sqlite:///<data_dir>/avatar.db`."""
    assets_url: str | None = None
    """Local directory or any fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://x`);
    default `<data_dir>/assets`."""
    public_base_url: str = ""
    """Prefix for image URLs in responses (e.g. `https://api.example.com`); empty → relative URLs."""

    # --- network -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000

    # --- engine --------------------------------------------------------------------------
    models_yaml: str | None = None
    """Path of a models.yaml; None → the engine's packaged one."""
    models: tuple[str, ...] | None = None
    """Profile names to load; None → the engine's default selection."""
    device: str | None = None
    """`cpu`, `cuda`, `cuda:1`...; None → the engine picks."""

    # --- accounts, limits, costs ---------------------------------------------------------
    tiers: dict[str, TierLimits] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    cost_percify: int = 10
    cost_cast: int = 30
    cost_per_image_default: int = 2
    """Per-image cost for a model whose profile declares none."""
    model_costs: dict[str, int] = field(default_factory=dict)
    """Per-image cost by model profile name, overriding the profile's `credit_cost` (generate and
    remix cost per-image cost × batchSize)."""

    # --- jobs ----------------------------------------------------------------------------
    lease_seconds: float = 60.0
    """How long a claimed job stays owned without a heartbeat before another worker may take it."""
    heartbeat_seconds: float | None = None
    """Heartbeat interval while a batch runs; default lease_seconds / 3."""
    poll_seconds: float = 1.0
    """Idle worker poll interval; an ingress nudge wakes it sooner."""
    max_batch: int = 8
    """Most jobs one worker claims and runs through the engine at once."""
    max_attempts: int = 3
    """A job whose worker died this many times is failed instead of retried."""

    # --- content policy ------------------------------------------------------------------
    policy_words: tuple[str, ...] = DEFAULT_POLICY_WORDS
    policy_words_file: str | None = None
    """Extra words, one per line (# comments allowed)."""

    # --- uploads -------------------------------------------------------------------------
    max_body_bytes: int = 40 * 1024 * 1024
    max_photo_bytes: int = 10 * 1024 * 1024
    max_photo_pixels: int = 40_000_000

    # --- webhooks ------------------------------------------------------------------------
    webhook_allow_private: bool = False
    """Allow webhook destinations in private/loopback ranges (needed for local testing)."""
    webhook_allowlist: tuple[str, ...] = ()
    """CIDRs or host names allowed even though they are private."""
    metrics_token: str | None = None
    """When set, `GET /metrics` requires `Authorization: Bearer <metrics_token>` (Prometheus
    `authorization` config); when unset it is open, for scrapers on a private network."""
    webhook_max_attempts: int = 8
    """A message that failed this many delivery attempts is given up (marked failed)."""
    webhook_base_backoff_s: float = 5.0
    """Retry n waits uniform(0, min(max, base * 2**(n-1))) seconds (full jitter)."""
    webhook_max_backoff_s: float = 3600.0
    webhook_retry_schedule: tuple[float, ...] | None = None
    """Explicit delays before retry 1, 2, ... (last repeats) instead of the jittered backoff."""
    webhook_lease_seconds: float = 120.0
    """A message claimed by a dispatcher that died is re-offered after this long."""
    webhook_timeout_s: float = 10.0
    """Per-request timeout towards a receiver."""
    webhook_poll_seconds: float = 1.0
    """How often each ingress replica's dispatcher looks for due messages."""
    webhook_disable_after_consecutive_failures: int = 50
    """Disable an endpoint after this many failed attempts in a row (0 = never); a 410 disables at once."""

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        tiers = {str(k): (v if isinstance(v, TierLimits) else _tier_from(v, k)) for k, v in dict(self.tiers).items()}
        object.__setattr__(self, "tiers", tiers)
        costs = {}
        for model, cost in dict(self.model_costs or {}).items():
            if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
                raise ValueError(f"model_costs[{model!r}] must be a non-negative integer, got {cost!r}")
            costs[str(model)] = cost
        object.__setattr__(self, "model_costs", costs)
        if self.webhook_retry_schedule is not None:
            object.__setattr__(self, "webhook_retry_schedule", tuple(float(x) for x in self.webhook_retry_schedule))
        for name in ("models", "policy_words", "webhook_allowlist"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(s.strip() for s in value.split(",") if s.strip())
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for name, lo in (("lease_seconds", 0.1), ("poll_seconds", 0.01), ("max_batch", 1), ("max_attempts", 1),
                         ("max_body_bytes", 1), ("max_photo_bytes", 1), ("port", 0), ("cost_percify", 0),
                         ("cost_cast", 0), ("cost_per_image_default", 0), ("webhook_max_attempts", 1),
                         ("webhook_lease_seconds", 0.1), ("webhook_timeout_s", 0.01), ("webhook_poll_seconds", 0.01),
                         ("webhook_base_backoff_s", 0.0), ("webhook_max_backoff_s", 0.0),
                         ("webhook_disable_after_consecutive_failures", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}")
        if "free" not in tiers:
            raise ValueError("tiers must define a 'free' tier")

    # Derived values ------------------------------------------------------------------------
    def per_image_cost(self, model: str, profile_cost: int | None) -> int:
        """Credits per image of `model`: `model_costs`, else the profile's, else the default."""
        if model in self.model_costs:
            return self.model_costs[model]
        return profile_cost if profile_cost is not None else self.cost_per_image_default

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{os.path.abspath(os.path.join(self.data_dir, 'avatar.db'))}"

    @property
    def resolved_assets_url(self) -> str:
        return self.assets_url or os.path.abspath(os.path.join(self.data_dir, "assets"))

    @property
    def resolved_heartbeat_seconds(self) -> float:
        return self.heartbeat_seconds or max(0.05, self.lease_seconds / 3)

    def all_policy_words(self) -> tuple[str, ...]:
        words = list(self.policy_words)
        if self.policy_words_file:
            with open(self.policy_words_file, encoding="utf-8") as fh:
                words += [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        return tuple(words)

    # Conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["tiers"] = {k: dataclasses.asdict(v) for k, v in self.tiers.items()}
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, *, env: bool = True) -> "ServiceSettings":
        """Environment (if `env`) overlaid with `data`; unknown keys are an error naming the key."""
        values: dict[str, Any] = dict(cls._env_values()) if env else {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in (data or {}).items():
            if key not in names:
                raise ValueError(f"unknown setting {key!r}")
            values[key] = value
        return cls(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServiceSettings":
        return cls.from_dict(overrides, env=True)

    @classmethod
    def _env_values(cls) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get("AVATAR_" + f.name.upper())
            if raw is None:
                continue
            out[f.name] = _parse_env(f.name, f.type, raw)
        return out

    def replace(self, **changes: Any) -> "ServiceSettings":
        return dataclasses.replace(self, **changes)


def _tier_from(value: Any, name: Any) -> TierLimits:
    if isinstance(value, Mapping):
        rpm = value.get("requests_per_minute", value.get("requestsPerMinute"))
        conc = value.get("concurrent_jobs", value.get("concurrentGenerations"))
        if rpm is None or conc is None:
            raise ValueError(f"tier {name!r} needs requests_per_minute and concurrent_jobs")
        return TierLimits(int(rpm), int(conc))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return TierLimits(int(value[0]), int(value[1]))
    raise ValueError(f"tier {name!r} must be a mapping or a [rpm, concurrent] pair")


def _parse_env(name: str, type_name: Any, raw: str) -> Any:
    t = str(type_name)
    try:
        if name in ("tiers", "model_costs"):
            return json.loads(raw)
        if t.startswith("bool"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if t.startswith("tuple"):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        return raw
    except ValueError as exc:
        raise ValueError(f"environment variable AVATAR_{name.upper()}: {exc}") from None
