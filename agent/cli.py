"""The ``metal-agent`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from agent import __version__, cmd_deploy, cmd_estimate, cmd_plugins, cmd_run, cmd_status, logs


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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_run.add_parser(subparsers)
    cmd_estimate.add_parser(subparsers)
    cmd_status.add_parser(subparsers)
    cmd_plugins.add_parser(subparsers)
    cmd_deploy.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors: report the status instead of exiting
        return exit_.code if isinstance(exit_.code, int) else 2
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
