"""`avatar-engine verify <image>`: the manifest (valid / tampered / absent), the watermark payload,
and whether the image belongs to an avatar. Exit status 1 when the manifest is tampered."""
from __future__ import annotations

import json
from pathlib import Path

from ..provenance.marking import verify_image
from ..provenance.watermark import DEFAULT_KEY


def cmd_verify(args) -> None:
    data = Path(args.image).read_bytes()
    key = Path(args.watermark_key_file).read_bytes().strip() if args.watermark_key_file else DEFAULT_KEY
    anchors = Path(args.trust_anchors).read_text() if args.trust_anchors else None
    report = verify_image(data, watermark_key=key, trust_anchors=anchors)
    out = report.to_json(args.avatar_id)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        m = report.manifest
        trust = "trusted" if m.trusted else "untrusted signer"
        print(f"manifest: {m.state}" + (f" ({trust}: {m.signer})" if m.state in ("valid", "tampered") else ""))
        for action in m.actions:
            print(f"  action: {action.get('action')} {action.get('digitalSourceType', '')}".rstrip())
        if m.generation:
            print("  generation: " + ", ".join(f"{k}={v}" for k, v in m.generation.items()))
        tampering = [f for f in m.failures if f != "signingCredential.untrusted"]
        if tampering:
            print("  failures: " + ", ".join(tampering))
        print(f"watermark: {out['watermark']['state']}"
              + (f" (payload {out['watermark']['payload']})" if out["watermark"]["payload"] else ""))
        if args.avatar_id is not None:
            print(f"matches {args.avatar_id}: {'yes (' + ', '.join(out['matchedBy']) + ')' if out['matches'] else 'no'}")
    if report.manifest.state == "tampered":
        raise SystemExit(1)


def cmd_init(sub) -> None:
    p = sub.add_parser("verify", help="check an image's Content Credentials and watermark")
    p.add_argument("image", help="PNG, WebP or JPEG file")
    p.add_argument("--avatar-id", default=None, help="also say whether the image carries this avatar's marks")
    p.add_argument("--trust-anchors", default=None, help="PEM file of trusted root certificates")
    p.add_argument("--watermark-key-file", default=None, help="the deployment's watermark key (default: public key)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
