"""Flags and helpers every generating command shares."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import EngineConfig
from ..engine import AvatarEngine
from ..io import save_result
from ..requests import ASPECT_RATIOS, STYLE_PRESETS


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every generating subcommand."""
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--style", default=None,
                   help=f"style pack of the model (built-in: {', '.join(STYLE_PRESETS)}; `avatar-engine models` lists "
                        f"each model's LoRA styles)")
    p.add_argument("--style-strength", type=float, default=None, help="scales the style's LoRA, 0..2 (default 1)")
    p.add_argument("--aspect-ratio", choices=ASPECT_RATIOS, default="1:1")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="random when absent; always written to the sidecar")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default=None, help="profile name from models.yaml (see `avatar-engine models`)")
    p.add_argument("-o", "--output", default="out", help="output directory")
    p.add_argument("--no-mark", action="store_true", help="write PNGs without watermark and Content Credentials")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-file", default=None, help="models.yaml to use")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-batch-size", type=int, default=None, help="images per pipeline call")
    p.add_argument("--face-backend", default="embedded", choices=("embedded", "insightface"))
    p.add_argument("--face-model-root", default=None, help="insightface model root (with models/<name>/*.onnx)")
    p.add_argument("--face-scorer", default="auto", choices=("auto", "dlib", "arcface", "handcrafted"),
                   help="what scores identity (auto: dlib's face descriptor when installed)")


def generation_kwargs(args) -> dict:
    return dict(negative_prompt=args.negative_prompt, style_preset=args.style, style_strength=args.style_strength,
                aspect_ratio=args.aspect_ratio,
                guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size, steps=args.steps,
                model=args.model)


def make_engine(args) -> AvatarEngine:
    return AvatarEngine(EngineConfig(device=args.device, profiles_path=args.models_file,
                                     max_batch_size=args.max_batch_size, face_backend=args.face_backend,
                                     face_model_root=args.face_model_root,
                                     face_scorer=getattr(args, "face_scorer", "auto")))


def write_outputs(result, out_dir: str, prefix: str, mark: bool = True) -> None:
    """PNGs + JSON sidecar named `{prefix}-{time}-{seed}`; prints each path. `mark`: watermark and
    Content Credentials on every PNG (`--no-mark` turns them off)."""
    stem = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{result.seed}"
    paths = save_result(result, out_dir, stem, mark=mark)
    for p in paths:
        print(p)
    print(Path(out_dir) / f"{stem}.json")
