#!/usr/bin/env bash
# compose_smoke.sh [--cold]: build the CPU image offline and run the compose stack, then check
# it from outside the containers. CI runs it after the tests (.ci/run); run it yourself as root.
#   1. Docker: installs Debian's docker.io (and docker-compose when no compose plugin) and
#      starts dockerd when none runs; exit 77 when Docker cannot run on this machine.
#   2. Images, with no network in the builds: the Debian base (deploy/docker/base-image.sh), the
#      wheelhouse (deploy/docker/wheelhouse.sh), the server (Dockerfile, target cpu) and
#      Prometheus (Debian's package). The GPU target only with SMOKE_GPU=1 (a GPU node with
#      network access), which also runs the stack below with docker-compose.gpu.yml.
#   3. The stack as shipped: docker-compose.yml + docker-compose.cpu.yml, .env.example's values
#      (host ports on 127.0.0.1, the offline images), Grafana left out (no Debian package).
#   4. The checks of deploy/ci/smoke_checks.py: /ready, the API with and without a key, every
#      shipped PromQL expression in Prometheus, drains on `stop` and on `down`; and non-root,
#      the healthcheck, the C++ toolchain for torch extensions, the image size.
# --cold removes this script's images, the wheelhouse and the Debian packages first, and
# bypasses pip's cache (a first run's timing).
set -eEuo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/build/smoke
API_PORT=${SMOKE_API_PORT:-18000}
PROMETHEUS_PORT=${SMOKE_PROMETHEUS_PORT:-19090}
BASE_IMAGE=logquant-base:bookworm
PROMETHEUS_IMAGE=logquant-prometheus:bookworm
CUDA_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
STACK=cpu
STACK_IMAGE=logquant-serve:latest-cpu
if [[ -n ${SMOKE_GPU:-} ]]; then  # a GPU node: the GPU image and the GPU stack (needs the network)
  STACK=gpu
  STACK_IMAGE=logquant-serve:latest
fi
API=http://127.0.0.1:$API_PORT
SKIPPED=()
mkdir -p "$OUT/logs"
# shellcheck source=deploy/ci/smoke_lib.sh
source deploy/ci/smoke_lib.sh
trap on_error ERR
trap 'stack_down; stop_our_dockerd' EXIT

ensure_docker  # quiet: where Docker cannot run, its one SKIPPED line is all this script prints
echo "== docker: $DOCKER_VERSIONS${DOCKERD_PID:+ (dockerd started by this script, pid $DOCKERD_PID)}"
if [[ ${1:-} == --cold ]]; then
  docker rmi "$BASE_IMAGE" "$PROMETHEUS_IMAGE" logquant-serve:latest-cpu >/dev/null 2>&1 || true
  docker image prune -f >/dev/null
  find wheelhouse -name '*.whl' -delete
  rm -rf build/prometheus-debs "$OUT/env" "$OUT/prometheus-context"
  export PIP_NO_CACHE_DIR=1  # the wheelhouse from the index, not from pip's cache
  echo "== cold start: the images, the wheelhouse and the Debian packages removed"
fi
step "base image" ensure_base_image
step "wheelhouse" bash deploy/docker/wheelhouse.sh
step "server image (cpu)" build_server_image
step "prometheus image" build_prometheus_image
step "gpu image" build_gpu_image
step "image checks" check_image "$STACK_IMAGE"
step "compose files" check_compose_files

write_env_file ""
step "stack up (no API key)" compose up -d --no-build logquant prometheus
step "ready" checks ready "$API"
step "api without a key" checks api "$API"
step "healthcheck and user" check_running_container
step "torch extension build" check_extension_build
step "traffic" checks traffic "$API"
step "prometheus" checks prometheus "http://127.0.0.1:$PROMETHEUS_PORT" --timeout 240
step "drain on stop (SIGTERM)" checks drain "$API" -- "${COMPOSE[@]}" stop logquant
step "exit status" check_exit_status

API_KEY=smoke-$RANDOM$RANDOM
write_env_file "$API_KEY"
step "stack up (API key in .env)" compose up -d --no-build logquant prometheus
step "ready" checks ready "$API"
step "api with the key" checks api "$API" --api-key "$API_KEY"
step "drain on down" checks drain "$API" --api-key "$API_KEY" -- "${COMPOSE[@]}" down

summary
