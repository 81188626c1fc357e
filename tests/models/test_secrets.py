"""Secrets stay secret: URLs redacted in statuses and logs, HF_TOKEN only over https to its own host, modes."""

from __future__ import annotations

import contextlib
import ssl
import stat
from pathlib import Path

import aiohttp
import pytest
from download_harness import Recording, make_agent, phase, unit
from memory_harness import drive

from agent.models import model_store
from agent.models.download import Progress, download
from agent.models.model_store import SourceError, auth_headers, remote_url
from agent.util import logs
from agent.util.redact import quoted, redact_text, redact_url
from tests.model_server import ModelServer, self_signed, serve

SECRET = "SEKRIT123"


def test_redaction_drops_user_password_and_query() -> None:
    assert redact_url(f"https://me:{SECRET}@host:8443/a/m.gguf?token={SECRET}#x") == "https://host:8443/a/m.gguf?…"
    assert redact_url("https://host/m.gguf") == "https://host/m.gguf"
    text = f"GET http://u:{SECRET}@h/x?sig={SECRET} failed; see https://ok/y"
    assert redact_text(text) == "GET http://h/x?… failed; see https://ok/y"
    assert redact_url("http://[::1/bad") == "http://…"


def test_quoted_is_bounded_and_redacted() -> None:
    assert len(quoted("x" * 10**6)) == 200
    assert SECRET not in quoted(f"https://h/m.gguf?token={SECRET}")
    nested: list[object] = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9  # shared, not copied: what an alias bomb builds
    assert len(quoted(nested)) <= 200


def test_hf_token_only_over_https_to_huggingface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert auth_headers("https://huggingface.co/o/r/resolve/main/m.gguf") == {"Authorization": f"Bearer {SECRET}"}
    assert auth_headers("https://huggingface.co:443/o/r/m.gguf") != {}
    for url in (
        "http://huggingface.co/o/r/m.gguf",  # clear text
        "https://huggingface.co:8443/o/r/m.gguf",  # another service on the host
        "http://huggingface.co:443/o/r/m.gguf",
        "https://huggingface.co.evil.example/m.gguf",
        "https://evil.example/huggingface.co/m.gguf",
        "https://huggingface.co:bad/m.gguf",
        "https://huggingface.co:0/m.gguf",
    ):
        assert auth_headers(url) == {}, url


@pytest.mark.anyio
async def test_hf_token_is_not_sent_over_http_even_to_the_endpoint_host(
    server: ModelServer, tiny: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(model_store, "HF_ENDPOINT", f"http://127.0.0.1:{server.port}")  # a plain-http mirror
    url = server.add("o/r/resolve/main/m.gguf", tiny)
    remote = model_store.remote_files(url, tmp_path / "store").remote[0]
    async with aiohttp.ClientSession() as session:
        assert await download(session, remote, Progress("m.gguf"), margin=0)
    assert server.gets() and all(r.authorization is None for r in server.gets())


@pytest.mark.anyio
async def test_hf_token_goes_over_https_to_the_hub_and_to_no_other_origin_a_redirect_leads_to(
    tiny: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub answers a download with a redirect to its CDN: the token must not follow to another host or port
    (aiohttp's rule, pinned here), while a redirect within the hub keeps it (so the test can tell)."""
    cert, tls = self_signed(tmp_path)
    hub, cdn = ModelServer(tls=tls, host="localhost"), ModelServer(tls=tls)
    with contextlib.contextmanager(serve)(hub), contextlib.contextmanager(serve)(cdn):
        monkeypatch.setenv("HF_TOKEN", SECRET)
        monkeypatch.setattr(model_store, "HF_ENDPOINT", f"https://localhost:{hub.port}")
        targets = {
            "other-host.gguf": cdn.add("blob/other-host.gguf", tiny),  # https://127.0.0.1:CDN
            "other-port.gguf": cdn.add("blob/other-port.gguf", tiny).replace("127.0.0.1", "localhost"),
            "same-origin.gguf": hub.add("blob/same-origin.gguf", tiny),
        }
        client = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=cert))
        async with aiohttp.ClientSession(connector=client) as session:
            for name, target in targets.items():
                hub.redirects[f"/o/r/resolve/main/{name}"] = target
                url = model_store.hf_url(f"hf://o/r/{name}", model_store.HF_ENDPOINT)
                assert url.startswith(f"https://localhost:{hub.port}/") and auth_headers(url)
                remote = model_store.remote_files(url, tmp_path / "store").remote[0]
                assert await download(session, remote, Progress(name), margin=0)
                assert remote.path.read_bytes() == tiny
    sent = {r.path: r.authorization for r in [*hub.gets(), *cdn.gets()]}
    assert all(sent[f"/o/r/resolve/main/{name}"] == f"Bearer {SECRET}" for name in targets)  # the hub: yes
    assert sent["/blob/same-origin.gguf"] == f"Bearer {SECRET}"  # a redirect within the hub keeps it
    assert sent["/blob/other-host.gguf"] is None and sent["/blob/other-port.gguf"] is None  # never to the CDN


def test_credentials_in_plain_http_urls_are_refused_off_loopback() -> None:
    with pytest.raises(SourceError, match="clear"):
        remote_url(f"http://me:{SECRET}@models.example/m.gguf")
    assert remote_url(f"http://me:{SECRET}@127.0.0.1:8000/m.gguf")  # the same machine: nothing crosses a network
    assert remote_url(f"https://me:{SECRET}@models.example/m.gguf")


@pytest.mark.anyio
@pytest.mark.parametrize("status", [404, 500])
async def test_a_token_url_that_fails_never_shows_its_token(
    server: ModelServer, tmp_path: Path, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("debug", "json")
    agent = make_agent(tmp_path, Recording())
    server.errors = [status] * 50
    url = server.url(f"m.gguf?token={SECRET}").replace("http://", f"http://user:{SECRET}@")
    await drive(agent, unit(url), lambda: phase(agent)[0] in ("Failed", "Downloading"))
    message = agent.runtimes["d/s"].message
    assert f"HTTP {status}" in message and "m.gguf" in message
    assert SECRET not in str(agent.status())
    assert SECRET not in capsys.readouterr().err


@pytest.mark.anyio
@pytest.mark.parametrize("mode", [0o640, 0o600])
async def test_downloaded_models_get_the_configured_mode(
    server: ModelServer, tiny: bytes, tmp_path: Path, mode: int
) -> None:
    remote = model_store.remote_files(server.add("m.gguf", tiny), tmp_path / "store").remote[0]
    async with aiohttp.ClientSession() as session:
        await download(session, remote, Progress("m.gguf"), margin=0, file_mode=mode)
    assert stat.S_IMODE(remote.path.stat().st_mode) == mode
    assert stat.S_IMODE(remote.path.parent.stat().st_mode) == (0o750 if mode & 0o040 else 0o700)


def test_model_file_mode_setting_refuses_modes_others_may_write() -> None:
    from agent.config.settings import FILE_MODE
    from agent.util.quantity import InvalidValue

    assert FILE_MODE.check("0640", "models.file_mode") == 0o640
    assert FILE_MODE.check("600", "models.file_mode") == 0o600
    for bad in ("0666", "0602", "0040", "rw-r-----", "01777"):
        with pytest.raises(InvalidValue, match=r"models\.file_mode"):
            FILE_MODE.check(bad, "models.file_mode")
