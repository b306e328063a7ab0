"""Content Credentials, the invisible watermark and verification: what a marked image carries,
that one changed pixel byte reads as tampered, and that the library's writer marks by default."""
from __future__ import annotations

import io
import json
import stat
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from avatar_engine.cli import main as cli_main
from avatar_engine.errors import ImageError
from avatar_engine.io import save_result
from avatar_engine.provenance import (ContentCredentials, CredentialsError, ImageMarker, ProvenanceConfig,
                                      SigningConfig, decode_watermark, embed_watermark, read_manifest,
                                      request_fingerprint, verify_image, watermark_payload)
from avatar_engine.provenance.credentials import TRAINED_ALGORITHMIC_MEDIA, software_version
from avatar_engine.provenance.watermark import bit_errors
from avatar_engine.requests import GenerationRequest, GenerationResult


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("c2pa")


@pytest.fixture(scope="module")
def marker(key_dir):
    return ImageMarker(ProvenanceConfig(signing=SigningConfig(key_dir=key_dir)))


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return Image.fromarray(data.astronaut())  # 512², a real photo


PARAMS = {"kind": "percify", "prompt": "portrait of me on the moon", "negativePrompt": "blurry", "seed": 7,
          "steps": 20, "model": "tiny-sd15", "photos": [b"\xff\xd8face-bytes"], "identityMethod": "faceid"}


def _claims(marker, avatar_id="av_123", public=False):
    return marker.claims(model_profile="tiny-sd15", identity_method="faceid", request_params=PARAMS,
                         avatar_id=avatar_id, public=public)


def _png_chunks(data: bytes):
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        yield pos, data[pos + 4:pos + 8], length
        pos += 12 + length


def _change_one_pixel_byte(png: bytes) -> bytes:
    """Decompress the PNG's image data, change one pixel byte (row 100, not a scanline's filter
    byte), recompress into one IDAT with a valid CRC, keep every other chunk (the manifest
    included): still a well-formed PNG."""
    chunks = list(_png_chunks(png))
    (width,) = struct.unpack(">I", png[16:20])
    idat = b"".join(png[p + 8:p + 8 + n] for p, t, n in chunks if t == b"IDAT")
    raw = bytearray(zlib.decompress(idat))
    raw[100 * (1 + 3 * width) + 1 + 300] ^= 0x01  # RGB, 8 bits: 1 filter byte + 3 bytes per pixel per row
    body = zlib.compress(bytes(raw))
    new_idat = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    out, placed = [png[:8]], False
    for p, t, n in chunks:
        if t == b"IDAT":
            if not placed:
                out.append(new_idat)
                placed = True
            continue
        out.append(png[p:p + 12 + n])
    return b"".join(out)


def test_marked_png_carries_a_valid_manifest_and_the_avatars_watermark(marker, astronaut):
    data = marker.mark(astronaut, avatar_id="av_123", claims=_claims(marker))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    report = verify_image(data)
    m = report.manifest
    assert m.state == "valid" and m.trusted is False and m.failures == ["signingCredential.untrusted"]
    assert m.actions[0]["action"] == "c2pa.created"
    assert m.actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert m.actions[0]["softwareAgent"] == {"name": "avatar-engine", "version": software_version()}
    assert m.generation == {"modelProfile": "tiny-sd15", "identityMethod": "faceid", "avatarId": "av_123",
                            "requestSha256": request_fingerprint(PARAMS)}
    assert "prompt" not in m.generation  # private avatar: no prompt text
    assert report.watermark == "present"
    assert report.matches("av_123") and report.matched_by("av_123") == ["watermark", "manifest"]
    assert not report.matches("av_124")
    assert report.to_json("av_124")["matches"] is False


