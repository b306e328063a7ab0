"""The scheduler: how requests become as few pipeline calls as possible.

Every request is resolved (defaults, seed, size), split by its Task into one work item per
image (own seed → own torch.Generator), grouped by what must be equal inside one pipeline
call (model, task, size, steps, guidance, task-specific conditioning), and packed into calls
of at most `max_batch` images, each padded to its batch bucket. Since each image's initial
noise comes from its own generator, a request's images are the same whether it ran alone or
packed with others.

`Task` is the hook set a request kind implements (tasks/ holds the built-in ones); its
defaults are the plain text-to-image / img2img call.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import ModelProfile
from ..model.preview import decode_previews, load_preview_decoder
from ..model.attention import conditioning
from ..model.stepcache import step_cache
from ..model.styles import select, style_row
from ..prompts import BuiltPrompt, PromptBuilder
from ..requests import GenerationRequest, GenerationResult
from .compile import serving_stance
from .memory import images_that_fit, round_to_bucket
from .optimize import set_vae_slicing
from .report import describe_pipeline

ProgressFn = Callable[[int, int], None]
PreviewFn = Callable[[int, int, int, Any], None]  # (request index, image index, step, PIL image)
CPU_MAX_BATCH = 16  # images per call on CPU (no memory probe)


@dataclass
class WorkItem:
    """One image to produce."""

    request_index: int
    image_index: int
    seed: int
    prompt: BuiltPrompt
    conditioning: Any = None  # task-specific (e.g. an identity embedding)
    style: tuple = (0, 0.0)  # (style LoRA adapter, scale), set by execute() before the call


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
    warm: bool = False  # warm-up done: later calls never compile (compile.serving_stance)
    buckets: list = field(default_factory=list)  # padded call sizes when batch buckets are on
    memory: Any = None  # memory.MemoryProfile measured at load (CUDA)
    warmup: dict = field(default_factory=dict)  # seconds, calls and compiled graphs of the warm-up
    styles: Any = None  # model.styles.StyleState: resident style LoRAs (None: no LoRA style)

    def refresh_applied(self) -> dict:
        """Read what runs back from the modules again (after an adapter is attached or released)."""
        self.applied = describe_pipeline(self)
        return self.applied

    def img2img(self):
        if "img2img" not in self.state:
            from diffusers import AutoPipelineForImage2Image  # its import pulls every pipeline class: only when used

            self.state["img2img"] = AutoPipelineForImage2Image.from_pipe(self.pipe)
        return self.state["img2img"]


class Task:
    """How one request kind becomes pipeline calls. Subclasses override the hooks."""

    name = "generate"
    regional = False  # cast's calls carry several prompts per image (memory per image is higher)

    def __init__(self, engine):
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
                                            [it.prompt.negative_prompt for it in items], [it.style for it in items]),
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


def batch_buckets(max_batch: int) -> list[int]:
    """Padded call sizes: powers of two up to max_batch, and max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def bucket_for(n: int, max_batch: int) -> int:
    return next(b for b in batch_buckets(max(max_batch, n)) if b >= n)


def uses_cfg(model: LoadedModel, guidance_scale: float) -> bool:
    """The pipeline's own rule for classifier-free guidance (it decides the batch layout):
    guidance above 1, and a UNet without guidance embedding (LCM-style distilled models)."""
    return guidance_scale > 1 and getattr(model.pipe.unet.config, "time_cond_proj_dim", None) is None


def denoising_steps(r: GenerationRequest) -> int:
    return max(1, int(r.steps * r.strength)) if r.init_image is not None else r.steps


def max_batch(model: LoadedModel, width: int, height: int, regional: bool = False, cap: int | None = None) -> int:
    """Images per pipeline call: `cap` (config) or the profile's cap, else (CUDA) what the memory
    probe at load says fits, rounded down to a batch bucket; 16 on CPU. Stable: computed from
    figures measured once, never from the allocator's state at call time."""
    cap = cap or model.profile.max_batch_size
    if cap:
        return cap
    if model.memory is None:
        return CPU_MAX_BATCH
    return round_to_bucket(images_that_fit(model.memory, width * height, regional))


