#!/usr/bin/env bash
# Make this machine ready for `make test`: Debian packages (haproxy 2.6,
# redis-server, mosquitto), the project virtualenv, and HAProxy 3.2 unpacked
# under .haproxy/3.2/. Idempotent, and quick when everything is present.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
log() { printf 'bootstrap: %s\n' "$*" >&2; }

# binary -> Debian package
declare -A NEED=(
    [/usr/sbin/haproxy]=haproxy
    [/usr/bin/redis-server]=redis-server
    [/usr/sbin/mosquitto]=mosquitto
)
missing=()
for bin in "${!NEED[@]}"; do
    [[ -x "$bin" ]] || missing+=("${NEED[$bin]}")
done
# python3 -m venv needs ensurepip (python3-venv on Debian).
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && [[ ! -x .venv/bin/python ]]; then
    missing+=(python3-venv)
fi

# tests/test_compiled.py builds the hot modules with mypyc: it needs gcc and Python.h
# (python3-dev) for the Python that makes .venv; without them it is skipped. Installed when
# root (CI); only noted otherwise, since the dev virtualenv itself is pure Python.
if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_path("include"), "Python.h")))'; then
    if [[ $(id -u) -eq 0 ]]; then
        missing+=(python3-dev)
    else
        log "note: no Python.h (python3-dev): tests/test_compiled.py will be skipped"
    fi
fi
if ! command -v gcc >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        missing+=(gcc libc6-dev)
    else
        log "note: no gcc: tests/test_compiled.py will be skipped"
    fi
fi

if ((${#missing[@]})); then
    cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages: ${missing[*]}"
        echo "Run as root:  $cmd" >&2
        exit 1
    fi
    log "installing: ${missing[*]}"
    # The packages' own services (haproxy on the stock config, redis on 6379,
    # mosquitto on 1883) are left as Debian sets them up: the tests never use
    # those ports, they start their own processes on free ports.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- virtualenv -------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.mqtt-affinity-installed
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]] || ! .venv/bin/python -c 'import agent, pytest, paho.mqtt, redis, yaml, hypothesis, mypy, ruff' >/dev/null 2>&1; then
    log "pip install -e '.[test]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

# --- HAProxy 3.2 (next to the system's 2.6, never installed system-wide) ------
ha32="$(.haproxy/3.2/haproxy -v 2>/dev/null || true)"
if [[ $(id -u) -ne 0 ]] && [[ "$ha32" != *"version 3.2."* ]]; then
    echo "HAProxy 3.2 missing. Run as root:  $REPO_ROOT/scripts/fetch-haproxy32.sh" >&2
    exit 1
fi
bash scripts/fetch-haproxy32.sh

# Fail early and clearly if the system haproxy is not the 2.6 the tests pin.
ha26="$(/usr/sbin/haproxy -v 2>/dev/null || true)"
ha26="${ha26%%$'\n'*}"  # first line, without a SIGPIPE-prone `| head` under pipefail
if [[ "$ha26" != *"version 2.6."* ]]; then
    log "WARNING: /usr/sbin/haproxy is not 2.6: $ha26 (set HAPROXY26_BIN to a 2.6 binary)"
fi
log "ready"
