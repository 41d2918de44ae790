"""Auth, readiness, disconnects, metrics and shutdown of the real server."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from server_util import MODEL, RunningServer, openai_client, tiny_core_factory, wait_for

from server.cli import parse_settings

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}


def scrape(url: str) -> dict[str, float]:
    """name{labels} -> value, from /metrics parsed by prometheus-client's parser."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_api_key_required_except_health_and_metrics() -> None:
    with RunningServer(tiny_core_factory(), api_key="s3cret") as srv:
        srv.wait_ready()
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=BODY)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        bad = httpx.post(f"{srv.url}/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        client = openai_client(srv, api_key="s3cret")
        assert client.chat.completions.create(**BODY).choices[0].message.role == "assistant"
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200


def test_not_ready_is_503_until_loaded() -> None:
    release = threading.Event()
    factory = tiny_core_factory()

    def slow_factory():
        release.wait(60)
        return factory()

    with RunningServer(slow_factory) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=BODY).status_code == 503
        release.set()
        srv.wait_ready()
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=BODY).status_code == 200


def test_metrics_parse_and_move(srv) -> None:
    before = scrape(srv.url)
    assert before["logquant:kv_cache_capacity_bytes{}"] == srv.core.kv_manager.capacity_bytes
    info = [k for k in before if k.startswith("logquant:cache_config_info")][0]
    assert "policy=logquant" in info and "fp_budget=24" in info and "device=cpu" in info
    client = openai_client(srv, api_key="x")
    long_prompt = [{"role": "user", "content": "word " * 40}]
    r = client.chat.completions.create(
        model=MODEL, messages=long_prompt, max_tokens=10, extra_body={"ignore_eos": True}
    )
    after = scrape(srv.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("logquant:prompt_tokens_total{}") == r.usage.prompt_tokens
    assert delta("logquant:generation_tokens_total{}") == 10
    assert delta("logquant:request_success_total{finished_reason=length}") == 1
    for hist in [
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ]:
        assert delta(f"logquant:{hist}_count{{}}") == 1, hist
    assert delta("logquant:inter_token_latency_seconds_count{}") == 9
    assert delta("logquant:request_generation_tokens_sum{}") == 10
    assert after["logquant:num_requests_running{}"] == 0 and after["logquant:kv_cache_usage_perc{}"] == 0
    for name in [
        "logquant:num_requests_waiting{}",
        "logquant:kv_cache_bytes{tier=fp}",
        "logquant:kv_cache_bytes{tier=2bit}",
        "logquant:kv_compression_ratio{}",
        "logquant:num_preemptions_total{}",
    ]:
        assert name in after, name


def test_kv_metrics_while_running_and_disconnect_frees_pages(srv) -> None:
    body = {
        **BODY,
        "messages": [{"role": "user", "content": "word " * 40}],
        "max_tokens": 250,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        wait_for(lambda: scrape(srv.url)["logquant:kv_cache_bytes{tier=2bit}"] > 0, "2-bit pages in use")
        live = scrape(srv.url)
        used = live["logquant:kv_cache_bytes{tier=fp}"] + live["logquant:kv_cache_bytes{tier=2bit}"]
        assert live["logquant:num_requests_running{}"] == 1
        assert live["logquant:kv_cache_usage_perc{}"] == pytest.approx(
            used / live["logquant:kv_cache_capacity_bytes{}"]
        )
        assert live["logquant:kv_compression_ratio{}"] > 1.0
    # the client went away mid-stream: the request is aborted and its pages are freed
    wait_for(lambda: scrape(srv.url)["logquant:kv_cache_usage_perc{}"] == 0, "pages freed after disconnect")
    final = scrape(srv.url)
    assert final["logquant:num_requests_running{}"] == 0
    assert final.get("logquant:request_success_total{finished_reason=abort}", 0) >= 1


def test_non_streaming_disconnect_aborts(srv) -> None:
    body = {**BODY, "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=0.3)
    wait_for(lambda: scrape(srv.url)["logquant:num_requests_running{}"] == 0, "abort after disconnect")
    assert scrape(srv.url)["logquant:kv_cache_usage_perc{}"] == 0


def test_settings_from_cli_and_env(monkeypatch) -> None:
    monkeypatch.setenv("LOGQUANT_FP_BUDGET", "128")
    monkeypatch.setenv("LOGQUANT_API_KEY", "k")
    s = parse_settings(["--policy", "kivi", "--kv-cache-memory", "2GiB", "--max-num-seqs", "8"])
    assert (s.policy, s.fp_budget, s.api_key, s.max_num_seqs) == ("kivi", 128, "k", 8)
    assert s.engine_config().kv_cache_memory == 2 * 2**30
    with pytest.raises(ValidationError, match="cannot parse a byte size"):
        parse_settings(["--kv-cache-memory", "lots"])


def test_sigterm_drains_and_exits_zero(tmp_path) -> None:
    from tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    env = {
        **os.environ,
        "LOGQUANT_MODEL": str(model_dir),
        "LOGQUANT_KV_CACHE_MEMORY": "32MiB",
        "LOGQUANT_PORT": "0",
        "LOGQUANT_DEVICE": "cpu",
        "LOGQUANT_POLICY": "logquant",
    }
    proc = subprocess.Popen([sys.executable, "-m", "server.cli"], env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "Uvicorn running on" in line:
            url = line.split("running on ")[1].split()[0]
            break
    wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, "ready", limit=120)
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "ignore_eos": True}
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120))
    )
    worker.start()
    wait_for(lambda: scrape(url)["logquant:num_requests_running{}"] == 1, "request running")
    proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert proc.wait(60) == 0
    # the in-flight request was drained, not cut
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 300


def test_one_structured_log_line_per_request_without_prompt(srv, caplog) -> None:
    import logging

    from server.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="logquant.requests")
    httpx.post(f"{srv.url}/v1/chat/completions", json={**BODY, "user": "u-42"}, timeout=60)
    records = [r for r in caplog.records if r.name == "logquant.requests"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["endpoint"] == "chat" and line["user"] == "u-42" and line["completion_tokens"] >= 1
    assert "prompt" not in line and "hello there" not in json.dumps(line)


def test_engine_step_failure_fails_requests_without_hanging(srv) -> None:
    runner = srv.core.runner
    original = runner.execute

    def broken(*args, **kwargs):
        runner.execute = original  # fail once
        raise RuntimeError("simulated device error")

    runner.execute = broken
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=BODY, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "server_error" and error["code"] == "internal_error"
    assert "simulated" not in error["message"] and re.search(r"request id chatcmpl-[0-9a-f]{32}", error["message"])
    assert httpx.post(f"{srv.url}/v1/chat/completions", json=BODY, timeout=60).status_code == 200
    wait_for(lambda: scrape(srv.url)["logquant:kv_cache_usage_perc{}"] == 0, "pages freed")
