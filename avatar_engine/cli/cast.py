"""`avatar-engine cast`: scene + 2..4 characters → one image with a distinct person per region."""
from __future__ import annotations

import argparse
from typing import Sequence

from ..errors import RequestValidationError
from ..identity_methods import IDENTITY_METHODS
from ..requests import DEFAULT_IDENTITY_STRENGTH, IDENTITY_STRENGTH_RANGE, LAYOUTS, CastCharacter, CastRequest
from .common import add_engine_args, add_generation_args, generation_kwargs, make_engine, write_outputs


def _indexed(values: Sequence[str], flag: str, n: int) -> list[tuple[int, str]]:
    """Parse repeated `N=VALUE` flags (N is a 1-based character number)."""
    out = []
    for raw in values:
        num, sep, value = raw.partition("=")
        if not sep or not num.strip().isdigit() or not value:
            raise RequestValidationError(f"{flag} {raw!r}: expected N=VALUE with N a character number 1..{n}",
                                         param=flag)
        idx = int(num)
        if not 1 <= idx <= n:
            raise RequestValidationError(f"{flag} {raw!r}: there are {n} --character flags, so N must be 1..{n}",
                                         param=flag)
        out.append((idx - 1, value))
    return out


def request_from_args(args) -> CastRequest:
    n = len(args.character)
    characters = [CastCharacter(prompt=p) for p in args.character]
    for i, path in _indexed(args.photo, "--photo", n):
        with open(path, "rb") as fh:
            characters[i].photos.append(fh.read())
    for i, value in _indexed(args.box, "--box", n):
        try:
            characters[i].box = [float(v) for v in value.split(",")]
        except ValueError:
            raise RequestValidationError(f"--box {value!r}: expected four numbers x0,y0,x1,y1", param="--box") from None
    return CastRequest(prompt=args.scene, characters=characters, layout=args.layout,
                       identity_strength=args.identity_strength, identity_method=args.identity_method,
                       **generation_kwargs(args))


def cmd_cast(args) -> None:
    request = request_from_args(args)
    write_outputs(make_engine(args).generate(request), args.output, "cast", mark=not args.no_mark)


def cmd_init(subparsers) -> None:
    p = subparsers.add_parser(
        "cast", help="scene + 2..4 characters → one image with a distinct person per region",
        description="One denoising pass with a region per character: each character's prompt and face "
                    "apply only inside its region. Writes PNGs and a JSON sidecar with a per-character report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='example: avatar-engine cast --scene "two astronauts on mars" --character "a woman in a red suit" '
               '--character "a man in a blue suit" --photo 1=a.jpg --photo 2=b.jpg -o out')
    p.add_argument("--scene", required=True, help="scene prompt (background and shared setting)")
    p.add_argument("--character", action="append", required=True, metavar="PROMPT",
                   help="a character's prompt; repeat 2-4 times (numbered 1, 2, ... in order)")
    p.add_argument("--photo", action="append", default=[], metavar="N=PATH",
                   help="reference photo for character N (repeat for up to 5 photos per character)")
    p.add_argument("--box", action="append", default=[], metavar="N=X0,Y0,X1,Y1",
                   help="region of character N as fractions of the frame; give one for every character or none")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="auto: columns for landscape/square, rows for portrait with 3-4 characters")
    p.add_argument("--identity-strength", type=float, default=DEFAULT_IDENTITY_STRENGTH,
                   help=f"IP-Adapter FaceID scale {IDENTITY_STRENGTH_RANGE[0]:g}..{IDENTITY_STRENGTH_RANGE[1]:g}")
    p.add_argument("--identity-method", choices=IDENTITY_METHODS, default=None,
                   help="identity method for every face (default: the model's); the model must offer it")
    add_generation_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_cast)
