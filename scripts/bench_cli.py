"""CPU time of the ``metal-agent`` command: ``--version`` and ``estimate`` of a small GGUF, each a fresh process.

CPU time (user + system of the child, from ``wait4``) rather than wall time: on a shared machine the wall clock
counts other people's work, CPU time counts what starting the command costs. Each command runs several times
and the median is reported. Targets: ``--version`` under 0.35 s, ``estimate`` of a small model under 0.5 s.
Run: python scripts/bench_cli.py [RUNS]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"--version": 0.35, "estimate": 0.5}


def child_cpu_seconds(argv: Sequence[str]) -> float:
    """User + system CPU seconds of one run of ``argv`` (its output discarded); it must exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {process.returncode}: {errors.decode(errors='replace')}")
    return usage.ru_utime + usage.ru_stime


def median_cpu(argv: Sequence[str], runs: int) -> tuple[float, list[float]]:
    child_cpu_seconds(argv)  # once to warm the page cache and byte-code files
    times = [child_cpu_seconds(argv) for _ in range(runs)]
    return statistics.median(times), times


def metal_agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def main(argv: Sequence[str]) -> int:
    runs = int(argv[0]) if argv else 7
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_gguf(Path(tmp) / "tiny.gguf", TinyShape())
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],  # the interpreter's own start, for scale
            "--version": metal_agent("--version"),
            "estimate": metal_agent("estimate", str(model), "--host-memory", "64Gi"),
        }
        results = {name: median_cpu(command, runs) for name, command in commands.items()}
    ok = True
    print(f"{'command':<16}{'median CPU s':>14}  runs (user+sys, {runs} runs)")
    for name, (median, times) in results.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  target < {target} s {'PASS' if median < target else 'FAIL'}"
        ok = ok and (target is None or median < target)
        print(f"{name:<16}{median:>14.3f}  {' '.join(f'{t:.3f}' for t in times)}{verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
