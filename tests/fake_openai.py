"""A stand-in OpenAI-compatible inference server for proxy tests: a real process on a real port, no model.

``/health`` answers 200. A POST answers JSON naming the server (``served_by``: its port) and the ``model`` it was
sent, and the ``Cookie`` it got (with ``set_cookie`` it sets one; with ``pad`` it sends that many characters
more); with ``hang_up`` it closes the connection without an answer; with
``short_by`` it promises that many bytes more than it sends, then hangs up (and appends ``short`` to the file given
as its third argument); with ``close_after`` it drops the connection that many seconds after answering,
unannounced. With ``"stream": true`` it sends ``chunks`` SSE events
``interval`` seconds apart, then closes the connection as llama-server does; when the client goes away
mid-stream it appends ``disconnected`` to the file given as its third argument. ``extraArgs: [N]`` makes the
process hold N MiB more (so that its measured footprint is known).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fake_servers import Executors

from agent.hookspecs import Launch
from agent.sources.units import ServingUnit

SERVER = r"""
import http.server, json, sys, time
port, marker, ballast = int(sys.argv[1]), sys.argv[2], b"x" * (int(sys.argv[3]) << 20)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("hang_up"):  # no answer at all
            self.close_connection = True
            return
        if not body.get("stream"):
            data = json.dumps({"served_by": port, "model": body.get("model"), "path": self.path,
                               "auth": self.headers.get("Authorization"), "cookie": self.headers.get("Cookie"),
                               "pad": "x" * body.get("pad", 0)}).encode()
            short = int(body.get("short_by", 0))  # promise more than comes, then hang up
            self.send_response(200); self.send_header("Content-Type", "application/json")
            if body.get("set_cookie"):
                self.send_header("Set-Cookie", body["set_cookie"] + "; Path=/")
            self.send_header("Content-Length", str(len(data) + short)); self.end_headers(); self.wfile.write(data)
            if short:
                with open(marker, "a") as f: f.write("short\n")
                self.close_connection = True
                return
            if body.get("close_after"):  # keep the connection open a while, then drop it unannounced
                self.wfile.flush(); time.sleep(float(body["close_after"])); self.close_connection = True
            return
        self.send_response(200); self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked"); self.end_headers()
        try:
            for i in range(int(body.get("chunks", 5))):
                event = f"data: {json.dumps({'i': i, 'served_by': port})}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event)); self.wfile.flush()
                time.sleep(float(body.get("interval", 0.05)))
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)); self.wfile.flush()
            self.close_connection = True  # as llama-server does after a stream, without saying so in a header
        except (BrokenPipeError, ConnectionResetError):
            with open(marker, "a") as f: f.write("disconnected\n")
            self.close_connection = True
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class OpenAIServer:
    name = "openai"

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def accepts(self, unit: ServingUnit) -> str | None:
        return None if unit.service.runtime == "openai" else "not mine"

    def command(self, unit: ServingUnit, model_path: Path, port: int) -> Launch:
        ballast = unit.service.extra_args[0] if unit.service.extra_args else "0"
        return Launch(argv=[sys.executable, "-c", SERVER, str(port), str(self.marker), ballast])


def plugin(marker: Path) -> Executors:
    return Executors(OpenAIServer(marker))
