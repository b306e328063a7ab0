"""`avatar-engine models pull` and `avatar-engine doctor`: from a fresh machine to a servable
profile. In the command table after `models` (cli.COMMANDS): `pull` hangs under the existing
`models` command. Exit codes: 0 ready / done, 1 doctor found a profile not
ready, 2 an error (one line, printed by cli.main)."""
from __future__ import annotations

import argparse
import json

from ..config import default_profile_name, load_profiles
from ..runtime.doctor import GB, device_facts, diagnose
from ..errors import ProfileError
from ..runtime.hub import pull_item, pull_plan, manual_missing


def _methods(value: str | None) -> list[str] | None:
    return [m.strip() for m in value.split(",") if m.strip()] if value else None


def cmd_pull(args) -> int:
    from huggingface_hub.utils import enable_progress_bars
    from huggingface_hub.utils import tqdm as hf_tqdm

    profiles = load_profiles(args.models_file)
    if args.profile not in profiles:
        raise ProfileError(f"unknown profile {args.profile!r}; known: {', '.join(profiles)}", param="profile")
    plan = pull_plan(profiles[args.profile], _methods(args.identity_methods), face_model_root=args.face_model_root)
    if plan.empty:
        print(f"{args.profile}: nothing to download (built from config)")
        return 0
    if not args.quiet:  # cli.main silences hub bars (HF_HUB_DISABLE_PROGRESS_BARS) for every other command
        hf_tqdm.HF_HUB_DISABLE_PROGRESS_BARS = None
        enable_progress_bars()
    incomplete = 0
    for item in plan.hub:
        status = pull_item(item, cache_dir=args.cache_dir, token=args.token)
        print(f"{item.repo_id} ({', '.join(item.purposes)}): {status.state} in {status.snapshot}")
        print(f"  licence: {item.licence.describe()}")
        for path in status.files:
            print(f"  {path}")
    for path in plan.local:
        print(f"local: {path} (named in models.yaml; not downloaded)")
    for item in plan.manual:
        missing = manual_missing(item)
        state = "present" if not missing else f"MISSING {', '.join(missing)}"
        print(f"{item.name} ({item.purpose}): {state} in {item.folder}")
        print(f"  licence: {item.licence.describe()}")
        if missing:
            print(f"  {item.how}")
            incomplete += 1
    return 1 if incomplete else 0


def cmd_doctor(args) -> int:
    profiles = load_profiles(args.models_file)
    names = [n for arg in args.profile or [] for n in arg.split(",") if n] or list(profiles)
    unknown = [n for n in names if n not in profiles]
    if unknown:
        raise ProfileError(f"unknown profile(s) {', '.join(unknown)}; known: {', '.join(profiles)}", param="profile")
    device = device_facts()
    verdicts = [diagnose(profiles[n], device, batch=args.batch, face_backend=args.face_backend,
                         face_model_root=args.face_model_root, face_model_name=args.face_model_name,
                         face_scorer=args.face_scorer) for n in names]
    if args.json:
        print(json.dumps({"device": device.__dict__, "default": default_profile_name(args.models_file),
                          "ready": all(v.ready for v in verdicts),
                          "profiles": [v.to_dict() for v in verdicts]}, indent=2))
    else:
        where = (f"{device.name}, CUDA {device.driver}, {device.available_bytes / GB:.1f} of "
                 f"{device.total_bytes / GB:.1f} GB available") if device.cuda else "no CUDA GPU (CPU only)"
        print(f"device: {where}; face backend {args.face_backend}, scorer {args.face_scorer}")
        for v in verdicts:
            print(("ok   " if v.ready else "FAIL ") + v.line)
    return 0 if all(v.ready for v in verdicts) else 1


def _face_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--face-model-root", default="~/.insightface", help="insightface model root (models/<name>/*.onnx)")


def cmd_init(sub) -> None:
    models = sub.choices["models"]
    pull = models.add_subparsers(dest="models_command").add_parser(
        "pull", help="download what a profile needs from the Hugging Face hub (HF_HOME, HF_TOKEN honoured)")
    pull.add_argument("profile")
    pull.add_argument("--identity-methods", default=None, help="comma-separated (default: every method offered)")
    pull.add_argument("--models-file", default=None)
    pull.add_argument("--cache-dir", default=None, help="hub cache (default: HF_HUB_CACHE / HF_HOME/hub)")
    pull.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or `huggingface-cli login`)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _face_args(pull)
    pull.set_defaults(func=cmd_pull)

    d = sub.add_parser("doctor", help="can this machine serve each profile? (exit 0: all ready)")
    d.add_argument("--profile", action="append", help="profile(s) to check, repeatable or comma-separated (default: all)")
    d.add_argument("--batch", type=int, default=1, help="images per call the GPU must hold")
    d.add_argument("--models-file", default=None)
    d.add_argument("--face-backend", default="embedded", choices=("embedded", "insightface"))
    d.add_argument("--face-model-name", default="buffalo_l")
    d.add_argument("--face-scorer", default="auto", choices=("auto", "dlib", "arcface", "handcrafted"))
    d.add_argument("--json", action="store_true")
    _face_args(d)
    d.set_defaults(func=cmd_doctor)
