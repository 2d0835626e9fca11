#!/usr/bin/env python3
"""A demo upstream for scripts/demo.sh: echoes what it received as JSON, so you can see the
headers tollgate added; /sse streams server-sent events one every 300 ms. Loopback only.

With `--authz PORT` it also serves, on that port, the authorization service that
policies/service-callout.yaml calls: GET /check?user=U answers {"allowed": .., "tier": ..}:
alice is allowed (tier gold), bob too (silver), slowpoke is answered after 2 s (later than
the callout's timeout), anyone else is refused."""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        if self.path.startswith("/sse") or self.path.startswith("/v1/chat/completions") and '"stream": true' in body:
            return self._sse()
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

    def _sse(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(5):
            self._chunk(f'data: {{"i": {i}, "t": {time.time():.3f}}}\n\n'.encode())
            time.sleep(0.3)
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _echo

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
