# flotilla in a container.
#
#   docker build -t flotilla .
#   docker run --rm flotilla demo        # the built-in demo; needs no config
#
# `flotilla up` reads /etc/flotilla/flotilla.toml (FLOTILLA_CONFIG): mount
# one there, or bake it into an image of your own.
#
# Your agents: flotilla runs them as child processes, so they must live in
# the same image. Build on this one, install what they need, and name
# their programs by absolute path in flotilla.toml (agents get the
# daemon's PATH, but a path leaves no doubt):
#
#   FROM ghcr.io/flotilla/flotilla:latest
#   USER root
#   RUN apt-get update \
#    && apt-get install -y --no-install-recommends python3 \
#    && rm -rf /var/lib/apt/lists/*
#   COPY agents/ /opt/agents/
#   COPY flotilla.toml /etc/flotilla/flotilla.toml
#   USER 10001:10001
#
# with, in flotilla.toml:
#
#   [agents.reviewer]
#   command = ["/usr/bin/python3", "-u", "/opt/agents/reviewer.py"]
#   workdir = "/opt/agents"
#
# docs/deploy.md has the whole walk-through.

FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources, so that a change under src/
# does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin flotilla \
 && rm -rf src

COPY src ./src
# COPY keeps the files' own mtimes, which can be older than the stub
# build: touch them so that cargo rebuilds the crate, not ships the stub.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin flotilla


FROM debian:bookworm-slim

# ca-certificates: tls:// brokers and HTTPS webhooks verify against the
# system roots.
#
# No tini (or `docker run --init`): flotilla is a fine PID 1. It installs
# its own SIGTERM and SIGINT handlers (the kernel ignores signals that PID
# 1 does not handle), makes itself a child subreaper and reaps its agents'
# orphaned descendants, and stops each agent's whole process group. An
# init in front of it would only relay the signal. One is harmless if your
# platform insists, as long as it signals flotilla alone, not its process
# group: flotilla stops its agents in order, while agents signalled
# directly die at once with their tasks charged an attempt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid, so that volume ownership and Kubernetes' runAsUser
# match the image. HOME is the writable data directory: agents inherit
# HOME, and a read-only root file system leaves nothing else writable.
RUN groupadd --system --gid 10001 flotilla \
 && useradd --system --uid 10001 --gid 10001 \
      --home-dir /var/lib/flotilla --no-create-home --shell /usr/sbin/nologin flotilla \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/flotilla \
 && install -d -m 0755 /etc/flotilla

COPY --from=builder /src/target/release/flotilla /usr/local/bin/flotilla

ENV FLOTILLA_CONFIG=/etc/flotilla/flotilla.toml \
    HOME=/var/lib/flotilla
USER 10001:10001
WORKDIR /var/lib/flotilla

# Health endpoints and /metrics, once [http] listen is "0.0.0.0:9750"
# (which requires a token).
EXPOSE 9750

ENTRYPOINT ["flotilla"]
CMD ["up"]
