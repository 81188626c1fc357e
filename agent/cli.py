"""The ``metal-agent`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from agent import __version__, cmd_config, cmd_deploy, cmd_estimate, cmd_plugins, cmd_run, cmd_status, logs
from agent.config import PRECEDENCE
from agent.quantity import InvalidValue

EPILOG = f"""\
Sizes are Kubernetes quantities: binary Ki Mi Gi Ti Pi Ei (24Gi), decimal k M G T P E (24G), plain bytes or 1e9;
24GB is rejected. Fractions are numbers with 0 < f <= 1.
Settings: {PRECEDENCE} (`metal-agent config show`).
Budget of a model: memoryBudget > memoryFraction > the agent's fraction > adaptive default (0.67 of RAM up to
36 GiB, 0.75 above).

exit status: 0 success; 1 the answer is no (estimate: does not fit; status --endpoint: no endpoint) or the
agent failed while running; 2 invalid input, flags or configuration (one `error:` line on stderr).
`metal-agent COMMAND --help` shows each command's.
"""


class Parser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line and exit status 2, like every other invalid input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="metal-agent",
        description="Run local LLM inference servers for Kubernetes Model objects within their memory budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"metal-agent {__version__}")
    logs.add_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_run.add_parser(subparsers)
    cmd_estimate.add_parser(subparsers)
    cmd_status.add_parser(subparsers)
    cmd_plugins.add_parser(subparsers)
    cmd_config.add_parser(subparsers)
    cmd_deploy.add_parser(subparsers)
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
    try:
        code: int = args.handler(args)
    except BrokenPipeError:  # `metal-agent config show | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
