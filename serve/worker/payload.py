"""A generation result → the JSON payload stored on the completed job (`complete_job`), which
`api/rendering` turns into the Avatar's images, timings, identity and characters."""
from __future__ import annotations

import json
from typing import Any


def result_payload(job_id: str, result: Any, stored: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    """`stored`: the uploaded images ({key, width, height, seed}); `elapsed`: the engine call's seconds."""
    res = result.request
    payload: dict[str, Any] = {
        "images": stored,
        "thumbnailKey": f"avatars/{job_id}/thumbnail.webp" if stored else None,
        "generationMs": int(round(elapsed * 1000)),
        "engineTimings": {k: float(v) for k, v in (result.timings or {}).items() if isinstance(v, (int, float))},
        "seed": getattr(res, "seed", None),
        "width": getattr(res, "width", None),
        "height": getattr(res, "height", None),
        "steps": getattr(res, "steps", None),
        "guidanceScale": getattr(res, "guidance_scale", None),
        "model": getattr(res, "model", None),
    }
    extra = dict(getattr(result, "extra", {}) or {})
    for key in ("identity", "characters"):
        if key in extra:
            payload[key] = jsonable(extra[key])
    return payload


def engine_nsfw_flags(result: Any) -> list[Any]:
    """Per-image flags of the engine's own safety checker (empty when it has none)."""
    return (getattr(result, "extra", None) or {}).get("nsfw") or []


def jsonable(value: Any) -> Any:
    """The engine's report objects (identity, characters) as plain JSON values."""
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        if hasattr(value, "tolist"):
            return value.tolist()
        if hasattr(value, "__dict__"):
            return jsonable(vars(value))
        return str(value)
