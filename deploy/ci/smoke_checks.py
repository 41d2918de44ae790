"""Checks of the running compose stack from outside its containers (deploy/ci/compose_smoke.sh).

    smoke_checks.py ready URL                 /ready answers 200 within --timeout
    smoke_checks.py api URL [--api-key KEY]   chat and completion, plain = streamed; 401 without the key
    smoke_checks.py traffic URL               mixed load, one stream abandoned mid-way
    smoke_checks.py drain URL -- CMD...       a stream in flight survives CMD (compose stop/down)
    smoke_checks.py prometheus URL            target up; every shipped PromQL expression has data

Each prints what it checked and exits non-zero on the first failure. Stdlib and PyYAML only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import queries
from stream_client import Stream, post_json, stream, stream_chat

QUESTION = "What is the capital of France? Answer in one word."


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_ready(url: str, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                if response.status == 200:
                    print(f"ready: {url}/ready 200")
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = str(exc)
        time.sleep(2)
    raise CheckFailed(f"{url}/ready not 200 after {timeout:.0f}s ({last})")


def model_id(url: str, api_key: str | None) -> str:
    models = post_json(f"{url}/v1/models", None, api_key)
    check(models["status"] == 200, f"/v1/models: {models}")
    return models["body"]["data"][0]["id"]


def plain_and_streamed(url: str, path: str, body: dict, api_key: str | None) -> str:
    """The same greedy request plain and streamed: same text, finish reason and usage; [DONE]."""
    plain = post_json(f"{url}{path}", body, api_key)
    check(plain["status"] == 200, f"{path}: {plain}")
    choice = plain["body"]["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    check(bool(text) and plain["body"]["usage"]["completion_tokens"] <= body["max_tokens"], f"{path}: {plain}")
    run = stream(f"{url}{path}", {**body, "stream_options": {"include_usage": True}}, api_key)
    check(run.status == 200 and run.done and run.error is None, f"{path} stream did not end with [DONE]: {run}")
    check(run.text == text, f"{path}: streamed {run.text!r} != plain {text!r}")
    check(run.finish_reason == choice["finish_reason"], f"{path}: finish {run.finish_reason} != {choice}")
    check(run.usage == plain["body"]["usage"], f"{path}: stream usage {run.usage} != {plain['body']['usage']}")
    return text


def check_auth(url: str, api_key: str) -> None:
    """With a key set, no key and a wrong key are refused with OpenAI's 401."""
    for sent in (None, f"not-{api_key}"):
        refused = post_json(f"{url}/v1/models", None, sent)
        check(refused["status"] == 401, f"key {sent!r} got {refused['status']}, want 401")
        check(refused["body"]["error"]["code"] == "invalid_api_key", f"401 body: {refused['body']}")
    print("api: no key and a wrong key get 401 invalid_api_key")


def check_api(url: str, api_key: str | None) -> None:
    """Greedy chat and completion, plain and streamed, agree; the chat names Paris."""
    if api_key:
        check_auth(url, api_key)
    model = model_id(url, api_key)
    chat = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}
    answer = plain_and_streamed(url, "/v1/chat/completions", chat, api_key)
    check("paris" in answer.lower(), f"the chat answer does not name Paris: {answer!r}")
    completion = {"model": model, "prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0}
    continued = plain_and_streamed(url, "/v1/completions", completion, api_key)
    auth = "with the API key" if api_key else "without an API key"
    print(f"api ({auth}): chat and completion, plain = streamed: {answer!r}; {continued!r}")


def tokens_per_second(url: str, api_key: str | None, model: str) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count to fifty."}],
        "max_tokens": 48,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    run = stream_chat(url, body, api_key)
    check(run.done and run.usage["completion_tokens"] == 48, f"probe stream: {run}")
    return 47 / max(run.last_token_at - run.first_token_at, 1e-3)


def send_traffic(url: str, api_key: str | None) -> None:
    """Requests of every kind the dashboard plots, and one stream the client abandons (an abort)."""
    model = model_id(url, api_key)
    for index in range(6):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me fact {index}."}],
            "max_tokens": 24,
            "temperature": 0.7,
            "seed": index,
        }
        if index % 2:
            check(stream_chat(url, body, api_key).done, "traffic stream")
        else:
            check(post_json(f"{url}/v1/chat/completions", body, api_key)["status"] == 200, "traffic chat")
    completion = {"model": model, "prompt": "The sky is", "max_tokens": 8}
    check(post_json(f"{url}/v1/completions", completion, api_key)["status"] == 200, "completion")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    abandoned = stream_chat(url, body, api_key, stop_after_tokens=3)
    check(not abandoned.done, "the abandoned stream ran to its end")
    print(
        f"traffic: 7 requests and a stream abandoned after 3 tokens; {tokens_per_second(url, api_key, model):.0f} tok/s"
    )


