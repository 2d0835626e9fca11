#!/usr/bin/env python3
"""Regenerate the ghz configs in this folder (headers.json, body.json, sse.json).

The message sequences match benches/loadgen.rs --mix headers|body|sse. Messages are in
protobuf JSON form: bytes fields (raw_value, body) are base64.
"""
import base64
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SSE_CHUNKS = 20


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def headers(pairs, eos):
    return {"headers": {"headers": [{"key": k, "rawValue": b64(v)} for k, v in pairs]},
            "endOfStream": eos}


def chat_body():
    filler = "Summarise the quarterly report, list the three main risks and suggest next steps. "
    user = ""
    while len(user) < 1850:
        user += filler
    return json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": user.strip()}], "temperature": 0.2, "max_tokens": 512,
        "stream": False, "user": "bench-user-1"}, separators=(",", ":"))


def sse_chunk(i):
    if i + 1 == SSE_CHUNKS:
        return "data: [DONE]\n\n"
    return "data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                                  "created": 1700000000, "model": "gpt-4o-mini", "choices": [
                                      {"index": 0, "delta": {"content": f"token{i} "},
                                       "finish_reason": None}]}, separators=(",", ":")) + "\n\n"


def request_headers(mix, extra=()):
    accept = "text/event-stream" if mix == "sse" else "application/json"
    h = [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "api.example.com"),
         (":scheme", "https"), ("user-agent", "tollgate-ghz/1.0"),
         ("x-request-id", "6b1f0c2e-0000-4000-8000-000000000000"), ("accept", accept),
         ("x-forwarded-proto", "https"), ("x-forwarded-for", "127.0.0.1")]
    return h + list(extra)


def script(mix):
    resp = [(":status", "200"), ("date", "Mon, 01 Jan 2024 00:00:00 GMT")]
    if mix == "headers":
        return [
            {"requestHeaders": headers(request_headers(mix), True), "protocolConfig": {}},
            {"responseHeaders": headers(resp + [("content-type", "application/json"),
                                                ("content-length", "512")], True)},
        ]
    if mix == "body":
        body = chat_body()
        req = request_headers(mix, [("content-type", "application/json"),
                                    ("content-length", str(len(body)))])
        return [
            {"requestHeaders": headers(req, False), "protocolConfig": {"requestBodyMode": "BUFFERED"}},
            {"requestBody": {"body": b64(body), "endOfStream": True}},
            {"responseHeaders": headers(resp + [("content-type", "application/json"),
                                                ("content-length", "512")], True)},
        ]
    msgs = [
        {"requestHeaders": headers(request_headers(mix), True),
         "protocolConfig": {"responseBodyMode": "FULL_DUPLEX_STREAMED"}},
        {"responseHeaders": headers(resp + [("content-type", "text/event-stream"),
                                            ("cache-control", "no-cache")], False)},
    ]
    for i in range(SSE_CHUNKS):
        msgs.append({"responseBody": {"body": b64(sse_chunk(i)), "endOfStream": i + 1 == SSE_CHUNKS}})
    return msgs


def main():
    for mix in ("headers", "body", "sse"):
        cfg = {
            "name": f"ext_proc {mix}",
            "proto": "proto/envoy/service/ext_proc/v3/external_processor.proto",
            "import-paths": ["proto"],
            "call": "envoy.service.ext_proc.v3.ExternalProcessor.Process",
            "host": "127.0.0.1:9002",
            "insecure": True,
            "concurrency": 32,
            "connections": 2,
            "duration": "10s",
            "timeout": "5s",
            "data": script(mix),
        }
        with open(os.path.join(HERE, f"{mix}.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
