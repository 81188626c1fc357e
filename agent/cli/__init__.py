"""The ``metal-agent`` command: one entry point, a subcommand per job.

It starts fast because it imports only the command it runs: ``COMMANDS`` names each command's module and its
one-line help, so the command list (``--help``) and ``--version`` import none of them. ``main`` parses twice:
first with a stand-in parser per command, only to learn which command was given, then with that command's
real parser (its module imported now), which reports any usage error. Kubernetes, HTTP and plugin machinery
are therefore imported only by the commands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Collection, Sequence
from typing import NoReturn

from agent import __version__
from agent.util import logs
from agent.util.quantity import InvalidValue

# command -> (its module, which has ``add_parser(subparsers, help_line)``; the line ``metal-agent --help`` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("agent.cli.cmd_run", "run the agent"),
    "estimate": ("agent.cli.cmd_estimate", "estimate a model's memory and check it against its budget"),
    "status": ("agent.cli.cmd_status", "show the running agent's units and memory"),
    "plugins": ("agent.cli.cmd_plugins", "list loaded plugins, executors and plugin settings"),
    "config": ("agent.cli.cmd_config", "show the effective configuration, or print a sample config file"),
    "deploy": ("agent.cli.cmd_deploy", "create a Model and an InferenceService in the cluster"),
}

EPILOG = """\
Sizes are Kubernetes quantities: binary Ki Mi Gi Ti Pi Ei (24Gi), decimal k M G T P E (24G), plain bytes or 1e9;
24GB is rejected. Fractions are numbers with 0 < f <= 1.
Settings: {precedence} (`metal-agent config show`).
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


class TopParser(Parser):
    """``metal-agent`` itself, whose epilog names the settings precedence, read from ``agent.config.loading`` only when
    the help is shown: that module brings the settings table and its checks, which ``--version`` never needs."""

    def format_help(self) -> str:
        from agent.config.loading import PRECEDENCE

        self.epilog = EPILOG.format(precedence=PRECEDENCE)
        return super().format_help()


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the full arguments of ``commands`` (default: every command); the others get a stand-in
    that takes any arguments, enough to tell which command was given without importing its module."""
    parser = TopParser(
        prog="metal-agent",
        description="Run local LLM inference servers for Kubernetes Model objects within their memory budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"metal-agent {__version__}")
    logs.add_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_line) in COMMANDS.items():
        if commands is None or name in commands:
            importlib.import_module(module).add_parser(subparsers, help_line)
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
    for subparser in subparsers.choices.values():  # also after the subcommand: `metal-agent run --log-level debug`
        logs.add_arguments(subparser, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        given, _ = build_parser(commands=()).parse_known_args(argv)
        parser = build_parser(commands=[given.command] if given.command else [])
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
