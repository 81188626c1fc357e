"""A local HTTP file server on 127.0.0.1 for download tests, with the faults real servers have.

It runs in its own thread and event loop, so both in-process tests and tests of a real agent process can use
it. Every request is logged (method, path, Range, If-Range, status, body bytes sent) for assertions. With
``tls`` it serves https (``self_signed`` makes a certificate for ``localhost`` and 127.0.0.1); ``redirects``
answers a path with a 302 to another URL, as the Hugging Face hub sends a download to its CDN.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from agent.processes.ports import free_port


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int = 0
    sent: int = 0
    authorization: str | None = None


@dataclass
class ModelServer:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> content
    etag_version: int = 1
    cut_after: int | None = None  # drop the next download after this many body bytes (header ranges flow)
    ignore_range: bool = False
    bytes_per_second: int | None = None  # slow: pace the body
    errors: list[int] = field(default_factory=list)  # statuses to answer the next requests with (e.g. 503)
    hold: threading.Event | None = None  # while set: whole-file bodies stall after each chunk (header ranges flow)
    log: list[Request] = field(default_factory=list)
    port: int = 0
    tls: ssl.SSLContext | None = None  # serve https with this context
    host: str = "127.0.0.1"  # the name its URLs use (it listens on 127.0.0.1 either way)
    redirects: dict[str, str] = field(default_factory=dict)  # URL path -> where a 302 sends it

    def url(self, path: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, source: Path | bytes) -> str:
        self.files["/" + path.lstrip("/")] = source if isinstance(source, bytes) else source.read_bytes()
        return self.url(path)

    def etag(self) -> str:
        return f'"v{self.etag_version}"'

    def gets(self, path: str | None = None) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and (path is None or r.path == "/" + path.lstrip("/"))]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        entry = Request(request.method, request.path, request.headers.get("Range"), request.headers.get("If-Range"))
        entry.authorization = request.headers.get("Authorization")
        self.log.append(entry)
        if request.path in self.redirects:
            entry.status = 302
            return web.Response(status=302, headers={"Location": self.redirects[request.path]})
        if self.errors:
            entry.status = self.errors.pop(0)
            return web.Response(status=entry.status)
        data = self.files.get(request.path)
        if data is None:
            entry.status = 404
            return web.Response(status=404)
        start, end = 0, len(data) - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", entry.range or "")
        ranged = match is not None and not self.ignore_range and entry.if_range in (None, self.etag())
        if ranged and match is not None:
            start = int(match[1])
            end = min(end, int(match[2])) if match[2] else end
            if start >= len(data):
                entry.status = 416
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {"ETag": self.etag(), "Accept-Ranges": "bytes", "Content-Length": str(end - start + 1)}
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        response = web.StreamResponse(status=206 if ranged else 200, headers=headers)
        entry.status = response.status
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = data[start : end + 1]
        whole = (entry.range or "-").endswith("-")  # a download, not a header range
        cut = self.cut_after if whole else None
        chunk = 64 << 10
        for offset in range(0, len(body), chunk):
            piece = body[offset : offset + chunk]
            if cut is not None and entry.sent + len(piece) > cut:
                await response.write(piece[: cut - entry.sent])
                entry.sent = cut
                self.cut_after = None
                assert request.transport is not None
                request.transport.close()  # the connection drops mid-body
                return response
            await response.write(piece)
            entry.sent += len(piece)
            if self.bytes_per_second:
                await asyncio.sleep(len(piece) / self.bytes_per_second)
            while self.hold is not None and self.hold.is_set() and whole:
                await asyncio.sleep(0.02)
        await response.write_eof()
        return response


@dataclass
class _Running:
    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner


def serve(server: ModelServer) -> Iterator[ModelServer]:
    """Run ``server`` in a thread until the generator is closed (use from a pytest fixture)."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    server.port = free_port()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", server.port, ssl_context=server.tls).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10), "the test HTTP server did not start"
    try:
        yield server
    finally:
        if server.hold is not None:
            server.hold.clear()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def self_signed(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for ``localhost`` and 127.0.0.1 made with the openssl command (the test is skipped without
    it): its file, for a client to trust, and a server context that presents it."""
    import pytest

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context
