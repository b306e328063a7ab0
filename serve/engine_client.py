"""What the HTTP layer needs from the engine side, behind one small interface.

The ingress never runs a model: it needs the profile table (to validate `model`, compute credit
costs and resolve sizes/seeds at submit), a way to wake the worker after a submit, and the
worker's metrics. `LocalEngineClient` wraps an in-process engine + JobWorker (TestClient tests,
single-process use); `RayEngineClient` talks to the `AvatarModel` deployment through a
DeploymentHandle.
"""
from __future__ import annotations

import abc
import asyncio
import importlib
import inspect
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import avatar_engine
from avatar_engine.faces import face_analyzer_from_config
from avatar_engine.styles import BUILTIN_STYLES

from .face_settings import check_face_setup, engine_face_options
from .logctx import logger
from .settings import ServiceSettings
from .vocab import JOB_KINDS

log = logger("serve.engine_client")

ALL_KINDS = JOB_KINDS
#: What a profile without `styles` (a stand-in engine's) offers: the built-in template styles.
BUILTIN_STYLE_DESCRIPTIONS: tuple[dict, ...] = tuple(p.describe() for p in BUILTIN_STYLES.values())


@dataclass(frozen=True)
class StyleView:
    """One style as `GenerationRequest.resolve` reads it at submit (the recommended steps and
    guidance, whether it has a LoRA), built from its public description."""

    name: str
    steps: int | None = None
    guidance_scale: float | None = None
    lora: dict | None = None  # {name, scale}: the LoRA as GET /v1/models describes it

    @classmethod
    def of(cls, described: dict) -> "StyleView":
        return cls(name=described["name"], steps=described.get("steps"),
                   guidance_scale=described.get("guidanceScale"), lora=described.get("lora"))


@dataclass(frozen=True)
class ProfileInfo:
    """The parts of a model profile the ingress uses; also what `resolve()` reads."""

    name: str
    credit_cost: int | None = None
    resolution: int = 512
    size_multiple: int = 8
    steps: int = 25
    guidance_scale: float = 7.5
    kinds: tuple[str, ...] = ALL_KINDS
    identity_methods: tuple[str, ...] = ()  # what `identityMethod` may name, the default first
    engine: dict | None = None  # what runs, read back from the loaded model (kernels, compile, warm-up)
    aliases: tuple[str, ...] = ()  # other names clients may send as `model` (models.yaml `aliases`)
    face_min_size: int = 32  # reference faces smaller than this (px) are refused
    styles: tuple[dict, ...] = BUILTIN_STYLE_DESCRIPTIONS  # each style's `StylePack.describe()`, in order
    fuse_style: str | None = None  # the LoRA style merged into the weights (styleStrength fixed at 1)

    def style_names(self) -> list[str]:
        """What `stylePreset` may name on this profile, in order."""
        return [s["name"] for s in self.styles]

    def for_requests(self) -> Any:
        """This profile as `GenerationRequest.resolve` reads it (`styles` as {name: pack-like})."""
        return _RequestProfile(self, {s["name"]: StyleView.of(s) for s in self.styles})

    @classmethod
    def from_profile(cls, p: Any) -> "ProfileInfo":
        kinds = getattr(p, "supported_kinds", None) or getattr(p, "kinds", None)
        if kinds is None:
            kinds = ALL_KINDS
            if getattr(p, "supports_identity", None) is False:
                kinds = ("generate", "remix")
        cost = getattr(p, "credit_cost", None)
        return cls(name=p.name, credit_cost=None if cost is None else int(cost),
                   resolution=int(getattr(p, "resolution", 512)), size_multiple=int(getattr(p, "size_multiple", 8)),
                   steps=int(getattr(p, "steps", 25)), guidance_scale=float(getattr(p, "guidance_scale", 7.5)),
                   kinds=tuple(kinds), aliases=tuple(getattr(p, "aliases", None) or ()),
                   face_min_size=int(getattr(p, "face_min_size", 32)),
                   identity_methods=tuple(getattr(p, "offered_identity_methods", ()) or ()),
                   styles=_style_descriptions(p), fuse_style=getattr(p, "fuse_style", None))


class _RequestProfile:
    """A ProfileInfo whose `styles` is the mapping `resolve()` looks styles up in."""

    def __init__(self, info: ProfileInfo, styles: dict[str, StyleView]):
        self._info, self.styles = info, styles

    def __getattr__(self, name: str) -> Any:
        return getattr(self._info, name)


