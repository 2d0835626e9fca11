#!/usr/bin/env python3
"""Runs one call with an official LLM SDK against a base URL and prints one JSON line with
what the SDK saw, for tests/llm_sdk.rs (and by hand: `clients.py list`).

    clients.py CASE [CASE...] --base-url URL [--api-key KEY] [--model M] [--header NAME=VALUE]...

URL is the server's root: the OpenAI SDK is given URL/v1, the others URL. Several cases run
one after the other in this one process, one line each.

The line: {"case", "ok": true, "text", "usage", "status", "headers", "events"} on success,
or {"case", "ok": false, "error": exception class, "status", "message", "body", "headers"}
when the SDK raised. `headers` keeps retry-after, x-ratelimit-*, x-tollgate-* and x-test-*
response headers (read through `with_raw_response`). `usage` is the SDK's own usage object
as a dict. Retries are off, so a 429 is seen as the SDK raises it, not retried.
Exit status 0 when a line was printed (whatever the call did), 3 when the SDK package is not
installed (the line says which).
"""
import argparse
import json
import sys

KEEP = ("retry-after", "x-ratelimit-", "x-tollgate-", "x-test-", "x-llm-")


def keep_headers(h):
    return {k.lower(): v for k, v in h.items()
            if any(k.lower().startswith(p) for p in KEEP)} if h is not None else {}


def dump(obj):
    if obj is None:
        return None
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", exclude_none=True)
    if hasattr(obj, "to_json_dict"):
        return obj.to_json_dict()
    return obj


# ───── OpenAI ─────

def openai_client(a):
    import openai
    return openai.OpenAI(api_key=a.api_key, base_url=a.base_url, max_retries=0, timeout=20,
                         default_headers=a.headers)


def openai_chat(a, stream, include_usage=True):
    c = openai_client(a)
    kw = {"model": a.model, "messages": [{"role": "user", "content": a.prompt}]}
    if stream:
        kw["stream"] = True
        if include_usage:
            kw["stream_options"] = {"include_usage": True}
    raw = c.chat.completions.with_raw_response.create(**kw)
    out = {"status": raw.status_code, "headers": keep_headers(raw.headers)}
    if not stream:
        r = raw.parse()
        return {**out, "text": r.choices[0].message.content, "usage": dump(r.usage)}
    text, usage, events = "", None, 0
    for chunk in raw.parse():
        events += 1
        for ch in chunk.choices:
            text += ch.delta.content or ""
        if chunk.usage is not None:
            usage = dump(chunk.usage)
    return {**out, "text": text, "usage": usage, "events": events}


def openai_responses(a, stream):
    c = openai_client(a)
    kw = {"model": a.model, "input": a.prompt}
    if not stream:
        raw = c.responses.with_raw_response.create(**kw)
        r = raw.parse()
        details = r.incomplete_details
        return {"status": raw.status_code, "headers": keep_headers(raw.headers),
                "text": r.output_text, "usage": dump(r.usage), "response_status": r.status,
                "incomplete_reason": details.reason if details is not None else None}
    raw = c.responses.with_raw_response.create(stream=True, **kw)
    text, usage, events, last = "", None, 0, None
    # The texts the final events repeat (done events, the closing response's output).
    finals, status, reason = [], None, None
    for ev in raw.parse():
        events += 1
        last = ev.type
        if ev.type == "response.output_text.delta":
            text += ev.delta
        elif ev.type == "response.output_text.done":
            finals.append(ev.text)
        elif ev.type == "response.content_part.done" and ev.part.type == "output_text":
            finals.append(ev.part.text)
        elif ev.type == "response.output_item.done" and ev.item.type == "message":
            finals.append("".join(p.text for p in ev.item.content if p.type == "output_text"))
        elif ev.type in ("response.completed", "response.incomplete", "response.failed"):
            finals.append(ev.response.output_text)
            status = ev.response.status
            if ev.response.incomplete_details is not None:
                reason = ev.response.incomplete_details.reason
            if ev.type == "response.completed":
                usage = dump(ev.response.usage)
        elif ev.type == "error":
            reason = ev.code
    return {"status": raw.status_code, "headers": keep_headers(raw.headers), "text": text,
            "usage": usage, "events": events, "last_event": last, "final_texts": finals,
            "response_status": status, "incomplete_reason": reason}