def test_the_services_png_encoder_writes_the_marked_pixels_and_they_verify(marker, astronaut):
    """The service encodes marked PNGs with its libpng encoder (half Pillow's CPU): the bytes it
    returns are what gets signed, the pixels are the watermarked image's, and both marks verify."""
    from serve.assets import encode_png
    from serve.imaging import JobMarker

    job = JobMarker(marker, "av_123", model="tiny-sd15", identity_method="faceid", params=PARAMS, public=False,
                    png_encoder=encode_png)
    data = job(astronaut, "png", compress_level=1)
    report = verify_image(data)
    assert report.manifest.state == "valid" and report.matched_by("av_123") == ["watermark", "manifest"]
    plain = marker.mark(astronaut, avatar_id="av_123", claims=job.claims, compress_level=1)  # Pillow's encoder
    decoded = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in (data, plain)]
    assert np.array_equal(decoded[0], decoded[1])  # the same watermarked pixels, another encoder
    seen = []
    marker.mark(astronaut, avatar_id="av_123", claims=job.claims, encode=lambda im: seen.append(im.size) or encode_png(im, 1))
    assert seen == [(512, 512)]


def test_one_changed_pixel_byte_reads_as_tampered(marker, astronaut, tmp_path, capsys):
    data = marker.mark(astronaut, avatar_id="av_123", claims=_claims(marker))
    tampered = _change_one_pixel_byte(data)
    assert Image.open(io.BytesIO(tampered)).size == astronaut.size  # still a readable PNG
    report = verify_image(tampered)
    assert report.manifest.state == "tampered"
    assert "assertion.dataHash.mismatch" in report.manifest.failures
    path = tmp_path / "tampered.png"
    path.write_bytes(tampered)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["verify", str(path)])
    assert exit_.value.code == 1
    assert "manifest: tampered" in capsys.readouterr().out


def test_webp_gets_a_manifest_too(marker, astronaut):
    data = marker.mark(astronaut.resize((128, 128)), avatar_id="av_9", claims=_claims(marker, "av_9"), fmt="webp", quality=85)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    report = verify_image(data)
    assert report.manifest.state == "valid" and report.manifest.generation["avatarId"] == "av_9"
    assert report.watermark == "too_small"  # 128² is under DWT-DCT's 256² minimum: signed, not watermarked


def test_unmarked_image_reports_absent(astronaut):
    buf = io.BytesIO()
    astronaut.save(buf, format="PNG")
    report = verify_image(buf.getvalue())
    assert report.manifest.state == "absent" and report.watermark == "absent"
    assert not report.matches("av_123")


