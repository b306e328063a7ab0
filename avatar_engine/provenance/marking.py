"""Marking an output image and verifying one: watermark the pixels first, encode, then sign (the
manifest hashes the final bytes, so nothing may touch them after signing).

Wiring: build one `ImageMarker` per process; per image call
`marker.mark(image, avatar_id=..., claims=marker.claims(...))` and store the returned bytes;
anyone verifies with `verify_image(data, avatar_id=...)`."""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from .credentials import (ContentCredentials, GenerationClaims, ManifestReport, SigningConfig, read_manifest,
                          request_fingerprint, software_version)
from .watermark import (DEFAULT_KEY, WatermarkUnavailable, can_watermark, decode_watermark, embed_watermark,
                        payload_matches, watermark_payload)


@dataclass
class ProvenanceConfig:
    """Each mark is switchable per deployment; both are on by default."""

    content_credentials: bool = True
    watermark: bool = True
    watermark_key: bytes = DEFAULT_KEY  # a secret key makes payloads checkable only by the operator
    signing: SigningConfig = field(default_factory=SigningConfig)


class ImageMarker:
    """Watermarks and signs output images under one configuration."""

    def __init__(self, config: ProvenanceConfig | None = None):
        self.config = config or ProvenanceConfig()
        self.credentials = ContentCredentials(self.config.signing) if self.config.content_credentials else None

    @property
    def trusted_signer(self) -> bool:
        """False on the embedded local chain: verifiers outside this deployment do not trust it."""
        return self.credentials is not None and not self.credentials.local_chain

    def claims(self, *, model_profile: str, identity_method: str | None, request_params: Mapping[str, Any],
               avatar_id: str | None = None, public: bool = False) -> GenerationClaims:
        """The manifest's generation assertion; the prompt goes in only for a public avatar."""
        prompt = request_params.get("prompt") if public else None
        return GenerationClaims(model_profile=model_profile, identity_method=identity_method,
                                request_sha256=request_fingerprint(request_params, public=public),
                                software_version=software_version(), avatar_id=avatar_id, prompt=prompt)

    def mark(self, image: Image.Image, *, avatar_id: str, claims: GenerationClaims, fmt: str = "png",
             encode: Callable[[Image.Image], bytes] | None = None, **save_kwargs) -> bytes:
        """Encoded `fmt` bytes of `image`, watermarked (when at least 256² pixels) and signed.
        `encode(image) -> bytes` encodes the watermarked image (the service's libpng encoder, half
        Pillow's CPU for PNG); else PIL with `save_kwargs` (e.g. `quality=85` for a WebP thumbnail)."""
        if self.config.watermark and can_watermark(image):
            image = embed_watermark(image, watermark_payload(avatar_id, self.config.watermark_key))
        if encode is not None:
            data = encode(image)
        else:
            buf = io.BytesIO()
            image.save(buf, format=fmt.upper(), **save_kwargs)
            data = buf.getvalue()
        if self.credentials is not None:
            data = self.credentials.sign(data, fmt, claims)
        return data


@functools.lru_cache(maxsize=1)
def default_marker() -> ImageMarker:
    """The embedded default (local untrusted chain in the cache dir), built once per process."""
    return ImageMarker()


@dataclass
class ProvenanceReport:
    """What an image says about where it came from. `watermark`: `present` (tag found, payload
    read), `absent`, `too_small` (under 256² pixels: never marked) or `unavailable` (no decoder)."""

    manifest: ManifestReport
    watermark: str
    watermark_payload: bytes | None
    watermark_key: bytes = DEFAULT_KEY

    def matches(self, avatar_id: str) -> bool:
        """The image carries this avatar's mark: its watermark payload, or a valid manifest naming it."""
        return bool(self.matched_by(avatar_id))

    def matched_by(self, avatar_id: str) -> list[str]:
        """Which marks name this avatar: `watermark`, `manifest`, both or neither."""
        by = ["watermark"] if payload_matches(self.watermark_payload, avatar_id, self.watermark_key) else []
        if self.manifest.state == "valid" and self.manifest.generation.get("avatarId") == avatar_id:
            by.append("manifest")
        return by

    def to_json(self, avatar_id: str | None = None) -> dict[str, Any]:
        out = {"manifest": self.manifest.to_json(), "watermark": {
            "state": self.watermark,
            "payload": self.watermark_payload.hex() if self.watermark_payload is not None else None}}
        if avatar_id is not None:
            out["avatarId"] = avatar_id
            out["matchedBy"] = self.matched_by(avatar_id)
            out["matches"] = bool(out["matchedBy"])
        return out


def verify_image(data: bytes, *, watermark_key: bytes = DEFAULT_KEY,
                 trust_anchors: str | None = None) -> ProvenanceReport:
    """Read the manifest (valid / tampered / absent) and the watermark of encoded image bytes.
    Raises ImageError for bytes that are not an image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__})", param="image") from exc
    manifest = read_manifest(data, trust_anchors=trust_anchors)
    if not can_watermark(image):
        state, payload = "too_small", None
    else:
        try:
            payload = decode_watermark(image)
            state = "present" if payload is not None else "absent"
        except WatermarkUnavailable:
            state, payload = "unavailable", None
    return ProvenanceReport(manifest, state, payload, watermark_key)
