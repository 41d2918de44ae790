# shellcheck shell=bash
# Functions of deploy/ci/compose_smoke.sh (sourced; uses its variables).
TIMES=()
CURRENT_STEP=""
STACK_STARTED=""
DOCKERD_PID=""

step() {
  CURRENT_STEP=$1
  shift
  local start=$SECONDS
  echo "== $CURRENT_STEP"
  "$@"
  TIMES+=("$CURRENT_STEP $((SECONDS - start))s")
  echo "   ok ($((SECONDS - start))s)"
}

on_error() {
  [[ -z ${FAILED:-} ]] || return 0
  FAILED=1
  echo "FAIL: $CURRENT_STEP (see $OUT/logs)" >&2
  if [[ -n $STACK_STARTED ]]; then
    compose ps >&2 || true
    compose logs --no-color --tail 60 logquant prometheus >&2 || true
  fi
}

skip_docker() {  # the one line CI prints when it cannot run the stack
  echo "compose smoke test SKIPPED: Docker cannot run on this machine: $1"
  exit 77
}

apt_install() {
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
    >>"$OUT/logs/apt.log" 2>&1
}

docker_ready() { docker info >/dev/null 2>&1; }

ensure_docker() {
  if ! command -v dockerd >/dev/null && ! docker_ready; then
    apt_install docker.io || skip_docker "apt-get install docker.io failed ($OUT/logs/apt.log)"
  fi
  if ! docker_ready; then
    [[ $(id -u) == 0 ]] || skip_docker "no Docker engine runs and starting dockerd needs root"
    dockerd >"$OUT/logs/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
      docker_ready || ! kill -0 "$DOCKERD_PID" 2>/dev/null && break
      sleep 1
    done
    docker_ready || skip_docker "dockerd did not start: $(tail -1 "$OUT/logs/dockerd.log")"
  fi
  if docker compose version >/dev/null 2>&1; then
    COMPOSE_TOOL=(docker compose)
  else
    command -v docker-compose >/dev/null || apt_install docker-compose
    COMPOSE_TOOL=(docker-compose)
  fi
  command -v debootstrap >/dev/null || apt_install debootstrap
  pick_python
  # shellcheck disable=SC2034  # printed by compose_smoke.sh
  DOCKER_VERSIONS="$(docker version -f 'engine {{.Server.Version}}, client {{.Client.Version}}'); ${COMPOSE_TOOL[*]} $("${COMPOSE_TOOL[@]}" version --short)"
}

stop_our_dockerd() {
  if [[ -n $DOCKERD_PID ]]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
}

pick_python() {
  PY=""
  for candidate in "$ROOT/.venv/bin/python" python3 /usr/bin/python3; do
    if "$candidate" -c 'import yaml' >/dev/null 2>&1; then PY=$candidate && return; fi
  done
  apt_install python3-yaml
  PY=/usr/bin/python3
}

checks() { "$PY" deploy/ci/smoke_checks.py "$@"; }

