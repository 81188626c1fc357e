"""Hostile files never block or flood the agent: FIFOs, /dev/zero, directories, alias bombs, huge manifests."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest

from agent.config.loading import ConfigError, read_file
from agent.estimate.gguf_header import GGUFError, read_header
from agent.estimate.preflight import Mode, preflight
from agent.estimate.shape import ServeSettings
from agent.sources.manifest import ManifestError, load_file, parse_yaml
from agent.sources.standalone import ManifestScanner, watch
from agent.util.safe_files import UnsafeFile, read_bytes, write_atomic

API = "apiVersion: inference.llmkube.dev/v1alpha1"
BOMB = (  # 564 bytes of YAML that expand to billions of strings
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


def model_yaml(name: str, budget: str = "1Gi") -> str:
    spec = f"{{source: /m/{name}.gguf, hardware: {{memoryBudget: '{budget}'}}}}"
    return f"{API}\nkind: Model\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def finishes_within(seconds: float, call: object) -> object:
    """Run ``call`` in a thread; fail (instead of hanging the suite) when it blocks."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_capture(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the read blocked"
    return result[0]


def _capture(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except Exception as exc:
        return exc


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "socket"])
def test_read_refuses_what_is_not_a_regular_file_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    error = finishes_within(5, lambda: read_bytes(path, 1 << 20))
    assert isinstance(error, UnsafeFile if kind in ("fifo", "dev-zero") else OSError)  # open fails for the rest
    manifest_error = finishes_within(5, lambda: load_file(path))
    assert isinstance(manifest_error, ManifestError) and str(path) in str(manifest_error)


def test_read_caps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * 2000)
    with pytest.raises(UnsafeFile, match="2000 bytes, more than the limit of 1000"):
        read_bytes(path, 1000)
    with pytest.raises(ManifestError, match="more than the limit"):
        load_file(path, max_bytes=1000)


def test_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path: Path) -> None:
    assert len(BOMB) < 600
    started = time.monotonic()
    with pytest.raises(ManifestError, match=r"aliases \(\*a\) are not allowed") as info:
        parse_yaml(BOMB, "bomb.yaml")
    assert time.monotonic() - started < 1 and len(str(info.value)) < 300


def test_documents_and_depth_are_capped() -> None:
    with pytest.raises(ManifestError, match="more than 1000 YAML documents"):
        parse_yaml("---\na: 1\n" * 1001, "many.yaml")
    with pytest.raises(ManifestError, match="deeper than 64"):
        parse_yaml("a: " + "[" * 70 + "]" * 70, "deep.yaml")


def test_messages_quote_at_most_200_characters_of_user_input(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(f"{API}\nkind: {'K' * 1_000_000}\n")
    with pytest.raises(ManifestError) as info:
        load_file(path)
    assert "KKKK" in str(info.value) and len(str(info.value)) < len(str(path)) + 300
    path.write_text(
        f"{API}\nkind: Model\nmetadata: {{name: m}}\nspec: {{source: 1, hardware: {{accelerator: {'x' * 10**5}}}}}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_file(path)
    assert len(str(info.value)) < len(str(path)) + 300


def test_gguf_fifo_and_dev_zero_fail_preflight_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    zero = tmp_path / "z.gguf"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        error = finishes_within(5, lambda p=path: read_header(p))  # type: ignore[misc]
        assert isinstance(error, GGUFError) and "not a regular file" in str(error)
    from agent.estimate.budget import resolve_budget
    from agent.estimate.hostmem import HostMemory

    host = HostMemory(total_bytes=16 << 30, available_bytes=16 << 30, source="test")
    verdict = finishes_within(
        5, lambda: preflight(fifo, ServeSettings(), resolve_budget(16 << 30, "1Gi"), host, Mode.ENFORCE)
    )
    assert "not a regular file" in verdict.message  # type: ignore[attr-defined]


def test_config_file_that_is_a_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    error = finishes_within(5, lambda: read_file(fifo))
    assert isinstance(error, ConfigError) and "not a regular file" in str(error)


def test_scanner_parses_only_changed_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(model_yaml("big") + "".join(f"# padding line {i}\n" for i in range(40_000)))
    (tmp_path / "small.yaml").write_text(model_yaml("small"))
    old = time.time() - 60  # out of the racy window: the key alone decides
    for path in tmp_path.iterdir():
        os.utime(path, (old, old))
    scanner = ManifestScanner(tmp_path, max_bytes=4 << 20)
    found = scanner.scan()
    assert found is not None and len(found[0]) == 2 and scanner.parses == 2
    assert scanner.scan() is None and scanner.parses == 2  # nothing changed: nothing read or parsed
    (tmp_path / "small.yaml").write_text(model_yaml("small", budget="2Gi"))
    found = scanner.scan()
    assert found is not None and scanner.parses == 3  # only the edited file
    os.utime(big)  # touched, same content: read and hashed again, not parsed
    assert scanner.scan() is None and scanner.parses == 3


def test_scanner_sees_a_same_size_rewrite_within_the_same_clock_tick(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(model_yaml("m", budget="1Gi"))
    scanner = ManifestScanner(tmp_path)
    assert scanner.scan() is not None
    info = path.stat()
    path.write_text(model_yaml("m", budget="2Gi"))  # same size
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # and the same mtime, as a coarse clock would give
    found = scanner.scan()
    assert found is not None and next(iter(found[0].values())).memory_budget == "2Gi"  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_watch_reports_a_fifo_and_keeps_serving_the_other_files(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(model_yaml("good"))
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    (tmp_path / "bomb.yaml").write_text(BOMB)
    errors: list[dict[str, str]] = []
    events = watch(tmp_path, 0.01, errors.append)
    with anyio.fail_after(10):
        first = await events.__anext__()
    assert first.obj.name == "good"
    assert set(errors[-1]) == {str(tmp_path / n) for n in ("fifo.yaml", "zero.yaml", "bomb.yaml")}
    assert "a FIFO" in errors[-1][str(tmp_path / "fifo.yaml")]
    assert "character device" in errors[-1][str(tmp_path / "zero.yaml")]
    await events.aclose()  # type: ignore[attr-defined]


def test_write_atomic_leaves_no_temporary_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "children.json"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agent.util.safe_files.os.fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["children.json"] and target.read_bytes() == b"old"
