"""AvatarEngine: the facade. Loads each profile's pipeline once, keeps it warm, and runs many
requests in as few pipeline calls as possible (runtime/scheduler.py says how).

A request goes: `generate()` → its Task (tasks/, by `request.kind`) resolves and prepares it →
the scheduler groups work items into padded calls → the Task runs each call → the Task's
`finalize` attaches its typed report → the optional safety checker flags images.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import torch

from .config import EngineConfig, ModelProfile, default_profile_name, load_profiles, profile_aliases
from .errors import ProfileError, RequestValidationError
from .faces import face_analyzer_from_config
from .model.adapters import load_identity_adapter
from .model.styles import fuse_style_lora, read_style_loras, stack_style_loras
from .model.text import PromptEncoder
from .prompts import PromptBuilder
from .requests import GenerationRequest, GenerationResult
from .runtime.compile import compile_pipeline, scoped_inductor_config
from .runtime.compile_cache import cache_path, load_artifacts, save_artifacts
from .runtime.loading import load_pipeline
from .runtime.optimize import on, prepare_pipeline, resolve_dtype
from .runtime.scheduler import (LoadedModel, PreviewFn, ProgressFn, Task, WorkItem, batch_buckets, execute,
                                max_batch)
from .runtime.warmup import probe_memory, warm_up
from .tasks import BUILTIN_TASKS, IdentityServices

log = logging.getLogger(__name__)

__all__ = ["AvatarEngine", "LoadedModel", "Task", "WorkItem", "generate", "load_pipeline"]


class AvatarEngine:
    """Warm pipelines + batching scheduler. Not thread-safe per call; calls are serialised."""

    def __init__(self, config: EngineConfig | None = None, profiles: dict[str, ModelProfile] | None = None):
        self.config = config or EngineConfig()
        self.profiles = profiles if profiles is not None else load_profiles(self.config.profiles_path)
        self.default_model = self.config.default_model or self._default_name()
        if self.default_model not in self.profiles:
            raise self.unknown_profile(self.default_model)
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.RLock()
        self._tasks: dict[str, Task] = {}
        for task_cls in BUILTIN_TASKS:
            self.register_task(task_cls(self))
        self._face_analyzer = None
        self.identity = IdentityServices(self)  # face scorer + reference-photo cache of percify and cast

    @classmethod
    def from_config(cls, models_yaml_path: str | None = None, profile_names: Iterable[str] | None = None,
                    device: str | None = None, **config) -> "AvatarEngine":
        engine = cls(EngineConfig(device=device, profiles_path=models_yaml_path, **config))
        for name in profile_names or ():
            engine.load(name)
        return engine

    def _default_name(self) -> str:
        try:
            return default_profile_name(self.config.profiles_path)
        except OSError:
            return next(iter(self.profiles))

    def register_task(self, task: Task) -> None:
        """Add (or replace) the Task serving requests of kind `task.name` (plug-ins)."""
        self._tasks[task.name] = task

    @property
    def tasks(self) -> Mapping[str, Task]:
        """The registered tasks by request kind (read-only)."""
        return MappingProxyType(self._tasks)

    # ---- profiles and models -------------------------------------------------------------
    def unknown_profile(self, name: str) -> RequestValidationError:
        return RequestValidationError(f"unknown model {name!r}; known models: {', '.join(sorted(self.profiles))}",
                                      param="model")

    def profile(self, name: str | None) -> ModelProfile:
        """The profile called `name` or having it as an alias (models.yaml `aliases`)."""
        name = name or self.default_model
        if name not in self.profiles:
            target = profile_aliases(self.profiles).get(name)
            if target is None:
                raise self.unknown_profile(name)
            return self.profiles[target]
        return self.profiles[name]

    def load(self, name: str | None = None) -> LoadedModel:
        """Load (once), prepare, compile and warm up a profile's pipeline.

        Order matters: every module change (processors, fused projections, identity weights)
        happens before compiling, and warm-up runs every attention mode and batch bucket, so
        no request after load compiles anything."""
        profile = self.profile(name)
        with self._lock:
            if profile.name in self._models:
                return self._models[profile.name]
            t0 = time.perf_counter()
            dtype = resolve_dtype(profile, self.device)
            pipe = load_pipeline(profile, self.device, dtype)
            loras = read_style_loras(profile, pipe)  # every style LoRA file, read before modules change
            fused = fuse_style_lora(pipe, profile, loras)  # a merged LoRA goes in before fused projections / FP8
            prepare_pipeline(pipe, profile, self.device)
            builder = PromptBuilder([getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)],
                                    styles=profile.styles)
            model = LoadedModel(profile, pipe, self.device, dtype, builder,
                                prompts=PromptEncoder(pipe, profile.speed.prompt_cache))
            if profile.identity_method:
                # Every offered identity method is attached before compiling, so its graphs exist
                # from the start and warm-up covers it. The default must load; another method whose
                # files are missing is logged and loaded (or refused, naming the files) on first use.
                for method in profile.offered_identity_methods:
                    try:
                        load_identity_adapter(model, method, download=True)
                    except ProfileError as exc:
                        if method == profile.identity_method:
                            raise
                        log.warning("%s: identity method %s not loaded at load: %s", profile.name, method, exc.message)
            if fused is not None:
                model.styles = fused
            elif loras:
                model.styles = stack_style_loras(pipe, loras, self.device, dtype)
                model.prompts.text_adapters = model.styles.text_adapters
            if self.device.type == "cuda" and not (self.config.max_batch_size or profile.max_batch_size):
                model.memory = probe_memory(model, self._tasks)
            opts = profile.speed
            with scoped_inductor_config():  # the compiles' inductor settings end with them
                self._compile_and_warm_up(model)
            # Without a warm-up a compiled model must still compile on its first calls: the serving
            # stance (run eagerly rather than compile) applies only once the warm-up has compiled.
            model.warm = bool(opts.warmup) or not model.compiled
            model.refresh_applied()
            self._models[profile.name] = model  # only once warm: a failed warm-up is retried, not kept
            log.info("loaded %s (%s) in %.1fs: %s", profile.name, profile.source, time.perf_counter() - t0,
                     model.applied)
            return model

    def _compile_and_warm_up(self, model: LoadedModel) -> None:
        """Compile (loading saved artifacts first when a compile cache directory is set), pick
        the batch buckets, warm up every variant, then save the compiled artifacts."""
        profile, opts = model.profile, model.profile.speed
        cache_file, cache = None, {}
        if on(opts.compile, self.device):
            if self.config.compile_cache_dir:
                cache_file = cache_path(self.config.compile_cache_dir, profile, self.device, model.dtype)
                cache["load"] = load_artifacts(cache_file)
            compile_pipeline(model.pipe, opts, self.device)
            model.compiled = True
        if opts.batch_buckets if opts.batch_buckets is not None else model.compiled:
            model.buckets = batch_buckets(self.max_batch(model, *self._native_size(profile)))
        if opts.warmup:
            model.warmup = warm_up(model, self._tasks, self.config.max_batch_size)
            if cache_file is not None:
                cache["save"] = save_artifacts(cache_file)
        if cache:
            model.warmup["compileCache"] = cache

    @staticmethod
    def _native_size(profile: ModelProfile) -> tuple[int, int]:
        return profile.resolution, profile.resolution

    def loaded(self) -> list[str]:
        return list(self._models)

    def loaded_model(self, name: str | None = None) -> LoadedModel | None:
        """The loaded model of profile `name` (or alias; None: the default), or None when it is
        not loaded. For reading facts (`applied`, `warmup`, `memory`); calls go through generate()."""
        return self._models.get(self.profile(name).name)

    def describe_models(self) -> dict[str, dict]:
        """What runs per loaded profile: `applied` (kernels, compile, identity methods, ...) plus
        the warm-up report; what a service shows on its health endpoint."""
        return {name: {**model.applied, "warmup": dict(model.warmup)} for name, model in self._models.items()}

    # ---- faces (used by identity tasks) ----------------------------------------------------
    @property
    def face_analyzer(self):
        if self._face_analyzer is None:
            options = {}
            if self.config.face_backend == "insightface":
                options = {"model_root": self.config.face_model_root, "name": self.config.face_model_name}
            self._face_analyzer = face_analyzer_from_config(self.config.face_backend, **options)
        return self._face_analyzer

    # ---- generation -----------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        task = self._tasks.get(request.kind)
        if task is None:
            raise RequestValidationError(f"unsupported request kind {request.kind!r}", param="kind")
        return request.resolve(self.profile(request.model))

    def max_batch(self, model: LoadedModel, width: int, height: int, regional: bool = False) -> int:
        """Images per pipeline call for this model and size (scheduler.max_batch with the config's cap)."""
        return max_batch(model, width, height, regional, cap=self.config.max_batch_size)

    def generate(self, requests: Sequence[GenerationRequest] | GenerationRequest,
                 progress: ProgressFn | None = None, preview: PreviewFn | None = None) -> list[GenerationResult]:
        """Run requests (any mix of kinds and models); results come back in request order.
        `progress(done_steps, total_steps)` is called after every denoising step;
        `preview(request_index, image_index, step, image)` every `speed.preview_every` steps on
        profiles with `speed.preview: taesd`."""
        single = isinstance(requests, GenerationRequest)
        reqs = [requests] if single else list(requests)
        t_start = time.perf_counter()
        resolved = [self.resolve(r) for r in reqs]
        with self._lock:
            models = {r.model: self.load(r.model) for r in resolved}
            tasks = [self._tasks[r.kind] for r in resolved]
            prepared = [t.prepare(models[r.model], r) for t, r in zip(tasks, resolved)]
            items = [t.items(models[r.model], r, i, p) for i, (t, r, p) in enumerate(zip(tasks, resolved, prepared))]
            images, call_ms, call_sizes = execute(models, resolved, tasks, items, self.config.max_batch_size,
                                                  progress, preview)
            results = []
            for i, r in enumerate(resolved):
                res = GenerationResult(
                    request=r, images=images[i], seeds=r.image_seeds(),
                    timings={"generationMs": round(call_ms[i], 2),
                             "totalMs": round((time.perf_counter() - t_start) * 1000, 2)},
                    prompt_report=items[i][0].prompt.report(), extra={"batchImages": call_sizes[i]})
                tasks[i].finalize(models[r.model], res, prepared[i])
                if r.style_preset:
                    res.extra["style"] = self._style_report(models[r.model], r)
                self._safety_check(models[r.model], res)
                results.append(res)
        return results[0] if single else results

    @staticmethod
    def _style_report(model: LoadedModel, request: GenerationRequest) -> dict:
        """The style pack and LoRA an image was made with (the sidecar's and the API's `style`)."""
        pack = model.profile.styles[request.style_preset]
        state = model.styles
        lora = None
        if pack.lora is not None:
            fused = state is not None and state.fused == pack.name
            strength = 1.0 if request.style_strength is None else request.style_strength
            lora = {"name": pack.lora_name, "scale": round(pack.scale * (1.0 if fused else strength), 6),
                    "mode": "fused" if fused else "stacked"}
        return {"name": pack.name, "strength": request.style_strength, "lora": lora}

    def _safety_check(self, model: LoadedModel, result: GenerationResult) -> None:
        """Profiles may name an output checker "module:function(images) -> list[bool]"."""
        spec = model.profile.safety_checker
        if not spec:
            return
        module, _, fn = spec.partition(":")
        try:
            checker = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ProfileError(f"profile {model.profile.name!r}: safety_checker {spec!r} cannot be imported "
                               f"({type(exc).__name__}: {exc})", param="model") from exc
        flags = [bool(f) for f in checker(result.images)]
        result.extra["nsfw"] = flags


def generate(prompt: str, **kwargs) -> GenerationResult:
    """One-shot convenience for scripts: builds a default engine and runs one request."""
    engine = AvatarEngine()
    return engine.generate(GenerationRequest(prompt=prompt, **kwargs))
