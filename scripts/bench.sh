#!/usr/bin/env bash
# Reproduces every figure and plot of BENCHMARKS.md: builds the release
# binaries, installs what the scenarios need (nats-server into .tools, and
# for the Celery comparison Debian's redis-server and a Celery virtualenv),
# then runs flotilla-bench, which rewrites the generated block of
# BENCHMARKS.md and docs/bench/*.svg. Takes about half an hour on 2 cores.
#
# Arguments go to flotilla-bench, e.g. `scripts/bench.sh --runs 5` or
# `scripts/bench.sh --scenario latency` (without --write the figures are
# only printed: `scripts/bench.sh --no-write --scenario recovery`).
set -euo pipefail
cd "$(dirname "$0")/.."

write=(--write)
args=()
for arg in "$@"; do
    if [ "$arg" = "--no-write" ]; then write=(); else args+=("$arg"); fi
done

scripts/install-nats-server.sh
scripts/install-celery.sh
cargo build --release --bins
exec target/release/flotilla-bench "${write[@]}" "${args[@]}"
