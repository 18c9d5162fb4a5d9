# syntax=docker/dockerfile:1
#
# GR-2 policy server, CPU image: gRPC on 50051, HTTP (REST, /metrics, /healthz, /readyz) on 8000.
#
# Build from the repository root (the build context is the root; see .dockerignore):
#   docker build -f deploy/docker/policy-server.Dockerfile -t gr2-serve/policy-server:0.1.0 .
# Run (every setting is a GR2_* variable: README "Policy server settings"):
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 gr2-serve/policy-server:0.1.0
#
# The base image is pinned by version tag. To pin it byte for byte, add its digest:
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm   # prints the digest
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> ...
# Python 3.11 on Debian 12 is what the test suite runs on.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first, in a layer of its own: it is the largest download and changes only with
# constraints.txt. PyPI's Linux torch wheel is the CUDA build (gigabytes of CUDA libraries a
# CPU image never uses), so the CPU wheel comes from PyTorch's CPU index; its version
# 2.13.0+cpu satisfies the torch==2.13.0 pin in constraints.txt, and torch's own dependencies
# come from PyPI at the versions constraints.txt pins (the Makefile's install, minus the dev
# tools).
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt \
        --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's packages, built into wheels and installed (not editable) with their pinned
# dependencies. Copied after torch, so a code change rebuilds only this layer.
COPY proto/ proto/
COPY services/policy_server/ services/policy_server/
RUN pip install --no-cache-dir -c constraints.txt ./proto ./services/policy_server \
    && pip check

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="gr2-policy-server" \
      org.opencontainers.image.description="GR-2 Serve policy server (CPU): gRPC + REST, Prometheus metrics, episode state in Redis" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed, non-root UID/GID: files it writes to volumes (the engine cache) get a predictable
# owner, and Kubernetes' runAsUser / fsGroup can name it.
ARG GR2_UID=10001
RUN groupadd --system --gid "${GR2_UID}" gr2 \
    && useradd --system --uid "${GR2_UID}" --gid gr2 --home-dir /home/gr2 --create-home \
        --shell /usr/sbin/nologin gr2 \
    && mkdir -p /var/cache/gr2/engines \
    && chown -R gr2:gr2 /var/cache/gr2

COPY --from=builder /opt/venv /opt/venv

# GR2_HOST=0.0.0.0: the default bind address (127.0.0.1) is unreachable from other containers.
# Bound to the network, the server should get API keys (GR2_API_KEYS) and TLS when it is
# reachable beyond a private network (docs/security.md).
# GR2_ENGINE_CACHE_DIR: ONNX exports survive restarts when a volume is mounted there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GR2_HOST=0.0.0.0 \
    GR2_GRPC_PORT=50051 \
    GR2_HTTP_PORT=8000 \
    GR2_ENGINE_CACHE_DIR=/var/cache/gr2/engines

USER ${GR2_UID}:${GR2_UID}
WORKDIR /home/gr2
EXPOSE 50051 8000

# Healthy = /readyz answers 200: the model is loaded and warmed up and the server is not
# draining (/healthz would pass while the model is still loading). A Redis outage does not
# make it unhealthy: steps fail open (docs/reliability.md). urlopen raises, and python exits 1,
# on a refused connection, a timeout or a non-2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('GR2_HTTP_PORT', '8000') + '/readyz', timeout=4)"]

# Exec form: the server is PID 1 and gets SIGTERM itself, and drains (docs/reliability.md).
# `docker run IMAGE describe --preset gr2-tiny` runs another subcommand.
ENTRYPOINT ["gr2-policy-server"]
CMD ["serve"]
