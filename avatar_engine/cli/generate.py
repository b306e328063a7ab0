"""`avatar-engine generate`: prompt → PNG avatars + JSON sidecar."""
from __future__ import annotations

from ..requests import GenerationRequest
from .common import add_engine_args, add_generation_args, generation_kwargs, make_engine, write_outputs


def cmd_generate(args) -> None:
    engine = make_engine(args)
    req = GenerationRequest(prompt=args.prompt, **generation_kwargs(args))
    write_outputs(engine.generate(req), args.output, "avatar", mark=not args.no_mark)


def cmd_init(sub) -> None:
    g = sub.add_parser("generate", help="prompt → PNG avatars + JSON sidecar")
    g.add_argument("prompt")
    add_generation_args(g)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
