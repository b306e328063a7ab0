"""Live preview frames for people watching a job: the engine's TAESD preview images, shrunk and
encoded off the engine's thread into small data: URLs the progress row carries to the event stream.

Bounded in size (at most `MAX_PREVIEW_SIDE` px, JPEG, under the store's `MAX_PREVIEW_DATA_URL`)
and in rate (a job's frames are re-encoded at most once per `min_interval_s`), so previews never
cost the GPU more than a thumbnail and never flood the store or the stream."""
from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

from ..store.jobs import MAX_PREVIEW_DATA_URL, MAX_PREVIEW_FRAMES

MAX_PREVIEW_SIDE = 128


def preview_data_url(image: Any, max_side: int = MAX_PREVIEW_SIDE) -> str | None:
    """A PIL image as a `data:image/jpeg;base64,…` URL at most `max_side` px on its longer side;
    None when even the lowest quality tried does not fit the store's bound."""
    thumb = image.convert("RGB")
    thumb.thumbnail((max_side, max_side))
    for quality in (75, 50, 30):
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=quality)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        if len(url) <= MAX_PREVIEW_DATA_URL:
            return url
    return None


class PreviewFrames:
    """The latest preview image of each (job, image index) of one engine call. `offer` runs on the
    engine's thread and only keeps a reference; `frames_due` (the progress writer's thread) encodes
    what changed, per job at most once per `min_interval_s`, and returns every job's current frames."""

    def __init__(self, job_ids: list[str], min_interval_s: float = 0.5):
        self.job_ids = list(job_ids)
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._pending: dict[str, dict[int, tuple[int, Any]]] = {}
        self._encoded: dict[str, dict[int, dict[str, Any]]] = {}
        self._encoded_at: dict[str, float] = {}

    def offer(self, request_index: int, image_index: int, step: int, image: Any) -> None:
        """The engine's `preview(request_index, image_index, step, image)`: request i is job i."""
        if not 0 <= request_index < len(self.job_ids) or not 0 <= image_index < MAX_PREVIEW_FRAMES:
            return
        with self._lock:
            self._pending.setdefault(self.job_ids[request_index], {})[image_index] = (int(step), image)

    def frames_due(self, now: float | None = None) -> tuple[bool, dict[str, list[dict[str, Any]]]]:
        """(whether any frame changed, {job_id: [{imageIndex, step, dataUrl}]}) for the store."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = {jid: frames for jid, frames in self._pending.items()
                   if now - self._encoded_at.get(jid, float("-inf")) >= self.min_interval_s}
            for jid in due:
                del self._pending[jid]
        changed = False
        for jid, frames in due.items():
            for index, (step, image) in frames.items():
                url = preview_data_url(image)
                if url is not None:
                    self._encoded.setdefault(jid, {})[index] = {"imageIndex": index, "step": step, "dataUrl": url}
                    changed = True
            self._encoded_at[jid] = now
        return changed, {jid: [f[i] for i in sorted(f)] for jid, f in self._encoded.items()}
