"""The command line imports only what the command it runs needs (timing lives in scripts/bench_cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import COMMANDS, build_parser, main
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_AND_SERVER = ("kubernetes_asyncio", "aiohttp", "prometheus_client")
PROBE = """
import json, sys
from agent import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "modules": sorted({name.split(".")[0] for name in sys.modules})}), file=sys.stderr)
"""


def imported_by(*argv: str) -> tuple[int, set[str]]:
    """The exit status of ``metal-agent ARGV`` in a fresh interpreter and the top-level packages it imported."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


def test_version_imports_no_cluster_client_logging_plugin_or_numpy() -> None:
    code, modules = imported_by("--version")
    assert code == 0
    assert modules.isdisjoint({*CLUSTER_AND_SERVER, "structlog", "pluggy", "numpy", "gguf", "yaml", "plugins"})


def test_estimate_of_a_local_model_imports_no_cluster_client_http_server_or_numpy(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "tiny.gguf", TinyShape())
    code, modules = imported_by("estimate", str(model), "--host-memory", "64Gi")
    assert code == 0
    assert modules.isdisjoint({*CLUSTER_AND_SERVER, "numpy", "gguf"})


@pytest.mark.parametrize("argv", [["plugins"], ["config", "show"], ["config", "sample"]])
def test_local_commands_import_no_cluster_client_or_http_server(argv: list[str]) -> None:
    code, modules = imported_by(*argv)
    assert code == 0
    assert modules.isdisjoint(CLUSTER_AND_SERVER)


def test_every_command_is_listed_with_its_help_and_builds_its_full_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    listing = " ".join(capsys.readouterr().out.split())  # the help lines as one text, however argparse wraps them
    full = build_parser()  # every command's real arguments: their modules import and agree with COMMANDS
    for name, (_, help_line) in COMMANDS.items():
        assert f"{name} {help_line}" in listing
        assert main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: metal-agent {name}")
    assert full.parse_args(["estimate", "m.gguf"]).model == "m.gguf"


def test_usage_errors_come_from_the_commands_real_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate"]) == 2
    assert "the following arguments are required: MODEL" in capsys.readouterr().err
    assert main(["run", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    assert main(["--log-level", "debug", "nonsense"]) == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