def plan_calls(resolved: Sequence[GenerationRequest], tasks: Sequence[Task], models: Mapping[str, LoadedModel],
               items: Sequence[list[WorkItem]], cap: int | None = None) -> list[list[WorkItem]]:
    """Group compatible requests and pack their images into calls of at most max_batch."""
    groups: dict[tuple, list[int]] = {}
    for i, (t, r) in enumerate(zip(tasks, resolved)):
        groups.setdefault(t.group_key(r), []).append(i)
    calls = []
    for indices in groups.values():
        first = resolved[indices[0]]
        model = models[first.model]
        size = max_batch(model, first.width, first.height, regional=tasks[indices[0]].regional, cap=cap)
        if model.buckets:
            size = min(size, model.buckets[-1])
        flat = [it for i in indices for it in items[i]]
        calls += [flat[s:s + size] for s in range(0, len(flat), size)]
    return calls


def preview_decoder(model: LoadedModel):
    """The profile's preview decoder (loaded on first use); None when previews are off."""
    if model.profile.speed.preview == "none":
        return None
    if "preview_decoder" not in model.state:
        model.state["preview_decoder"] = load_preview_decoder(model.profile, model.device, model.dtype)
    return model.state["preview_decoder"]


@contextlib.contextmanager
def styled_call(model: LoadedModel, items: Sequence[WorkItem], first: GenerationRequest):
    """Each image's style LoRA for the UNet call (both halves under classifier-free guidance)."""
    cond = conditioning(model.pipe.unet)
    if model.styles is not None:
        select(cond, [it.style for it in items], 2 if uses_cfg(model, first.guidance_scale) else 1, model.device,
               model.dtype)
    try:
        yield
    finally:
        cond.reset()


def execute(models: Mapping[str, LoadedModel], resolved: Sequence[GenerationRequest], tasks: Sequence[Task],
            items: Sequence[list[WorkItem]], cap: int | None = None, progress: ProgressFn | None = None,
            preview: PreviewFn | None = None) -> tuple[list[list], list[float], list[list[int]]]:
    """Plan the calls, pad each to its batch bucket, run them. Returns per request its images,
    milliseconds spent in its calls, and the sizes of those calls. Callers hold the engine lock."""
    calls = plan_calls(resolved, tasks, models, items, cap)
    total_steps = sum(denoising_steps(resolved[chunk[0].request_index]) for chunk in calls)
    done = [0]

    def step_callback(model: LoadedModel, chunk: list[WorkItem]):
        every = model.profile.speed.preview_every
        decoder = preview_decoder(model) if preview else None

        def on_step(pipe, step, timestep, kwargs):
            done[0] += 1
            if progress:
                progress(done[0], total_steps)
            if decoder is not None and (step + 1) % every == 0 and "latents" in kwargs:
                for it, img in zip(chunk, decode_previews(decoder, kwargs["latents"][:len(chunk)])):
                    preview(it.request_index, it.image_index, step + 1, img)
            return kwargs

        return on_step

    for request_items in items:
        for it in request_items:
            r = resolved[it.request_index]
            it.style = style_row(models[r.model].styles, models[r.model].profile, r.style_preset, r.style_strength)
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
        with torch.inference_mode(), serving_stance(model), step_cache(model.pipe.unet), styled_call(model, padded, first):
            out = tasks[chunk[0].request_index].run(model, resolved, padded, step_callback(model, chunk))
        ms = (time.perf_counter() - t0) * 1000
        for it, img in zip(chunk, out):
            images[it.request_index][it.image_index] = img
        for ri in {it.request_index for it in chunk}:
            call_ms[ri] += ms
            call_sizes[ri].append(len(chunk))
    return images, call_ms, call_sizes
