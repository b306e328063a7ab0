"""A profile's text-to-image pipeline, loaded by local path or hub id (or built: tiny and
random-weight profiles), with the profile's scheduler."""
from __future__ import annotations

import os

import diffusers
import torch

from ..config import SCHEDULERS, ModelProfile
from ..errors import ProfileError
from ..model.tiny import build_full_random_pipeline, tiny_pipeline_dir
from .single_file import single_file_loader


def _diffusers_version() -> tuple[int, int]:
    return tuple(int(x) for x in diffusers.__version__.split(".")[:2])  # type: ignore[return-value]


def _pipeline_class(architecture: str):
    return diffusers.StableDiffusionXLPipeline if architecture == "sdxl" else diffusers.StableDiffusionPipeline


def load_pipeline(profile: ModelProfile, device: torch.device, dtype: torch.dtype):
    """The profile's text-to-image pipeline on `device`. Real profiles load by local path or hub
    id; errors say exactly what to download and where to put it."""
    cls = _pipeline_class(profile.architecture)
    if profile.random_weights:
        pipe = build_full_random_pipeline(profile.architecture, device).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    loader = cls.from_pretrained
    if profile.single_file:  # one checkpoint in the original SD layout, local configs (single_file.py)
        loader, source, kwargs = single_file_loader(profile, cls)
    elif profile.tiny:
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
    sched_name, sched_kwargs = SCHEDULERS[profile.scheduler]
    pipe.scheduler = getattr(diffusers, sched_name).from_config(pipe.scheduler.config, **sched_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
