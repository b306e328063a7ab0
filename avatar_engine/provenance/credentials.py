"""Content Credentials (C2PA) with c2pa-python: a signed manifest embedded in PNG/WebP bytes that
says the image was made by a trained model (`c2pa.created`, digitalSourceType
trainedAlgorithmicMedia), by which software and version, with which model profile and identity
method, and a SHA-256 of the request parameters.

Operators configure a certificate chain + key. Without one, a local signing chain (a small CA and
an ES256 leaf, made with `cryptography`) is generated once under `key_dir` and reported as
untrusted: c2pa refuses a self-signed end-entity certificate, and nobody outside trusts this CA.
Verification reads the manifest back, checks the signature and the hash of the image bytes, and
tells `valid` / `tampered` / `absent` apart; trust is a separate answer (configured anchors)."""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import cache_dir
from ..errors import AvatarEngineError

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_ASSERTION = "org.avatar-engine.generation"
SOFTWARE_NAME = "avatar-engine"
MIME_TYPES = {"png": "image/png", "webp": "image/webp"}
# Never in a manifest or its request hash: the user's photos (biometric data) and images.
PRIVATE_FIELDS = frozenset({"photos", "photo", "initImage", "identityEmbedding", "image", "images"})
# Prompt text goes in (in clear and in the hash) only when the avatar is public.
PROMPT_FIELDS = frozenset({"prompt", "negativePrompt"})
# Validation codes that do not mean the bytes or the signature are wrong.
_NOT_TAMPERING = ("signingCredential.untrusted", "signingCredential.ocsp", "timeStamp.")
LOCAL_CHAIN_ORG = "avatar-engine local signer (untrusted)"


class CredentialsError(AvatarEngineError):
    """Signing cannot work: c2pa-python missing, unreadable certificate or key, unsupported format."""

    code = "provenance_unavailable"


def software_version() -> str:
    """The installed avatar-engine version (the manifest's software agent)."""
    try:
        return importlib.metadata.version("avatar-engine")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class SigningConfig:
    """Where the signing identity comes from. `cert_path` (PEM chain, leaf first) and `key_path`
    (PEM private key) are an operator's own; leave both empty for the local untrusted chain kept in
    `key_dir`. `trust_anchors_path` (PEM roots) lets verification say `trusted`."""

    cert_path: str | None = None
    key_path: str | None = None
    key_dir: str | os.PathLike | None = None  # default: <avatar-engine cache>/c2pa
    algorithm: str = "es256"
    tsa_url: str | None = None
    trust_anchors_path: str | None = None
    embed_thumbnail: bool = False  # a C2PA thumbnail is a second copy of the image inside the file


@dataclass(frozen=True)
class GenerationClaims:
    """What the manifest asserts about one generated image (no photos, no prompt unless public)."""

    model_profile: str
    identity_method: str | None
    request_sha256: str
    software_version: str
    avatar_id: str | None = None
    prompt: str | None = None  # only for a public avatar

    def assertion(self) -> dict[str, Any]:
        data = {"modelProfile": self.model_profile, "identityMethod": self.identity_method,
                "requestSha256": self.request_sha256}
        if self.avatar_id is not None:
            data["avatarId"] = self.avatar_id
        if self.prompt is not None:
            data["prompt"] = self.prompt
        return data


def _without_private(value: Any, public: bool) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_private(v, public) for k, v in sorted(value.items())
                if k not in PRIVATE_FIELDS and (public or k not in PROMPT_FIELDS)}
    if isinstance(value, (list, tuple)):
        return [_without_private(v, public) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return type(value).__name__  # bytes, images, arrays: their presence, never their content


def request_fingerprint(params: Mapping[str, Any], *, public: bool = False) -> str:
    """SHA-256 (hex) of the canonical JSON of the request's wire parameters, leaving out photos,
    images and embeddings always and the prompt text unless the avatar is public (a hash of a short
    prompt could be reversed by guessing)."""
    canonical = json.dumps(_without_private(dict(params), public), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _c2pa():
    try:
        import c2pa
    except ImportError as exc:
        raise CredentialsError("c2pa-python is not installed (pip install 'c2pa-python>=0.38,<0.39')") from exc
    return c2pa


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, LOCAL_CHAIN_ORG)])


