"""The built-in request kinds, one Task each: generate (and remix), percify, cast; plus the
identity services and typed reports percify and cast share. A new kind is a `Task` subclass
(runtime/scheduler.py) registered with `AvatarEngine.register_task`."""
from __future__ import annotations

from .cast import CastPlan, CastTask
from .generate import GenerateTask
from .identity import IdentityConditioning, IdentityServices, face_scorer
from .percify import PercifyTask
from .reports import CastReport, CharacterReport, IdentityReport

#: What every engine registers at construction (plug-ins add theirs with register_task).
BUILTIN_TASKS = (GenerateTask, PercifyTask, CastTask)

__all__ = ["BUILTIN_TASKS", "CastPlan", "CastReport", "CastTask", "CharacterReport", "GenerateTask",
           "IdentityConditioning", "IdentityReport", "IdentityServices", "PercifyTask", "face_scorer"]
