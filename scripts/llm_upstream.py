#!/usr/bin/env python3
"""A local LLM upstream that speaks every API tollgate understands, streamed and not, with
deterministic answers, so the official SDKs (and tests) can run against it offline.

    python3 scripts/llm_upstream.py [PORT]        (default 8090; 0 picks a free port)

It prints `llm_upstream listening on 127.0.0.1:PORT` once it accepts connections, then one
line per request. Standard library only. Loopback only.

APIs (matched on the path's tail, as tollgate's detector does; POST only):
  */chat/completions   OpenAI Chat Completions: JSON, or SSE `data:` chunks ending with
                       `data: [DONE]`; the usage chunk (empty `choices`) only when the request
                       sets `stream_options.include_usage`; every chunk has `usage: null` then.
  */completions        OpenAI legacy Completions (same streaming rules).
  */embeddings         OpenAI Embeddings (floats, or base64 when `encoding_format: base64`).
  */responses          OpenAI Responses: JSON, or SSE `event:` + `data:` with
                       `sequence_number`, `response.completed` last, no `[DONE]`.
  */v1/messages        Anthropic Messages: JSON, or SSE `message_start` (input and cache usage)
                       ... `ping` ... `message_delta` (cumulative output usage) `message_stop`.
  */models/M:generateContent, */models/M:streamGenerateContent[?alt=sse]
                       Gemini (and Vertex AI's /v1/projects/P/locations/L/publishers/google/
                       models/M:... form): JSON; SSE with `alt=sse`; else one JSON array
                       streamed element by element. `usageMetadata` on the last element.
  GET  /_upstream/requests   every request received so far (method, path, headers, body)
  DELETE /_upstream/requests forget them
Anything else: 404 JSON.

What the answer is, per request (headers, so an SDK can set them with `extra_headers`):
  x-test-reply: TEXT        the answer text (default "Hello from the tollgate test upstream.")
                            Streams send it one word (with its trailing space) per event.
  x-test-usage: prompt=P,completion=C[,cached=K][,cache_creation=W][,reasoning=R]
                            the usage reported. Default: prompt = words in the request's string
                            values (other than model, role, type), completion = words in the
                            answer, the rest 0. Totals are prompt + completion (+ reasoning
                            for Gemini's thoughtsTokenCount, which is billed on top).
  x-test-no-usage: 1        report no usage at all (as an interrupted or misconfigured server)
  x-test-split: N           write every event in N-byte pieces, each its own chunk and TCP write
  x-test-crlf: 1            end SSE lines with CRLF
  x-test-multiline: 1       split each SSE `data:` JSON over two `data:` lines
  x-test-comments: 1        send `: keep-alive` comment lines between events
  x-test-delay-ms: D        pause D ms between events (a slow stream)
  x-test-fault: 500         answer 500 with the API's error JSON
  x-test-fault: 429         answer 429 with the API's error JSON, retry-after: 7 and
                            x-ratelimit-* headers
  x-test-fault-model: M:S[,M:S]
                            answer status S (429 or 5xx, as x-test-fault) when the request
                            names model M (a router's fallback test: only the first model fails)
  x-test-fault: reset       stream half the events, then reset the connection (TCP RST)
  x-test-gate: NAME         stream half the events, then wait until `GET /_upstream/gate/NAME`
                            (at most 20 s; never opened: the connection is reset), then the
                            rest: a test can tell the first events reached the client while
                            the upstream was still generating, with no clock involved
  GET /_upstream/gate/NAME  opens that gate
"""
import base64
import json
import re
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

DEFAULT_REPLY = "Hello from the tollgate test upstream."
_lock = threading.Lock()
_seen = []
_gates = {}


def gate(name):
    with _lock:
        return _gates.setdefault(name, threading.Event())


def words(text):
    """The pieces a stream sends: each word with the whitespace after it."""
    return re.findall(r"\S+\s*", text) or [text]


def prompt_words(v, key=None):
    if isinstance(v, str):
        return 0 if key in ("model", "role", "type") else len(v.split())
    if isinstance(v, list):
        return sum(prompt_words(x) for x in v)
    if isinstance(v, dict):
        return sum(prompt_words(x, k) for k, x in v.items())
    return 0