def ensure_local_chain(directory: Path) -> tuple[Path, Path]:
    """The local chain in `directory`, made once. Check-and-create holds an exclusive lock on
    `directory/.lock`: two workers (threads or processes) starting together would otherwise each
    write a key, and one would sign with a key that does not match the chain it reads."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    chain_path, key_path = directory / "chain.pem", directory / "signer.key"
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (chain_path.exists() and key_path.exists()):
                chain_path, key_path = create_local_chain(directory)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return chain_path, key_path


def create_local_chain(directory: Path) -> tuple[Path, Path]:
    """Make a local CA and an ES256 leaf (C2PA wants a CA-issued end-entity certificate with
    digitalSignature and an emailProtection EKU); write `chain.pem` (leaf, CA) and `signer.key`
    (0600), `ca.pem` separately for whoever wants to trust it. Returns (chain, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)

    def usage(sign: bool, ca: bool):
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("avatar-engine local CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(False, True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(_name("avatar-engine local signer")).issuer_name(ca_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True)
    key_path, chain_path = directory / "signer.key", directory / "chain.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    chain_path.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))  # written last: its presence means done
    return chain_path, key_path


def _check_chain(chain: bytes, path: Path) -> None:
    """A readable PEM chain at startup, not a failure at the first image (c2pa checks it only then)."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise CredentialsError(f"c2pa signing certificate {path} is not a PEM certificate chain: {exc}") from exc
    leaf = certs[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise CredentialsError(f"c2pa signing certificate {path} is not valid now "
                               f"({leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d})")


class ContentCredentials:
    """Signs and reads manifests. Build once per process (loading the chain and the c2pa signer
    costs a few ms); `sign` is then one call per image."""

    def __init__(self, config: SigningConfig | None = None):
        self.config = config or SigningConfig()
        c2pa = _c2pa()
        if bool(self.config.cert_path) != bool(self.config.key_path):
            raise CredentialsError("set both signing cert_path and key_path, or neither (local untrusted chain)")
        if self.config.cert_path:
            chain_path, key_path = Path(self.config.cert_path), Path(self.config.key_path)
            self.local_chain = False
        else:
            directory = Path(self.config.key_dir) if self.config.key_dir else cache_dir() / "c2pa"
            chain_path, key_path = ensure_local_chain(directory)
            self.local_chain = True
        try:
            self._chain, key = chain_path.read_bytes(), key_path.read_bytes()
        except OSError as exc:
            raise CredentialsError(f"cannot read signing certificate/key: {exc}") from exc
        _check_chain(self._chain, chain_path)
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
                alg=self.config.algorithm.encode(), sign_cert=self._chain, private_key=key,
                ta_url=self.config.tsa_url.encode() if self.config.tsa_url else None))
        except c2pa.C2paError as exc:
            raise CredentialsError(f"c2pa refused the signing certificate/key ({chain_path}): {exc}") from exc
        anchors = Path(self.config.trust_anchors_path).read_text() if self.config.trust_anchors_path else None
        self._sign_context = c2pa.Context.from_dict(
            {"builder": {"thumbnail": {"enabled": bool(self.config.embed_thumbnail)}}})
        self._trust_anchors = anchors

    def manifest(self, claims: GenerationClaims, title: str) -> dict[str, Any]:
        agent = {"name": SOFTWARE_NAME, "version": claims.software_version}
        return {
            "claim_generator_info": [agent],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                     "softwareAgent": agent}]}},
                {"label": GENERATION_ASSERTION, "data": claims.assertion()},
            ],
        }

    def sign(self, data: bytes, fmt: str, claims: GenerationClaims, title: str | None = None) -> bytes:
        """`data` (PNG or WebP bytes) with a signed manifest embedded; the manifest hashes these
        exact bytes, so any later pixel change (watermarking included) must come before."""
        c2pa = _c2pa()
        mime = MIME_TYPES.get(fmt.lower())
        if mime is None:
            raise CredentialsError(f"Content Credentials are embedded in png or webp, not {fmt!r}")
        builder = c2pa.Builder(self.manifest(claims, title or f"avatar.{fmt.lower()}"), context=self._sign_context)
        out = io.BytesIO()
        try:
            builder.sign(self._signer, mime, io.BytesIO(data), out)
        except c2pa.C2paError as exc:
            raise CredentialsError(f"signing failed: {exc}") from exc
        return out.getvalue()

    def read(self, data: bytes) -> "ManifestReport":
        return read_manifest(data, trust_anchors=self._trust_anchors)


@dataclass
class ManifestReport:
    """`state`: `valid` (signature and image hash check out), `tampered` (a manifest is there but
    the bytes or the signature do not match it), `absent`, or `unreadable` (not an image c2pa
    reads). `trusted`: the signer chains to a configured trust anchor."""

    state: str
    trusted: bool = False
    signer: str | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "trusted": self.trusted, "signer": self.signer, "actions": self.actions,
                "generation": self.generation, "failures": self.failures}


def read_manifest(data: bytes, *, trust_anchors: str | None = None) -> ManifestReport:
    """Read and validate the active manifest embedded in `data`."""
    c2pa = _c2pa()
    context = None
    if trust_anchors:
        context = c2pa.Context.from_dict({"trust": {"trust_anchors": trust_anchors},
                                          "verify": {"verify_trust": True}})
    try:
        reader = c2pa.Reader.try_create(io.BytesIO(data), context=context) if context else \
            c2pa.Reader.try_create(io.BytesIO(data))
    except c2pa.C2paError as exc:
        return ManifestReport("unreadable", failures=[f"{type(exc).__name__}: {exc}"])
    if reader is None:
        return ManifestReport("absent")
    with reader:
        store = json.loads(reader.json())
        results = reader.get_validation_results() or {}
    active = store.get("manifests", {}).get(store.get("active_manifest", ""), {})
    failures = [f["code"] for f in (results.get("activeManifest") or {}).get("failure", [])]
    tampered = [code for code in failures if not code.startswith(_NOT_TAMPERING)]
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    signature = active.get("signature_info") or {}
    return ManifestReport(state="tampered" if tampered else "valid",
                          trusted=not failures and store.get("validation_state") == "Trusted",
                          signer=signature.get("common_name") or signature.get("issuer"),
                          actions=actions, generation=assertions.get(GENERATION_ASSERTION) or {},
                          failures=failures)
