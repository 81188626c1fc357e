"""Server logs bounded while they are written, whatever the rate; servers' environment scrubbed; private files."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from agent.hookspecs import Launch
from agent.processes import supervisor
from agent.processes.logwriter import RotatingLog
from agent.processes.ports import free_port
from agent.processes.server_env import server_environment

pytestmark = pytest.mark.anyio
MiB = 1 << 20

FLOOD = """
import sys, time
line = b"x" * 199 + b"\\n"
block = line * 5000  # ~1 MiB
end = time.monotonic() + float(sys.argv[1])
written = 0
while time.monotonic() < end:
    sys.stdout.buffer.write(block); written += len(block)
sys.stdout.buffer.write(b"last line %d\\n" % written); sys.stdout.flush()
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


async def test_a_fast_writer_never_takes_a_log_past_its_bound(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "u.log"
    child = supervisor.start(
        Launch(argv=[*python(FLOOD), "2.0"]), free_port(), log, supervisor.LogSettings(max_bytes=MiB, keep=2)
    )
    largest = 0
    with anyio.fail_after(30):
        while child.running():  # sampled while the server floods: the bound holds at every moment
            for path in tmp_path.glob("logs/u.log*"):
                with contextlib.suppress(FileNotFoundError):  # rotated away between the listing and the stat
                    largest = max(largest, path.stat().st_size)
            await anyio.sleep(0.01)
        await supervisor.drain_log(child)
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["u.log", "u.log.1", "u.log.2"]  # keep=2: older files are dropped
    assert largest <= MiB and all((log.parent / f).stat().st_size <= MiB for f in files)
    last = supervisor.tail_lines(log, 1)
    assert last.startswith("last line ")
    assert int(last.split()[-1]) > 20 * MiB  # it did write fast: over 10 MiB/s, bounded all the same
    for name in files:  # rotation cuts at line ends: no line is split between two files
        assert (log.parent / name).read_bytes().endswith(b"\n")


def test_rotation_keeps_lines_whole_and_splits_only_a_line_longer_than_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "l.log"
    log = RotatingLog(str(path), 1024, 3)
    for index in range(100):
        log.write(b"line %03d " % index + b"." * 50 + b"\n")
    log.write(b"y" * 3000)  # one line longer than the bound
    log.close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert set(sizes) == {"l.log", "l.log.1", "l.log.2", "l.log.3"} and max(sizes.values()) <= 1024
    assert (tmp_path / "l.log").read_bytes() == b"y" * (3000 - 2048)


async def test_server_environment_is_an_allowlist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "aws", "METAL_AGENT_STATE_DIR": "/x", "KUBECONFIG": "k"}
    kept = {"CUDA_VISIBLE_DEVICES": "1", "LC_ALL": "C.UTF-8", "TMPDIR": str(tmp_path), "MY_VAR": "mine"}
    for name, value in {**secrets, **kept}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "env.json"
    code = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    launch = Launch(argv=python(code), env={"EXECUTOR_SET": "yes"})
    child = supervisor.start(launch, free_port(), tmp_path / "e.log", env_allow=("MY_*",))
    with anyio.fail_after(20):
        while child.running():
            await anyio.sleep(0.02)
    env = json.loads(out.read_text())
    assert not set(secrets) & set(env)
    assert {name: env.get(name) for name in kept} == kept and env["EXECUTOR_SET"] == "yes"
    assert env["PATH"] == os.environ["PATH"]


def test_server_environment_function() -> None:
    env = server_environment({"PATH": "/bin", "HF_TOKEN": "t", "GGML_METAL_X": "1", "LLAMA_ARG_X": "2"}, {"A": "b"})
    assert env == {"PATH": "/bin", "GGML_METAL_X": "1", "A": "b"}
    assert "LLAMA_ARG_X" in server_environment({"LLAMA_ARG_X": "2"}, extra=("LLAMA_ARG_*",))


async def test_logs_are_private(tmp_path: Path) -> None:
    logs = tmp_path / "state" / "logs"
    child = supervisor.start(Launch(argv=python("print('hello')")), free_port(), logs / "p.log")
    deadline = time.monotonic() + 20
    while child.running() and time.monotonic() < deadline:
        await anyio.sleep(0.02)
    await supervisor.drain_log(child)
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert stat.S_IMODE((logs / "p.log").stat().st_mode) == 0o600
    assert supervisor.tail_lines(logs / "p.log") == "hello"


def test_tail_lines_refuses_a_fifo_and_redacts_urls(tmp_path: Path) -> None:
    fifo = tmp_path / "f.log"
    os.mkfifo(fifo)
    assert supervisor.tail_lines(fifo) == ""  # returns at once: no writer is waited for
    log = tmp_path / "u.log"
    log.write_text("fetching https://user:pw@example.com/m.gguf?token=SECRET\n")
    assert supervisor.tail_lines(log) == "fetching https://example.com/m.gguf?…"


def test_a_removed_log_directory_drops_output_and_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log = RotatingLog(str(directory / "r.log"), 1024, 1)
    log.write(b"a" * 1000 + b"\n")
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    with pytest.raises(OSError):
        log.write(b"b" * 100 + b"\n")  # rotation cannot rename: the writer's pump drops this and reads on
    directory.mkdir()
    log.write(b"c\n")  # the directory is back: a new file
    log.close()
    assert (directory / "r.log").read_bytes().endswith(b"c\n")
