"""`avatar-engine percify`: 1..5 photos of one person + prompt → avatars with that face, and a
one-line identity summary on stderr."""
from __future__ import annotations

import sys

from ..faces.scoring import MISMATCH_POLICIES
from ..identity_methods import IDENTITY_METHODS
from ..requests import IDENTITY_STRENGTH_RANGE, PercifyRequest
from .common import add_engine_args, add_generation_args, generation_kwargs, make_engine, write_outputs


def cmd_percify(args) -> None:
    photos = []
    for path in args.photos:
        with open(path, "rb") as fh:
            photos.append(fh.read())
    engine = make_engine(args)
    req = PercifyRequest(prompt=args.prompt, photos=photos, identity_strength=args.identity_strength,
                         mismatched_photos=args.mismatched_photos, identity_method=args.identity_method,
                         **generation_kwargs(args))
    result = engine.generate(req)
    result.report.photo_files = list(args.photos)
    write_outputs(result, args.output, "percify", mark=not args.no_mark)
    print(result.report.summary(), file=sys.stderr)


def cmd_init(subparsers) -> None:
    p = subparsers.add_parser("percify", help="1..5 photos of one person + prompt → avatars with that face")
    p.add_argument("photos", nargs="+", help="reference photos (JPEG/PNG/WebP) of one person")
    p.add_argument("--prompt", default="a portrait of a person", help="what to make of the person")
    p.add_argument("--identity-strength", type=float, default=0.8,
                   help=f"{IDENTITY_STRENGTH_RANGE[0]:g}..{IDENTITY_STRENGTH_RANGE[1]:g}; 0 ignores the face")
    p.add_argument("--identity-method", choices=IDENTITY_METHODS, default=None,
                   help="faceid, faceid-plus-v2 (SD1.5/SDXL) or instantid (SDXL); default: the model's "
                        "(models.yaml identity_method); the model must offer it")
    p.add_argument("--mismatched-photos", choices=MISMATCH_POLICIES, default="refuse",
                   help="photos that are not the same person: refuse the request (default) or drop them with a note")
    add_generation_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_percify)