def openai_responses_helper(a):
    """The SDK's own stream helper (`responses.stream`), which checks every event against its
    snapshot (item identities, content indexes) and accumulates the final response."""
    c = openai_client(a)
    text, last, final, status, reason = "", None, None, None, None
    with c.responses.stream(model=a.model, input=a.prompt) as s:
        for ev in s:
            last = ev.type
            if ev.type == "response.output_text.delta":
                text += ev.delta
            elif ev.type == "response.incomplete":
                final, status = ev.response.output_text, ev.response.status
                reason = ev.response.incomplete_details.reason
        if last == "response.completed":
            r = s.get_final_response()
            final, status = r.output_text, r.status
    return {"status": 200, "headers": {}, "text": text, "last_event": last,
            "final_text": final, "response_status": status, "incomplete_reason": reason}


def openai_completions(a, stream):
    c = openai_client(a)
    kw = {"model": a.model, "prompt": a.prompt}
    if stream:
        kw.update(stream=True, stream_options={"include_usage": True})
    raw = c.completions.with_raw_response.create(**kw)
    out = {"status": raw.status_code, "headers": keep_headers(raw.headers)}
    if not stream:
        r = raw.parse()
        return {**out, "text": r.choices[0].text, "usage": dump(r.usage)}
    text, usage, events = "", None, 0
    for chunk in raw.parse():
        events += 1
        for ch in chunk.choices:
            text += ch.text or ""
        if chunk.usage is not None:
            usage = dump(chunk.usage)
    return {**out, "text": text, "usage": usage, "events": events}


def openai_embeddings(a):
    c = openai_client(a)
    raw = c.embeddings.with_raw_response.create(model=a.model, input=a.prompt)
    r = raw.parse()
    return {"status": raw.status_code, "headers": keep_headers(raw.headers),
            "text": "", "dims": len(r.data[0].embedding), "usage": dump(r.usage)}


# ───── Anthropic ─────

def anthropic_messages(a, stream):
    import anthropic
    c = anthropic.Anthropic(api_key=a.api_key, base_url=a.base_url, max_retries=0,
                            timeout=20, default_headers=a.headers)
    kw = {"model": a.model, "max_tokens": 64,
          "messages": [{"role": "user", "content": a.prompt}]}
    if not stream:
        raw = c.messages.with_raw_response.create(**kw)
        r = raw.parse()
        return {"status": raw.status_code, "headers": keep_headers(raw.headers),
                "text": "".join(b.text for b in r.content if b.type == "text"),
                "usage": dump(r.usage)}
    raw = c.messages.with_raw_response.create(stream=True, **kw)
    text, events, kinds = "", 0, []
    usage = {}
    for ev in raw.parse():
        events += 1
        kinds.append(ev.type)
        if ev.type == "message_start":
            usage = dump(ev.message.usage)
        elif ev.type == "content_block_delta" and ev.delta.type == "text_delta":
            text += ev.delta.text
        elif ev.type == "message_delta" and ev.usage is not None:
            # Cumulative: replaces the running output count.
            usage["output_tokens"] = ev.usage.output_tokens
    return {"status": raw.status_code, "headers": keep_headers(raw.headers), "text": text,
            "usage": usage, "events": events, "event_types": kinds}


