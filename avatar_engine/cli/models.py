"""`avatar-engine models`: the profiles of models.yaml."""
from __future__ import annotations

import json

from ..config import default_profile_name, load_profiles


def cmd_models(args) -> None:
    profiles = load_profiles(args.models_file)
    default = default_profile_name(args.models_file)
    if args.json:
        print(json.dumps({n: {"architecture": p.architecture, "source": p.source, "resolution": p.resolution,
                              "steps": p.steps, "guidanceScale": p.guidance_scale, "creditCost": p.credit_cost,
                              "default": n == default, "styles": [s.describe() for s in p.styles.values()],
                              "fuseStyle": p.fuse_style} for n, p in profiles.items()}, indent=2))
        return
    for name, p in profiles.items():
        mark = "*" if name == default else " "
        print(f"{mark} {name:12s} {p.architecture:5s} {p.resolution:5d}px {p.steps:3d} steps  "
              f"cfg {p.guidance_scale:<4g} cost {p.credit_cost}  {p.source}")
        loras = [f"{s.name} (LoRA {s.lora_name})" for s in p.lora_styles]
        if loras:
            print(f"  {'':12s} styles with LoRA: {', '.join(loras)}{' [fused]' if p.fuse_style else ''}")


def cmd_init(sub) -> None:
    m = sub.add_parser("models", help="list model profiles")
    m.add_argument("--models-file", default=None)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
