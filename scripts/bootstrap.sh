#!/usr/bin/env bash
# Installs everything cacheagent needs on a fresh Debian machine, idempotently:
# system packages (FUSE 3, the CNCF distribution registry, promtool, htpasswd, tinyproxy),
# a virtualenv with the Python dependencies, and the generated gRPC code.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry prometheus apache2-utils util-linux curl openssl dnsmasq-base tinyproxy)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends keeps the registry and prometheus from pulling in daemons we never start.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged services on install; the tests start their own on loopback ports.
for svc in docker-registry prometheus tinyproxy; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.deps-stamp
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
.venv/bin/python scripts/gen_protos.py
