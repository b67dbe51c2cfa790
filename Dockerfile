# syntax=docker/dockerfile:1
# databricks-shield container image: a build stage compiles the release binary, a small Debian
# runtime stage runs it as a non-root user with its delivery state on a volume.
#
#   docker compose -f docker-compose-databricks-cron.yaml up -d     (settings: databricks-cron.env)
#   docker build -t databricks-shield .                              (the image alone)
#
# Service mode by default (a cycle every RECURRING_INTERVAL_SECONDS); append `-once`, `check` or
# `discover` to run one command instead, e.g. `docker run --rm --env-file databricks-cron.env
# databricks-shield check`.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build: the release binary ------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# librdkafka (built from source by rdkafka-sys) and the vendored OpenSSL need a C/C++ toolchain,
# make, perl, pkg-config and zlib headers. Versions: those of the pinned Debian release (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make perl pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p databricks-shield --bin databricks-shield \
    && install -D -m 0755 target/release/databricks-shield /out/databricks-shield

# ---- runtime: the binary, CA certificates, curl for the health check --------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shield \
    && useradd --system --uid 10001 --gid shield --no-create-home \
        --home-dir /var/lib/databricks-shield --shell /usr/sbin/nologin shield \
    && install -d -o shield -g shield -m 0700 /var/lib/databricks-shield
COPY --from=build /out/databricks-shield /usr/local/bin/databricks-shield
# STATE_DIR holds the exactly-once delivery state: keep it on a volume, never shared by two
# containers. METRICS_ADDR listens on every interface of the container (the compose file
# publishes it on the host's loopback only).
ENV STATE_DIR=/var/lib/databricks-shield \
    METRICS_ADDR=0.0.0.0:9464
VOLUME ["/var/lib/databricks-shield"]
WORKDIR /var/lib/databricks-shield
USER 10001:10001
EXPOSE 9464
STOPSIGNAL SIGTERM
# Alive = the listener answers. The port follows METRICS_ADDR (keep it on: `off` fails this check).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${METRICS_ADDR##*:}/healthz\" >/dev/null || exit 1"]
ENTRYPOINT ["databricks-shield"]
