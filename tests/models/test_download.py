"""Downloads against a local HTTP server: resume after a cut, changed files, checksums, full disks, remote headers."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import aiohttp
import anyio
import gguf
import numpy as np
import pytest
import structlog.testing

from agent.cli import main
from agent.engine.model_fetch import FetchSettings, ModelFetcher
from agent.estimate.gguf_header import IncompleteHeader, read_header, read_header_prefix
from agent.estimate.gguf_shape import load_shape
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.models.download import DownloadError, Progress, download
from agent.models.model_store import (
    SourceError,
    auth_headers,
    confine,
    hf_url,
    model_files,
    redact,
    remote_files,
    shard_urls,
)
from agent.models.remote_header import FIRST_RANGE, fetch_header, remote_shape
from agent.sources.manifest import ModelSpec
from tests.model_server import ModelServer

pytestmark = pytest.mark.anyio


async def fetch(url: str, store: Path, sha256: str | None = None, **kwargs: object) -> Path:
    files = remote_files(url, store)
    async with aiohttp.ClientSession() as session:
        await download(session, files.remote[0], Progress("m"), sha256, **kwargs)  # type: ignore[arg-type]
    return files.path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- sources ----------------------------------------------------------------------------------------------


def test_hf_source_maps_to_the_resolve_url() -> None:
    assert hf_url("hf://Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q4_k_m.gguf") == (
        "https://huggingface.co/Qwen/Qwen2.5-7B-Instruct-GGUF/resolve/main/qwen2.5-7b-instruct-q4_k_m.gguf"
    )
    assert hf_url("hf://org/repo@v1.0/sub/dir/m.gguf") == "https://huggingface.co/org/repo/resolve/v1.0/sub/dir/m.gguf"
    for bad in ("hf://org/m.gguf", "hf://org//m.gguf", "hf://org/repo/../x.gguf"):
        with pytest.raises(SourceError, match="expected hf://ORG/REPO"):
            hf_url(bad)


def test_split_sources_name_every_shard_and_share_one_store_directory(tmp_path: Path) -> None:
    urls = shard_urls("https://h/m/big-00001-of-00003.gguf")
    assert urls == [f"https://h/m/big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    files = remote_files(urls[0], tmp_path)
    assert [f.path.name for f in files.remote] == [u.rsplit("/", 1)[1] for u in urls]
    assert len({f.path.parent for f in files.remote}) == 1 and files.path == files.remote[0].path
    with pytest.raises(SourceError, match="shard 2; name the first shard"):
        shard_urls("https://h/m/big-00002-of-00003.gguf")
    model = ModelSpec(name="m", namespace="d", source="s3://bucket/m.gguf")
    with pytest.raises(SourceError, match="s3:// is not supported") as info:
        model_files(model, tmp_path, ())
    assert info.value.reason == "UnsupportedSource"
    mlx = ModelSpec(name="m", namespace="d", source="hf://mlx-community/Qwen-4bit/config.json", format="mlx")
    with pytest.raises(SourceError, match="only GGUF files are downloaded"):
        model_files(mlx, tmp_path, ())


def test_local_paths_are_confined_to_the_store_and_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_tiny_gguf(root / "ok.gguf")
    write_tiny_gguf(outside / "secret.gguf")
    (root / "link.gguf").symlink_to(outside / "secret.gguf")
    (root / "dirlink").symlink_to(outside)
    manifest = root / "manifests" / "m.yaml"

    def files(source: str) -> Path:
        return model_files(
            ModelSpec(name="m", namespace="d", source=source, origin=str(manifest)), tmp_path / "s", [root]
        ).path

    assert files("../ok.gguf") == root / "ok.gguf"
    assert files(str(root / "ok.gguf")) == root / "ok.gguf"
    for escape in ("../../outside/secret.gguf", str(root / ".." / "outside" / "secret.gguf"), "../link.gguf",
                   "../dirlink/secret.gguf", "file:///etc/passwd"):  # fmt: skip
        with pytest.raises(SourceError, match="outside the model store and the model roots") as info:
            files(escape)
        assert info.value.reason == "SourceNotAllowed"
    with pytest.raises(SourceError, match="through a symlink to"):
        files("../link.gguf")


def test_a_split_model_with_a_shard_linked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "m-00001-of-00002.gguf").write_bytes(b"x")
    (outside / "m-00002-of-00002.gguf").write_bytes(b"y")
    (root / "m-00002-of-00002.gguf").symlink_to(outside / "m-00002-of-00002.gguf")
    with pytest.raises(SourceError, match=r"m-00002-of-00002\.gguf"):
        confine(root / "m-00001-of-00002.gguf", [root], "m")


# --- downloads --------------------------------------------------------------------------------------------


async def test_a_download_cut_midway_resumes_with_range_and_verifies_the_checksum(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    url = server.add("m/tiny.gguf", tiny)
    server.cut_after = len(tiny) // 2
    with pytest.raises(DownloadError) as info:
        await fetch(url, tmp_path / "store", sha(tiny))
    assert info.value.transient and info.value.reason == "DownloadInterrupted"
    partial = next((tmp_path / "store").rglob("tiny.gguf.partial"))
    assert 0 < partial.stat().st_size <= len(tiny) // 2
    kept = partial.stat().st_size
    path = await fetch(url, tmp_path / "store", sha(tiny))
    assert path.read_bytes() == tiny and not partial.exists()
    resumed = server.gets()[-1]
    assert resumed.range == f"bytes={kept}-" and resumed.if_range == server.etag()
    assert resumed.status == 206 and resumed.sent == len(tiny) - kept
    assert (path.parent / "tiny.gguf.sha256").exists()
    await fetch(url, tmp_path / "store", sha(tiny))  # already there: verified from the recorded digest
    assert len(server.gets()) == 2


@pytest.mark.parametrize("fault", ["changed", "ignores-range"])
async def test_a_changed_remote_file_or_a_server_ignoring_range_restarts_from_zero(
    server: ModelServer, tiny: bytes, tmp_path: Path, fault: str
) -> None:
    url = server.add("tiny.gguf", tiny)
    server.cut_after = len(tiny) // 3
    with pytest.raises(DownloadError):
        await fetch(url, tmp_path)
    new = tiny[:-16] + os.urandom(16) if fault == "changed" else tiny
    server.files["/tiny.gguf"] = new
    if fault == "changed":
        server.etag_version += 1
    else:
        server.ignore_range = True
    path = await fetch(url, tmp_path, sha(new))
    assert path.read_bytes() == new
    last = server.gets()[-1]
    assert last.range is not None and last.status == 200 and last.sent == len(new)


async def test_a_wrong_checksum_removes_the_partial_and_fails(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    url = server.add("tiny.gguf", tiny)
    with pytest.raises(DownloadError, match=r"does not match spec\.sha256") as info:
        await fetch(url, tmp_path / "store", "0" * 64)
    assert info.value.reason == "ChecksumMismatch" and not info.value.transient
    assert [p.name for p in (tmp_path / "store").rglob("tiny.gguf*")] == ["tiny.gguf.lock"]


async def test_a_full_disk_is_refused_before_writing(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    url = server.add("tiny.gguf", tiny)
    with pytest.raises(
        DownloadError, match=r"needs 530\.9 KiB more on the disk of .*store.* 1\.0 GiB must stay free"
    ) as info:
        await fetch(url, tmp_path / "store", disk_free=lambda _: (1 << 30) + 1000, margin=1 << 30)
    assert info.value.reason == "DiskFull"
    assert not list((tmp_path / "store").rglob("tiny.gguf")) and not list(tmp_path.rglob("*.partial"))


async def test_an_unwritable_store_is_a_clear_reason(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    url = server.add("tiny.gguf", tiny)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DownloadError, match=r"model store .*file/.* is not writable: Not a directory") as info:
        await fetch(url, tmp_path / "file" / "store")
    assert info.value.reason == "StoreNotWritable" and not server.gets()


async def test_a_missing_remote_file_is_permanent(server: ModelServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        await fetch(server.url("nope.gguf"), tmp_path)
    assert info.value.reason == "SourceNotFound" and not info.value.transient


# --- remote headers ---------------------------------------------------------------------------------------


def test_a_header_prefix_says_how_many_bytes_it_needs(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinyShape(n_vocab_extra=20_000))
    data = path.read_bytes()
    with pytest.raises(IncompleteHeader) as info:
        read_header_prefix(data[:4096], len(data), "m")
    assert 4096 < info.value.needed < len(data)
    assert read_header_prefix(data, len(data), str(path)) == read_header(path)


async def test_remote_shape_is_read_from_growing_ranges_and_matches_the_local_file(
    server: ModelServer, tmp_path: Path
) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinyShape(n_vocab_extra=40_000))
    data = path.read_bytes()
    files = remote_files(server.add("big.gguf", data), tmp_path / "store")
    async with aiohttp.ClientSession() as session:
        found = await fetch_header(session, files.remote[0])
    shape = remote_shape(files, {str(files.path): found})
    local = load_shape(path)
    assert shape.weights_bytes == local.weights_bytes and shape.file_bytes == len(data)
    assert shape.n_vocab == local.n_vocab and shape.n_layer == local.n_layer
    ranges = [r.range for r in server.gets()]
    assert len(ranges) >= 2 and ranges[0] == f"bytes=0-{FIRST_RANGE - 1}" and all(ranges)
    assert sum(r.sent for r in server.gets()) < len(data)


async def test_remote_split_model_counts_every_shard(server: ModelServer, tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama", split_max_tensors=1)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    for name in ("token_embd.weight", "output.weight"):
        writer.add_tensor(name, np.zeros((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shards = sorted(tmp_path.glob("m-*.gguf"))
    urls = [server.add(f"r/{p.name}", p) for p in shards]
    files = remote_files(urls[0], tmp_path / "store")
    async with aiohttp.ClientSession() as session:
        headers = {str(f.path): await fetch_header(session, f) for f in files.remote}
        shape = remote_shape(files, headers)
        assert shape.shard_count == 2 and shape.file_bytes == sum(p.stat().st_size for p in shards)
        for remote in files.remote:
            await download(session, remote, Progress(remote.path.name))
    assert load_shape(files.path).weights_bytes == shape.weights_bytes == 2 * 300 * 64 * 4


async def test_a_download_waits_for_another_agent_holding_the_file_lock(
    server: ModelServer, tiny: bytes, tmp_path: Path
) -> None:
    url = server.add("tiny.gguf", tiny)
    files = remote_files(url, tmp_path / "store")
    files.path.parent.mkdir(parents=True)
    other = os.open(files.path.with_name("tiny.gguf.lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)  # another agent sharing the store is writing this file
    progress = Progress("tiny.gguf")
    async with aiohttp.ClientSession() as session, anyio.create_task_group() as tasks:
        tasks.start_soon(download, session, files.remote[0], progress)
        with anyio.fail_after(10):
            while not progress.waiting_for_lock:
                await anyio.sleep(0.01)
        assert "waiting for another agent" in progress.text()
        files.path.write_bytes(tiny)  # ... which finishes and lets go
        os.close(other)
    assert not server.gets() and progress.done == len(tiny) and not progress.waiting_for_lock


def test_urls_in_messages_and_store_paths_carry_no_secrets(tmp_path: Path) -> None:
    signed = "https://user:pw@cdn.example:8443/m/x.gguf?X-Signature=secret"
    assert redact(signed) == "https://cdn.example:8443/m/x.gguf?…"
    again = remote_files(signed.replace("secret", "renewed"), tmp_path)
    assert remote_files(signed, tmp_path).path == again.path  # a renewed signature finds the same partial
    assert again.path.parent.name.startswith("cdn.example_8443-") and "secret" not in str(again.path)


def test_estimate_sizes_a_remote_model_from_its_header_alone(
    server: ModelServer,
    tiny: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    url = server.add("tiny.gguf", tiny)
    assert main(["estimate", url, "--json", "--memory-budget", "1Gi"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["file_bytes"] == len(tiny) and result["fits"]
    assert all(r.range and r.range.startswith("bytes=0-") for r in server.gets())
    assert sum(r.sent for r in server.gets()) < len(tiny) and not (tmp_path / "data").exists()


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = Progress("m.gguf", done=3 << 20, total=12 << 20)
    ModelFetcher(FetchSettings(tmp_path, terminal=True))._render(progress)
    bar = capsys.readouterr().err
    assert bar.startswith("\r\x1b[2K[" + "#" * 7 + "-" * 23 + "] m.gguf: 3.0 MiB of 12.0 MiB (25%)")
    quiet = ModelFetcher(FetchSettings(tmp_path, terminal=False, log_interval=3600))
    with structlog.testing.capture_logs() as logs:
        quiet._render(progress)
        quiet._render(progress)  # within the log interval: no second line
        quiet._render(progress, final=True)
    assert [(e["event"], e["done_bytes"], e["total_bytes"]) for e in logs] == [
        ("download progress", 3 << 20, 12 << 20)
    ] * 2
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--min-free-disk", "24GB"], 'error: --min-free-disk: "24GB" is not a Kubernetes quantity'),
        (["--model-root", "nowhere"], "error: --model-root: nowhere is not a directory"),
    ],
)
def test_bad_download_settings_exit_2_and_start_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], error: str
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--manifests", str(tmp_path), "--state-dir", str(tmp_path / "state"), *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(error) and not (tmp_path / "state").exists()


async def test_the_hugging_face_token_goes_to_hugging_face_only(
    server: ModelServer, tiny: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert auth_headers(hf_url("hf://org/repo/m.gguf")) == {"Authorization": "Bearer hf_secret"}
    assert auth_headers("https://huggingface.co.evil.example/m.gguf") == {}
    url = server.add("tiny.gguf", tiny)
    await fetch(url, tmp_path / "store")
    assert server.gets() and all(r.authorization is None for r in server.log)


async def test_a_renewed_signed_url_resumes_the_same_partial(server: ModelServer, tiny: bytes, tmp_path: Path) -> None:
    url = server.add("tiny.gguf", tiny)
    server.cut_after = len(tiny) // 2
    with pytest.raises(DownloadError):
        await fetch(url + "?signature=old", tmp_path / "store")
    partial = next((tmp_path / "store").rglob("*.partial"))
    assert "signature" not in partial.with_name(partial.name + ".json").read_text()  # no token on disk
    await fetch(url + "?signature=new", tmp_path / "store", sha(tiny))
    assert server.gets()[-1].range == f"bytes={len(tiny) // 2}-"
