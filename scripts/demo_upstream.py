#!/usr/bin/env python3
"""A demo upstream for scripts/demo.sh: echoes what it received as JSON, so you can see the
headers tollgate added; /sse streams server-sent events one every 300 ms. Loopback only.

POSTs to an LLM API path (OpenAI /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/responses, Anthropic /v1/messages, Gemini and Vertex AI ...:generateContent) are answered
as that API does, streamed or not, by scripts/llm_upstream.py (see there for the x-test-*
headers that set the answer, its usage and faults): point an official SDK at the demo, e.g.
`OpenAI(base_url="http://localhost:10000/v1", api_key="k")`.

With `--authz PORT` it also serves, on that port, the authorization service that
policies/service-callout.yaml calls: GET /check?user=U answers {"allowed": .., "tier": ..}:
alice is allowed (tier gold), bob too (silver), slowpoke is answered after 2 s (later than
the callout's timeout), anyone else is refused."""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_upstream  # noqa: E402  (next to this file)


class Handler(llm_upstream.Handler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        if llm_upstream.detect(self.path) and not self.path.startswith("/sse"):
            return super().do_POST()
        return self._echo()

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        if self.path.startswith("/sse"):
            return self._demo_sse()
        out = json.dumps(
            {"method": self.command, "path": self.path,
             "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body},
            indent=2,
        ).encode() + b"\n"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _demo_sse(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(5):
            self._demo_chunk(f'data: {{"i": {i}, "t": {time.time():.3f}}}\n\n'.encode())
            time.sleep(0.3)
        self._demo_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _demo_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_GET = do_PUT = do_DELETE = do_PATCH = _echo

    def log_message(self, fmt, *args):
        pass


class Authz(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    TIERS = {"alice": "gold", "bob": "silver"}

    def do_GET(self):
        user = parse_qs(urlparse(self.path).query).get("user", [""])[0]
        if user == "slowpoke":
            time.sleep(2)
        tier = self.TIERS.get(user)
        out = json.dumps({"allowed": tier is not None, "tier": tier or "none"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--authz" in args:
        i = args.index("--authz")
        authz = ThreadingHTTPServer(("127.0.0.1", int(args[i + 1])), Authz)
        threading.Thread(target=authz.serve_forever, daemon=True).start()
        del args[i : i + 2]
    port = int(args[0]) if args else 8080
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
