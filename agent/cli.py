"""The ``metal-agent`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from agent import __version__, cmd_estimate, cmd_plugins, cmd_run, cmd_status, logs
from agent.quantity import InvalidValue


class Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line and exit status 2, like every other invalid input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="metal-agent",
        description="Run local LLM inference servers for Kubernetes Model objects within their memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"metal-agent {__version__}")
    logs.add_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_run.add_parser(subparsers)
    cmd_estimate.add_parser(subparsers)
    cmd_status.add_parser(subparsers)
    cmd_plugins.add_parser(subparsers)
    for subparser in subparsers.choices.values():  # also after the subcommand: `metal-agent run --log-level debug`
        logs.add_arguments(subparser, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors: report the status instead of exiting
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        logs.configure_from(args.log_level, args.log_format)
    except InvalidValue as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
