#!/usr/bin/env bash
# make bench: install the load tools when missing, then run loadtest/bench.py.
# Environment: DUR (seconds per run, 6), ROUNDS (3), SCENARIOS (comma list), NO_DOC=1;
# see bench.py and docs/benchmarks.md. redis-server is installed too: two scenarios
# use the Redis rate limiter.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v nginx >/dev/null 2>&1 || packages+=(nginx)
command -v wrk >/dev/null 2>&1 || packages+=(wrk)
command -v h2load >/dev/null 2>&1 || packages+=(nghttp2-client)
command -v taskset >/dev/null 2>&1 || packages+=(util-linux)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)

if ((${#packages[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "bench: please install ${packages[*]} (no apt-get on this machine)" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    echo "bench: installing ${packages[*]}" >&2
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "bench: .venv is missing; run 'make setup' first (make bench does it)" >&2
    exit 1
fi
# Measure meshgate as an installed package runs: with its bytecode compiled. Where
# PYTHONDONTWRITEBYTECODE is set (as on some CI machines) an editable checkout has no
# .pyc files, and every gateway process would compile meshgate's modules at start
# (about 0.17 s and 1 MB of RSS more per worker; docs/performance.md).
.venv/bin/python -m compileall -q gateway authn ratelimit egress >/dev/null
exec .venv/bin/python loadtest/bench.py "$@"
