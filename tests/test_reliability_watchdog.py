"""Issue 19, the engine watchdog: if the engine thread dies outside a step (delivering tokens,
taking a command) or one step stalls past --step-timeout, /health and /ready say 503, every
waiting request ends with a 503 `engine_dead` in OpenAI's shape, and the process exits 1."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
from server_util import MODEL, RunningServer, tiny_core_factory, wait_for

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_engine_dead(server, fatal: list[str], responses: list[httpx.Response], reason: str) -> None:
    for r in responses:
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead", r.text
        assert r.json()["error"]["type"] == "service_unavailable"
    wait_for(lambda: bool(fatal), "the server told to stop")
    assert reason in fatal[0]
    for path in ("/health", "/ready"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    later = httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=30)
    assert later.status_code == 503


@pytest.mark.parametrize("where", ["_deliver", "_add"])
def test_engine_thread_death_outside_a_step(where: str) -> None:
    """_deliver dies with the request in the engine; _add dies while taking the command (the
    request was never added, so only the watchdog can end its wait)."""
    fatal: list[str] = []
    with RunningServer(tiny_core_factory(), on_fatal=fatal.append) as server:
        engine = server.wait_ready().app.state.logquant.ctx.engine

        def broken(*args, **kwargs):
            raise RuntimeError(f"simulated failure in {where}")

        setattr(engine, where, broken)
        r = httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=30)
        assert_engine_dead(server, fatal, [r], f"the engine thread died (RuntimeError: simulated failure in {where})")


def test_a_stalled_step_fails_requests_and_stops_the_server() -> None:
    fatal: list[str] = []
    with RunningServer(tiny_core_factory(), on_fatal=fatal.append, step_timeout=1.0) as server:
        core = server.wait_ready().core
        gate, step = threading.Event(), core.step
        core.step = lambda: (gate.wait(60), step())[1]
        try:
            responses: list[httpx.Response] = []
            workers = [
                threading.Thread(
                    target=lambda: responses.append(
                        httpx.post(f"{server.url}/v1/chat/completions", json=BODY, timeout=30)
                    )
                )
                for _ in range(2)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
            assert_engine_dead(server, fatal, responses, "an engine step has run for more than 1 s")
        finally:
            gate.set()


def test_the_process_exits_non_zero_when_the_engine_dies(tmp_path) -> None:
    from tiny import save_tiny

    sys.path.insert(0, str(ROOT / "bench"))
    from serve import free_port

    model, port = save_tiny(tmp_path / "model"), free_port()
    script = textwrap.dedent(f"""
        from server.cli import main
        from server.engine.async_engine import AsyncEngine
        deliver = AsyncEngine._deliver
        def broken(self, updated):
            if any(s.request_id.startswith("chatcmpl") for s in updated):
                raise RuntimeError("simulated")
            deliver(self, updated)
        AsyncEngine._deliver = broken
        main(["--model", "{model}", "--port", "{port}", "--device", "cpu", "--log-level", "warning"])
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(f"{url}/ready") == 200, "ready", limit=120)
        body = {**BODY, "model": str(model)}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        code = proc.wait(60)
    finally:
        proc.kill()
    last = proc.stderr.read().strip().splitlines()[-1]
    assert r.status_code == 503 and code == 1
    assert last == "logquant-serve: error: the engine thread died (RuntimeError: simulated)"


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
