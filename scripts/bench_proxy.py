"""The /v1 relay's cost: per request and per streamed token, against the same request sent to the server directly.

Run: ``python scripts/bench_proxy.py [--requests N] [--streams N] [--model tiny|paced|both] [--server-threads N]``.
Starts ``metal-agent run`` on a generated GGUF served by real llama.cpp (xllamacpp), waits for it to be Ready,
then compares direct and proxied requests:

- per request: one-token completions on kept-alive connections, alternating (the server's own work is small, so
  the relay's share shows); medians;
- per streamed token: pairs of streams, one direct and one proxied, in alternating order (the machine's speed
  drifts; a pair sees the same), each on a new connection (llama-server closes it after a stream); the loss is the
  median over pairs of 1 - proxied rate / direct rate;
- the agent's CPU time (user + system, as the kernel accounts it) per request and per proxied token.

Two models: ``tiny`` (2 layers, 64 wide) streams thousands of tokens a second on a CPU, each token a chunk: the
relay's worst case, where its per-chunk cost is the largest share. ``paced`` (4 layers, 1,024 wide, f16, 130 MiB)
streams about 110 a second on a 2-core CPU, the pace of a 7-8B model on a laptop's GPU, where the share is what a
user sees. On a CPU-only host the server's threads use every core, so the relay's CPU comes out of generation;
with the model on a GPU it does not (``--server-threads 1`` leaves a core free, to see that case).

Targets: under 1 ms added per request, under 5 % less streaming throughput.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes.ports import free_port

API_VERSION = "inference.llmkube.dev/v1alpha1"
MANIFEST = f"""\
apiVersion: {API_VERSION}
kind: Model
metadata: {{name: bench}}
spec: {{source: {{path}}, hardware: {{accelerator: cpu, memoryBudget: 2Gi}}}}
---
apiVersion: {API_VERSION}
kind: InferenceService
metadata: {{name: bench}}
spec: {{modelRef: bench, contextSize: 2048, extraArgs: {{extra}}}}
"""


@dataclass(frozen=True)
class Bench:
    shape: TinyShape
    tokens: int  # per stream: enough that the per-request cost (measured apart) weighs little in the rate


MODELS = {
    "tiny": Bench(TinyShape(n_layer=2, n_embd=64), tokens=1024),
    "paced": Bench(TinyShape(n_layer=4, n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, weight_type="f16"), 256),
}


def post(connection: http.client.HTTPConnection, body: dict[str, object]) -> float:
    """Seconds for the whole answer."""
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - start
    assert response.status == 200, data[:200]
    return elapsed


def wait_ready(api: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/status", timeout=2) as response:
                units = json.load(response)["units"]
            if units and units[0]["phase"] == "Ready":
                return int(units[0]["port"])
        except OSError:
            pass
        time.sleep(0.1)  # between looks at the agent's status
    raise SystemExit("the server did not become Ready")


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time the process has used (user and system)."""
    times = process.cpu_times()
    return times.user + times.system


def measure(name: str, bench: Bench, requests: int, streams: int, server_threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_tiny_gguf(folder / "bench.gguf", bench.shape)
        (folder / "manifests").mkdir()
        extra = json.dumps(["--threads", str(server_threads)] if server_threads else [])
        manifest = MANIFEST.replace("{path}", str(model)).replace("{extra}", extra)
        (folder / "manifests" / "bench.yaml").write_text(manifest)
        api = free_port()
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--manifests", str(folder / "manifests"),
             "--state-dir", str(folder / "state"), "--api-port", str(api), "--model-root", str(folder),
             "--model-store", str(folder / "store"), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
        )  # fmt: skip
        try:
            server = wait_ready(api)
            direct = http.client.HTTPConnection("127.0.0.1", server)
            proxied = http.client.HTTPConnection("127.0.0.1", api)
            one = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            stream = {**one, "max_tokens": bench.tokens, "stream": True, "ignore_eos": True}
            for connection in (direct, proxied):  # warm up: connections open, caches filled
                for _ in range(10):
                    post(connection, one)
            relay = psutil.Process(agent.pid)
            cpu_before = cpu_seconds(relay)
            times: dict[str, list[float]] = {"direct": [], "proxied": []}
            for i in range(requests):
                pair = (("direct", direct), ("proxied", proxied))
                for side, connection in pair if i % 2 else reversed(pair):
                    times[side].append(post(connection, one))
            cpu_request = (cpu_seconds(relay) - cpu_before) / requests
            cpu_before = cpu_seconds(relay)
            rates: dict[str, list[float]] = {"direct": [], "proxied": []}
            for i in range(streams):
                pair = (("direct", server), ("proxied", api))
                for side, port in pair if i % 2 else reversed(pair):
                    rates[side].append(bench.tokens / post(http.client.HTTPConnection("127.0.0.1", port), stream))
            cpu_token = (cpu_seconds(relay) - cpu_before) / (streams * bench.tokens)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    d, p = statistics.median(times["direct"]), statistics.median(times["proxied"])
    print(f"{name}: per request ({requests} each, median): direct {d * 1e3:.3f} ms, via /v1 {p * 1e3:.3f} ms, "
          f"added {(p - d) * 1e3:.3f} ms (target < 1 ms); "
          f"the agent's CPU {cpu_request * 1e3:.3f} ms per request")  # fmt: skip
    losses = sorted(1 - rp / rd for rd, rp in zip(rates["direct"], rates["proxied"], strict=True))
    rd, rp = statistics.median(rates["direct"]), statistics.median(rates["proxied"])
    loss = statistics.median(losses)
    print(f"{name}: streaming ({bench.tokens} tokens, {streams} pairs): direct {rd:.0f} tokens/s, via /v1 "
          f"{rp:.0f} tokens/s (medians); loss {loss * 100:.1f} % (median of pairs; quartiles "
          f"{losses[len(losses) // 4] * 100:.1f} to {losses[3 * len(losses) // 4] * 100:.1f} %; target < 5 %); the "
          f"agent's CPU {cpu_token * 1e6:.0f} us per proxied token, idle waits included")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300, help="one-token requests each way (default 300)")
    parser.add_argument("--streams", type=int, default=20, help="stream pairs (default 20)")
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument(
        "--server-threads", type=int, default=0, help="llama.cpp's --threads (default: its own choice, every core)"
    )
    args = parser.parse_args()
    for name, bench in MODELS.items():
        if args.model in (name, "both"):
            measure(name, bench, args.requests, args.streams, args.server_threads)


if __name__ == "__main__":
    main()
