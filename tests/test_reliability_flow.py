"""Issue 19, backpressure and connections against a live tiny server: a stream whose client
stops reading pauses its request (bounded buffers) and is aborted after the stall timeout, and
resumes when the client reads again; a non-streaming response that could be too large is
refused up front; uvicorn's limits (concurrency, keep-alive, header and body deadlines) hold,
and the deployment files set them."""

import json
import re
import socket
from pathlib import Path

import httpx
import pytest
import yaml
from server_util import MODEL, RunningServer, tiny_core_factory, wait_for

from server.config import ServerSettings
from server.engine.request import SequenceStatus

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
STREAM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 400,
    "ignore_eos": True,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 20,
}


@pytest.fixture(scope="module")
def srv():
    with RunningServer(
        tiny_core_factory(),
        send_buffer=4096,
        stream_buffer_tokens=4,
        stream_stall_timeout=3.0,
        max_response_bytes=2**20,
        timeout_request_header=1.0,
        timeout_request_body=1.0,
        timeout_keep_alive=1,
    ) as server:
        yield server.wait_ready()


def raw_post(srv, body: dict, receive_buffer: int = 4096) -> socket.socket:
    """POST `body` on a socket with a small receive buffer, and read nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def paused_sequence(srv):
    return next((s for s in srv.core.scheduler.running if s.status is SequenceStatus.PAUSED), None)


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        if chunks[-1].endswith(b"data: [DONE]\r\n\r\n") or b"0\r\n\r\n" in chunks[-1][-8:]:
            break
    return b"".join(chunks)


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, whatever the segments it arrives in."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
        chunk = sock.recv(4096)
        assert chunk, answer
        answer += chunk
    return answer


def _length(answer: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", answer, re.IGNORECASE)
    return int(match.group(1)) if match else 0


def test_a_client_that_stops_reading_pauses_its_request_then_it_is_aborted(srv) -> None:
    sock = raw_post(srv, STREAM)
    try:
        wait_for(lambda: paused_sequence(srv) is not None, "the request paused")
        seq, stream = paused_sequence(srv), next(iter(srv.app.state.logquant.ctx.engine._active.values()))
        generated = len(seq.output_token_ids)
        other = httpx.post(f"{srv.url}{CHAT}", json={**STREAM, "stream": False, "max_tokens": 8, "n": 1}, timeout=60)
        assert other.status_code == 200  # the batch goes on without the paused request
        assert len(seq.output_token_ids) == generated < 400 and stream.unread <= stream.buffer_limit + 1
        wait_for(lambda: seq.is_finished, "the stalled request aborted", limit=20)
        assert seq.finish_reason == "abort" and srv.core.kv_manager.usage == 0
    finally:
        sock.close()


def test_a_paused_stream_resumes_when_its_client_reads(srv) -> None:
    sock = raw_post(srv, {**STREAM, "max_tokens": 200})
    try:
        wait_for(lambda: paused_sequence(srv) is not None, "the request paused")
        text = read_all(sock).decode()
    finally:
        sock.close()
    events = [json.loads(line[6:]) for line in re.findall(r"data: \{.*", text)]
    assert "data: [DONE]" in text and not any("error" in e for e in events)
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in events if e["choices"][0]["logprobs"]) == 200


def test_a_non_streaming_response_that_could_be_too_large_is_refused_up_front(srv) -> None:
    body = {**STREAM, "stream": False, "n": 16, "max_tokens": 300}
    r = httpx.post(f"{srv.url}{CHAT}", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "stream" and "MiB" in error["message"]
    assert httpx.post(f"{srv.url}{CHAT}", json={**body, "n": 1, "max_tokens": 20}, timeout=60).status_code == 200


def test_a_client_that_sends_no_headers_is_disconnected(srv) -> None:
    for partial in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(partial)
            sock.settimeout(10)
            assert sock.recv(1024) == b""  # closed after --timeout-request-header (1 s)


def test_a_body_that_does_not_arrive_in_time_is_a_408(srv) -> None:
    with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        sock.settimeout(10)
        answer = read_response(sock).decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer


def test_an_idle_keep_alive_connection_is_closed(srv) -> None:
    with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)  # --timeout-keep-alive 1 (uvicorn's own default is 5)
        assert read_response(sock).startswith(b"HTTP/1.1 200") and sock.recv(4096) == b""


def test_limit_concurrency() -> None:
    with RunningServer(tiny_core_factory(), limit_concurrency=3) as server:
        server.wait_ready()
        port = int(server.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503, "the limit reached")
        for sock in idle:
            sock.close()
        wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 200, "room again")


def test_defaults_and_deployment_files_set_the_connection_limits() -> None:
    defaults = ServerSettings()
    assert (defaults.limit_concurrency, defaults.timeout_keep_alive) == (512, 5)
    assert (defaults.timeout_request_header, defaults.timeout_request_body) == (20.0, 60.0)
    names = {
        "LOGQUANT_LIMIT_CONCURRENCY",
        "LOGQUANT_TIMEOUT_KEEP_ALIVE",
        "LOGQUANT_TIMEOUT_REQUEST_HEADER",
        "LOGQUANT_TIMEOUT_REQUEST_BODY",
    }
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["logquant"]["environment"]
    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    env = {
        e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e
    }
    for name in names:
        field = name.removeprefix("LOGQUANT_").lower()
        assert field in ServerSettings.model_fields
        assert ServerSettings(**{field: compose[name]}) and ServerSettings(**{field: env[name]})
