"""Community checkpoints: one `.safetensors` / `.ckpt` file in the original Stable Diffusion
(LDM) layout, loaded through diffusers' `from_single_file` (profile key `single_file:`).

The weights are in the file; the pipeline's configs and tokenizers are not. diffusers would
fetch them from the hub at load, so `single_file_config:` names them: a local folder in diffusers
layout (model_index.json, */config.json, tokenizer files; weights not needed) or a hub repo id
whose config files `avatar-engine models pull` put in the hub cache. Either way the load reads
local files only (`config=<local dir>`, `local_files_only=True`); no `original_config` yaml is
needed once a diffusers config folder is given.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ..config import ModelProfile
from ..errors import ProfileError
from .hub import cached_snapshot, looks_local


def single_file_config_dir(profile: ModelProfile) -> str:
    """The local diffusers config folder for `profile.single_file` (never a hub call)."""
    ref = profile.single_file_config
    if looks_local(ref):
        folder = os.path.expanduser(ref)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ProfileError(f"profile {profile.name!r}: single_file_config {ref!r} is not a diffusers config folder "
                               f"(no model_index.json)", param="model")
        return folder
    snapshot = cached_snapshot(ref, profile.revision)
    if snapshot is None or not (snapshot / "model_index.json").is_file():
        raise ProfileError(f"profile {profile.name!r}: the configs of {ref!r} are not in the hub cache; run "
                           f"`avatar-engine models pull {profile.name}` (configs and tokenizers only)", param="model")
    return str(snapshot)


def single_file_loader(profile: ModelProfile, pipeline_cls) -> tuple[Callable[..., Any], str, dict]:
    """(loader, source, kwargs) for engine.load_pipeline: `pipeline_cls.from_single_file` on the
    checkpoint with a local config folder."""
    path = os.path.expanduser(profile.single_file)
    if not os.path.isfile(path):
        raise ProfileError(f"profile {profile.name!r}: single_file {profile.single_file!r} does not exist; put the "
                           f"checkpoint (.safetensors in the original Stable Diffusion layout) there", param="model")
    return pipeline_cls.from_single_file, path, {"config": single_file_config_dir(profile), "local_files_only": True}