def test_not_an_image_is_a_named_error(tmp_path, capsys):
    with pytest.raises(ImageError) as err:
        verify_image(b"definitely not an image")
    assert err.value.param == "image"
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    assert cli_main(["verify", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error (image): not a readable image")


def test_public_avatar_puts_the_prompt_in_and_photos_never(marker):
    private, public = request_fingerprint(PARAMS), request_fingerprint(PARAMS, public=True)
    assert private != public
    # Private: the prompt text does not change the hash; photos never do; parameters do.
    assert request_fingerprint({**PARAMS, "prompt": "something else"}) == private
    assert request_fingerprint({**PARAMS, "photos": [b"other"]}, public=True) == public
    assert request_fingerprint({**PARAMS, "seed": 8}) != private
    nested = {"kind": "cast", "characters": [{"prompt": "a", "photos": [b"x"], "box": [0, 0, 1, 1]}]}
    assert request_fingerprint(nested) == request_fingerprint(
        {"kind": "cast", "characters": [{"prompt": "b", "photos": [b"y"], "box": [0, 0, 1, 1]}]})
    assert _claims(marker, public=True).assertion()["prompt"] == PARAMS["prompt"]


def test_local_chain_is_made_once_with_a_private_key(key_dir, marker):
    key = key_dir / "signer.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    chain = (key_dir / "chain.pem").read_bytes()
    assert chain.count(b"BEGIN CERTIFICATE") == 2  # leaf + local CA
    again = ContentCredentials(SigningConfig(key_dir=key_dir))
    assert (key_dir / "chain.pem").read_bytes() == chain and again.local_chain
    assert not marker.trusted_signer


def test_configured_trust_anchor_makes_the_signer_trusted(key_dir, marker, astronaut):
    data = marker.mark(astronaut.resize((64, 64)), avatar_id="a", claims=_claims(marker))
    anchors = (key_dir / "ca.pem").read_text()
    report = read_manifest(data, trust_anchors=anchors)
    assert report.state == "valid" and report.trusted and report.failures == []


def test_operator_certificate_is_used_and_bad_ones_are_named(key_dir, tmp_path, astronaut):
    own = ContentCredentials(SigningConfig(cert_path=str(key_dir / "chain.pem"), key_path=str(key_dir / "signer.key")))
    assert not own.local_chain
    with pytest.raises(CredentialsError, match="both"):
        ContentCredentials(SigningConfig(cert_path=str(key_dir / "chain.pem")))
    with pytest.raises(CredentialsError, match="cannot read"):
        ContentCredentials(SigningConfig(cert_path=str(tmp_path / "missing.pem"), key_path=str(tmp_path / "k")))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(CredentialsError, match="not a PEM certificate chain"):
        ContentCredentials(SigningConfig(cert_path=str(tmp_path / "junk.pem"), key_path=str(key_dir / "signer.key")))
    with pytest.raises(CredentialsError, match="png or webp"):
        own.sign(b"...", "gif", ImageMarker.claims(None, model_profile="m", identity_method=None, request_params={}))


def test_watermark_payload_is_derived_from_the_avatar_id(astronaut):
    p = watermark_payload("av_1")
    assert len(p) == 6 and p == watermark_payload("av_1") and p != watermark_payload("av_2")
    assert watermark_payload("av_1", key=b"operator-secret") != p
    marked = embed_watermark(astronaut, p)
    assert marked.size == astronaut.size
    diff = np.abs(np.asarray(marked, dtype=np.int16) - np.asarray(astronaut, dtype=np.int16))
    assert diff.mean() < 2.0  # invisible: about one grey level on average
    decoded = decode_watermark(marked)
    assert decoded is not None and bit_errors(decoded, p) <= 4
    assert decode_watermark(astronaut) is None
    with pytest.raises(ValueError, match="too small"):
        embed_watermark(astronaut.resize((128, 128)), p)


def test_switches_turn_each_mark_off(key_dir, astronaut):
    only_manifest = ImageMarker(ProvenanceConfig(watermark=False, signing=SigningConfig(key_dir=key_dir)))
    report = verify_image(only_manifest.mark(astronaut, avatar_id="a", claims=_claims(only_manifest)))
    assert report.manifest.state == "valid" and report.watermark == "absent"
    only_watermark = ImageMarker(ProvenanceConfig(content_credentials=False))
    report = verify_image(only_watermark.mark(astronaut, avatar_id="a", claims=_claims(only_manifest)))
    assert report.manifest.state == "absent" and report.matches("a")


def test_save_result_marks_pngs_by_default_and_opts_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(60, 200, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
    request = GenerationRequest(prompt="secret prompt", seed=5, model="tiny-sd15", width=256, height=256)
    result = GenerationResult(request=request, images=images, seeds=[5, 6])
    paths = save_result(result, tmp_path / "marked", "avatar-x")
    meta = json.loads((tmp_path / "marked" / "avatar-x.json").read_text())
    assert meta["provenance"]["contentCredentials"] and meta["provenance"]["trustedSigner"] is False
    for i, path in enumerate(paths):
        report = verify_image(path.read_bytes())
        assert report.manifest.state == "valid" and report.manifest.generation["modelProfile"] == "tiny-sd15"
        assert report.matched_by(f"avatar-x_{i}") == ["watermark", "manifest"]
        assert "secret prompt" not in json.dumps(report.to_json())
    assert cli_main(["verify", str(paths[0]), "--avatar-id", "avatar-x_0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["matches"] is True and out["manifest"]["state"] == "valid"
    plain = save_result(result, tmp_path / "plain", "avatar-x", mark=False)
    report = verify_image(plain[0].read_bytes())
    assert report.manifest.state == "absent" and report.watermark == "absent"
    assert "provenance" not in json.loads((tmp_path / "plain" / "avatar-x.json").read_text())