def check_drain(url: str, api_key: str | None, command: list[str], seconds_of_stream: float) -> None:
    """A stream long enough to outlive the signal runs while `command` stops the server: it must
    end with all its tokens, finish_reason "length" and [DONE]."""
    check(bool(command), "drain: give the command that stops the server after --")
    model = model_id(url, api_key)
    rate = tokens_per_second(url, api_key, model)
    max_tokens = max(32, min(1024, int(rate * seconds_of_stream)))
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    started, result = threading.Event(), {}
    reader = threading.Thread(target=lambda: result.update(run=stream_chat(url, body, api_key, on_token=started.set)))
    reader.start()
    check(started.wait(60), "no first token")
    signal_at = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    stopped_at = time.monotonic()
    reader.join(120)
    run: Stream = result["run"]
    check(done.returncode == 0, f"{' '.join(command)}: {done.stderr.strip()}")
    check(run.error is None and run.done, f"stream cut: {run}")
    check(run.finish_reason == "length" and run.usage["completion_tokens"] == max_tokens, f"stream short: {run}")
    check(run.last_token_at > signal_at + 1, "the stream ended before the stop began: nothing was drained")
    what = " ".join(word for word in command[-2:] if not word.endswith(".yml"))
    print(
        f"drain ({what}): {max_tokens}-token stream finished {run.last_token_at - signal_at:.1f}s "
        f"after the stop began, [DONE] sent; the stop took {stopped_at - signal_at:.1f}s"
    )


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> object:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=15) as response:
            payload = json.load(response)
        check(payload["status"] == "success", f"{path}: {payload}")
        return payload["data"]

    def labels_of(self, metric: str) -> set[str]:
        start = str(time.time() - 600)
        return {name for series in self.get("/api/v1/series", **{"match[]": metric, "start": start}) for name in series}

    def problem(self, query: queries.Query) -> str | None:
        """Why `query` fails the check, or None: no series, a NaN, or a label no series has."""
        try:
            result = self.get("/api/v1/query", query=query.runnable)["result"]
        except (urllib.error.HTTPError, CheckFailed) as exc:
            return f"rejected: {exc}"
        if not result:
            return "no data"
        values = [float(item["value"][1]) for item in result]
        if not all(math.isfinite(v) for v in values):
            return f"not a number: {values}"
        names = queries.metric_names(query.runnable)
        known = set().union(*(self.labels_of(m) for m in names)) if names else set()
        unknown = queries.label_names(query.runnable) - known
        return f"labels no series has: {sorted(unknown)}" if unknown else None


def check_prometheus(url: str, timeout: float) -> None:
    prometheus = Prometheus(url)
    deadline = time.monotonic() + timeout
    while not target_up(prometheus):
        check(time.monotonic() < deadline, "the logquant target is not up in Prometheus")
        time.sleep(2)
    print("prometheus: target logquant:8000 up")
    name, metric, label = queries.dashboard_variable_query()
    values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
    check(bool(values), f"dashboard variable ${name}: label_values({metric}, {label}) is empty")
    print(f"prometheus: dashboard variable ${name} = {values}")
    pending = queries.all_queries(values)
    while True:
        problems = {q: p for q in pending if (p := prometheus.problem(q)) is not None}
        if not problems or time.monotonic() > deadline:
            break
        pending = list(problems)
        time.sleep(5)  # a rate() needs two scrapes of the new traffic
    total = len(queries.all_queries(values))
    for query, problem in problems.items():
        print(f"FAIL {query.source}: {problem}\n     {query.runnable}")
    check(not problems, f"{len(problems)} of {total} shipped PromQL expressions fail")
    check_rules(prometheus)
    print(f"prometheus: all {total} expressions (dashboard, alerts, autoscaler) return data with known labels")


def target_up(prometheus: Prometheus) -> bool:
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    return any(t["labels"].get("job") == "logquant" and t["health"] == "up" for t in targets)


def check_rules(prometheus: Prometheus) -> None:
    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    check(len(rules) == len(queries.alert_queries()), f"Prometheus loaded {len(rules)} rules")
    bad = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    check(not bad, f"rules not evaluating: {bad}")
    print(f"prometheus: {len(rules)} alert rules loaded and evaluating ({[r['state'] for r in rules]})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["ready", "api", "traffic", "drain", "prometheus"])
    parser.add_argument("url")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--stream-seconds", type=float, default=6, help="drain: how long the stream should run")
    command = argv[argv.index("--") + 1 :] if "--" in argv else []  # drain: the command that stops the server
    args = parser.parse_args(argv[: len(argv) - len(command) - (1 if command else 0)])
    try:
        if args.check == "ready":
            wait_ready(args.url, args.timeout)
        elif args.check == "api":
            check_api(args.url, args.api_key)
        elif args.check == "traffic":
            send_traffic(args.url, args.api_key)
        elif args.check == "drain":
            check_drain(args.url, args.api_key, command, args.stream_seconds)
        else:
            check_prometheus(args.url, args.timeout)
    except CheckFailed as exc:
        print(f"FAIL {args.check}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
