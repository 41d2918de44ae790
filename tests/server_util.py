"""Run the real app under uvicorn on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx
import openai
import uvicorn
from tiny import byte_tokenizer, tiny_model

from server.api.app import create_app
from server.config import ServerSettings
from server.connection import uvicorn_config
from server.engine.config import EngineConfig
from server.engine.core import EngineCore

MODEL = "tiny-llama"


def tiny_core_factory(policy: str = "logquant", kv_bytes: int = 64 << 20, **engine: object) -> Callable[[], EngineCore]:
    def build() -> EngineCore:
        config = EngineConfig(
            policy=policy,
            fp_budget=24,
            group_size=8,
            kv_cache_memory=kv_bytes,
            device="cpu",
            max_model_len=512,
            max_num_batched_tokens=64,
            **engine,
        )
        return EngineCore(config, tiny_model(), byte_tokenizer())

    return build


def openai_client(server: RunningServer, api_key: str = "unused", timeout: float = 60) -> openai.OpenAI:
    """The official client against a running test server, without retries."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


class RunningServer:
    """The app under uvicorn as the CLI configures it (limits, timeouts), on 127.0.0.1.
    `send_buffer`: SO_SNDBUF of the listening socket, inherited by its connections (a small
    one makes a client that stops reading push back at once); `on_fatal` as for create_app."""

    def __init__(
        self,
        factory: Callable[[], EngineCore],
        send_buffer: int | None = None,
        on_fatal: Callable[[str], None] | None = None,
        **settings: object,
    ) -> None:
        defaults = dict(model=MODEL, policy="logquant", fp_budget=24, group_size=8, port=0, log_level="warning")
        self.settings = ServerSettings(**{**defaults, **settings})
        self.app = create_app(self.settings, factory, on_fatal=on_fatal)
        config = uvicorn_config(self.app, self.settings)
        config.timeout_graceful_shutdown = 5
        self.server = uvicorn.Server(config)
        sockets = [_listening_socket(send_buffer)] if send_buffer is not None else None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        self._wait(lambda: self.server.started, "server start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self) -> RunningServer:
        self._wait(lambda: httpx.get(f"{self.url}/ready").status_code == 200, "readiness")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def core(self) -> EngineCore:
        return self.app.state.logquant.ctx.engine.core

    @staticmethod
    def _wait(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {limit}s for {what}")
            time.sleep(0.02)


def _listening_socket(send_buffer: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_for(condition: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    RunningServer._wait(condition, what, limit)