def anthropic_messages_helper(a):
    """The SDK's own stream helper (`messages.stream`), which accumulates the final message."""
    import anthropic
    c = anthropic.Anthropic(api_key=a.api_key, base_url=a.base_url, max_retries=0,
                            timeout=20, default_headers=a.headers)
    with c.messages.stream(model=a.model, max_tokens=64,
                           messages=[{"role": "user", "content": a.prompt}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    return {"status": 200, "headers": {}, "text": text, "usage": dump(final.usage),
            "final_text": "".join(b.text for b in final.content if b.type == "text")}


# ───── Gemini ─────

def gemini(a, stream):
    from google import genai
    from google.genai import types
    c = genai.Client(api_key=a.api_key, http_options=types.HttpOptions(
        base_url=a.base_url, api_version="v1beta", headers=a.headers, timeout=20000))

    def finish(r):
        cands = r.candidates or []
        fr = cands[0].finish_reason if cands else None
        return getattr(fr, "value", fr)

    if not stream:
        r = c.models.generate_content(model=a.model, contents=a.prompt)
        return {"status": 200, "headers": {}, "text": r.text,
                "usage": dump(r.usage_metadata), "finish_reason": finish(r)}
    text, usage, events, fr = "", None, 0, None
    for r in c.models.generate_content_stream(model=a.model, contents=a.prompt):
        events += 1
        text += r.text or ""
        fr = finish(r) or fr
        if r.usage_metadata is not None:
            usage = dump(r.usage_metadata)
    return {"status": 200, "headers": {}, "text": text, "usage": usage, "events": events,
            "finish_reason": fr}


CASES = {
    "openai.chat": lambda a: openai_chat(a, False),
    "openai.chat.stream": lambda a: openai_chat(a, True),
    "openai.chat.stream.nousage": lambda a: openai_chat(a, True, include_usage=False),
    "openai.responses": lambda a: openai_responses(a, False),
    "openai.responses.stream": lambda a: openai_responses(a, True),
    "openai.responses.stream_helper": openai_responses_helper,
    "openai.completions": lambda a: openai_completions(a, False),
    "openai.completions.stream": lambda a: openai_completions(a, True),
    "openai.embeddings": openai_embeddings,
    "anthropic.messages": lambda a: anthropic_messages(a, False),
    "anthropic.messages.stream": lambda a: anthropic_messages(a, True),
    "anthropic.messages.stream_helper": anthropic_messages_helper,
    "gemini.generate": lambda a: gemini(a, False),
    "gemini.stream": lambda a: gemini(a, True),
}

PACKAGE = {"openai": "openai", "anthropic": "anthropic", "gemini": "google.genai"}


def error_line(e):
    """What the SDK raised: its class, status, message, parsed body and response headers."""
    resp = getattr(e, "response", None)
    status = getattr(e, "status_code", None) or getattr(e, "code", None)
    body = getattr(e, "body", None)
    if body is None and hasattr(e, "details"):
        body = e.details
    return {"ok": False, "error": type(e).__name__,
            "module": type(e).__module__.split(".")[0],
            "status": status if isinstance(status, int) else None,
            "message": str(getattr(e, "message", None) or e), "body": body,
            "headers": keep_headers(getattr(resp, "headers", None))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("case", nargs="+", choices=sorted(CASES) + ["list", "check"])
    p.add_argument("--base-url", default="http://127.0.0.1:8090")
    p.add_argument("--api-key", default="test-key")
    p.add_argument("--model", default="test-model")
    p.add_argument("--prompt", default="Say hello to the gateway")
    p.add_argument("--header", action="append", default=[])
    a = p.parse_args()
    if a.case[0] == "list":
        print("\n".join(sorted(CASES)))
        return 0
    if a.case[0] == "check":
        # Which SDK packages import: the tests skip what is missing.
        have = {}
        for name, mod in PACKAGE.items():
            try:
                __import__(mod)
                have[name] = True
            except ImportError:
                have[name] = False
        print(json.dumps(have))
        return 0
    a.headers = dict(h.split("=", 1) for h in a.header)
    status = 0
    root = a.base_url.rstrip("/")
    for case in a.case:
        a.base_url = root + "/v1" if case.startswith("openai") else root
        status = max(status, run(case, a))
    return status


def run(case, a):
    mod = PACKAGE[case.split(".")[0]]
    try:
        __import__(mod)
    except ImportError as e:
        print(json.dumps({"case": case, "ok": False, "error": "ImportError",
                          "message": f"{mod} is not installed: {e}"}), flush=True)
        return 3
    try:
        out = {"ok": True, **CASES[case](a)}
    except Exception as e:  # noqa: BLE001 - every SDK failure is reported, not raised
        out = error_line(e)
    print(json.dumps({"case": case, **out}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
