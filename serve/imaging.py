"""Image safety and provenance as the service runs them, built from `ServiceSettings`: the
classifier and policy applied to every generated image (worker) and reference photo (ingress),
and the marker (watermark + signed C2PA manifest) applied to every stored image. The checker and
the marker are built once per process and configuration (loading the model or the signing chain
costs far more than one image); no HTTP types here."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from avatar_engine.provenance import ImageMarker, ProvenanceConfig, ProvenanceReport, SigningConfig, verify_image
from avatar_engine.safety import (ImageSafety, SafetyOutcome, SafetyPolicy, SafetyVerdict, apply_policy,
                                  check_reference_photos, load_image_safety)

from .settings import ServiceSettings


@functools.lru_cache(maxsize=4)
def _checker(spec: str, threshold: float, source: str | None) -> ImageSafety | None:
    return load_image_safety(spec, threshold=threshold, source=source)


def image_safety(settings: ServiceSettings) -> ImageSafety | None:
    """The configured classifier (None when `safety_checker` is `none`)."""
    return _checker(settings.safety_checker, settings.safety_threshold, settings.safety_checker_source)


def safety_policy(settings: ServiceSettings) -> SafetyPolicy:
    return SafetyPolicy(action=settings.safety_action, threshold=settings.safety_threshold)


def check_outputs(settings: ServiceSettings, images: Sequence[Image.Image]) -> SafetyOutcome | None:
    """The policy applied to one job's images; None when checking is off."""
    checker = image_safety(settings)
    return apply_policy(images, checker, safety_policy(settings)) if checker is not None else None


def check_photos(settings: ServiceSettings, photos: Sequence[Image.Image]) -> list[SafetyVerdict]:
    """Raises `ContentPolicyError` (param `photos[i]`) for a refused reference photo."""
    checker = image_safety(settings) if settings.safety_check_photos else None
    if checker is None or not photos:
        return []
    return check_reference_photos(photos, checker, safety_policy(settings))


@functools.lru_cache(maxsize=4)
def _marker(credentials: bool, watermark: bool, key_dir: str, cert: str | None, key: str | None,
            anchors: str | None) -> ImageMarker:
    signing = SigningConfig(cert_path=cert, key_path=key, key_dir=key_dir, trust_anchors_path=anchors)
    return ImageMarker(ProvenanceConfig(content_credentials=credentials, watermark=watermark, signing=signing))


def image_marker(settings: ServiceSettings) -> ImageMarker | None:
    """The deployment's marker; None when both marks are off. The embedded default signs with a
    local (untrusted) chain created once under `<data_dir>/c2pa`."""
    if not (settings.provenance_credentials or settings.provenance_watermark):
        return None
    return _marker(settings.provenance_credentials, settings.provenance_watermark,
                   os.path.abspath(os.path.join(settings.data_dir, "c2pa")), settings.provenance_cert_path,
                   settings.provenance_key_path, settings.provenance_trust_anchors_path)


class JobMarker:
    """Marks the images of one job: `(image, fmt, **save_kwargs) -> bytes`, the manifest carrying
    the model profile, identity method and SHA-256 of the stored wire params (the prompt only
    for a public avatar)."""

    def __init__(self, marker: ImageMarker, avatar_id: str, *, model: str, identity_method: str | None,
                 params: Mapping[str, Any], public: bool, png_encoder: Callable[..., bytes] | None = None):
        self.marker, self.avatar_id, self.png_encoder = marker, avatar_id, png_encoder
        self.claims = marker.claims(model_profile=model, identity_method=identity_method, request_params=params,
                                    avatar_id=avatar_id, public=public)

    def __call__(self, image: Image.Image, fmt: str, **save_kwargs: Any) -> bytes:
        """`png_encoder(image, compress_level) -> bytes` encodes PNGs (the stored images' encoder)."""
        encode = None
        if fmt.lower() == "png" and self.png_encoder is not None:
            level = int(save_kwargs.get("compress_level", 6))
            encode = lambda im: self.png_encoder(im, level)  # noqa: E731
        return self.marker.mark(image, avatar_id=self.avatar_id, claims=self.claims, fmt=fmt, encode=encode,
                                **save_kwargs)


def verify_stored(settings: ServiceSettings, data: bytes) -> ProvenanceReport:
    """What a stored image says about its origin, under this deployment's key and trust anchors."""
    marker = image_marker(settings)
    key = marker.config.watermark_key if marker is not None else ProvenanceConfig().watermark_key
    anchors = settings.provenance_trust_anchors_path
    pem = open(anchors, encoding="utf-8").read() if anchors else None
    return verify_image(data, watermark_key=key, trust_anchors=pem)