def _style_descriptions(p: Any) -> tuple[dict, ...]:
    """A profile's styles as their public descriptions (stand-ins without `styles`: the built-ins)."""
    styles = getattr(p, "styles", None)
    if styles is None:
        return BUILTIN_STYLE_DESCRIPTIONS
    return tuple(pack.describe() if hasattr(pack, "describe") else dict(pack) for pack in styles.values())


@dataclass(frozen=True)
class EngineDescription:
    default_model: str
    profiles: dict[str, ProfileInfo] = field(default_factory=dict)
    face: dict | None = None  # {"backend", "options"} of the engine's face analyzer (None: not known)

    def to_dict(self) -> dict[str, Any]:
        return {"default_model": self.default_model, "profiles": {k: asdict(v) for k, v in self.profiles.items()},
                "face": self.face}

    def resolve(self, name: str | None) -> ProfileInfo | None:
        """The served profile called `name` or having it as an alias (None: the default); None when unknown."""
        name = name or self.default_model
        if name in self.profiles:
            return self.profiles[name]
        return next((p for p in self.profiles.values() if name in p.aliases), None)

    def names(self) -> list[str]:
        """Every name a request may send as `model`: profiles and their aliases."""
        return sorted({*self.profiles, *(a for p in self.profiles.values() for a in p.aliases)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineDescription":
        profiles = {}
        for k, v in d["profiles"].items():
            v = dict(v)
            v["kinds"] = tuple(v.get("kinds", ALL_KINDS))
            v["aliases"] = tuple(v.get("aliases", ()))
            v["identity_methods"] = tuple(v.get("identity_methods", ()))
            v["styles"] = tuple(dict(s) for s in v.get("styles", BUILTIN_STYLE_DESCRIPTIONS))
            profiles[k] = ProfileInfo(**v)
        return cls(default_model=d["default_model"], profiles=profiles, face=d.get("face"))

    @classmethod
    def from_engine(cls, engine: Any, models: list[str] | None = None) -> "EngineDescription":
        """`models`: the profiles actually served (default: the engine's default model only,
        since models.yaml may list profiles whose weights this machine does not have)."""
        names = list(models) if models else [engine.default_model]
        profiles = {}
        for name in names:
            info = ProfileInfo.from_profile(engine.profiles[name])
            loaded = _loaded_model(engine, name)
            if loaded is not None:
                info = replace(info, engine={**loaded.applied, "warmup": dict(loaded.warmup)})
            profiles[name] = info
        default = engine.default_model if engine.default_model in profiles else names[0]
        return cls(default_model=default, profiles=profiles, face=face_config(engine))


def _loaded_model(engine: Any, name: str) -> Any:
    """The engine's loaded model `name` (what runs on it: `applied`, `warmup`), None if not loaded."""
    accessor = getattr(engine, "loaded_model", None)  # absent on stand-in engines (benchmarks, tests)
    return accessor(name) if accessor is not None else None


def face_config(engine: Any) -> dict | None:
    """How to build the same face analyzer as `engine` (the ingress checks photos with it)."""
    config = getattr(engine, "config", None)
    backend = getattr(config, "face_backend", None)
    if not backend:
        return None
    options = {}
    if backend == "insightface":
        options = {"model_root": config.face_model_root, "name": config.face_model_name}
    return {"backend": backend, "options": options, "scorer": getattr(config, "face_scorer", None)}


_ANALYZERS: dict[str, Any] = {}


def face_analyzer_for(face: dict) -> Any:
    """The process-wide analyzer for a description's `face` config (built once; detection is
    stateless, so one instance serves every request)."""
    key = json.dumps(face, sort_keys=True)
    if key not in _ANALYZERS:
        _ANALYZERS[key] = face_analyzer_from_config(face["backend"], **(face.get("options") or {}))
    return _ANALYZERS[key]


class EngineRunner:
    """The worker's side of an in-process engine: the one place (with `EngineDescription`) where
    serve touches the engine object. The engine is anything with `profiles`, `default_model`,
    `load(name)` and `generate(requests, progress=...)` (`AvatarEngine`, a benchmark stand-in)."""

    def __init__(self, engine: Any):
        self._engine = engine

    @classmethod
    def of(cls, engine: Any) -> "EngineRunner":
        return engine if isinstance(engine, cls) else cls(engine)

    @property
    def default_model(self) -> str:
        return self._engine.default_model

    @property
    def engine(self) -> Any:
        """The wrapped engine (what an in-process app is built with)."""
        return self._engine

    def load(self, name: str) -> None:
        """Load (and warm) a profile before jobs for it are claimed."""
        self._engine.load(name)

    def generate(self, requests: list[Any], progress: Callable[[int, int], None] | None = None,
                 preview: Callable[[int, int, int, Any], None] | None = None) -> list[Any]:
        """One batched engine call; `progress(done, total)` may raise to abort it;
        `preview(request_index, image_index, step, image)` gets the profile's preview images (an
        engine stand-in whose `generate` takes no `preview` simply sends none)."""
        if preview is not None and self._takes_preview():
            return self._engine.generate(requests, progress=progress, preview=preview)
        return self._engine.generate(requests, progress=progress)

    def _takes_preview(self) -> bool:
        try:
            params = inspect.signature(self._engine.generate).parameters
        except (TypeError, ValueError):
            return False
        return "preview" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def describe(self, models: list[str] | None = None) -> EngineDescription:
        return EngineDescription.from_engine(self._engine, models)


def build_engine(settings: ServiceSettings) -> EngineRunner:
    """The engine a model replica serves: `settings.engine_factory(**engine_args)` when set (a
    benchmark stand-in or a plug-in, logged loudly), else the models.yaml `AvatarEngine`."""
    if not settings.engine_factory:
        check_face_setup(settings)  # before any weights load: a misconfigured replica fails in a second
        return EngineRunner(avatar_engine.AvatarEngine.from_config(models_yaml_path=settings.models_yaml,
                                                     profile_names=settings.models or None, device=settings.device,
                                                     **engine_face_options(settings)))
    module_name, _, attr = settings.engine_factory.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"engine_factory {settings.engine_factory!r} cannot be imported: {exc}") from None
    log.warning("ENGINE FACTORY %s(%s): not the models.yaml engine", settings.engine_factory, settings.engine_args)
    return EngineRunner(factory(**settings.engine_args))


class EngineClient(abc.ABC):
    @abc.abstractmethod
    async def describe(self) -> EngineDescription:
        """Profiles and default model (may be cached)."""

    @abc.abstractmethod
    async def notify(self) -> None:
        """New jobs are queued: wake a worker. Best effort, never raises."""

    async def metrics_text(self) -> bytes:
        """Prometheus exposition of the worker side ("" when not available)."""
        return b""


class LocalEngineClient(EngineClient):
    """In-process engine and worker. With `worker=None` or `autorun=False`, `notify` does not
    run anything: tests then drive the worker with `worker.run_once()` for deterministic steps."""

    def __init__(self, engine: Any, worker: Any = None, *, autorun: bool = False, models: list[str] | None = None):
        self.engine = EngineRunner.of(engine)
        self.models = models if models is not None else getattr(worker, "served_models", None)
        self.worker = worker
        self.autorun = autorun
        self._desc: EngineDescription | None = None
        if worker is not None and autorun:
            worker.start()

    async def describe(self) -> EngineDescription:
        if self._desc is None:
            self._desc = self.engine.describe(self.models)
        return self._desc

    async def notify(self) -> None:
        if self.worker is not None and self.autorun:
            self.worker.wake()

    async def metrics_text(self) -> bytes:
        m = getattr(self.worker, "metrics", None)
        return m.exposition() if m is not None else b""


class RayEngineClient(EngineClient):
    """Talks to the `AvatarModel` deployment. `describe` is fetched once and cached."""

    def __init__(self, handle: Any):
        self.handle = handle
        self._desc: EngineDescription | None = None
        self._pending: set[Any] = set()

    async def describe(self) -> EngineDescription:
        if self._desc is None:
            self._desc = EngineDescription.from_dict(await self.handle.describe.remote())
        return self._desc

    async def notify(self) -> None:
        try:
            # Fire and forget, but keep a reference so the call is not garbage collected early.
            task = asyncio.ensure_future(self._nudge())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        except Exception:  # noqa: BLE001
            log.warning("nudge failed", exc_info=True)

    async def _nudge(self) -> None:
        try:
            await self.handle.nudge.remote()
        except Exception:  # noqa: BLE001 - the worker polls anyway
            log.warning("nudge failed", exc_info=True)

    async def metrics_text(self) -> bytes:
        try:
            return await self.handle.metrics_text.remote()
        except Exception:  # noqa: BLE001
            log.warning("cannot fetch worker metrics", exc_info=True)
            return b""
