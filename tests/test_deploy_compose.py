"""The compose stack's settings and the smoke script's helpers, without a Docker engine: an empty
variable means unset; the server starts with exactly the environment that compose makes from
.env.example; the smoke checks' query rewriting and HTTP client are right."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from server_util import MODEL, RunningServer, tiny_core_factory, wait_for

from server.cli import parse_settings
from server.config import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "ci"))
import compose_env  # noqa: E402
import queries  # noqa: E402
import smoke_checks  # noqa: E402
from stream_client import stream  # noqa: E402

CPU_STACK = (ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml")


def test_empty_variable_means_unset_for_every_setting(monkeypatch) -> None:
    """One rule: LOGQUANT_X= (what compose passes for a blank .env entry) is the default."""
    for name in ServerSettings.model_fields:
        monkeypatch.setenv(f"LOGQUANT_{name.upper()}", "")
    assert parse_settings([]).model_dump() == ServerSettings().model_dump()
    monkeypatch.setenv("LOGQUANT_MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("LOGQUANT_API_KEY", "k")
    settings = parse_settings([])
    assert (settings.max_model_len, settings.api_key, settings.served_model_name) == (4096, "k", None)


def test_interpolation_follows_compose() -> None:
    values = {"EMPTY": "", "SET": "x"}
    cases = {
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET-d}": "d",
        "${SET:-d}": "x",
        "${UNSET}": "",
        "$SET/$$": "x/$",
    }
    assert {text: compose_env.interpolate(text, values) for text in cases} == cases


def test_compose_environment_from_env_example() -> None:
    env = compose_env.service_environment("logquant", ROOT / ".env.example", *CPU_STACK)
    assert env["LOGQUANT_MAX_MODEL_LEN"] == env["LOGQUANT_API_KEY"] == env["LOGQUANT_SERVED_MODEL_NAME"] == ""
    assert (env["LOGQUANT_DEVICE"], env["LOGQUANT_KV_CACHE_MEMORY"], env["LOGQUANT_FP_BUDGET"]) == (
        "cpu",
        "1GiB",
        "192",
    )
    tool = compose_env.compose_tool()
    if tool is None:
        pytest.skip("no compose tool on this machine: the environment is computed, not compared")
    args = [arg for path in CPU_STACK for arg in ("-f", str(path))]
    done = subprocess.run(
        [*tool, "--env-file", ".env.example", *args, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert yaml.safe_load(done.stdout)["services"]["logquant"]["environment"] == env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.real_model
@pytest.mark.parametrize("api_key", ["", "smoke-key"])
def test_server_starts_with_the_compose_environment(tmp_path: Path, api_key: str) -> None:
    """The server process gets what compose gives the container from .env.example (with the key
    set or not); only the listening address replaces the image's 0.0.0.0:8000."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        (ROOT / ".env.example").read_text().replace("\nLOGQUANT_API_KEY=\n", f"\nLOGQUANT_API_KEY={api_key}\n")
    )
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LOGQUANT_") or k == "LOGQUANT_CACHE_DIR"}
    env = {
        **inherited,
        **compose_env.service_environment("logquant", env_file, *CPU_STACK),
        "LOGQUANT_HOST": "127.0.0.1",
        "LOGQUANT_PORT": str(port),
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "server.cli"], env=env, stderr=stderr)
    try:
        wait_for(lambda: server.poll() is not None or ready(url), "the server's /ready", limit=240)
        assert server.poll() is None, log.read_text()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        if api_key:
            smoke_checks.check_auth(url, api_key)
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 4
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_alert_expressions_return_their_series() -> None:
    assert queries.returning_series("max(m) > 0.95") == "max(m) > bool 0.95"
    assert queries.returning_series("a > bool 1 and b >= 10") == "a > bool 1 and b >= bool 10"
    untouched = 'histogram_quantile(0.5, sum by (le) (rate(m{le="0.5",x!=""}[1m])))'
    assert queries.returning_series(untouched) == untouched


def test_query_names_and_rendering() -> None:
    assert queries.metric_names("rate(logquant:e2e_request_latency_seconds_bucket[1m])") == {
        "logquant:e2e_request_latency_seconds_bucket"
    }
    assert queries.label_names('sum by (le, tier) (m{model_name=~"a", job!="b"})') == {
        "le",
        "tier",
        "model_name",
        "job",
    }
    assert queries.grafana_regex(["a.b", "c"]) == r"(a\\.b|c)" and queries.grafana_regex(["x-1"]) == "x-1"
    assert queries.without_k8s_matchers('m{namespace!="",pod!=""}') == "m"
    assert queries.without_k8s_matchers('m{namespace!="",job="j"}') == 'm{job="j"}'
    adapter = {q.source: q.runnable for q in queries.adapter_queries()}
    assert adapter["autoscaler: metricsQuery of logquant:num_requests_waiting"] == (
        'sum(logquant:num_requests_waiting{job="logquant"}) by (instance)'
    )


def test_smoke_client_against_a_live_server() -> None:
    """The smoke checks' own HTTP code: plain and streamed answers agree, a key is enforced, a
    stream the client leaves does not reach [DONE]."""
    with RunningServer(tiny_core_factory(), api_key="k") as srv:
        srv.wait_ready()
        smoke_checks.check_auth(srv.url, "k")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        text = smoke_checks.plain_and_streamed(srv.url, "/v1/chat/completions", chat, "k")
        completion = {"model": MODEL, "prompt": "ab", "max_tokens": 8, "temperature": 0}
        assert text and smoke_checks.plain_and_streamed(srv.url, "/v1/completions", completion, "k")
        long = {**chat, "max_tokens": 200, "ignore_eos": True}
        left = stream(f"{srv.url}/v1/chat/completions", long, "k", stop_after_tokens=2)
        assert (left.chunks, left.done, left.status) == (2, False, 200)
        refused = stream(f"{srv.url}/v1/chat/completions", long, None)
        assert refused.status == 401 and refused.error["error"]["code"] == "invalid_api_key"
