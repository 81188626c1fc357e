"""The /v1 relay's cost: per request and per streamed token, against the same request sent to the server directly.

Run: ``python scripts/bench_proxy.py [REQUESTS]``. Starts ``metal-agent run`` on a tiny GGUF served by real
llama.cpp (xllamacpp), waits for it to be Ready, then alternates direct and proxied requests on kept-alive
connections (so both pay the same connection cost: none) and compares medians:

- per request: a one-token completion (the server's own work is small, so the relay's share shows);
- per streamed token: a 256-token stream, tokens per second end to end.

Targets: under 1 ms added per request, under 5 % less streaming throughput.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf
from agent.processes.ports import free_port

TOKENS = 256
API_VERSION = "inference.llmkube.dev/v1alpha1"
MANIFEST = f"""\
apiVersion: {API_VERSION}
kind: Model
metadata: {{name: bench}}
spec: {{source: {{path}}, hardware: {{accelerator: cpu, memoryBudget: 512Mi}}}}
---
apiVersion: {API_VERSION}
kind: InferenceService
metadata: {{name: bench}}
spec: {{modelRef: bench, contextSize: 2048}}
"""


def post(connection: http.client.HTTPConnection, body: dict[str, object]) -> tuple[float, int]:
    """Seconds for the whole answer, and the number of SSE events in it (0 when not streamed)."""
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - start
    assert response.status == 200, data[:200]
    return elapsed, data.count(b"data: ")


def wait_ready(api: int, timeout: float = 60) -> int:
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


def main(requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_tiny_gguf(folder / "bench.gguf", TinyShape(n_layer=2, n_embd=64))
        (folder / "manifests").mkdir()
        (folder / "manifests" / "bench.yaml").write_text(MANIFEST.replace("{path}", str(model)))
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
            stream = {**one, "max_tokens": TOKENS, "stream": True, "ignore_eos": True}
            for connection in (direct, proxied):  # warm up: connections open, caches filled
                for _ in range(20):
                    post(connection, one)
            times: dict[str, list[float]] = {"direct": [], "proxied": []}
            for _ in range(requests):
                times["direct"].append(post(direct, one)[0])
                times["proxied"].append(post(proxied, one)[0])
            rates: dict[str, list[float]] = {"direct": [], "proxied": []}
            for _ in range(max(10, requests // 10)):
                for name, port in (("direct", server), ("proxied", api)):
                    # llama-server closes the connection after a stream: a new one each time, on both sides
                    seconds, _ = post(http.client.HTTPConnection("127.0.0.1", port), stream)
                    rates[name].append(TOKENS / seconds)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
    d, p = statistics.median(times["direct"]), statistics.median(times["proxied"])
    print(f"per request ({requests} each, median): direct {d * 1e3:.3f} ms, via /v1 {p * 1e3:.3f} ms, "
          f"overhead {(p - d) * 1e3:.3f} ms (target < 1 ms)")  # fmt: skip
    for label, pick in (("median", statistics.median), ("best", max)):
        rd, rp = pick(rates["direct"]), pick(rates["proxied"])
        per_token_us = (1 / rp - 1 / rd) * 1e6
        # The tiny model streams thousands of tokens a second; a real one tens: the same cost per token weighs less.
        at_100 = per_token_us * 100 / 1e6 * 100
        print(f"streaming ({TOKENS} tokens, {label}): direct {rd:.0f} tokens/s, via /v1 {rp:.0f} tokens/s, "
              f"overhead {(1 - rp / rd) * 100:.1f} % (target < 5 %); {per_token_us:.1f} us per token, "
              f"{at_100:.2f} % of a 100 tokens/s model")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
