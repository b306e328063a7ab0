"""Provenance of generated images: Content Credentials (C2PA manifests), an invisible watermark
derived from the avatar id, and verification of both. See `marking` for the order of the steps."""
from .credentials import (ContentCredentials, CredentialsError, GenerationClaims, ManifestReport, SigningConfig,
                          read_manifest, request_fingerprint)
from .marking import ImageMarker, ProvenanceConfig, ProvenanceReport, verify_image
from .watermark import decode_watermark, embed_watermark, watermark_payload

__all__ = ["ContentCredentials", "CredentialsError", "GenerationClaims", "ManifestReport", "SigningConfig",
           "read_manifest", "request_fingerprint", "ImageMarker", "ProvenanceConfig", "ProvenanceReport",
           "verify_image", "decode_watermark", "embed_watermark", "watermark_payload"]
