"""`avatar-engine` command line: generate, batch, models (percify and cast register their own
subcommands from their modules). Errors print one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import AvatarEngineError
from .requests import ASPECT_RATIOS, STYLE_PRESETS, GenerationRequest

SUBCOMMAND_MODULES = ("avatar_engine.identity", "avatar_engine.cast", "avatar_engine.setup_commands")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every generating subcommand."""
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--style", choices=STYLE_PRESETS, default=None, help="style preset")
    p.add_argument("--aspect-ratio", choices=ASPECT_RATIOS, default="1:1")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="random when absent; always written to the sidecar")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default=None, help="profile name from models.yaml (see `avatar-engine models`)")
    p.add_argument("-o", "--output", default="out", help="output directory")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-file", default=None, help="models.yaml to use")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-batch-size", type=int, default=None, help="images per pipeline call")
    p.add_argument("--face-backend", default="embedded", choices=("embedded", "insightface"))
    p.add_argument("--face-model-root", default=None, help="insightface model root (with models/<name>/*.onnx)")
    p.add_argument("--face-scorer", default="auto", choices=("auto", "dlib", "arcface", "handcrafted"),
                   help="what scores identity (auto: dlib's face descriptor when installed)")


def generation_kwargs(args) -> dict:
    return dict(negative_prompt=args.negative_prompt, style_preset=args.style, aspect_ratio=args.aspect_ratio,
                guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size, steps=args.steps,
                model=args.model)


def make_engine(args):
    from .config import EngineConfig
    from .engine import AvatarEngine

    return AvatarEngine(EngineConfig(device=args.device, profiles_path=args.models_file,
                                     max_batch_size=args.max_batch_size, face_backend=args.face_backend,
                                     face_model_root=args.face_model_root,
                                     face_scorer=getattr(args, "face_scorer", "auto")))


def write_outputs(result, out_dir: str, prefix: str) -> None:
    from .io import save_result

    stem = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{result.seed}"
    paths = save_result(result, out_dir, stem)
    for p in paths:
        print(p)
    print(Path(out_dir) / f"{stem}.json")


def cmd_generate(args) -> None:
    engine = make_engine(args)
    req = GenerationRequest(prompt=args.prompt, **generation_kwargs(args))
    write_outputs(engine.generate(req), args.output, "avatar")


def cmd_models(args) -> None:
    from .config import default_profile_name, load_profiles

    profiles = load_profiles(args.models_file)
    default = default_profile_name(args.models_file)
    if args.json:
        print(json.dumps({n: {"architecture": p.architecture, "source": p.source, "resolution": p.resolution,
                              "steps": p.steps, "guidanceScale": p.guidance_scale, "creditCost": p.credit_cost,
                              "default": n == default} for n, p in profiles.items()}, indent=2))
        return
    for name, p in profiles.items():
        mark = "*" if name == default else " "
        print(f"{mark} {name:12s} {p.architecture:5s} {p.resolution:5d}px {p.steps:3d} steps  "
              f"cfg {p.guidance_scale:<4g} cost {p.credit_cost}  {p.source}")


def cmd_batch(args) -> None:
    from .batch import generate_batch

    summary = generate_batch(make_engine(args), args.jsonl, args.output, chunk_size=args.chunk_size,
                             show_progress=not args.quiet)
    print(f"{summary.generated} generated, {summary.skipped} already done, {summary.total} total → {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-engine", description="Generate AI avatars with diffusers.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="prompt → PNG avatars + JSON sidecar")
    g.add_argument("prompt")
    add_generation_args(g)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list model profiles")
    m.add_argument("--models-file", default=None)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("batch", help="JSONL of requests → PNGs; re-running skips finished ones")
    b.add_argument("jsonl")
    b.add_argument("-o", "--output", default="out")
    b.add_argument("--chunk-size", type=int, default=16, help="requests handed to the engine at once")
    b.add_argument("-q", "--quiet", action="store_true")
    add_engine_args(b)
    b.set_defaults(func=cmd_batch)

    for module in SUBCOMMAND_MODULES:  # percify and cast add their own subcommands
        importlib.import_module(module).add_cli(sub)
    return parser


def _quiet_libraries() -> None:
    """Loading bars from diffusers/transformers would bury the CLI's own output and errors."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args)  # commands that report a state (doctor, models pull) return an exit code
    except AvatarEngineError as exc:
        where = f" ({exc.param})" if getattr(exc, "param", None) else ""
        print(f"error{where}: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable photo/JSONL/output dir: one line, not a traceback
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"error: {detail}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
