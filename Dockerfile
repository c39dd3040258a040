# syntax=docker/dockerfile:1
#
# mqtt-affinity agent image.
#
#   docker build -t mqtt-affinity .
#   docker run --rm -v $PWD/agent.yaml:/etc/mqtt-affinity/agent.yaml:ro \
#       -p 12345:12345 -p 9898:9898 mqtt-affinity
#
# The image ships no config: mount one at /etc/mqtt-affinity/agent.yaml (see
# config/agent.yaml). Inside a container it must listen on 0.0.0.0, and the
# HEALTHCHECK below needs metrics_listen on port 9898 (0.0.0.0 or 127.0.0.1).
# Needs BuildKit (the default builder since Docker 23) for RUN --mount.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# Stage 1: build the project wheel and the wheels of its dependencies.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# gcc compiles the hot modules with mypyc (setup.py; the image already has
# Python.h). The runtime stage gets the compiled wheel, not the compiler. Build
# with --build-arg MQTT_AFFINITY_PURE=1 for a pure-Python image (no gcc needed:
# setup.py falls back to pure Python by itself when it cannot compile).
ARG MQTT_AFFINITY_PURE=
ENV MQTT_AFFINITY_PURE=${MQTT_AFFINITY_PURE}
RUN if [ -z "$MQTT_AFFINITY_PURE" ]; then \
        apt-get update \
     && apt-get install -y --no-install-recommends gcc libc6-dev \
     && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
# Only what the wheel is built from: pyproject.toml with setup.py and the
# in-tree build backend (build_backend.py), README.md (the long description;
# the wildcard keeps a checkout without it buildable) and agent/ (the package
# and its Lua data files).
COPY pyproject.toml setup.py build_backend.py MANIFEST.in README* ./
COPY agent ./agent
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------------------
# Stage 2: runtime. No compiler, no source tree: only the installed wheels.
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="mqtt-affinity" \
      org.opencontainers.image.description="HAProxy SPOE agent: sticky MQTT sessions across a broker cluster, shared through Redis" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid 10001 mqtt-affinity \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mqtt-affinity \
 && mkdir -p /etc/mqtt-affinity

# Install from the build stage's wheels only (--no-index: nothing is fetched
# here). The bind mount keeps the wheel files out of the image layers.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels mqtt-affinity \
 && mqtt-affinity --version  # says "hot path compiled with mypyc" or "pure Python"

USER 10001:10001
WORKDIR /

# 12345: SPOP (HAProxy's SPOE engine connects here); 9898: /metrics, /healthz, /readyz.
EXPOSE 12345 9898

# SIGTERM = graceful stop (in-flight decisions finish); SIGHUP = reload nodes/weights
# (docker kill --signal HUP <container>).
STOPSIGNAL SIGTERM

# Liveness only: /healthz answers while the process serves HTTP. /readyz (SPOP
# listening and Redis reachable) is for orchestrators that gate traffic.
# slim has no curl, so Python's urllib does the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9898/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["mqtt-affinity"]
CMD ["run", "--config", "/etc/mqtt-affinity/agent.yaml"]
