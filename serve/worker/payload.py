"""A generation result → the JSON payload stored on the completed job (`complete_job`), which
`api/rendering` turns into the Avatar's images, timings, identity and characters."""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from avatar_engine.safety import SAFE, UNSAFE, ImageSafety, SafetyOutcome, SafetyVerdict, apply_policy

from ..imaging import image_safety, safety_policy
from ..policy import PolicyChecker
from ..settings import ServiceSettings


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
    style = (getattr(result, "extra", None) or {}).get("style")
    if isinstance(style, dict):  # the engine's style report: {name, strength, lora: {name, scale, mode} | None}
        payload["style"] = style
    return payload


def engine_nsfw_flags(result: Any) -> list[Any]:
    """Per-image flags of the engine's own safety checker (empty when it has none)."""
    return (getattr(result, "extra", None) or {}).get("nsfw") or []


class CombinedSafety:
    """The deployment's classifier (`serve.imaging`), with the flags of the engine's own checker
    and of the legacy `PolicyChecker(output_checker=...)` hook folded in as certain verdicts
    (score 1.0): one verdict per image, so one policy decides what happens to every image."""

    name = "combined"

    def __init__(self, checker: ImageSafety | None, extra_flags: dict[str, list[bool]]):
        self.checker, self.extra_flags = checker, extra_flags

    def check(self, images: Sequence[Image.Image]) -> list[SafetyVerdict]:
        verdicts = self.checker.check(images) if self.checker is not None else \
            [SafetyVerdict(0.0, SAFE, "none") for _ in images]
        for source, flags in self.extra_flags.items():
            for i, flagged in enumerate(flags[:len(verdicts)]):
                if flagged:
                    verdicts[i] = SafetyVerdict(1.0, UNSAFE, source)
        return verdicts


def safety_outcome(result: Any, images: list[Image.Image], settings: ServiceSettings,
                   policy: PolicyChecker | None) -> SafetyOutcome | None:
    """The safety policy applied to a job's images; None when nothing checks them."""
    flags = {"engine": [bool(f) for f in engine_nsfw_flags(result)]}
    if policy is not None and policy.output_checker is not None:
        flags["output-hook"] = policy.check_images(images)
    checker = image_safety(settings)
    if checker is None and not any(any(f) for f in flags.values()):
        return None
    return apply_policy(images, CombinedSafety(checker, flags), safety_policy(settings))


def refund_for(credit_cost: int, blocked: int, total: int) -> int:
    """The blocked images' share of the job's credits (rounded down: never more than reserved)."""
    return credit_cost * blocked // total if total else 0