def detect(path):
    """(api, model from the path, stream shape from the path) or None."""
    p = urlsplit(path)
    tail = p.path.rstrip("/")
    if ":" in tail.rsplit("/", 1)[-1]:
        head, verb = tail.rsplit(":", 1)
        model = head.rsplit("/", 1)[-1]
        if "/models/" not in head or verb not in ("generateContent", "streamGenerateContent"):
            return None
        api = "vertex" if "/projects/" in head else "gemini"
        shape = None
        if verb == "streamGenerateContent":
            alt = parse_qs(p.query).get("alt", [""])[0]
            shape = "sse" if alt == "sse" else "array"
        return api, model, shape
    for suffix, api in (("/chat/completions", "chat"), ("/completions", "completions"),
                        ("/embeddings", "embeddings"), ("/responses", "responses"),
                        ("/messages", "messages")):
        if tail.endswith(suffix):
            return api, None, None
    return None


class Usage:
    def __init__(self, headers, req, reply):
        self.present = headers.get("x-test-no-usage") != "1"
        self.prompt = prompt_words({k: v for k, v in req.items() if k != "model"})
        self.completion = len(reply.split())
        self.cached = self.cache_creation = self.reasoning = 0
        spec = headers.get("x-test-usage")
        if spec:
            for kv in spec.split(","):
                k, _, v = kv.strip().partition("=")
                if k in ("prompt", "completion", "cached", "cache_creation", "reasoning"):
                    setattr(self, k, int(v))

    def openai_chat(self):
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning,
                                              "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}

    def openai_responses(self):
        return {"input_tokens": self.prompt,
                "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.completion,
                "output_tokens_details": {"reasoning_tokens": self.reasoning},
                "total_tokens": self.prompt + self.completion}

    def anthropic(self, output=None):
        return {"input_tokens": self.prompt,
                "cache_creation_input_tokens": self.cache_creation,
                "cache_read_input_tokens": self.cached,
                "output_tokens": self.completion if output is None else output}

    def gemini(self):
        u = {"promptTokenCount": self.prompt, "candidatesTokenCount": self.completion,
             "totalTokenCount": self.prompt + self.completion + self.reasoning}
        if self.cached:
            u["cachedContentTokenCount"] = self.cached
        if self.reasoning:
            u["thoughtsTokenCount"] = self.reasoning
        return u


