# syntax=docker/dockerfile:1
#
# GR-2 WBC agent (the edge side): the 200 Hz IK-QP loop driving the simulated Gen3 (MuJoCo,
# headless rendering) or a real one, /metrics on 9102. No torch, by design (DESIGN.md section
# 2): the build fails if anything pulls it in.
#
# Build from the repository root:
#   docker build -f deploy/docker/wbc-agent.Dockerfile -t gr2-serve/wbc-agent:0.1.0 .
# Run one episode of the touch task against a policy server (README "Agent settings"):
#   docker run --rm -e GR2_WBC_SERVER=HOST:50051 gr2-serve/wbc-agent:0.1.0 \
#       run --robot sim --task touch --seed 1000001
#
# The base image is pinned by version tag; to pin the digest too:
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm   # prints the digest
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> ...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The agent and the packages it uses, built into wheels and installed (not editable) at the
# versions constraints.txt pins. The last check fails the build if torch got in.
COPY constraints.txt ./
COPY proto/ proto/
COPY clients/ clients/
COPY services/wbc_agent/ services/wbc_agent/
RUN pip install --no-cache-dir -c constraints.txt ./proto ./clients ./services/wbc_agent \
    && pip check \
    && python -c "import importlib.util, sys; sys.exit('torch must not be installed in the agent image' if importlib.util.find_spec('torch') else 0)"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="gr2-wbc-agent" \
      org.opencontainers.image.description="GR-2 Serve edge whole-body-control agent: Gen3 IK-QP loop, MuJoCo sim or Kortex backend (no torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# Headless rendering of the sim cameras: MuJoCo's EGL backend on Mesa (software rendering on
# llvmpipe when no GPU is passed in), and OSMesa as the fallback (MUJOCO_GL=osmesa). The EGL
# set is the one scripts/ensure_system_deps.sh installs for the tests. Debian package versions
# are not pinned: the pinned base tag fixes the Debian release, and a pinned package version
# vanishes from the archive when a security update replaces it, which breaks rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root UID/GID (files on volumes get a predictable owner).
ARG GR2_UID=10001
RUN groupadd --system --gid "${GR2_UID}" gr2 \
    && useradd --system --uid "${GR2_UID}" --gid gr2 --home-dir /home/gr2 --create-home \
        --shell /usr/sbin/nologin gr2

COPY --from=builder /opt/venv /opt/venv

# GR2_WBC_METRICS_HOST=0.0.0.0: the default (127.0.0.1) is unreachable for Prometheus in
# another container. Real-time scheduling (GR2_WBC_RT_PRIORITY) needs CAP_SYS_NICE and a
# memlock limit; without them the agent logs how to allow it and runs SCHED_OTHER (README
# "Real time").
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MUJOCO_GL=egl \
    GR2_WBC_METRICS_HOST=0.0.0.0 \
    GR2_WBC_METRICS_PORT=9102

USER ${GR2_UID}:${GR2_UID}
WORKDIR /home/gr2
EXPOSE 9102

# /metrics is served while an episode runs (`run`): it comes up once the agent has reached
# the policy server and built the robot. With GR2_WBC_METRICS_PORT=0 (metrics off), or for
# `selftest`, disable this check (docker run --no-healthcheck).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('GR2_WBC_METRICS_PORT', '9102') + '/metrics', timeout=4)"]

# Exec form: the agent is PID 1 and gets SIGTERM itself (it stops the arm, ends the episode).
# The default command runs one episode of the touch task on the simulated arm against
# GR2_WBC_SERVER (default localhost:50051); `selftest` needs no policy server.
ENTRYPOINT ["gr2-wbc-agent"]
CMD ["run", "--robot", "sim", "--task", "touch", "--seed", "1000001"]
