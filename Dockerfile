# logquant-serve image, two targets from one file:
#   gpu (default): BASE_IMAGE is the CUDA runtime image; torch from PyPI (its Linux wheel is the
#                  CUDA build). Build on a machine that reaches the registry and the index.
#   cpu:           `--target cpu`; offline with `--build-arg BASE_IMAGE=logquant-base:bookworm`
#                  (deploy/docker/base-image.sh) and the wheels in wheelhouse/
#                  (deploy/docker/wheelhouse.sh), as deploy/ci/compose_smoke.sh does.
# Both install the project as the README does (`make install`) and run as uid 1000.
# Stages are ordered so that the classic builder, which builds every stage before the target,
# never touches the CUDA image's torch for `--target cpu`.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- the OS: Python, its headers and g++ (torch.utils.cpp_extension and Triton compile at run time)
FROM ${BASE_IMAGE} AS os
COPY deploy/docker/os-packages.sh /usr/local/sbin/os-packages
# Ubuntu 24.04 images have a user `ubuntu` with uid 1000: uid 1000 is ours (k8s runAsUser).
RUN os-packages python3 python3-venv python3-dev g++ make \
    && if id 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /models /cache /home/app/.cache/huggingface \
    && chown -R app:app /models /cache /home/app/.cache

FROM os AS source
WORKDIR /app
COPY deploy/docker/install-venv.sh /usr/local/sbin/install-venv
COPY pyproject.toml README.md Makefile requirements-data.txt ./
COPY logquant ./logquant
COPY server ./server

# ---- what both images share at run time
FROM os AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    LOGQUANT_HOST=0.0.0.0 \
    LOGQUANT_PORT=8000 \
    LOGQUANT_CACHE_DIR=/cache \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    HF_HOME=/home/app/.cache/huggingface \
    PYTHONUNBUFFERED=1
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["logquant-serve"]

# ---- CPU: torch's CPU build, offline from wheelhouse/ when it holds wheels
FROM source AS build-cpu
COPY wheelhouse/ /wheels/
RUN install-venv /opt/venv https://download.pytorch.org/whl/cpu

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /app /app
ENV LOGQUANT_DEVICE=cpu
USER 1000
VOLUME ["/models", "/cache", "/home/app/.cache/huggingface"]

# ---- GPU: PyPI's CUDA build of torch; PIP_INDEX_URL / PIP_EXTRA_INDEX_URL name a mirror
FROM source AS build-gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
RUN install-venv /opt/venv

FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /app /app
USER 1000
VOLUME ["/models", "/cache", "/home/app/.cache/huggingface"]

# the default target is the GPU image
FROM gpu
