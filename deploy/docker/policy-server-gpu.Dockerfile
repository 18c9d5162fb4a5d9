# syntax=docker/dockerfile:1
#
# GR-2 policy server, NVIDIA GPU image: PyTorch's CUDA 13 build and the TensorRT runtime
# (GR2_RUNNER=tensorrt; eager and compile run on the GPU too). gRPC on 50051, HTTP on 8000.
#
# Build from the repository root:
#   docker build -f deploy/docker/policy-server-gpu.Dockerfile -t gr2-serve/policy-server-gpu:0.1.0 .
# Run (needs the NVIDIA Container Toolkit on the host and a driver for CUDA 13.0, >= 580):
#   docker run --rm --gpus 1 -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 \
#       -e GR2_RUNNER=tensorrt gr2-serve/policy-server-gpu:0.1.0
#
# The CUDA libraries torch and TensorRT use (cuBLAS, cuDNN, NCCL, the TensorRT libraries) come
# as pip wheels pinned to torch's CUDA version, so the base image is the small CUDA "base"
# flavour: it sets up the NVIDIA container runtime (NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES) and the CUDA 13.0 runtime; a cudnn-runtime base would only add
# a second copy of cuDNN. Its CUDA version matches torch 2.13.0's (13.0). Pinned by version
# tag; to pin the digest too:
#   docker buildx imagetools inspect nvidia/cuda:13.0.2-base-ubuntu24.04   # prints the digest
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04@sha256:<digest> ...
# Python is Ubuntu 24.04's python3 (3.12); the packages require 3.11 or newer.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder

ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# Ubuntu package versions are not pinned: the pinned base tag fixes the release, and a pinned
# version vanishes from the archive when a security update replaces it (breaks rebuilds).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch from PyPI: its Linux wheel is the CUDA 13.0 build, with the CUDA libraries as pinned
# nvidia-* / cuda-toolkit wheels. The check fails the build if a different CUDA build came in.
ARG TORCH_VERSION=2.13.0
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; cuda = torch.version.cuda or 'none'; sys.exit(None if cuda.startswith('13.') else f'expected a CUDA 13 torch, got CUDA {cuda}')"

# TensorRT for GR2_RUNNER=tensorrt, built for the same CUDA major as torch (cu13). On PyPI,
# tensorrt-cu13 is a small source package whose libraries and Python bindings are wheels on
# NVIDIA's package index; naming that index fetches them directly. torch is named again so
# the resolver keeps its pinned CUDA wheels: a TensorRT that needs others fails the build
# instead of replacing them.
ARG TENSORRT_VERSION=11.4.0.106
ARG NVIDIA_INDEX_URL=https://pypi.nvidia.com
RUN pip install --no-cache-dir -c constraints.txt --extra-index-url "${NVIDIA_INDEX_URL}" \
        "torch==${TORCH_VERSION}" \
        "tensorrt-cu13==${TENSORRT_VERSION}" \
        "tensorrt-cu13-libs==${TENSORRT_VERSION}" \
        "tensorrt-cu13-bindings==${TENSORRT_VERSION}"

# The project's packages, built into wheels and installed (not editable) at the versions
# constraints.txt pins. Copied last, so a code change rebuilds only this layer.
COPY proto/ proto/
COPY services/policy_server/ services/policy_server/
RUN pip install --no-cache-dir -c constraints.txt ./proto ./services/policy_server \
    && pip check

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime

ARG CUDA_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="gr2-policy-server-gpu" \
      org.opencontainers.image.description="GR-2 Serve policy server (NVIDIA GPU, CUDA 13, TensorRT): gRPC + REST, Prometheus metrics, episode state in Redis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"

# The interpreter the venv was made with (/opt/venv/bin/python3 links to /usr/bin/python3).
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root UID/GID (the engine cache volume gets a predictable owner). The GPU device
# nodes the container runtime adds are usable by any user.
ARG GR2_UID=10001
RUN groupadd --system --gid "${GR2_UID}" gr2 \
    && useradd --system --uid "${GR2_UID}" --gid gr2 --home-dir /home/gr2 --create-home \
        --shell /usr/sbin/nologin gr2 \
    && mkdir -p /var/cache/gr2/engines \
    && chown -R gr2:gr2 /var/cache/gr2

COPY --from=builder /opt/venv /opt/venv

# GR2_HOST=0.0.0.0: the default bind address (127.0.0.1) is unreachable from other containers
# (API keys and TLS: docs/security.md). GR2_ENGINE_CACHE_DIR: mount a volume there so that
# TensorRT engines (keyed by model, GPU arch and TensorRT version) are built once, not at
# every start.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GR2_HOST=0.0.0.0 \
    GR2_GRPC_PORT=50051 \
    GR2_HTTP_PORT=8000 \
    GR2_DEVICE=cuda \
    GR2_ENGINE_CACHE_DIR=/var/cache/gr2/engines

USER ${GR2_UID}:${GR2_UID}
WORKDIR /home/gr2
EXPOSE 50051 8000

# Healthy = /readyz answers 200 (model loaded, runner built and warmed up, not draining). The
# long start period covers a first start that builds TensorRT engines for every batch bucket.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('GR2_HTTP_PORT', '8000') + '/readyz', timeout=4)"]

ENTRYPOINT ["gr2-policy-server"]
CMD ["serve"]
