"""Issue 13 for operators: settings that cannot work stop the process with one line and a
non-zero exit; --help; past the shutdown grace period requests end in OpenAI's shape."""

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
import uvicorn
from server_util import MODEL, RunningServer, tiny_core_factory, wait_for

from server.cli import DrainingServer, main, parse_settings
from server.config import ServerSettings


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "/nonexistent"], "--model: the path /nonexistent does not exist"),
        (["--kv-cache-memory", "0"], "--kv-cache-memory: must be a positive size"),
        (["--group-size", "7"], "--group-size: must be a power of two"),
        (["--max-waiting-requests", "0"], "--max-waiting-requests: Input should be greater than or equal to 1"),
        (["--kv-bits", "3"], "--kv-bits: must be 2, 4 or 8"),
        (["--sink-tokens", "-1"], "--sink-tokens: Input should be greater than or equal to 0"),
    ],
)
def test_settings_errors_exit_with_one_line(args: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    message = str(exited.value.code)
    assert message.startswith(f"logquant-serve: error: {expected}") and "\n" not in message


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LOGQUANT_PORT": "0", "LOGQUANT_DEVICE": "cpu", **env}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], env=full_env, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--kv-cache-memory", "1KiB"], "one page"),
        (["--max-model-len", "999999"], "exceeds the model's 2048 positions"),
    ],
)
def test_settings_the_model_rejects_stop_the_process(tiny_dir, args: list[str], expected: str) -> None:
    """Checked once the model is known: the server stops instead of running with /ready at 503."""
    done = run_cli({"LOGQUANT_MODEL": str(tiny_dir)}, *args)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("logquant-serve: error: ") and expected in last


def test_missing_model_path_exits_before_loading() -> None:
    done = run_cli({}, "--model", "/nonexistent")
    assert done.returncode == 1
    assert done.stderr.strip() == "logquant-serve: error: --model: the path /nonexistent does not exist"


def test_help_lists_env_vars_without_doubled_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    for name in ServerSettings.model_fields:
        assert f"LOGQUANT_{name.upper()}" in text, name
    assert text.count("default:") == text.count("(default:") <= len(ServerSettings.model_fields)  # one each


def test_allowed_origins_from_flag_and_env(monkeypatch) -> None:
    assert parse_settings([]).allowed_origins == []
    assert parse_settings(["--allowed-origins", '["https://a.example","https://b.example"]']).allowed_origins == [
        "https://a.example",
        "https://b.example",
    ]
    monkeypatch.setenv("LOGQUANT_ALLOWED_ORIGINS", '["https://c.example"]')
    assert parse_settings([]).allowed_origins == ["https://c.example"]


class DrainingRunningServer(RunningServer):
    """RunningServer under the CLI's DrainingServer, so a shutdown signal can be simulated."""

    def __init__(self, factory, **settings: object) -> None:
        super().__init__(factory, **settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
        self.server = DrainingServer(config, self.app.state.logquant)
        self.thread = threading.Thread(target=self.server.run, daemon=True)


def test_past_the_grace_period_requests_end_with_503_in_openai_shape() -> None:
    """A stream that has started gets an error event then [DONE]; a non-streaming request gets
    a JSON 503 `server_shutting_down`. The engine is held, so neither can finish in time."""
    with DrainingRunningServer(tiny_core_factory(), shutdown_grace_seconds=0.5) as srv:
        core = srv.wait_ready().core
        hold, gate, step = threading.Event(), threading.Event(), core.step
        core.step = lambda: (gate.wait(60) if hold.is_set() else None, step())[1]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": True}
        result: dict = {}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            first = [next(lines), next(lines)]  # the role chunk and a first token
            hold.set()
            worker = threading.Thread(
                target=lambda: result.update(r=httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60))
            )
            worker.start()
            engine = srv.app.state.logquant.ctx.engine
            wait_for(lambda: len(engine._active) == 2, "both requests in the engine")
            srv.server.handle_exit(signal.SIGTERM, None)
            rest = list(lines)
        worker.join(60)
        gate.set()
    assert all(json.loads(line.removeprefix("data: "))["choices"] for line in first)
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert rest[-1] == "data: [DONE]"
    assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable"
    response = result["r"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "server_shutting_down"


def test_make_test_puts_the_venv_tools_on_path() -> None:
    """hadolint and schemathesis come with the dev extras into .venv/bin: `make test` must find them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    recipe = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert f'PATH="{root}/.venv/bin:$PATH"' in recipe.splitlines()[-1]
