#!/usr/bin/env bash
# Installs what the benchmark's Celery comparison needs: Debian's
# redis-server (system-wide; needs root) and Celery with its Redis client
# in a virtualenv under .tools/celery (or $FLOTILLA_TOOLS/celery).
# Only the benchmarks use them (scripts/bench.sh calls this), never tests.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
tools=${FLOTILLA_TOOLS:-$repo/.tools}
venv=$tools/celery

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-celery: redis-server missing; run as root or: sudo apt-get install redis-server" >&2
        exit 1
    fi
    echo "install-celery: installing Debian's redis-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
    # The package starts a system service; the benchmark runs its own.
    (systemctl disable --now redis-server 2>/dev/null || service redis-server stop 2>/dev/null) || true
fi
if ! "$venv/bin/python" -c "import celery, redis" 2>/dev/null; then
    echo "install-celery: making $venv with Celery"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "celery[redis]==5.5.*"
fi
echo "install-celery: $("$venv/bin/python" -c 'import celery; print("Celery", celery.__version__)'), $(redis-server --version | head -1)"
