"""`avatar-engine` command line. One static command table (COMMANDS): each command module
registers its subcommand with `cmd_init(subparsers)`; commands import the engine, never the
reverse. Errors print one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import AvatarEngineError
from . import batch, cast, generate, models, percify, setup, verify

#: Subcommands in the order `--help` lists them.
COMMANDS = (generate, models, setup, batch, percify, cast, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-engine", description="Generate AI avatars with diffusers.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.cmd_init(sub)
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
