"""The service's face settings: which backend embeds faces, where its models live, what scores
identity, and the start-time refusal of a backend that cannot condition the served weights.

Until these existed the deployment built its engine with the embedded backend whatever it
served, so real FaceID / Plus v2 / InstantID weights (trained on ArcFace embeddings) silently lost
the person's likeness through the API while the CLI (`--face-backend insightface`) worked.
`engine_client.build_engine(settings)` runs the check before any weights
load, so a misconfigured replica fails in a second with one line, not after minutes of loading.
"""
from __future__ import annotations

from typing import Any

from avatar_engine.config import default_profile_name, load_profiles, profile_aliases
from avatar_engine.faces.compat import arcface_mismatch, produces_arcface

from .logctx import logger
from .settings import ServiceSettings

log = logger("serve.face_settings")


class FaceSetupError(ValueError):
    """The configured face backend cannot serve the configured profiles (one line)."""


def engine_face_options(settings: ServiceSettings) -> dict[str, Any]:
    """EngineConfig keyword arguments carrying the service's face settings."""
    return {"face_backend": settings.face_backend, "face_model_root": settings.face_model_root,
            "face_model_name": settings.face_model_name, "face_scorer": settings.face_scorer}


def served_profile_names(settings: ServiceSettings) -> list[str]:
    """Profile names (aliases resolved) the deployment will load: `models`, else the default."""
    profiles = load_profiles(settings.models_yaml)
    names = list(settings.models) if settings.models else [default_profile_name(settings.models_yaml)]
    aliases = profile_aliases(profiles)
    return [aliases.get(n, n) for n in names]


def check_face_setup(settings: ServiceSettings, names: list[str] | None = None) -> list[str]:
    """Refuse (FaceSetupError) a served profile whose trained identity weights need ArcFace
    embeddings the configured backend does not produce, unless `face_allow_non_arcface` is set.
    Returns the profiles served under that override (logged; /v1/health reports the override)."""
    profiles = load_profiles(settings.models_yaml)
    names = served_profile_names(settings) if names is None else names
    overridden = []
    for name in names:
        if name not in profiles:
            continue  # the engine names unknown profiles itself
        problem = arcface_mismatch(profiles[name], settings.face_backend)
        if problem is None:
            continue
        if not settings.face_allow_non_arcface:
            raise FaceSetupError(f"{problem} (AVATAR_FACE_ALLOW_NON_ARCFACE=true)")
        overridden.append(name)
    if overridden:
        log.warning("face_allow_non_arcface: serving %s with the %r backend, which does not produce ArcFace "
                    "embeddings; identity likeness will suffer", ", ".join(overridden), settings.face_backend)
    return overridden


def face_report(face: dict | None, settings: ServiceSettings) -> dict | None:
    """What /v1/health says about faces, from the engine's own face config (`face_config`) and
    the service's override. The model root's path is not reported (the route needs no auth)."""
    if not face:
        return None
    backend = face.get("backend")
    options = face.get("options") or {}
    arcface = produces_arcface(backend)
    return {"backend": backend, "model_name": options.get("name"), "scorer": face.get("scorer"),
            "arcface_embeddings": arcface,
            "non_arcface_override": bool(settings.face_allow_non_arcface) and not arcface}
