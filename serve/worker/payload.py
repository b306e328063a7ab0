"""A generation result → the JSON payload stored on the completed job (`complete_job`), which
`api/rendering` turns into the Avatar's images, timings, identity and characters."""
from __future__ import annotations

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
    # The engine's typed identity/cast report serialises itself (one `to_json` for worker, API and CLI).
    engine_report = result.report.to_json() if getattr(result, "report", None) is not None else {}
    for key in ("identity", "characters"):
        if key in engine_report:
            payload[key] = engine_report[key]
    return payload


def engine_nsfw_flags(result: Any) -> list[Any]:
    """Per-image flags of the engine's own safety checker (empty when it has none)."""
    return (getattr(result, "extra", None) or {}).get("nsfw") or []

