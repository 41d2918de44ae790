"""A minimal OpenAI-API client on the standard library: JSON calls and SSE streams, timed."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


def request(url: str, body: dict | None, api_key: str | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    return urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")


def post_json(url: str, body: dict | None, api_key: str | None, timeout: float = 300) -> dict:
    """{"status": HTTP status, "body": parsed JSON}; GET when body is None. Errors are answers too."""
    try:
        with urllib.request.urlopen(request(url, body, api_key), timeout=timeout) as response:
            return {"status": response.status, "body": json.load(response)}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": json.loads(exc.read() or b"null")}


@dataclass
class Stream:
    status: int = 0
    text: str = ""
    chunks: int = 0  # chunks that carried text
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None  # an SSE error event
    done: bool = False  # "data: [DONE]" arrived
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    events: list[str] = field(default_factory=list, repr=False)


def stream(
    url: str,
    body: dict,
    api_key: str | None,
    stop_after_tokens: int | None = None,
    on_token: Callable[[], None] | None = None,
) -> Stream:
    """POST with "stream": true and read the SSE events; stop_after_tokens closes the connection
    early (a client that goes away). Chat chunks carry `delta.content`, completion chunks `text`."""
    run = Stream()
    try:
        response = urllib.request.urlopen(request(url, {**body, "stream": True}, api_key), timeout=300)
    except urllib.error.HTTPError as exc:
        run.status, run.error = exc.code, json.loads(exc.read() or b"null")
        return run
    run.status = response.status
    with response:
        try:
            read_events(run, response, stop_after_tokens, on_token)
        except (OSError, http.client.HTTPException) as exc:  # the connection cut mid-stream
            run.error = {"transport": repr(exc)}
    return run


def read_events(
    run: Stream, response: Iterable[bytes], stop_after_tokens: int | None, on_token: Callable[[], None] | None
) -> None:
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        run.events.append(data)
        if data == "[DONE]":
            run.done = True
            return
        read_event(run, json.loads(data), on_token)
        if stop_after_tokens is not None and run.chunks >= stop_after_tokens:
            return


def read_event(run: Stream, event: dict, on_token: Callable[[], None] | None) -> None:
    if "error" in event:
        run.error = event["error"]
        return
    run.usage = event.get("usage") or run.usage
    for choice in event.get("choices", []):
        piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if piece:
            now = time.monotonic()
            run.first_token_at = run.first_token_at or now
            run.last_token_at = now
            run.text += piece
            run.chunks += 1
            if on_token is not None:
                on_token()
        run.finish_reason = choice.get("finish_reason") or run.finish_reason


def stream_chat(url: str, body: dict, api_key: str | None, **options: object) -> Stream:
    return stream(f"{url}/v1/chat/completions", body, api_key, **options)  # type: ignore[arg-type]
