# logquant-serve image. GPU (default target `gpu`): CUDA runtime base, torch from PyPI
# (its Linux wheel is the CUDA build, pinned in Makefile's TORCH_SPEC). CPU: `--target cpu`.
# Both install the project exactly as the README does: `make install`.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

# ---- build the virtual environment (GPU) -------------------------------------------------
FROM ${CUDA_IMAGE} AS build-gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev make gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile requirements-data.txt ./
COPY logquant ./logquant
COPY server ./server
RUN make install VENV=/opt/venv PYTHON=python3

# ---- runtime (GPU) -----------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /models /cache /home/app/.cache/huggingface \
    && chown -R app:app /models /cache /home/app/.cache
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /app /app
ENV PATH=/opt/venv/bin:$PATH \
    LOGQUANT_HOST=0.0.0.0 \
    LOGQUANT_PORT=8000 \
    LOGQUANT_CACHE_DIR=/cache \
    HF_HOME=/home/app/.cache/huggingface
USER 1000
WORKDIR /app
VOLUME ["/models", "/cache", "/home/app/.cache/huggingface"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["logquant-serve"]

# ---- CPU variant -------------------------------------------------------------------------
FROM ${CPU_IMAGE} AS build-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile requirements-data.txt ./
COPY logquant ./logquant
COPY server ./server
RUN make install VENV=/opt/venv PYTHON=python3

FROM ${CPU_IMAGE} AS cpu
RUN useradd --create-home --uid 1000 app \
    && mkdir -p /models /cache /home/app/.cache/huggingface \
    && chown -R app:app /models /cache /home/app/.cache
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /app /app
ENV PATH=/opt/venv/bin:$PATH \
    LOGQUANT_HOST=0.0.0.0 \
    LOGQUANT_PORT=8000 \
    LOGQUANT_DEVICE=cpu \
    LOGQUANT_CACHE_DIR=/cache \
    HF_HOME=/home/app/.cache/huggingface
USER 1000
WORKDIR /app
VOLUME ["/models", "/cache", "/home/app/.cache/huggingface"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["logquant-serve"]

# the default target is the GPU image
FROM gpu
