"""The command line: :func:`build_parser` and :func:`main`.

One module per command (prune, bench, quantize, sweep, eval, demo, train, finetune,
analyze), each with its ``add_parser`` and ``handle``; the argument groups they share and what
those build are in :mod:`~structprune.front.cli.arguments`, the printing in
:mod:`~structprune.front.cli.output`. :func:`main` is the one place an error a user can cause
(:class:`~structprune.errors.StructPruneError`) becomes one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from structprune.errors import StructPruneError
from structprune.front.cli import analyze, bench, demo, finetune, prune, quantize, sweep, train
from structprune.front.cli import eval as eval_command

DESCRIPTION = ("structprune: structured channel pruning. Commands: prune, eval, train, "
               "finetune, bench, quantize, sweep, analyze, demo.")
# in the order `structprune --help` lists them
COMMANDS = (prune, bench, quantize, sweep, eval_command, demo, train, finetune, analyze)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (the CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(prog="structprune", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = command.add_parser(sub)
        p.add_argument("--verbose", action="store_true",
                       help="on an error, also print its full detail (the traceback)")
        p.set_defaults(handle=command.handle)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names (default: the process's arguments); its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handle(args)
    except StructPruneError as exc:
        print(f"structprune: error: {exc}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


__all__ = ["COMMANDS", "EXIT_USER_ERROR", "build_parser", "main"]