ensure_base_image() {
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || ! ls build/prometheus-debs/*.deb >/dev/null 2>&1; then
    DEBS_DIR=build/prometheus-debs bash deploy/docker/base-image.sh "$BASE_IMAGE"
  fi
  docker run --rm --network none "$BASE_IMAGE" true || skip_docker "a container does not start"
}

build() {  # build LOG docker-build-args...: quiet, the log kept, its tail shown on failure
  local log=$OUT/logs/$1.log
  shift
  docker build --network none "$@" >"$log" 2>&1 || { tail -30 "$log"; return 1; }
}

build_server_image() {
  build server --target cpu --build-arg BASE_IMAGE="$BASE_IMAGE" -t logquant-serve:latest-cpu .
  grep -h "install-venv:\|os-packages:" "$OUT/logs/server.log" | sed 's/^/   /' || echo "   (all layers cached)"
}

build_prometheus_image() {
  local context=$OUT/prometheus-context
  rm -rf "$context" && mkdir -p "$context/debs"
  cp deploy/docker/prometheus.Dockerfile "$context/Dockerfile"
  cp deploy/docker/os-packages.sh build/prometheus-debs/*.deb "$context/" && mv "$context"/*.deb "$context/debs/"
  build prometheus --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$PROMETHEUS_IMAGE" "$context"
}

build_gpu_image() {
  if [[ $STACK == gpu ]]; then
    docker info -f '{{json .Runtimes}}' | grep -q nvidia || { echo "   SMOKE_GPU=1 needs the NVIDIA runtime"; return 1; }
    docker build --target gpu -t "$STACK_IMAGE" . >"$OUT/logs/gpu.log" 2>&1 || { tail -30 "$OUT/logs/gpu.log"; return 1; }
    echo "   built $STACK_IMAGE (target gpu) on $CUDA_IMAGE"
    return
  fi
  SKIPPED+=("GPU image (target gpu): its build pulls $CUDA_IMAGE from a container registry and torch's CUDA wheel from the package index, which CI cannot reach; SMOKE_GPU=1 on a GPU node builds it and runs the stack with docker-compose.gpu.yml")
  SKIPPED+=("GPU stack (docker-compose.gpu.yml): the GPU reservation needs an NVIDIA GPU and runtime")
  printf '   SKIPPED: %s\n' "${SKIPPED[@]}"
}

check_image() {  # check_image IMAGE: uid 1000, the C++ toolchain for torch extensions, the size
  local image=$1
  [[ $(docker image inspect -f '{{.Config.User}}' "$image") == 1000 ]]
  [[ $(docker run --rm --network none --entrypoint id "$image" -u) == 1000 ]]
  docker run --rm --network none --entrypoint sh "$image" -c \
    'g++ --version >/dev/null && ninja --version >/dev/null && test -f "$(python3 -c "import sysconfig; print(sysconfig.get_paths()[\"include\"])")/Python.h"'
  IMAGE_SIZE=$(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)
  echo "   $image: $IMAGE_SIZE, runs as uid 1000; g++, ninja and Python.h present"
}

check_compose_files() {
  "${COMPOSE_TOOL[@]}" --env-file "$ROOT/.env.example" -f docker-compose.yml -f docker-compose.cpu.yml config -q
  "${COMPOSE_TOOL[@]}" --env-file "$ROOT/.env.example" -f docker-compose.yml -f docker-compose.gpu.yml config -q
  "${COMPOSE_TOOL[@]}" --env-file "$ROOT/.env.example" config -q  # COMPOSE_FILE from .env.example
  echo "   the CPU pair, the GPU pair and .env.example's COMPOSE_FILE parse with ${COMPOSE_TOOL[*]}"
}

write_env_file() {  # .env.example with the smoke run's values: loopback ports, offline images, the key
  sed -e "s|^LOGQUANT_PORT=.*|LOGQUANT_PORT=127.0.0.1:$API_PORT|" \
    -e "s|^PROMETHEUS_PORT=.*|PROMETHEUS_PORT=127.0.0.1:$PROMETHEUS_PORT|" \
    -e "s|^LOGQUANT_CPU_BASE_IMAGE=.*|LOGQUANT_CPU_BASE_IMAGE=$BASE_IMAGE|" \
    -e "s|^PROMETHEUS_IMAGE=.*|PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE|" \
    -e "s|^LOGQUANT_API_KEY=.*|LOGQUANT_API_KEY=$1|" .env.example >"$OUT/env"
  COMPOSE=("${COMPOSE_TOOL[@]}" --env-file "$OUT/env" -p logquant-smoke -f docker-compose.yml -f "docker-compose.$STACK.yml")
  echo "== the stack's .env: .env.example with"
  { diff .env.example "$OUT/env" || true; } | sed -n 's/^> /   /p' | sed 's/^\(   LOGQUANT_API_KEY=\).\+/\1<a key>/' 
}

compose() {
  STACK_STARTED=1
  "${COMPOSE[@]}" "$@"
}

container() { compose ps -a -q logquant; }

check_running_container() {
  local cid status
  cid=$(container)
  for _ in $(seq 40); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$cid")
    [[ $status == healthy ]] && break
    sleep 3
  done
  [[ $status == healthy ]] || { echo "   healthcheck: $status"; return 1; }
  [[ $(docker top "$cid" -o pid,uid | awk 'NR > 1 { print $2 }' | sort -u) == 1000 ]]
  echo "   healthcheck healthy; every process in the container runs as uid 1000"
}

check_extension_build() {  # what the fused CPU kernel needs: a C++ extension built at run time
  local source='int add_one(int x) { return x + 1; }'
  compose exec -T logquant python3 -c "
from torch.utils.cpp_extension import load_inline
module = load_inline('smoke_extension', '$source', functions=['add_one'])
assert module.add_one(41) == 42
print('   torch.utils.cpp_extension built and loaded an extension in', module.__file__.rsplit('/', 2)[0])"
}

check_exit_status() {
  local cid code
  cid=$(container)
  code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
  compose logs --no-color logquant >"$OUT/logs/server-run1.log"
  if grep -q "Traceback" "$OUT/logs/server-run1.log"; then
    grep -m1 -A20 Traceback "$OUT/logs/server-run1.log"
    return 1
  fi
  [[ $code == 0 ]] || { echo "   exit status $code"; return 1; }
  echo "   the server exited 0 after SIGTERM; no traceback in its log"
}

stack_down() {
  if [[ -n $STACK_STARTED ]]; then
    compose down -v --remove-orphans >>"$OUT/logs/compose-down.log" 2>&1 || true
  fi
}

summary() {
  echo "== compose smoke ($STACK stack) passed in ${SECONDS}s; image $STACK_IMAGE $IMAGE_SIZE"
  printf '   %s\n' "${TIMES[@]}"
  local skipped
  for skipped in "${SKIPPED[@]}"; do echo "   SKIPPED: $skipped"; done
}
