"""AvatarEngine: loads each profile's pipeline once, keeps it warm, and runs many requests in
as few pipeline calls as possible.

Scheduling: every request is resolved (defaults, seed, size), split into one work item per
image (own seed → own torch.Generator), grouped by what must be equal inside one pipeline
call (model, task, size, steps, guidance, task-specific conditioning), and packed into calls
of at most `max_batch` images. Since each image's initial noise comes from its own generator,
a request's images are the same whether it ran alone or packed with others.

Request kinds are handled by tasks (generate here; percify and cast register their own), so
conditioning code stays out of the scheduler.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .config import EngineConfig, ModelProfile, default_profile_name, load_profiles, profile_aliases
from .errors import ProfileError, RequestValidationError
from .prompts import BuiltPrompt, PromptBuilder
from .requests import GenerationRequest, GenerationResult
from .single_file import single_file_loader
from .speed import (batch_buckets, bucket_for, compile_pipeline, describe_pipeline, on, prepare_pipeline,
                    resolve_dtype, serving_stance, set_vae_slicing)

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, int, int, Any], None]  # (request index, image index, step, PIL image)
TASK_MODULES = ("avatar_engine.identity", "avatar_engine.cast")  # each defines TASKS = [Task subclasses]


@dataclass
class WorkItem:
    """One image to produce."""

    request_index: int
    image_index: int
    seed: int
    prompt: BuiltPrompt
    conditioning: Any = None  # task-specific (e.g. an identity embedding)


@dataclass
class LoadedModel:
    profile: ModelProfile
    pipe: Any
    device: torch.device
    dtype: torch.dtype
    prompt_builder: PromptBuilder
    applied: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # tasks keep per-model state here (adapters, img2img pipe)
    prompts: Any = None  # text.PromptEncoder (cached text-encoder outputs)
    compiled: bool = False
    warm: bool = False  # warm-up done: later calls never compile (speed.serving_stance)
    buckets: list = field(default_factory=list)  # padded call sizes when batch buckets are on
    memory: Any = None  # memory.MemoryProfile measured at load (CUDA)
    warmup: dict = field(default_factory=dict)  # seconds, calls and compiled graphs of the warm-up

    def refresh_applied(self) -> dict:
        """Read what runs back from the modules again (after an adapter is attached or released)."""
        self.applied = describe_pipeline(self)
        return self.applied

    def img2img(self):
        if "img2img" not in self.state:
            from diffusers import AutoPipelineForImage2Image

            self.state["img2img"] = AutoPipelineForImage2Image.from_pipe(self.pipe)
        return self.state["img2img"]


_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def _diffusers_version() -> tuple[int, int]:
    import diffusers

    return tuple(int(x) for x in diffusers.__version__.split(".")[:2])  # type: ignore[return-value]


def _pipeline_class(architecture: str):
    import diffusers

    return diffusers.StableDiffusionXLPipeline if architecture == "sdxl" else diffusers.StableDiffusionPipeline


def load_pipeline(profile: ModelProfile, device: torch.device, dtype: torch.dtype):
    """The profile's text-to-image pipeline on `device`. Real profiles load by local path or hub
    id; errors say exactly what to download and where to put it."""
    import diffusers

    cls = _pipeline_class(profile.architecture)
    if profile.random_weights:
        from .tiny import build_full_random_pipeline

        pipe = build_full_random_pipeline(profile.architecture, device).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    loader = cls.from_pretrained
    if profile.single_file:  # one checkpoint in the original SD layout, local configs (single_file.py)
        loader, source, kwargs = single_file_loader(profile, cls)
    elif profile.tiny:
        from .tiny import tiny_pipeline_dir

        source, kwargs = str(tiny_pipeline_dir(profile.architecture)), {}
    elif profile.local_path:
        if not os.path.isdir(profile.local_path):
            raise ProfileError(
                f"profile {profile.name!r}: local_path {profile.local_path!r} does not exist. Put a diffusers-format "
                f"model there (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. "
                f"`huggingface-cli download {profile.repo_id or '<repo>'} --local-dir {profile.local_path}`", param="model")
        source, kwargs = profile.local_path, {}
    else:
        source = profile.repo_id
        kwargs = {"revision": profile.revision, "variant": profile.variant}
    if profile.architecture == "sd15":
        kwargs["safety_checker"] = None  # output checking is the profile's `safety_checker` hook
    # diffusers >= 0.40 renamed torch_dtype to dtype.
    kwargs["dtype" if _diffusers_version() >= (0, 40) else "torch_dtype"] = dtype
    try:
        pipe = loader(source, **kwargs)
    except (OSError, ValueError) as exc:
        hint = (f"the hub is unreachable or the files are missing. Download them with "
                f"`huggingface-cli download {profile.repo_id}` (model_index.json and the unet, vae, text_encoder*, "
                f"tokenizer*, scheduler folders{', ' + profile.variant + ' variant' if profile.variant else ''}) into "
                f"the Hugging Face cache, or into a directory named by `local_path` in models.yaml")
        raise ProfileError(f"profile {profile.name!r}: could not load {source!r}: {hint}. ({type(exc).__name__}: {exc})",
                           param="model") from exc
    sched_name, sched_kwargs = _SCHEDULERS[profile.scheduler]
    pipe.scheduler = getattr(diffusers, sched_name).from_config(pipe.scheduler.config, **sched_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class Task:
    """How one request kind becomes pipeline calls. Subclasses override the hooks."""

    name = "generate"
    regional = False  # cast's calls carry several prompts per image (memory per image is higher)

    def __init__(self, engine: "AvatarEngine"):
        self.engine = engine

    def prepare(self, model: LoadedModel, request: GenerationRequest) -> Any:
        """Per-request conditioning computed once (e.g. face embeddings). Runs before batching."""
        return None

    def items(self, model: LoadedModel, request: GenerationRequest, index: int, prepared: Any) -> list[WorkItem]:
        built = model.prompt_builder.build(request.prompt, request.style_preset, request.negative_prompt)
        return [WorkItem(index, i, seed, built, prepared) for i, seed in enumerate(request.image_seeds())]

    def group_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys may share a pipeline call."""
        img2img = request.init_image is not None
        return (request.model, self.name, request.width, request.height, request.steps, request.guidance_scale,
                img2img, request.strength if img2img else None)

    def call_kwargs(self, model: LoadedModel, requests: Sequence[GenerationRequest], items: Sequence[WorkItem]) -> dict:
        """Extra pipeline kwargs for one call (conditioning)."""
        return {}

    def pipeline(self, model: LoadedModel, request: GenerationRequest):
        return model.img2img() if request.init_image is not None else model.pipe

    def run(self, model: LoadedModel, requests: Sequence[GenerationRequest], items: Sequence[WorkItem],
            callback: Callable | None) -> list:
        first = requests[items[0].request_index]
        pipe = self.pipeline(model, first)
        kwargs = dict(
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator(device="cpu").manual_seed(it.seed) for it in items],
            callback_on_step_end=callback,
            **model.prompts.pipeline_kwargs([it.prompt.prompt for it in items],
                                            [it.prompt.negative_prompt for it in items]),
        )
        if first.init_image is not None:
            kwargs["image"] = [requests[it.request_index].init_image.convert("RGB").resize((first.width, first.height))
                               for it in items]
            kwargs["strength"] = first.strength
        else:
            kwargs.update(height=first.height, width=first.width)
        kwargs.update(self.call_kwargs(model, requests, items))
        set_vae_slicing(pipe, len(items), model.profile.speed)
        return pipe(**kwargs).images

    def finalize(self, model: LoadedModel, result: GenerationResult, prepared: Any) -> None:
        """Add task-specific report fields to a finished result."""


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
        self.register_task(Task(self))
        self._register_builtin_tasks()
        self._face_analyzer = None

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

    def _register_builtin_tasks(self) -> None:
        # Imported here: those modules build on this one (Task, LoadedModel).
        for module in TASK_MODULES:
            for task_cls in importlib.import_module(module).TASKS:
                self.register_task(task_cls(self))

    def register_task(self, task: Task) -> None:
        self._tasks[task.name] = task

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
            prepare_pipeline(pipe, profile, self.device)
            from .text import PromptEncoder

            builder = PromptBuilder([getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)])
            model = LoadedModel(profile, pipe, self.device, dtype, builder,
                                prompts=PromptEncoder(pipe, profile.speed.prompt_cache))
            if profile.identity_method:
                from .adapters import identity_adapter

                # Every offered identity method is attached before compiling, so its graphs exist
                # from the start and warm-up covers it. The default must load; another method whose
                # files are missing is logged and loaded (or refused, naming the files) on first use.
                for method in profile.offered_identity_methods:
                    try:
                        identity_adapter(model, method)
                    except ProfileError as exc:
                        if method == profile.identity_method:
                            raise
                        log.warning("%s: identity method %s not loaded at load: %s", profile.name, method, exc.message)
            if self.device.type == "cuda" and not (self.config.max_batch_size or profile.max_batch_size):
                from .warmup import probe_memory

                model.memory = probe_memory(self, model)
            opts = profile.speed
            if on(opts.compile, self.device):
                compile_pipeline(pipe, opts, self.device)
                model.compiled = True
            if opts.batch_buckets if opts.batch_buckets is not None else model.compiled:
                model.buckets = batch_buckets(self.max_batch(model, *self._native_size(profile)))
            if opts.warmup:
                from .warmup import warm_up

                model.warmup = warm_up(self, model)
            # Without a warm-up a compiled model must still compile on its first calls: the serving
            # stance (run eagerly rather than compile) applies only once the warm-up has compiled.
            model.warm = bool(opts.warmup) or not model.compiled
            model.refresh_applied()
            self._models[profile.name] = model  # only once warm: a failed warm-up is retried, not kept
            log.info("loaded %s (%s) in %.1fs: %s", profile.name, profile.source, time.perf_counter() - t0,
                     model.applied)
            return model

    @staticmethod
    def _native_size(profile: ModelProfile) -> tuple[int, int]:
        return profile.resolution, profile.resolution

    def loaded(self) -> list[str]:
        return list(self._models)

    # ---- faces (used by identity tasks) ----------------------------------------------------
    @property
    def face_analyzer(self):
        if self._face_analyzer is None:
            from .faces import face_analyzer_from_config

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
        """Images per pipeline call: the config/profile cap, else (CUDA) what the memory probe
        at load says fits, rounded down to a batch bucket; 16 on CPU. Stable: computed from
        figures measured once, never from the allocator's state at call time."""
        cap = self.config.max_batch_size or model.profile.max_batch_size
        if cap:
            return cap
        if model.memory is None:
            return 16
        from .memory import images_that_fit, round_to_bucket

        return round_to_bucket(images_that_fit(model.memory, width * height, regional))

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
            images, call_ms, call_sizes = self._execute(models, resolved, tasks, items, progress, preview)
            results = []
            for i, r in enumerate(resolved):
                res = GenerationResult(
                    request=r, images=images[i], seeds=r.image_seeds(),
                    timings={"generationMs": round(call_ms[i], 2),
                             "totalMs": round((time.perf_counter() - t_start) * 1000, 2)},
                    prompt_report=items[i][0].prompt.report(), extra={"batchImages": call_sizes[i]})
                tasks[i].finalize(models[r.model], res, prepared[i])
                self._safety_check(models[r.model], res)
                results.append(res)
        return results[0] if single else results

    def _execute(self, models, resolved, tasks, items, progress: ProgressFn | None = None,
                 preview: PreviewFn | None = None):
        """Plan the calls, pad each to its batch bucket, run them; images per request."""
        from .stepcache import step_cache

        calls = self._plan(resolved, tasks, models, items)
        total_steps = sum(self._denoising_steps(resolved[chunk[0].request_index]) for chunk in calls)
        done = [0]

        def step_callback(model: LoadedModel, chunk: list[WorkItem]):
            every = model.profile.speed.preview_every
            decoder = self._preview_decoder(model) if preview else None

            def on_step(pipe, step, timestep, kwargs):
                done[0] += 1
                if progress:
                    progress(done[0], total_steps)
                if decoder is not None and (step + 1) % every == 0 and "latents" in kwargs:
                    from .preview import decode_previews

                    for it, img in zip(chunk, decode_previews(decoder, kwargs["latents"][:len(chunk)])):
                        preview(it.request_index, it.image_index, step + 1, img)
                return kwargs

            return on_step

        images: list[list] = [[None] * r.batch_size for r in resolved]
        call_ms = [0.0] * len(resolved)
        call_sizes: list[list[int]] = [[] for _ in resolved]
        for chunk in calls:
            first = resolved[chunk[0].request_index]
            model = models[first.model]
            padded = list(chunk)
            if model.buckets:  # padding rows repeat the last image; their outputs are dropped
                padded += [chunk[-1]] * (bucket_for(len(chunk), model.buckets[-1]) - len(chunk))
            t0 = time.perf_counter()
            with torch.inference_mode(), serving_stance(model), step_cache(model.pipe.unet):
                out = tasks[chunk[0].request_index].run(model, resolved, padded, step_callback(model, chunk))
            ms = (time.perf_counter() - t0) * 1000
            for it, img in zip(chunk, out):
                images[it.request_index][it.image_index] = img
            for ri in {it.request_index for it in chunk}:
                call_ms[ri] += ms
                call_sizes[ri].append(len(chunk))
        return images, call_ms, call_sizes

    def _plan(self, resolved, tasks, models, items) -> list[list[WorkItem]]:
        """Group compatible requests and pack their images into calls of at most max_batch."""
        groups: dict[tuple, list[int]] = {}
        for i, (t, r) in enumerate(zip(tasks, resolved)):
            groups.setdefault(t.group_key(r), []).append(i)
        calls = []
        for indices in groups.values():
            first = resolved[indices[0]]
            model = models[first.model]
            size = self.max_batch(model, first.width, first.height, regional=tasks[indices[0]].regional)
            if model.buckets:
                size = min(size, model.buckets[-1])
            flat = [it for i in indices for it in items[i]]
            calls += [flat[s:s + size] for s in range(0, len(flat), size)]
        return calls

    @staticmethod
    def _preview_decoder(model: LoadedModel):
        """The profile's preview decoder (loaded on first use); None when previews are off."""
        if model.profile.speed.preview == "none":
            return None
        if "preview_decoder" not in model.state:
            from .preview import load_preview_decoder

            model.state["preview_decoder"] = load_preview_decoder(model.profile, model.device, model.dtype)
        return model.state["preview_decoder"]

    @staticmethod
    def _denoising_steps(r: GenerationRequest) -> int:
        return max(1, int(r.steps * r.strength)) if r.init_image is not None else r.steps

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
