"""Plain text-to-image (and img2img, for remix): the scheduler's default call, as a task."""
from __future__ import annotations

from ..runtime.scheduler import Task


class GenerateTask(Task):
    """Prompt → images in one pipeline call per batch; `init_image` switches to img2img. Every
    hook is `Task`'s default; percify builds on it (its calls are these calls plus identity)."""

    name = "generate"