class Reset(Exception):
    """The answer ended by resetting the connection."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    # ───── plumbing ─────

    def log_message(self, fmt, *args):
        pass

    def _json(self, status, obj, extra=()):
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(out)

    def _start_stream(self, content_type):
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self._events = 0

    def _write(self, data):
        """One event (bytes), in `x-test-split` pieces, each its own chunk and TCP write."""
        if self._fault == "reset" and self._events >= self._reset_at:
            raise Reset()
        if self._gate and self._events == self._reset_at:
            if not gate(self._gate).wait(20):
                raise Reset()
        if self._events and self._comments:
            self._chunk(b": keep-alive" + self._nl + self._nl)
        if self._events and self._delay:
            time.sleep(self._delay)
        step = self._split or len(data) or 1
        for i in range(0, len(data), step):
            self._chunk(data[i:i + step])
            if self._split:
                # Separate TCP segments: the peer sees the event cut across reads.
                time.sleep(0.002)
        self._events += 1

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _sse(self, obj, event=None):
        nl = self._nl
        data = json.dumps(obj)
        if self._multiline and data.startswith("{") and len(data) > 1:
            lines = [b"data: {", b"data: " + data[1:].encode()]
        else:
            lines = [b"data: " + data.encode()]
        if event:
            lines.insert(0, b"event: " + event.encode())
        self._write(nl.join(lines) + nl + nl)

    def _reset(self):
        # SO_LINGER 0 makes close() send RST: the peer sees the stream cut, not ended.
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    # ───── requests ─────

    def do_GET(self):
        if self.path.startswith("/_upstream/gate/"):
            gate(self.path[len("/_upstream/gate/"):]).set()
            return self._json(200, {})
        if self.path == "/_upstream/requests":
            with _lock:
                return self._json(200, list(_seen))
        self._json(404, {"error": {"message": f"no route for GET {self.path}"}})

    def do_DELETE(self):
        if self.path == "/_upstream/requests":
            with _lock:
                _seen.clear()
            return self._json(200, {})
        self._json(404, {"error": {"message": f"no route for DELETE {self.path}"}})

    def do_POST(self):
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            raw = self._read_chunked()
        else:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = raw.decode("utf-8", "replace")
        with _lock:
            _seen.append({"method": self.command, "path": self.path, "headers": headers,
                          "body": body})
        print(f"{self.command} {self.path} {len(raw)} bytes", flush=True)
        found = detect(self.path)
        if not found:
            return self._json(404, {"error": {"message": f"no LLM API at {self.path}"}})
        api, path_model, shape = found
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self._error(api, 400, "the request body is not a JSON object")
        self._nl = b"\r\n" if headers.get("x-test-crlf") == "1" else b"\n"
        self._split = int(headers.get("x-test-split") or 0)
        self._delay = int(headers.get("x-test-delay-ms") or 0) / 1000
        self._multiline = headers.get("x-test-multiline") == "1"
        self._comments = headers.get("x-test-comments") == "1"
        self._fault = headers.get("x-test-fault", "")
        self._gate = headers.get("x-test-gate", "")
        model_named = path_model or req.get("model")
        for item in headers.get("x-test-fault-model", "").split(","):
            m, _, st = item.strip().rpartition(":")
            if m and m == model_named and st.isdigit():
                self._fault = st
        if self._fault == "429":
            pass
        elif self._fault.isdigit() and self._fault != "500" and int(self._fault) >= 500:
            return self._error(api, int(self._fault), "the test upstream failed on purpose")
        if self._fault == "500":
            return self._error(api, 500, "the test upstream failed on purpose")
        if self._fault == "429":
            return self._error(api, 429, "the test upstream is rate limited on purpose", [
                ("retry-after", "7"), ("x-ratelimit-limit-requests", "100"),
                ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "7s")])
        reply = headers.get("x-test-reply", DEFAULT_REPLY)
        usage = Usage(headers, req, reply)
        model = path_model or req.get("model") or "test-model"
        stream = shape is not None or req.get("stream") is True
        pieces = words(reply)
        self._reset_at = max(1, (len(pieces) + 2) // 2)
        try:
            getattr(self, "_" + api)(req, model, reply, pieces, usage, stream, shape)
        except Reset:
            self._reset()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _read_chunked(self):
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def _error(self, api, status, message, extra=()):
        if api == "messages":
            kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
            body = {"type": "error", "error": {"type": kind, "message": message}}
        elif api in ("gemini", "vertex"):
            st = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED"}.get(status, "INTERNAL")
            body = {"error": {"code": status, "message": message, "status": st}}
        else:
            kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status,
                                                                              "server_error")
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        self._json(status, body, extra)

    # ───── OpenAI ─────

    def _chat(self, req, model, reply, pieces, usage, stream, _shape):
        n = int(req.get("n") or 1)
        created = int(time.time())
        if not stream:
            body = {"id": "chatcmpl-test", "object": "chat.completion", "created": created,
                    "model": model, "system_fingerprint": "fp_test",
                    "choices": [{"index": i, "message": {"role": "assistant", "content": reply,
                                                         "refusal": None, "annotations": []},
                                 "logprobs": None, "finish_reason": "stop"} for i in range(n)]}
            if usage.present:
                body["usage"] = usage.openai_chat()
            return self._json(200, body)
        include = bool((req.get("stream_options") or {}).get("include_usage"))
        self._start_stream("text/event-stream; charset=utf-8")

        def chunk(choices):
            c = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": created,
                 "model": model, "system_fingerprint": "fp_test", "choices": choices}
            if include:
                c["usage"] = None
            return c

        for i in range(n):
            self._sse(chunk([{"index": i, "delta": {"role": "assistant", "content": "",
                                                    "refusal": None},
                              "logprobs": None, "finish_reason": None}]))
        for p in pieces:
            for i in range(n):
                self._sse(chunk([{"index": i, "delta": {"content": p}, "logprobs": None,
                                  "finish_reason": None}]))
        for i in range(n):
            self._sse(chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": "stop"}]))
        if include and usage.present:
            c = chunk([])
            c["usage"] = usage.openai_chat()
            self._sse(c)
        self._write(b"data: [DONE]" + self._nl + self._nl)
        self._end_stream()

    def _completions(self, req, model, reply, pieces, usage, stream, _shape):
        created = int(time.time())
        if not stream:
            body = {"id": "cmpl-test", "object": "text_completion", "created": created,
                    "model": model, "choices": [{"text": reply, "index": 0, "logprobs": None,
                                                 "finish_reason": "stop"}]}
            if usage.present:
                u = usage.openai_chat()
                body["usage"] = {k: u[k] for k in
                                 ("prompt_tokens", "completion_tokens", "total_tokens")}
            return self._json(200, body)
        include = bool((req.get("stream_options") or {}).get("include_usage"))
        self._start_stream("text/event-stream; charset=utf-8")
        for k, p in enumerate(pieces):
            last = k == len(pieces) - 1
            c = {"id": "cmpl-test", "object": "text_completion", "created": created,
                 "model": model, "choices": [{"text": p, "index": 0, "logprobs": None,
                                              "finish_reason": "stop" if last else None}]}
            if include:
                c["usage"] = None
            self._sse(c)
        if include and usage.present:
            u = usage.openai_chat()
            self._sse({"id": "cmpl-test", "object": "text_completion", "created": created,
                       "model": model, "choices": [],
                       "usage": {k: u[k] for k in
                                 ("prompt_tokens", "completion_tokens", "total_tokens")}})
        self._write(b"data: [DONE]" + self._nl + self._nl)
        self._end_stream()

    def _embeddings(self, req, model, _reply, _pieces, usage, _stream, _shape):
        inputs = req.get("input")
        if not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        b64 = req.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vec = [((len(json.dumps(item)) * (d + 1)) % 97) / 97.0 for d in range(8)]
            emb = base64.b64encode(struct.pack("<8f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        body = {"object": "list", "data": data, "model": model}
        if usage.present:
            body["usage"] = {"prompt_tokens": usage.prompt, "total_tokens": usage.prompt}
        self._json(200, body)

    def _responses(self, req, model, reply, pieces, usage, stream, _shape):
        created = int(time.time())
        item_id = "msg_test"

        def response(status, output, with_usage):
            r = {"id": "resp_test", "object": "response", "created_at": created,
                 "status": status, "error": None, "incomplete_details": None,
                 "instructions": req.get("instructions"), "max_output_tokens": None,
                 "model": model, "output": output, "parallel_tool_calls": True,
                 "previous_response_id": req.get("previous_response_id"),
                 "reasoning": {"effort": None, "summary": None}, "store": False,
                 "temperature": 1.0, "text": {"format": {"type": "text"}},
                 "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
                 "usage": usage.openai_responses() if with_usage and usage.present else None,
                 "user": None, "metadata": {}}
            return r

        part = {"type": "output_text", "text": reply, "annotations": [], "logprobs": []}
        item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        if not stream:
            return self._json(200, response("completed", [item], True))
        self._start_stream("text/event-stream; charset=utf-8")
        seq = [0]

        def ev(kind, **fields):
            obj = {"type": kind, "sequence_number": seq[0], **fields}
            seq[0] += 1
            self._sse(obj, kind)

        ev("response.created", response=response("in_progress", [], False))
        ev("response.in_progress", response=response("in_progress", [], False))
        ev("response.output_item.added", output_index=0,
           item={**item, "status": "in_progress", "content": []})
        ev("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
           part={**part, "text": ""})
        for p in pieces:
            ev("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
               delta=p, logprobs=[])
        ev("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
           text=reply, logprobs=[])
        ev("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
           part=part)
        ev("response.output_item.done", output_index=0, item=item)
        ev("response.completed", response=response("completed", [item], True))
        self._end_stream()

    # ───── Anthropic ─────

    def _messages(self, req, model, reply, pieces, usage, stream, _shape):
        if not stream:
            body = {"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn",
                    "stop_sequence": None}
            if usage.present:
                body["usage"] = usage.anthropic()
            return self._json(200, body)
        self._start_stream("text/event-stream; charset=utf-8")
        start = {"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                 "content": [], "stop_reason": None, "stop_sequence": None}
        if usage.present:
            # Input and cache counts only here; output so far is 1 (as Anthropic sends).
            start["usage"] = usage.anthropic(output=1)
        self._sse({"type": "message_start", "message": start}, "message_start")
        self._sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, "content_block_start")
        self._sse({"type": "ping"}, "ping")
        for p in pieces:
            self._sse({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": p}}, "content_block_delta")
        self._sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        delta = {"type": "message_delta",
                 "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if usage.present:
            # Cumulative: the whole output count, not an increment.
            delta["usage"] = {"output_tokens": usage.completion}
        self._sse(delta, "message_delta")
        self._sse({"type": "message_stop"}, "message_stop")
        self._end_stream()

    # ───── Gemini / Vertex AI ─────

    def _gemini(self, req, model, reply, pieces, usage, stream, shape):
        def element(text, last):
            cand = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if last:
                cand["finishReason"] = "STOP"
            e = {"candidates": [cand], "modelVersion": model, "responseId": "resp_test"}
            if last and usage.present:
                e["usageMetadata"] = usage.gemini()
            return e

        if not stream:
            return self._json(200, element(reply, True))
        if shape == "sse":
            self._start_stream("text/event-stream")
            for k, p in enumerate(pieces):
                self._sse(element(p, k == len(pieces) - 1))
            return self._end_stream()
        # One JSON array, streamed element by element (as Google's servers format it).
        self._start_stream("application/json; charset=UTF-8")
        for k, p in enumerate(pieces):
            lead = b"[" if k == 0 else b",\r\n"
            self._write(lead + json.dumps(element(p, k == len(pieces) - 1), indent=1).encode())
        self._write(b"]")
        self._end_stream()

    _vertex = _gemini


def serve(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"llm_upstream listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 8090)
