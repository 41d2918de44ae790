"""Hostile and careless clients for bench/soak.py (issue 19), and the probes that watch what
they do to everyone else.

Each client sends one request the way an attacker or a broken client would and returns its
outcome, which must be in EXPECTED[kind]: a body of 1.3M token ids, lone surrogates (in a
/tokenize prompt, in a field name), more sequences than one request may hold, a non-streaming
response too large to hold, a stream whose client reads nothing (it pauses, and is aborted
past --stream-stall-timeout), headers sent too slowly (the server closes the connection),
1024 stop tokens and 1024 logit biases, /detokenize of too many ids, grammars with n 4 and
/tokenize of long prompts. `HealthProbe` times /health all along (in its own thread, so that
the clients' own work does not count); `steady_stream` is a well-behaved client that streams
long completions and records the gaps between its tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import threading
import time

import httpx

KINDS = {
    "hostile:huge_ids": 2,
    "hostile:tokenize_surrogate": 2,
    "hostile:field_surrogate": 2,
    "hostile:too_many_sequences": 2,
    "hostile:huge_response": 2,
    "hostile:slow_reader": 1,
    "hostile:slowloris": 1,
    "hostile:heavy_lists": 3,
    "hostile:detokenize_huge": 2,
    "hostile:grammar": 3,
    "hostile:tokenize": 3,
}
OK = {"200", "429"}
EXPECTED = {kind: {"400"} for kind in KINDS} | {
    "hostile:slow_reader": {"aborted", "held", "429"},
    "hostile:slowloris": {"closed"},
    "hostile:heavy_lists": OK,
    "hostile:grammar": OK,
    "hostile:tokenize": OK,
}


class Hostile:
    def __init__(self, url: str, model: str, hold_seconds: float, header_wait: float) -> None:
        """`hold_seconds`: how long a slow reader reads nothing; `header_wait`: how long a slowloris
        waits for the server to close its connection."""
        self.url, self.model, self.hold_seconds, self.header_wait = url, model, hold_seconds, header_wait
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        self.max_model_len = card["max_model_len"]
        self.huge_ids = json.dumps({"model": model, "prompt": [0] * 1_300_000, "max_tokens": 1}).encode()

    def chat(self, content: str = "hi", **extra: object) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **extra}

    async def run(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
        if kind == "hostile:slow_reader":
            return await self.slow_reader()
        if kind == "hostile:slowloris":
            return await self.slowloris()
        path, body = self.request(kind, rng)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client.post(path, content=raw, headers={"content-type": "application/json"})
        return str(response.status_code)

    def request(self, kind: str, rng: random.Random) -> tuple[str, dict | bytes]:
        chat, ids = "/v1/chat/completions", [rng.randrange(3, 200) for _ in range(1024)]
        requests: dict[str, tuple[str, dict | bytes]] = {
            "hostile:huge_ids": ("/v1/completions", self.huge_ids),
            "hostile:tokenize_surrogate": ("/tokenize", b'{"prompt": "a\\ud800"}'),
            "hostile:field_surrogate": (
                chat,
                json.dumps(self.chat()).replace('{"model"', '{"\\udfff": 1, "model"').encode(),
            ),
            "hostile:too_many_sequences": ("/v1/completions", {"model": self.model, "prompt": ["hi"] * 16, "n": 16}),
            "hostile:huge_response": (
                chat,
                self.chat(n=16, logprobs=True, top_logprobs=20, max_tokens=self.max_model_len - 64),
            ),
            "hostile:heavy_lists": (
                chat,
                self.chat(
                    n=2, stop_token_ids=sorted(set(ids)), logit_bias={str(i): rng.uniform(-1, 1) for i in set(ids)}
                ),
            ),
            "hostile:detokenize_huge": ("/detokenize", {"tokens": [5] * (4 * self.max_model_len + 1)}),
            "hostile:grammar": (
                chat,
                self.chat(
                    n=4,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {
                            "name": "x",
                            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                        },
                    },
                ),
            ),
            "hostile:tokenize": ("/tokenize", {"prompt": " ".join(rng.choices("abc def ghi", k=5000))}),
        }
        return requests[kind]

    async def slow_reader(self) -> str:
        """A stream of large events (n 16, 20 top logprobs) on a socket with a 4 KiB receive
        buffer, of which nothing but the status line is read for `hold_seconds`; then what the
        server sent: "aborted" if it ended the stalled stream, "held" if it was still going."""
        body = json.dumps(
            self.chat(
                stream=True, ignore_eos=True, max_tokens=self.max_model_len - 64, n=16, logprobs=True, top_logprobs=20
            )
        ).encode()
        loop, sock = asyncio.get_running_loop(), await self._socket(receive_buffer=4096)
        try:
            await loop.sock_sendall(
                sock,
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            )
            status = (await asyncio.wait_for(loop.sock_recv(sock, 12), 60)).split()[1].decode()
            if status != "200":
                return status
            await asyncio.sleep(self.hold_seconds)  # the socket is not read: the server must push back
            sent, deadline = b"", loop.time() + 5
            while b"data: [DONE]" not in sent[-64:] and (left := deadline - loop.time()) > 0:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 2**20), left)
                except TimeoutError:
                    break
                sent = sent[-4096:] + chunk if chunk else sent  # only the end matters
                if not chunk:
                    break
            return "aborted" if b'"code": "stream_stalled"' in sent else "held"
        finally:
            sock.close()

    async def slowloris(self) -> str:
        """Part of a request's headers, then nothing: the server must close the connection."""
        reader, writer = await asyncio.open_connection(sock=await self._socket())
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            try:
                return "closed" if await asyncio.wait_for(reader.read(), self.header_wait) == b"" else "answered"
            except TimeoutError:
                return "open"
        finally:
            writer.close()

    async def _socket(self, receive_buffer: int | None = None) -> socket.socket:
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        return sock


class HealthProbe:
    """GET /health every `every` seconds in a thread of its own; latencies in seconds."""

    def __init__(self, url: str, every: float = 0.05) -> None:
        self.url, self.every, self.latencies, self.failures = url, every, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(self.every):
                started = time.perf_counter()
                status = client.get(f"{self.url}/health").status_code
                self.latencies.append(time.perf_counter() - started)
                if status != 200:
                    self.failures.append(status)

    def summary(self) -> dict:
        ordered = sorted(self.latencies) or [float("nan")]
        return {
            "count": len(self.latencies),
            "p50_s": round(statistics.median(ordered), 4),
            "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
            "max_s": round(ordered[-1], 4),
            "non_200": self.failures[:10],
        }


async def steady_stream(url: str, model: str, deadline: float, max_tokens: int, gaps: list[float]) -> int:
    """A well-behaved client: stream completions (ignore_eos, `max_tokens` each) until
    `deadline`, appending the gaps between consecutive chunks of a stream to `gaps`; returns
    the number of streams that did not end with every token and [DONE]."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    broken = 0
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline:
            generated, last, done = 0, None, False
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    now = time.monotonic()
                    if line.startswith("data: {"):
                        gaps += [now - last] if last is not None else []
                        last = now
                        generated = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", generated)
                    done = done or line == "data: [DONE]"
            broken += not (done and generated == max_tokens)
    return broken
