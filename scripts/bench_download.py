"""Download throughput and remote pre-flight cost against a local HTTP server (127.0.0.1, no network).

- throughput: the agent's download (sha256 while writing, ``.partial``, fsync, atomic rename) of a random file,
  beside a plain aiohttp read that throws the bytes away: the cost of verifying and storing;
- remote pre-flight: the bytes and requests needed to size a model with a Qwen-sized header (152k vocabulary,
  1,800 tensors) by HTTP Range, and the time it takes.

Run: python scripts/bench_download.py [MiB]   (default 512)
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_header_scan import write_big_header

from agent.models.download import READ_BUFFER, Progress, download
from agent.models.model_store import remote_files
from agent.models.remote_header import fetch_header, remote_shape
from agent.processes.ports import free_port


async def bench(folder: Path, mib: int) -> None:
    served = folder / "served"
    served.mkdir()
    data = served / "random.gguf"
    with data.open("wb") as file:
        for _ in range(mib):
            file.write(os.urandom(1 << 20))
    write_big_header(served / "big.gguf")
    requests: list[tuple[str, str | None]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        requests.append((request.path, request.headers.get("Range")))
        return web.FileResponse(served / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(read_bufsize=READ_BUFFER) as session:
            start = time.perf_counter()
            async with session.get(f"{base}/random.gguf") as response:
                async for _ in response.content.iter_chunked(1 << 20):
                    pass
            raw = time.perf_counter() - start

            files = remote_files(f"{base}/random.gguf", folder / "store")
            digest = await anyio.to_thread.run_sync(lambda: hashlib.sha256(data.read_bytes()).hexdigest())
            start = time.perf_counter()
            await download(session, files.remote[0], Progress("random.gguf"), digest, margin=0)
            agent = time.perf_counter() - start
            print(f"download of {mib} MiB: plain read {mib / raw:.0f} MiB/s, agent (sha256 + write + rename) "
                  f"{mib / agent:.0f} MiB/s ({agent / raw:.2f}x the time)")  # fmt: skip

            requests.clear()
            big = remote_files(f"{base}/big.gguf", folder / "store")
            start = time.perf_counter()
            header = await fetch_header(session, big.remote[0])
            shape = remote_shape(big, {str(big.path): header})
            elapsed = time.perf_counter() - start
            size = (served / "big.gguf").stat().st_size
            print(f"remote pre-flight of a {size / 2**20:.1f} MiB header ({shape.tensor_count} tensors): "
                  f"{len(requests)} range requests, {header.fetched_bytes / 2**20:.1f} MiB fetched, "
                  f"{elapsed * 1000:.0f} ms")  # fmt: skip
    finally:
        await runner.cleanup()


def main() -> int:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(bench, Path(tmp), mib)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
