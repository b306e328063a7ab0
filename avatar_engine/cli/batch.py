"""`avatar-engine batch`: a JSONL file of requests → PNGs; re-running skips finished ones."""
from __future__ import annotations

from ..batch import generate_batch
from .common import add_engine_args, make_engine


def cmd_batch(args) -> None:
    summary = generate_batch(make_engine(args), args.jsonl, args.output, chunk_size=args.chunk_size,
                             show_progress=not args.quiet)
    print(f"{summary.generated} generated, {summary.skipped} already done, {summary.total} total → {args.output}")


def cmd_init(sub) -> None:
    b = sub.add_parser("batch", help="JSONL of requests → PNGs; re-running skips finished ones")
    b.add_argument("jsonl")
    b.add_argument("-o", "--output", default="out")
    b.add_argument("--chunk-size", type=int, default=16, help="requests handed to the engine at once")
    b.add_argument("-q", "--quiet", action="store_true")
    add_engine_args(b)
    b.set_defaults(func=cmd_batch)
